"""TRIM: pure functions from a dense task-vector tensor to its sparse survivors.

A survivor set is (flat int64 indices, sorted and unique; float32 values, all
nonzero). Exact zeros never survive: in the paper they neither vote nor count.

Global trim finds the paper's threshold -- `kthvalue(|τ|, n - int(n·k))` over
every float parameter of the model -- without flattening the model: a two-pass
radix select over the bit patterns of |τ| (non-negative float32 order like
their int32 bits). Pass one histograms the high 16 bits of every tensor, pass
two the low 16 bits inside the one bucket that holds the kth value. Memory is
two 65,536-bin histograms plus one tensor.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal, Optional

import torch

BINS = 1 << 16

Survivors = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TrimSpec:
    """How one model's task vector is trimmed before upload.

    kind: "topk" keeps the largest magnitudes (scope "global" or "tensor"),
    "dare" drops at random with probability 1-fraction and rescales,
    "none" keeps every nonzero (task arithmetic, averaging).
    """

    kind: Literal["topk", "dare", "none"] = "topk"
    fraction: float = 0.2
    scope: Literal["global", "tensor"] = "global"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError(f"trim fraction must be in (0, 1], got {self.fraction}")


def task_vector(base: torch.Tensor, finetuned: torch.Tensor) -> torch.Tensor:
    """τ = θ_t − θ_0, flat float32 (exact for fp16/bf16 inputs)."""
    return (finetuned.to(torch.float32) - base.to(torch.float32)).reshape(-1)


def survivors(tau: torch.Tensor, keep: torch.Tensor) -> Survivors:
    """Indices and values where `keep` holds and τ is nonzero."""
    mask = keep & (tau != 0)
    idx = torch.nonzero(mask, as_tuple=False).reshape(-1)
    return idx, tau[idx].to(torch.float32)


def keep_count(n: int, fraction: float) -> int:
    """How many to keep: int(n·k), the paper's, mergekit's and peft's rounding."""
    return int(n * fraction)


def trim_threshold(tau: torch.Tensor, threshold: float) -> Survivors:
    """Keep |τ| ≥ threshold (ties at the threshold kept, as the paper's code)."""
    return survivors(tau, tau.abs() >= threshold)


def trim_tensor_exact(tau: torch.Tensor, fraction: float) -> Survivors:
    """Exactly int(k·n) largest |τ| of this tensor; among equal magnitudes at the
    boundary the lower flat index wins, so the result is deterministic."""
    n = tau.numel()
    keep = keep_count(n, fraction)
    if keep >= n:
        return survivors(tau, torch.ones_like(tau, dtype=torch.bool))
    if keep <= 0:
        return survivors(tau, torch.zeros_like(tau, dtype=torch.bool))
    mag = tau.abs()
    kth = torch.kthvalue(mag.cpu(), n - keep + 1).values.to(mag.device)  # the keep-th largest
    above = mag > kth
    need = keep - int(above.sum().item())
    at = torch.nonzero(mag == kth, as_tuple=False).reshape(-1)[:need]
    mask = above
    mask[at] = True
    return survivors(tau, mask)


def dare_seed(seed: int, model_key: str, tensor_name: str) -> int:
    """Independent, reproducible random stream per (run seed, model, tensor)."""
    h = hashlib.blake2b(f"{seed}\0{model_key}\0{tensor_name}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def trim_dare(tau: torch.Tensor, fraction: float, seed: int) -> Survivors:
    """DARE: keep each entry with probability `fraction`, rescale by 1/fraction.
    The mask is drawn on the CPU so CPU and CUDA runs agree."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    keep = torch.rand(tau.numel(), generator=gen) < fraction
    idx, val = survivors(tau, keep.to(tau.device))
    return idx, val / fraction


def trim_none(tau: torch.Tensor) -> Survivors:
    return survivors(tau, torch.ones_like(tau, dtype=torch.bool))


# --- exact global threshold: two-pass radix select --------------------------------


def _abs_bits(tau: torch.Tensor) -> torch.Tensor:
    return tau.abs().to(torch.float32).contiguous().view(torch.int32)


def coarse_histogram(tau: torch.Tensor) -> torch.Tensor:
    """Pass one: counts of |τ| by the high 16 bits of its float32 pattern."""
    return torch.bincount((_abs_bits(tau) >> 16).reshape(-1), minlength=BINS).cpu()


def fine_histogram(tau: torch.Tensor, high: int) -> torch.Tensor:
    """Pass two: counts by the low 16 bits, within the bucket `high`."""
    bits = _abs_bits(tau).reshape(-1)
    inside = bits[(bits >> 16) == high]
    return torch.bincount(inside & 0xFFFF, minlength=BINS).cpu()


def locate(hist: torch.Tensor, rank: int) -> tuple[int, int]:
    """Bucket holding the rank-th smallest item (1-based) and its rank inside it."""
    cum = torch.cumsum(hist.to(torch.int64), 0)
    bucket = int(torch.searchsorted(cum, torch.tensor([rank], dtype=torch.int64)).item())
    before = int(cum[bucket - 1].item()) if bucket > 0 else 0
    return bucket, rank - before


class GlobalThreshold:
    """The paper's global threshold, fed one tensor at a time, twice.

    Usage: `add_coarse(τ)` for every tensor, then `add_fine(τ)` for every
    tensor, then `value`. `rank` is n - int(n·k): the threshold is the
    rank-th smallest |τ|; rank 0 (k = 100%) keeps everything.
    """

    def __init__(self, total: int, fraction: float) -> None:
        self.total = total
        self.rank = total - keep_count(total, fraction)
        self._coarse = torch.zeros(BINS, dtype=torch.int64)
        self._fine = torch.zeros(BINS, dtype=torch.int64)
        self._high: Optional[int] = None
        self._rank_in_bucket = 0

    @property
    def trivial(self) -> bool:
        """True when no histogram is needed (everything is kept)."""
        return self.rank <= 0

    def add_coarse(self, tau: torch.Tensor) -> None:
        self._coarse += coarse_histogram(tau)

    def close_coarse(self) -> None:
        seen = int(self._coarse.sum().item())
        if seen != self.total:
            raise ValueError(f"global trim saw {seen} parameters, expected {self.total}")
        self._high, self._rank_in_bucket = locate(self._coarse, self.rank)

    def add_fine(self, tau: torch.Tensor) -> None:
        if self._high is None:
            self.close_coarse()
        self._fine += fine_histogram(tau, self._high)

    @property
    def value(self) -> float:
        if self.trivial:
            return 0.0
        if self._high is None:
            raise RuntimeError("GlobalThreshold: coarse pass not finished")
        low, _ = locate(self._fine, self._rank_in_bucket)
        bits = torch.tensor([(self._high << 16) | low], dtype=torch.int32)
        return float(bits.view(torch.float32).item())
