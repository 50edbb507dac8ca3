"""The openai backend against a real OpenAI-compatible server on loopback (no mocked client)."""

import json
import socket
import time

import httpx
import pytest

from captioning.config import CaptionConfig, ServeCaptionerConfig
from captioning.openai_client import EndpointError
from captioning.server import CaptionServer
from captioning.stage import run_caption
from curate.runtime.store import Manifest, load_samples
from flows.cli import main as t2i

SECRET = "sk-test-4f1d2c9a7b"
KEY_ENV = "T2I_TEST_CAPTION_KEY"
# Real images of every stored kind (RGB JPEG sent as-is; CMYK JPEG, palette and 16-bit PNG
# re-encoded as PNG) and one broken file.
KEYS = ["astronaut", "cmyk", "palette", "sixteen_bit", "retina_truncated"]
FAST = {"max_new_tokens": 16, "max_caption_tokens": 12, "chunk_size": 4}


@pytest.fixture(scope="module")
def store(make_caption_store, tmp_path_factory):
    return make_caption_store(tmp_path_factory.mktemp("openai-store") / "curated", KEYS)


@pytest.fixture(scope="module")
def pair(make_caption_store, tmp_path_factory):
    return make_caption_store(
        tmp_path_factory.mktemp("openai-pair") / "curated", ["astronaut", "coffee"]
    )


@pytest.fixture(scope="module")
def server(tiny_captioner_dir):
    """The tiny VLM served on a free loopback port; requests must carry SECRET."""
    with CaptionServer(tiny_captioner_dir, ServeCaptionerConfig(port=0), api_key=SECRET) as running:
        yield running


def _serve(tiny_captioner_dir, **options):
    return CaptionServer(tiny_captioner_dir, ServeCaptionerConfig(port=0, **options))


def _openai(endpoint, **options):
    return CaptionConfig(
        backend="openai",
        endpoint=endpoint,
        model="vlm",
        api_key_env=KEY_ENV,
        retry_backoff_s=0.01,
        **{**FAST, **options},
    )


def _captions(out):
    return {
        r["id"]: r["caption_synthetic"]
        for r in load_samples(out).select_columns(["id", "caption_synthetic"])
    }


def _failures(out):
    return json.loads((out / "failures.json").read_text())


def test_the_server_gives_the_same_captions_as_the_transformers_backend(
    store, server, tiny_captioner_dir, tmp_path, monkeypatch, capfd
):
    monkeypatch.setenv(KEY_ENV, SECRET)
    served = run_caption(store, tmp_path / "served", _openai(server.url, concurrency=3))
    local = run_caption(
        store, tmp_path / "local", CaptionConfig(model=tiny_captioner_dir, batch_size=1, **FAST)
    )
    assert _captions(served) == _captions(local)
    assert sum(c is not None for c in _captions(served).values()) == len(KEYS) - 1
    assert [f["reason"].split(":")[0] for f in _failures(served)] == ["undecodable image"]
    assert Manifest.read(served).extra["captioner"].startswith("vlm@")

    # The key reached the server (it answers 401 without it) but was never written or printed.
    files = [p for p in (tmp_path / "served").rglob("*") if p.is_file()]
    assert files and not any(SECRET.encode() in p.read_bytes() for p in files)
    printed = capfd.readouterr()
    assert SECRET not in printed.out + printed.err


def test_a_missing_api_key_fails_the_rows_with_the_servers_reason(
    store, server, tmp_path, monkeypatch
):
    monkeypatch.delenv(KEY_ENV, raising=False)
    before = server.chat_requests
    out = run_caption(store, tmp_path / "out", _openai(server.url))
    reasons = [f["reason"] for f in _failures(out)]
    assert len(reasons) == len(KEYS) and sum("HTTP 401" in r for r in reasons) == len(KEYS) - 1
    assert server.chat_requests == before + len(KEYS) - 1  # one request per row: 401 is not retried


def test_rate_limited_requests_are_retried_with_backoff(pair, tiny_captioner_dir, tmp_path):
    with _serve(tiny_captioner_dir, fail_first=3, fail_status=429) as flaky:
        out = run_caption(pair, tmp_path / "out", _openai(flaky.url, concurrency=1, max_retries=3))
        assert flaky.chat_requests == 2 + 3
    assert _failures(out) == [] and all(_captions(out).values())


def test_a_request_still_failing_after_its_retries_fails_only_its_row(
    pair, tiny_captioner_dir, tmp_path
):
    with _serve(
        tiny_captioner_dir, fail_first=2, fail_status=503
    ) as flaky:  # retried once, then given up
        out = run_caption(pair, tmp_path / "out", _openai(flaky.url, concurrency=1, max_retries=1))
    [failure] = _failures(out)
    assert "HTTP 503" in failure["reason"] and "after 2 attempts" in failure["reason"]
    assert sum(c is not None for c in _captions(out).values()) == 1
    assert failure["id"] in (out / "report.md").read_text()


def test_requests_in_flight_never_exceed_the_concurrency(store, tiny_captioner_dir, tmp_path):
    with _serve(tiny_captioner_dir) as counting:
        enter = counting.enter

        def linger(delta: int) -> None:
            # Each request stays in flight long enough for every other one the client allows
            # to arrive: a tiny model answers so fast that, on a loaded machine, the client's
            # second request could otherwise start only after the first had finished.
            enter(delta)
            if delta > 0:
                time.sleep(0.5)

        counting.enter = linger
        run_caption(store, tmp_path / "out", _openai(counting.url, concurrency=2, chunk_size=16))
        assert counting.max_in_flight == 2


def test_an_unreachable_server_is_a_clear_error(store, tmp_path, capsys):
    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    with pytest.raises(EndpointError, match="cannot reach the OpenAI-compatible server at " + url):
        run_caption(store, tmp_path / "out", _openai(url, timeout_s=2))
    argv = [
        "caption",
        str(store),
        str(tmp_path / "out"),
        "--backend",
        "openai",
        "--endpoint",
        url,
        "--model",
        "vlm",
    ]
    assert t2i(argv) == 1 and "serve-captioner" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_endpoint_without_the_api_path_is_a_clear_error(store, server, tmp_path):
    with pytest.raises(EndpointError, match="usually ends in /v1"):
        run_caption(store, tmp_path / "out", _openai(server.url.removesuffix("/v1")))


def test_the_server_answers_bad_requests_in_the_openai_error_format(server):
    headers = {"Authorization": f"Bearer {SECRET}"}
    models = httpx.get(f"{server.url}/models", headers=headers).json()
    assert [m["id"] for m in models["data"]] == ["vlm"]
    no_image = {"model": "vlm", "messages": [{"role": "user", "content": "Describe."}]}
    answer = httpx.post(f"{server.url}/chat/completions", json=no_image, headers=headers)
    assert (
        answer.status_code == 400 and "exactly one image_url" in answer.json()["error"]["message"]
    )
    wrong_model = {**no_image, "model": "gpt-9"}
    assert (
        httpx.post(f"{server.url}/chat/completions", json=wrong_model, headers=headers).status_code
        == 404
    )
    assert httpx.get(f"{server.url}/models").status_code == 401
