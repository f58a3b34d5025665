"""The paper's global trim threshold for one client's model, mostly in one pass.

The threshold is the rank-th smallest |τ| over every mergeable parameter (as
float32 bit patterns, which order like the values). Radix select finds it in two
passes over the model (a coarse histogram locates its bucket, a fine one of that
bucket settles it), each reading both models and computing τ and |τ| again. Here
a sample of |τ| (`SAMPLE` elements in runs spread over every tensor, read first;
all of a small model) estimates it, and one pass counts, exactly, every pattern
in a window around the estimate and how many values lie below the window. When
the rank falls inside the window the threshold is read off those counts: the
same rank-th smallest pattern, bit for bit. Otherwise (the sample misled) the two
histogram passes run as before. The pass also rejects NaN/inf. Either way the
header can declare the threshold before the first record is trimmed.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from tiesfed.client.progress import StageProgress
from tiesfed.client.scratch import Scratch, tau_in_place
from tiesfed.core import radix
from tiesfed.core.trim import keep_count, task_vector
from tiesfed.io.model_io import ModelReader, TensorInfo

#: elements of |τ| sampled to place the window (a model this small is sampled whole)
SAMPLE = 1 << 20
#: the sample's runs, spread over the tensors by size (a tensor's rows differ: many short runs)
SAMPLE_RUNS = 4096
#: the window spans the sample's quantiles this far (a share of the ranks) on either side of
#: the estimate
WINDOW_RANKS = 0.02
#: at most this many patterns in the window (around the estimate)
MAX_WINDOW = 1 << 21


def _blocks(base: ModelReader, ft: ModelReader, t: TensorInfo, device: str,
            block: int) -> Iterator[torch.Tensor]:
    """Flat τ of a tensor: whole, or block by block when larger than `block` (computed in
    the fine-tuned block just read)."""
    if t.numel <= block:
        yield tau_in_place(base.get(t.name).to(device), ft.get(t.name).to(device))
        return
    for lo in range(0, t.numel, block):
        hi = min(lo + block, t.numel)
        yield tau_in_place(base.get_range(t.name, lo, hi).to(device), ft.get_range(t.name, lo, hi).to(device))


def sample_bits(base: ModelReader, ft: ModelReader, tensors: Sequence[TensorInfo], params: int,
                device: str, block: int) -> torch.Tensor:
    """|τ| patterns of about `SAMPLE` elements: runs spread evenly over every tensor in
    proportion to its size (every element of a model of at most `SAMPLE`)."""
    if params <= SAMPLE:
        return torch.cat([radix.abs_bits(tau).cpu() for t in tensors for tau in _blocks(base, ft, t, device, block)]
                         or [torch.empty(0, dtype=torch.int32)])
    parts = []
    for t in tensors:
        share = round(SAMPLE * t.numel / params)
        if share == 0:
            continue
        runs = max(1, min(round(SAMPLE_RUNS * t.numel / params), share))
        run = share // runs
        step = (t.numel - run) // max(runs - 1, 1)
        for r in range(runs):
            lo = r * step
            tau = task_vector(base.get_range(t.name, lo, lo + run), ft.get_range(t.name, lo, lo + run))
            parts.append(radix.abs_bits(tau))
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int32)


def window(sample: torch.Tensor, rank_fraction: float) -> tuple[int, int]:
    """[lo, hi) of |τ| patterns around the sample's estimate of the pattern at
    `rank_fraction` of the ranks, at most `MAX_WINDOW` wide."""
    m = sample.numel()
    if m == 0:
        return 0, 0
    ranked = torch.sort(sample).values

    def at(q: float) -> int:  # the sample's ceil(q·m)-th smallest: exact when it is the whole model
        return int(ranked[min(m - 1, max(0, math.ceil(q * m) - 1))])

    lo, hi, mid = at(rank_fraction - WINDOW_RANKS), at(rank_fraction + WINDOW_RANKS) + 1, at(rank_fraction)
    if hi - lo > MAX_WINDOW:
        lo = max(lo, mid - MAX_WINDOW // 2)
        hi = min(hi, lo + MAX_WINDOW)
    return lo, hi


class WindowCounts:
    """Exact counts of the |τ| patterns in [lo, hi), and of those below lo, fed block by
    block (numpy on the CPU: a subtraction, an unsigned compare, a bincount of the few
    inside)."""

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.width = lo, hi - lo
        self.below = 0
        self.counts = np.zeros(self.width, dtype=np.int64)
        self._held: list[np.ndarray] = []  # offsets waiting for one bincount
        self._held_n = 0

    def add(self, bits: torch.Tensor, scratch: Scratch) -> None:
        d = scratch.offsets(bits, self.lo)
        self.below += int(np.count_nonzero(scratch.below(d, 0)))
        inside = d[scratch.below(d.view(np.uint32), self.width)]  # a copy: the buffers are reused
        if inside.size:
            self._held.append(inside)
            self._held_n += inside.size
            if self._held_n >= self.width:  # one bincount per window's worth: its zeroing is amortised
                self.flush()

    def flush(self) -> None:
        if self._held:
            self.counts += np.bincount(np.concatenate(self._held), minlength=self.width)
            self._held, self._held_n = [], 0

    def pattern_at(self, rank: int) -> Optional[int]:
        """The rank-th smallest pattern (1-based) when it lies in the window, else None."""
        self.flush()
        inner = rank - self.below
        if self.width == 0 or inner < 1 or inner > int(self.counts.sum()):
            return None
        return self.lo + int(np.searchsorted(np.cumsum(self.counts), inner))


def global_threshold(
    base: ModelReader,
    ft: ModelReader,
    tensors: Sequence[TensorInfo],
    fraction: float,
    device: str,
    block: int,
    progress: Optional[StageProgress] = None,
) -> Optional[float]:
    """The float32 |τ| a global top-k keeps values at or above; None when k keeps
    everything. One pass over the model (it also rejects NaN/inf: ValueError), and two
    more only where the sample misplaced the window."""
    params = sum(t.numel for t in tensors)
    rank = params - keep_count(params, fraction)
    if rank <= 0:
        return None
    win = WindowCounts(*window(sample_bits(base, ft, tensors, params, device, block), rank / params))
    scratch = Scratch()
    if progress:
        progress.stage("histogram", params)
    for t in tensors:
        for tau in _blocks(base, ft, t, device, block):
            bits = scratch.abs_bits(tau)
            if not radix.finite(bits):
                raise ValueError(f"tensor {t.name!r} of {ft.path} has non-finite values (NaN or inf)")
            win.add(bits, scratch)
        if progress:
            progress.update(t.numel)
    found = win.pattern_at(rank)
    if found is None:
        found = _two_passes(base, ft, tensors, rank, device, block, progress)
    return radix.as_float(found)


def _two_passes(base: ModelReader, ft: ModelReader, tensors: Sequence[TensorInfo], rank: int, device: str,
                block: int, progress: Optional[StageProgress]) -> int:
    """The rank-th smallest |τ| pattern by a coarse then a fine histogram pass."""
    params = sum(t.numel for t in tensors)
    coarse = torch.zeros(radix.COARSE_BINS, dtype=torch.int64)
    if progress:
        progress.stage("histogram (coarse)", params)
    for t in tensors:
        for tau in _blocks(base, ft, t, device, block):
            coarse += radix.coarse_histogram(radix.abs_bits(tau))
        if progress:
            progress.update(t.numel)
    bucket, inner = radix.locate(coarse, rank)
    fine = torch.zeros(radix.FINE_BINS, dtype=torch.int64)
    if progress:
        progress.stage("histogram (fine)", params)
    for t in tensors:
        for tau in _blocks(base, ft, t, device, block):
            fine += radix.fine_histogram(radix.abs_bits(tau), bucket)
        if progress:
            progress.update(t.numel)
    low, _ = radix.locate(fine, inner)
    return radix.join(bucket, low)
