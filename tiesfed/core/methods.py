"""Merge-method registry: each method is a small class naming its trim and its
finalize. Every method runs on the same engine (trim → encode → fold →
finalize → apply); only these two knobs differ. Add a method by adding a class.
"""

from __future__ import annotations

from typing import ClassVar, Optional

from tiesfed.core.accumulators import FinalizeSpec
from tiesfed.core.options import MergeOptions
from tiesfed.core.trim import TrimSpec


class MergeMethod:
    name: ClassVar[str]

    def trim_spec(self, opts: MergeOptions, density: Optional[float] = None) -> TrimSpec:
        raise NotImplementedError

    def finalize_spec(self, opts: MergeOptions, weighted: bool) -> FinalizeSpec:
        raise NotImplementedError


def _fraction(opts: MergeOptions, density: Optional[float]) -> float:
    return density if density is not None else opts.k / 100.0


def _sparsified(opts: MergeOptions, density: Optional[float]) -> Optional[TrimSpec]:
    """The trim when the options name mergekit's sparsifier: it replaces the method's own."""
    sp = opts.sparsifier_spec()
    if sp is None:
        return None
    return TrimSpec(kind="sparsify", fraction=_fraction(opts, density), scope="tensor", seed=opts.seed,
                    sparsifier=sp)


class Ties(MergeMethod):
    """Trim to top-k, elect signs, disjoint merge (Yadav et al. 2023)."""

    name = "ties"

    def trim_spec(self, opts: MergeOptions, density: Optional[float] = None) -> TrimSpec:
        return _sparsified(opts, density) or TrimSpec(kind="topk", fraction=_fraction(opts, density),
                                                      scope=opts.trim, seed=opts.seed)

    def finalize_spec(self, opts: MergeOptions, weighted: bool) -> FinalizeSpec:
        return FinalizeSpec(
            combine="disjoint",
            election=opts.election,
            zero_sign=opts.zero_sign,
            disjoint=opts.disjoint,
            weighted=weighted,
            weight_semantics=opts.weight_semantics,
            min_support=opts.min_support,
        )


class DareTies(Ties):
    """DARE's random drop with rescale (Yu et al. 2023), then TIES election and merge."""

    name = "dare_ties"

    def trim_spec(self, opts: MergeOptions, density: Optional[float] = None) -> TrimSpec:
        return TrimSpec(kind="dare", fraction=_fraction(opts, density), seed=opts.seed)


class TaskArithmetic(MergeMethod):
    """τ_m = Σ w_t τ_t (Ilharco et al. 2023): TIES with k = 100 and no election."""

    name = "task_arithmetic"

    def trim_spec(self, opts: MergeOptions, density: Optional[float] = None) -> TrimSpec:
        return _sparsified(opts, density) or TrimSpec(kind="none", fraction=1.0)

    def finalize_spec(self, opts: MergeOptions, weighted: bool) -> FinalizeSpec:
        return FinalizeSpec(combine="sum", weighted=weighted)


class Average(TaskArithmetic):
    """Weighted average of the models: τ_m = Σ w_t τ_t / Σ w_t."""

    name = "average"

    def finalize_spec(self, opts: MergeOptions, weighted: bool) -> FinalizeSpec:
        return FinalizeSpec(combine="average", weighted=weighted)


class DareLinear(TaskArithmetic):
    """DARE's random drop with rescale, then τ_m = Σ w_t τ̂_t (mergekit's `dare_linear`)."""

    name = "dare_linear"

    def trim_spec(self, opts: MergeOptions, density: Optional[float] = None) -> TrimSpec:
        return TrimSpec(kind="dare", fraction=_fraction(opts, density), seed=opts.seed)


METHODS: dict[str, MergeMethod] = {m.name: m() for m in (Ties, DareTies, TaskArithmetic, Average, DareLinear)}


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; known: {', '.join(sorted(METHODS))}") from None
