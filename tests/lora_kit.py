"""A LoRA as training leaves it (non-zero B), exported in diffusers format, for LoRA tests."""

import torch

from dpo.config import ALL_BLOCK_LINEARS
from dpo.lora import add_lora, export_lora
from model.folders import load_pipeline


def random_trained_lora(model_dir, out, rank: int, alpha: float, std: float, seed: int):
    """(transformer with the adapter, OUT with pytorch_lora_weights.safetensors)."""
    transformer = load_pipeline(model_dir).transformer
    config = add_lora(transformer, rank=rank, alpha=alpha, targets=ALL_BLOCK_LINEARS)
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, std, generator=torch.Generator().manual_seed(seed))
    export_lora(transformer, config, out, save_dtype="fp32")
    return transformer, out


def inputs(config, seed=0):
    """Two random transformer inputs of CONFIG's shapes (timesteps 250 and 750)."""
    generator = torch.Generator().manual_seed(seed)
    size = config.sample_size
    return {
        "hidden_states": torch.randn(2, config.in_channels, size, size, generator=generator),
        "encoder_hidden_states": torch.randn(2, 9, config.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(2, config.pooled_projection_dim, generator=generator),
        "timestep": torch.tensor([250.0, 750.0]),
    }


def outputs(transformer, seed=3):
    """TRANSFORMER's prediction on inputs(its config, SEED)."""
    with torch.no_grad():
        return transformer(**inputs(transformer.config, seed)).sample
