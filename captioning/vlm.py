"""A local image-text-to-text model: load any transformers VLM folder and caption image batches.

Loading is the one real VLMs use: `AutoProcessor` + `AutoModelForImageTextToText` (or a named
transformers class), with `trust_remote_code` opt-in for folders that ship their own code
(CogVLM2, Florence-2). The prompt goes through the processor's chat template when it has one.
Decoding is greedy unless sampling is asked for, so the same rows give the same captions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from curate.seeds import seed_int

DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
          "bf16": "bfloat16", "bfloat16": "bfloat16"}  # fmt: skip


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 120
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        settings = asdict(self)
        if not self.do_sample:  # greedy: the sampling knobs change nothing, keep them out of ids
            for key in ("temperature", "top_p", "seed"):
                settings.pop(key)
        return settings


def chat_messages(prompt: str) -> list[dict[str, Any]]:
    """One user turn holding the image and the prompt (the OpenAI and transformers layouts agree)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of fp32, fp16, bf16")
    return getattr(torch, DTYPES[name])


def batch_seed(seed: int, keys: list[str]) -> int:
    """A sampling seed fixed by the run's seed and the batch's rows, so a resumed run samples alike."""
    return seed_int(seed, ",".join(keys))


class LocalVLM:
    """A VLM folder loaded for generation on one device."""

    def __init__(
        self,
        folder: str | Path,
        device: str = "cpu",
        dtype: str = "fp32",
        trust_remote_code: bool = False,
        model_class: str | None = None,
    ) -> None:
        import transformers

        path = Path(folder)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} is not a transformers model folder (no config.json); pass a local VLM "
                "folder, e.g. one written by `t2i init-captioner`"
            )
        self.folder = path
        self.device = device
        self.dtype = torch_dtype(dtype)
        cls = transformers.AutoModelForImageTextToText
        if model_class is not None:
            cls = getattr(transformers, model_class, None)
            if cls is None:
                raise ValueError(f"transformers has no class {model_class!r} (--model-class)")
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(
                str(path), trust_remote_code=trust_remote_code
            )
            self.model = cls.from_pretrained(
                str(path), dtype=self.dtype, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError, KeyError) as error:
            hint = (
                ""
                if trust_remote_code
                else "; if the folder ships its own code, add --trust-remote-code"
            )
            raise ValueError(f"cannot load a VLM from {path}: {error}{hint}") from None
        self.model.to(device).eval()
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"  # batched decoder-only generation pads on the left

    def prompt_text(self, prompt: str) -> str:
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(
                chat_messages(prompt), add_generation_prompt=True
            )
        return prompt

    def generate(
        self,
        images: list[Image.Image],
        prompts: list[str],
        settings: GenerationSettings,
        seed: int = 0,
    ) -> list[str]:
        """Raw answers, one per (image, prompt)."""
        import torch

        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        texts = [self.prompt_text(p) for p in prompts]
        inputs = self.processor(images=images, text=texts, padding=True, return_tensors="pt").to(
            self.device
        )
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        kwargs: dict[str, Any] = {
            "max_new_tokens": settings.max_new_tokens,
            "do_sample": settings.do_sample,
        }
        if settings.do_sample:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
            torch.manual_seed(seed)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            output = self.model.generate(**inputs, **kwargs)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return self.processor.batch_decode(new_tokens, skip_special_tokens=True)
