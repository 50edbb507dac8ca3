import json
import subprocess
import sys

import torch
from diffusers import StableDiffusion3Pipeline
from PIL import Image

from model.build import build_transformer
from model.presets import mmdit_config
from model.tokenizers import build_clip_tokenizer, build_t5_tokenizer


def test_init_model_folder_loads_offline_and_generates(tiny_model_dir):
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt="a red cat", num_inference_steps=2, height=64, width=64).images[0]
    assert isinstance(image, Image.Image) and image.size == (64, 64)
    assert pipe.transformer.config.qk_norm == "rms_norm"
    assert pipe.vae.config.latent_channels == 16
    assert pipe.scheduler.config.shift == 3.0
    # conditioning widths are wired from the encoders' configs
    t = pipe.transformer.config
    assert t.joint_attention_dim == pipe.text_encoder_3.config.d_model
    assert (
        t.pooled_projection_dim
        == pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
    )


def test_init_model_from_the_command_line_in_a_fresh_offline_process(tmp_path):
    out = tmp_path / "m"
    subprocess.run(
        [sys.executable, "-m", "flows.cli", "init-model", str(out), "--preset", "tiny"], check=True
    )
    code = (
        "import os; os.environ['HF_HUB_OFFLINE']='1'\n"
        "from diffusers import StableDiffusion3Pipeline\n"
        f"p = StableDiffusion3Pipeline.from_pretrained({str(out)!r})\n"
        "img = p(prompt='a red cat', num_inference_steps=2, height=64, width=64).images[0]\n"
        "print(type(img).__module__, img.size)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.stdout.strip().endswith("(64, 64)")
    assert (
        json.loads((out / "model_index.json").read_text())["_class_name"]
        == "StableDiffusion3Pipeline"
    )


def test_depth_24_preset_has_sd3_medium_transformer_shape():
    model = build_transformer(mmdit_config(24, qk_norm=None), device="meta")
    config = model.config
    assert (config.num_layers, config.num_attention_heads, config.attention_head_dim) == (
        24,
        24,
        64,
    )
    assert model.pos_embed.proj.weight.shape == (1536, 16, 2, 2)
    assert model.context_embedder.weight.shape == (1536, 4096)
    assert model.time_text_embed.text_embedder.linear_1.weight.shape == (1536, 2048)
    params = sum(p.numel() for p in model.parameters())
    assert 2.0e9 < params < 2.1e9, params  # SD3-medium's MMDiT: ~2B
    assert all(p.device.type == "meta" for p in model.parameters())


def test_hidden_size_is_64_times_depth_for_every_depth():
    for depth in (2, 8, 38):
        model = build_transformer(mmdit_config(depth), device="meta")
        assert model.inner_dim == 64 * depth and model.config.num_attention_heads == depth


def test_tokenizers_are_deterministic_and_cover_words():
    a, b = build_clip_tokenizer(), build_clip_tokenizer()
    text = "a photo of a grey cat sitting on a table"
    assert a(text).input_ids == b(text).input_ids
    assert len(a(text).input_ids) == 2 + len(text.split())  # one token per known word
    assert a.model_max_length == 77
    t5 = build_t5_tokenizer()
    ids = t5("a photo of a zebra").input_ids
    assert ids[-1] == t5.eos_token_id and t5.unk_token_id not in ids
    torch.testing.assert_close(
        torch.tensor(ids), torch.tensor(build_t5_tokenizer()("a photo of a zebra").input_ids)
    )
