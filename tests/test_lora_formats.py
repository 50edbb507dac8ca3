"""LoRA files that travel: diffusers <-> kohya <-> ComfyUI <-> OneTrainer (model/lora_formats.py).

Run on the tiny-d2-64 kit (64-wide heads, the widths sd-scripts and ComfyUI accept). The
Stability-side meaning of a kohya/ComfyUI file is checked against diffusers' own single-file
converter (Stability MMDiT checkpoint -> diffusers): a LoRA merged into Stability-named weights the
way kohya and ComfyUI apply it, converted by diffusers, must give the model our importer builds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from lora_kit import inputs, outputs, random_trained_lora
from PIL import Image
from safetensors.torch import load_file, save_file
from sd_scripts_kit import merged_like_comfyui, stability_checkpoint

from flows.cli import main as t2i
from model.build import build_transformer
from model.folders import load_pipeline
from model.lora import add_lora, load_into_pipeline, lora_weights
from model.lora_formats import (
    LoraModule,
    LoraWeights,
    linear_shapes,
    read_lora,
    save_lora,
    to_state_dict,
)
from model.presets import RELEASED_MODELS, released_config, tiny_mmdit_config

TOLERANCE = 1e-5  # fp32 on CPU: only reordered additions differ
RANK, ALPHA = 4, 8.0  # alpha != rank on purpose


# ----------------------------------------------------------------------------- fixtures


def dual_attention_config():
    config = tiny_mmdit_config(num_layers=3)
    config.update(dual_attention_layers=(0, 1), in_channels=16, out_channels=16)
    return config


@pytest.fixture(scope="module")
def trained(tiny64_model_dir, tmp_path_factory):
    """Rank 4, alpha 8, non-zero B on every block linear of the tiny-d2-64 kit's transformer."""
    return random_trained_lora(
        tiny64_model_dir, tmp_path_factory.mktemp("lora"), RANK, ALPHA, 0.05, 1
    )


@pytest.fixture(scope="module")
def dual():
    """A 3-block MMDiT with SD3.5-medium's dual attention (attn2) in blocks 0 and 1, with a LoRA."""
    from dpo.config import ALL_BLOCK_LINEARS

    torch.manual_seed(0)
    base = build_transformer(dual_attention_config()).eval()
    adapted = build_transformer(dual_attention_config()).eval()
    adapted.load_state_dict(base.state_dict())
    add_lora(adapted, RANK, ALPHA, ALL_BLOCK_LINEARS)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(7))
    return base, adapted


def fresh_pipeline(model_dir):
    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir)
    pipe.transformer.eval()
    return pipe


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", ["kohya", "comfyui"])
def test_our_lora_through_kohya_or_comfyui_and_back_gives_the_trainers_outputs(
    fmt, trained, tiny64_model_dir, tmp_path
):
    transformer, _ = trained
    file = save_lora(lora_weights(transformer), tmp_path / f"{fmt}.safetensors", fmt, "fp32")
    keys = load_file(str(file))
    assert all(k.startswith("lora_unet_" if fmt == "kohya" else "diffusion_model.") for k in keys)
    back = read_lora(file)
    assert back.styles == {fmt}
    original = lora_weights(transformer)
    assert back.modules.keys() == original.modules.keys()
    for (
        name,
        module,
    ) in original.modules.items():  # exact: stacked downs / block-diagonal ups split back
        got = back.modules[name]
        assert torch.equal(got.down, module.down) and torch.equal(got.up, module.up), name
        assert got.alpha == module.alpha == ALPHA

    pipe = fresh_pipeline(tiny64_model_dir)
    load_into_pipeline(pipe, file, "imported", 1.0)
    ours = outputs(transformer)
    assert (
        pipe.transformer(**inputs(pipe.transformer.config, 3)).sample - ours
    ).abs().max() < TOLERANCE
    plain = outputs(load_pipeline(tiny64_model_dir).transformer)
    assert (ours - plain).abs().max() > 1e-3

    # -> diffusers format -> the stock loader
    folder = save_lora(back, tmp_path / "diffusers", "diffusers", "fp32").parent
    stock = fresh_pipeline(tiny64_model_dir)
    stock.load_lora_weights(str(folder), adapter_name="x")
    assert (outputs(stock.transformer) - ours).abs().max() < TOLERANCE


def test_kohya_and_comfyui_files_mean_on_stabilitys_weights_what_the_trainer_trained(
    dual, tmp_path
):
    """Merged into Stability-named weights as kohya/ComfyUI do and converted by diffusers, the file
    gives the trainer's model: fused q/k/v, dual attention (attn2) and the last block's swapped
    (shift, scale) modulation all land where they should."""
    base, adapted = dual
    expected = outputs(adapted)
    for fmt in ("kohya", "comfyui"):
        file = save_lora(lora_weights(adapted), tmp_path / f"{fmt}.safetensors", fmt, "fp32")
        keys = set(load_file(str(file)))
        assert ("lora_unet_joint_blocks_0_x_block_attn2_qkv.alpha" in keys) == (fmt == "kohya")
        merged = merged_like_comfyui(base, file)
        assert (outputs(merged) - expected).abs().max() < TOLERANCE


def test_a_kohya_file_made_from_known_matrices_has_the_expected_effect(tiny64_model_dir, tmp_path):
    """A kohya file written here by hand (fused qkv with one shared down, alpha 2 at rank 4; the
    last block's text modulation): importing it equals adding alpha/rank * up @ down to the
    matching Stability weights."""
    pipe = fresh_pipeline(tiny64_model_dir)
    base = pipe.transformer
    dim = base.config.num_attention_heads * base.config.attention_head_dim
    last = base.config.num_layers - 1
    g = torch.Generator().manual_seed(5)
    qkv_down, qkv_up = torch.randn(4, dim, generator=g), torch.randn(3 * dim, 4, generator=g) * 0.1
    mod_down, mod_up = torch.randn(2, dim, generator=g), torch.randn(2 * dim, 2, generator=g) * 0.1
    state = {
        "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": qkv_down,
        "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": qkv_up,
        "lora_unet_joint_blocks_0_x_block_attn_qkv.alpha": torch.tensor(2.0),
        f"lora_unet_joint_blocks_{last}_context_block_adaLN_modulation_1.lora_down.weight": mod_down,
        f"lora_unet_joint_blocks_{last}_context_block_adaLN_modulation_1.lora_up.weight": mod_up,
        f"lora_unet_joint_blocks_{last}_context_block_adaLN_modulation_1.alpha": torch.tensor(2.0),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(
            1, 4
        ),  # ignored
    }
    file = tmp_path / "known.safetensors"
    save_file(state, str(file))

    by_hand = load_pipeline(tiny64_model_dir).transformer.eval()
    with torch.no_grad():
        delta = 2.0 / 4 * qkv_up @ qkv_down
        for i, name in enumerate(("to_q", "to_k", "to_v")):
            getattr(by_hand.transformer_blocks[0].attn, name).weight += delta[
                i * dim : (i + 1) * dim
            ]
        shift_scale = (
            2.0 / 2 * mod_up @ mod_down
        )  # Stability: (shift, scale); diffusers: (scale, shift)
        by_hand.transformer_blocks[last].norm1_context.linear.weight += torch.cat(
            [shift_scale[dim:], shift_scale[:dim]]
        )
    weights = read_lora(file)
    assert sorted(weights.modules) == sorted(
        [f"transformer_blocks.0.attn.to_{p}" for p in "qkv"]
        + [f"transformer_blocks.{last}.norm1_context.linear"]
    )
    assert weights.ignored == ["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"]
    load_into_pipeline(pipe, file, "known", 1.0)
    assert (outputs(pipe.transformer) - outputs(by_hand)).abs().max() < TOLERANCE
    assert (
        outputs(by_hand) - outputs(load_pipeline(tiny64_model_dir).transformer)
    ).abs().max() > 1e-4


def test_diffusers_files_fold_alpha_so_comfyui_which_ignores_metadata_applies_the_same_update(
    trained, tmp_path
):
    transformer, _ = trained
    file = save_lora(lora_weights(transformer), tmp_path / "d.safetensors", "diffusers", "fp32")
    tensors = load_file(str(file))
    assert all(".lora_" in k for k in tensors)  # diffusers refuses keys without "lora"
    layer = transformer.transformer_blocks[0].attn.to_q
    a, b = (
        tensors["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"],
        tensors["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"],
    )
    # what ComfyUI computes with no alpha key: up @ down, scale 1
    expected = ALPHA / RANK * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert torch.allclose(b @ a, expected, atol=1e-7)


def test_save_dtype_sets_the_matrices_dtype_and_halves_the_file(trained, tmp_path):
    weights = lora_weights(trained[0])
    sizes = {}
    for dtype, torch_dtype in (
        ("fp32", torch.float32),
        ("bf16", torch.bfloat16),
        ("fp16", torch.float16),
    ):
        file = save_lora(weights, tmp_path / f"{dtype}.safetensors", "kohya", dtype)
        tensors = load_file(str(file))
        assert {t.dtype for k, t in tensors.items() if not k.endswith(".alpha")} == {torch_dtype}
        assert {t.dtype for k, t in tensors.items() if k.endswith(".alpha")} == {torch.float32}
        sizes[dtype] = sum(t.numel() * t.element_size() for t in tensors.values())
    assert sizes["bf16"] == sizes["fp16"] < 0.51 * sizes["fp32"]


# ----------------------------------------------------------------------------- real model shapes


def expected_kohya_modules(num_layers: int, dual: tuple[int, ...]) -> set[str]:
    """sd-scripts lora_sd3 names: lora_unet_ + the MMDiT module path with dots as underscores;
    the last block's text stream only has qkv and its (shift, scale) modulation."""
    names = set()
    for i in range(num_layers):
        x = ["attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2", "adaLN_modulation_1"]
        x += ["attn2_qkv", "attn2_proj"] if i in dual else []
        context = ["attn_qkv", "adaLN_modulation_1"]
        context += ["attn_proj", "mlp_fc1", "mlp_fc2"] if i < num_layers - 1 else []
        names |= {f"lora_unet_joint_blocks_{i}_x_block_{m}" for m in x}
        names |= {f"lora_unet_joint_blocks_{i}_context_block_{m}" for m in context}
    return names


@pytest.mark.parametrize("name", RELEASED_MODELS)
def test_key_names_and_shapes_for_sd3_and_sd35_models(name):
    config = released_config(name)
    transformer = build_transformer(config, "meta")
    shapes = {
        n: s for n, s in linear_shapes(transformer).items() if n.startswith("transformer_blocks.")
    }
    weights = LoraWeights(
        {n: LoraModule(torch.zeros(1, i), torch.zeros(o, 1), 1.0) for n, (o, i) in shapes.items()}
    )
    kohya, _ = to_state_dict(weights, "kohya", torch.float32)
    comfy, _ = to_state_dict(weights, "comfyui", torch.float32)
    modules = {k.rsplit(".", 2)[0] for k in kohya if k.endswith(".lora_down.weight")}
    assert modules == expected_kohya_modules(config["num_layers"], config["dual_attention_layers"])
    assert {k.removeprefix("lora_unet_") for k in kohya} == {
        k.removeprefix("diffusion_model.")
        .replace(".", "_")
        .replace("_lora_down_weight", ".lora_down.weight")
        .replace("_lora_up_weight", ".lora_up.weight")
        .replace("_alpha", ".alpha")
        for k in comfy
    }

    # ComfyUI patches diffusion_model.<path>.weight: every path must be a real MMDiT weight of
    # matching shape (Stability layout checked against diffusers' own converter, on meta tensors).
    state = transformer.state_dict()
    checkpoint = stability_checkpoint(state, config["num_layers"])
    assert {
        k: v.shape
        for k, v in convert_sd3_transformer_checkpoint_to_diffusers(dict(checkpoint)).items()
    } == {k: v.shape for k, v in state.items()}
    for key, tensor in comfy.items():
        if key.endswith(".lora_down.weight"):
            path = key.removeprefix("diffusion_model.").removesuffix(".lora_down.weight")
            up = comfy[key.replace("lora_down", "lora_up")]
            assert checkpoint[path + ".weight"].shape == (up.shape[0], tensor.shape[1]), path
    hidden = 64 * config["num_attention_heads"]
    assert kohya["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"].shape == (
        3 * hidden,
        3,
    )
    assert kohya["lora_unet_joint_blocks_0_x_block_attn_qkv.alpha"].item() == 3.0


# ----------------------------------------------------------------------------- t2i sample --lora


def onetrainer_file(weights: LoraWeights, path):
    """OneTrainer's SD3 style: lora_transformer_<diffusers path, dots as underscores>, with .alpha."""
    tensors = {}
    for name, module in weights.modules.items():
        stem = "lora_transformer_" + name.replace(".", "_")
        tensors[stem + ".lora_down.weight"] = module.down
        tensors[stem + ".lora_up.weight"] = module.up
        tensors[stem + ".alpha"] = torch.tensor(module.alpha)
    save_file(tensors, str(path))
    return path


def sample(model, out, *extra):
    argv = [
        "sample",
        "--model",
        model,
        "--prompt",
        "a red cat",
        "--seed",
        "0",
        "--steps",
        "2",
        "--out",
        str(out),
        *extra,
    ]
    return t2i(argv)


def pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


def test_t2i_sample_takes_a_single_file_in_every_key_style(trained, tiny64_model_dir, tmp_path):
    weights = lora_weights(trained[0])
    files = {
        fmt: save_lora(weights, tmp_path / f"{fmt}.safetensors", fmt, "fp32")
        for fmt in ("diffusers", "kohya", "comfyui")
    }
    files["onetrainer"] = onetrainer_file(weights, tmp_path / "onetrainer.safetensors")
    images = {}
    for style, file in files.items():
        assert sample(tiny64_model_dir, tmp_path / style, "--lora", str(file)) == 0
        images[style] = pixels(tmp_path / style / "lora" / "000-a-red-cat-seed0.png")
    base = pixels(tmp_path / "kohya" / "base" / "000-a-red-cat-seed0.png")
    assert np.abs(images["kohya"] - base).max() > 0
    for style, image in images.items():  # the same LoRA in four spellings: (nearly) the same image
        assert np.abs(image - images["diffusers"]).max() <= 1, style


def test_a_lora_for_another_model_is_refused_in_one_line_before_any_image(
    tiny64_model_dir, tmp_path, capsys
):
    wrong = LoraWeights(
        {
            "transformer_blocks.0.attn.to_q": LoraModule(
                torch.zeros(2, 1536), torch.zeros(1536, 2), 2.0
            )
        }
    )
    cases = {
        "shapes": save_lora(wrong, tmp_path / "sd3m.safetensors", "kohya", "fp32"),
        "nothing": tmp_path / "text-only.safetensors",
    }
    save_file(
        {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(1, 4)},
        str(cases["nothing"]),
    )
    for case, file in cases.items():
        out = tmp_path / case
        assert sample(tiny64_model_dir, out, "--lora", str(file)) == 1
        err = capsys.readouterr().err.strip()
        assert (
            len(err.splitlines()) == 1
            and "another model" in err
            or "no SD3 transformer LoRA" in err
        ), err
        assert not list(out.rglob("*.png")), case


def test_init_lora_from_a_kohya_file_restores_the_trainers_model_at_another_alpha(
    trained, tiny64_model_dir, tmp_path
):
    """`t2i dpo --init-lora` / resuming from a foreign file: the adapter (here alpha 4, not 8)
    gets the file's down matrices and rescaled ups, so the update is the file's."""
    from dpo.config import ALL_BLOCK_LINEARS
    from model.lora import init_lora_from

    transformer, _ = trained
    file = save_lora(lora_weights(transformer), tmp_path / "k.safetensors", "kohya", "fp32")
    fresh = load_pipeline(tiny64_model_dir).transformer.eval()
    add_lora(fresh, RANK, 4.0, ALL_BLOCK_LINEARS)
    assert init_lora_from(fresh, file) == len(lora_weights(transformer).modules)
    assert (outputs(fresh) - outputs(transformer)).abs().max() < TOLERANCE

    other_rank = load_pipeline(tiny64_model_dir).transformer
    add_lora(other_rank, 2, 2.0, ALL_BLOCK_LINEARS)
    with pytest.raises(ValueError, match="rank 4 .* rank 2"):
        init_lora_from(other_rank, file)


def test_partial_and_untrained_qkv_loras_round_trip_matrix_for_matrix(tmp_path):
    """q and v without k, and a fresh LoRA (B = 0): fused for kohya, split back to the same matrices."""
    g = torch.Generator().manual_seed(2)
    for name, std in (("partial", 0.1), ("fresh", 0.0)):
        modules = {
            "transformer_blocks.0.attn.to_q": LoraModule(
                torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g) * std, 8.0
            ),
            "transformer_blocks.0.attn.to_v": LoraModule(
                torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g) * std, 8.0
            ),
            "transformer_blocks.0.attn.add_k_proj": LoraModule(
                torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g) * std, 1.0
            ),
        }
        if name == "fresh":
            modules["transformer_blocks.0.attn.to_k"] = LoraModule(
                torch.randn(4, 32, generator=g), torch.zeros(32, 4), 8.0
            )
        for fmt in ("kohya", "comfyui"):
            file = save_lora(
                LoraWeights(modules), tmp_path / f"{name}-{fmt}.safetensors", fmt, "fp32"
            )
            back = read_lora(file).modules
            assert back.keys() == modules.keys(), (name, fmt)
            for key, module in modules.items():
                assert torch.equal(back[key].down, module.down), (name, fmt, key)
                assert torch.equal(back[key].up, module.up), (name, fmt, key)
                assert back[key].alpha == module.alpha, (name, fmt, key)


def test_t2i_lora_convert_chains_formats_back_to_the_same_file(trained, tmp_path, capsys):
    _, folder = trained
    assert (
        t2i(
            [
                "lora-convert",
                str(folder),
                str(tmp_path / "k.safetensors"),
                "--to",
                "kohya",
                "--save-dtype",
                "fp32",
            ]
        )
        == 0
    )
    assert (
        t2i(
            [
                "lora-convert",
                str(tmp_path / "k.safetensors"),
                str(tmp_path / "c.safetensors"),
                "--to",
                "comfyui",
                "--save-dtype",
                "fp32",
            ]
        )
        == 0
    )
    assert (
        t2i(
            [
                "lora-convert",
                str(tmp_path / "c.safetensors"),
                str(tmp_path / "d"),
                "--to",
                "diffusers",
                "--save-dtype",
                "fp32",
            ]
        )
        == 0
    )
    original, again = (
        load_file(str(folder / "pytorch_lora_weights.safetensors")),
        load_file(str(tmp_path / "d" / "pytorch_lora_weights.safetensors")),
    )
    assert original.keys() == again.keys()
    assert all(torch.allclose(original[k], again[k], atol=1e-7) for k in original)
    capsys.readouterr()
    save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "not-a-lora.safetensors"))
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 16)
    save_file(
        {
            "lora_unet_joint_blocks_0_x_block_mlp_fc1.lora_down.weight": torch.zeros(1, 32),
            "lora_unet_joint_blocks_0_x_block_mlp_fc1.lora_up.weight": torch.zeros(128, 1),
            "lora_unet_joint_blocks_0_x_block_mlp_fc1.dora_scale": torch.ones(1, 32),
        },
        str(tmp_path / "dora.safetensors"),
    )
    for bad in (
        "not-a-lora.safetensors",
        "garbage.safetensors",
        "missing.safetensors",
        "dora.safetensors",
    ):
        assert t2i(["lora-convert", str(tmp_path / bad), str(tmp_path / "x"), "--to", "kohya"]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("t2i lora-convert: error:"), err
