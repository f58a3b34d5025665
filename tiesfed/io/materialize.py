"""Turn a merged task-vector stream into model tensors: θ = θ₀ + λ·τ_m.

Shared by the client's fetch (one process writes every shard) and the Ray
shard actors (each writes some shards, in parallel), so both write the same
bits.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Optional

from tiesfed.core.apply import apply_sparse
from tiesfed.io.model_io import (
    DEFAULT_SHARD_BYTES,
    ModelError,
    ModelReader,
    ShardedWriter,
    copy_side_files,
)
from tiesfed.protos.codec import index_stream, read_record_at


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
    progress: Optional[Callable[[int], None]] = None,
) -> None:
    """Write θ₀ + λ·τ_m for `names` (in the writer's plan order); tensors without
    a record keep their base value. `progress(numel)` after each tensor."""
    for name in names:
        theta = base.get(name)
        if name in where:
            st = read_record_at(f, *where[name])
            if tuple(st.shape) != tuple(theta.shape):
                raise ModelError(f"{merged_path}: tensor {name!r} has shape {list(st.shape)}, "
                                 f"base has {list(theta.shape)}")
            try:
                theta = apply_sparse(theta, st.indices, st.values, lam)
            except OverflowError as e:
                raise ModelError(f"{merged_path}: tensor {name!r}: {e}") from None
        writer.write(name, theta)
        if progress:
            progress(theta.numel())


def apply_merged(
    base: ModelReader,
    merged_path: str | Path,
    out_dir: str | Path,
    *,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    expected_fingerprint: Optional[str] = None,
    overwrite: bool = False,
    progress: Optional[Callable[[int], None]] = None,
) -> dict:
    """θ = θ₀ + λ·τ_m for every tensor of `base`, written as an HF-style folder. Returns the header.
    `overwrite` replaces the weights of a folder that has some; `progress(numel)` per tensor."""
    out_dir = Path(out_dir)
    with open(merged_path, "rb") as f:
        header, where = merged_index(f, base, merged_path, expected_fingerprint)
        plan = [(t.name, tuple(t.shape), t.dtype) for t in base.manifest()]
        with ShardedWriter(out_dir, plan, max_shard_bytes=shard_bytes,
                           metadata={"tiesfed_method": str(header.get("method", ""))}, overwrite=overwrite) as writer:
            write_theta(base, f, where, float(header["lambda"]), base.names, writer, merged_path, progress)
    copy_side_files(base.folder, out_dir)
    return header
