"""The tiny captioners' tokenizer: WordPiece over a fixed word list, built offline, same ids everywhere.

Shared by the three tiny presets (captioning/tiny.py, tiny_florence2.py, tiny_qwen2vl.py).
"""

from __future__ import annotations

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN)

# Words that prompts and captions use, so the word salad reads as words.
WORDS = """
a an the of and with in on at to from by for is are its this that there one two three
image picture photo photograph painting scene view close up top side front background
small large old young man woman person people face portrait astronaut suit flag space rocket
sky cloud cup coffee table cat dog fur eyes grey black white red green blue yellow orange
brown dark light bright colour colours texture textures shape star galaxy telescope retina
camera tripod building city street tree flower garden temple roof motorcycle book coin horse
grass rock water sea mountain snow sun night day standing sitting holding wearing looking
near behind under above left right center describe detail detailed description paragraph
main subject what it doing setting composition style very manner original caption which may
be incomplete or inaccurate keep names facts only where agrees them user assistant shows
""".split()  # noqa: SIM905

MAX_LENGTH = 1024  # the tiny decoders' max_position_embeddings


def build_tokenizer(
    specials: tuple[str, ...] = SPECIAL_TOKENS,
    pad: str = "<pad>",
    bos: str | None = "<s>",
    eos: str = "</s>",
    image_token: str = IMAGE_TOKEN,
    extra_chars: str = "",
):
    """A WordPiece tokenizer over WORDS plus single characters: any text tokenizes, same ids everywhere.

    `specials` come first (ids 0..n-1) and are never split; `image_token` is exposed as the
    tokenizer's `image_token` (the attribute multimodal processors read).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(
        set("".join(WORDS))
        | set("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()/&")
        | set(extra_chars)
    )
    vocab: dict[str, int] = {}
    for token in [*specials, "<unk>", *sorted(set(WORDS)), *chars, *("##" + c for c in chars)]:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", max_input_chars_per_word=100))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    backend.decoder = decoders.WordPiece()
    named = {pad, eos, image_token, *([bos] if bos else [])}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=pad,
        bos_token=bos,
        eos_token=eos,
        unk_token="<unk>",
        extra_special_tokens={"image_token": image_token},
        additional_special_tokens=[t for t in specials if t not in named and t != "<unk>"],
        padding_side="left",  # decoder-only batched generation pads on the left
        model_max_length=MAX_LENGTH,
    )
