"""What the merge pass cannot decide yet, on disk until the pass is over.

`Tie`: a parameter whose vote tied; under the paper's rule its sign is the
whole model's majority, known only at the end. `Pending`: the positions of one
tensor where some model has a global-trim candidate; they merge once every
model's threshold is exact. Each is a few parameters per tensor; both are
spilled to the work folder so a 70B model's stay off the heap, then settled
and patched into the written output (`ShardedWriter.patch`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from tiesfed.core.accumulators import (
    Accumulator,
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
from tiesfed.report import ModelReport

Entries = list[tuple[torch.Tensor, torch.Tensor]]


class Spilled:
    """A record that waits on disk, not in memory, until the pass is over."""

    def spill(self, path: Path) -> Path:
        torch.save(self.__dict__, path)
        return path

    @classmethod
    def load(cls, path: Path):
        return cls(**torch.load(path))


@dataclass
class Tie(Spilled):
    """Tied parameters of one tensor and the outputs each majority would give."""

    name: str
    indices: torch.Tensor
    if_negative: torch.Tensor
    if_zero: torch.Tensor


@dataclass
class Pending(Spilled):
    """Held positions of one tensor (sorted flat indices), their base values, and per
    model the survivors already known there and the candidates (local indices)."""

    name: str
    positions: torch.Tensor
    theta0: torch.Tensor
    known: Entries
    candidates: Entries

    @classmethod
    def gather(cls, name: str, theta0: torch.Tensor, parts: Sequence) -> "Pending | None":
        cands = [p.candidates for p in parts if p.candidates.numel()]
        if not cands:
            return None
        positions = torch.unique(torch.cat(cands))  # sorted
        known, candidates = [], []
        for p in parts:
            inside = member(p.indices, positions)
            known.append((torch.searchsorted(positions, p.indices[inside]), p.values[inside]))
            candidates.append((torch.searchsorted(positions, p.candidates), p.candidate_values))
        cpu = [(i.cpu(), v.cpu()) for i, v in known], [(i.cpu(), v.cpu()) for i, v in candidates]
        return cls(name, positions.cpu(), theta0.reshape(-1)[positions].cpu(), *cpu)

    def entries(self, model: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.known[model]

    def settle(self, trimmers: Sequence, weights: Sequence[float], reports: Sequence[ModelReport],
               spec: FinalizeSpec) -> tuple[int, int]:
        """Once the thresholds are exact: keep the candidates that reach them (merging
        them into `known`), count conflicts; returns (sign balance, tied params)."""
        settled: Entries = []
        for (idx, val), (cidx, cval), trimmer in zip(self.known, self.candidates, trimmers):
            kidx, kval = trimmer.settle(self.name, cidx, cval, self.theta0.dtype)
            settled.append((torch.cat([idx, kidx]), torch.cat([val, kval.to(val.dtype)])))
        self.known, self.candidates = settled, []
        acc = self.accumulate(weights, spec)
        if spec.combine != "disjoint":
            return 0, 0
        gamma = elect(acc, spec)
        for (idx, val), report in zip(self.known, reports):
            c, pos, neg = conflict_counts(gamma, idx, val)
            report.conflicts += c
            report.pos_at_ties += pos
            report.neg_at_ties += neg
        tied = int(torch.count_nonzero(tie_mask(acc, gamma))) if spec.zero_sign == "majority" else 0
        return sign_balance(gamma), tied

    def accumulate(self, weights: Sequence[float], spec: FinalizeSpec) -> Accumulator:
        acc = new_accumulator(self.positions.numel(), spec, track_exact=False)
        for (idx, val), w in zip(self.known, weights):
            fold(acc, idx, val, w)
        return acc

    def merged(self, weights: Sequence[float], spec: FinalizeSpec, majority: int, lam: float) -> torch.Tensor:
        """θ at the held positions, after `settle`, with the model's majority sign."""
        tau = finalize(self.accumulate(weights, spec), spec, majority=majority)
        return apply_sparse(self.theta0, *dense_to_sparse(tau), lam)


def member(values: torch.Tensor, sorted_set: torch.Tensor) -> torch.Tensor:
    """values ∈ sorted_set, elementwise."""
    if sorted_set.numel() == 0:
        return torch.zeros_like(values, dtype=torch.bool)
    at = torch.searchsorted(sorted_set, values).clamp_(max=sorted_set.numel() - 1)
    return sorted_set[at] == values
