"""How the flat parameter space is cut into shards (pure: no Ray, no I/O).

The tensors of a manifest, taken in manifest order and concatenated, form one
flat parameter space of N elements. `plan_shards` cuts it into S contiguous
ranges whose sizes differ by at most one (the first N % S shards get the extra
element). A tensor that straddles a boundary is split into contiguous flat
index ranges (`Piece`s); a shard may hold pieces of several tensors. The plan
depends only on the manifest and S, so every process that builds it agrees.

Edge cases, all allowed:
- an empty manifest, or one whose tensors are all empty (N == 0): every shard
  is empty;
- zero-size tensors: they own no range and have no pieces;
- more shards than elements (S > N): the last S - N shards are empty. Callers
  need not start anything for an empty shard (`nonempty_shards`).

`split` routes one sparse contribution (sorted flat indices into a tensor,
with their values) to the shards owning them, rebasing indices to each
shard's local space, with a `searchsorted` per contribution and no Python
loop per element.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

__all__ = ["Piece", "ShardPlan", "plan_shards", "num_shards_for"]

DEFAULT_MIN_ELEMS_PER_SHARD = 1 << 22  # 4M params: below this an actor costs more than it saves


@dataclass(frozen=True)
class Piece:
    """Flat elements [start, stop) of `tensor`, held by `shard` from `offset_in_shard` on."""

    tensor: str
    start: int
    stop: int
    shard: int
    offset_in_shard: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


class ShardPlan:
    """The result of `plan_shards`: which shard holds which flat range of which tensor."""

    def __init__(self, manifest: Sequence[tuple[str, int]], num_shards: int) -> None:
        if isinstance(num_shards, bool) or not isinstance(num_shards, int):
            raise TypeError(f"num_shards must be an int, got {type(num_shards).__name__}")
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        names: list[str] = []
        sizes: dict[str, int] = {}
        for entry in manifest:
            name, numel = entry
            if not isinstance(name, str):
                raise TypeError(f"tensor names must be str, got {name!r}")
            if name in sizes:
                raise ValueError(f"tensor {name!r} appears twice in the manifest")
            numel = int(numel)
            if numel < 0:
                raise ValueError(f"tensor {name!r} has negative size {numel}")
            names.append(name)
            sizes[name] = numel
        self.num_shards = num_shards
        self.names: tuple[str, ...] = tuple(names)
        self.sizes: Mapping[str, int] = sizes
        self.total = sum(sizes.values())
        base, extra = divmod(self.total, num_shards)
        # bounds[s] .. bounds[s + 1] is shard s's global range
        self.bounds: list[int] = [s * base + min(s, extra) for s in range(num_shards + 1)]
        self.shards: list[list[Piece]] = [[] for _ in range(num_shards)]
        self._pieces: dict[str, list[Piece]] = {}
        # per tensor: piece starts (tensor-local, for searchsorted) and shard bases
        self._cuts: dict[str, torch.Tensor] = {}
        g = 0
        for name in names:
            n = sizes[name]
            pieces: list[Piece] = []
            lo, hi = g, g + n
            # first shard whose range ends after lo (skips empty shards)
            s = bisect.bisect_right(self.bounds, lo) - 1
            while lo < hi:
                while self.bounds[s + 1] <= lo:  # empty shards are skipped
                    s += 1
                stop = min(hi, self.bounds[s + 1])
                p = Piece(name, lo - g, stop - g, s, lo - self.bounds[s])
                pieces.append(p)
                self.shards[s].append(p)
                lo = stop
            self._pieces[name] = pieces
            if len(pieces) > 1:
                self._cuts[name] = torch.tensor([p.start for p in pieces[1:]], dtype=torch.int64)
            g = hi

    # ------------------------------------------------------------------ queries
    def __repr__(self) -> str:
        return f"ShardPlan(tensors={len(self.names)}, total={self.total}, num_shards={self.num_shards})"

    def shard_size(self, shard: int) -> int:
        return self.bounds[shard + 1] - self.bounds[shard]

    def shard_sizes(self) -> list[int]:
        return [self.shard_size(s) for s in range(self.num_shards)]

    def nonempty_shards(self) -> list[int]:
        return [s for s in range(self.num_shards) if self.shard_size(s) > 0]

    def pieces_of(self, tensor: str) -> list[Piece]:
        try:
            return list(self._pieces[tensor])
        except KeyError:
            raise KeyError(f"tensor {tensor!r} is not in the manifest") from None

    def shards_of(self, tensor: str) -> list[int]:
        return [p.shard for p in self.pieces_of(tensor)]

    # ------------------------------------------------------------------ routing
    def split(
        self,
        name: str,
        indices: torch.Tensor,
        values: torch.Tensor,
        *,
        copy: bool = True,
        index_dtype: torch.dtype = torch.int64,
    ) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """Cut one sparse contribution to tensor `name` by owning shard.

        indices: flat indices into the tensor, sorted ascending (unsorted input
        is sorted first, values permuted alike, which costs a sort). Returns
        ``[(shard, local_indices, values), ...]`` in shard order, one entry per
        shard that receives at least one index; local indices (`index_dtype`,
        int64 by default; int32 halves the bytes shipped when a shard holds
        fewer than 2**31 elements) are positions in that shard's range. With ``copy=True`` (default) every
        returned tensor owns a compact storage that is not the caller's, so
        pickling a slice (as Ray does) ships only the slice, and the caller
        may reuse its buffers as soon as `split` returns.
        """
        try:
            pieces = self._pieces[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in the manifest") from None
        idx = indices.reshape(-1)
        val = values.reshape(-1)
        if idx.numel() != val.numel():
            raise ValueError(f"{name}: {idx.numel()} indices but {val.numel()} values")
        if idx.numel() == 0:
            return []
        if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"{name}: indices must be an integer tensor, got {idx.dtype}")
        if idx.device.type != "cpu":
            idx = idx.cpu()
        if val.device.type != "cpu":
            val = val.cpu()
        idx = idx.to(torch.int64)
        if idx.numel() > 1 and not bool((idx[1:] >= idx[:-1]).all()):
            order = torch.argsort(idx, stable=True)
            idx, val = idx[order], val[order]
        n = self.sizes[name]
        first, last = int(idx[0]), int(idx[-1])
        if first < 0 or last >= n:
            raise IndexError(f"{name}: index out of range [0, {n}): saw {first if first < 0 else last}")
        if len(pieces) == 1:
            p = pieces[0]
            li = idx + p.offset_in_shard if p.offset_in_shard else idx
            li = li.to(index_dtype)
            if copy:
                li, val = _fresh(li, indices), _fresh(val, values)
            return [(p.shard, li, val)]
        cuts = torch.searchsorted(idx, self._cuts[name]).tolist()
        edges = [0, *cuts, idx.numel()]
        out = []
        for p, a, b in zip(pieces, edges[:-1], edges[1:]):
            if a == b:
                continue
            li = (idx[a:b] + (p.offset_in_shard - p.start)).to(index_dtype)  # fresh tensor
            v = val[a:b]
            out.append((p.shard, li, _fresh(v, values) if copy else v))
        return out


def _fresh(t: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """`t` if it is a compact tensor of its own, else a compact copy: never a
    view of `source` (the caller's buffer) nor of a larger storage."""
    same = t.untyped_storage().data_ptr() == source.untyped_storage().data_ptr()
    compact = (t.storage_offset() == 0 and t.is_contiguous()
               and t.untyped_storage().nbytes() == t.numel() * t.element_size())
    if compact and not same:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def plan_shards(manifest: Sequence[tuple[str, int]], num_shards: int) -> ShardPlan:
    """Split the manifest's flat parameter space into `num_shards` balanced contiguous ranges."""
    return ShardPlan(manifest, num_shards)


def num_shards_for(
    cluster_resources: Mapping[str, float],
    total_elems: Optional[int] = None,
    *,
    min_elems_per_shard: int = DEFAULT_MIN_ELEMS_PER_SHARD,
    num_gpus_per_actor: float = 1.0,
    num_cpus_per_actor: float = 1.0,
    max_shards: Optional[int] = None,
) -> int:
    """Choose S from a `ray.cluster_resources()`-like dict.

    One shard per GPU (per `num_gpus_per_actor`) when the cluster has GPUs,
    else one per CPU (per `num_cpus_per_actor`); then capped so that no shard
    holds fewer than `min_elems_per_shard` parameters (when `total_elems` is
    given) and by `max_shards`. Always at least 1.
    """
    gpus = float(cluster_resources.get("GPU", 0) or 0)
    cpus = float(cluster_resources.get("CPU", 0) or 0)
    gpu_each = num_gpus_per_actor if num_gpus_per_actor > 0 else 1.0
    cpu_each = num_cpus_per_actor if num_cpus_per_actor > 0 else 1.0
    if gpus > 0 and gpus + 1e-9 >= gpu_each:
        s = int(gpus / gpu_each + 1e-9)
    else:
        s = int(cpus / cpu_each + 1e-9)
    s = max(1, s)
    if total_elems is not None:
        if min_elems_per_shard < 1:
            raise ValueError("min_elems_per_shard must be >= 1")
        s = min(s, max(1, int(total_elems) // min_elems_per_shard))
    if max_shards is not None:
        s = min(s, max(1, int(max_shards)))
    return s


ShardPlan.num_shards_for = staticmethod(num_shards_for)  # type: ignore[attr-defined]
