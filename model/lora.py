"""LoRA on an SD3 transformer with peft: attach, train, checkpoint, export, import.

The adapter is injected into the transformer itself (diffusers' `add_adapter`), so "the base
model" is the same network with `disable_adapters()`: no second copy. peft initialises B = 0, so
the adapted model starts exactly at the base. `t2i train --lora-rank` and `t2i dpo` both use this
module; file formats and key styles live in `model.lora_formats`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import sys
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from curate.runtime.store_writer import share_like_umask
from model.lora_formats import (
    LORA_FILE,
    LoraFormatError,
    LoraModule,
    LoraWeights,
    check_fits,
    linear_shapes,
    peft_state_dict,
    read_lora,
    save_lora,
)

BLOCKS = "transformer_blocks."
ADAPTER = "default"  # peft's name for the adapter `add_adapter` creates


def lora_target_names(transformer: torch.nn.Module, targets: list[str]) -> list[str]:
    """Full names of the transformer's nn.Linear / nn.Conv2d modules that a target names.

    A target matches a module whose name equals it or ends with "." + it (``attn.to_q`` is every
    block's query projection, ``proj_out`` the final projection, ``pos_embed.proj`` the patch
    embedder); ``*`` is a wildcard (``time_text_embed.*``, ``transformer_blocks.0.*``).
    """
    names = [
        name
        for name, module in transformer.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
        and any(_names(name, target) for target in targets)
    ]
    if not names:
        raise ValueError(
            f"no linear or conv layer of the transformer is named by any of {targets}; check the "
            "LoRA targets against its module names (e.g. attn.to_q, ff.net.2, norm1.linear, "
            "proj_out, context_embedder, pos_embed.proj, time_text_embed.*)"
        )
    return names


def _names(name: str, target: str) -> bool:
    if "*" in target:
        return fnmatch.fnmatchcase(name, target) or fnmatch.fnmatchcase(name, "*." + target)
    return name == target or name.endswith("." + target)


def add_lora(
    transformer: torch.nn.Module,
    rank: int,
    alpha: float,
    targets: list[str],
    seed: int = 0,
    ranks: dict[str, int] | None = None,
    alphas: dict[str, float] | None = None,
) -> LoraConfig:
    """Freeze the transformer and attach a trainable fp32 LoRA to the layers TARGETS name.

    RANKS / ALPHAS: per full module name, where a layer's rank or alpha differs from RANK / ALPHA.
    """
    transformer.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        init_lora_weights="gaussian",
        target_modules=lora_target_names(transformer, targets),
        rank_pattern={re.escape(n): r for n, r in (ranks or {}).items()},
        alpha_pattern={re.escape(n): a for n, a in (alphas or {}).items()},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.add_adapter(config)
    for parameter in lora_parameters(transformer):
        parameter.data = parameter.data.float()
    return config


def lora_parameters(transformer: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in transformer.named_parameters() if "lora_" in n]


def lora_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors in peft's keys (the exact training state, for checkpoints)."""
    return {
        k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer).items()
    }


def save_lora_state(transformer: torch.nn.Module, path: str | os.PathLike) -> None:
    save_file(lora_state_dict(transformer), str(path))
    share_like_umask(path)


def load_lora_state(transformer: torch.nn.Module, path: str | os.PathLike) -> None:
    result = set_peft_model_state_dict(transformer, load_file(str(path)))
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ValueError(
            f"{path} does not fit this transformer's LoRA: unexpected keys {unexpected[:3]}..."
        )


def _lora_layers(transformer: torch.nn.Module) -> dict[str, LoraLayer]:
    return {
        name: module
        for name, module in transformer.named_modules()
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A
    }


def lora_weights(
    transformer: torch.nn.Module, shadow: dict[str, torch.Tensor] | None = None
) -> LoraWeights:
    """The transformer's adapter as LoraWeights (fp32 copies, each layer's own alpha); SHADOW
    (parameter name -> tensor, e.g. the EMA's) replaces the live LoRA matrices it names."""
    shadow = shadow or {}
    modules = {}
    for name, layer in _lora_layers(transformer).items():
        a_name, b_name = f"{name}.lora_A.{ADAPTER}.weight", f"{name}.lora_B.{ADAPTER}.weight"
        down = shadow.get(a_name, layer.lora_A[ADAPTER].weight).detach().float().cpu().clone()
        up = shadow.get(b_name, layer.lora_B[ADAPTER].weight).detach().float().cpu().clone()
        modules[name] = LoraModule(down, up, float(layer.scaling[ADAPTER] * down.shape[0]))
    return LoraWeights(modules)


def export_lora(
    transformer: torch.nn.Module,
    config: LoraConfig | None,
    output: str | os.PathLike,
    save_dtype: str = "bf16",
    fmt: str = "diffusers",
) -> Path:
    """Write OUTPUT/pytorch_lora_weights.safetensors (or the .safetensors path OUTPUT) in FMT.

    The diffusers format carries alpha / rank folded into B, so diffusers and ComfyUI apply the
    same update (see model/lora_formats.py). CONFIG is accepted for older callers and unused:
    each layer's own scaling is read from the transformer.
    """
    del config
    return save_lora(lora_weights(transformer), output, fmt, save_dtype)


def init_lora_from(transformer: torch.nn.Module, path: str | os.PathLike) -> int:
    """Set the transformer's (already attached) adapter to the LoRA in PATH, any key style.

    Each layer gets the file's down matrix, and its up matrix rescaled so that the layer's own
    alpha / rank gives the file's update. Returns how many layers were set; the others keep their
    fresh init (B = 0). Refuses files whose modules or ranks do not fit the adapter.
    """
    weights = read_lora(path)
    check_fits(weights, linear_shapes(transformer), str(path))
    layers = _lora_layers(transformer)
    outside = [n for n in weights.modules if n not in layers]
    if outside:
        raise LoraFormatError(
            f"--init-lora {path} adapts {len(outside)} layers this run's LoRA targets leave out "
            f"(e.g. {outside[0]}); widen the LoRA targets to cover them"
        )
    for name, module in weights.modules.items():
        layer = layers[name]
        A, B = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        if A.shape[0] != module.rank:
            raise LoraFormatError(
                f"--init-lora {path} has rank {module.rank} at {name}, this run's LoRA has rank "
                f"{A.shape[0]}; pass the file's rank"
            )
        with torch.no_grad():
            A.copy_(module.down.to(A.dtype))
            B.copy_((module.up.float() * (module.scale / layer.scaling[ADAPTER])).to(B.dtype))
    return len(weights.modules)


@contextlib.contextmanager
def _diffusers_warnings():
    """Let diffusers' loader warnings through (the CLI quiets library logging to errors)."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_warning()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def check_finite(weights: LoraWeights, source: str) -> None:
    """Refuse, in one line, a LoRA holding NaN or infinite values: it would turn every image it
    touches black instead of failing (shapes are checked by read_lora and check_fits)."""
    import math

    for name, module in weights.modules.items():
        for part, tensor in (("down", module.down), ("up", module.up)):
            if not torch.isfinite(tensor).all():
                bad = int((~torch.isfinite(tensor)).sum())
                raise LoraFormatError(
                    f"LoRA {source}: {name} {part} holds {bad} NaN or infinite value(s); "
                    "refusing to use it (it would make black images)"
                )
        if not math.isfinite(module.alpha):
            raise LoraFormatError(f"LoRA {source}: {name} has a non-finite alpha {module.alpha}")


def read_lora_for(path: str | os.PathLike, model_dir: str | os.PathLike) -> LoraWeights:
    """Read a LoRA in any key style and check it against MODEL_DIR's transformer config (built on
    the meta device: no weights are loaded), so a LoRA for another model fails in one line first."""
    from diffusers import SD3Transformer2DModel

    weights = read_lora(path)
    if not (Path(model_dir) / "transformer" / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir} has no transformer/config.json; pass a diffusers SD3 folder"
        )
    config = SD3Transformer2DModel.load_config(Path(model_dir) / "transformer")
    with torch.device("meta"):
        transformer = SD3Transformer2DModel.from_config(config)
    check_fits(weights, linear_shapes(transformer), str(path))
    check_finite(weights, str(path))
    if weights.ignored:
        print(
            f"LoRA {path}: ignoring {len(weights.ignored)} keys that are not SD3 transformer "
            f"LoRA weights (e.g. {', '.join(weights.ignored[:3])})",
            file=sys.stderr,
        )
    return weights


def load_into_pipeline(
    pipe, lora: str | os.PathLike | LoraWeights, adapter_name: str, scale: float
) -> None:
    """Load a LoRA (a file or folder in any supported key style, or LoraWeights) into a diffusers
    SD3 pipeline's transformer as ADAPTER_NAME at SCALE.

    It is converted and checked against the transformer before anything is loaded; diffusers' own
    loader warnings are let through.
    """
    source = "LoRA" if isinstance(lora, LoraWeights) else str(lora)
    weights = lora if isinstance(lora, LoraWeights) else read_lora(lora)
    check_fits(weights, linear_shapes(pipe.transformer), source)
    with _diffusers_warnings():
        pipe.transformer.load_lora_adapter(
            peft_state_dict(weights), prefix="transformer", adapter_name=adapter_name
        )
    if adapter_name not in pipe.get_list_adapters().get("transformer", []):
        raise LoraFormatError(f"diffusers loaded nothing from {source}; see its warning above")
    pipe.set_adapters([adapter_name], adapter_weights=[scale])


__all__ = [
    "LORA_FILE",
    "add_lora",
    "lora_target_names",
    "export_lora",
    "init_lora_from",
    "load_into_pipeline",
    "load_lora_state",
    "read_lora_for",
    "lora_parameters",
    "lora_state_dict",
    "lora_weights",
    "save_lora_state",
]
