"""SD3 LoRA files in the key styles other tools write and read, converted both ways.

One in-memory form, `LoraWeights`: per diffusers module name (``transformer_blocks.3.attn.to_q``)
a down matrix A [r, in], an up matrix B [out, r] and alpha, so the module's update is
``alpha / r * B @ A``. Readers turn any supported file into it; writers turn it into:

- ``diffusers``: ``transformer.<module>.lora_A.weight`` / ``.lora_B.weight`` as
  ``StableDiffusion3Pipeline.load_lora_weights`` reads them. That format has no alpha tensor
  (diffusers refuses keys without "lora" in them and ComfyUI ignores the metadata), so alpha / r is
  folded into B and the metadata says alpha = r: every consumer applies the same update.
- ``kohya``: sd-scripts' ``networks/lora_sd3.py`` style, ``lora_unet_joint_blocks_3_x_block_attn_qkv``
  ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` on Stability's MMDiT module names.
- ``comfyui``: the same tensors under ``diffusion_model.joint_blocks.3.x_block.attn.qkv`` (ComfyUI's
  own module paths, the form its LoRA savers write).

Stability's names (q/k/v fused, swapped modulation halves) are in model/lora_stability.py.

Readers also take OneTrainer's ``lora_transformer_<diffusers_path_with_underscores>``, SimpleTuner's
``lycoris_`` keys and peft's raw ``base_model.model.`` keys; the style is detected per key.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from curate.runtime.store_writer import share_like_umask
from model.lora_stability import (
    BLOCK_FROM_STABILITY,
    BLOCK_TO_STABILITY,
    GLOBAL_FROM_STABILITY,
    GLOBAL_TO_STABILITY,
    QKV_PARTS,
    from_stability,
    natural,
    qkv_ranks,
    to_stability,
)
from model.lora_types import (  # noqa: F401  (check_fits, linear_shapes: re-exported)
    LoraFormatError,
    LoraModule,
    LoraWeights,
    check_fits,
    linear_shapes,
)

Format = Literal["diffusers", "kohya", "comfyui"]
FORMATS: tuple[str, ...] = ("diffusers", "kohya", "comfyui")
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA weight name
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

_KINDS = {
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora.down.weight": "down",
    "lora.up.weight": "up",
    "alpha": "alpha",
}
_DOTTED_PREFIXES = (
    "transformer.",
    "base_model.model.",
    "model.diffusion_model.",
    "diffusion_model.",
)
QKV_RANKS_KEY = "t2i_qkv_ranks"  # safetensors metadata: how our fused q/k/v LoRAs split back
_FLAT_PREFIXES = {
    "lora_unet_": "stability",
    "lora_transformer_": "diffusers",
    "lycoris_": "diffusers",
}


# ----------------------------------------------------------------------------- reading


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, kind in _KINDS.items():
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], kind
    return None


def _underscored(names: Iterable[str]) -> dict[str, str]:
    return {name.replace(".", "_"): name for name in names}


_FLAT_TABLES = {
    "stability": (
        _underscored({s for s, _ in BLOCK_TO_STABILITY.values()}),
        _underscored(GLOBAL_FROM_STABILITY),
        "joint_blocks",
    ),
    "diffusers": (
        _underscored(BLOCK_TO_STABILITY),
        _underscored(GLOBAL_TO_STABILITY),
        "transformer_blocks",
    ),
}


def _resolve_flat(rest: str, naming: str) -> str | None:
    """A module path with dots turned into underscores, mapped back to its dotted name."""
    block_names, global_names, blocks = _FLAT_TABLES[naming]
    match = re.fullmatch(rf"{blocks}_(\d+)_(.+)", rest)
    if match and match.group(2) in block_names:
        return f"{blocks}.{match.group(1)}.{block_names[match.group(2)]}"
    return global_names.get(rest)


def _resolve_module(path: str) -> tuple[str, str] | None:
    """(naming, dotted module path) where naming is 'diffusers' or 'stability'; None if unknown."""
    for prefix, naming in _FLAT_PREFIXES.items():
        if path.startswith(prefix):
            name = _resolve_flat(path[len(prefix) :], naming)
            return (naming, name) if name else None
    for prefix in _DOTTED_PREFIXES:
        if path.startswith(prefix):
            path = path[len(prefix) :]
            break
    if re.match(r"transformer_blocks\.\d+\.", path):
        suffix = path.split(".", 2)[2]
        return ("diffusers", path) if suffix in BLOCK_TO_STABILITY else None
    if re.match(r"joint_blocks\.\d+\.", path):
        suffix = path.split(".", 2)[2]
        return (
            ("stability", path) if suffix in BLOCK_FROM_STABILITY or suffix in QKV_PARTS else None
        )
    if path in GLOBAL_TO_STABILITY:
        return "diffusers", path
    if path in GLOBAL_FROM_STABILITY:
        return "stability", path
    return None


def _style(key: str) -> str:
    if key.startswith("lora_unet_"):
        return "kohya"
    if key.startswith("lora_transformer_"):
        return "onetrainer"
    if key.startswith("lycoris_"):
        return "simpletuner-lycoris"
    if key.startswith(("diffusion_model.", "model.diffusion_model.")):
        return "comfyui"
    if key.startswith("base_model.model."):
        return "peft"
    return "diffusers"


def _metadata_alphas(metadata: Mapping[str, str] | None) -> tuple[float | None, dict[str, float]]:
    """(lora_alpha, alpha_pattern) from a diffusers file's adapter metadata, if it has any."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return None, {}
    try:
        config = json.loads(raw)
        config = {k.removeprefix("transformer."): v for k, v in config.items()}
    except (ValueError, AttributeError):
        raise LoraFormatError(f"unreadable LoRA adapter metadata: {raw[:80]!r}") from None
    alpha = config.get("lora_alpha")
    return (float(alpha) if alpha is not None else None), {
        k: float(v) for k, v in (config.get("alpha_pattern") or {}).items()
    }


def _pattern_alpha(module: str, patterns: Mapping[str, float]) -> float | None:
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            return value
    return None


def from_state_dict(
    state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> LoraWeights:
    """Any supported key style -> LoraWeights on diffusers module names (see the module doc)."""
    dora = [k for k in state_dict if "dora_scale" in k or "lora_magnitude_vector" in k]
    if dora:
        raise LoraFormatError(
            f"this is a DoRA (e.g. {dora[0]}): its magnitude vectors change what the update means, "
            "and only plain LoRAs are supported"
        )
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    styles: set[str] = set()
    ignored: list[str] = []
    for key, tensor in state_dict.items():
        split = _split_key(key)
        resolved = _resolve_module(split[0]) if split else None
        if resolved is None:
            ignored.append(key)
            continue
        styles.add(_style(key))
        parts.setdefault(resolved, {})[split[1]] = tensor
    default_alpha, patterns = _metadata_alphas(metadata)
    try:  # our own writer's record of fused q/k/v ranks; without it, split by structure
        splits = dict(json.loads((metadata or {}).get(QKV_RANKS_KEY) or "{}"))
    except (ValueError, TypeError):
        splits = {}
    modules: dict[str, LoraModule] = {}
    for (naming, name), found in parts.items():
        if "down" not in found or "up" not in found:
            ignored += [f"{name} (no {'up' if 'down' in found else 'down'} matrix)"]
            continue
        down, up = found["down"], found["up"]
        if not _is_pair(down, up):
            raise LoraFormatError(
                f"{name}: down {tuple(down.shape)} and up {tuple(up.shape)} are not a linear (or "
                "1x1-up conv) LoRA pair"
            )
        if "alpha" in found:
            alpha = float(found["alpha"].float().item())
        else:
            alpha = _pattern_alpha(name, patterns) or default_alpha or float(down.shape[0])
        if naming == "diffusers":
            modules[name] = LoraModule(down, up, alpha)
        else:
            modules.update(from_stability(name, LoraModule(down, up, alpha), splits.get(name)))
    return LoraWeights(modules, styles, ignored)


def _is_pair(down: torch.Tensor, up: torch.Tensor) -> bool:
    """A linear LoRA ([r, in], [out, r]) or a conv one ([r, in, kh, kw], [out, r, 1, 1])."""
    linear = down.ndim == up.ndim == 2
    conv = down.ndim == up.ndim == 4 and tuple(up.shape[2:]) == (1, 1)
    return (linear or conv) and up.shape[1] == down.shape[0]


def read_lora(path: str | os.PathLike) -> LoraWeights:
    """A LoRA file, or a folder holding pytorch_lora_weights.safetensors or one .safetensors file."""
    path = Path(path)
    if path.is_dir():
        candidates = (
            [path / LORA_FILE]
            if (path / LORA_FILE).is_file()
            else sorted(path.glob("*.safetensors"))
        )
        if len(candidates) != 1:
            found = ", ".join(p.name for p in candidates) or "none"
            raise LoraFormatError(
                f"{path} should hold {LORA_FILE} or exactly one .safetensors LoRA file (found: {found}); "
                "pass the file itself, e.g. a `t2i dpo` output folder's LoRA"
            )
        path = candidates[0]
    if not path.is_file():
        raise FileNotFoundError(f"LoRA {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        state_dict = load_file(str(path))
    except Exception as error:  # safetensors raises its own error types for bad headers
        raise LoraFormatError(f"{path} is not a readable .safetensors file ({error})") from None
    weights = from_state_dict(state_dict, metadata)
    if not weights.modules:
        sample = ", ".join(list(state_dict)[:3]) or "no tensors"
        raise LoraFormatError(
            f"{path} holds no SD3 transformer LoRA in any known key style (diffusers, kohya, ComfyUI, "
            f"OneTrainer); its keys look like: {sample}"
        )
    return weights


# ----------------------------------------------------------------------------- writing


def to_state_dict(
    weights: LoraWeights, fmt: Format, dtype: torch.dtype = torch.bfloat16
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of WEIGHTS in format FMT, matrices cast to DTYPE."""

    def cast(t: torch.Tensor) -> torch.Tensor:
        # A copy, always: readers hand out views (q, k and v split from one fused kohya LoRA
        # share its down matrix), and safetensors refuses to save tensors that share memory.
        return t.detach().to("cpu", dtype, copy=True).contiguous()

    if fmt == "diffusers":
        tensors: dict[str, torch.Tensor] = {}
        for name, module in sorted(weights.modules.items(), key=lambda kv: natural(kv[0])):
            tensors[f"transformer.{name}.lora_A.weight"] = cast(module.down)
            tensors[f"transformer.{name}.lora_B.weight"] = cast(module.up.float() * module.scale)
        config = {f"transformer.{k}": v for k, v in diffusers_adapter_config(weights).items()}
        return tensors, {"lora_adapter_metadata": json.dumps(config)}  # keyed as diffusers saves it
    if fmt not in ("kohya", "comfyui"):
        raise LoraFormatError(f"unknown LoRA format {fmt!r}; use one of {', '.join(FORMATS)}")
    tensors = {}
    for name, module in to_stability(weights).items():
        key = "lora_unet_" + name.replace(".", "_") if fmt == "kohya" else "diffusion_model." + name
        tensors[f"{key}.lora_down.weight"] = cast(module.down)
        tensors[f"{key}.lora_up.weight"] = cast(module.up)
        tensors[f"{key}.alpha"] = torch.tensor(module.alpha, dtype=torch.float32)
    ranks = Counter(m.rank for m in to_stability(weights).values())
    metadata = {
        "ss_network_module": "networks.lora_sd3",
        "ss_base_model_version": "sd3",
        QKV_RANKS_KEY: json.dumps(qkv_ranks(weights)),
    }
    if len(ranks) == 1:
        metadata["ss_network_dim"] = str(next(iter(ranks)))
    return tensors, metadata


def diffusers_adapter_config(weights: LoraWeights) -> dict:
    """peft LoraConfig fields for a diffusers file whose B already carries alpha / r (alpha = r)."""
    rank = weights.ranks().most_common(1)[0][0]
    pattern = {n: m.rank for n, m in weights.modules.items() if m.rank != rank}
    return {
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(weights.modules, key=natural),
        "lora_bias": False,
        "use_dora": False,
    }


def save_lora(
    weights: LoraWeights,
    output: str | os.PathLike,
    fmt: Format = "diffusers",
    save_dtype: str = "bf16",
) -> Path:
    """Write WEIGHTS as FMT. OUTPUT is a .safetensors path, or a folder that gets pytorch_lora_weights.safetensors."""
    from safetensors.torch import save_file

    if save_dtype not in SAVE_DTYPES:
        raise LoraFormatError(f"unknown --save-dtype {save_dtype!r}; use one of fp32, fp16, bf16")
    output = Path(output)
    if output.suffix != ".safetensors":
        output.mkdir(parents=True, exist_ok=True)
        output = output / LORA_FILE
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
    tensors, metadata = to_state_dict(weights, fmt, SAVE_DTYPES[save_dtype])
    metadata = {**metadata, "format": "pt", "t2i_lora_format": fmt}
    tmp = output.with_name(output.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    share_like_umask(tmp)
    os.replace(tmp, output)
    return output


def peft_state_dict(weights: LoraWeights, prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    """Tensors for diffusers' loaders with alpha / r folded into B (what they assume without metadata)."""
    tensors = {}
    for name, module in weights.modules.items():
        tensors[f"{prefix}{name}.lora_A.weight"] = module.down.float()
        tensors[f"{prefix}{name}.lora_B.weight"] = module.up.float() * module.scale
    return tensors


def run_lora_convert(input: str, output: str, config) -> Path:
    """`t2i lora-convert IN OUT --to FORMAT`: see flows/cli.py."""
    from curate.runtime.output_guard import check_output_file

    target = Path(output) if Path(output).suffix == ".safetensors" else Path(output) / LORA_FILE
    check_output_file(output, "lora-convert", {"input": input}, target)
    weights = read_lora(input)
    if weights.ignored:
        print(
            f"{input}: left out {len(weights.ignored)} keys that are not SD3 transformer LoRA "
            f"weights (e.g. {', '.join(weights.ignored[:3])})",
            file=sys.stderr,
        )
    return save_lora(weights, output, config.to, config.save_dtype)
