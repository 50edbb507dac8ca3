"""The `openai` backend: captions from an OpenAI-compatible chat-completions server.

At scale a VLM is served by vLLM or SGLang behind the OpenAI API and many clients feed it.
Each row is one `POST {endpoint}/chat/completions` with the image as a base64 data URL;
`concurrency` requests are in flight at once. A 429 or 5xx answer, a timeout or a dropped
connection is retried with exponential backoff (honouring `Retry-After`); other 4xx answers
fail that row only. A server that cannot be reached at all stops the run with a clear error
(finished chunks are kept for the rerun). The API key is read from an environment variable
and only ever sent as a header: it is never logged, printed or recorded, and neither is a
`user:password@` part of the endpoint URL.

A request is bounded in time and size, not only per read: the answer is streamed, and a row
fails (unretried) once `request_deadline_s` has passed or `max_response_bytes` have arrived, so
a server that drips one byte at a time, or answers with gigabytes, costs one row.
"""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from captioning.config import CaptionConfig
from captioning.protocol import Answer, Progress, Request, settings_from
from curate.runtime.redact import strip_url

PASSTHROUGH_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
RETRY_STATUS = {429, 500, 502, 503, 504}
MAX_BACKOFF_S = 60.0


class EndpointError(ValueError):
    """The server cannot be reached, or is not an OpenAI-compatible chat-completions server."""


class _Unbounded(Exception):
    """An answer that ran past the request deadline or the response size limit."""


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
        self.shown = strip_url(self.endpoint)  # what messages (and so reports) may name
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
                f"{self.shown}/models answered 404: the endpoint is not an OpenAI-compatible API "
                "base URL; it usually ends in /v1 (e.g. http://127.0.0.1:8000/v1)"
            )

    def _unreachable(self, error: Exception) -> str:
        return (
            f"cannot reach the OpenAI-compatible server at {self.shown} "
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
                    f"the server at {self.shown} stopped answering; rerun to resume"
                )
            retry_after = None
            try:
                response, content = self._bounded_post(body)
            except _Unbounded as error:
                return Answer(error=str(error))
            except httpx.TransportError as error:
                if attempt == attempts - 1:
                    self._stop.set()
                    raise EndpointError(self._unreachable(error)) from None
            else:
                if response.status_code == 200:
                    try:
                        return Answer(text=answer_text(json.loads(content)))
                    except (ValueError, KeyError, IndexError, TypeError) as error:
                        return Answer(error=f"malformed response from {self.shown}: {error}")
                text = content[:300].decode("utf-8", "replace")
                detail = f"HTTP {response.status_code}: {text}"
                if response.status_code not in RETRY_STATUS:
                    return Answer(error=detail)
                if attempt == attempts - 1:
                    return Answer(error=f"{detail} (after {attempts} attempts)")
                retry_after = _retry_after(response)
            delay = self.config.retry_backoff_s * 2**attempt
            time.sleep(min(MAX_BACKOFF_S, retry_after if retry_after is not None else delay))
        raise AssertionError("unreachable")

    def _bounded_post(self, body: dict[str, Any]) -> tuple[httpx.Response, bytes]:
        """POST BODY and read the answer, within the request deadline and the size limit.

        Each read waits at most the time left, and the deadline is checked after every chunk, so
        a request takes at most `request_deadline_s` plus one network read.
        """
        limit, seconds = self.config.max_response_bytes, self.config.request_deadline_s
        deadline = time.monotonic() + seconds
        timeout = httpx.Timeout(min(self.config.timeout_s, seconds))
        url = f"{self.endpoint}/chat/completions"
        with self.client.stream("POST", url, json=body, timeout=timeout) as response:
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise _Unbounded(
                    f"answer of {declared} bytes is over max_response_bytes={limit}; not read"
                )
            parts, size = [], 0
            for part in response.iter_bytes():
                size += len(part)
                if size > limit:
                    raise _Unbounded(f"answer passed max_response_bytes={limit}; stopped reading")
                if time.monotonic() > deadline:
                    raise _Unbounded(
                        f"no complete answer within request_deadline_s={seconds:g} "
                        f"({size} bytes received); stopped reading"
                    )
                parts.append(part)
        return response, b"".join(parts)

    def close(self) -> None:
        self.client.close()


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None
