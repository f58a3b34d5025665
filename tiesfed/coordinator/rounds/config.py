"""A round's configuration (YAML or OpenRound) and the limits derived from it."""

from __future__ import annotations

import math
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from tiesfed.coordinator.rounds.events import RoundError
from tiesfed.coordinator.secure.settings import SecureSettings, check_secure
from tiesfed.coordinator.spool import check_id
from tiesfed.core.methods import get_method
from tiesfed.core.options import MergeOptions
from tiesfed.core.trim import TrimSpec, keep_count

#: The default bound on |uploaded value|: far above any real task-vector entry.
DEFAULT_MAX_ABS_VALUE = 1e6
#: Largest finite value of each safetensors float dtype.
FLOAT_MAX = {"F16": 65504.0, "BF16": 3.3895313892515355e38, "F32": 3.4028234663852886e38,
             "F64": 1.7976931348623157e308}

LatePolicy = Literal["reject", "accept"]
ReplacePolicy = Literal["replace", "refuse"]

# Limits checked before a round allocates anything or writes a file (OpenRound is
# admin-only, but a typo must not take the coordinator's memory or its spool).
#: Default most parameters a round may merge (its accumulators take 16-40 bytes each);
#: the coordinator setting max_round_params overrides it.
DEFAULT_MAX_ROUND_PARAMS = 1 << 36
#: Most participants of one round.
MAX_PARTICIPANTS = 10_000
#: Most tensors in a round's manifest, their longest name, and most dimensions.
MAX_TENSORS = 1_000_000
MAX_TENSOR_NAME = 1024
MAX_DIMS = 16
#: The dtypes a manifest may name: the float ones merging applies to.
MERGEABLE_DTYPES = ("F64", "F32", "F16", "BF16")


class ParticipantConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    client_id: str
    weight: float = Field(1.0, gt=0)
    density: Optional[float] = Field(None, gt=0, le=1, description="fraction kept; overrides k")
    model_key: Optional[str] = Field(None, description="seeds DARE; default: the participant's index")

    @field_validator("client_id")
    @classmethod
    def _id(cls, v: str) -> str:
        return check_id("client id", v)

    @field_validator("weight")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("weight must be finite")
        return v


class TensorEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=MAX_TENSOR_NAME)
    shape: tuple[int, ...] = Field(max_length=MAX_DIMS)
    dtype: str = "F32"

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        """Every dimension at least 1: a zero-size tensor has nothing to merge, a negative one
        would size the accumulators (and the round file) wrong."""
        bad = [d for d in v if d < 1]
        if bad:
            raise ValueError(f"dimensions must be positive, got {list(v)}")
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in MERGEABLE_DTYPES:
            raise ValueError(f"dtype {v!r} is not a mergeable float dtype ({', '.join(MERGEABLE_DTYPES)})")
        return v

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class RoundConfig(BaseModel):
    """One round, as given in the coordinator's YAML or by OpenRound."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    round_id: str
    options: MergeOptions = MergeOptions()
    participants: list[ParticipantConfig] = Field(min_length=1, max_length=MAX_PARTICIPANTS)
    quorum: Optional[int] = Field(None, ge=1, description="default: every participant")
    deadline_unix: Optional[float] = Field(None, allow_inf_nan=False,
                                           description="absolute deadline, seconds since the epoch")
    deadline_s: Optional[float] = Field(None, gt=0, allow_inf_nan=False,
                                        description="deadline relative to when the round opens")
    late_policy: LatePolicy = "reject"
    replace_policy: ReplacePolicy = "replace"
    base_fingerprint: Optional[str] = None
    manifest: Optional[list[TensorEntry]] = Field(None, max_length=MAX_TENSORS)
    max_abs_value: Optional[float] = Field(
        None, gt=0, description="largest |value| an upload may carry; default: the most that keeps "
        f"|λ|·(weights)·bound within half the range of the narrowest float dtype, at most {DEFAULT_MAX_ABS_VALUE:g}",
    )
    secure_aggregation: bool = Field(False, description="the coordinator learns only the sums (issue 13; "
                                     "docs/secure-aggregation.md): clients follow the round spec")
    secagg: Optional[SecureSettings] = Field(None, description="a secure round's public parameters")

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, data: object) -> object:
        """Participants may be given as bare ids; each gets its index as DARE model key."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        parts = []
        for i, p in enumerate(data.get("participants") or []):
            if isinstance(p, str):
                p = {"client_id": p}
            elif isinstance(p, ParticipantConfig):
                p = p.model_dump()
            else:
                p = dict(p)
            if p.get("model_key") is None:
                p["model_key"] = str(i)
            parts.append(p)
        data["participants"] = parts
        return data

    @field_validator("round_id")
    @classmethod
    def _rid(cls, v: str) -> str:
        return check_id("round id", v)

    @field_validator("manifest")
    @classmethod
    def _manifest(cls, v: Optional[list[TensorEntry]], info: ValidationInfo) -> Optional[list[TensorEntry]]:
        """Names once each; at most the coordinator's max_round_params (a validation
        context key; the default otherwise) in total."""
        if v is None:
            return v
        names = [t.name for t in v]
        if len(set(names)) != len(names):
            seen: set[str] = set()
            dups = sorted({n for n in names if n in seen or seen.add(n)})
            raise ValueError(f"lists tensor(s) twice: {', '.join(map(repr, dups[:5]))}")
        check_size(v, (info.context or {}).get("max_round_params") or DEFAULT_MAX_ROUND_PARAMS)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "RoundConfig":
        ids = [p.client_id for p in self.participants]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"participants listed twice: {', '.join(dup)}")
        if self.quorum is not None and self.quorum > len(ids):
            raise ValueError(f"quorum {self.quorum} exceeds the {len(ids)} participants")
        check_secure(self)
        return self

    def resolved(
        self, now: float, fingerprint: Optional[str], manifest: Optional[list[TensorEntry]],
        max_params: int = DEFAULT_MAX_ROUND_PARAMS,
    ) -> "RoundConfig":
        """Fill what the coordinator supplies at open: deadline, quorum, base fingerprint, manifest;
        then check the manifest against the coordinator's `max_params`."""
        upd: dict = {}
        if self.deadline_unix is None and self.deadline_s is not None:
            upd["deadline_unix"] = now + self.deadline_s
        if self.quorum is None:
            upd["quorum"] = len(self.participants)
        if self.base_fingerprint is None:
            upd["base_fingerprint"] = fingerprint
        if self.manifest is None:
            upd["manifest"] = manifest
        out = self.model_copy(update=upd)
        if not out.base_fingerprint or out.manifest is None:
            raise RoundError(
                "INVALID_ARGUMENT",
                f"round {self.round_id!r} needs a base fingerprint and a tensor manifest: "
                "give them, or start the coordinator with --base",
            )
        if not out.manifest:
            raise RoundError("INVALID_ARGUMENT", f"round {self.round_id!r}: the manifest has no mergeable tensor")
        try:
            check_size(out.manifest, max_params)
        except ValueError as e:
            raise RoundError("INVALID_ARGUMENT", f"round {self.round_id!r}: manifest: {e}") from None
        return out.model_copy(update={"max_abs_value": value_bound(out)})


def value_bound(config: RoundConfig) -> float:
    """The round's bound on uploaded |values|, which keeps every merged parameter finite.

    |τ_m| is at most bound × G (G: the sum of the weights where the merge sums,
    else the largest weight, at least 1), so |θ| <= |θ₀| + |λ|·G·bound; the bound
    keeps |λ|·G·bound within half of the narrowest float dtype's range. An
    explicit `max_abs_value` above that is refused, naming the limit.
    """
    spec = get_method(config.options.method).finalize_spec(config.options, True)
    weights = [p.weight for p in config.participants]
    sums = spec.combine == "sum" or (spec.combine == "disjoint" and spec.disjoint == "sum")
    gain = max(1.0, sum(weights) if sums else max(weights)) * abs(config.options.lam)
    dtypes = {t.dtype for t in config.manifest or ()}
    narrowest = min((FLOAT_MAX[d] for d in dtypes if d in FLOAT_MAX), default=FLOAT_MAX["F32"])
    limit = narrowest / 2 / gain if gain > 0 else math.inf
    if config.max_abs_value is None:
        return min(DEFAULT_MAX_ABS_VALUE, limit)
    if config.max_abs_value > limit:
        raise RoundError(
            "INVALID_ARGUMENT",
            f"round {config.round_id!r}: max_abs_value {config.max_abs_value:g} could overflow the merged "
            f"model (|lambda| x weights = {gain:g}, narrowest dtype max {narrowest:g}): use at most {limit:.6g}",
        )
    return config.max_abs_value


def check_size(manifest: list[TensorEntry], max_params: int) -> None:
    """A round's parameters fit the coordinator's bound (ValueError naming it if not)."""
    total = sum(t.numel for t in manifest)
    if total > max_params:
        raise ValueError(
            f"{total:,} parameters exceed the coordinator's limit of {max_params:,} per round "
            "(coordinator setting max_round_params)"
        )


def nnz_budget(trim: TrimSpec, total: int) -> int:
    """Most nonzeros a contribution of `total` parameters may carry under `trim`.

    top-k keeps int(D·f), exactly: globally, that many values strictly above the
    declared threshold (ties at it are kept besides, as the paper's trim keeps
    them; the nonzeros stay within D); per tensor, int(n·f) of each tensor's n,
    which sum to at most int(D·f). DARE keeps a Binomial(D, f) count (1% + 6
    standard deviations + 1024); no trim: all.
    """
    if trim.kind == "none" or trim.fraction >= 1:
        return total
    if trim.kind == "topk":
        return min(total, keep_count(total, trim.fraction))
    mean = total * trim.fraction
    sd = math.sqrt(total * trim.fraction * (1 - trim.fraction))
    return min(total, int(mean * 1.01 + 6 * sd) + 1024)


def exact_weight(w: float) -> bool:
    """Weights of at most 8 significant bits keep the float64 accumulator sums exact."""
    m, _ = math.frexp(w)
    return (m * 256).is_integer()
