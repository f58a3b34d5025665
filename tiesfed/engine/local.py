"""The local merge: every model trimmed, folded and applied in one tensor-major pass.

Nothing leaves the process, so nothing is encoded: each tensor of the base is
read once, each model's task vector for it is trimmed (`ModelTrimmer`) and
folded straight into the accumulators, and the merged tensor is written. The
paper's global trim adds one cheaper pass before (a histogram of |τ| per
model); the few parameters at a model's threshold and the ties of the paper's
γ = 0 rule are settled after the pass and patched into the output
(`deferred`). The accumulator functions are the coordinator's and the fold
order is the models' order, so the result equals a federated round's bit for bit.

Peak memory is about one tensor's accumulators and buffers (roughly 50 bytes
per element of the largest tensor with the default options) plus a fixed
overhead, whatever the model's size and the number of models.
"""

from __future__ import annotations

import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Optional, Union

import torch

from tiesfed.client.contribution import (
    VALUE_DTYPES,
    contribution_header,
    iter_contribution,
    write_contribution,
)
from tiesfed.client.progress import StageProgress, Stages, stages
from tiesfed.core.accumulators import majority_sign
from tiesfed.core.methods import get_method
from tiesfed.core.options import MergeConfig
from tiesfed.core.trim import task_vector
from tiesfed.engine.deferred import Pending, Tie
from tiesfed.engine.tensor import merge_tensor
from tiesfed.engine.trimmer import ModelTrimmer
from tiesfed.io.model_io import (
    DEFAULT_SHARD_BYTES,
    ModelError,
    ModelReader,
    ShardedWriter,
    check_compatible,
    check_out_dir,
    copy_side_files,
    mergeable,
)
from tiesfed.report import MergeReport, ModelReport


def merge(
    config: MergeConfig,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Union[bool, StageProgress] = True,
    report_path: Optional[str | Path] = None,
    work_dir: Optional[str | Path] = None,
    overwrite: bool = False,
    measure_upload: bool = False,
) -> MergeReport:
    """Merge `config.models` into `config.base_model`, writing an HF-style folder.

    `progress`: bars on stderr (True), none (False), or a StageProgress told of each
    stage: "histogram" (global trim only) and "merge", each counting the mergeable
    parameters once. An `out_dir` that already holds model weights is refused
    before any work unless `overwrite` (the CLI's --overwrite). `measure_upload`
    also encodes each model's contribution, as a client would upload it, to report
    its size (one more pass per model)."""
    started = time.perf_counter()
    opts = config.options
    method = get_method(opts.method)
    weighted = any(m.weight != 1.0 for m in config.models)
    spec = method.finalize_spec(opts, weighted)
    value_dtype = VALUE_DTYPES[opts.value_dtype] if opts.value_dtype else None
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)  # before any reading, not after

    with ExitStack() as stack:
        base = stack.enter_context(ModelReader(config.base_model))
        fts = [stack.enter_context(ModelReader(m.model)) for m in config.models]
        for ft in fts:
            check_compatible(base, ft, opts.keep_base)
        tensors = mergeable(base.manifest(), opts.keep_base)
        merged_names = {t.name for t in tensors}
        params = sum(t.numel for t in tensors)
        trims = [method.trim_spec(opts, m.density) for m in config.models]
        trimmers = [ModelTrimmer(trim, str(i), m.model, params, value_dtype)
                    for i, (m, trim) in enumerate(zip(config.models, trims))]
        weights = [m.weight for m in config.models]
        reports = [ModelReport(model=m.model, weight=m.weight, density=0.0, kept_norm_share=1.0, nnz=0)
                   for m in config.models]
        bar = stages(progress)
        if isinstance(bar, Stages):  # ours: closed with the merge
            stack.callback(bar.close)
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tiesfed-", dir=work_dir)))

        if any(t.needs_histogram for t in trimmers):
            bar.stage("histogram", params)
            for t in tensors:
                theta0 = base.get(t.name).to(device)
                for ft, trimmer in zip(fts, trimmers):
                    if trimmer.needs_histogram:
                        trimmer.histogram(t.name, task_vector(theta0, ft.get(t.name).to(device)))
                bar.update(t.numel)

        bar.stage("merge", params)
        plan = [(t.name, tuple(t.shape), t.dtype) for t in base.manifest()]
        writer = stack.enter_context(
            ShardedWriter(out_dir, plan, max_shard_bytes=shard_bytes, metadata={"tiesfed_method": opts.method},
                          overwrite=overwrite)
        )
        balance, ties, pending = 0, [], []
        for t in base.manifest():
            theta0 = base.get(t.name)
            if t.name not in merged_names:
                writer.write(t.name, theta0)
                continue
            theta0 = theta0.to(device)
            parts = [trimmer.trim_tensor(t.name, task_vector(theta0, ft.get(t.name).to(device)), t.dtype)
                     for ft, trimmer in zip(fts, trimmers)]
            try:
                res = merge_tensor(t.name, theta0, parts, weights, reports, spec, opts.lam)
            except OverflowError as e:
                raise ModelError(f"tensor {t.name!r}: {e}") from None
            balance += res.balance
            if res.tie is not None:
                ties.append(res.tie.spill(work / f"tie-{len(ties)}.pt"))
            if res.pending is not None:
                pending.append(res.pending.spill(work / f"pending-{len(pending)}.pt"))
            writer.write(t.name, res.theta)
            bar.update(t.numel)

        tied_params = 0
        for path in pending:  # every threshold is exact now
            held = Pending.load(path)
            b, tied = held.settle(trimmers, weights, reports, spec)
            balance += b
            tied_params += tied
            held.spill(path)
        majority = majority_sign(balance)
        for path in pending:
            held = Pending.load(path)
            try:
                writer.patch(held.name, held.positions, held.merged(weights, spec, majority, opts.lam))
            except OverflowError as e:
                raise ModelError(f"tensor {held.name!r}: {e}") from None
        for path in ties:
            tie = Tie.load(path)
            tied_params += tie.indices.numel()
            if majority < 0:
                writer.patch(tie.name, tie.indices, tie.if_negative)
            elif majority == 0:
                writer.patch(tie.name, tie.indices, tie.if_zero)
        writer.close()

        fill = 1 if opts.zero_sign == "positive" else majority
        for i, (trimmer, report) in enumerate(zip(trimmers, reports)):
            s = trimmer.stats
            if trimmer.needs_histogram:
                trimmer.threshold_bits()  # records the threshold even where no candidate was held
            report.density, report.kept_norm_share, report.nnz = s.density, s.kept_norm_share, s.nnz
            report.threshold = s.threshold
            if spec.combine == "disjoint":
                report.resolve_ties(fill)
            if measure_upload:
                report.upload_bytes = _upload_size(base, fts[i], trims[i], str(i), opts.keep_base, device,
                                                   value_dtype, s.threshold)
    copy_side_files(Path(base.folder), out_dir)

    result = MergeReport(
        method=opts.method,
        options=opts.model_dump(by_alias=True, mode="json"),
        params=params,
        models=reports,
        majority_sign=majority if spec.combine == "disjoint" else 0,
        tied_params=tied_params,
        wall_seconds=time.perf_counter() - started,
        output=str(out_dir),
    )
    if report_path:
        result.write_json(report_path)
    return result


class _Count:
    """A write-only sink that keeps only the byte count."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def _upload_size(base: ModelReader, ft: ModelReader, trim, model_key: str, keep_base, device: str,
                 value_dtype: Optional[torch.dtype], threshold: Optional[float]) -> int:
    """Bytes of the contribution stream a client would upload for this model."""
    header = contribution_header("local", model_key, trim, threshold=threshold)
    records = iter_contribution(base, ft, trim, model_key=model_key, keep_base=keep_base, device=device,
                                value_dtype=value_dtype, threshold=threshold)
    return write_contribution(_Count(), header, records)
