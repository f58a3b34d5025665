"""Turn a merged task-vector stream into model tensors: θ = θ₀ + λ·τ_m.

Shared by the client's fetch (one process writes every shard) and the Ray
shard actors (each writes some shards, in parallel), so both write the same
bits.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Iterable, Optional

from client.apply import apply_sparse
from client.model_io import ModelError, ModelReader, ShardedWriter
from protos.codec import index_stream, read_record_at


def merged_index(
    f: BinaryIO, base: ModelReader, merged_path: str | Path, expected_fingerprint: Optional[str] = None
) -> tuple[dict, dict[str, tuple[int, int]]]:
    """Header and record index of a merged stream, checked against `base`."""
    header, where = index_stream(f, verify=True)
    if header.get("kind") != "merged":
        raise ModelError(f"{merged_path}: not a merged task vector (kind {header.get('kind')!r})")
    if expected_fingerprint and header.get("base_fingerprint") != expected_fingerprint:
        raise ModelError(
            f"{merged_path}: merged onto base {header.get('base_fingerprint')!r}, not {expected_fingerprint!r}"
        )
    unknown = [n for n in where if n not in base]
    if unknown:
        raise ModelError(f"{merged_path}: tensors not in the base {base.path}: {', '.join(unknown[:5])}")
    return header, where


def write_theta(
    base: ModelReader,
    f: BinaryIO,
    where: dict[str, tuple[int, int]],
    lam: float,
    names: Iterable[str],
    writer: ShardedWriter,
    merged_path: str | Path,
) -> None:
    """Write θ₀ + λ·τ_m for `names` (in the writer's plan order); tensors without
    a record keep their base value."""
    for name in names:
        theta = base.get(name)
        if name in where:
            st = read_record_at(f, *where[name])
            if tuple(st.shape) != tuple(theta.shape):
                raise ModelError(f"{merged_path}: tensor {name!r} has shape {list(st.shape)}, "
                                 f"base has {list(theta.shape)}")
            theta = apply_sparse(theta, st.indices, st.values, lam)
        writer.write(name, theta)
