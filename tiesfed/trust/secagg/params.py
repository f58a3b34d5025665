"""The public parameters of one secure round, the same on every client and the coordinator."""

from __future__ import annotations

import json
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


def public_json(rnd: SecAggRound) -> str:
    """The round's public numbers as the coordinator announces them (GetSecureSpec); the spec
    and the weights are not in it: clients take them from the round spec's options and
    participants, as the plain round's clients do."""
    f = rnd.fixed
    return json.dumps({"numel": rnd.numel, "threshold": rnd.threshold, "bound": f.bound,
                       "max_clients": f.max_clients, "frac_bits": f.frac_bits, "weight_bound": f.weight_bound,
                       "weight_frac_bits": f.weight_frac_bits, "min_release": rnd.min_release}, sort_keys=True)


def from_public_json(round_id: str, text: str, spec: FinalizeSpec, weights: Mapping[str, float]) -> SecAggRound:
    """The `SecAggRound` a client rebuilds from `public_json` (a malformed one is a SecAggError)."""
    try:
        p = json.loads(text)
        fixed = FixedPoint(bound=float(p["bound"]), max_clients=int(p["max_clients"]), frac_bits=int(p["frac_bits"]),
                           weight_bound=float(p["weight_bound"]), weight_frac_bits=int(p["weight_frac_bits"]))
        return SecAggRound(round_id, int(p["numel"]), int(p["threshold"]), fixed, spec, dict(weights),
                           int(p["min_release"]))
    except (ValueError, KeyError, TypeError) as e:
        raise SecAggError(f"round {round_id!r}: secure-aggregation parameters {text[:200]!r} are not valid: {e}") from None
