"""PyTorch pickle checkpoints (`pytorch_model.bin`, sharded with
`pytorch_model.bin.index.json`) as a name → tensor map, without reading them whole.

`torch.load(..., weights_only=True, mmap=True)`: the unpickler is torch's restricted
one (tensors, dicts, numbers: a pickle that needs code is refused, never run), and
the tensors' storages are memory-mapped from the file, so a tensor's bytes are read
when it is used: a large checkpoint costs page cache, not private memory. A legacy
(pre-zip, torch < 1.6) file cannot be mapped: it is loaded whole, still weights-only.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch

from tiesfed.io.safetensors_format import DTYPE_TO_ST, ModelError

__all__ = ["BIN_FILE", "BIN_INDEX_FILE", "load_bin", "read_bin_index"]

BIN_FILE = "pytorch_model.bin"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"


def load_bin(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of one pickle checkpoint, memory-mapped; a clear ModelError for anything else."""
    try:
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "zipfile" not in str(e) and "mmap" not in str(e):
                raise
            obj = torch.load(file, map_location="cpu", weights_only=True)  # legacy format: no mmap
    except pickle.UnpicklingError as e:
        why = re.search(r"Unsupported global: GLOBAL \S+", str(e))
        if why is None:  # not a pickle torch's restricted unpickler can parse at all
            plain = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
            raise ModelError(f"{file}: not a PyTorch checkpoint torch.load can read: {plain[:200]}") from None
        raise ModelError(
            f"{file}: this pickle needs code to load, which tiesfed never runs (torch.load weights_only: "
            f"{why.group(0)}); save the model's state_dict alone, or convert it to safetensors") from None
    except OSError as e:
        raise ModelError(f"{file}: cannot read: {e}") from e
    except Exception as e:  # a damaged or foreign file: torch raises several types
        raise ModelError(f"{file}: not a PyTorch checkpoint torch.load can read: {e}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        raise ModelError(f"{file}: a training checkpoint (it holds a 'state_dict' and more): save the model's "
                         "state_dict alone")
    if not isinstance(obj, dict):
        raise ModelError(f"{file}: holds a {type(obj).__name__}, not a state dict of tensors")
    out: dict[str, torch.Tensor] = {}
    for name, t in obj.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise ModelError(f"{file}: entry {name!r} is a {type(t).__name__}, not a tensor: not a plain state dict")
        if t.dtype not in DTYPE_TO_ST:
            raise ModelError(f"{file}: tensor {name!r}: unsupported dtype {t.dtype}")
        if t.is_sparse or t.layout != torch.strided:
            raise ModelError(f"{file}: tensor {name!r}: a {t.layout} tensor; only dense tensors are supported")
        out[name] = t
    return out


def read_bin_index(index: Path) -> dict[str, str]:
    """The `weight_map` of a sharded pickle checkpoint (tensor → shard file)."""
    try:
        wm = json.loads(index.read_text())["weight_map"]
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise TypeError("weight_map is not a {tensor: file} object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{index}: malformed index: {e!r}") from e
    missing = sorted({n for n in wm.values() if not (index.parent / n).is_file()})
    if missing:
        raise ModelError(f"{index}: shard file(s) missing: {', '.join(missing)}")
    return dict(wm)
