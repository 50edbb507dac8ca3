"""Training checkpoints in our own format: safetensors for every tensor, JSON for everything else.

A checkpoint folder holds, per saved object (model, optimizer, scheduler, EMA, RNG):

    NAME.safetensors   the object's tensors, under flat keys
    NAME.json          the rest of its state_dict (numbers, strings, lists), with each tensor
                       replaced by {"tensor": KEY}; absent for a plain model (weights only)
    trainer_state.json our step counter and run facts, plus the list of objects; written last,
                       so a folder without it is an unfinished save

Loading reads only these files, with `safetensors.torch.load_file` and `json.loads`: nothing in
a checkpoint is ever unpickled, so a planted pickle (or any other file) is never executed. A
state_dict that holds anything but tensors, numbers, strings, None and containers of them
cannot be saved (it raises), so the format stays closed. Saves go to a temporary name and are
renamed into place, with a retention limit.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file

from curate.runtime.store_writer import share_like_umask

STATE_FILE = "trainer_state.json"
FORMAT = "t2i-checkpoint-1"
RNG = "rng"
_NAME = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint folder that this trainer did not write, or that is incomplete."""


def checkpoint_path(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints (those with a trainer_state.json), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def resolve_resume(root: Path, resume: str | None) -> Path | None:
    """None (fresh start), the newest checkpoint for 'latest', or the named folder."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"--resume {resume}: not a finished checkpoint (no {STATE_FILE}); use 'latest' or one of "
            f"{[p.name for p in list_checkpoints(root)] or 'none yet'} under {root}"
        )
    return path


# ----------------------------------------------------------------------------- state codec


def encode_state(state: Any, tensors: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """A JSON-able skeleton of STATE; its tensors are moved into TENSORS under flat keys.

    Dicts keep their key types ({"dict": [[key, value], ...]}: optimizer states use int keys),
    tuples stay tuples; anything that is not a tensor, number, string, bool, None, list, tuple
    or dict is refused, so loading never needs to construct an arbitrary object."""
    if isinstance(state, torch.Tensor):
        key = prefix or "value"
        tensors[key] = state.detach().cpu().contiguous()
        return {"tensor": key}
    if state is None or isinstance(state, bool | int | float | str):
        return state
    if isinstance(state, dict):
        items = []
        for key, value in state.items():
            if not isinstance(key, str | int) or isinstance(key, bool):
                raise TypeError(f"cannot checkpoint a dict key of type {type(key).__name__}")
            items.append(
                [key, encode_state(value, tensors, f"{prefix}.{key}" if prefix else str(key))]
            )
        return {"dict": items}
    if isinstance(state, list | tuple):
        values = [
            encode_state(v, tensors, f"{prefix}.{k}" if prefix else str(k))
            for k, v in enumerate(state)
        ]
        return {"tuple": values} if isinstance(state, tuple) else {"list": values}
    raise TypeError(
        f"cannot checkpoint a {type(state).__name__} at {prefix or 'the top'}: only tensors, numbers, "
        "strings and containers of them are stored (no pickles)"
    )


def decode_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `encode_state`."""
    if skeleton is None or isinstance(skeleton, bool | int | float | str):
        return skeleton
    if not isinstance(skeleton, dict) or len(skeleton) != 1:
        raise CheckpointError(f"not a t2i checkpoint value: {str(skeleton)[:80]}")
    ((kind, body),) = skeleton.items()
    if kind == "tensor":
        if body not in tensors:
            raise CheckpointError(f"the checkpoint lacks tensor {body!r}")
        return tensors[body]
    if kind == "dict":
        return {key: decode_state(value, tensors) for key, value in body}
    if kind in ("list", "tuple"):
        values = [decode_state(v, tensors) for v in body]
        return tuple(values) if kind == "tuple" else values
    raise CheckpointError(f"not a t2i checkpoint value kind: {kind!r}")


def save_object(folder: Path, name: str, state: dict[str, Any]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = encode_state(state, tensors)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(skeleton))


def load_object(folder: Path, name: str) -> dict[str, Any]:
    tensors = load_file(str(folder / f"{name}.safetensors"))
    skeleton_file = folder / f"{name}.json"
    if not skeleton_file.is_file():  # a model: flat weights only
        return tensors
    return decode_state(json.loads(skeleton_file.read_text()), tensors)


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# ----------------------------------------------------------------------------- save / load


class ModuleSubset:
    """Some of a module's tensors (those whose name KEEP accepts) as a checkpointable object,
    e.g. a LoRA's on a frozen base; loading demands exactly those names."""

    def __init__(self, module: torch.nn.Module, keep: Callable[[str], bool]) -> None:
        self.module, self.keep = module, keep

    def _target(self) -> torch.nn.Module:
        return getattr(self.module, "module", self.module)  # under DDP, the wrapped model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self._target().state_dict().items() if self.keep(k)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            raise CheckpointError(
                f"the checkpoint holds {len(state)} tensors of this kind, the run has {len(expected)}: "
                "was it written with other --lora-rank/--lora-targets?"
            )
        self._target().load_state_dict(state, strict=False)


def _default_objects(accelerator: Accelerator) -> dict[str, Any]:
    """What accelerate would have saved: prepared models and optimizers, schedulers, registered objects."""
    objects: dict[str, Any] = {}
    for k, model in enumerate(accelerator._models):
        objects["model" if k == 0 else f"model_{k}"] = model
    for k, optimizer in enumerate(accelerator._optimizers):
        objects["optimizer" if k == 0 else f"optimizer_{k}"] = optimizer
    for k, scheduler in enumerate(accelerator._schedulers):
        objects["scheduler" if k == 0 else f"scheduler_{k}"] = scheduler
    for k, obj in enumerate(accelerator._custom_objects):
        objects[f"custom_{k}"] = obj
    return objects


def _sharded(accelerator: Accelerator, objects: dict[str, Any]) -> list[str]:
    """Objects whose state differs per process: optimizers under FSDP (unmeasured: no GPUs here)."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return []
    return sorted(name for name, obj in objects.items() if hasattr(obj, "param_groups"))


def _state_of(accelerator: Accelerator, obj: Any) -> dict[str, Any]:
    if isinstance(obj, torch.nn.Module):
        return accelerator.get_state_dict(obj)  # unwraps DDP, gathers FSDP
    return obj.state_dict()  # a LambdaLR's functions come out as None and stay the caller's


def save_checkpoint(
    accelerator: Accelerator,
    root: Path,
    step: int,
    state: dict[str, Any],
    keep: int,
    objects: dict[str, Any] | None = None,
) -> Path:
    """Save OBJECTS (name -> module, optimizer, scheduler or anything with state_dict; default:
    everything prepared with or registered on ACCELERATOR), the RNG and STATE (JSON) as
    root/step-NNNNNNNN, under a temporary name first: a killed save never looks like a checkpoint."""
    root = Path(root)
    final = checkpoint_path(root, step)
    tmp = root / f".tmp-{final.name}"
    objects = _default_objects(accelerator) if objects is None else objects
    sharded = _sharded(accelerator, objects)
    states = {name: _state_of(accelerator, obj) for name, obj in objects.items()}  # collective
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    for name in sharded:  # FSDP: every process writes its own shard of the optimizer state
        save_object(tmp, f"{name}.rank{accelerator.process_index}", states[name])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name, obj in objects.items():
            if name in sharded:
                continue
            if isinstance(obj, torch.nn.Module):
                tensors = {k: v.detach().cpu().contiguous() for k, v in states[name].items()}
                save_file(tensors, str(tmp / f"{name}.safetensors"))
            else:
                save_object(tmp, name, states[name])
        save_object(tmp, RNG, rng_state())
        record = {"format": FORMAT, "step": step, "objects": sorted(objects), **state}
        if sharded:
            record["sharded"] = {"objects": sharded, "processes": accelerator.num_processes}
        (tmp / STATE_FILE).write_text(json.dumps(record, indent=2))
        share_like_umask(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _load_full_state_into_fsdp(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Every process loads the full (unsharded) weights; FSDP keeps its own shard of them."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    config = FullStateDictConfig(offload_to_cpu=True, rank0_only=False)
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
        model.load_state_dict(state)


def read_trainer_state(path: Path) -> dict[str, Any]:
    """trainer_state.json of a checkpoint this trainer wrote; refuses any other folder."""
    path = Path(path)
    try:
        record = json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not a readable t2i checkpoint: {error}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} was not written by this trainer (no {FORMAT!r} in {STATE_FILE}); it is refused "
            "rather than unpickled. Start a new run, or resume from a checkpoint `t2i train` wrote."
        )
    return record


def load_checkpoint(
    accelerator: Accelerator, path: Path, objects: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Restore OBJECTS (as passed to `save_checkpoint`) and the RNG from PATH; return our
    trainer state (its "step" above all). Reads safetensors and JSON only."""
    path = Path(path)
    record = read_trainer_state(path)
    objects = _default_objects(accelerator) if objects is None else objects
    if sorted(objects) != sorted(record["objects"]):
        raise CheckpointError(
            f"{path} holds {sorted(record['objects'])}, this run needs {sorted(objects)}"
        )
    sharded = record.get("sharded") or {"objects": [], "processes": accelerator.num_processes}
    if sharded["objects"] and sharded["processes"] != accelerator.num_processes:
        raise CheckpointError(
            f"{path} holds optimizer shards of {sharded['processes']} FSDP processes; resume it with "
            f"as many (this run has {accelerator.num_processes})"
        )
    for name, obj in objects.items():
        stored = f"{name}.rank{accelerator.process_index}" if name in sharded["objects"] else name
        for suffix in (".safetensors",) + (() if isinstance(obj, torch.nn.Module) else (".json",)):
            if not (path / f"{stored}{suffix}").is_file():
                raise CheckpointError(f"{path} is incomplete: {stored}{suffix} is missing")
        state = load_object(path, stored)
        if (
            isinstance(obj, torch.nn.Module)
            and accelerator.distributed_type == DistributedType.FSDP
        ):
            _load_full_state_into_fsdp(obj, state)  # unmeasured: no GPUs here
        elif isinstance(obj, torch.nn.Module):
            accelerator.unwrap_model(obj).load_state_dict(state)
        else:
            obj.load_state_dict(state)
    set_rng_state(load_object(path, RNG))
    return record
