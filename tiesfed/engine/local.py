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
from typing import Optional, Sequence, Union

import torch

from tiesfed.client.budget import default_max_memory
from tiesfed.client.contribution import (
    VALUE_DTYPES,
    contribution_header,
    iter_contribution,
    write_contribution,
)
from tiesfed.client.progress import StageProgress, Stages, stages
from tiesfed.core.accumulators import majority_sign
from tiesfed.core.mergekit_rng import MergekitDraw, draw_order, mergekit_generator
from tiesfed.core.methods import get_method
from tiesfed.core.options import MergeConfig, ModelEntry
from tiesfed.core.sparsify import sparsify_entry
from tiesfed.core.tensor_params import layer_count, position, resolve
from tiesfed.core.trim import TrimSpec, task_vector
from tiesfed.engine.deferred import Pending, Tie
from tiesfed.engine.tensor import merge_tensor
from tiesfed.engine.trimmer import ModelTrimmer
from tiesfed.io.compat import read_config
from tiesfed.io.lora_out import AdapterPlan
from tiesfed.io.mergekit_output import finish_mergekit_output
from tiesfed.io.model_card import write_local_card
from tiesfed.io.model_io import (
    DEFAULT_SHARD_BYTES,
    ModelError,
    ModelReader,
    ShardedWriter,
    TensorInfo,
    check_compatible,
    check_out_dir,
    copy_side_files,
    mergeable,
)
from tiesfed.io.vocab_rows import finish_union, grow_union, read_at_base_rows
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
    max_memory: Optional[int] = None,
    source_config: Optional[str | Path] = None,
    allow_architecture_mismatch: bool = False,
    lora_rank: Optional[int] = None,
    lora_out: Optional[str | Path] = None,
    random_seed: Optional[int] = None,
) -> MergeReport:
    """Merge `config.models` into `config.base_model`, writing an HF-style folder.

    `progress`: bars on stderr (True), none (False), or a StageProgress told of each
    stage: "histogram" (global trim only) and "merge", each counting the mergeable
    parameters once. An `out_dir` that already holds model weights is refused
    before any work unless `overwrite` (the CLI's --overwrite). `measure_upload`
    also encodes each model's contribution, as a client would upload it, to report
    its size (one more pass per model). `max_memory` (bytes; default: half the
    machine's memory) bounds the tensor data held at once: a tensor that does not
    fit is read, trimmed, merged and written in blocks of its elements, with the
    same result. `source_config`: the YAML the config was read from (a mergekit one is kept
    beside the model card as `mergekit_config.yml`). `allow_architecture_mismatch`: merge models
    whose config.json names another architecture than the base's (refused by default). `lora_rank`: also
    write the merge as a peft LoRA adapter of that rank into `lora_out` (default `out_dir`/adapter), over
    the LoRA inputs' target modules (`io.lora_out`). `random_seed`: mergekit's `--random-seed`; mergekit's
    random sparsifiers (DARE, DELLA) then draw the masks `mergekit-yaml --random-seed` draws
    (`core.mergekit_rng`): the tensors go in mergekit's order, and a merge whose order cannot be
    reproduced is refused."""
    started = time.perf_counter()
    opts = config.options
    method = get_method(opts.method)
    weighted = any(m.weight != 1.0 or m.weight_settings is not None for m in config.models)
    spec = method.finalize_spec(opts, weighted)
    value_dtype = VALUE_DTYPES[opts.value_dtype] if opts.value_dtype else None
    compute = VALUE_DTYPES[config.dtype] if config.dtype else None  # inputs cast to it when read
    out_dtype = VALUE_DTYPES[config.out_dtype] if config.out_dtype else compute
    per_tensor = any(m.per_tensor or m.sparsifier for m in config.models)
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)  # before any reading, not after
    if device.startswith("mps"):
        raise ValueError("--device mps: the accumulators need float64, which mps lacks; use cpu or cuda")

    with ExitStack() as stack:
        base = stack.enter_context(ModelReader(config.base_model))
        fts = [stack.enter_context(ModelReader(m.model)) for m in config.models]
        if config.vocab == "union":  # one fine-tune's added tokens: every model grows by its rows
            base, fts, _ = grow_union(base, fts)
        stored = [set(r.names) for r in (base, *fts)]  # as the files have them, before tied copies are reconciled
        for ft in fts:
            if config.vocab == "base":  # a grown vocabulary read at the base's rows
                read_at_base_rows(base, ft)
            check_compatible(base, ft, opts.keep_base, allow_architecture_mismatch)
        adapter = None if lora_rank is None else AdapterPlan(fts, lora_rank, Path(lora_out or out_dir / "adapter"),
                                                             overwrite)
        tensors = mergeable(base.manifest(), opts.keep_base)
        merged_names = {t.name for t in tensors}
        params = sum(t.numel for t in tensors)
        # a model with mergekit's sparsifier (its own, or the options') is sparsified before its trim,
        # which then keeps all
        trims = [method.trim_spec(opts, 1.0 if m.sparsifier else m.density) for m in config.models]
        replay = None if random_seed is None else _replay(config, trims, merged_names, base, stored, random_seed)
        trimmers = [ModelTrimmer(_KEEP_ALL if trim.kind == "sparsify" else trim, str(i), m.model, params, value_dtype)
                    for i, (m, trim) in enumerate(zip(config.models, trims))]
        if config.semantics == "mergekit":
            for trimmer in trimmers:
                trimmer.min_keep = 1  # mergekit's magnitude trim keeps max(1, int(density·n))
        weights = [m.weight for m in config.models]
        layers = layer_count(t.name for t in tensors)
        tensor_weights: dict[str, list[float]] = {}  # per-tensor weights, where they differ from `weights`
        reports = [ModelReport(model=m.model, weight=m.weight, density=0.0, kept_norm_share=1.0, nnz=0)
                   for m in config.models]
        bar = stages(progress)
        if isinstance(bar, Stages):  # ours: closed with the merge
            stack.callback(bar.close)
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tiesfed-", dir=work_dir)))

        block = block_elements(_device_budget(max_memory, device), trimmers)
        whole = [t.name for t in tensors if t.numel > block]
        if whole and any(m.sparsifier or trim.kind == "sparsify" for m, trim in zip(config.models, trims)):
            raise ValueError(f"tensor {whole[0]!r} does not fit the memory budget whole, and mergekit's sparsifier "
                             "(DARE, breadcrumbs, della) needs whole tensors: give a larger --max-memory")
        if any(t.needs_histogram for t in trimmers):
            bar.stage("histogram", params)
            for t in tensors:
                for lo, hi in _blocks(t.numel, block):
                    theta0 = _read(base, t, lo, hi, device, compute)
                    for ft, trimmer in zip(fts, trimmers):
                        if trimmer.needs_histogram:
                            trimmer.histogram(t.name, task_vector(theta0, _read(ft, t, lo, hi, device, compute)))
                    bar.update(hi - lo)

        bar.stage("merge", params)
        # with mergekit's draws replayed, tensors go (and are written) in mergekit's order
        manifest = sorted(base.manifest(), key=lambda t: t.name) if replay else base.manifest()
        plan = [(t.name, tuple(t.shape), _out_dtype(t.dtype, out_dtype)) for t in manifest]
        writer = stack.enter_context(
            ShardedWriter(out_dir, plan, max_shard_bytes=shard_bytes, metadata={"tiesfed_method": opts.method},
                          overwrite=overwrite)
        )
        balance, ties, pending = 0, [], []
        for t in manifest:
            blocks = _blocks(t.numel, block)
            if t.name not in merged_names:
                for lo, hi in blocks:
                    _write(writer, t, _read(base, t, lo, hi, "cpu", compute), len(blocks), out_dtype)
                continue
            w_t = weights
            if per_tensor:
                at = position(t.name, layers)
                w_t = [_tensor_weight(m, t.name, at) for m in config.models]
                if w_t != weights:
                    tensor_weights[t.name] = w_t
                for m, trimmer in zip(config.models, trimmers):
                    trimmer.set_fraction(None if m.sparsifier else _tensor_density(m, t.name, at))
            for ft, trimmer in zip(fts, trimmers):
                if trimmer.tensor_topk and len(blocks) > 1:  # this tensor's own threshold first
                    for lo, hi in blocks:
                        trimmer.tensor_histogram(t.name, task_vector(_read(base, t, lo, hi, device, compute),
                                                                     _read(ft, t, lo, hi, device, compute)))
                trimmer.start_tensor(t.name, t.numel, len(blocks))
            draw = None if replay is None else MergekitDraw(replay, compute or _promoted(t.name, base, fts))
            for lo, hi in blocks:
                theta0 = _read(base, t, lo, hi, device, compute)
                parts = [trimmer.trim_block(t.name, _sparsified(m, trim, i, t, at if per_tensor else 0.0,
                                                                len(blocks), opts.seed,
                                                                task_vector(theta0, _read(ft, t, lo, hi, device,
                                                                                          compute)), draw),
                                            theta0.dtype)
                         for i, (m, trim, ft, trimmer) in enumerate(zip(config.models, trims, fts, trimmers))]
                try:
                    res = merge_tensor(t.name, theta0, parts, w_t, reports, spec, opts.lam, offset=lo)
                except OverflowError as e:
                    raise ModelError(f"tensor {t.name!r}: {e}") from None
                del parts
                balance += res.balance
                if res.tie is not None:
                    ties.append(res.tie.spill(work / f"tie-{len(ties)}.pt"))
                if res.pending is not None:
                    pending.append(res.pending.spill(work / f"pending-{len(pending)}.pt"))
                _write(writer, t, res.theta, len(blocks), out_dtype)
                bar.update(hi - lo)
            for trimmer in trimmers:
                trimmer.end_tensor(t.name)

        tied_params = 0
        for path in pending:  # every threshold is exact now
            held = Pending.load(path)
            b, tied = held.settle(trimmers, tensor_weights.get(held.name, weights), reports, spec)
            balance += b
            tied_params += tied
            held.spill(path)
        majority = majority_sign(balance)
        for path in pending:
            held = Pending.load(path)
            try:
                writer.patch(held.name, held.positions,
                             held.merged(tensor_weights.get(held.name, weights), spec, majority, opts.lam))
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
        if adapter is not None:
            adapter.write(base, out_dir, str(config.base_model))

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
    if config.vocab == "union":
        finish_union(out_dir, config.base_model, [m.model for m in config.models])
    if config.semantics == "mergekit":  # its tokenizer_source / chat_template, and dtype in config.json
        finish_mergekit_output(out_dir, config)
    write_local_card(out_dir, Path(base.folder), config, Path(source_config) if source_config else None,
                     random_seed=random_seed)

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


#: interpreter, libraries and one accumulator block: what a budget must leave room for
FIXED_BYTES = 640 << 20


def _device_budget(max_memory: Optional[int], device: str) -> Optional[int]:
    """On a GPU the budget is also bounded by its free memory (80% of it)."""
    if not device.startswith("cuda"):
        return max_memory
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return min(default_max_memory() if max_memory is None else max_memory, int(0.8 * free) + FIXED_BYTES)


def block_elements(max_memory: Optional[int], trimmers: Sequence[ModelTrimmer]) -> int:
    """Elements of one tensor processed at once under `max_memory` bytes: per element
    the base, the output, one model's raw block, τ and its bit patterns (~24 bytes in
    all), and every model's survivors (12 bytes each when all survive)."""
    budget = default_max_memory() if max_memory is None else max_memory
    kept = sum(1.0 if t.keep_all or t.trim.kind != "topk" else t.trim.fraction for t in trimmers)
    per_element = 24 + 12 * kept
    room = budget - FIXED_BYTES
    if room < per_element * (1 << 20):
        need = (FIXED_BYTES + per_element * (1 << 20)) / 2**30
        raise ValueError(f"--max-memory {budget / 2**30:.2f} GiB is too small for this merge: give at least "
                         f"{need:.2f} GiB")
    return int(room // per_element)


def _blocks(numel: int, block: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + block, numel)) for lo in range(0, max(numel, 1), block)]


def _read(reader: ModelReader, t: TensorInfo, lo: int, hi: int, device: str,
          cast: Optional[torch.dtype] = None) -> torch.Tensor:
    """A whole tensor (its shape kept) or a flat block of it; float tensors cast to `cast`."""
    whole = reader.get(t.name) if (lo, hi) == (0, t.numel) else reader.get_range(t.name, lo, hi)
    if cast is not None and whole.is_floating_point():
        whole = whole.to(cast)
    return whole.to(device)


def _out_dtype(stored: torch.dtype, out: Optional[torch.dtype]) -> torch.dtype:
    return out if out is not None and stored.is_floating_point else stored


def _tensor_weight(m: ModelEntry, name: str, t: float) -> float:
    if m.weight_settings is None:
        return m.weight
    w = resolve(name, m.weight_settings, t, m.weight_default)
    if w is None:
        raise ValueError(f"model {m.model}: no weight for tensor {name!r} (no filter matches)")
    return w


def _tensor_density(m: ModelEntry, name: str, t: float) -> Optional[float]:
    if m.density_settings is None:
        return m.density
    d = resolve(name, m.density_settings, t, m.density_default)
    return None if d is None else min(max(d, 0.0), 1.0)


#: the trim after a sparsifier: it keeps what the sparsifier left
_KEEP_ALL = TrimSpec(kind="none", fraction=1.0)


def _sparsified(m: ModelEntry, trim: TrimSpec, i: int, t: TensorInfo, at: float, blocks: int, seed: int,
                tau: torch.Tensor, draw: Optional[MergekitDraw] = None) -> torch.Tensor:
    """τ through the model's mergekit sparsifier (its own, else the options'), if it has one (it needs
    the whole tensor); the options' is the one a federated client runs (`TrimSpec` "sparsify").
    `draw`: mergekit's replayed generator at this tensor (`--random-seed`)."""
    if not m.sparsifier and trim.kind != "sparsify":
        return tau
    assert blocks == 1, "checked before the pass"
    if not m.sparsifier:
        return trim.sparsifier.run(tau.reshape(t.shape), trim.fraction, seed=trim.seed, model_key=str(i),
                                   name=t.name, draw=draw).reshape(-1)
    density = _tensor_density(m, t.name, at)
    out = sparsify_entry(tau.reshape(t.shape), m.sparsifier, 1.0 if density is None else density, t.name, at,
                         seed=seed, model_key=str(i), draw=draw)
    return out.reshape(-1)


_RANDOM = ("random", "della_magprune")


def _replay(config: MergeConfig, trims: Sequence[TrimSpec], merged: set[str], base: ModelReader,
            stored: Sequence[set[str]], seed: int) -> Optional[torch.Generator]:
    """The generator that replays mergekit's draws, or None when no model draws (nothing to replay).
    Refuses what would make tiesfed's draws differ from mergekit's: tiesfed's own DARE (it draws from
    its own generators: --seed), tensors left at the base, tensors other than mergekit would merge."""
    if any(trim.kind == "dare" for trim in trims):
        raise ValueError("--random-seed replays mergekit's DARE and DELLA sparsifiers; tiesfed's own dare_ties "
                         "draws from its own generators (--seed): give a mergekit config, or --sparsifier dare")
    drawing = [m for m, trim in zip(config.models, trims)
              if (m.sparsifier or {}).get("method") in _RANDOM
              or (trim.sparsifier is not None and trim.sparsifier.method in _RANDOM)]
    if not drawing:
        return None
    if config.options.keep_base:
        raise ValueError("--random-seed: mergekit merges every tensor, so --keep-base would shift its draws")
    order = draw_order(read_config(Path(base.folder)), stored)
    extra = sorted(merged - set(order))
    missing = sorted(set(order) - merged)
    if extra or missing:
        what = (f"tiesfed merges {extra[0]!r}, which mergekit does not" if extra
                else f"mergekit merges {missing[0]!r}, which tiesfed does not")
        raise ValueError(f"--random-seed: {what}, so its draws cannot be replayed")
    return mergekit_generator(seed)


def _promoted(name: str, base: ModelReader, fts: Sequence[ModelReader]) -> torch.dtype:
    """mergekit's compute dtype of a tensor: its inputs' promoted dtype."""
    dtype = base.info(name).dtype
    for ft in fts:
        dtype = torch.promote_types(dtype, ft.info(name).dtype)
    return dtype


def _write(writer: ShardedWriter, t: TensorInfo, data: torch.Tensor, blocks: int,
           out: Optional[torch.dtype] = None) -> None:
    data = data.to(_out_dtype(data.dtype, out)) if out is not None else data
    if blocks == 1:
        writer.write(t.name, data.reshape(t.shape))
    else:
        writer.write_part(t.name, data.reshape(-1))


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
