"""Rejection reasons: one name per way a sample can be dropped, shared by every stage."""

ZERO_BYTE = "zero_byte"
NOT_AN_IMAGE = "not_an_image"
TRUNCATED = "truncated"
UNDECODABLE = "undecodable"
DECOMPRESSION_BOMB = "decompression_bomb"
TOO_SMALL = "too_small"
ASPECT_RATIO = "aspect_ratio"
EXACT_DUPLICATE = "exact_duplicate"
NEAR_DUPLICATE = "near_duplicate"
NSFW = "nsfw"
LOW_AESTHETIC = "low_aesthetic"
UNSAFE_PATH = "unsafe_path"
NO_CAPTION = "no_caption"
ENCODE_FAILED = "encode_failed"
TIE = "tie"
IDENTICAL_PAIR = "identical_pair"
UNLABELED = "unlabeled"
NOT_DIFFERENT = "not_different"
BAD_LABELS = "bad_labels"
INVALID_CELL = "invalid_cell"  # a table cell that should hold image bytes holds something else
CORRUPT_SHARD = "corrupt_shard"  # a tar or parquet file that cannot be read (to its end)
BAD_CAPTION = "bad_caption"  # a caption that is not text, or longer than the cap
HIDDEN_FILE = "hidden_file"  # a dot-file or dot-folder in an input folder, never read
TOO_LARGE = "too_large"  # an image file or tar member over max_image_bytes, never read
DUPLICATE_MEMBER = "duplicate_member"  # a second tar member of the same name, never read
