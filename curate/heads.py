"""Small MLP heads on CLIP image embeddings, rebuilt from their weight files alone.

The layer sizes are read from the file, so the same loader serves LAION's aesthetic predictor
v2 (`layers.0/2/4/6/7`: Linear 768-1024-128-64-16-1 with dropout between and no activations,
as trained) and LAION's CLIP NSFW head (Linear layers with ReLU between and a sigmoid output,
converted once from Keras to safetensors with keys `layers.N.weight/bias`, plus optional
`norm.mean`/`norm.variance` of its input normalisation layer).
Weights load from .safetensors, or a .pth/.pt/.bin read with `weights_only=True`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"head weights {path} do not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items()}


class MLPHead(nn.Module):
    """Linear layers at the indices the weight file names (gaps are eval-time dropout)."""

    def __init__(
        self, state: dict[str, torch.Tensor], activation: str, output: str, source: str
    ) -> None:
        super().__init__()
        indices = sorted(
            {int(m.group(1)) for k in state if (m := re.fullmatch(r"layers\.(\d+)\.weight", k))}
        )
        if not indices:
            raise ValueError(
                f"{source} holds no `layers.N.weight` tensors; it is not an MLP head file"
            )
        modules: list[nn.Module] = []
        for index in range(indices[-1] + 1):
            if index in indices:
                out_features, in_features = state[f"layers.{index}.weight"].shape
                modules.append(
                    nn.Linear(in_features, out_features, bias=f"layers.{index}.bias" in state)
                )
            else:
                modules.append(nn.Identity())
        self.layers = nn.Sequential(*modules)
        self.layers.load_state_dict(
            {k.removeprefix("layers."): v for k, v in state.items() if k.startswith("layers.")}
        )
        self.activation, self.output = activation, output
        self.in_features = int(state[f"layers.{indices[0]}.weight"].shape[1])
        mean, variance = state.get("norm.mean"), state.get("norm.variance")
        self.register_buffer("mean", mean.float().reshape(-1) if mean is not None else None)
        self.register_buffer(
            "variance", variance.float().reshape(-1) if variance is not None else None
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        x = embeddings
        if self.mean is not None:
            x = (x - self.mean) / torch.sqrt(self.variance + 1e-7)
        linears = [m for m in self.layers if isinstance(m, nn.Linear)]
        for i, linear in enumerate(linears):
            x = linear(x)
            if self.activation == "relu" and i < len(linears) - 1:
                x = torch.relu(x)
        x = x.squeeze(-1)
        return torch.sigmoid(x) if self.output == "sigmoid" else x


def load_head(path: str | Path, activation: str, output: str, expect_dim: int) -> MLPHead:
    head = MLPHead(load_state(path), activation, output, str(path)).eval()
    if head.in_features != expect_dim:
        raise ValueError(
            f"head {path} expects {head.in_features}-d embeddings but the CLIP model gives {expect_dim}-d; "
            "pair the head with the CLIP it was trained on (ViT-L/14: 768)"
        )
    return head


class ClipHeadScorer:
    """A LAION head on a local CLIP's image embeddings; subclasses name the head's layout."""

    kind: str
    activation: str
    output: str
    weights_option: str

    def __init__(
        self, clip_folder: str | None, head_path: str | None, device: str = "cpu", clip=None
    ) -> None:
        from curate.clip import ClipImageEmbedder

        if not head_path:
            raise ValueError(
                f"the {self.kind!r} scorer needs its head weights: pass {self.weights_option} FILE"
            )
        self.clip = clip or ClipImageEmbedder(clip_folder, device)
        self.head = load_head(
            head_path, activation=self.activation, output=self.output, expect_dim=self.clip.dim
        )

    @torch.no_grad()
    def __call__(self, images, embeddings=None):
        import numpy as np

        embeddings = self.clip(images) if embeddings is None else embeddings
        return self.head(torch.from_numpy(embeddings)).numpy().astype(np.float64)
