"""`t2i init-captioner OUT --preset tiny`: a random-weight LLaVA folder built offline.

A real transformers image-text-to-text architecture (LLaVA: a CLIP vision tower, a two-layer
projector and a Llama decoder), with a LlavaProcessor whose PIL image processor, WordPiece
tokenizer and chat template are built here, deterministically, with no hub files. The saved
folder loads with `AutoProcessor` + `AutoModelForImageTextToText`, exactly like a real VLM
folder, so tests and the demo exercise the real captioning path. Random weights generate
word salad; the stage's cleaning and truncation treat it like any other answer.

The other presets, tiny-florence2 and tiny-qwen2vl, are built in captioning/tiny_florence2.py
and captioning/tiny_qwen2vl.py with the same tokenizer (captioning/tiny_tokenizer.py).
"""

from __future__ import annotations

from pathlib import Path

from captioning import tiny_florence2, tiny_qwen2vl
from captioning.config import InitCaptionerConfig
from captioning.tiny_tokenizer import IMAGE_TOKEN, MAX_LENGTH, build_tokenizer
from curate.runtime.stage_runtime import write_folder

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}" + IMAGE_TOKEN + "{{ '\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

TINY = {
    "image_size": 32,
    "patch_size": 8,
    "vision": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
    },
    "text": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": MAX_LENGTH,
    },
}


def build_tiny_captioner(seed: int = 0):
    """(model, processor): a random-weight LLaVA and its processor, from configs alone."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    tokenizer = build_tokenizer()
    side = TINY["image_size"]
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=TINY["patch_size"],
        vision_feature_select_strategy="default",  # drop the CLS feature, as LLaVA-1.5 does
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            **TINY["vision"], image_size=side, patch_size=TINY["patch_size"]
        ),
        text_config=LlamaConfig(**TINY["text"], vocab_size=len(tokenizer), **special),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.update(do_sample=False, **special)
    return model, processor


PRESETS = ("tiny", "tiny-florence2", "tiny-qwen2vl")


def init_captioner(output: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight VLM folder: LLaVA ('tiny'), Florence-2 or Qwen2-VL."""
    if preset not in PRESETS:
        raise ValueError(f"unknown captioner preset {preset!r}; choose one of {', '.join(PRESETS)}")
    output = Path(output)
    if preset == "tiny-qwen2vl":
        return tiny_qwen2vl.save(output, seed)
    if preset == "tiny-florence2":
        model, processor = tiny_florence2.build(seed)
    else:
        model, processor = build_tiny_captioner(seed)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    processor.save_pretrained(output)
    return output


def run_init_captioner(output: str, config: InitCaptionerConfig = InitCaptionerConfig()) -> Path:
    return write_folder(
        output,
        "init-captioner",
        config,
        lambda path: init_captioner(path, config.preset, config.seed),
    )
