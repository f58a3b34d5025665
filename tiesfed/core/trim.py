"""TRIM: pure functions from a dense task-vector tensor to its sparse survivors.

A survivor set is (flat int64 indices, sorted and unique; float32 values, all
nonzero). Exact zeros never survive: in the paper they neither vote nor count.

Global trim finds the paper's threshold -- `kthvalue(|τ|, n - int(n·k))` over
every float parameter of the model -- without flattening the model: a radix
select over the bit patterns of |τ| (see `radix`), fed a tensor at a time.
Memory is two histograms (4 MiB) plus one tensor. The per-tensor top-k uses the
same select, which is faster than `kthvalue` and gives the same set.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from tiesfed.core import radix
from tiesfed.core.compact import flat_nonzero
from tiesfed.core.sparsify import Sparsifier

Survivors = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TrimSpec:
    """How one model's task vector is trimmed before upload.

    kind: "topk" keeps the largest magnitudes (scope "global" or "tensor"),
    "dare" drops at random with probability 1-fraction and rescales,
    "none" keeps every nonzero (task arithmetic, averaging), "sparsify" runs mergekit's
    `sparsifier` on each whole tensor at density `fraction` (random ones seeded by `seed`).
    """

    kind: Literal["topk", "dare", "none", "sparsify"] = "topk"
    fraction: float = 0.2
    scope: Literal["global", "tensor"] = "global"
    seed: int = 0
    sparsifier: Optional[Sparsifier] = None

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError(f"trim fraction must be in (0, 1], got {self.fraction}")
        if (self.kind == "sparsify") != (self.sparsifier is not None):
            raise ValueError("a sparsify trim names its sparsifier, and only it does")


def task_vector(base: torch.Tensor, finetuned: torch.Tensor) -> torch.Tensor:
    """τ = θ_t − θ_0, flat float32 (exact for fp16/bf16 inputs)."""
    return (finetuned.to(torch.float32) - base.to(torch.float32)).reshape(-1)


def survivors(tau: torch.Tensor, keep: torch.Tensor) -> Survivors:
    """Indices and values where `keep` holds and τ is nonzero."""
    flat = tau.reshape(-1)
    idx = flat_nonzero(keep.reshape(-1) & (flat != 0))
    return idx, flat.index_select(0, idx).to(torch.float32)


def keep_count(n: int, fraction: float) -> int:
    """How many to keep: int(n·k), the paper's, mergekit's and peft's rounding."""
    return int(n * fraction)


def trim_threshold(tau: torch.Tensor, threshold: float) -> Survivors:
    """Keep |τ| ≥ threshold (ties at the threshold kept, as the paper's code)."""
    flat = tau.reshape(-1)
    idx, _ = radix.at_least(radix.abs_bits(flat), radix.pattern(threshold) if threshold > 0 else 0)
    return idx, flat.index_select(0, idx).to(torch.float32)


def trim_tensor_exact(tau: torch.Tensor, fraction: float) -> Survivors:
    """Exactly int(k·n) largest |τ| of this tensor; among equal magnitudes at the
    boundary the lower flat index wins, so the result is deterministic."""
    flat = tau.reshape(-1)
    n = flat.numel()
    keep = keep_count(n, fraction)
    if keep >= n:
        return survivors(flat, torch.ones_like(flat, dtype=torch.bool))
    if keep <= 0:
        return survivors(flat, torch.zeros_like(flat, dtype=torch.bool))
    idx = radix.top_count(radix.abs_bits(flat), keep)
    return idx, flat.index_select(0, idx).to(torch.float32)


def dare_seed(seed: int, model_key: str, tensor_name: str) -> int:
    """Independent, reproducible random stream per (run seed, model, tensor)."""
    h = hashlib.blake2b(f"{seed}\0{model_key}\0{tensor_name}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def trim_dare(tau: torch.Tensor, fraction: float, seed: int) -> Survivors:
    """DARE: keep each entry with probability `fraction`, rescale by 1/fraction.
    The mask is drawn on the CPU so CPU and CUDA runs agree."""
    return trim_dare_block(tau, fraction, dare_generator(seed))


def dare_generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def trim_dare_block(tau: torch.Tensor, fraction: float, gen: torch.Generator) -> Survivors:
    """DARE on the next block of a tensor: `gen`'s stream continues from the previous
    block, and the CPU generator draws the same numbers in blocks as in one call.
    The divisor is a tensor on the values' device: CUDA divides by a Python scalar as a
    multiplication by its rounded reciprocal, which is not the CPU's correctly rounded quotient."""
    keep = torch.rand(tau.numel(), generator=gen) < fraction
    idx, val = survivors(tau, keep.to(tau.device))
    return idx, val / torch.tensor(fraction, dtype=val.dtype, device=val.device)


def trim_none(tau: torch.Tensor) -> Survivors:
    return survivors(tau, torch.ones_like(tau, dtype=torch.bool))


# --- exact global threshold: radix select over the whole model ------------------


class GlobalThreshold:
    """The paper's global threshold, fed one tensor at a time, twice.

    Usage: `add_coarse(τ)` for every tensor, then `add_fine(τ)` for every
    tensor (or only for the values inside `bucket`: the others are ignored),
    then `value`. `rank` is n - int(n·k): the threshold is the rank-th
    smallest |τ|; rank 0 (k = 100%) keeps everything.
    """

    def __init__(self, total: int, fraction: float) -> None:
        self.total = total
        self.rank = total - keep_count(total, fraction)
        self._coarse = torch.zeros(radix.COARSE_BINS, dtype=torch.int64)
        self._fine = torch.zeros(radix.FINE_BINS, dtype=torch.int64)
        self._bucket: Optional[int] = None
        self._rank_in_bucket = 0

    @property
    def trivial(self) -> bool:
        """True when no histogram is needed (everything is kept)."""
        return self.rank <= 0

    def add_coarse(self, tau: torch.Tensor) -> int:
        """Count this tensor; returns how many of its values are NaN or inf."""
        hist = radix.coarse_histogram(radix.abs_bits(tau))
        self._coarse += hist
        return radix.nonfinite(hist)

    def close_coarse(self) -> None:
        seen = int(self._coarse.sum().item())
        if seen != self.total:
            raise ValueError(f"global trim saw {seen} parameters, expected {self.total}")
        self._bucket, self._rank_in_bucket = radix.locate(self._coarse, self.rank)

    @property
    def bucket(self) -> int:
        """The coarse bucket (high 19 bits of |τ|) that holds the threshold."""
        if self._bucket is None:
            self.close_coarse()
        return self._bucket

    def add_fine(self, tau: torch.Tensor) -> None:
        self._fine += radix.fine_histogram(radix.abs_bits(tau), self.bucket)

    def add_fine_bits(self, members: torch.Tensor) -> None:
        """The |τ| patterns already known to lie inside `bucket` (a merge pass collects them)."""
        self._fine += radix.low_histogram(members)

    def add_zeros(self, count: int) -> None:
        """Zeros left out of `add_fine_bits` (they rank in bucket 0)."""
        self._fine[0] += count

    @property
    def value(self) -> float:
        if self.trivial:
            return 0.0
        if self._bucket is None:
            raise RuntimeError("GlobalThreshold: coarse pass not finished")
        low, _ = radix.locate(self._fine, self._rank_in_bucket)
        return radix.as_float(radix.join(self._bucket, low))
