"""What a merge tells its user: per model, how much of its task vector the trim
kept and how often it disagreed with the elected signs."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional


@dataclass
class ModelReport:
    model: str
    weight: float
    density: float
    kept_norm_share: float
    nnz: int
    threshold: Optional[float] = None
    #: the contribution stream's size, when measured (`merge(measure_upload=True)`)
    upload_bytes: Optional[int] = None
    conflicts: int = 0
    pos_at_ties: int = 0
    neg_at_ties: int = 0

    @property
    def conflict_rate(self) -> float:
        return self.conflicts / self.nnz if self.nnz else 0.0

    def resolve_ties(self, fill_sign: int) -> None:
        """Count the votes cast at tied parameters once their sign is known."""
        if fill_sign > 0:
            self.conflicts += self.neg_at_ties
        elif fill_sign < 0:
            self.conflicts += self.pos_at_ties
        else:
            self.conflicts += self.pos_at_ties + self.neg_at_ties
        self.pos_at_ties = self.neg_at_ties = 0


@dataclass
class MergeReport:
    method: str
    options: dict
    params: int
    models: list[ModelReport] = field(default_factory=list)
    majority_sign: int = 1
    tied_params: int = 0
    wall_seconds: float = 0.0
    output: str = ""

    @property
    def upload_bits_per_param(self) -> Optional[float]:
        if not self.models or not self.params or any(m.upload_bytes is None for m in self.models):
            return None
        return 8 * sum(m.upload_bytes for m in self.models) / (len(self.models) * self.params)

    def to_json(self) -> dict:
        d = asdict(self)
        for m, md in zip(self.models, d["models"]):
            md["conflict_rate"] = m.conflict_rate
            md.pop("pos_at_ties"), md.pop("neg_at_ties")
        d["upload_bits_per_param"] = self.upload_bits_per_param
        return d

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    def format(self) -> str:
        rows = [("model", "weight", "kept", "‖τ̂‖/‖τ‖", "sign conflicts", "bits/param")]
        for m in self.models:
            rows.append(
                (
                    m.model,
                    f"{m.weight:g}",
                    f"{100 * m.density:.1f}%",
                    f"{100 * m.kept_norm_share:.1f}%",
                    f"{100 * m.conflict_rate:.1f}%",
                    f"{8 * m.upload_bytes / self.params:.2f}" if self.params and m.upload_bytes is not None else "-",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(
            f"method {self.method}, {self.params:,} merged parameters, majority sign {self.majority_sign:+d}, "
            f"{self.tied_params:,} tied votes, {self.wall_seconds:.1f} s -> {self.output}"
        )
        low = [m.model for m in self.models if m.kept_norm_share < 0.5 and m.density < 1]
        if low:
            lines.append(f"note: the trim kept under half the task-vector norm of {', '.join(low)}; consider a larger k")
        return "\n".join(lines)
