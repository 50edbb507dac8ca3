"""Captioner families beyond LLaVA: tiny offline twins of Florence-2 (encoder-decoder, task tokens)
and Qwen2-VL (dynamic resolution, processor options, system prompt), through the transformers
backend and through `t2i serve-captioner`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from captioning.config import CaptionConfig
from captioning.processors import load_processor
from captioning.stage import run_caption
from captioning.tiny import init_captioner
from captioning.vlm import GenerationSettings, LocalVLM
from curate.runtime.store import Manifest, load_samples
from flows.cli import main as t2i

KEYS = ["astronaut", "coffee", "chelsea"]
FAST = {"max_new_tokens": 16, "max_caption_tokens": 12, "chunk_size": 4, "batch_size": 2}
ROOT = Path(__file__).resolve().parents[1]


def _images(n):
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (40 + 9 * i, 60 - 5 * i, 3), dtype=np.uint8))
        for i in range(n)
    ]


def _captions(out):
    table = load_samples(out).select_columns(["id", "caption_synthetic"])
    return {row["id"]: row["caption_synthetic"] for row in table}


@pytest.fixture(scope="module")
def florence(tmp_path_factory):
    return init_captioner(tmp_path_factory.mktemp("florence") / "vlm", "tiny-florence2")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return init_captioner(tmp_path_factory.mktemp("qwen") / "vlm", "tiny-qwen2vl")


@pytest.fixture(scope="module")
def store(make_caption_store, tmp_path_factory):
    return make_caption_store(tmp_path_factory.mktemp("families-store") / "curated", KEYS)


# --- Florence-2: encoder-decoder answers are kept whole; task tokens are prompts -------------


def test_florence2_answers_are_the_whole_decoder_output(florence):
    vlm = LocalVLM(florence)
    assert type(vlm.model).__name__ == "Florence2ForConditionalGeneration" and vlm.encoder_decoder
    images = _images(2)
    answers = vlm.generate(images, ["<MORE_DETAILED_CAPTION>"] * 2, GenerationSettings(12))
    # The same call by hand: generate() returns answer tokens only, never the prompt.
    inputs = vlm.processor(
        images=images, text=["<MORE_DETAILED_CAPTION>"] * 2, padding=True, return_tensors="pt"
    )
    output = vlm.model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert answers == vlm.processor.batch_decode(output, skip_special_tokens=True)
    assert all(len(a.split()) >= 3 for a in answers)
    # The prompt (image tokens + question) is longer than the answer: cutting its length off the
    # front, as for decoder-only models, would leave nothing.
    assert inputs["input_ids"].shape[1] > output.shape[1]


def test_florence2_batches_answer_as_one_image_at_a_time(florence):
    vlm = LocalVLM(florence)
    images, settings = _images(3), GenerationSettings(10)
    prompts = [
        "<CAPTION>",
        "Describe this image in great detail, please.",
        "<MORE_DETAILED_CAPTION>",
    ]
    batched = vlm.generate(images, prompts, settings)  # prompts of different lengths: padding
    single = [vlm.generate([i], [p], settings)[0] for i, p in zip(images, prompts)]
    assert batched == single
    assert len(set(vlm.generate(images, ["<CAPTION>"] * 3, settings))) == 3  # the image matters


def test_florence2_task_tokens_expand_to_their_questions(florence):
    processor = load_processor(florence)
    ids = {
        task: processor(images=_images(1), text=[task], return_tensors="pt")["input_ids"][0]
        for task in ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
    }
    assert len({tuple(t.tolist()) for t in ids.values()}) == 3
    question = processor.tokenizer("Describe with a paragraph what is shown in the image.")
    expanded = ids["<MORE_DETAILED_CAPTION>"].tolist()
    body = [i for i in question["input_ids"] if i not in processor.tokenizer.all_special_ids]
    assert any(expanded[k : k + len(body)] == body for k in range(len(expanded)))


def test_prompts_a_model_cannot_take_are_refused_before_any_row(
    florence, tiny_captioner_dir, caption_store, tmp_path, capsys
):
    with pytest.raises(ValueError, match="no chat template"):
        LocalVLM(florence).check_prompt("<CAPTION>", "Be brief.")
    with pytest.raises(ValueError, match="Florence-2 task token"):
        LocalVLM(tiny_captioner_dir).check_prompt("<CAPTION>")
    argv = ["caption", str(caption_store), str(tmp_path / "out"), "--model", tiny_captioner_dir]
    argv += ["--prompt", "<MORE_DETAILED_CAPTION>"]
    assert t2i(argv) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("t2i caption: error:")]
    assert len(errors) == 1 and "task token" in errors[0] and "Traceback" not in err


# --- Qwen2-VL: processor options and the system prompt -----------------------------------------


def _image_tokens(vlm, image, system=None):
    text = vlm.prompt_text("Describe this image.", system)
    inputs = vlm.processor(images=[image], text=[text], return_tensors="pt")
    return inputs, int((inputs["input_ids"] == vlm.model.config.image_token_id).sum())


def test_qwen2vl_processor_kwargs_set_the_image_resolution(qwen):
    image = Image.new("RGB", (96, 96), "red")
    default, small = LocalVLM(qwen), LocalVLM(qwen, processor_kwargs={"max_pixels": 16 * 16})
    assert type(default.model).__name__ == "Qwen2VLForConditionalGeneration"
    assert not default.encoder_decoder
    # 96^2 px is cut to 48^2 by the folder's max_pixels: (48/4)^2 patches / 2^2 merged = 36
    # tokens; to 16^2 by the option: (16/4)^2 / 4 = 4 tokens.
    assert _image_tokens(default, image)[1] == 36 and _image_tokens(small, image)[1] == 4


def test_qwen2vl_system_prompt_goes_first_through_the_chat_template(qwen):
    vlm = LocalVLM(qwen)
    text = vlm.prompt_text("Describe this image.", "You write alt text.")
    assert text.index("system\nYou write alt text.") < text.index("user\n")
    images, settings = _images(3), GenerationSettings(10)
    prompts = ["Describe this image.", "Describe it.", "A longer prompt with many more words."]
    batched = vlm.generate(images, prompts, settings, system_prompt="Be brief.")
    single = [
        vlm.generate([i], [p], settings, system_prompt="Be brief.")[0]
        for i, p in zip(images, prompts)
    ]
    assert batched == single and all(a.strip() for a in batched)


def test_processor_kwargs_on_the_command_line_are_json(qwen, caption_store, tmp_path, capsys):
    config = CaptionConfig(model=str(qwen), processor_kwargs='{"max_pixels": 256}')
    assert config.processor_kwargs == {"max_pixels": 256}
    argv = ["caption", str(caption_store), str(tmp_path / "out"), "--model", str(qwen)]
    argv += ["--processor-kwargs", "max_pixels=256"]
    with pytest.raises(SystemExit) as exit_info:
        t2i(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--processor-kwargs" in err and "JSON" in err


# --- both families through the stage: transformers backend and t2i serve-captioner -----------


def _serve(folder, *options):
    """`t2i serve-captioner FOLDER --port 0` in a subprocess; (process, base URL)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("T2I_SERVER_API_KEY", None)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "serve-captioner",
            str(folder),
            "--port",
            "0",
            *options,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=ROOT,
    )
    line = process.stdout.readline()
    if " at http" not in line:
        process.kill()
        raise AssertionError(f"server did not start: {line!r}")
    return process, line.split(" at ", 1)[1].split()[0]


@pytest.mark.parametrize(
    "family, options",
    [
        ("florence", {"prompt": "<MORE_DETAILED_CAPTION>"}),
        ("qwen", {"system_prompt": "You write captions.", "processor_kwargs": {"max_pixels": 576}}),
    ],
)
def test_each_family_captions_through_the_stage_and_the_server(
    family, options, request, store, tmp_path
):
    folder = request.getfixturevalue(family)
    local = run_caption(
        store, tmp_path / "local", CaptionConfig(model=str(folder), **FAST, **options)
    )
    captions = _captions(local)
    assert len(captions) == len(KEYS) and all(c and c.strip() for c in captions.values())
    assert Manifest.read(local).counts.get("failed", 0) == 0

    server_options = options.get("processor_kwargs")
    process, url = _serve(
        folder, *(["--processor-kwargs", json.dumps(server_options)] * bool(server_options))
    )
    client = {k: v for k, v in options.items() if k != "processor_kwargs"}
    try:
        config = CaptionConfig(
            backend="openai", endpoint=url, model=Path(folder).name, **FAST, **client
        )
        served = run_caption(store, tmp_path / "served", config)
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert _captions(served) == captions  # the same model, prompt and decoding: the same captions


def test_the_twins_are_built_the_same_every_time(tmp_path, florence, qwen):
    for preset, first in (("tiny-florence2", florence), ("tiny-qwen2vl", qwen)):
        assert t2i(["init-captioner", str(tmp_path / preset), "--preset", preset]) == 0
        again = AutoModelForImageTextToText.from_pretrained(tmp_path / preset).state_dict()
        reference = AutoModelForImageTextToText.from_pretrained(first).state_dict()
        assert again.keys() == reference.keys()
        assert all(torch.equal(reference[k], again[k]) for k in reference)
