"""A local image-text-to-text model: load any transformers VLM folder and caption image batches.

Loading is the one real VLMs use: `AutoProcessor` (captioning/processors.py, with the folder's
processor options) + `AutoModelForImageTextToText` (or a named transformers class), with
`trust_remote_code` opt-in for folders that ship their own code. The prompt goes through the
processor's chat template when it has one, after the system prompt if one is given; processors
without one (Florence-2) get the prompt as is, task tokens included. Decoder-only models return
prompt + answer from `generate`, so the prompt is cut off; encoder-decoder models (Florence-2)
return only the answer, which is kept whole. Decoding is greedy unless sampling is asked for, so
the same rows give the same captions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from captioning.config import TASK_TOKENS
from curate.runtime.options import resolve_device
from curate.runtime.seeds import seed_int

DTYPES = {
    "fp32": "float32",
    "float32": "float32",
    "fp16": "float16",
    "float16": "float16",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
}


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


def chat_messages(prompt: str, system_prompt: str | None = None) -> list[dict[str, Any]]:
    """An optional system turn, then one user turn holding the image and the prompt (the OpenAI and
    transformers layouts agree)."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [
        *system,
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
    ]


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
        processor_kwargs: dict[str, Any] | None = None,
    ) -> None:
        import transformers

        from captioning.processors import load_processor

        path = Path(folder)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} is not a transformers model folder (no config.json); pass a local VLM "
                "folder, e.g. one written by `t2i init-captioner`"
            )
        self.folder = path
        self.device = resolve_device(device)
        self.dtype = torch_dtype(dtype)
        cls = transformers.AutoModelForImageTextToText
        if model_class is not None:
            cls = getattr(transformers, model_class, None)
            if cls is None:
                raise ValueError(f"transformers has no class {model_class!r} (--model-class)")
        try:
            self.processor = load_processor(path, trust_remote_code, **(processor_kwargs or {}))
            self.model = cls.from_pretrained(
                str(path), dtype=self.dtype, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError, KeyError, TypeError, ImportError) as error:
            hint = (
                ""
                if trust_remote_code
                else "; if the folder ships its own code, add --trust-remote-code"
            )
            message = " ".join(str(error).split())  # one line
            raise ValueError(f"cannot load a VLM from {path}: {message}{hint}") from None
        self.model.to(self.device).eval()
        # generate() returns only the answer for encoder-decoder models, prompt + answer otherwise
        self.encoder_decoder = bool(getattr(self.model.config, "is_encoder_decoder", False))
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None:
            # Batched decoder-only generation pads on the left, so every answer continues its
            # prompt; an encoder reads its prompt whole, with absolute positions (BART's), so an
            # encoder-decoder pads on the right, where padding moves no token.
            tokenizer.padding_side = "right" if self.encoder_decoder else "left"

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.processor, "chat_template", None))

    @property
    def task_tokens(self) -> set[str]:
        """Task tokens the processor expands into prompts (Florence-2's), empty for other models."""
        return set(getattr(self.processor, "task_prompts_without_inputs", {}) or {})

    def check_prompt(self, prompt: str, system_prompt: str | None = None) -> None:
        """Fail before any row when the prompt or system prompt cannot work with this model."""
        if system_prompt and not self.has_chat_template:
            raise ValueError(
                f"{self.folder} has no chat template, so it cannot take a system prompt "
                "(--system-prompt); drop it or put the instruction in the prompt"
            )
        if prompt in TASK_TOKENS and prompt not in self.task_tokens:
            known = ", ".join(sorted(self.task_tokens)) or "none"
            raise ValueError(
                f"prompt {prompt} is a Florence-2 task token, but {self.folder}'s processor "
                f"knows no such token (its task tokens: {known}); use --prompt detailed or hint"
            )

    def prompt_text(self, prompt: str, system_prompt: str | None = None) -> str:
        if self.has_chat_template:
            return self.processor.apply_chat_template(
                chat_messages(prompt, system_prompt), add_generation_prompt=True
            )
        if system_prompt:
            self.check_prompt(prompt, system_prompt)
        return prompt

    def generate(
        self,
        images: list[Image.Image],
        prompts: list[str],
        settings: GenerationSettings,
        seed: int = 0,
        system_prompt: str | None = None,
    ) -> list[str]:
        """Raw answers, one per (image, prompt)."""
        import torch

        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        texts = [self.prompt_text(p, system_prompt) for p in prompts]
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
        new_tokens = output if self.encoder_decoder else output[:, inputs["input_ids"].shape[1] :]
        return self.processor.batch_decode(new_tokens, skip_special_tokens=True)
