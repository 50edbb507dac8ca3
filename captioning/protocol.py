"""What a captioning backend is asked and what it answers: the contract both backends keep."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from captioning.config import CaptionConfig
from captioning.vlm import GenerationSettings


@dataclass
class Request:
    key: str  # the row's id
    image: Image.Image  # decoded, RGB
    prompt: str
    source_bytes: bytes = b""  # the stored image file, sent as-is where the format allows
    source_format: str | None = None  # PIL's name for it: JPEG, PNG, ...


@dataclass
class Answer:
    text: str | None = None
    error: str | None = None


Progress = Callable[[int], None]


class Backend(Protocol):
    def caption(self, requests: list[Request], progress: Progress) -> list[Answer]: ...

    def close(self) -> None: ...


def settings_from(config: CaptionConfig) -> GenerationSettings:
    return GenerationSettings(
        max_new_tokens=config.max_new_tokens,
        do_sample=config.do_sample,
        temperature=config.temperature,
        top_p=config.top_p,
        seed=config.seed,
    )
