"""The DPO LoRA: peft setup, checkpoints and export are shared with `t2i train --lora-rank`
(model/lora.py); file formats and key styles are in model/lora_formats.py."""

from model.lora import (
    BLOCKS,
    LORA_FILE,
    add_lora,
    export_lora,
    init_lora_from,
    load_lora_state,
    lora_parameters,
    lora_state_dict,
    save_lora_state,
)

__all__ = [
    "BLOCKS",
    "LORA_FILE",
    "add_lora",
    "export_lora",
    "init_lora_from",
    "load_lora_state",
    "lora_parameters",
    "lora_state_dict",
    "save_lora_state",
]
