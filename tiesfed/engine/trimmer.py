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
from tiesfed.core.compact import flat_nonzero
from tiesfed.core.trim import GlobalThreshold, TrimSpec, dare_generator, dare_seed, keep_count, trim_dare_block

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
    """Trims one model's task vector tensor by tensor (or block by block), and keeps
    its statistics.

    Per tensor: `start_tensor`, then `trim_block` for its blocks in order, then
    `end_tensor`. A tensor in one block takes the plain per-tensor top-k; a tensor in
    several needs its own threshold first (`tensor_histogram` over its blocks), and its
    boundary bucket's members become candidates as with the global trim. After the
    pass, `settle` decides every candidate, in pass order.
    """

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
        self._tensor: Optional[_TensorCut] = None  # per-tensor top-k over several blocks
        self._hist: Optional[torch.Tensor] = None
        self._cuts: dict[str, list[int]] = {}  # name -> [kth bits, how many at kth still to keep]
        self._dare: Optional[torch.Generator] = None
        #: this tensor's fraction (mergekit's per-tensor density: `set_fraction`), else the spec's
        self.fraction = trim.fraction
        self._keep_all_spec = self.keep_all
        #: fewest kept by a per-tensor top-k with a fraction > 0 (mergekit keeps at least one)
        self.min_keep = 0

    def set_fraction(self, fraction: Optional[float]) -> None:
        """Before a tensor (and its histogram): its own fraction kept, or None for the spec's.
        Only for per-tensor trims (tensor top-k, DARE, keep-all): a global threshold has one fraction."""
        self.fraction = self.trim.fraction if fraction is None else fraction
        if self.select is None:
            self.keep_all = self._keep_all_spec if fraction is None else (
                self.trim.kind == "none" or self.fraction >= 1.0)

    def _keep(self, numel: int) -> int:
        keep = keep_count(numel, self.fraction)
        return max(keep, min(self.min_keep, numel)) if self.fraction > 0 else keep

    @property
    def needs_histogram(self) -> bool:
        return self.select is not None

    @property
    def tensor_topk(self) -> bool:
        return self.trim.kind == "topk" and self.trim.scope == "tensor" and not self.keep_all

    def histogram(self, name: str, tau: torch.Tensor) -> None:
        """First pass (global top-k only): count |τ| coarsely; reject NaN and inf."""
        if self.select.add_coarse(tau):
            raise self._nonfinite(name)

    def tensor_histogram(self, name: str, tau: torch.Tensor) -> None:
        """Before a per-tensor top-k over several blocks: count this block's |τ|."""
        hist = radix.coarse_histogram(radix.abs_bits(tau))
        if radix.nonfinite(hist):
            raise self._nonfinite(name)
        self._hist = hist if self._hist is None else self._hist + hist

    def start_tensor(self, name: str, numel: int, blocks: int) -> None:
        if self.trim.kind == "dare":
            self._dare = dare_generator(dare_seed(self.trim.seed, self.model_key, name))
        self._tensor = None
        if self.tensor_topk and blocks > 1:
            keep = self._keep(numel)
            if keep >= numel:
                self._tensor = _TensorCut(keep, _ALL, 0)
            elif keep <= 0:
                self._tensor = _TensorCut(keep, _NONE, 0)
            else:
                self._tensor = _TensorCut(keep, *radix.locate(self._hist, numel - keep + 1))
            self._hist = None

    def trim_block(self, name: str, tau: torch.Tensor, dtype: torch.dtype) -> Trimmed:
        """This block's survivors (and candidates), indexed from the block's start."""
        flat = tau.reshape(-1)
        bits = radix.abs_bits(flat)
        if self.select is None and self._tensor is None and not radix.finite(bits):
            raise self._nonfinite(name)
        cand_idx, cand_val = _EMPTY_IDX, _EMPTY_VAL
        cut = self._tensor
        if self.trim.kind == "dare":
            idx, val = trim_dare_block(flat, self.fraction, self._dare)
            kept = flat.index_select(0, idx)  # the norm statistic is of τ, not of DARE's rescaled values
        else:
            if self.keep_all or (cut is not None and cut.bucket == _ALL):
                idx, _ = radix.at_least(bits, 0)
            elif cut is not None and cut.bucket == _NONE:
                idx = _EMPTY_IDX
            elif cut is not None:
                idx, cand_idx, cand_val = self._split_at_bucket(flat, bits, cut.bucket, cut)
            elif self.select is None:
                idx = self._top_count(bits)
            else:
                idx, cand_idx, cand_val = self._split_at_bucket(flat, bits, self.select.bucket, None)
            val = kept = flat.index_select(0, idx).to(torch.float32)
        self.stats.numel += flat.numel()
        self.stats.norm_sq_total += sum_sq(flat)
        self.stats.norm_sq_kept += sum_sq(kept)
        self.stats.nnz += idx.numel()
        idx, val = cast_values(idx, val, self._wire_dtype(dtype), name)
        return Trimmed(idx, val, cand_idx, cand_val)

    def end_tensor(self, name: str) -> None:
        """A per-tensor top-k over several blocks: fix its exact boundary."""
        cut, self._tensor = self._tensor, None
        if cut is None or cut.bucket < 0:
            return
        low, _ = radix.locate(cut.fine, cut.inner)
        kth = radix.join(cut.bucket, low)
        above = cut.above + int(cut.fine[low + 1 :].sum())
        self._cuts[name] = [kth, cut.keep - above]

    def threshold_bits(self) -> int:
        """After the merge pass: the exact global threshold as a |τ| bit pattern."""
        if self._threshold is None:
            self._threshold = radix.pattern(self.select.value)
            self.stats.threshold = self.select.value
        return self._threshold

    def settle(self, name: str, positions: torch.Tensor, values: torch.Tensor,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The candidates (ascending `positions`, float32 `values`) that survive; called
        in pass order, so a per-tensor cut keeps the lowest positions at its boundary."""
        if positions.numel() == 0:
            return positions, values
        bits = radix.abs_bits(values)
        if name in self._cuts:
            cut = self._cuts[name]
            keep = bits > cut[0]
            at = flat_nonzero(bits == cut[0])[: max(cut[1], 0)]
            keep[at] = True
            cut[1] -= at.numel()
        else:
            keep = bits >= max(self.threshold_bits(), 1)
        pos, val = positions[keep], values[keep]
        self.stats.norm_sq_kept += sum_sq(val)
        self.stats.nnz += pos.numel()
        return cast_values(pos, val, self._wire_dtype(dtype), name)

    def _top_count(self, bits: torch.Tensor) -> torch.Tensor:
        keep = self._keep(bits.numel())
        if keep >= bits.numel():
            return radix.at_least(bits, 0)[0]
        if keep <= 0:
            return _EMPTY_IDX
        return radix.top_count(bits, keep)

    def _split_at_bucket(self, flat: torch.Tensor, bits: torch.Tensor, bucket: int,
                         cut: Optional["_TensorCut"]):
        above, cand_idx, members, zeros = radix.split_at_bucket(bits, bucket)
        if cut is None:
            self.select.add_fine_bits(members)
            self.select.add_zeros(zeros)
        else:
            cut.fine += radix.low_histogram(members)
            cut.fine[0] += zeros
            cut.above += above.numel()
        return above, cand_idx, flat.index_select(0, cand_idx).to(torch.float32)

    def _wire_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.value_dtype or wire_dtype(dtype)

    def _nonfinite(self, name: str) -> NonFiniteError:
        return NonFiniteError(f"tensor {name!r} of {self.path} has non-finite values (NaN or inf)")


@dataclass
class _TensorCut:
    """A per-tensor top-k over several blocks: keep count, the boundary's coarse
    bucket (or _ALL, _NONE) and the rank in it, the bucket's fine histogram, and how
    many lie above the bucket."""

    keep: int
    bucket: int
    inner: int
    fine: torch.Tensor = field(default_factory=lambda: torch.zeros(radix.FINE_BINS, dtype=torch.int64))
    above: int = 0


_ALL, _NONE = -1, -2  # a _TensorCut's bucket when k keeps every element or none

