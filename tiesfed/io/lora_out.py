"""A merged model written back as a peft LoRA adapter of rank r.

Per target module, ΔW = θ_merged − θ_base (float32) is cut to its best rank-r
approximation by a truncated SVD (float64): B = U_r·√S_r, A = √S_r·V_rᵀ, with
lora_alpha = r so peft's scaling is 1 and `PeftModel.from_pretrained(base, out)`
merges to θ_base + U_r S_r V_rᵀ. A module whose ΔW has rank below r gets zero
columns. One module is read and decomposed at a time; only the factors,
r·(in + out) values per module, are held until the file is written.

The targets are those of the LoRA inputs (their names and layouts: fan_in_fan_out,
embeddings); what lies outside them (modules_to_save) has no place in the adapter
and is refused before the merge starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors.torch import save_file

from tiesfed.io.files import write_atomic, write_json_atomic
from tiesfed.io.lora import ADAPTER_CONFIG, LoraModule, LoraReader
from tiesfed.io.reader import ModelReader
from tiesfed.io.safetensors_format import ModelError

__all__ = ["ADAPTER_FILE", "AdapterPlan", "adapter_targets", "check_adapter_out", "factorize", "write_adapter"]

ADAPTER_FILE = "adapter_model.safetensors"


def adapter_targets(readers: Sequence[ModelReader]) -> list[LoraModule]:
    """The union of the LoRA inputs' target modules, in base order of first appearance;
    refused when there is no LoRA input, when an input has modules_to_save, or when
    inputs disagree on a module's layout."""
    adapters = [r for r in readers if isinstance(r, LoraReader)]
    if not adapters:
        raise ValueError("--lora-rank needs at least one LoRA adapter input: its target modules are the adapter's")
    out: dict[str, LoraModule] = {}
    for a in adapters:
        saved = [n for n in a.replaced if n not in a.modules]
        if saved:
            raise ValueError(f"--lora-rank: adapter {a.path} has modules_to_save ({saved[0]!r}), which a LoRA "
                             "output cannot carry; write the full model only")
        for name, mod in a.modules.items():
            seen = out.setdefault(name, mod)
            if (seen.transpose, seen.embedding) != (mod.transpose, mod.embedding):
                raise ValueError(f"--lora-rank: the adapters disagree on how {name!r} is stored (fan_in_fan_out)")
    fifo = {m.transpose for m in out.values() if not m.embedding}
    if len(fifo) > 1:
        raise ValueError("--lora-rank: the targets mix fan_in_fan_out layouts, which one adapter config cannot")
    return list(out.values())


def check_adapter_out(out_dir: Path, overwrite: bool) -> None:
    """Refuse a folder that already holds an adapter, unless `overwrite`."""
    clash = [n for n in (ADAPTER_CONFIG, ADAPTER_FILE) if (Path(out_dir) / n).exists()]
    if clash and not overwrite:
        raise ModelError(f"{out_dir} already holds a LoRA adapter ({', '.join(clash)}): choose an empty folder, "
                         "or give --overwrite to replace it")


def factorize(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A), float32, B @ A the best rank-`rank` approximation of `delta` (out, in)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
    a = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vh[:k]
    return b.float().contiguous(), a.float().contiguous()


def write_adapter(base: ModelReader, merged: ModelReader, targets: Sequence[LoraModule], rank: int,
                  out_dir: Path, base_name: str, task_type: Optional[str] = None) -> list[str]:
    """Write `out_dir`/adapter_config.json + adapter_model.safetensors; returns the modules written."""
    if rank < 1:
        raise ValueError(f"--lora-rank {rank}: must be at least 1")
    tensors: dict[str, torch.Tensor] = {}
    fifo = False
    modules = []
    for t in targets:
        delta = merged.get(t.name).float() - base.get(t.name).float()
        if t.transpose:  # stored (in, out): B @ A is its transpose
            delta = delta.T
        b, a = factorize(delta, rank)
        module = t.name[: -len(".weight")]
        key = "base_model.model." + module
        if t.embedding:
            tensors[key + ".lora_embedding_A"], tensors[key + ".lora_embedding_B"] = a, b
        else:
            tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"] = a, b
            fifo = fifo or t.transpose
        modules.append(module)
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_name,
        "r": rank, "lora_alpha": rank, "use_rslora": False, "target_modules": modules,
        "fan_in_fan_out": fifo, "bias": "none", "lora_dropout": 0.0, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
        "use_dora": False, "lora_bias": False,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / ADAPTER_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    write_json_atomic(out_dir / ADAPTER_CONFIG, config)
    return modules


class AdapterPlan:
    """What `--lora-rank` will write, checked before the merge: the targets and a free folder."""

    def __init__(self, readers: Sequence[ModelReader], rank: int, out_dir: Path, overwrite: bool) -> None:
        if rank < 1:
            raise ValueError(f"--lora-rank {rank}: must be at least 1")
        self.targets = adapter_targets(readers)
        self.rank, self.out_dir = rank, Path(out_dir)
        check_adapter_out(self.out_dir, overwrite)
        kinds = {r.config.get("task_type") for r in readers if isinstance(r, LoraReader)}
        self.task_type = kinds.pop() if len(kinds) == 1 else None

    def write(self, base: ModelReader, merged_dir: Path, base_name: str) -> list[str]:
        """Decompose the merged model in `merged_dir` against `base`, module by module."""
        with ModelReader(merged_dir) as merged:
            return write_adapter(base, merged, self.targets, self.rank, self.out_dir, base_name, self.task_type)
