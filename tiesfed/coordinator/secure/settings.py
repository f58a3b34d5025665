"""A secure round's public parameters, as a round's config states them (`secure_aggregation:
true` and `secagg: {...}`), and the `SecAggRound` every client and the coordinator derive
from them: the same numbers on both sides, so the same ring."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

from pydantic import BaseModel, ConfigDict, Field

from tiesfed.core.methods import get_method
from tiesfed.core.secagg.ring import FixedPoint, RingError, RingLayout

if TYPE_CHECKING:  # the round config imports this module
    from tiesfed.coordinator.rounds.config import RoundConfig
    from tiesfed.trust.secagg.params import SecAggRound


class SecureSettings(BaseModel):
    """The public parameters of a secure round (docs/secure-aggregation.md, "The arithmetic")."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # JSON in the spool: finite

    threshold: Optional[int] = Field(None, ge=2, description="t: Shamir's threshold and the fewest clients the "
                                     "round completes with; default: a majority of the participants (at least 2)")
    bound: float = Field(1.0, gt=0, description="public bound on every |τ| a client contributes (a larger value "
                         "is refused by its client before anything is sent)")
    frac_bits: int = Field(24, ge=0, le=52, description="values are rounded to multiples of 2^-frac_bits")
    max_clients: Optional[int] = Field(None, ge=1, description="most clients whose sums meet in the ring; "
                                       "default: the participants")
    min_release: int = Field(1, ge=1, description="the release rule: U keeps only positions at least this many "
                             "clients' supports cover (1: the union)")
    phase_s: float = Field(300.0, gt=0, description="a phase closes once everyone expected has sent, or this long "
                           "after it opened (the key phase: after the first advert), with whoever arrived; it "
                           "stays open while an expected client's stream delivered bytes within the last phase_s "
                           "and keeps up min_rate")
    min_rate: float = Field(float(1 << 20), gt=0, description="bytes a second a late client's stream must average "
                            "(after a grace of phase_s) to hold its phase open past phase_s: a stream that trickles "
                            "cannot hold the round")


def effective(config: "RoundConfig") -> SecureSettings:
    """The settings with their defaults resolved against the round's participants."""
    s = config.secagg or SecureSettings()
    n = len(config.participants)
    return s.model_copy(update={"threshold": s.threshold or max(2, n // 2 + 1), "max_clients": s.max_clients or n})


def fixed_point(config: "RoundConfig") -> FixedPoint:
    s = effective(config)
    assert s.max_clients is not None
    top = max(p.weight for p in config.participants)
    return FixedPoint(bound=s.bound, max_clients=s.max_clients, frac_bits=s.frac_bits,
                      weight_bound=float(2 ** math.ceil(math.log2(max(1.0, top)))))


def finalize_spec(config: "RoundConfig"):  # -> FinalizeSpec (the round's, as `RoundState.spec` builds it)
    opts = config.options
    return get_method(opts.method).finalize_spec(opts, any(p.weight != 1.0 for p in config.participants))


def check_secure(config: "RoundConfig") -> None:
    """ValueError (a config error naming why) if the round's secure parameters cannot carry it:
    a threshold above the participants, a spec whose merge is not a sum (disjoint max), a ring
    over 64 bits."""
    if not config.secure_aggregation:
        if config.secagg is not None:
            raise ValueError("secagg settings need secure_aggregation: true")
        return
    s = effective(config)
    n = len(config.participants)
    assert s.threshold is not None and s.max_clients is not None
    if n < 2:
        raise ValueError("a secure round needs at least 2 participants")
    if s.threshold > n or s.max_clients < n:
        raise ValueError(f"secagg: threshold {s.threshold} and max_clients {s.max_clients} must bracket the "
                         f"{n} participants (threshold <= {n} <= max_clients)")
    if s.min_release > s.threshold:
        raise ValueError(f"secagg: min_release {s.min_release} exceeds the threshold {s.threshold}")
    try:
        RingLayout.of(finalize_spec(config), fixed_point(config))
    except RingError as e:
        raise ValueError(f"secure aggregation cannot carry this round: {e}") from None


def secagg_round(config: "RoundConfig") -> "SecAggRound":
    """The protocol's `SecAggRound` of a resolved round config (manifest known)."""
    from tiesfed.trust.secagg.params import SecAggRound

    s = effective(config)
    assert config.manifest is not None and s.threshold is not None
    return SecAggRound(round_id=config.round_id, numel=sum(t.numel for t in config.manifest),
                       threshold=s.threshold, fixed=fixed_point(config), spec=finalize_spec(config),
                       weights={p.client_id: p.weight for p in config.participants}, min_release=s.min_release)
