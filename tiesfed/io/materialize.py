"""Turn a merged task-vector stream into model tensors: θ = θ₀ + λ·τ_m.

Shared by the client's fetch (one process writes every shard) and the Ray
shard actors (each writes some shards, in parallel), so both write the same
bits.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Optional

import torch

from tiesfed.core.apply import apply_sparse
from tiesfed.io.model_card import write_round_card
from tiesfed.io.model_io import (
    DEFAULT_SHARD_BYTES,
    ModelError,
    ModelReader,
    ShardedWriter,
    copy_side_files,
)
from tiesfed.protos.codec import index_stream, iter_records_at


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


#: elements of one tensor applied and written at once: a tensor larger than this is
#: streamed in blocks (read from the base's byte range, written with write_part)
APPLY_BLOCK = 1 << 25


def write_theta(
    base: ModelReader,
    f: BinaryIO,
    where: dict[str, tuple[int, int]],
    lam: float,
    names: Iterable[str],
    writer: ShardedWriter,
    merged_path: str | Path,
    progress: Optional[Callable[[int], None]] = None,
    block: Optional[int] = None,
) -> None:
    """Write θ₀ + λ·τ_m for `names` (in the writer's plan order); tensors without
    a record keep their base value. `progress(numel)` after each tensor. A tensor is
    applied one record at a time (a whole tensor, or each of its span records), and a
    range over `block` elements block by block (apply is per element: the same bits),
    so memory holds one span and one block of the base, not the tensor."""
    block = block or APPLY_BLOCK
    for name in names:
        info = base.info(name)
        records = iter_records_at(f, *where[name]) if name in where else iter([None])
        for st in records:
            if st is not None and tuple(st.shape) != tuple(info.shape):
                raise ModelError(f"{merged_path}: tensor {name!r} has shape {list(st.shape)}, "
                                 f"base has {list(info.shape)}")
            start, count = (0, info.numel) if st is None or st.count is None else (st.start, st.count)
            if count == info.numel and count <= block:
                writer.write(name, _apply(base.get(name), st, 0, lam, name, merged_path))
                continue
            for lo in range(start, start + count, block):
                hi = min(lo + block, start + count)
                writer.write_part(name, _apply(base.get_range(name, lo, hi), st, lo, lam, name, merged_path))
        if progress:
            progress(info.numel)


def _apply(theta0: torch.Tensor, st, lo: int, lam: float, name: str, merged_path) -> torch.Tensor:
    """θ₀ (a whole tensor, or the block of one starting at element `lo`) plus λ·τ_m."""
    if st is None:
        return theta0
    idx = st.indices
    if lo or theta0.numel() != st.numel:
        ends = torch.searchsorted(idx, torch.tensor([lo, lo + theta0.numel()], dtype=idx.dtype))
        a, b = int(ends[0]), int(ends[1])
        idx, values = idx[a:b] - lo, st.values[a:b]
    else:
        values = st.values
    try:
        return apply_sparse(theta0, idx, values, lam)
    except OverflowError as e:
        raise ModelError(f"{merged_path}: tensor {name!r}: {e}") from None


def apply_merged(
    base: ModelReader,
    merged_path: str | Path,
    out_dir: str | Path,
    *,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    expected_fingerprint: Optional[str] = None,
    overwrite: bool = False,
    progress: Optional[Callable[[int], None]] = None,
    block: Optional[int] = None,
) -> dict:
    """θ = θ₀ + λ·τ_m for every tensor of `base`, written as an HF-style folder. Returns the header.
    `overwrite` replaces the weights of a folder that has some; `progress(numel)` per tensor;
    `block`: elements of the base read and applied at once (default `APPLY_BLOCK`)."""
    out_dir = Path(out_dir)
    with open(merged_path, "rb") as f:
        header, where = merged_index(f, base, merged_path, expected_fingerprint)
        plan = [(t.name, tuple(t.shape), t.dtype) for t in base.manifest()]
        with ShardedWriter(out_dir, plan, max_shard_bytes=shard_bytes,
                           metadata={"tiesfed_method": str(header.get("method", ""))}, overwrite=overwrite) as writer:
            write_theta(base, f, where, float(header["lambda"]), base.names, writer, merged_path, progress, block)
    copy_side_files(base.folder, out_dir)
    if header.get("kind") == "merged" and isinstance(header.get("contributors"), list):
        # the base's README would call this the base: a card naming the round (the coordinator's,
        # written after this, adds the participants' weights and contribution digests)
        write_round_card(out_dir, Path(base.folder), {k: header[k] for k in ("round_id", "options") if k in header},
                         {str(c): "" for c in header["contributors"]})
    return header
