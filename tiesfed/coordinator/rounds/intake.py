"""How an upload enters a round: attach a stream, take its chunks, commit or withdraw it.

Chunks are written and validated without the round's lock (a session is its
stream's own); folding a record on arrival and committing take the lock, and
re-check that the upload is still wanted. Anything wrong withdraws the whole
upload (un-folding what it folded), so the round is left as it was.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Optional

from tiesfed.coordinator.metrics import rejection_reason, timed_fold
from tiesfed.coordinator.rounds import provenance
from tiesfed.coordinator.rounds.aggregation import fold_file
from tiesfed.coordinator.rounds.events import Receipt, RoundError
from tiesfed.coordinator.rounds.finalize import fail, maybe_finalize
from tiesfed.coordinator.rounds.state import RoundState
from tiesfed.coordinator.rounds.uploads import UploadSession
from tiesfed.protos.codec import End, Header, Record, join_spans
from tiesfed.trust import Peer

log = logging.getLogger("tiesfed.coordinator")


def begin(r: RoundState, client_id: str, offset: int, peer: Optional[Peer] = None) -> UploadSession:
    """Attach an upload stream: offset 0 starts over, anything else resumes. `peer` (the
    stream's verified certificate, None when insecure) checks the signature at commit."""
    with r.lock:
        try:
            r.check_participant(client_id)
            r._check_accepting(client_id, new=offset == 0)
            old = r.committed.get(client_id)
            s = r.uploads.attach(
                client_id, offset, discard=r._discard, clock=r.clock,
                live=r.fold_mode == "arrival" and old is None,
                compare=old if (old is not None and r.config.replace_policy == "refuse") else None,
            )
        except RoundError as e:  # refused before it took a byte: counted, said, re-raised
            reason = rejection_reason(e.code, e.message)
            if client_id in r.participants:  # no series for the ids of strangers
                r.metrics.rejected(r.id, client_id, reason, _held(r, client_id))
            log.warning("round %s: upload from %s refused (%s): %s", r.id, client_id, reason, e.message,
                        extra={"round": r.id, "client": client_id, "reason": reason})
            raise
        s.peer = peer
        log.info("round %s: upload from %s %s", r.id, client_id,
                 "started" if offset == 0 else f"resumed at byte {offset:,}",
                 extra={"round": r.id, "client": client_id, "offset": offset})
        return s


def detach(r: RoundState, s: UploadSession) -> Receipt:
    """The stream feeding `s` ended or broke: keep what arrived for a resume."""
    with r.lock:
        s.attached = False
        s.last_active = r.clock()
        if s.cleanup_pending:
            s.remove_partial()
        return Receipt(committed=False, committed_offset=0 if s.closed else s.offset,
                       committed_count=len(r.committed))


def feed(r: RoundState, s: UploadSession, offset: int, data: bytes, signature: bytes = b"") -> Optional[Receipt]:
    """Take one chunk (and the upload's signature, on the chunk with its last bytes).
    Returns the receipt once the contribution is committed.

    Raises RoundError (after withdrawing the whole upload) when anything is wrong.
    """
    if s.closed:
        raise RoundError("FAILED_PRECONDITION", s.reason or "this upload is closed")
    try:
        s.check_chunk(offset, data, r.max_chunk_bytes)
        check_free_disk(r.spool.dir, len(data), r.min_free_disk_bytes)
        if signature:
            if len(signature) > provenance.MAX_SIGNATURE_BYTES:
                raise RoundError("INVALID_ARGUMENT", f"a signature of {len(signature)} bytes: at most "
                                 f"{provenance.MAX_SIGNATURE_BYTES} bytes are a DER ECDSA signature")
            s.signature = signature
        if not data:
            return None
        r.metrics.received(r.id, s.client_id, len(data), s.offset + len(data))
        if s.compare is not None:
            r.rules.check_unchanged(s, data)
        receipt = None
        for ev in s.append(data):
            if isinstance(ev, Record):
                take_record(r, s, ev)
            elif isinstance(ev, Header):
                r.rules.check_header(s, ev.meta)
            elif isinstance(ev, End):
                receipt = commit(r, s)
        s.last_active = r.clock()
        return receipt
    except RoundError as e:
        reject(r, s, e.message, rejection_reason(e.code, e.message))
        raise
    except Exception as e:  # an I/O error or a bug: withdraw, and say so
        log.exception("round %s: upload of %s failed", r.id, s.client_id)
        reject(r, s, f"internal error: {e!r}", "internal")
        raise RoundError("INTERNAL", f"coordinator error while receiving the upload: {e!r}") from e


def take_record(r: RoundState, s: UploadSession, ev: Record) -> None:
    """Validate one record; fold it at once if the upload folds on arrival. A span record
    is folded as it comes (its indices are the tensor's: the same sums, element by
    element and in the same order, as the whole record), so memory holds one span;
    except where the merge divides by the total weight of the folds (`average`), which
    counts each fold: there a tensor's spans are folded once, joined, when the last
    arrives, and the byte range of its records is what an un-fold or a later fold reads
    back (`read_record_at` joins them again)."""
    t = ev.tensor
    r.rules.check_record(s, t)
    offset, length = ev.offset, ev.length
    if t.is_span and r.spec.combine == "average":
        s.parts.append(ev)
        if s.cover.open is not None:
            return  # more spans of this tensor to come
        parts, s.parts = s.parts, []
        t = join_spans([p.tensor for p in parts])
        offset, length = parts[0].offset, ev.offset + ev.length - parts[0].offset
    if s.live:
        with r.lock:
            if s.closed:
                raise RoundError("FAILED_PRECONDITION", s.reason)
            r._check_accepting(s.client_id, new=False)
            if r.agg_pending:  # folded once the aggregator is up (`readiness.attach`)
                r._hold(s, t.name, offset, length, t)
                return
            timed_fold(r.agg, r.metrics, t.name, t.indices, t.values, r.participants[s.client_id].weight)
            r.canonical = False
            s.folded.append((t.name, offset, length))


def commit(r: RoundState, s: UploadSession) -> Receipt:
    """The end marker arrived: make the upload the client's contribution (or a no-op
    if identical to it), folding it as the round's fold mode says."""
    r.rules.check_complete(s)
    sha = s.seal()
    cid = s.client_id
    # before anything changes: a contribution its client did not sign is never committed
    signed = provenance.check_upload(r.config, cid, s.peer, s.signature, sha) if s.peer is not None else None
    weight = r.participants[cid].weight
    with r.lock:
        if s.closed:
            raise RoundError("FAILED_PRECONDITION", s.reason)
        r._check_accepting(cid, new=False)
        old = r.committed.get(cid)
        if old is not None and old.sha256 == sha:
            r._release_held(s.pending)
            s.pending = []
            r.uploads.close(s, "duplicate of the committed contribution")
            s.remove_partial()
            r._emit("UPLOAD_DUPLICATE", client_id=cid, sha256=sha, bytes=s.offset,
                    message="identical to the committed contribution: nothing changes")
            return Receipt(True, 0, sha, s.offset, s.nnz, duplicate=True, committed_count=len(r.committed))
        if old is not None and r.config.replace_policy == "refuse":
            raise RoundError(
                "FAILED_PRECONDITION",
                f"client {cid!r} already committed a different contribution (sha256 {old.sha256[:16]}…) "
                f"and round {r.id!r} refuses replacements",
            )
        if r.fold_mode == "final":
            pass  # folded in participant order when the round finalizes
        elif r.agg_pending:  # not up yet: attaching it folds the committed contributions
            r._release_held(r.held.pop(cid, []))  # a replaced contribution's records are not folded
            if s.live:
                r.held[cid], s.pending = s.pending, []  # every record of it, in stream order
        elif old is None:
            if not s.live:
                fold_file(r.agg, s.path, weight, +1, r.limits, r.metrics)
                r.canonical = False
        elif r.fold_mode == "arrival" and r.agg.exact():
            fold_file(r.agg, old.path, weight, -1, r.limits)
            fold_file(r.agg, s.path, weight, +1, r.limits, r.metrics)
            r.canonical = False
            if not r.agg.exact():  # the swap itself was inexact: order-free state again
                r._rebuild({cid: s.path})
        else:
            try:
                r._rebuild({cid: s.path})
            except Exception as e:  # no aggregator to go on with
                log.exception("round %s: rebuilding the aggregator failed", r.id)
                fail(r, f"rebuilding the aggregator from the spool failed: {e!r}")
                raise RoundError("INTERNAL", f"round {r.id!r} failed: {r.message}") from e
        c = r.spool.commit(cid, s.path, sha, s.offset, s.nnz, signature=signed)
        r.committed[cid] = c
        r.uploads.close(s, "committed")
        r._persist()
        r.metrics.accepted(r.id, cid, s.offset)
        r._emit("UPLOAD_REPLACED" if old is not None else "UPLOAD_COMMITTED", client_id=cid, sha256=sha,
                bytes=s.offset, message=f"{s.nnz:,} nonzeros")
        receipt = Receipt(True, 0, sha, s.offset, s.nnz, replaced=old is not None,
                          committed_count=len(r.committed))
        maybe_finalize(r)
        return receipt


def check_free_disk(where: Path, incoming: int, reserve: int) -> None:
    """Refuse a chunk that would leave less than `reserve` bytes free where the spool lives:
    a full disk mid-round breaks every upload and the merge, a refused one breaks nothing."""
    if reserve <= 0:
        return
    free = shutil.disk_usage(where).free
    if free - incoming < reserve:
        raise RoundError("RESOURCE_EXHAUSTED", f"the coordinator's spool ({where}) is low on free disk: "
                         f"{free / 2**30:.2f} GiB free, this chunk {incoming} bytes, and the coordinator keeps "
                         f"{reserve / 2**30:.2f} GiB free (min_free_disk_bytes); the upload was withdrawn and the "
                         "round left as it was: retry once the operator frees space")


def reject(r: RoundState, s: UploadSession, why: str, reason: str = "other") -> None:
    """Withdraw an upload that failed validation; the round is left as it was. `reason`:
    the metrics' label (`tiesfed.coordinator.metrics.REASONS`)."""
    with r.lock:
        if s.closed:
            return
        r._discard(s, f"rejected: {why}")
        r.metrics.rejected(r.id, s.client_id, reason, _held(r, s.client_id))
        r._emit("UPLOAD_REJECTED", client_id=s.client_id, message=why, log_extra={"reason": reason})


def _held(r: RoundState, client_id: str) -> int:
    """The client's progress after a refusal: the bytes of its upload still open (a refused
    resume leaves it), else of its committed contribution, else 0."""
    s = r.sessions.get(client_id)
    if s is not None and not s.closed:
        return s.offset
    c = r.committed.get(client_id)
    return c.bytes if c is not None else 0
