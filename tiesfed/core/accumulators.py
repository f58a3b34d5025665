"""The accumulator algebra of TIES (see DESIGN.md): pure functions over tensors.

For every parameter the merge needs only per-sign sums and counts, so each
contribution is folded in the moment it arrives, folding is order-free and
invertible, and shards combine by addition. No I/O, no Ray, no gRPC here: the
local engine, the federated coordinator and the Ray shard actors all call
these same functions, which is what makes their results bit-identical.

Sums are float64 by default. A sum of float32 values in float64 is exact as
long as the values of one parameter span fewer than ~29 binary orders of
magnitude (true for honest trimmed task vectors in practice); then the result
does not depend on the arrival order and `unfold` is the exact inverse of
`fold`. Nothing stops a hostile input from breaking that, so `fold` checks
every sum it makes (Fast2Sum: with |a| >= |b|, fl(a + b) - a is exact, and the
sum was exact iff it equals b) and clears `Accumulator.exact` for good once
one was not. A caller that needs order-free results (withdrawing a
contribution, finalizing) rebuilds such an accumulator in a fixed order.
Counts are int32: no overflow below 2**31 contributors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

Combine = Literal["disjoint", "sum", "average"]


@dataclass(frozen=True)
class FinalizeSpec:
    """How accumulators turn into the merged task vector.

    combine: "disjoint" is TIES (elect a sign, merge the agreeing values);
    "sum" is task arithmetic; "average" divides the plain sum by the total weight.
    """

    combine: Combine = "disjoint"
    election: Literal["mass", "count"] = "mass"
    zero_sign: Literal["majority", "positive"] = "majority"
    disjoint: Literal["mean", "sum", "max"] = "mean"
    weighted: bool = False
    weight_semantics: Literal["mergekit", "peft"] = "mergekit"
    min_support: int = 1
    sum_dtype: torch.dtype = torch.float64

    @property
    def needs_counts(self) -> bool:
        return self.combine == "disjoint"

    @property
    def needs_weight_sums(self) -> bool:
        """mergekit divides by the sum of the agreeing models' weights."""
        return (
            self.combine == "disjoint"
            and self.weighted
            and self.weight_semantics == "mergekit"
            and self.disjoint == "mean"
        )

    @property
    def needs_unweighted_sum(self) -> bool:
        """peft elects on the unweighted trimmed values, then weights them."""
        return (
            self.combine == "disjoint"
            and self.weighted
            and self.weight_semantics == "peft"
            and self.election == "mass"
        )

    @property
    def needs_extrema(self) -> bool:
        return self.combine == "disjoint" and self.disjoint == "max"

    @property
    def invertible(self) -> bool:
        """Max/min cannot be un-folded; such rounds rebuild from the spool instead."""
        return not self.needs_extrema

    def bytes_per_param(self) -> int:
        s = torch.empty((), dtype=self.sum_dtype).element_size()
        n = 2 * s
        n += 8 if self.needs_counts else 0
        n += 2 * s if self.needs_weight_sums else 0
        n += s if self.needs_unweighted_sum else 0
        n += 2 * s if self.needs_extrema else 0
        return n


@dataclass
class Accumulator:
    """Per-parameter state of one flat parameter range, plus round-wide scalars."""

    s_pos: torch.Tensor
    s_neg: torch.Tensor
    c_pos: Optional[torch.Tensor] = None
    c_neg: Optional[torch.Tensor] = None
    w_pos: Optional[torch.Tensor] = None
    w_neg: Optional[torch.Tensor] = None
    e_sum: Optional[torch.Tensor] = None
    m_pos: Optional[torch.Tensor] = None
    m_neg: Optional[torch.Tensor] = None
    contributions: int = 0
    weight_total: float = 0.0
    #: every float sum folded so far was exact (so unfold is an exact inverse and
    #: the state does not depend on fold order); sticky once False
    exact: bool = True

    @property
    def numel(self) -> int:
        return self.s_pos.numel()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.__dict__.items() if isinstance(v, torch.Tensor)}

    def to(self, device: torch.device | str) -> "Accumulator":
        fields = {k: v.to(device) for k, v in self.tensors().items()}
        return Accumulator(**fields, contributions=self.contributions, weight_total=self.weight_total, exact=self.exact)


def new_accumulator(
    numel: int, spec: FinalizeSpec, device: torch.device | str = "cpu", *, track_exact: bool = True
) -> Accumulator:
    """Zeroed state for `numel` parameters. `track_exact=False` skips the exact-sum
    check in `fold` (`exact` stays False): for a caller that always folds in one
    fixed order, such as the local engine, the check buys nothing."""

    def z(dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(numel, dtype=dtype, device=device)

    sd = spec.sum_dtype
    return Accumulator(
        s_pos=z(sd),
        s_neg=z(sd),
        c_pos=z(torch.int32) if spec.needs_counts else None,
        c_neg=z(torch.int32) if spec.needs_counts else None,
        w_pos=z(sd) if spec.needs_weight_sums else None,
        w_neg=z(sd) if spec.needs_weight_sums else None,
        e_sum=z(sd) if spec.needs_unweighted_sum else None,
        m_pos=z(sd) if spec.needs_extrema else None,
        m_neg=z(sd) if spec.needs_extrema else None,
        exact=track_exact,
    )


def _add_checked(dst: torch.Tensor, idx: torch.Tensor, v: torch.Tensor, check: bool) -> bool:
    """dst[idx] += v for unique `idx`; with `check`, whether every sum was exact.

    Gather, add and scatter give the same bits as `index_add_` (one addition
    per element); the check is Fast2Sum's: the larger operand subtracted from
    the rounded sum is exact, and the sum lost nothing iff that equals the
    smaller operand.
    """
    if not check:
        dst.index_add_(0, idx, v)
        return True
    old = dst.index_select(0, idx)
    new = old + v
    dst.index_copy_(0, idx, new)
    old_larger = old.abs() >= v.abs()
    big = torch.where(old_larger, old, v)
    small = torch.where(old_larger, v, old)
    return bool(torch.equal(new - big, small))


def fold(
    acc: Accumulator,
    indices: torch.Tensor,
    values: torch.Tensor,
    weight: float = 1.0,
    *,
    direction: int = 1,
) -> None:
    """Add one contribution (sorted unique flat indices, nonzero values) in place.

    direction=-1 removes it again (`unfold`). Zero values are ignored, as in the
    paper, where only nonzero trimmed entries vote and count.
    """
    if direction not in (1, -1):
        raise ValueError("direction must be +1 or -1")
    if direction == -1 and acc.m_pos is not None:
        raise ValueError("disjoint max is not invertible: rebuild the accumulator instead")
    dev = acc.s_pos.device
    idx = indices.to(dev, torch.int64)
    raw = values.to(dev, acc.s_pos.dtype)
    val = raw * weight if weight != 1.0 else raw
    if direction == -1:
        val = -val
    # Split by the contribution's own sign without compacting: the other sign adds
    # +0.0, which leaves a sum's bits alone (no sum here is ever -0.0), and is far
    # cheaper than boolean indexing.
    # A negative weight (mergekit allows them) flips the value's sign before the vote:
    # the weighted value is what votes, counts and sums, as in mergekit.
    pos, neg = (raw > 0, raw < 0) if weight >= 0 else (raw < 0, raw > 0)
    zero = torch.zeros((), dtype=val.dtype, device=dev)
    check = acc.exact
    exact = _add_checked(acc.s_pos, idx, torch.where(pos, val, zero), check)
    exact &= _add_checked(acc.s_neg, idx, torch.where(neg, val, zero), check)
    if acc.c_pos is not None:
        acc.c_pos.index_add_(0, idx, pos.to(torch.int32), alpha=direction)
        acc.c_neg.index_add_(0, idx, neg.to(torch.int32), alpha=direction)
    if acc.w_pos is not None:
        w = torch.tensor(float(direction * weight), dtype=val.dtype, device=dev)
        exact &= _add_checked(acc.w_pos, idx, torch.where(pos, w, zero), check)
        exact &= _add_checked(acc.w_neg, idx, torch.where(neg, w, zero), check)
    if acc.e_sum is not None:
        exact &= _add_checked(acc.e_sum, idx, raw if direction == 1 else -raw, check)
    if acc.m_pos is not None:
        acc.m_pos.scatter_reduce_(0, idx, torch.where(pos, val, zero), reduce="amax")
        acc.m_neg.scatter_reduce_(0, idx, torch.where(neg, val, zero), reduce="amin")
    acc.exact = check and exact
    acc.contributions += direction
    acc.weight_total += direction * weight


def unfold(acc: Accumulator, indices: torch.Tensor, values: torch.Tensor, weight: float = 1.0) -> None:
    """Exact inverse of `fold`: withdraw a contribution before the round closes."""
    fold(acc, indices, values, weight, direction=-1)


def combine(a: Accumulator, b: Accumulator) -> Accumulator:
    """Merge two accumulators of the same range (partial folds of disjoint client sets)."""
    out: dict[str, torch.Tensor] = {}
    exact = a.exact and b.exact
    for name, ta in a.tensors().items():
        tb = getattr(b, name)
        if tb is None:
            raise ValueError(f"accumulators disagree on field {name}")
        tb = tb.to(ta.device)
        if name == "m_pos":
            out[name] = torch.maximum(ta, tb)
        elif name == "m_neg":
            out[name] = torch.minimum(ta, tb)
        else:
            out[name] = ta.clone()
            if ta.is_floating_point():
                exact &= _add_checked(out[name], torch.arange(ta.numel(), device=ta.device), tb, exact)
            else:
                out[name] += tb
    return Accumulator(
        **out,
        contributions=a.contributions + b.contributions,
        weight_total=a.weight_total + b.weight_total,
        exact=exact,
    )


def elect(acc: Accumulator, spec: FinalizeSpec) -> torch.Tensor:
    """Raw elected sign per parameter (int8), 0 where the vote is tied."""
    if spec.election == "count":
        score = acc.c_pos.to(torch.int64) - acc.c_neg.to(torch.int64)
    elif acc.e_sum is not None:
        score = acc.e_sum
    else:
        score = acc.s_pos + acc.s_neg
    return torch.sign(score).to(torch.int8)


def sign_balance(gamma: torch.Tensor) -> int:
    """Σ_p γ_p for this range: the one number shards all-reduce for the majority rule."""
    return int(gamma.to(torch.int64).sum().item())


def range_balance(acc: Accumulator, spec: FinalizeSpec) -> int:
    """`sign_balance(elect(acc, spec))` without the int8 sign tensor in the common case
    (mass vote on the sums): positives minus negatives of S⁺ + S⁻, the same integer."""
    if spec.election == "count" or acc.e_sum is not None:
        return sign_balance(elect(acc, spec))
    score = acc.s_pos + acc.s_neg
    return int(torch.count_nonzero(score > 0)) - int(torch.count_nonzero(score < 0))


def majority_sign(balance: int) -> int:
    """The paper's rule for γ = 0: the sign of Σ_p γ_p over the whole model."""
    return (balance > 0) - (balance < 0)


def resolve_sign(gamma: torch.Tensor, spec: FinalizeSpec, majority: int) -> torch.Tensor:
    """Apply the zero-sign rule: `majority` (paper) or `positive` (mergekit/peft)."""
    fill = 1 if spec.zero_sign == "positive" else majority
    return torch.where(gamma == 0, torch.full_like(gamma, fill), gamma)


def tie_mask(acc: Accumulator, gamma: torch.Tensor) -> torch.Tensor:
    """Where the zero-sign rule decides something: tied vote, yet some model spoke."""
    return (gamma == 0) & ((acc.c_pos > 0) | (acc.c_neg > 0))


def finalize(acc: Accumulator, spec: FinalizeSpec, majority: int = 1, gamma: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The merged task vector of this range, float32.

    `majority` is the model-wide majority sign (from `sign_balance` summed over
    every range); it only matters where the vote is tied and zero_sign is
    "majority". A final sign of 0 (a perfectly balanced model) merges to 0.
    `gamma`: `elect(acc, spec)`, when the caller has it already.
    """
    if spec.combine == "sum":
        return (acc.s_pos + acc.s_neg).to(torch.float32)
    if spec.combine == "average":
        # mergekit's rule: a total weight of (nearly) zero divides by 1
        total = acc.weight_total if acc.weight_total > 0 or abs(acc.weight_total) >= 1e-8 else 1.0
        summed = acc.s_pos + acc.s_neg  # divided by a tensor: CUDA turns `/ scalar` into `* (1/scalar)`
        return (summed / torch.tensor(total, dtype=summed.dtype, device=summed.device)).to(torch.float32)

    fill = 1 if spec.zero_sign == "positive" else majority
    if (gamma is None and fill != 0 and spec.election == "mass" and acc.e_sum is None and acc.w_pos is None
            and spec.disjoint == "mean" and spec.min_support <= 1):
        # the common case in fewest passes: the resolved sign is positive where the mass is,
        # or where it is 0 and the zero-sign rule fills +1 (the same bits as below)
        score = acc.s_pos + acc.s_neg
        pos = score >= 0 if fill > 0 else score > 0
        del score
        merged = torch.where(pos, acc.s_pos, acc.s_neg) / torch.where(pos, acc.c_pos, acc.c_neg).clamp_min(1)
        return merged.to(torch.float32)
    gamma = resolve_sign(elect(acc, spec) if gamma is None else gamma, spec, majority)
    pos = gamma > 0
    if spec.disjoint == "mean" and acc.w_pos is None:
        # the common case in few passes: a count is 0 only where its sum is +0.0
        merged = torch.where(pos, acc.s_pos, acc.s_neg) / torch.where(pos, acc.c_pos, acc.c_neg).clamp_min(1)
        if spec.zero_sign == "majority" and majority == 0:
            merged = torch.where(gamma != 0, merged, torch.zeros_like(merged))
    else:
        merged = _disjoint(acc, spec, pos, gamma < 0)
    if spec.min_support > 1:
        neg = gamma < 0
        support = torch.where(pos, acc.c_pos, torch.where(neg, acc.c_neg, torch.zeros_like(acc.c_pos)))
        merged = torch.where(support >= spec.min_support, merged, torch.zeros_like(merged))
    return merged.to(torch.float32)


def _disjoint(acc: Accumulator, spec: FinalizeSpec, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Max, sum, and the weighted mean of the values that agree with the sign."""
    if spec.disjoint == "max":
        return torch.where(pos, acc.m_pos, torch.where(neg, acc.m_neg, torch.zeros_like(acc.m_pos)))
    merged = torch.where(pos, acc.s_pos, torch.where(neg, acc.s_neg, torch.zeros_like(acc.s_pos)))
    if spec.disjoint == "mean":
        if acc.w_pos is not None:
            divisor = torch.where(pos, acc.w_pos, acc.w_neg)
        else:
            divisor = torch.where(pos, acc.c_pos, acc.c_neg).to(merged.dtype)
        if acc.w_pos is not None:
            # mergekit's rule, also for negative weights: an agreeing weight sum of 0 divides by 1
            # (with positive weights it is 0 only where nothing agrees, and the sum is 0 there)
            merged = merged / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
        else:
            merged = merged / divisor.clamp_min(torch.finfo(merged.dtype).tiny)
            merged = torch.where(divisor > 0, merged, torch.zeros_like(merged))
    return merged


def conflict_counts(gamma: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> tuple[int, int, int]:
    """For one model's trimmed values against raw elected signs:
    (disagreements where the vote was decided, positives at ties, negatives at ties).
    The caller resolves the tie counts once the model-wide majority is known."""
    g = gamma[indices.to(gamma.device)].to(torch.int8)
    s = torch.sign(values.to(gamma.device)).to(torch.int8)
    # one bincount over (elected sign, own sign) pairs: 3·g + s + 4 in 0..8
    n = torch.bincount((g * 3 + s).to(torch.int32) + 4, minlength=9).tolist()
    return n[2] + n[6], n[4 + 1], n[4 - 1]
