"""A random-weight Qwen2-VL folder built offline (`t2i init-captioner OUT --preset tiny-qwen2vl`).

Qwen2-VL is a decoder-only VLM with dynamic resolution: the image processor resizes each image
to a multiple of patch x merge pixels between `min_pixels` and `max_pixels` (the processor option
users tune, e.g. `--processor-kwargs '{"max_pixels": 200704}'`), and the prompt gets one
`<|image_pad|>` per merged patch. The twin is `Qwen2VLForConditionalGeneration` at toy widths with
the files a downloaded folder has: preprocessor_config.json (the PIL image processor),
tokenizer files, chat_template.jinja, each naming `Qwen2VLProcessor`. Its chat template is a
ChatML one like Qwen's (system turn optional). The folder is written file by file rather than by
`Qwen2VLProcessor.save_pretrained`, because that class cannot be built without torchvision's
video processor; captioning/processors.py loads such folders image-only when torchvision is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

from captioning.tiny_tokenizer import build_tokenizer

PAD, EOS = "<|endoftext|>", "<|im_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
SPECIALS = (PAD, "<|im_start|>", EOS, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, "<unk>")
PATCH, MERGE = 4, 2
MIN_PIXELS, MAX_PIXELS = (PATCH * MERGE * 2) ** 2, (PATCH * MERGE * 6) ** 2  # 16^2 .. 48^2 pixels
VISION = {
    "depth": 2,
    "embed_dim": 32,
    "hidden_size": 64,
    "num_heads": 2,
    "patch_size": PATCH,
    "spatial_merge_size": MERGE,
    "temporal_patch_size": 2,
}
TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    # head dim 16 = 2 * (2 + 3 + 3): temporal, height and width rotary sections (M-RoPE)
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
}

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}" + VISION_START + IMAGE_PAD + VISION_END + ""
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}" + EOS + "\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_parts(seed: int = 0):
    """(model, image_processor, tokenizer): the random-weight model and its processor's parts."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    tokenizer = build_tokenizer(SPECIALS, pad=PAD, bos=None, eos=EOS, image_token=IMAGE_PAD)
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=PATCH,
        merge_size=MERGE,
        temporal_patch_size=2,
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
    )
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIALS}
    special = {"bos_token_id": ids[PAD], "eos_token_id": ids[EOS], "pad_token_id": ids[PAD]}
    config = Qwen2VLConfig(
        text_config={**TEXT, "vocab_size": len(tokenizer), **special},
        vision_config=VISION,
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config.update(do_sample=False, **special)
    return model, image_processor, tokenizer


def save(output: Path, seed: int = 0) -> Path:
    """Write the folder as downloaded Qwen2-VL folders are laid out."""
    model, image_processor, tokenizer = build_parts(seed)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    image_processor.save_pretrained(output)
    tokenizer.save_pretrained(output)
    (output / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    for name in ("preprocessor_config.json", "tokenizer_config.json"):
        path = output / name
        content = json.loads(path.read_text())
        content["processor_class"] = "Qwen2VLProcessor"
        path.write_text(json.dumps(content, indent=2) + "\n")
    return output
