"""The public parameters of one secure round, the same on every client and the coordinator."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

from tiesfed.core.accumulators import FinalizeSpec
from tiesfed.core.secagg.ring import FixedPoint, RingLayout
from tiesfed.trust.certs import valid_id
from tiesfed.trust.secagg.keys import SecAggError


@dataclass(frozen=True)
class SecAggRound:
    """round_id; numel: the flat parameter space; threshold: t of Shamir and the fewest clients
    the round proceeds with; fixed: the fixed-point contract; spec: how the sums finalize;
    weights: each client's public weight (weighted specs; 1.0 when absent);
    min_release: the release rule, U holds only positions at least this many sharers' supports
    cover, so no masked sum is taken over a position fewer organisations touched (1: U is the union)."""

    round_id: str
    numel: int
    threshold: int
    fixed: FixedPoint
    spec: FinalizeSpec = FinalizeSpec()
    weights: Mapping[str, float] = field(default_factory=dict)
    min_release: int = 1

    def __post_init__(self) -> None:
        if not valid_id(self.round_id):
            raise SecAggError(f"round id {self.round_id!r} is not valid")
        if not (isinstance(self.numel, int) and self.numel >= 1):
            raise SecAggError(f"numel must be a positive integer, got {self.numel!r}")
        if not (isinstance(self.threshold, int) and 2 <= self.threshold <= self.fixed.max_clients):
            raise SecAggError(f"threshold must be in 2..max_clients ({self.fixed.max_clients}), "
                              f"got {self.threshold!r}")
        if not (isinstance(self.min_release, int) and 1 <= self.min_release <= self.threshold):
            raise SecAggError(f"min_release must be in 1..threshold ({self.threshold}), got {self.min_release!r}")
        self.layout  # noqa: B018  (refuses a spec or bound the ring cannot carry, up front)

    @property
    def layout(self) -> RingLayout:
        return RingLayout.of(self.spec, self.fixed)

    def weight(self, client_id: str) -> float:
        return float(self.weights.get(client_id, 1.0))

    def require(self, ids: Iterable[str], what: str) -> tuple[str, ...]:
        """`ids` sorted, refusing a round with fewer than t of them or more than max_clients."""
        out = tuple(sorted(ids))
        if len(out) < self.threshold:
            raise SecAggError(f"round {self.round_id!r}: only {len(out)} client(s) {what}, fewer than the "
                              f"threshold t = {self.threshold}; the round cannot complete (nothing is unmasked)")
        if len(out) > self.fixed.max_clients:
            raise SecAggError(f"round {self.round_id!r}: {len(out)} clients {what}, more than the ring's "
                              f"max_clients = {self.fixed.max_clients}")
        return out
