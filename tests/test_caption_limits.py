"""Bounds of the OpenAI backend and of `t2i serve-captioner`, against real sockets on 127.0.0.1.

The client side runs `t2i caption --backend openai` against loopback servers started here that
misbehave on purpose (a slow drip, a huge answer); the server side sends raw HTTP requests that
a careful server must refuse before reading their bodies.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from captioning.chat_request import parse_chat
from captioning.config import CaptionConfig, ServeCaptionerConfig
from captioning.server import CaptionServer
from captioning.stage import run_caption

HUGE = 60_000_000  # bytes a hostile server offers
DRIP = 50_000  # bytes the slow server sends, one every 20 ms (a thousand seconds in all)


class _Hostile:
    """A loopback OpenAI-compatible server whose chat answers misbehave in one MODE."""

    def __init__(self, mode: str) -> None:
        self.mode, self.sent, self.finished = mode, [], []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                body = json.dumps({"data": [{"id": "vlm"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                self.close_connection = True
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                total = DRIP if owner.mode == "drip" else HUGE
                if owner.mode != "chunked":
                    self.send_header("Content-Length", str(total))
                self.send_header("Connection", "close")
                self.end_headers()
                sent = 0
                try:
                    while sent < total:
                        if owner.mode == "drip":
                            self.wfile.write(b" ")
                            self.wfile.flush()
                            sent += 1
                            time.sleep(0.02)
                        else:
                            self.wfile.write(b" " * 65536)
                            sent += 65536
                    owner.finished.append(True)
                except OSError:  # the client hung up: what we want
                    pass
                owner.sent.append(sent)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> _Hostile:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def store(make_caption_store, tmp_path_factory):
    return make_caption_store(
        tmp_path_factory.mktemp("limits") / "curated", ["astronaut", "coffee"]
    )


def _failures(out):
    return [f["reason"] for f in json.loads((out / "failures.json").read_text())]


@pytest.mark.parametrize(
    ("mode", "reason"),
    [("drip", "request_deadline_s=1"), ("declared", "not read"), ("chunked", "max_response_bytes")],
)
def test_a_slow_or_huge_answer_fails_its_row_and_the_run_finishes(store, tmp_path, mode, reason):
    config = CaptionConfig(
        backend="openai",
        model="vlm",
        concurrency=1,
        max_retries=0,
        timeout_s=5.0,
        request_deadline_s=1.0,
        max_response_bytes=65_536,
        chunk_size=4,
    )
    with _Hostile(mode) as server:
        out = run_caption(
            store, tmp_path / "out", config.model_copy(update={"endpoint": server.url})
        )
        deadline = time.monotonic() + 30  # the handlers notice the hang-up on their next write
        while len(server.sent) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    failures = _failures(out)
    assert len(failures) == 2 and all(reason in f for f in failures), failures
    assert not server.finished and len(server.sent) == 2
    assert max(server.sent) < 16_000_000  # the client stopped reading long before the end


def test_credentials_in_the_endpoint_are_used_but_never_recorded(store, tmp_path):
    config = CaptionConfig(
        backend="openai", model="vlm", max_retries=0, request_deadline_s=1.0, chunk_size=4
    )
    with _Hostile("drip") as server:
        endpoint = server.url.replace("http://", "http://alice:s3cret@")
        out = run_caption(store, tmp_path / "out", config.model_copy(update={"endpoint": endpoint}))
    for name in ("manifest.json", "report.md", "failures.json", "config.toml"):
        assert "s3cret" not in (out / name).read_text(), name
    assert json.loads((out / "manifest.json").read_text())["parameters"]["endpoint"] == server.url


@pytest.fixture(scope="module")
def guarded(tiny_captioner_dir):
    config = ServeCaptionerConfig(port=0, max_body_bytes=100_000, max_tokens_limit=4)
    with CaptionServer(tiny_captioner_dir, config, api_key="right-key") as running:
        yield running


def _raw(server, head: str, body: bytes = b"") -> tuple[int, dict]:
    """Send HEAD (and BODY) on a fresh socket; the status and JSON of the answer."""
    host, port = server.httpd.server_address[:2]
    with socket.create_connection((host, port), timeout=10) as connection:
        connection.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = connection.recv(65536)
            if not chunk:
                break
            data += chunk
    head_part, _, payload = data.partition(b"\r\n\r\n")
    return int(head_part.split()[1]), json.loads(payload or b"{}")


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def _post(content_length: str, key: str = "right-key") -> str:
    return (
        "POST /v1/chat/completions HTTP/1.1\nHost: x\n"
        f"Authorization: Bearer {key}\nContent-Length: {content_length}\n"
    )


def test_the_server_checks_the_key_before_reading_a_body(guarded):
    # a gigabyte is announced and never sent: answering at all proves nothing was read
    status, answer = _raw(guarded, _post("1000000000", key="wrong-key"))
    assert status == 401 and "API key" in answer["error"]["message"]


@pytest.mark.parametrize(("length", "status"), [("abc", 400), ("-5", 400), ("1000000000", 413)])
def test_bad_or_oversized_content_lengths_are_refused_unread(guarded, length, status):
    got, answer = _raw(guarded, _post(length))
    assert got == status and answer["error"]["code"] == status


def test_max_tokens_is_capped_and_a_bad_number_is_a_400(guarded):
    from captioning.chat_request import RequestError

    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="},
                    }
                ],
            }
        ]
    }
    with pytest.raises(RequestError):  # that image is not decodable: 400 before generating
        parse_chat({**body, "max_tokens": 10**9}, 4)
    with pytest.raises(RequestError) as caught:
        parse_chat({**body, "max_tokens": "lots"}, 4)
    assert caught.value.status == 400


def test_max_tokens_above_the_limit_is_lowered(guarded):
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "Describe."},
                ],
            }
        ],
        "max_tokens": 10**9,
    }
    _, _, settings = parse_chat(body, guarded.max_tokens_limit)
    assert settings.max_new_tokens == 4
    payload = json.dumps(body).encode()
    status, answer = _raw(guarded, _post(str(len(payload))), payload)
    assert status == 200 and answer["choices"][0]["message"]["role"] == "assistant"


def test_keys_are_compared_whole(guarded):
    assert guarded.authorised("Bearer right-key")
    assert not guarded.authorised("Bearer right-ke")
    assert not guarded.authorised("Bearer right-keyy")
    assert not guarded.authorised(None)
