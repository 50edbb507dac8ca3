"""The `openai` backend: captions from an OpenAI-compatible chat-completions server.

At scale a VLM is served by vLLM or SGLang behind the OpenAI API and many clients feed it.
Each row is one `POST {endpoint}/chat/completions` with the image as a base64 data URL;
`concurrency` requests are in flight at once. A 429 or 5xx answer, a timeout or a dropped
connection is retried with exponential backoff (honouring `Retry-After`); other 4xx answers
fail that row only. A server that cannot be reached at all stops the run with a clear error
(finished chunks are kept for the rerun). The API key is read from an environment variable
and only ever sent as a header: it is never logged, printed or recorded.
"""

from __future__ import annotations

import base64
import io
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from captioning.backends import Answer, Progress, Request, settings_from
from captioning.config import CaptionConfig

PASSTHROUGH_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
RETRY_STATUS = {429, 500, 502, 503, 504}
MAX_BACKOFF_S = 60.0


class EndpointError(ValueError):
    """The server cannot be reached, or is not an OpenAI-compatible chat-completions server."""


def data_url(request: Request) -> str:
    """The stored file when the server can read its format unchanged, else a lossless PNG."""
    mime = PASSTHROUGH_FORMATS.get(request.source_format or "")
    payload = request.source_bytes
    if mime is None or not payload:
        buffer = io.BytesIO()
        request.image.save(buffer, format="PNG")
        mime, payload = "image/png", buffer.getvalue()
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def chat_body(model: str, request: Request, config: CaptionConfig) -> dict[str, Any]:
    settings = settings_from(config)
    body: dict[str, Any] = {
        "model": model,
        "messages": [
            *(
                [{"role": "system", "content": config.system_prompt}]
                if config.system_prompt
                else []
            ),
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(request)}},
                    {"type": "text", "text": request.prompt},
                ],
            },
        ],
        "max_tokens": settings.max_new_tokens,
        "temperature": settings.temperature if settings.do_sample else 0.0,
    }
    if settings.do_sample:
        body.update(top_p=settings.top_p, seed=settings.seed)
    return body


def answer_text(payload: Any) -> str:
    """choices[0].message.content, as a string (content may be a list of text parts)."""
    content = payload["choices"][0]["message"]["content"]
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if not isinstance(content, str):
        raise TypeError(f"message content is {type(content).__name__}, not text")
    return content


class OpenAIBackend:
    def __init__(self, config: CaptionConfig) -> None:
        if not config.endpoint:
            raise ValueError(
                "--backend openai needs --endpoint URL (e.g. http://127.0.0.1:8000/v1)"
            )
        self.config = config
        self.endpoint = config.endpoint.rstrip("/")
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(config.api_key_env, "")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        limits = httpx.Limits(
            max_connections=config.concurrency, max_keepalive_connections=config.concurrency
        )
        self.client = httpx.Client(headers=headers, timeout=config.timeout_s, limits=limits)
        self._stop = threading.Event()
        self.check_reachable()

    def check_reachable(self) -> None:
        """Fail fast, before any work, when nothing answers at the endpoint."""
        try:
            response = self.client.get(
                f"{self.endpoint}/models", timeout=min(self.config.timeout_s, 10.0)
            )
        except httpx.TransportError as error:
            self.client.close()
            raise EndpointError(self._unreachable(error)) from None
        if response.status_code == 404:
            self.client.close()
            raise EndpointError(
                f"{self.endpoint}/models answered 404: the endpoint is not an OpenAI-compatible API "
                "base URL; it usually ends in /v1 (e.g. http://127.0.0.1:8000/v1)"
            )

    def _unreachable(self, error: Exception) -> str:
        return (
            f"cannot reach the OpenAI-compatible server at {self.endpoint} "
            f"({type(error).__name__}: {error or 'no detail'}); start it (e.g. `t2i serve-captioner "
            "MODEL_DIR --port 8000`, or `vllm serve MODEL`) or fix --endpoint"
        )

    def caption(self, requests: list[Request], progress: Progress) -> list[Answer]:
        def one(request: Request) -> Answer:
            answer = self._post(request)
            progress(1)
            return answer

        with ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
            return list(pool.map(one, requests))

    def _post(self, request: Request) -> Answer:
        body = chat_body(self.config.model, request, self.config)
        attempts = self.config.max_retries + 1
        for attempt in range(attempts):
            if self._stop.is_set():
                raise EndpointError(
                    f"the server at {self.endpoint} stopped answering; rerun to resume"
                )
            retry_after = None
            try:
                response = self.client.post(f"{self.endpoint}/chat/completions", json=body)
            except httpx.TransportError as error:
                if attempt == attempts - 1:
                    self._stop.set()
                    raise EndpointError(self._unreachable(error)) from None
            else:
                if response.status_code == 200:
                    try:
                        return Answer(text=answer_text(response.json()))
                    except (ValueError, KeyError, IndexError, TypeError) as error:
                        return Answer(error=f"malformed response from {self.endpoint}: {error}")
                detail = f"HTTP {response.status_code}: {response.text[:300]}"
                if response.status_code not in RETRY_STATUS:
                    return Answer(error=detail)
                if attempt == attempts - 1:
                    return Answer(error=f"{detail} (after {attempts} attempts)")
                retry_after = _retry_after(response)
            delay = self.config.retry_backoff_s * 2**attempt
            time.sleep(min(MAX_BACKOFF_S, retry_after if retry_after is not None else delay))
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.client.close()


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None
