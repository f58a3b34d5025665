"""Span records: a tensor too large to hold at once travels as several records.

Each covers a contiguous flat span of its tensor (meta key ``span``); the
records of one tensor come back to back, in order, and cover it exactly once.
`SpanCover` checks that order as records arrive (the stream readers and the
coordinator use it); `join_spans` turns a tensor's span records into the one
whole-tensor `SparseTensor` they stand for (the same indices and values a
single record would carry).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .types import CodecError, SparseTensor, _ctx


class SpanCover:
    """Records in stream order: each tensor whole, or its spans back to back from
    element 0 to its end, one tensor at a time; with `unique`, no tensor twice."""

    def __init__(self, unique: bool = False) -> None:
        self.unique = unique
        self.seen: set[str] = set()  # tensors complete (kept with `unique` only)
        self.open: Optional[tuple[str, tuple[int, ...], int]] = None  # name, shape, next element

    def add(self, t: SparseTensor) -> bool:
        """Take the next record (CodecError naming what is wrong); whether it ends its tensor."""
        return self.add_meta(t.name, t.shape, t.numel, t.start, t.count)

    def add_meta(self, name: str, shape: Sequence[int], numel: int, start: int, count: Optional[int]) -> bool:
        c = _ctx(name)
        shape = tuple(shape)
        stop = numel if count is None else start + count
        if self.open is not None:
            oname, oshape, at = self.open
            if name != oname:
                raise CodecError(
                    f"{_ctx(oname)}its span records stop at element {at:,} of {_numel(oshape):,} and the next "
                    f"record is of tensor {name!r}: a tensor's records must cover it in order, back to back")
            if count is None:
                raise CodecError(f"{c}a whole-tensor record after span records of the same tensor")
            if shape != oshape:
                raise CodecError(f"{c}span records disagree on its shape ({list(oshape)} then {list(shape)})")
            if start < at:
                raise CodecError(f"{c}span [{start:,}, {stop:,}) overlaps elements already covered "
                                 f"(up to {at:,}): a duplicate or out-of-order record")
            if start > at:
                raise CodecError(f"{c}span [{start:,}, {stop:,}) leaves a gap: elements [{at:,}, {start:,}) "
                                 "are missing")
        else:
            if self.unique and name in self.seen:
                raise CodecError(f"{c}appears twice in the stream")
            if count is not None and start != 0:
                raise CodecError(f"{c}its first span record starts at element {start:,}, not 0 "
                                 "(a gap or an out-of-order record)")
        if stop >= numel:
            self.open = None
            if self.unique:
                self.seen.add(name)
            return True
        self.open = (name, shape, stop)
        return False

    def finish(self) -> None:
        """The stream ended: no tensor may be left half covered."""
        if self.open is not None:
            name, shape, at = self.open
            raise CodecError(f"{_ctx(name)}the stream ends inside the tensor: elements [{at:,}, {_numel(shape):,}) "
                             "are missing")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def join_spans(parts: Sequence[SparseTensor]) -> SparseTensor:
    """One tensor's records (a whole one, or its spans in order, as `SpanCover`
    checked them) as one whole-tensor `SparseTensor`."""
    if not parts:
        raise ValueError("join_spans: no records")
    first = parts[0]
    if len(parts) == 1 and first.count is None:
        return first
    cover = SpanCover()
    for p in parts[:-1]:
        if cover.add(p):
            raise CodecError(f"{_ctx(p.name)}records after the one that completes the tensor")
    if not cover.add(parts[-1]):
        cover.finish()
    dtypes = {p.values.dtype for p in parts}
    if len(dtypes) != 1:
        raise CodecError(f"{_ctx(first.name)}span records carry values of different dtypes {sorted(map(str, dtypes))}")
    idx = torch.cat([p.indices for p in parts])
    vals = torch.cat([p.values for p in parts])
    return SparseTensor(first.name, first.shape, idx, vals)
