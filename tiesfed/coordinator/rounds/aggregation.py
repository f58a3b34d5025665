"""The round's accumulators: which aggregator, when contributions fold into it, and
reading folded records back from the spool (to take them out, or to fold them again).

Only the spool holds what was folded, so every un-fold and rebuild reads it back
from there; nothing here keeps tensors in memory beyond one record.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal

import torch

from tiesfed.coordinator.aggregator import Aggregator, AggregatorLike
from tiesfed.coordinator.metrics import NO_METRICS, Metrics, timed_fold
from tiesfed.coordinator.rounds.config import TensorEntry, exact_weight
from tiesfed.core.accumulators import FinalizeSpec
from tiesfed.protos.codec import Limits, read_record_at, read_stream

AggregatorFactory = Callable[[list[tuple[str, int]], FinalizeSpec], AggregatorLike]
#: (name, indices, values, weight): one folded record, as a sharded aggregator replays it.
FoldedRecord = tuple[str, torch.Tensor, torch.Tensor, float]
#: arrival: fold each record as it arrives, un-fold to withdraw (exact sums, invertible spec);
#: commit: fold a contribution once committed, rebuild to replace one (disjoint max);
#: final: fold every contribution in participant order at finalization (weights whose
#: products make the sums inexact: the fold order must not depend on arrival order).
FoldMode = Literal["arrival", "commit", "final"]


def default_aggregator_factory(manifest: list[tuple[str, int]], spec: FinalizeSpec) -> AggregatorLike:
    """The in-process aggregator (the Ray-sharded one offers the same interface)."""
    return Aggregator(manifest, spec)


def exact_sums(spec: FinalizeSpec) -> bool:
    """Sums kept in float64, exact for honest inputs: the result can be made independent of
    the arrival order. float32 sums (the coordinator's sum_dtype) give that up for memory."""
    return spec.sum_dtype == torch.float64


def choose_fold_mode(weights: Iterable[float], spec: FinalizeSpec) -> FoldMode:
    """Fold on arrival only where un-folding is exact; see `FoldMode`."""
    if not all(exact_weight(w) for w in weights):
        return "final"
    if not spec.invertible:
        return "commit"
    return "arrival"


def new_aggregator(
    factory: AggregatorFactory,
    manifest: list[TensorEntry],
    spec: FinalizeSpec,
    replay: Callable[[], Iterator[FoldedRecord]],
) -> AggregatorLike:
    """From the factory; one that takes `replay` (a sharded aggregator rebuilding a
    restarted shard) gets it."""
    sizes = [(t.name, t.numel) for t in manifest]
    try:
        takes_replay = "replay" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        takes_replay = False
    if takes_replay:
        return factory(sizes, spec, replay=replay)
    return factory(sizes, spec)


def release(agg: AggregatorLike | None) -> None:
    """Let an aggregator go (one with resources elsewhere, e.g. actors, may have `close`)."""
    close = getattr(agg, "close", None)
    if callable(close):
        close()


def fold_file(agg: AggregatorLike, path: Path, weight: float, direction: int, limits: Limits,
              metrics: Metrics = NO_METRICS) -> None:
    """Fold (or, direction -1, un-fold) a whole contribution stream; folds (not un-folds)
    are counted in `metrics`."""
    with open(path, "rb") as f:
        _, tensors = read_stream(f, limits)
        for t in tensors:
            if direction == 1:
                timed_fold(agg, metrics, t.name, t.indices, t.values, weight)
            else:
                agg.fold(t.name, t.indices, t.values, weight, direction=direction)


def unfold_records(
    agg: AggregatorLike, path: Path, records: list[tuple[str, int, int]], weight: float, limits: Limits
) -> None:
    """Take out the records (name, offset, length) of a partial upload that were folded."""
    with open(path, "rb") as f:
        for name, off, length in records:
            t = read_record_at(f, off, length, limits)
            agg.fold(name, t.indices, t.values, weight, direction=-1)


def read_folded(
    files: list[tuple[Path, float]],
    live: list[tuple[Path, list[tuple[str, int, int]], float]],
    limits: Limits,
) -> Iterator[FoldedRecord]:
    """Whole contribution streams (path, weight), then the folded records of live
    uploads (path, records, weight), as (name, indices, values, weight)."""
    for path, weight in files:
        with open(path, "rb") as f:
            _, tensors = read_stream(f, limits)
            for t in tensors:
                yield t.name, t.indices, t.values, weight
    for path, folded, weight in live:
        with open(path, "rb") as f:
            for name, off, length in folded:
                t = read_record_at(f, off, length, limits)
                yield name, t.indices, t.values, weight
