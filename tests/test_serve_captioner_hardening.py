"""`t2i serve-captioner` under hostile clients, on 127.0.0.1 only, with bounded counts.

Malformed requests are 400 (only a failed generation is a 500); an oversized prompt is refused
before it reaches the model and other clients keep being served; a stalled, half-sent or
trickling connection is closed; connections beyond the cap are answered 503 at once.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time

import pytest
from PIL import Image

from captioning.config import ServeCaptionerConfig
from captioning.server import CaptionServer

TIMEOUT_S = 0.5
CAP = 16


@pytest.fixture(scope="module")
def server(tiny_captioner_dir):
    config = ServeCaptionerConfig(
        host="127.0.0.1",
        port=0,
        max_tokens_limit=3,
        max_prompt_chars=1000,
        read_timeout_s=TIMEOUT_S,
        max_connections=CAP,
    )
    with CaptionServer(tiny_captioner_dir, config) as running:
        yield running


def _image_url() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _chat(text: str = "Describe.", **extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": _image_url()}}]
    content.append({"type": "text", "text": text})
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 3, **extra}


def _connect(server) -> socket.socket:
    host, port = server.httpd.server_address[:2]
    assert host == "127.0.0.1"
    return socket.create_connection((host, port), timeout=10)


def _post(server, body: bytes) -> tuple[int, dict]:
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with _connect(server) as connection:
        connection.sendall(head + body)
        return _answer(connection)


def _answer(connection: socket.socket) -> tuple[int, dict]:
    data = b""
    while chunk := connection.recv(65536):
        data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    if not head:
        return 0, {}
    return int(head.split()[1]), json.loads(payload or b"{}")


def _closed_by_server(connection: socket.socket) -> bytes:
    """What the server sent before closing (b'' when it closed silently)."""
    data = b""
    while chunk := connection.recv(65536):
        data += chunk
    return data


MALFORMED = {
    "a JSON list": b"[]",
    "not UTF-8": b'{"messages": "\xff\xfe"}',
    "nested 100,000 deep": b"[" * 100_000 + b"]" * 100_000,
    "text not a string": json.dumps(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}
    ).encode(),
    "url not a string": json.dumps(
        {"messages": [{"content": [{"type": "image_url", "image_url": {"url": 5}}]}]}
    ).encode(),
    "max_tokens infinite": json.dumps(_chat())[:-1].encode() + b', "max_tokens": 1e999}',
    "temperature out of range": json.dumps(_chat(temperature=50)).encode(),
    "top_p negative": json.dumps(_chat(top_p=-1)).encode(),
    "seed negative": json.dumps(_chat(seed=-1)).encode(),
    "system content a number": json.dumps(
        {"messages": [{"role": "system", "content": 5}, _chat()["messages"][0]]}
    ).encode(),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_request_is_a_400_and_the_next_one_is_served(server, case):
    status, answer = _post(server, MALFORMED[case])
    assert status == 400, (case, answer)
    assert answer["error"]["code"] == 400
    status, answer = _post(server, json.dumps(_chat()).encode())
    assert status == 200 and answer["choices"][0]["message"]["role"] == "assistant"


def test_a_huge_prompt_is_refused_before_the_model_and_others_are_served(server):
    results: dict[str, tuple[int, dict]] = {}

    def send(name: str, body: dict) -> None:
        results[name] = _post(server, json.dumps(body).encode())

    huge = threading.Thread(target=send, args=("huge", _chat("describe " * 44_445)))
    small = [threading.Thread(target=send, args=(f"small{i}", _chat())) for i in range(3)]
    for thread in (huge, *small):
        thread.start()
    for thread in (huge, *small):
        thread.join(120)
    status, answer = results["huge"]
    assert status == 400 and "max-prompt-chars" in answer["error"]["message"]
    assert "40000" in answer["error"]["message"] and "characters" in answer["error"]["message"]
    assert all(results[f"small{i}"][0] == 200 for i in range(3)), results


def test_stalled_half_sent_and_trickling_connections_are_closed(server):
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
    stalled = [_connect(server) for _ in range(2)]
    for connection in stalled:
        connection.sendall(head.encode())  # headers never finished
    half = [_connect(server) for _ in range(2)]
    for connection in half:
        connection.sendall(f'{head}Content-Length: 1000\r\n\r\n{{"messages"'.encode())
    # while those hang, a well-behaved client is served
    assert _post(server, json.dumps(_chat()).encode())[0] == 200
    for connection in stalled:
        with connection:
            assert b"200 OK" not in _closed_by_server(connection)
    for connection in half:
        with connection:
            assert b" 408 " in _closed_by_server(connection)
    # a client sending one byte every TIMEOUT_S / 2 never trips the per-receive timeout, but
    # the whole request must arrive within 3 x TIMEOUT_S: it is cut off long before 40 bytes
    trickle = _connect(server)
    sent = 0
    with trickle:
        try:
            for byte in (head + "X-Slow: " + "y" * 200).encode()[:40]:
                trickle.sendall(bytes([byte]))
                sent += 1
                time.sleep(TIMEOUT_S / 2)
        except OSError:
            pass  # the server closed it mid-send
        trickle.settimeout(10)
        assert b"200 OK" not in _closed_by_server(trickle)
    assert sent < 40 or trickle.fileno() == -1


def test_connections_beyond_the_cap_get_a_503_and_slots_come_back(tiny_captioner_dir):
    config = ServeCaptionerConfig(port=0, max_tokens_limit=3, read_timeout_s=20, max_connections=4)
    with CaptionServer(tiny_captioner_dir, config) as capped:
        idle = [_connect(capped) for _ in range(4)]  # silent: each holds a slot (20 s timeout)
        for _ in range(3):
            with _connect(capped) as extra:
                status, answer = _answer(extra)
            assert status == 503 and answer["error"]["code"] == 503
        for connection in idle:
            connection.close()
        for _ in range(50):  # the freed slots serve again (each attempt bounded)
            status, _ = _post(capped, json.dumps(_chat()).encode())
            if status == 200:
                break
            time.sleep(0.1)
        assert status == 200
