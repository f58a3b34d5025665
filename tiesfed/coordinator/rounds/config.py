"""A round's configuration (YAML or OpenRound) and the limits derived from it."""

from __future__ import annotations

import math
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tiesfed.coordinator.rounds.events import RoundError
from tiesfed.coordinator.spool import check_id
from tiesfed.core.options import MergeOptions
from tiesfed.core.trim import TrimSpec

LatePolicy = Literal["reject", "accept"]
ReplacePolicy = Literal["replace", "refuse"]


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

    name: str
    shape: tuple[int, ...]
    dtype: str = "F32"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class RoundConfig(BaseModel):
    """One round, as given in the coordinator's YAML or by OpenRound."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    round_id: str
    options: MergeOptions = MergeOptions()
    participants: list[ParticipantConfig] = Field(min_length=1)
    quorum: Optional[int] = Field(None, ge=1, description="default: every participant")
    deadline_unix: Optional[float] = Field(None, description="absolute deadline, seconds since the epoch")
    deadline_s: Optional[float] = Field(None, gt=0, description="deadline relative to when the round opens")
    late_policy: LatePolicy = "reject"
    replace_policy: ReplacePolicy = "replace"
    base_fingerprint: Optional[str] = None
    manifest: Optional[list[TensorEntry]] = None

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

    @model_validator(mode="after")
    def _consistent(self) -> "RoundConfig":
        ids = [p.client_id for p in self.participants]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"participants listed twice: {', '.join(dup)}")
        if self.quorum is not None and self.quorum > len(ids):
            raise ValueError(f"quorum {self.quorum} exceeds the {len(ids)} participants")
        if self.manifest is not None:
            names = [t.name for t in self.manifest]
            if len(set(names)) != len(names):
                raise ValueError("manifest lists a tensor twice")
        return self

    def resolved(self, now: float, fingerprint: Optional[str], manifest: Optional[list[TensorEntry]]) -> "RoundConfig":
        """Fill what the coordinator supplies at open: deadline, quorum, base fingerprint, manifest."""
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
        return out


def nnz_budget(trim: TrimSpec, total: int) -> int:
    """Most nonzeros a contribution of `total` parameters may carry under `trim`.

    top-k keeps int(D·f) (plus threshold ties: 1% and 1024 of slack); DARE keeps
    a Binomial(D, f) count (1% + 6 standard deviations + 1024); no trim: all.
    """
    if trim.kind == "none" or trim.fraction >= 1:
        return total
    if trim.kind == "topk":
        return min(total, int(int(total * trim.fraction) * 1.01) + 1024)
    mean = total * trim.fraction
    sd = math.sqrt(total * trim.fraction * (1 - trim.fraction))
    return min(total, int(mean * 1.01 + 6 * sd) + 1024)


def exact_weight(w: float) -> bool:
    """Weights of at most 8 significant bits keep the float64 accumulator sums exact."""
    m, _ = math.frexp(w)
    return (m * 256).is_integer()
