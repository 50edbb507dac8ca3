"""A chat-completions request as `t2i serve-captioner` reads it: one image as a data URL plus a text prompt, malformed requests refused with a 400 and the reason."""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any

from PIL import Image

from captioning.vlm import GenerationSettings
from curate.runtime.decode import Invalid, decode_image


class RequestError(ValueError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class GenerationError(RuntimeError):
    """The model failed on a well-formed request: the one case answered 500."""


MALFORMED = (
    TypeError,
    ValueError,
    AttributeError,
    KeyError,
    IndexError,
    OverflowError,
    RecursionError,
)


def parse_chat(
    body: dict[str, Any], max_tokens_limit: int = 512, max_prompt_chars: int | None = None
) -> tuple[Image.Image, str, GenerationSettings]:
    """The image, prompt and decoding settings of one chat-completions request.

    max_tokens above MAX_TOKENS_LIMIT is lowered to it; anything malformed (a wrong type, a
    number out of range, a prompt over MAX_PROMPT_CHARS) is a 400.
    """
    try:
        return _parse_chat(body, max_tokens_limit, max_prompt_chars)
    except RequestError:
        raise
    except MALFORMED as error:
        raise RequestError(400, f"malformed request: {type(error).__name__}: {error}") from None


def _number(body: dict[str, Any], name: str, low: float, high: float, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RequestError(400, f"{name} must be a number, got {type(value).__name__}")
    try:
        number = float(value)
    except ValueError:
        raise RequestError(400, f"a decoding setting is not a number: {name}={value!r}") from None
    if not (math.isfinite(number) and low <= number <= high):
        raise RequestError(400, f"{name} must be between {low:g} and {high:g}, got {value!r}")
    return number


def _parse_chat(
    body: dict[str, Any], max_tokens_limit: int, max_prompt_chars: int | None
) -> tuple[Image.Image, str, GenerationSettings]:
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list")
    content = messages[-1].get("content") if isinstance(messages[-1], dict) else None
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise RequestError(400, "the last message has no content")
    texts = [p.get("text", "") for p in parts if isinstance(p, dict) and p.get("type") == "text"]
    if not all(isinstance(text, str) for text in texts):
        raise RequestError(400, "a text part's 'text' must be a string")
    prompt, system = " ".join(texts).strip(), system_text(body) or ""
    if max_prompt_chars is not None and len(prompt) + len(system) > max_prompt_chars:
        raise RequestError(
            400,
            f"the prompt is {len(prompt) + len(system)} characters, over this server's limit of "
            f"{max_prompt_chars} (--max-prompt-chars)",
        )
    urls = [
        p.get("image_url") for p in parts if isinstance(p, dict) and p.get("type") == "image_url"
    ]
    if len(urls) != 1:
        raise RequestError(400, f"send exactly one image_url part, got {len(urls)}")
    url = urls[0].get("url", "") if isinstance(urls[0], dict) else urls[0]
    if not isinstance(url, str):
        raise RequestError(400, "image_url must be a data URL string")
    image = decode_data_url(url)
    raw_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 120
    if isinstance(raw_tokens, float) and raw_tokens.is_integer():
        raw_tokens = int(raw_tokens)
    if isinstance(raw_tokens, bool) or not isinstance(raw_tokens, (int, str)):
        raise RequestError(400, f"a decoding setting is not a number: max_tokens={raw_tokens!r}")
    try:
        max_tokens = int(raw_tokens)
    except ValueError:
        raise RequestError(
            400, f"a decoding setting is not a number: max_tokens={raw_tokens!r}"
        ) from None
    temperature = _number(body, "temperature", 0.0, 2.0, 1.0)  # OpenAI's default and range
    top_p = _number(body, "top_p", 0.0, 1.0, 1.0) or 1.0
    seed = int(_number(body, "seed", 0, 2**63 - 1, 0))
    if max_tokens < 1:
        raise RequestError(400, f"max_tokens must be at least 1, got {max_tokens}")
    settings = GenerationSettings(
        max_new_tokens=min(max_tokens, max_tokens_limit),
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 0.7,
        top_p=top_p,
        seed=seed,
    )
    return image, prompt, settings


def system_text(body: dict[str, Any]) -> str | None:
    """The text of the request's system messages, if any (string or text-part content)."""
    texts = []
    messages = body.get("messages") if isinstance(body, dict) else None
    for message in messages if isinstance(messages, list) else []:
        if isinstance(message, dict) and message.get("role") == "system":
            content = message.get("content")
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(parts, list):
                raise RequestError(400, "a system message's content must be text or a list")
            texts += [p.get("text", "") for p in parts if isinstance(p, dict)]
    if not all(isinstance(text, str) for text in texts):
        raise RequestError(400, "a system message's 'text' must be a string")
    return " ".join(t for t in texts if t).strip() or None


def decode_data_url(url: str) -> Image.Image:
    if not url.startswith("data:") or ";base64," not in url:
        raise RequestError(400, "images must be base64 data URLs (data:image/...;base64,...)")
    try:
        data = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    except (binascii.Error, ValueError) as error:
        raise RequestError(400, f"cannot decode the image: {error}") from None
    try:
        return decode_image(data)  # under the pixel cap: a small bomb costs nothing
    except Invalid as invalid:
        raise RequestError(400, f"cannot decode the image: {invalid}") from None
