"""How a round ends: finalized when quorum is met and everyone is in, the deadline
passed or an admin asked; failed on abort, a missed quorum or an error.

Finalization runs once, on a thread of its own: under the lock the round turns
"finalizing" (uploads in progress are stopped); outside it (it takes as long as
the merge) the merged task vector is written as a codec stream, and the merged
model when the coordinator has the base; under the lock again the round records
the result. Either end lets the accumulators go.

A failed attempt (a full disk, an I/O error) is retried `FINALIZE_ATTEMPTS` times
with doubling backoff, each from a clean slate: partial outputs removed, the
aggregator rebuilt from the committed spool. After the last the round fails with
the error, marked so that a restarted coordinator finalizes it again from the
spool. An admin abort fails the round but keeps every committed contribution
(files and pointers) on disk: the audit trail of what was submitted.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional

import torch

from tiesfed.coordinator.aggregator import AggregatorLike
from tiesfed.coordinator.rounds import provenance, readiness
from tiesfed.coordinator.rounds.aggregation import exact_sums, release
from tiesfed.coordinator.rounds.config import RoundConfig
from tiesfed.coordinator.rounds.events import Merged, RoundError
from tiesfed.coordinator.rounds.model_copy import copy_after_publish, write_copy, write_model  # noqa: F401
from tiesfed.coordinator.rounds.state import RoundState
from tiesfed.coordinator.spool import RoundSpool
from tiesfed.core.accumulators import FinalizeSpec, majority_sign
from tiesfed.io.files import write_atomic
from tiesfed.protos.codec import SparseTensor, StreamWriter

log = logging.getLogger("tiesfed.coordinator")

FINALIZE_ATTEMPTS = 3
FINALIZE_BACKOFF_S = 0.5  # before the second attempt; doubled for each further one


def maybe_finalize(r: RoundState, now: Optional[float] = None) -> None:
    """Finalize when quorum is met and everyone is in, or the deadline passed, or an admin asked."""
    if r.state != "open" or len(r.committed) < r.quorum:
        return
    if len(r.committed) == len(r.participants) or r.deadline_passed(now) or r.close_requested:
        start_finalizer(r)


def start_finalizer(r: RoundState, body: Optional[Callable[[], None]] = None) -> None:
    """Run `finalize` on the round's finalizer thread, once; or `body` (finalizing a
    finished round again, lock held) once the previous thread is through."""
    if body is None and r._finalizer is not None:
        return
    if r._finalizer is not None:
        r._finalizer.join()  # it recorded its result under the lock we hold: nothing is left
    r._finalizer = threading.Thread(target=body or (lambda: finalize(r)), name=f"finalize-{r.id}", daemon=True)
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
            abort_round(r)
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


def abort_round(r: RoundState) -> None:
    """Admin abort (lock held): the round fails, uploads in progress are withdrawn, and
    every committed contribution stays on disk, file and pointer, as the audit trail.
    A round that failed to finalize can be aborted too, so a restart leaves it failed."""
    if r.state == "finalizing":
        raise RoundError("FAILED_PRECONDITION", f"round {r.id!r} is finalizing: too late to abort")
    if r.state == "finalized" or (r.state == "failed" and not r.refinalize_on_restart):
        raise RoundError("FAILED_PRECONDITION", f"round {r.id!r} is already {r.state}")
    kept = sorted(r.committed)
    why = "aborted by the admin"
    if r.state == "failed":
        why += f" after: {r._message}"
    why += (f"; {len(kept)} committed contribution(s) kept in the spool for audit ({', '.join(kept)})"
            if kept else "; nothing was committed")
    r.refinalize_on_restart = False
    fail(r, why)


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
    """The finalizer thread's body: stop taking uploads, then write the outputs."""
    with r.lock:
        if r.state != "open":
            return
        r.state = "finalizing"
        for s in list(r.sessions.values()):
            r._discard(s, "stopped: the round is finalizing")
        r._persist()
        r._emit("ROUND_FINALIZING", message=f"merging {len(r.committed)} contribution(s)")
        contributors = sorted(r.committed)
    write_outputs(r, contributors)


def write_outputs(r: RoundState, contributors: list[str]) -> None:
    """Write the merged stream and model of a finalizing round, retrying failed attempts
    (see the module's docstring); record the result, or the failure."""
    delay = FINALIZE_BACKOFF_S
    started = time.monotonic()
    for attempt in range(1, FINALIZE_ATTEMPTS + 1):
        try:
            merged = attempt_outputs(r, contributors)
            break
        except Exception as e:
            log.exception("round %s: finalization attempt %d of %d failed", r.id, attempt, FINALIZE_ATTEMPTS)
            with r.lock:
                release(r.agg)
                r.agg = None  # the next attempt rebuilds it from the committed spool
            try:
                r.spool.clear_outputs()  # no partial output outlives a failed attempt
            except OSError:
                log.exception("round %s: removing the partial outputs failed", r.id)
            if attempt < FINALIZE_ATTEMPTS:
                r._emit("ROUND_FINALIZING", message=f"finalization attempt {attempt} of {FINALIZE_ATTEMPTS} "
                        f"failed ({e!r}): retrying in {delay:g} s")
                time.sleep(delay)
                delay *= 2
                continue
            with r.lock:
                r.state = "failed"
                r.refinalize_on_restart = True
                r.message = (f"finalization failed after {attempt} attempt(s): {e!r}; the committed "
                             "contributions are kept: a restart of the coordinator finalizes again from the spool")
                persist_or_log(r)
                r._emit("ROUND_FAILED", message=r.message)
            return
    with r.lock:
        r.state = "finalized"
        r.merged = merged
        mark_verified(r)
        agg, r.agg = r.agg, None  # the accumulators are no longer needed (but by the model copy)
        r.model_pending = bool(r.publish_first and r.base_path)
        if not r.model_pending:
            release(agg)
        persist_or_log(r)
        secs = time.monotonic() - started
        log.info("round %s: merged %d contribution(s) in %.2f s: sha256 %s, %s bytes", r.id, len(contributors),
                 secs, merged.sha256[:16], f"{merged.bytes:,}",
                 extra={"round": r.id, "sha256": merged.sha256, "bytes": merged.bytes, "seconds": round(secs, 3)})
        r._emit("ROUND_FINALIZED", sha256=merged.sha256, bytes=merged.bytes,
                message="; ".join(m for m in (f"majority sign {merged.majority_sign:+d}", r.message) if m))
    if r.model_pending:  # clients fetch the merged stream while the coordinator writes its copy
        copy_after_publish(r, agg, merged, contributors)


def attempt_outputs(r: RoundState, contributors: list[str]) -> Merged:
    """One attempt at the outputs, from an aggregator holding the committed contributions."""
    readiness.ensure(r)  # an aggregator still starting: wait for it, fold what the round holds
    if r.agg is None and r.fold_mode != "final":  # a retry, or finalizing again: rebuild it
        r._rebuild()
    if r.fold_mode == "final" or not (r.canonical or r.agg.exact() or not exact_sums(r.spec)):
        r._rebuild()  # participant order: the result must not depend on arrival order
    # float32 sums (sum_dtype) are inexact by choice: the result follows the commit order, no rebuild
    started = time.monotonic()
    merged = write_merged(r.agg, contributors, r.config, r.spec, r.spool)
    log.info("round %s: merged stream written in %.2f s", r.id, time.monotonic() - started,
             extra={"round": r.id, "seconds": round(time.monotonic() - started, 3)})
    provenance.sign_merged(r, merged, contributors)
    if r.base_path and not r.publish_first:  # publish_first: written once the round is finalized
        write_copy(r, r.agg, merged, contributors)
    return merged


def persist_or_log(r: RoundState) -> None:
    """Write the state file; if that fails too (the disk that failed the outputs), the file
    still says finalizing, so a restart finalizes again: log it and go on."""
    try:
        r._persist()
    except OSError:
        log.exception("round %s: writing the state file failed", r.id)


def stat_signature(path: Path) -> Optional[tuple[int, int, int]]:
    """(size, mtime_ns, inode) of a file: unchanged means no need to hash it again."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


def mark_verified(r: RoundState) -> None:
    """The round's merged stream was just written or hashed: note its file's signature and when."""
    sig = stat_signature(r.merged.path) if r.merged is not None else None
    r.merged_verified = (sig, time.monotonic()) if sig is not None else None


def write_merged(
    agg: AggregatorLike, contributors: list[str], config: RoundConfig, spec: FinalizeSpec, spool: RoundSpool
) -> Merged:
    """sign_balance all-reduce -> finalize -> the merged task vector as a codec stream."""
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
    if spec.sum_dtype != torch.float64:
        header["sum_dtype"] = str(spec.sum_dtype).removeprefix("torch.")  # the result is not the exact one
    digest: dict = {}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as raw:
            f = HashingWriter(raw)  # the file's sha256 as it is written, not read back after
            w = StreamWriter(f, header)
            # records straight from an aggregator that makes them (spill: cut as merged_records cuts);
            # else read-only views where the aggregator has them (no copy of each tensor)
            records = getattr(agg, "finalize_records", None)
            for st in (one_ahead(records(majority, shapes, SPAN_ELEMS)) if records is not None else
                       sparse_ahead(getattr(agg, "finalize_views", agg.finalize)(majority), shapes)):
                w.write(st)
            w.close()
        digest.update(sha=f.sha256.hexdigest(), size=f.size)

    write_atomic(spool.merged_path, write)
    return Merged(digest["sha"], digest["size"], majority, spool.merged_path)


#: Elements of two consecutive tensors up to which the next one is finalized while this
#: one is encoded (the driver then holds both); above it, one tensor at a time.
OVERLAP_ELEMS = 1 << 26
#: A merged tensor larger than this goes out as span records of this many elements: the
#: coordinator then holds one span's nonzeros at a time, not the whole tensor's.
SPAN_ELEMS = 1 << 24


def merged_records(dense: Iterator[tuple[str, torch.Tensor]], shapes: dict[str, tuple[int, ...]]
                   ) -> Iterator[SparseTensor]:
    """The nonzeros of each merged tensor as one record, or as span records of
    `SPAN_ELEMS` elements for a larger tensor (readers join them: the same tensor)."""
    from tiesfed.core.apply import dense_to_sparse

    for name, tau in dense:
        flat = tau.reshape(-1)
        n = flat.numel()
        if n <= SPAN_ELEMS:
            idx, val = dense_to_sparse(flat)
            yield SparseTensor(name, shapes[name], idx, val)
            continue
        for lo in range(0, n, SPAN_ELEMS):
            hi = min(n, lo + SPAN_ELEMS)
            idx, val = dense_to_sparse(flat[lo:hi])
            yield SparseTensor(name, shapes[name], idx + lo, val, start=lo, count=hi - lo)


def one_ahead(records: Iterator[SparseTensor]) -> Iterator[SparseTensor]:
    """The next record made on a worker thread while the caller encodes this one; records
    are at most `SPAN_ELEMS` elements, so two of them stay small."""
    with ThreadPoolExecutor(1, thread_name_prefix="records-ahead") as pool:
        nxt = pool.submit(next, records, None)
        while (st := nxt.result()) is not None:
            nxt = pool.submit(next, records, None)
            yield st
            del st


def sparse_ahead(dense: Iterator[tuple[str, torch.Tensor]], shapes: dict[str, tuple[int, ...]]
                 ) -> Iterator[SparseTensor]:
    """`merged_records`, the next record made on a worker thread while the caller encodes
    and writes this one (torch and zlib release the GIL). The next tensor is finalized
    ahead only when it has at most `OVERLAP_ELEMS` elements (else the coordinator would
    hold two big tensors); the same records in the same order either way."""
    records = merged_records(iter(dense), shapes)
    names = list(shapes)
    after = {a: math.prod(shapes[b]) for a, b in zip(names, names[1:])}
    with ThreadPoolExecutor(1, thread_name_prefix="finalize-ahead") as pool:
        nxt = pool.submit(next, records, None)
        while (st := nxt.result()) is not None:
            ahead = st.stop < st.numel or after.get(st.name, 0) <= OVERLAP_ELEMS
            nxt = pool.submit(next, records, None) if ahead else None
            yield st
            del st
            if nxt is None:
                nxt = pool.submit(next, records, None)


class HashingWriter:
    """A binary file's `write` that also takes the sha256 and size of what was written."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        n = self._f.write(data)
        n = len(data) if n is None else n
        self.sha256.update(memoryview(data)[:n])
        self.size += n
        return n
