"""`t2i serve-captioner MODEL_DIR`: a local VLM behind a minimal OpenAI-compatible API.

Serves `GET /v1/models` and `POST /v1/chat/completions` (one user turn with one image as a
base64 data URL and a text prompt) from a local VLM folder through the same `LocalVLM` the
transformers backend uses, so both backends give the same captions. It stands in for vLLM or
SGLang on machines without them, and in tests. Options mimic what a real server does under
load: `api_key` answers 401 to requests without the key; `fail_first` answers the first N chat
requests with `fail_status` (429/503) so client retries can be drilled against a real socket.

A malformed request is a 400 (only a failed generation is a 500); a prompt over
`max_prompt_chars` is refused before it is tokenized; a connection that stalls is closed after
`read_timeout_s` of silence or 3x that for one whole request; at most `max_connections` are
served at once (one more is answered 503 at once).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import socket
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from captioning.chat_request import GenerationError, RequestError, parse_chat, system_text
from captioning.config import ServeCaptionerConfig
from captioning.vlm import LocalVLM


class CaptionServer:
    """A threaded HTTP server around one LocalVLM; generation is serialised by a lock."""

    def __init__(
        self,
        folder: str | Path,
        config: ServeCaptionerConfig = ServeCaptionerConfig(),
        api_key: str | None = None,
    ) -> None:
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
        self.max_prompt_chars = config.max_prompt_chars
        self.read_timeout_s = config.read_timeout_s
        self.failures_left = config.fail_first
        self.fail_status = config.fail_status
        self.chat_requests = 0  # every chat request answered, failures included
        self.in_flight = self.max_in_flight = 0  # concurrent chat requests: now, and the most seen
        self._lock = threading.Lock()
        self._generate_lock = threading.Lock()
        self.httpd = _BoundedServer(
            (config.host, config.port), _handler_for(self), config.max_connections
        )
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
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object")
        if body.get("model") not in (None, self.name):
            raise RequestError(
                404,
                f"model {body.get('model')!r} is not served here; this server serves {self.name!r}",
            )
        image, prompt, settings = parse_chat(body, self.max_tokens_limit, self.max_prompt_chars)
        system = system_text(body)
        try:
            self.vlm.check_prompt(prompt, system)
        except ValueError as error:
            raise RequestError(400, str(error)) from None
        try:
            with self._generate_lock:
                text = self.vlm.generate(
                    [image], [prompt], settings, seed=settings.seed, system_prompt=system
                )[0]
        except Exception as error:  # the model's failure, reported as a 500
            raise GenerationError(f"generation failed: {type(error).__name__}: {error}") from None
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


_BUSY_BODY = json.dumps(
    {
        "error": {
            "message": "too many connections; retry",
            "type": "service_unavailable",
            "code": 503,
        }
    }
).encode()
BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Retry-After: 1\r\nContent-Length: %d\r\n\r\n" % len(_BUSY_BODY)
) + _BUSY_BODY


class _BoundedServer(ThreadingHTTPServer):
    """ThreadingHTTPServer serving at most LIMIT connections at once; one more is answered 503
    and closed without a thread, so idle or stalled clients cannot pile up threads."""

    def __init__(self, address, handler, limit: int) -> None:
        self._slots = threading.BoundedSemaphore(limit)
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.settimeout(1.0)
                request.sendall(BUSY)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def _handler_for(server: CaptionServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = server.read_timeout_s  # per receive: a silent client is dropped
        _parsed = False

        def handle_one_request(self) -> None:
            """One request, whose line, headers and body must all arrive within 3x the read
            timeout (a client trickling a byte at a time never hits the per-receive timeout)."""
            self._parsed = False
            timer = threading.Timer(3 * server.read_timeout_s, self._expire)
            timer.daemon = True
            timer.start()
            try:
                super().handle_one_request()
            finally:
                timer.cancel()

        def _expire(self) -> None:
            if not self._parsed:
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

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
            self._parsed = True
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
            try:
                body = self.rfile.read(length)
            except (TimeoutError, OSError):
                body = b""
            if len(body) < length:
                with contextlib.suppress(OSError):
                    self._refuse(408, f"the body stopped after {len(body)} of {length} bytes")
                return None
            self._parsed = True
            return body

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
                try:
                    body = json.loads(raw or b"{}")
                except (ValueError, RecursionError) as error:  # bad JSON, UTF-8 or nesting
                    raise RequestError(400, f"body is not JSON: {error}") from None
                self._send(200, server.complete(body))
            except RequestError as error:
                self._error(error.status, str(error))
            except GenerationError as error:
                self._error(500, str(error))
            except OSError:
                self.close_connection = True  # the client went away
            except Exception as error:  # a bug here is still an answer, not a hang
                self._error(500, f"internal error: {type(error).__name__}: {error}")
            finally:
                server.enter(-1)

    return Handler


def run_serve_captioner(model: str, config: ServeCaptionerConfig = ServeCaptionerConfig()) -> None:
    """Serve until interrupted; the API key, if any, comes from $T2I_SERVER_API_KEY."""
    server = CaptionServer(model, config, api_key=os.environ.get("T2I_SERVER_API_KEY") or None)
    print(f"serving {server.name} at {server.url} (Ctrl-C to stop)", flush=True)
    try:  # Ctrl-C or SIGTERM ends it (`t2i` reports "interrupted" or "terminated")
        server.httpd.serve_forever()
    finally:
        server.httpd.server_close()
