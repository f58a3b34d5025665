"""The local merge: the federated pipeline run in one process.

trim → encode (each model's contribution written to a spool file, exactly the
bytes a client would upload) → fold (tensor by tensor over every spool file)
→ finalize → apply (streamed into sharded safetensors). The paper's γ = 0
rule needs the sign balance of the whole model, which is only known at the
end, so tensors are written with a provisional majority of +1 and the few
tied parameters are patched in place afterwards if the majority is not +1.

Peak memory is one tensor's accumulators and buffers (about 50 bytes per
element of the largest tensor with the default options) plus a fixed
overhead, whatever the model's size and the number of models.
"""

from __future__ import annotations

import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional, Union

import torch

from tiesfed.client.contribution import (
    VALUE_DTYPES,
    TrimStats,
    contribution_header,
    contribution_threshold,
    iter_contribution,
    write_contribution,
)
from tiesfed.client.progress import Prefixed, StageProgress, Stages, stages
from tiesfed.core.accumulators import (
    FinalizeSpec,
    conflict_counts,
    elect,
    finalize,
    fold,
    majority_sign,
    new_accumulator,
    sign_balance,
    tie_mask,
)
from tiesfed.core.apply import apply_sparse, dense_to_sparse
from tiesfed.core.methods import get_method
from tiesfed.core.options import MergeConfig
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
from tiesfed.protos.codec import index_stream, read_record_at
from tiesfed.report import MergeReport, ModelReport


@dataclass
class _Spooled:
    """One model's encoded contribution on disk and where each tensor sits in it."""

    file: BinaryIO
    where: dict[str, tuple[int, int]]
    weight: float
    report: ModelReport


@dataclass
class _Tie:
    """Tied parameters of one tensor and the outputs each majority would give."""

    name: str
    indices: torch.Tensor
    if_negative: torch.Tensor
    if_zero: torch.Tensor

    def spill(self, path: Path) -> Path:
        """Ties wait on disk, not in memory, until the majority is known."""
        torch.save(self.__dict__, path)
        return path


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
) -> MergeReport:
    """Merge `config.models` into `config.base_model`, writing an HF-style folder.

    `progress`: bars on stderr (True), none (False), or a StageProgress told of each
    stage: per model "histogram 1/2", "histogram 2/2" (global trim) and "trim+encode",
    then "fold+write", each counting the mergeable parameters once.
    An `out_dir` that already holds model weights is refused before any work unless
    `overwrite` (the CLI's --overwrite)."""
    started = time.perf_counter()
    opts = config.options
    method = get_method(opts.method)
    weighted = any(m.weight != 1.0 for m in config.models)
    spec = method.finalize_spec(opts, weighted)
    value_dtype = VALUE_DTYPES[opts.value_dtype] if opts.value_dtype else None
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)  # before hours of trimming, not after

    with ExitStack() as stack:
        base = stack.enter_context(ModelReader(config.base_model))
        fts = [stack.enter_context(ModelReader(m.model)) for m in config.models]
        for ft in fts:
            check_compatible(base, ft, opts.keep_base)
        tensors = mergeable(base.manifest(), opts.keep_base)
        params = sum(t.numel for t in tensors)
        trims = [method.trim_spec(opts, m.density) for m in config.models]
        bar = stages(progress)
        if isinstance(bar, Stages):  # ours: closed with the merge
            stack.callback(bar.close)
        spool_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tiesfed-", dir=work_dir)))

        spooled: list[_Spooled] = []
        for i, (entry, ft, trim) in enumerate(zip(config.models, fts, trims)):
            stats = TrimStats()
            path = spool_dir / f"contribution-{i}.tfs"
            stage = Prefixed(bar, f"{Path(entry.model).name}: ")
            # the stream a federated client uploads: its header declares the global threshold
            threshold = contribution_threshold(base, ft, trim, keep_base=opts.keep_base, device=device,
                                               progress=stage)
            with open(path, "wb") as f:
                size = write_contribution(
                    f,
                    contribution_header("local", str(i), trim, threshold=threshold),
                    iter_contribution(
                        base, ft, trim, model_key=str(i), keep_base=opts.keep_base, device=device,
                        value_dtype=value_dtype, stats=stats, progress=stage, threshold=threshold,
                    ),
                )
            f = stack.enter_context(open(path, "rb"))
            _, where = index_stream(f)
            report = ModelReport(
                model=entry.model, weight=entry.weight, density=stats.density,
                kept_norm_share=stats.kept_norm_share, nnz=stats.nnz, threshold=stats.threshold, upload_bytes=size,
            )
            spooled.append(_Spooled(f, where, entry.weight, report))

        bar.stage("fold+write", params)
        plan = [(t.name, tuple(t.shape), t.dtype) for t in base.manifest()]
        writer = stack.enter_context(
            ShardedWriter(
                out_dir, plan, max_shard_bytes=shard_bytes, metadata={"tiesfed_method": opts.method},
                overwrite=overwrite,
            )
        )
        merged_names = {t.name for t in tensors}
        balance, ties = 0, []
        for t in base.manifest():
            theta0 = base.get(t.name)
            if t.name not in merged_names:
                writer.write(t.name, theta0)
                continue
            try:
                theta, tensor_balance, tie = _merge_tensor(
                    t.name, t.numel, spooled, spec, opts.zero_sign, theta0, opts.lam, device
                )
            except OverflowError as e:
                raise ModelError(f"tensor {t.name!r}: {e}") from None
            balance += tensor_balance
            if tie is not None:
                ties.append(tie.spill(spool_dir / f"tie-{len(ties)}.pt"))
            writer.write(t.name, theta)
            bar.update(t.numel)

        majority = majority_sign(balance)
        fill = 1 if opts.zero_sign == "positive" else majority
        if spec.combine == "disjoint":
            for s in spooled:
                s.report.resolve_ties(fill)
        tied_params = 0
        for path in ties:
            tie = _Tie(**torch.load(path))
            tied_params += tie.indices.numel()
            if majority < 0:
                writer.patch(tie.name, tie.indices, tie.if_negative)
            elif majority == 0:
                writer.patch(tie.name, tie.indices, tie.if_zero)
        writer.close()
    copy_side_files(Path(base.folder), out_dir)

    result = MergeReport(
        method=opts.method,
        options=opts.model_dump(by_alias=True, mode="json"),
        params=params,
        models=[s.report for s in spooled],
        majority_sign=majority if spec.combine == "disjoint" else 0,
        tied_params=tied_params,
        wall_seconds=time.perf_counter() - started,
        output=str(out_dir),
    )
    if report_path:
        result.write_json(report_path)
    return result


def _merge_tensor(
    name: str,
    numel: int,
    spooled: list[_Spooled],
    spec: FinalizeSpec,
    zero_sign: str,
    theta0: torch.Tensor,
    lam: float,
    device: str,
) -> tuple[torch.Tensor, int, Optional[_Tie]]:
    """Fold one tensor from every contribution, finalize it, apply it to θ₀.

    Returns θ with a provisional majority of +1, this tensor's sign balance,
    and its tied parameters (if the majority rule applies and there are any).
    """
    acc = new_accumulator(numel, spec, device)
    for s in spooled:
        st = read_record_at(s.file, *s.where[name])
        fold(acc, st.indices, st.values, s.weight)
    if spec.combine != "disjoint":
        idx, val = dense_to_sparse(finalize(acc, spec))
        return apply_sparse(theta0, idx, val, lam), 0, None

    gamma = elect(acc, spec)
    for s in spooled:
        st = read_record_at(s.file, *s.where[name])
        c, p, n = conflict_counts(gamma, st.indices, st.values)
        s.report.conflicts += c
        s.report.pos_at_ties += p
        s.report.neg_at_ties += n
    idx, val = dense_to_sparse(finalize(acc, spec, majority=1))
    theta = apply_sparse(theta0, idx, val, lam)
    tie = None
    if zero_sign == "majority":
        tied = torch.nonzero(tie_mask(acc, gamma), as_tuple=False).reshape(-1)
        if tied.numel():
            idx_n, val_n = dense_to_sparse(finalize(acc, spec, majority=-1))
            theta_n = apply_sparse(theta0, idx_n, val_n, lam)
            flat0 = theta0.reshape(-1)
            tie = _Tie(name, tied.cpu(), theta_n.reshape(-1)[tied].cpu(), flat0[tied.to(flat0.device)].cpu())
    return theta, sign_balance(gamma), tie
