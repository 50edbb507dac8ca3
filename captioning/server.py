"""`t2i serve-captioner MODEL_DIR`: a local VLM behind a minimal OpenAI-compatible API.

Serves `GET /v1/models` and `POST /v1/chat/completions` (one user turn with one image as a
base64 data URL and a text prompt) from a local VLM folder through the same `LocalVLM` the
transformers backend uses, so both backends give the same captions. It stands in for vLLM or
SGLang on machines without them, and in tests. Options mimic what a real server does under
load: `api_key` answers 401 to requests without the key; `fail_first` answers the first N chat
requests with `fail_status` (429/503) so client retries can be drilled against a real socket.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import os
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from PIL import Image

from captioning.config import ServeCaptionerConfig
from captioning.vlm import GenerationSettings, LocalVLM
from curate.runtime.decode import Invalid, decode_image


class RequestError(ValueError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_chat(
    body: dict[str, Any], max_tokens_limit: int = 512
) -> tuple[Image.Image, str, GenerationSettings]:
    """The image, prompt and decoding settings of one chat-completions request.

    max_tokens above MAX_TOKENS_LIMIT is lowered to it; a malformed number is a 400.
    """
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
    urls = [
        p.get("image_url") for p in parts if isinstance(p, dict) and p.get("type") == "image_url"
    ]
    if len(urls) != 1:
        raise RequestError(400, f"send exactly one image_url part, got {len(urls)}")
    url = urls[0].get("url", "") if isinstance(urls[0], dict) else str(urls[0])
    image = decode_data_url(url)
    try:
        max_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or 120)
        temperature = (
            1.0 if body.get("temperature") is None else float(body["temperature"])
        )  # OpenAI's default
        top_p, seed = float(body.get("top_p") or 1.0), int(body.get("seed") or 0)
    except (TypeError, ValueError) as error:
        raise RequestError(400, f"a decoding setting is not a number: {error}") from None
    if max_tokens < 1:
        raise RequestError(400, f"max_tokens must be at least 1, got {max_tokens}")
    settings = GenerationSettings(
        max_new_tokens=min(max_tokens, max_tokens_limit),
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 0.7,
        top_p=top_p,
        seed=seed,
    )
    return image, " ".join(texts).strip(), settings


def system_text(body: dict[str, Any]) -> str | None:
    """The text of the request's system messages, if any (string or text-part content)."""
    texts = []
    for message in body.get("messages") or []:
        if isinstance(message, dict) and message.get("role") == "system":
            content = message.get("content")
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            texts += [p.get("text", "") for p in parts or [] if isinstance(p, dict)]
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


class CaptionServer:
    """A threaded HTTP server around one LocalVLM; generation is serialised by a lock."""

    def __init__(self, folder: str | Path, config: ServeCaptionerConfig = ServeCaptionerConfig(), api_key: str | None = None) -> None:  # fmt: skip
        self.vlm = LocalVLM(
            folder,
            config.device,
            config.dtype,
            config.trust_remote_code,
            config.model_class,
            config.processor_kwargs,
        )
        self.name = config.served_name or Path(folder).resolve().name
        self.api_key = api_key
        self.max_body_bytes = config.max_body_bytes
        self.max_tokens_limit = config.max_tokens_limit
        self.failures_left = config.fail_first
        self.fail_status = config.fail_status
        self.chat_requests = 0  # every chat request answered, failures included
        self.in_flight = self.max_in_flight = 0  # concurrent chat requests: now, and the most seen
        self._lock = threading.Lock()
        self._generate_lock = threading.Lock()
        self.httpd = ThreadingHTTPServer((config.host, config.port), _handler_for(self))
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> CaptionServer:
        """Serve in a background thread (tests, notebooks); `stop()` ends it."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> CaptionServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def authorised(self, header: str | None) -> bool:
        """Constant-time comparison, so timing does not reveal how much of a guess was right."""
        if self.api_key is None:
            return True
        expected = f"Bearer {self.api_key}".encode()
        return hmac.compare_digest((header or "").encode("utf-8", "replace"), expected)

    def enter(self, delta: int) -> None:
        with self._lock:
            self.chat_requests += max(delta, 0)
            self.in_flight += delta
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def next_failure(self) -> bool:
        with self._lock:
            if self.failures_left > 0:
                self.failures_left -= 1
                return True
            return False

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("model") not in (None, self.name):
            raise RequestError(
                404,
                f"model {body.get('model')!r} is not served here; this server serves {self.name!r}",
            )
        image, prompt, settings = parse_chat(body, self.max_tokens_limit)
        system = system_text(body)
        try:
            self.vlm.check_prompt(prompt, system)
        except ValueError as error:
            raise RequestError(400, str(error)) from None
        with self._generate_lock:
            text = self.vlm.generate(
                [image], [prompt], settings, seed=settings.seed, system_prompt=system
            )[0]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
        }


def _handler_for(server: CaptionServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet; never logs headers
            pass

        def _send(
            self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None
        ) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
            try:
                kind = HTTPStatus(status).phrase.lower().replace(" ", "_")
            except ValueError:
                kind = "error"
            self._send(
                status, {"error": {"message": message, "type": kind, "code": status}}, headers
            )

        def do_GET(self) -> None:
            if self.path.rstrip("/") != "/v1/models":
                return self._error(404, f"no route {self.path}")
            if not server.authorised(self.headers.get("Authorization")):
                return self._error(401, "missing or wrong API key")
            self._send(
                200,
                {
                    "object": "list",
                    "data": [{"id": server.name, "object": "model", "owned_by": "t2i"}],
                },
            )

        def _refuse(self, status: int, message: str) -> None:
            """Answer without reading the body, and close: unread bytes must not become a request."""
            self.close_connection = True
            self._error(status, message, {"Connection": "close"})

        def _body(self) -> bytes | None:
            """The body, read only after its declared length is checked; None once refused."""
            if self.headers.get("Transfer-Encoding"):
                self._refuse(411, "send the body with a Content-Length, not Transfer-Encoding")
                return None
            declared = (self.headers.get("Content-Length") or "0").strip()
            if not declared.isdigit():
                self._refuse(400, f"bad Content-Length {declared[:40]!r}")
                return None
            length = int(declared)
            if length > server.max_body_bytes:
                self._refuse(
                    413, f"body of {length} bytes is over the limit of {server.max_body_bytes}"
                )
                return None
            return self.rfile.read(length)

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._refuse(404, f"no route {self.path}")
            server.enter(+1)
            try:
                if not server.authorised(self.headers.get("Authorization")):
                    return self._refuse(401, "missing or wrong API key")  # body never read
                raw = self._body()
                if raw is None:
                    return
                if server.next_failure():
                    retry = {"Retry-After": "0"} if server.fail_status == 429 else None
                    return self._error(server.fail_status, "simulated overload (fail_first)", retry)
                self._send(200, server.complete(json.loads(raw or b"{}")))
            except json.JSONDecodeError as error:
                self._error(400, f"body is not JSON: {error}")
            except RequestError as error:
                self._error(error.status, str(error))
            except Exception as error:  # noqa: BLE001 - a failed generation is the client's 500
                self._error(500, f"generation failed: {type(error).__name__}: {error}")
            finally:
                server.enter(-1)

    return Handler


def run_serve_captioner(model: str, config: ServeCaptionerConfig = ServeCaptionerConfig()) -> None:
    """Serve until interrupted; the API key, if any, comes from $T2I_SERVER_API_KEY."""
    server = CaptionServer(model, config, api_key=os.environ.get("T2I_SERVER_API_KEY") or None)
    print(f"serving {server.name} at {server.url} (Ctrl-C to stop)", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
