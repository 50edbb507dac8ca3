"""`t2i init-captioner OUT --preset tiny`: a random-weight LLaVA folder built offline.

A real transformers image-text-to-text architecture (LLaVA: a CLIP vision tower, a two-layer
projector and a Llama decoder), with a LlavaProcessor whose PIL image processor, WordPiece
tokenizer and chat template are built here, deterministically, with no hub files. The saved
folder loads with `AutoProcessor` + `AutoModelForImageTextToText`, exactly like a real VLM
folder, so tests and the demo exercise the real captioning path. Random weights generate
word salad; the stage's cleaning and truncation treat it like any other answer.

The other presets, tiny-florence2 and tiny-qwen2vl, are built in captioning/tiny_florence2.py
and captioning/tiny_qwen2vl.py with this module's tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from captioning.config import InitCaptionerConfig

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
    "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
    "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 1024},
}  # fmt: skip


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
        model_max_length=TINY["text"]["max_position_embeddings"],
    )


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
        from captioning import tiny_qwen2vl

        return tiny_qwen2vl.save(output, seed)
    if preset == "tiny-florence2":
        from captioning import tiny_florence2

        model, processor = tiny_florence2.build(seed)
    else:
        model, processor = build_tiny_captioner(seed)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    processor.save_pretrained(output)
    return output


def run_init_captioner(output: str, config: InitCaptionerConfig = InitCaptionerConfig()) -> Path:
    from curate.stage_runtime import write_folder

    return write_folder(
        output,
        "init-captioner",
        config,
        lambda path: init_captioner(path, config.preset, config.seed),
    )
