"""Our exports through ComfyUI's and sd-scripts' own loaders, on CPU (issue 25's interop check).

On the tiny-d2-64 kit (the smallest model whose widths both tools infer correctly), it writes:
the transformer as a Stability single file (`t2i export-single-file`), and a LoRA with B != 0 on
every block linear, the embedders (the patch embedder's conv too) and the final layer in kohya,
ComfyUI and diffusers key styles; then it loads them with the tools' own code and prints the max
|difference| of the transformer's outputs against diffusers with our loader. sd-scripts'
LoRANetwork (emb_dims on) also writes a file of its own, which we read back.

Needs local checkouts, read and run only (nothing of them is copied): --comfyui DIR
(github.com/Comfy-Org/ComfyUI) and/or --sd-scripts DIR (github.com/kohya-ss/sd-scripts), and
einops + torchsde importable for ComfyUI (e.g. `pip install --target DEPS einops torchsde
trampoline` and DEPS on PYTHONPATH). torchvision, torchaudio, av, kornia and spandrel are only
imported by code paths this check does not run and are stubbed when missing.

    PYTHONPATH=.:DEPS python benchmarks/interop_third_party.py --comfyui ComfyUI --sd-scripts sd-scripts
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import sys
import tempfile
import types
from pathlib import Path

import torch
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import load_file, save_file

from dpo.config import ALL_BLOCK_LINEARS, EMBEDDERS, FINAL_LAYER
from flows.cli import main as t2i
from model.build import init_model
from model.folders import load_transformer
from model.lora import add_lora, load_into_pipeline, lora_weights
from model.lora_formats import read_lora, save_lora


def stub_missing(*names: str) -> None:
    for name in names:
        top = sys.modules.get(name.split(".")[0])
        real = (
            getattr(top, "__file__", None) if top else importlib.util.find_spec(name.split(".")[0])
        )
        if name in sys.modules or real:
            continue
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent in sys.modules:
            setattr(sys.modules[parent], child, module)


class Kit:
    """The tiny-d2-64 model, its single file, a trained-looking LoRA and fixed inputs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.model = init_model(root / "model", "tiny-d2-64")
        self.single = root / "single.safetensors"
        assert (
            t2i(["export-single-file", str(self.model), str(self.single), "--save-dtype", "fp32"])
            == 0
        )
        base = load_transformer(self.model).eval()
        c, g = base.config, torch.Generator().manual_seed(0)
        self.x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g)
        self.context = torch.randn(2, 9, c.joint_attention_dim, generator=g)
        self.pooled = torch.randn(2, c.pooled_projection_dim, generator=g)
        self.t = torch.tensor([250.0, 750.0])
        self.base = self.ours(base)
        adapted = load_transformer(self.model).eval()
        add_lora(adapted, 4, 8.0, [*ALL_BLOCK_LINEARS, *EMBEDDERS, *FINAL_LAYER])
        with torch.no_grad():
            for name, parameter in adapted.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.05, generator=g)
        self.adapted = self.ours(adapted)
        weights = lora_weights(adapted)
        self.loras = {
            fmt: save_lora(weights, root / f"{fmt}.safetensors", fmt, "fp32")
            for fmt in ("kohya", "comfyui", "diffusers")
        }

    def ours(self, transformer) -> torch.Tensor:
        with torch.no_grad():
            return transformer(
                hidden_states=self.x,
                encoder_hidden_states=self.context,
                pooled_projections=self.pooled,
                timestep=self.t,
            ).sample

    def ours_with(self, lora: Path) -> torch.Tensor:
        pipe = StableDiffusion3Pipeline.from_pretrained(self.model)
        load_into_pipeline(pipe, lora, "check", 1.0)
        return self.ours(pipe.transformer.eval())


def comfyui(kit: Kit, checkout: Path) -> dict:
    sys.path.insert(0, str(checkout))
    stub_missing("torchvision", "torchvision.transforms", "torchaudio", "av", "kornia", "spandrel")
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.lora
    import comfy.sd
    import comfy.utils

    patcher = comfy.sd.load_diffusion_model(str(kit.single))

    def run(model) -> torch.Tensor:
        with torch.no_grad():
            return model.diffusion_model(kit.x, kit.t, y=kit.pooled, context=kit.context)

    figures = {
        "model": type(patcher.model).__name__,
        "depth": len(patcher.model.diffusion_model.joint_blocks),
        "single_file_vs_diffusers": (run(patcher.model) - kit.base).abs().max().item(),
    }
    for fmt, file in kit.loras.items():
        state = comfy.utils.load_torch_file(str(file))
        patches = comfy.lora.load_lora(state, comfy.lora.model_lora_keys_unet(patcher.model, {}))
        pairs = [k for k in state if k.endswith(("lora_down.weight", "lora_A.weight"))]
        patched = patcher.clone()
        patched.add_patches(patches, 1.0)
        patched.patch_model()
        figures[fmt] = {
            "keys_not_loaded": len(pairs) - len(patches),
            "vs_our_trainer": (run(patched.model) - kit.adapted).abs().max().item(),
        }
        patched.unpatch_model()
    return figures


def sd_scripts(kit: Kit, checkout: Path) -> dict:
    stub_missing("torchvision", "torchvision.transforms")
    sys.path.insert(0, str(checkout))
    from library import sd3_utils
    from networks import lora_sd3

    def mmdit():
        return sd3_utils.load_mmdit(load_file(str(kit.single)), torch.float32, "cpu").eval()

    def run(model) -> torch.Tensor:
        with torch.no_grad():
            return model(kit.x, kit.t, context=kit.context, y=kit.pooled)

    figures = {"single_file_vs_diffusers": (run(mmdit()) - kit.base).abs().max().item()}
    merged = mmdit()
    network, state = lora_sd3.create_network_from_weights(
        1.0, str(kit.loras["kohya"]), None, [], merged, for_inference=True
    )
    network.merge_to([], merged, state, torch.float32, "cpu")
    figures["our_kohya_merged_vs_our_trainer"] = (run(merged) - kit.adapted).abs().max().item()

    theirs = mmdit()  # sd-scripts' own network, emb_dims on every embedder and the final layer
    network = lora_sd3.create_network(1.0, 4, 2.0, None, [], theirs, emb_dims="[2,2,2,2,2,2]")
    network.apply_to([], theirs, apply_text_encoder=False, apply_unet=True)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if "lora_up" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        expected = run(theirs)
    for dtype in (
        "fp32",
        "bf16",
    ):  # LoRANetwork.save_weights' tensors (its hashing needs more deps)
        cast = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        file = kit.root / f"sd-scripts-{dtype}.safetensors"
        save_file(
            {k: v.detach().clone().to(cast) for k, v in network.state_dict().items()}, str(file)
        )
        code = t2i(
            [
                "lora-convert",
                str(file),
                str(kit.root / f"from-{dtype}"),
                "--to",
                "diffusers",
                "--save-dtype",
                dtype,
            ]
        )
        figures[f"lora_convert_{dtype}_exit_code"] = code
    file = kit.root / "sd-scripts-fp32.safetensors"
    weights = read_lora(file)
    figures["their_file"] = {
        "modules": len(weights.modules),
        "ignored": len(weights.ignored),
        "ours_vs_their_network": (kit.ours_with(file) - expected).abs().max().item(),
    }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--comfyui", type=Path)
    parser.add_argument("--sd-scripts", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        kit = Kit(Path(tmp))
        results = {}
        if args.sd_scripts:
            results["sd-scripts"] = sd_scripts(kit, args.sd_scripts)
        if args.comfyui:
            results["comfyui"] = comfyui(kit, args.comfyui)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
