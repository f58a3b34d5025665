"""One model's trim inside the local merge's single tensor-major pass.

A federated client trims its whole model before it uploads; the local engine
instead trims every model one tensor at a time, folds the survivors at once and
never encodes them. For per-tensor top-k, DARE and keep-all that is all. The
paper's global top-k needs a threshold over the whole model: a first pass
histograms |τ| coarsely (`GlobalThreshold`), which fixes the one bucket that
holds the threshold. During the merge pass everything above that bucket
survives, everything below it is dropped, and the bucket's few members become
*candidates*: they feed the fine histogram and wait beside the merge until the
threshold is exact (`Pending` in `deferred`). The survivors are then exactly
`trim_threshold(τ, threshold)`'s, the set a client uploads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from tiesfed.client.contribution import TrimStats, cast_values, global_topk, sum_sq, wire_dtype
from tiesfed.core import radix
from tiesfed.core.compact import select
from tiesfed.core.trim import GlobalThreshold, TrimSpec, dare_seed, keep_count, trim_dare

_EMPTY_IDX = torch.empty(0, dtype=torch.int64)
_EMPTY_VAL = torch.empty(0, dtype=torch.float32)


@dataclass
class Trimmed:
    """One model's part of one tensor: survivors known now (values in the wire
    dtype) and candidates whose fate waits for the global threshold."""

    indices: torch.Tensor
    values: torch.Tensor
    candidates: torch.Tensor = field(default_factory=lambda: _EMPTY_IDX)
    candidate_values: torch.Tensor = field(default_factory=lambda: _EMPTY_VAL)


class NonFiniteError(ValueError):
    pass


class ModelTrimmer:
    """Trims one model's task vector tensor by tensor, and keeps its statistics."""

    def __init__(self, trim: TrimSpec, model_key: str, path: str, params: int,
                 value_dtype: Optional[torch.dtype]) -> None:
        self.trim = trim
        self.model_key = model_key
        self.path = path
        self.value_dtype = value_dtype
        self.stats = TrimStats()
        self.select = GlobalThreshold(params, trim.fraction) if global_topk(trim) else None
        if self.select is not None and self.select.trivial:
            self.select = None  # k = 100%: every nonzero survives
        self.keep_all = trim.kind == "none" or trim.fraction >= 1.0 or (global_topk(trim) and self.select is None)
        self._threshold: Optional[int] = None

    @property
    def needs_histogram(self) -> bool:
        return self.select is not None

    def histogram(self, name: str, tau: torch.Tensor) -> None:
        """First pass (global top-k only): count |τ| coarsely; reject NaN and inf."""
        if self.select.add_coarse(tau):
            raise self._nonfinite(name)

    def trim_tensor(self, name: str, tau: torch.Tensor, dtype: torch.dtype) -> Trimmed:
        """The merge pass: this tensor's survivors (and candidates, for global top-k)."""
        flat = tau.reshape(-1)
        bits = radix.abs_bits(flat)
        if self.select is None and not radix.finite(bits):
            raise self._nonfinite(name)
        cand_idx, cand_val = _EMPTY_IDX, _EMPTY_VAL
        if self.trim.kind == "dare":
            idx, val = trim_dare(flat, self.trim.fraction, dare_seed(self.trim.seed, self.model_key, name))
            kept = flat.index_select(0, idx)  # the norm statistic is of τ, not of DARE's rescaled values
        else:
            if self.keep_all:
                idx, _ = radix.at_least(bits, 0)
            elif self.select is None:
                idx = self._top_count(bits)
            else:
                idx, cand_idx, cand_val = self._split_at_bucket(flat, bits)
            val = kept = flat.index_select(0, idx).to(torch.float32)
        self.stats.numel += flat.numel()
        self.stats.norm_sq_total += sum_sq(flat)
        self.stats.norm_sq_kept += sum_sq(kept)
        self.stats.nnz += idx.numel()
        idx, val = cast_values(idx, val, self._wire_dtype(dtype), name)
        return Trimmed(idx, val, cand_idx, cand_val)

    def threshold_bits(self) -> int:
        """After the merge pass: the exact global threshold as a |τ| bit pattern."""
        if self._threshold is None:
            self._threshold = radix.pattern(self.select.value)
            self.stats.threshold = self.select.value
        return self._threshold

    def settle(self, name: str, positions: torch.Tensor, values: torch.Tensor,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The candidates (local `positions`, float32 `values`) that reach the threshold."""
        if positions.numel() == 0:
            return positions, values
        keep = radix.abs_bits(values) >= max(self.threshold_bits(), 1)
        pos, val = positions[keep], values[keep]
        self.stats.norm_sq_kept += sum_sq(val)
        self.stats.nnz += pos.numel()
        return cast_values(pos, val, self._wire_dtype(dtype), name)

    def _top_count(self, bits: torch.Tensor) -> torch.Tensor:
        keep = keep_count(bits.numel(), self.trim.fraction)
        if keep >= bits.numel():
            return radix.at_least(bits, 0)[0]
        if keep <= 0:
            return _EMPTY_IDX
        return radix.top_count(bits, keep)

    def _split_at_bucket(self, flat: torch.Tensor, bits: torch.Tensor):
        bucket = self.select.bucket
        idx, got = radix.at_least(bits, radix.bucket_start(bucket))
        member = got < radix.bucket_start(bucket + 1)
        self.select.add_fine_bits(select(got, member))
        if bucket == 0:  # zeros rank in bucket 0 too, though they never survive
            self.select.add_zeros(flat.numel() - idx.numel())
        cand_idx = select(idx, member)
        return select(idx, ~member), cand_idx, flat.index_select(0, cand_idx).to(torch.float32)

    def _wire_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.value_dtype or wire_dtype(dtype)

    def _nonfinite(self, name: str) -> NonFiniteError:
        return NonFiniteError(f"tensor {name!r} of {self.path} has non-finite values (NaN or inf)")

