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


def merge_tensor(
    name: str,
    theta0: torch.Tensor,
    parts: Sequence[Trimmed],
    weights: Sequence[float],
    reports: Sequence[ModelReport],
    spec: FinalizeSpec,
    lam: float,
) -> TensorResult:
    numel = theta0.numel()
    acc = new_accumulator(numel, spec, theta0.device, track_exact=False)
    for p, w in zip(parts, weights):
        fold(acc, p.indices, p.values, w)
    pending = Pending.gather(name, theta0, parts)
    if spec.combine != "disjoint":
        idx, val = dense_to_sparse(finalize(acc, spec))
        return TensorResult(apply_sparse(theta0, idx, val, lam), 0, None, pending)

    gamma = elect(acc, spec)
    held = pending.positions.to(theta0.device) if pending is not None else None
    for i, (p, report) in enumerate(zip(parts, reports)):
        c, pos, neg = conflict_counts(gamma, p.indices, p.values)
        if held is not None:  # the held positions are counted when they settle
            idx, val = pending.entries(i)
            c2, pos2, neg2 = conflict_counts(gamma, held[idx.to(held.device)], val)
            c, pos, neg = c - c2, pos - pos2, neg - neg2
        report.conflicts += c
        report.pos_at_ties += pos
        report.neg_at_ties += neg
    balance = sign_balance(gamma) - (sign_balance(gamma[held]) if held is not None else 0)
    idx, val = dense_to_sparse(finalize(acc, spec, majority=1, gamma=gamma))
    theta = apply_sparse(theta0, idx, val, lam)
    tie = None
    if spec.zero_sign == "majority":
        tied = flat_nonzero(tie_mask(acc, gamma))
        if held is not None and tied.numel():
            tied = tied[~member(tied, held)]
        if tied.numel():
            idx_n, val_n = dense_to_sparse(finalize(acc, spec, majority=-1, gamma=gamma))
            theta_n = apply_sparse(theta0, idx_n, val_n, lam)
            flat0 = theta0.reshape(-1)
            tie = Tie(name, tied.cpu(), theta_n.reshape(-1)[tied].cpu(), flat0[tied].cpu())
    return TensorResult(theta, balance, tie, pending)

