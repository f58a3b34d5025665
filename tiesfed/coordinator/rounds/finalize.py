"""How a round ends: finalized when quorum is met and everyone is in, the deadline
passed or an admin asked; failed on abort, a missed quorum or an error.

Finalization runs once, on a thread of its own: under the lock the round turns
"finalizing" (uploads in progress are stopped); outside it (it takes as long as
the merge) the merged task vector is written as a codec stream, and the merged
model when the coordinator has the base; under the lock again the round records
the result. Either end lets the accumulators go.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Optional

from tiesfed.coordinator.aggregator import AggregatorLike
from tiesfed.coordinator.rounds.aggregation import release
from tiesfed.coordinator.rounds.config import RoundConfig
from tiesfed.coordinator.rounds.events import Merged, RoundError
from tiesfed.coordinator.rounds.state import RoundState
from tiesfed.coordinator.spool import RoundSpool
from tiesfed.core.accumulators import FinalizeSpec, majority_sign
from tiesfed.io.files import fsync_dir, sha256_file
from tiesfed.protos.codec import SparseTensor, StreamWriter

log = logging.getLogger("tiesfed.coordinator")


def maybe_finalize(r: RoundState, now: Optional[float] = None) -> None:
    """Finalize when quorum is met and everyone is in, or the deadline passed, or an admin asked."""
    if r.state != "open" or len(r.committed) < r.quorum:
        return
    if len(r.committed) == len(r.participants) or r.deadline_passed(now) or r.close_requested:
        start_finalizer(r)


def start_finalizer(r: RoundState) -> None:
    if r._finalizer is None:
        r._finalizer = threading.Thread(target=finalize, args=(r,), name=f"finalize-{r.id}", daemon=True)
        r._finalizer.start()


def on_deadline(r: RoundState, now: float) -> None:
    """The deadline passed (seen once, lock held): finalize with quorum, else fail under reject."""
    if len(r.committed) >= r.quorum:
        maybe_finalize(r, now)
    elif r.config.late_policy == "reject":
        fail(r, f"quorum not met by the deadline: {len(r.committed)} of {r.quorum} contribution(s) committed")


def close(r: RoundState, abort: bool = False, timeout: Optional[float] = None) -> None:
    """Admin: finalize now (quorum must be met), or abort. Waits for the finalization."""
    with r.lock:
        if abort:
            if r.state in ("finalized", "failed"):
                raise RoundError("FAILED_PRECONDITION", f"round {r.id!r} is already {r.state}")
            if r.state == "open":
                fail(r, "aborted by the admin")
            return
        if r.state == "failed":
            raise RoundError("FAILED_PRECONDITION", f"round {r.id!r} failed: {r.message}")
        if r.state == "open":
            if len(r.committed) < r.quorum:
                raise RoundError(
                    "FAILED_PRECONDITION",
                    f"round {r.id!r}: quorum not met ({len(r.committed)} of {r.quorum} "
                    "contribution(s) committed)",
                )
            r.close_requested = True
            r._persist()
            start_finalizer(r)
        t = r._finalizer
    if t is not None:
        t.join(timeout)


def fail(r: RoundState, why: str) -> None:
    """The round fails (lock held): uploads in progress are withdrawn, the accumulators let go."""
    r.state = "failed"
    r.message = why
    for s in list(r.sessions.values()):
        r._discard(s, f"stopped: round failed ({why})")
    release(r.agg)
    r.agg = None
    r._persist()
    r._emit("ROUND_FAILED", message=why)


def finalize(r: RoundState) -> None:
    """The finalizer thread's body."""
    with r.lock:
        if r.state != "open":
            return
        r.state = "finalizing"
        for s in list(r.sessions.values()):
            r._discard(s, "stopped: the round is finalizing")
        r._persist()
        r._emit("ROUND_FINALIZING", message=f"merging {len(r.committed)} contribution(s)")
        contributors = sorted(r.committed)
    try:
        if r.fold_mode == "final":
            r._rebuild()
        merged = write_merged(r.agg, contributors, r.config, r.spec, r.spool)
        if r.base_path:
            write_model(r.agg, r.base_path, merged.path, r.spool, r.shard_bytes, r.config)
    except Exception as e:
        log.exception("round %s: finalization failed", r.id)
        with r.lock:
            r.state = "failed"
            r.message = f"finalization failed: {e!r}"
            release(r.agg)
            r.agg = None
            r._persist()
            r._emit("ROUND_FAILED", message=r.message)
        return
    with r.lock:
        r.state = "finalized"
        r.merged = merged
        release(r.agg)
        r.agg = None  # the accumulators are no longer needed
        r._persist()
        r._emit("ROUND_FINALIZED", sha256=merged.sha256, bytes=merged.bytes,
                message=f"majority sign {merged.majority_sign:+d}")


def write_merged(
    agg: AggregatorLike, contributors: list[str], config: RoundConfig, spec: FinalizeSpec, spool: RoundSpool
) -> Merged:
    """sign_balance all-reduce -> finalize -> the merged task vector as a codec stream."""
    from tiesfed.core.apply import dense_to_sparse

    opts = config.options
    shapes = {t.name: t.shape for t in config.manifest}
    majority = majority_sign(agg.sign_balance()) if spec.combine == "disjoint" else 0
    header = {
        "kind": "merged",
        "round_id": config.round_id,
        "method": opts.method,
        "lambda": opts.lam,
        "base_fingerprint": config.base_fingerprint,
        "options": opts.model_dump(mode="json", by_alias=True),
        "majority_sign": majority,
        "contributors": contributors,
    }
    final = spool.merged_path
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        w = StreamWriter(f, header)
        for name, tau in agg.finalize(majority):
            idx, val = dense_to_sparse(tau)
            w.write(SparseTensor(name, shapes[name], idx, val))
        w.close()
        f.flush()
        os.fsync(f.fileno())
    sha = sha256_file(tmp)
    size = tmp.stat().st_size
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return Merged(sha, size, majority, final)


def write_model(
    agg: AggregatorLike | None,
    base_path: str,
    merged_path: Path,
    spool: RoundSpool,
    shard_bytes: int,
    config: RoundConfig,
) -> None:
    """The full merged model: by the shard actors in parallel where the aggregator
    can (a Ray-sharded one, base and spool on a shared filesystem), else here."""
    from tiesfed.io.materialize import apply_merged
    from tiesfed.io.model_io import ModelReader, copy_side_files

    parallel = getattr(agg, "write_model", None)
    if parallel is not None:
        try:
            parallel(base_path, str(merged_path), spool.model_dir, shard_bytes,
                     {"tiesfed_method": config.options.method})
            copy_side_files(Path(base_path), spool.model_dir)
            return
        except Exception as e:  # e.g. the base is not readable on every node
            log.warning("round %s: parallel model write failed (%r); writing it here", config.round_id, e)
            spool.clear_outputs(keep_merged=True)
    with ModelReader(base_path) as base:
        apply_merged(base, merged_path, spool.model_dir, shard_bytes=shard_bytes)
