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

Stability's names fuse q, k and v into one ``qkv`` linear. Fusing LoRAs that have separate down
matrices stacks the downs (rank 3r) and puts the ups on a block diagonal; the fused alpha is
3 * alpha so that alpha / rank (what kohya and ComfyUI apply, rank = rows of the down matrix)
is unchanged. Splitting inverts that exactly (our files record each part's rank in the metadata;
without it, equal thirds with zero off-diagonal blocks are split as such); a fused LoRA trained
with one shared down matrix (kohya's default) splits into q, k and v LoRAs that share it. The last block's text-stream
modulation and the final layer's modulation store (shift, scale) in Stability's order and
(scale, shift) in diffusers', so their up rows swap halves on the way.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import load_file

Format = Literal["diffusers", "kohya", "comfyui"]
FORMATS: tuple[str, ...] = ("diffusers", "kohya", "comfyui")
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA weight name
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# diffusers module suffix inside transformer_blocks.N -> Stability's (module, part of a fused qkv).
BLOCK_TO_STABILITY: dict[str, tuple[str, int | None]] = {
    "attn.to_q": ("x_block.attn.qkv", 0),
    "attn.to_k": ("x_block.attn.qkv", 1),
    "attn.to_v": ("x_block.attn.qkv", 2),
    "attn.add_q_proj": ("context_block.attn.qkv", 0),
    "attn.add_k_proj": ("context_block.attn.qkv", 1),
    "attn.add_v_proj": ("context_block.attn.qkv", 2),
    "attn2.to_q": ("x_block.attn2.qkv", 0),
    "attn2.to_k": ("x_block.attn2.qkv", 1),
    "attn2.to_v": ("x_block.attn2.qkv", 2),
    "attn.to_out.0": ("x_block.attn.proj", None),
    "attn.to_add_out": ("context_block.attn.proj", None),
    "attn2.to_out.0": ("x_block.attn2.proj", None),
    "ff.net.0.proj": ("x_block.mlp.fc1", None),
    "ff.net.2": ("x_block.mlp.fc2", None),
    "ff_context.net.0.proj": ("context_block.mlp.fc1", None),
    "ff_context.net.2": ("context_block.mlp.fc2", None),
    "norm1.linear": ("x_block.adaLN_modulation.1", None),
    "norm1_context.linear": ("context_block.adaLN_modulation.1", None),
}
# Linears outside the blocks (kohya's optional emb_dims targets).
GLOBAL_TO_STABILITY: dict[str, str] = {
    "context_embedder": "context_embedder",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
BLOCK_FROM_STABILITY = {
    stab: diff for diff, (stab, part) in BLOCK_TO_STABILITY.items() if part is None
}
QKV_PARTS: dict[str, list[str]] = {}  # fused Stability module -> its q, k, v diffusers suffixes
for _suffix, (_fused, _part) in sorted(BLOCK_TO_STABILITY.items(), key=lambda kv: kv[1][1] or 0):
    if _part is not None:
        QKV_PARTS.setdefault(_fused, []).append(_suffix)
GLOBAL_FROM_STABILITY = {stab: diff for diff, stab in GLOBAL_TO_STABILITY.items()}
SWAPPED_GLOBALS = {"norm_out.linear"}  # AdaLayerNormContinuous: (scale, shift) vs (shift, scale)

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


class LoraFormatError(ValueError):
    """A LoRA file that cannot be read, or does not fit the model it is meant for."""


@dataclass
class LoraModule:
    """The update alpha / rank * up @ down of one linear layer."""

    down: torch.Tensor  # [rank, in]
    up: torch.Tensor  # [out, rank]
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        return self.scale * (self.up.float() @ self.down.float())


@dataclass
class LoraWeights:
    """A transformer LoRA keyed by diffusers module names, plus what a reader could not place."""

    modules: dict[str, LoraModule]
    styles: set[str] = field(default_factory=set)
    ignored: list[str] = field(default_factory=list)

    def ranks(self) -> Counter:
        return Counter(m.rank for m in self.modules.values())


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
    "diffusers": (_underscored(BLOCK_TO_STABILITY), _underscored(GLOBAL_TO_STABILITY), "transformer_blocks"),
}  # fmt: skip


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
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise LoraFormatError(
                f"{name}: down {tuple(down.shape)} and up {tuple(up.shape)} are not a linear LoRA pair"
            )
        if "alpha" in found:
            alpha = float(found["alpha"].float().item())
        else:
            alpha = _pattern_alpha(name, patterns) or default_alpha or float(down.shape[0])
        if naming == "diffusers":
            modules[name] = LoraModule(down, up, alpha)
        else:
            modules.update(_from_stability(name, LoraModule(down, up, alpha), splits.get(name)))
    return LoraWeights(modules, styles, ignored)


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


# ----------------------------------------------------------------------------- Stability names


def _swap_halves(up: torch.Tensor) -> torch.Tensor:
    shift, scale = up.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def _is_pre_only_modulation(name: str, module: LoraModule) -> bool:
    """The last block's text-stream AdaLayerNormContinuous: 2 chunks (not 6) of the width."""
    return name.endswith(("norm1_context.linear", "context_block.adaLN_modulation.1")) and (
        module.up.shape[0] == 2 * module.down.shape[1]
    )


def _from_stability(
    name: str, module: LoraModule, ranks: list[int] | None = None
) -> dict[str, LoraModule]:
    if name in GLOBAL_FROM_STABILITY:
        target = GLOBAL_FROM_STABILITY[name]
        up = _swap_halves(module.up) if target in SWAPPED_GLOBALS else module.up
        return {target: LoraModule(module.down, up, module.alpha)}
    _, index, suffix = name.split(".", 2)
    prefix = f"transformer_blocks.{index}."
    if suffix in QKV_PARTS:
        parts = _split_qkv(module, ranks)
        return {
            prefix + s: m for s, m in zip(QKV_PARTS[suffix], parts, strict=True) if m is not None
        }
    up = _swap_halves(module.up) if _is_pre_only_modulation(name, module) else module.up
    return {prefix + BLOCK_FROM_STABILITY[suffix]: LoraModule(module.down, up, module.alpha)}


def _split_qkv(fused: LoraModule, ranks: list[int] | None = None) -> list[LoraModule | None]:
    """q, k, v LoRAs of one fused qkv LoRA, exactly (see the module doc). RANKS: the parts' ranks
    as our writer records them (0: no LoRA on that projection)."""
    rank, out = fused.rank, fused.up.shape[0] // 3
    ups = fused.up.split(out, dim=0)
    valid = (
        isinstance(ranks, list)
        and len(ranks) == 3
        and all(isinstance(r, int) and r >= 0 for r in ranks)
    )
    if valid and sum(ranks) == rank:
        parts: list[LoraModule | None] = []
        start = 0
        for i, r in enumerate(ranks):
            block = LoraModule(
                fused.down[start : start + r],
                ups[i][:, start : start + r].clone(),
                fused.alpha * r / rank,
            )
            parts.append(block if r else None)
            start += r
        return parts
    if rank % 3 == 0:
        r = rank // 3
        off_diagonal = [
            ups[i][:, j * r : (j + 1) * r] for i in range(3) for j in range(3) if i != j
        ]
        if all(not block.any() for block in off_diagonal):
            downs = fused.down.split(r, dim=0)
            return [
                LoraModule(downs[i], ups[i][:, i * r : (i + 1) * r].clone(), fused.alpha / 3)
                for i in range(3)
            ]
    return [LoraModule(fused.down, up.clone(), fused.alpha) for up in ups]


def _fuse_qkv(parts: list[LoraModule | None]) -> LoraModule:
    """One qkv LoRA from q, k, v LoRAs (None: that projection has none): stacked downs, block-diagonal ups."""
    present = [p for p in parts if p is not None]
    out, total = present[0].up.shape[0], sum(p.rank for p in present)
    shared = len({p.scale for p in present}) == 1
    up = torch.zeros(3 * out, total, dtype=present[0].up.dtype if shared else torch.float32)
    column = 0
    for i, part in enumerate(parts):
        if part is not None:
            block = part.up if shared else part.up.float() * part.scale  # unequal scales: fold them
            up[i * out : (i + 1) * out, column : column + part.rank] = block
            column += part.rank
    alpha = present[0].scale * total if shared else float(total)
    return LoraModule(torch.cat([p.down for p in present], dim=0), up, alpha)


def to_stability(weights: LoraWeights) -> dict[str, LoraModule]:
    """LoraWeights on Stability's MMDiT module names, q/k/v fused."""
    result: dict[str, LoraModule] = {}
    fused: dict[str, list[LoraModule | None]] = {}
    for name, module in weights.modules.items():
        if name in GLOBAL_TO_STABILITY:
            up = _swap_halves(module.up) if name in SWAPPED_GLOBALS else module.up
            result[GLOBAL_TO_STABILITY[name]] = LoraModule(module.down, up, module.alpha)
            continue
        match = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", name)
        if not match or match.group(2) not in BLOCK_TO_STABILITY:
            raise LoraFormatError(f"{name} has no counterpart among Stability's MMDiT modules")
        target, part = BLOCK_TO_STABILITY[match.group(2)]
        target = f"joint_blocks.{match.group(1)}.{target}"
        if part is not None:
            fused.setdefault(target, [None, None, None])[part] = module
            continue
        up = _swap_halves(module.up) if _is_pre_only_modulation(name, module) else module.up
        result[target] = LoraModule(module.down, up, module.alpha)
    for target, parts in fused.items():
        result[target] = _fuse_qkv(parts)
    return dict(sorted(result.items(), key=lambda kv: _natural(kv[0])))


def qkv_ranks(weights: LoraWeights) -> dict[str, list[int]]:
    """Fused Stability module -> the ranks of its q, k, v parts (0: none), for exact splitting."""
    ranks: dict[str, list[int]] = {}
    for name, module in weights.modules.items():
        match = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", name)
        target = BLOCK_TO_STABILITY.get(match.group(2)) if match else None
        if target is not None and target[1] is not None:
            key = f"joint_blocks.{match.group(1)}.{target[0]}"
            ranks.setdefault(key, [0, 0, 0])[target[1]] = module.rank
    return ranks


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# ----------------------------------------------------------------------------- writing


def to_state_dict(
    weights: LoraWeights, fmt: Format, dtype: torch.dtype = torch.bfloat16
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of WEIGHTS in format FMT, matrices cast to DTYPE."""

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", dtype).contiguous()

    if fmt == "diffusers":
        tensors: dict[str, torch.Tensor] = {}
        for name, module in sorted(weights.modules.items(), key=lambda kv: _natural(kv[0])):
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
    metadata = {"ss_network_module": "networks.lora_sd3", "ss_base_model_version": "sd3",
                QKV_RANKS_KEY: json.dumps(qkv_ranks(weights))}  # fmt: skip
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
        "target_modules": sorted(weights.modules, key=_natural),
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
    os.replace(tmp, output)
    return output


# ----------------------------------------------------------------------------- fitting a model


def check_fits(weights: LoraWeights, shapes: Mapping[str, tuple[int, int]], source: str) -> None:
    """Refuse a LoRA none of whose modules exist in the model, or whose shapes do not fit it.

    SHAPES: (out, in) of every nn.Linear of the transformer, by module name.
    """
    matched = [n for n in weights.modules if n in shapes]
    if not matched:
        example = next(iter(weights.modules))
        raise LoraFormatError(
            f"LoRA {source} matches none of the model's modules (e.g. {example} is not in this "
            f"transformer, which has {sum(n.startswith('transformer_blocks.') for n in shapes)} block "
            "linears); it was made for another model"
        )
    missing = [n for n in weights.modules if n not in shapes]
    if missing:
        raise LoraFormatError(
            f"LoRA {source} has {len(missing)} of {len(weights.modules)} modules this model lacks "
            f"(e.g. {missing[0]}); it was made for another model (e.g. SD3.5 dual attention on SD3)"
        )
    for name, module in weights.modules.items():
        out, inp = shapes[name]
        if tuple(module.up.shape[:1]) + tuple(module.down.shape[1:]) != (out, inp):
            raise LoraFormatError(
                f"LoRA {source}: {name} maps {module.down.shape[1]} -> {module.up.shape[0]} features, "
                f"the model's layer maps {inp} -> {out}; it was made for another model size"
            )


def linear_shapes(transformer: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """(out, in) of every nn.Linear in a transformer (peft-wrapped layers count by their base)."""
    shapes = {}
    for name, module in transformer.named_modules():
        if (
            isinstance(module, torch.nn.Linear)
            and ".lora_" not in name
            and "base_layer" not in name
        ):
            shapes[name] = (module.out_features, module.in_features)
        base = getattr(module, "base_layer", None)
        if isinstance(base, torch.nn.Linear):
            shapes[name] = (base.out_features, base.in_features)
    return shapes


def peft_state_dict(weights: LoraWeights, prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    """Tensors for diffusers' loaders with alpha / r folded into B (what they assume without metadata)."""
    tensors = {}
    for name, module in weights.modules.items():
        tensors[f"{prefix}{name}.lora_A.weight"] = module.down.float()
        tensors[f"{prefix}{name}.lora_B.weight"] = module.up.float() * module.scale
    return tensors


def run_lora_convert(input: str, output: str, config) -> Path:
    """`t2i lora-convert IN OUT --to FORMAT`: see flows/cli.py."""
    from curate.stage_runtime import check_output_file

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
