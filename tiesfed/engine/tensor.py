"""Merge one tensor from every model's trimmed part: fold, elect, finalize, apply.

The same accumulator functions as the coordinator's, folded in model order, so
the bits equal a federated round's. Parameters whose outcome is not known yet
-- the global trim's candidates, and ties under the paper's majority rule --
are set aside as `Pending` / `Tie` records and settled after the pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from tiesfed.core.accumulators import (
    FinalizeSpec,
    conflict_counts,
    elect,
    finalize,
    fold,
    new_accumulator,
    sign_balance,
    tie_mask,
)
from tiesfed.core.apply import apply_sparse, dense_to_sparse
from tiesfed.core.compact import flat_nonzero
from tiesfed.engine.deferred import Pending, Tie, member
from tiesfed.engine.trimmer import Trimmed
from tiesfed.report import ModelReport


@dataclass
class TensorResult:
    """θ with a provisional majority of +1, and what waits for the whole model."""

    theta: torch.Tensor
    balance: int
    tie: Optional[Tie]
    pending: Optional[Pending]


#: elements folded and finalized at once: bounds the accumulators (24 bytes per
#: element with the default options) whatever the tensor's size
BLOCK = 1 << 22


def merge_tensor(
    name: str,
    theta0: torch.Tensor,
    parts: Sequence[Trimmed],
    weights: Sequence[float],
    reports: Sequence[ModelReport],
    spec: FinalizeSpec,
    lam: float,
    block: Optional[int] = None,
    offset: int = 0,
) -> TensorResult:
    """Merge one tensor, or the block of one that starts at element `offset`, `block`
    elements at a time (each part's indices are sorted, so a block's share of a part
    is a slice). Every operation is per element or a sum of counts, so the result
    does not depend on `block`. Ties and held positions come back as flat indices
    of the whole tensor."""
    block = block or BLOCK
    flat0 = theta0.reshape(-1)
    numel = flat0.numel()
    pending = Pending.gather(name, theta0, parts)
    held = pending.positions.to(flat0.device) if pending is not None else None
    gamma_held = torch.zeros(held.numel() if held is not None else 0, dtype=torch.int8, device=flat0.device)
    theta = torch.empty_like(flat0)
    balance = 0
    tied, if_negative = [], []
    for lo in range(0, max(numel, 1), block):
        hi = min(lo + block, numel)
        shares = [_share(p, lo, hi) for p in parts]
        acc = new_accumulator(hi - lo, spec, flat0.device, track_exact=False)
        for (idx, val), w in zip(shares, weights):
            fold(acc, idx, val, w)
        if spec.combine != "disjoint":
            theta[lo:hi] = apply_sparse(flat0[lo:hi], *dense_to_sparse(finalize(acc, spec)), lam)
            continue
        gamma = elect(acc, spec)
        for (idx, val), report in zip(shares, reports):
            _count_conflicts(report, gamma, idx, val, +1)
        balance += sign_balance(gamma)
        theta[lo:hi] = apply_sparse(flat0[lo:hi], *dense_to_sparse(finalize(acc, spec, 1, gamma)), lam)
        if held is not None:
            a, b = _span(held, lo, hi)
            gamma_held[a:b] = gamma[held[a:b] - lo]
        if spec.zero_sign == "majority":
            here = flat_nonzero(tie_mask(acc, gamma))
            if held is not None and here.numel():
                here = here[~member(here + lo, held)]
            if here.numel():
                theta_n = apply_sparse(flat0[lo:hi], *dense_to_sparse(finalize(acc, spec, -1, gamma)), lam)
                tied.append(here + lo)
                if_negative.append(theta_n[here])
    if held is not None:  # the held positions are counted when they settle
        balance -= sign_balance(gamma_held)
        for i, report in enumerate(reports):
            idx, val = pending.entries(i)
            _count_conflicts(report, gamma_held, idx.to(flat0.device), val, -1)
    tie = None
    if tied:
        at = torch.cat(tied)
        tie = Tie(name, at.cpu() + offset, torch.cat(if_negative).cpu(), flat0[at].cpu())
    if pending is not None:
        pending.positions += offset
    return TensorResult(theta.reshape(theta0.shape), balance, tie, pending)


def _span(sorted_idx: torch.Tensor, lo: int, hi: int) -> tuple[int, int]:
    """The slice of sorted flat indices that falls in [lo, hi)."""
    ends = torch.searchsorted(sorted_idx, torch.tensor([lo, hi], dtype=sorted_idx.dtype, device=sorted_idx.device))
    return int(ends[0]), int(ends[1])


def _share(part: Trimmed, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A part's survivors inside [lo, hi), indexed from lo."""
    a, b = _span(part.indices, lo, hi)
    return part.indices[a:b] - lo, part.values[a:b]


def _count_conflicts(report: ModelReport, gamma: torch.Tensor, idx: torch.Tensor, val: torch.Tensor,
                     sign: int) -> None:
    c, pos, neg = conflict_counts(gamma, idx, val)
    report.conflicts += sign * c
    report.pos_at_ties += sign * pos
    report.neg_at_ties += sign * neg
