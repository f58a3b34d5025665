"""Small shared test utilities: write tiny Hugging Face style model folders and
make families of fine-tuned models with conflicting task vectors.

    from tests.helpers import make_model, random_family
    base, tuned = random_family({"w": (4, 8), "b": (8,)}, n_models=3, seed=0, dtype=torch.bfloat16)
    make_model(tmp_path / "base", base, shards=2, config={"model_type": "toy"})
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence, Union

import torch
from safetensors.torch import save_file

ShapeSpec = Union[Sequence[int], tuple[Sequence[int], torch.dtype]]

#: A tiny transformer-like model: uneven tensor sizes and one non-float buffer.
TOY_SPEC: dict[str, ShapeSpec] = {
    "embed.weight": (96, 16),
    "layers.0.attn.q.weight": (16, 16),
    "layers.0.mlp.up.weight": (48, 16),
    "layers.0.norm.weight": (16,),
    "lm_head.weight": (96, 16),
    "position_ids": ((1, 32), torch.int64),
}


def make_model(
    folder: str | Path,
    tensors: Mapping[str, torch.Tensor],
    shards: int = 1,
    config: dict | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write `tensors` as a Hugging Face style model folder and return its path.

    shards == 1: ``model.safetensors``. shards > 1: the tensors, in dict order,
    split into `shards` contiguous groups (as even as possible, none empty) as
    ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``.
    With `config`: also ``config.json`` and a dummy ``tokenizer.json``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shards < 1 or (shards > 1 and shards > len(names)):
        raise ValueError(f"cannot split {len(names)} tensors into {shards} shards")
    meta = {"format": "pt", **(metadata or {})}

    def prep(n: str) -> torch.Tensor:  # save_file wants contiguous, unshared CPU tensors
        return tensors[n].detach().cpu().contiguous().clone()

    if shards == 1:
        save_file({n: prep(n) for n in names}, str(folder / "model.safetensors"), metadata=meta)
    else:
        weight_map, total = {}, 0
        for i in range(shards):
            group = names[i * len(names) // shards : (i + 1) * len(names) // shards]
            fn = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: prep(n) for n in group}
            save_file(part, str(folder / fn), metadata=meta)
            for n, t in part.items():
                weight_map[n] = fn
                total += t.numel() * t.element_size()
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "dummy"}}))
    return folder


def random_family(
    base_tensors_spec: Mapping[str, ShapeSpec],
    n_models: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A base model and `n_models` fine-tuned ones, deterministic in `seed`.

    `base_tensors_spec` maps name -> shape, or name -> (shape, dtype) for a
    tensor with its own dtype. Float tensors: base ~ randn; model t gets
    τ_t = 0.01·(0.5·shared + s_t·opposite + 0.5·own_t) with s_t = +1 for even t
    and -1 for odd t, so task vectors agree on part of their mass and fight
    over the rest (sign conflicts exist wherever |opposite| dominates).
    Non-float tensors (e.g. an int64 position-id buffer) are identical
    (arange-based) in every model. Values are generated in float32 and cast
    to the tensor's dtype.
    """
    g = torch.Generator().manual_seed(seed)
    base: dict[str, torch.Tensor] = {}
    tuned: list[dict[str, torch.Tensor]] = [{} for _ in range(n_models)]
    for name, spec in base_tensors_spec.items():
        if len(spec) == 2 and isinstance(spec[1], torch.dtype):
            shape, dt = tuple(spec[0]), spec[1]
        else:
            shape, dt = tuple(spec), dtype
        if not dt.is_floating_point:
            n = 1
            for s in shape:
                n *= s
            t = torch.arange(n, dtype=torch.int64).reshape(shape).to(dt)
            base[name] = t
            for m in tuned:
                m[name] = t.clone()
            continue
        b = torch.randn(shape, generator=g)
        shared = torch.randn(shape, generator=g)
        opposite = torch.randn(shape, generator=g)
        base[name] = b.to(dt)
        for t, m in enumerate(tuned):
            own = torch.randn(shape, generator=g)
            sign = 1.0 if t % 2 == 0 else -1.0
            tau = 0.01 * (0.5 * shared + sign * opposite + 0.5 * own)
            m[name] = (b + tau).to(dt)
    return base, tuned


def write_family(
    root: str | Path,
    n_models: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    base_shards: int = 3,
    spec: Mapping[str, ShapeSpec] = TOY_SPEC,
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]], Path, list[Path]]:
    """`random_family` written to disk: a sharded base (with config and tokenizer
    files) and fine-tuned folders of 1 or 2 shards. Returns (base, tuned, base_dir, paths)."""
    root = Path(root)
    base, tuned = random_family(spec, n_models, seed=seed, dtype=dtype)
    base_dir = make_model(root / "base", base, shards=base_shards, config={"model_type": "toy", "hidden_size": 16})
    paths = [make_model(root / f"ft{i}", t, shards=1 + i % 2) for i, t in enumerate(tuned)]
    return base, tuned, base_dir, paths


def start_two_node_cluster(attempts: int = 3):
    """A Ray cluster of two nodes on loopback, one CPU each. A node that does not come
    up within Ray's fixed 30 s (seen on a loaded 2-core CI machine: the raylet never
    registered) is shut down and the cluster started again, up to `attempts` times."""
    from ray.cluster_utils import Cluster

    for attempt in range(attempts):
        c = Cluster(initialize_head=False, connect=False)
        try:
            c.add_node(num_cpus=1, include_dashboard=False, object_store_memory=100 * 2**20)
            c.add_node(num_cpus=1, object_store_memory=100 * 2**20)
            c.wait_for_nodes()
            return c
        except Exception:
            c.shutdown()
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def wait_until(cond: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    """Poll `cond` until true or `timeout` seconds passed (bounded); whether it came true."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return bool(cond())
