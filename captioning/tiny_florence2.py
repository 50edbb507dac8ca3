"""A random-weight Florence-2 folder built offline (`t2i init-captioner OUT --preset tiny-florence2`).

Florence-2 is an encoder-decoder VLM: a DaViT vision tower whose features are prepended to the
prompt's token embeddings, and a BART encoder-decoder that answers. `generate` returns only the
decoder's tokens (never the prompt), and prompts are task tokens such as `<MORE_DETAILED_CAPTION>`
that `Florence2Processor` expands into questions. The twin is the transformers-native class
(`Florence2ForConditionalGeneration`, no remote code) at toy widths, with a CLIP-style PIL image
processor and the word-piece tokenizer of captioning/tiny.py, so the real loading, prompting and
decoding path runs in tests. Output embeddings are not tied to the input ones: with tied random
weights the decoder echoes its start token, which is the end token, and every answer would be
empty. The text weights are initialised large enough that answers depend on the image and prompt.
"""

from __future__ import annotations

from captioning.tiny_tokenizer import build_tokenizer

IMAGE_TOKEN = "<image>"
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", IMAGE_TOKEN)  # BART's order: bos 0, pad 1, eos 2
SIDE = 32  # image side in pixels
VISION = {
    "depths": (1, 1),
    "patch_size": (7, 3),
    "patch_stride": (4, 2),  # 32 px -> 8 -> 4: 16 patch features
    "patch_padding": (3, 1),
    "patch_prenorm": (False, True),
    "embed_dim": (16, 32),
    "num_heads": (2, 2),
    "num_groups": (2, 2),
    "window_size": 2,
    "projection_dim": 64,
    "max_position_embeddings": 8,
    "drop_path_rate": 0.0,
}
TEXT = {
    "d_model": 64,
    "encoder_layers": 1,
    "decoder_layers": 1,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128,
    "max_position_embeddings": 256,
    # Weights 15x larger than BART's default init: at 0.02 the random decoder barely reads the
    # encoder and answers every image and prompt alike, which would hide batching mistakes.
    "init_std": 0.3,
}


def image_tokens() -> int:
    """Visual tokens per image: one per final-stage patch, plus the pooled temporal token."""
    side = SIDE
    for stride in VISION["patch_stride"]:
        side //= stride
    return side * side + 1


def build(seed: int = 0):
    """(model, processor): a random-weight Florence-2 and its processor, from configs alone."""
    import torch
    from transformers import (
        BartConfig,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.florence2.configuration_florence2 import Florence2VisionConfig

    tokenizer = build_tokenizer(
        SPECIALS, pad="<pad>", bos="<s>", eos="</s>", image_token=IMAGE_TOKEN
    )
    image_processor = CLIPImageProcessorPil(
        size={"height": SIDE, "width": SIDE},
        do_center_crop=False,
        crop_size={"height": SIDE, "width": SIDE},
    )
    image_processor.image_seq_length = image_tokens()
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tokenizer)
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "decoder_start_token_id": tokenizer.eos_token_id,  # BART starts decoding from </s>
        "forced_eos_token_id": tokenizer.eos_token_id,
    }
    text = BartConfig(**TEXT, vocab_size=len(tokenizer), tie_word_embeddings=False, **special)
    config = Florence2Config(
        vision_config=Florence2VisionConfig(**VISION),
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(config).eval()
    model.generation_config.update(do_sample=False, **special)
    return model, processor
