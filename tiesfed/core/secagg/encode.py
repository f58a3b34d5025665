"""A client's contribution as ring lanes over the union support U.

`quantise` rounds the trimmed values to the round's fixed point (values that round to 0
are dropped: they would neither vote nor count, as in `fold`); `encode_lanes` lays the
quantised contribution out over U exactly as `fold` would split it by sign, so the ring
sums decode to the accumulator a float64 `fold` of the quantised values gives.
"""

from __future__ import annotations

import numpy as np
import torch

from tiesfed.core.secagg.ring import FixedPoint, RingError, RingLayout


def quantise(indices: torch.Tensor, values: torch.Tensor, fixed: FixedPoint) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted unique int64 indices, nonzero int64 q) with q = round(v·2^f).

    A value beyond the public bound, a non-finite one or bad indices are errors.
    """
    idx = indices.reshape(-1).to(torch.int64)
    v = values.reshape(-1).to(torch.float64)
    if idx.numel() != v.numel():
        raise RingError(f"{idx.numel()} indices but {v.numel()} values")
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise RingError("indices must be sorted and unique")
    if idx.numel() and int(idx[0]) < 0:
        raise RingError("indices must be non-negative")
    if not bool(torch.isfinite(v).all()):
        raise RingError("values must be finite")
    over = v.abs() > fixed.bound
    if bool(over.any()):
        raise RingError(f"{int(over.sum())} value(s) exceed the round's public bound |τ| ≤ {fixed.bound} "
                        f"(largest {float(v.abs().max())}); the round's bound must cover every value")
    q = torch.round(torch.ldexp(v, torch.tensor(fixed.frac_bits))).to(torch.int64)
    nz = q != 0
    return idx[nz], q[nz]


def dequantise(q: torch.Tensor, fixed: FixedPoint) -> torch.Tensor:
    """The float64 values the fixed-point integers stand for (exact)."""
    return torch.ldexp(q.to(torch.float64), torch.tensor(-fixed.frac_bits))


def quantise_weight(weight: float, layout: RingLayout) -> int:
    """The weight as an integer at 2^-weight_frac_bits (1 for an unweighted spec, which refuses others)."""
    fixed = layout.fixed
    if not layout.weighted:
        if weight != 1.0:
            raise RingError(f"weight {weight} given, but the round's spec is not weighted")
        return 1
    if not (abs(weight) <= fixed.weight_bound):
        raise RingError(f"weight {weight} is beyond the round's public bound |w| ≤ {fixed.weight_bound}")
    qw = round(weight * 2.0 ** fixed.weight_frac_bits)
    if qw == 0:
        raise RingError(f"weight {weight} rounds to 0 at {fixed.weight_frac_bits} fraction bits")
    return qw


def weight_value(qw: int, layout: RingLayout) -> float:
    """The float weight a quantised weight stands for (what a plain `fold` is handed)."""
    return float(qw) * 2.0 ** -layout.fixed.weight_frac_bits if layout.weighted else 1.0


def support_positions(indices: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Where each of the client's (sorted) indices sits in U; an index outside U is an error."""
    u = support.to(torch.int64)
    at = torch.searchsorted(u, indices)
    if indices.numel() and (int(at.max()) >= u.numel() or not bool(torch.equal(u[at], indices))):
        raise RingError("the contribution has positions outside the union support U")
    return at


def lane_values(q: torch.Tensor, qw: int, layout: RingLayout) -> torch.Tensor:
    """(nnz, width) int64: each survivor's entry in every lane, split by sign as `fold` splits it."""
    # a negative weight flips which sign a value votes for
    pos, neg = (q > 0, q < 0) if qw >= 0 else (q < 0, q > 0)
    zero = torch.zeros((), dtype=torch.int64)
    one = torch.ones((), dtype=torch.int64)
    wq = q * qw
    cb = layout.count_bits
    cols = []
    for lane in layout.lanes:
        if lane.name in ("pos", "neg"):
            sel = pos if lane.name == "pos" else neg
            x = torch.where(sel, wq, zero)
            if lane.counted:
                x = x * (1 << cb) + torch.where(sel, one, zero)
        elif lane.name in ("wpos", "wneg"):
            sel = pos if lane.name == "wpos" else neg
            x = torch.where(sel, torch.full_like(q, qw), zero)
        else:  # "raw"
            x = q
        cols.append(x)
    return torch.stack(cols, dim=1) if cols else torch.zeros((q.numel(), 0), dtype=torch.int64)


def encode_range(at: torch.Tensor, values: torch.Tensor, lo: int, hi: int, layout: RingLayout) -> np.ndarray:
    """The ring elements of U positions lo..hi (position-major: the lanes of one position are
    adjacent), from `support_positions` and `lane_values`; a chunk of the upload, or all of it."""
    a, b = (int(x) for x in torch.searchsorted(at, torch.tensor([lo, hi])))
    out = torch.zeros((hi - lo, layout.width), dtype=torch.int64)
    out[at[a:b] - lo] = values[a:b]
    return layout.to_ring(out.reshape(-1).numpy())


def encode_lanes(indices: torch.Tensor, q: torch.Tensor, qw: int, support: torch.Tensor,
                 layout: RingLayout) -> np.ndarray:
    """The client's whole ring vector over U: `layout.width` elements per position of U.

    `indices`/`q` come from `quantise`, `qw` from `quantise_weight`, `support` is U
    (sorted unique int64). Every index must lie in U.
    """
    at = support_positions(indices, support)
    return encode_range(at, lane_values(q, qw, layout), 0, support.numel(), layout)
