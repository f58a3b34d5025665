"""A client's contribution: its task vector, trimmed and encoded, tensor by tensor.

The same generator feeds the local merge (written to a spool file) and the
federated upload (streamed over gRPC), so both paths trim identically.
Global trim reads the model twice: one histogram pass for the threshold
(`threshold`; two more only where its sample misleads it), then the trim.
Memory stays at one block: a tensor larger than the block (`block`, from the
client's budget) is read in blocks and sent as span records, one per block,
each holding that block's final survivors (a per-tensor top-k first settles its
boundary in two histogram passes over the tensor). Progress is reported per
pass, each counting the model's parameters once ("histogram", "trim+encode").

A global top-k contribution declares its threshold in the stream header
(`contribution_threshold` before `contribution_header`, the same value handed
to `iter_contribution`): the coordinator checks each value against it, which
bounds the survivors exactly while keeping the paper's ties.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator, Literal, Optional, Sequence, Union

import torch

from tiesfed.client.progress import StageProgress
from tiesfed.client.scratch import Scratch, tau_in_place
from tiesfed.client.threshold import global_threshold as threshold_pass
from tiesfed.core import radix
from tiesfed.core.compact import flat_nonzero
from tiesfed.core.trim import (
    TrimSpec,
    dare_generator,
    dare_seed,
    keep_count,
    trim_dare,
    trim_dare_block,
    trim_none,
    trim_tensor_exact,
)
from tiesfed.io.model_io import ModelReader, TensorInfo, mergeable
from tiesfed.protos.codec import SparseTensor, StreamWriter


@dataclass
class TrimStats:
    """What the trim kept: shown to the user so a too-low k is visible."""

    numel: int = 0
    nnz: int = 0
    norm_sq_total: float = 0.0
    norm_sq_kept: float = 0.0
    threshold: Optional[float] = None

    @property
    def kept_norm_share(self) -> float:
        """‖τ̂‖ / ‖τ‖ (1.0 for an all-zero task vector)."""
        if self.norm_sq_total == 0:
            return 1.0
        return math.sqrt(self.norm_sq_kept / self.norm_sq_total)

    @property
    def density(self) -> float:
        return self.nnz / self.numel if self.numel else 0.0


def _task_vector(base: ModelReader, ft: ModelReader, name: str, device: str, check: bool) -> torch.Tensor:
    """τ of one tensor; `check` (once per tensor, on the first pass) rejects NaN/inf."""
    tau = tau_in_place(base.get(name).to(device), ft.get(name).to(device))
    if check and not radix.finite(radix.abs_bits(tau)):
        raise _nonfinite(name, ft)
    return tau


#: elements of one tensor trimmed (and sent as one span record) at once when no budget
#: says otherwise: a larger tensor is read from its byte range in blocks, so memory holds
#: a block of the dense task vector plus that block's survivors (`budget.client_block`)
CLIENT_BLOCK = 1 << 25


def _tau_blocks(base: ModelReader, ft: ModelReader, t: TensorInfo, device: str,
                block: Optional[int] = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(first element, flat τ) for the whole tensor, or for each block of a large one."""
    block = block or CLIENT_BLOCK
    if t.numel <= block:
        yield 0, tau_in_place(base.get(t.name).to(device), ft.get(t.name).to(device))
        return
    for lo in range(0, t.numel, block):
        hi = min(lo + block, t.numel)
        yield lo, tau_in_place(base.get_range(t.name, lo, hi).to(device), ft.get_range(t.name, lo, hi).to(device))


def _exact_cut(base: ModelReader, ft: ModelReader, t: TensorInfo, keep: int, device: str,
               block: int) -> tuple[int, int]:
    """A per-tensor top-k over blocks: the |τ| pattern of the keep-th largest value and
    how many values equal to it survive (the lowest positions), from a coarse then a
    fine histogram pass (0 < keep < numel), so each block's survivors are final."""
    hist = torch.zeros(radix.COARSE_BINS, dtype=torch.int64)
    for _, tau in _tau_blocks(base, ft, t, device, block):
        hist += radix.coarse_histogram(radix.abs_bits(tau))
    if radix.nonfinite(hist):
        raise _nonfinite(t.name, ft)
    bucket, inner = radix.locate(hist, t.numel - keep + 1)
    fine = torch.zeros(radix.FINE_BINS, dtype=torch.int64)
    for _, tau in _tau_blocks(base, ft, t, device, block):
        fine += radix.fine_histogram(radix.abs_bits(tau), bucket)
    low, _ = radix.locate(fine, inner)
    above = int(hist[bucket + 1:].sum()) + int(fine[low + 1:].sum())
    return radix.join(bucket, low), keep - above


def _span_survivors(base: ModelReader, ft: ModelReader, t: TensorInfo, trim: TrimSpec, keep_all: bool,
                    threshold: Optional[float], model_key: str, device: str, stats: "TrimStats",
                    block: int) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """A tensor larger than `block`, block by block: (lo, hi, survivors' flat indices of
    the whole tensor, values), each block's final, the same survivors as trimming the
    tensor whole (DARE's stream continues across blocks; a per-tensor top-k settles its
    boundary first, `_exact_cut`)."""
    exact = trim.kind == "topk" and not keep_all and threshold is None
    gen = dare_generator(dare_seed(trim.seed, model_key, t.name)) if trim.kind == "dare" else None
    keep, kth, ties = 0, 0, 0
    if exact:
        keep = keep_count(t.numel, trim.fraction)
        if keep >= t.numel:
            exact = False  # keeps every nonzero, as trim_tensor_exact does (the check below sees NaN/inf)
        elif keep > 0:
            kth, ties = _exact_cut(base, ft, t, keep, device, block)
    scratch = Scratch()
    for lo, tau in _tau_blocks(base, ft, t, device, block):
        bits = scratch.abs_bits(tau)
        if not (exact and keep > 0) and threshold is None and not radix.finite(bits):
            raise _nonfinite(t.name, ft)
        stats.norm_sq_total += sum_sq(tau)
        if gen is not None:
            idx, val = trim_dare_block(tau, trim.fraction, gen)
            stats.norm_sq_kept += sum_sq(tau.index_select(0, idx))
        else:
            if exact and keep <= 0:
                idx = torch.empty(0, dtype=torch.int64, device=tau.device)
            elif exact:
                idx = scratch.at_least(bits, kth + 1)
                if kth and ties > 0:
                    at = flat_nonzero(bits == kth)[:ties]
                    ties -= at.numel()
                    if at.numel():
                        idx = torch.sort(torch.cat([idx, at])).values
            else:
                idx = scratch.at_least(bits, radix.pattern(threshold) if threshold else 0)
            idx = idx.to(tau.device)
            val = tau.index_select(0, idx).to(torch.float32)
            stats.norm_sq_kept += sum_sq(val)
        yield lo, lo + tau.numel(), idx + lo, val


def _nonfinite(name: str, ft: ModelReader) -> ValueError:
    return ValueError(f"tensor {name!r} of {ft.path} has non-finite values (NaN or inf)")


def sum_sq(x: torch.Tensor) -> float:
    """Σx² for the kept-norm statistic, in float64 a million elements at a time: each square of a
    float32 is exact there, so the total hardly depends on how a tensor was cut into blocks (a
    float32 dot differed between whole tensors and blocks in the ratio's 5th decimal)."""
    total = 0.0
    for piece in x.reshape(-1).split(SUM_SQ_PIECE):
        piece = piece.to(torch.float64)
        total += float(torch.dot(piece, piece))
    return total


#: Elements `sum_sq` converts to float64 at once (8 MiB).
SUM_SQ_PIECE = 1 << 20


def global_threshold(
    base: ModelReader,
    ft: ModelReader,
    tensors: Sequence[TensorInfo],
    fraction: float,
    device: str = "cpu",
    progress: Optional[StageProgress] = None,
    block: Optional[int] = None,
) -> Optional[float]:
    """The paper's threshold over every mergeable parameter, `block` elements read at
    once: one streamed pass that also rejects NaN/inf, and a second only where a
    sample misplaced the threshold (`threshold`). None when k keeps everything."""
    return threshold_pass(base, ft, tensors, fraction, device, block or CLIENT_BLOCK, progress)


#: `iter_contribution`'s default threshold: compute it (two more passes over the model).
COMPUTE: Literal["compute"] = "compute"


def global_topk(trim: TrimSpec) -> bool:
    """Whether `trim` keeps |τ| at or above one threshold over the whole model."""
    return trim.kind == "topk" and trim.scope == "global"


def contribution_threshold(
    base: ModelReader,
    ft: ModelReader,
    trim: TrimSpec,
    *,
    keep_base: Sequence[str] = (),
    device: str = "cpu",
    progress: Optional[StageProgress] = None,
    block: Optional[int] = None,
) -> Optional[float]:
    """The threshold a global top-k trim keeps |τ| ≥ of (float32, as a Python float),
    to declare in the header and hand to `iter_contribution`; None for other trims
    and where k keeps everything."""
    if not global_topk(trim):
        return None
    tensors = mergeable(base.manifest(), keep_base)
    return global_threshold(base, ft, tensors, trim.fraction, device, progress, block)


def iter_contribution(
    base: ModelReader,
    ft: ModelReader,
    trim: TrimSpec,
    *,
    model_key: str,
    keep_base: Sequence[str] = (),
    device: str = "cpu",
    value_dtype: Optional[torch.dtype] = None,
    stats: Optional[TrimStats] = None,
    progress: Optional[StageProgress] = None,
    threshold: Union[float, None, Literal["compute"]] = COMPUTE,
    block: Optional[int] = None,
) -> Iterator[SparseTensor]:
    """Trimmed sparse task-vector tensors of `ft` against `base`, in base order.

    Every mergeable tensor yields one record, even an empty one, so the
    receiver can check that the contribution is complete; a tensor of more than
    `block` elements (default `CLIENT_BLOCK`) yields one span record per block
    instead, in order, so no record holds more than a block. Values travel in
    `value_dtype`, by default the tensor's own dtype. `progress` hears of each
    pass over the model as a stage. A global top-k trim uses `threshold` as
    `contribution_threshold` gave it (its passes already checked for NaN/inf),
    or computes it.
    """
    block = block or CLIENT_BLOCK
    stats = stats if stats is not None else TrimStats()
    tensors = mergeable(base.manifest(), keep_base)
    if not global_topk(trim):
        threshold = None
    elif threshold == COMPUTE:
        threshold = global_threshold(base, ft, tensors, trim.fraction, device, progress, block)
    if global_topk(trim):
        stats.threshold = threshold
    keep_all = trim.kind == "none" or trim.fraction >= 1.0 or (trim.scope == "global" and threshold is None)
    check_whole(tensors, trim, block)
    scratch = Scratch()
    if progress:
        progress.stage("trim+encode", sum(t.numel for t in tensors))
    for t in tensors:
        if trim.kind == "sparsify":  # mergekit's sparsifier on the whole tensor, as the local engine runs it
            tau = _task_vector(base, ft, t.name, device, check=True)
            out = trim.sparsifier.run(tau.reshape(t.shape), trim.fraction, seed=trim.seed, model_key=model_key,
                                      name=t.name).reshape(-1)
            idx, val = trim_none(out)
            stats.numel += t.numel
            stats.nnz += idx.numel()
            stats.norm_sq_total += sum_sq(tau)
            stats.norm_sq_kept += sum_sq(tau.index_select(0, idx))
            idx, val = cast_values(idx, val, value_dtype or wire_dtype(t.dtype), t.name)
            if progress:
                progress.update(t.numel)
            yield SparseTensor(name=t.name, shape=tuple(t.shape), indices=idx.cpu(), values=val.cpu())
            continue
        if t.numel > block:
            stats.numel += t.numel
            for lo, hi, idx, val in _span_survivors(base, ft, t, trim, keep_all, threshold, model_key, device,
                                                    stats, block):
                stats.nnz += idx.numel()
                idx, val = cast_values(idx, val, value_dtype or wire_dtype(t.dtype), t.name)
                if progress:
                    progress.update(hi - lo)
                yield SparseTensor(t.name, tuple(t.shape), idx.cpu(), val.cpu(), lo, hi - lo)
            continue
        tau = _task_vector(base, ft, t.name, device, check=threshold is None)
        if trim.kind == "dare":
            idx, val = trim_dare(tau, trim.fraction, dare_seed(trim.seed, model_key, t.name))
        elif keep_all:
            idx, val = trim_none(tau)
        elif threshold is not None:  # trim_threshold's survivors, |τ| patterns in a reused buffer
            idx = scratch.at_least(scratch.abs_bits(tau), radix.pattern(threshold) if threshold > 0 else 0)
            val = tau.reshape(-1).index_select(0, idx.to(tau.device)).to(torch.float32)
        else:
            idx, val = trim_tensor_exact(tau, trim.fraction)
        stats.numel += t.numel
        stats.nnz += idx.numel()
        stats.norm_sq_total += sum_sq(tau)
        # τ's kept values: `val` itself but for DARE's rescaled ones
        stats.norm_sq_kept += sum_sq(tau.reshape(-1).index_select(0, idx) if trim.kind == "dare" else val)
        idx, val = cast_values(idx, val, value_dtype or wire_dtype(t.dtype), t.name)
        if progress:
            progress.update(t.numel)
        yield SparseTensor(name=t.name, shape=tuple(t.shape), indices=idx.cpu(), values=val.cpu())


def check_whole(tensors: Sequence[TensorInfo], trim: TrimSpec, block: int) -> None:
    """mergekit's sparsifiers (breadcrumbs, della, DARE...) need each tensor whole: refuse, before
    any work, a tensor larger than the block the memory budget allows."""
    if trim.kind != "sparsify":
        return
    big = next((t for t in tensors if t.numel > block), None)
    if big is not None:
        raise ValueError(f"tensor {big.name!r} has {big.numel:,} elements, more than the {block:,} the memory budget "
                         "holds at once, and mergekit's sparsifier (DARE, breadcrumbs, della) needs whole tensors: "
                         "give a larger --max-memory")


def contribution_header(
    base_fingerprint: str, model_key: str, trim: TrimSpec, *, threshold: Optional[float] = None, **extra: object
) -> dict:
    """The stream header; a global top-k trim's `threshold` (from `contribution_threshold`)
    is declared in it, where the coordinator checks every value against it."""
    sp = trim.sparsifier
    return {
        "kind": "contribution",
        "base_fingerprint": base_fingerprint,
        "model_key": model_key,
        "trim": {"kind": trim.kind, "fraction": trim.fraction, "scope": trim.scope, "seed": trim.seed,
                 **({"sparsifier": {"method": sp.method, "rescale": sp.rescale, "gamma": sp.gamma,
                                    "epsilon": sp.epsilon}} if sp is not None else {})},
        **({"threshold": float(threshold)} if threshold is not None and global_topk(trim) else {}),
        **extra,
    }


def cast_values(idx: torch.Tensor, val: torch.Tensor, dtype: torch.dtype, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Values in the wire dtype; entries that round to zero are dropped (they
    would neither vote nor count), overflow is an error."""
    if dtype == val.dtype:
        return idx, val
    out = val.to(dtype)
    if not torch.isfinite(out).all():
        raise ValueError(f"tensor {name!r}: task-vector values overflow {dtype}; use float32 values "
                         "(--value-dtype float32, option value_dtype)")
    nz = out != 0
    if not bool(nz.all()):
        idx, out = idx[nz], out[nz]
    return idx, out


def write_contribution(fileobj: BinaryIO, header: dict, tensors: Iterable[SparseTensor]) -> int:
    """Encode a contribution into a stream; returns the bytes written."""
    writer = StreamWriter(fileobj, header)
    for st in tensors:
        writer.write(st)
    writer.close()
    return writer.bytes_written


VALUE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def wire_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The default wire dtype: the model's own, float32 for anything wider."""
    return model_dtype if model_dtype in VALUE_DTYPES.values() else torch.float32
