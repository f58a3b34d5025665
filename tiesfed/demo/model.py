"""The demo's model, DigitsMLP, and its Hugging Face style folder format.

A folder is ``model.safetensors`` (fp32) plus a small ``config.json`` with the
layer sizes, so the merge engine reads it like any other checkpoint and a
merged folder (possibly sharded, possibly without a config) loads back here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from tiesfed.io.files import write_atomic, write_json_atomic

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class DigitsMLP(nn.Module):
    """64 → hidden… → 10 with ReLU; tensors named fc1.weight, fc1.bias, …"""

    def __init__(self, layer_sizes: Sequence[int]):
        super().__init__()
        self.layer_sizes = tuple(int(s) for s in layer_sizes)
        self.n_layers = len(self.layer_sizes) - 1
        for i in range(self.n_layers):
            self.add_module(f"fc{i + 1}", nn.Linear(self.layer_sizes[i], self.layer_sizes[i + 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.n_layers):
            x = getattr(self, f"fc{i + 1}")(x)
            if i < self.n_layers - 1:
                x = F.relu(x)
        return x


def model_config(layer_sizes: Sequence[int], **demo: object) -> dict:
    return {
        "model_type": "tiesfed_digits_mlp",
        "architectures": ["DigitsMLP"],
        "layer_sizes": list(layer_sizes),
        "activation": "relu",
        "torch_dtype": "float32",
        "tiesfed_demo": demo,
    }


def _read_state(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder: model.safetensors, or every shard of an index."""
    single = model_dir / WEIGHTS
    if single.is_file():
        return load_file(str(single))
    index = model_dir / f"{WEIGHTS}.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no safetensors weights in {model_dir}")
    state: dict[str, torch.Tensor] = {}
    for name in shards:
        state.update(load_file(str(model_dir / name)))
    return state


def load_model(model_dir: Path, layer_sizes: Optional[Sequence[int]] = None) -> DigitsMLP:
    """Load a safetensors folder into a DigitsMLP (fp32, eval mode).

    The architecture comes from the folder's config.json when it has one,
    else from `layer_sizes` (e.g. a merged folder written without a config).
    """
    model_dir = Path(model_dir)
    cfg_path = model_dir / CONFIG
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        if "layer_sizes" in cfg:
            layer_sizes = cfg["layer_sizes"]
    if layer_sizes is None:
        raise ValueError(f"{model_dir} has no config.json with layer_sizes and none was given")
    model = DigitsMLP(layer_sizes)
    state = {k: v.to(torch.float32) for k, v in _read_state(model_dir).items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def save_model(model: DigitsMLP, folder: Path, config: dict) -> None:
    """Write `folder`/model.safetensors (fp32) and config.json, each atomically."""
    state = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in model.state_dict().items()}
    write_atomic(folder / WEIGHTS, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    write_json_atomic(folder / CONFIG, config)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).to(torch.float64).mean().item())
