import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from captioning.vlm import GenerationSettings, LocalVLM
from flows.cli import main as t2i


def _images(n):
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (40 + 7 * i, 60, 3), dtype=np.uint8)) for i in range(n)
    ]


def test_init_captioner_writes_a_folder_the_auto_classes_load_offline(tiny_captioner_dir):
    processor = AutoProcessor.from_pretrained(tiny_captioner_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_captioner_dir)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor"
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}],
        }
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=_images(1), text=[text], return_tensors="pt")
    image_tokens = (inputs["input_ids"] == model.config.image_token_index).sum().item()
    vision = model.config.vision_config
    assert (
        image_tokens == (vision.image_size // vision.patch_size) ** 2
    )  # one per patch, CLS dropped
    prompt_length = inputs["input_ids"].shape[1]
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert (
        torch.equal(output[0, :prompt_length], inputs["input_ids"][0])
        and output.shape[1] > prompt_length
    )


def test_the_cli_builds_the_same_tiny_vlm_every_time(tmp_path, tiny_captioner_dir):
    assert t2i(["init-captioner", str(tmp_path / "vlm"), "--preset", "tiny"]) == 0
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "vlm").state_dict()
    first = AutoModelForImageTextToText.from_pretrained(tiny_captioner_dir).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    tokenizer_files = [
        json.loads((p / "tokenizer.json").read_text())
        for p in (tmp_path / "vlm", Path(tiny_captioner_dir))
    ]
    assert tokenizer_files[0]["model"]["vocab"] == tokenizer_files[1]["model"]["vocab"]


def test_batched_greedy_generation_matches_one_image_at_a_time(tiny_captioner_dir):
    vlm = LocalVLM(tiny_captioner_dir)
    settings = GenerationSettings(max_new_tokens=12)
    images = _images(4)
    prompts = [
        "Describe this image.",
        "Describe it.",
        "A much longer prompt with many more words in it.",
        "Hi.",
    ]
    batched = vlm.generate(images, prompts, settings)  # prompts of different lengths: left padding
    single = [
        vlm.generate([image], [prompt], settings)[0] for image, prompt in zip(images, prompts)
    ]
    assert batched == single
    assert len(set(batched)) > 1  # different images and prompts, different answers


def test_sampling_is_reproducible_from_its_seed(tiny_captioner_dir):
    vlm = LocalVLM(tiny_captioner_dir)
    settings = GenerationSettings(max_new_tokens=16, do_sample=True, temperature=1.0, top_p=1.0)
    images, prompts = _images(2), ["Describe this image."] * 2
    first = vlm.generate(images, prompts, settings, seed=3)
    assert vlm.generate(images, prompts, settings, seed=3) == first
    assert vlm.generate(images, prompts, settings, seed=4) != first
