"""What a round is: its configuration as the round uses it, its mutable state and lock,
and the bookkeeping every flow shares (events, the state file, the aggregator).

`Round` (round.py) is this state plus the public API; the flows that change it
live in `intake` (uploads entering) and `finalize` (the round ending), as
functions over a `RoundState`. Underscored members are the package's internals,
used by those modules; everything outside the package goes through `Round`.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator, Literal, Optional

from tiesfed.coordinator.aggregator import AggregatorLike
from tiesfed.coordinator.memory import sum_dtype_of
from tiesfed.coordinator.metrics import NO_METRICS, Metrics, timed_fold
from tiesfed.coordinator.rounds.aggregation import (
    AggregatorFactory,
    FoldedRecord,
    FoldMode,
    choose_fold_mode,
    default_aggregator_factory,
    new_aggregator,
    read_folded,
    release,
)
from tiesfed.coordinator.rounds.config import RoundConfig
from tiesfed.coordinator.rounds.events import Event, EventLog, Merged, RoundError
from tiesfed.coordinator.rounds.readiness import ALWAYS_READY, AggregatorReadiness
from tiesfed.coordinator.rounds.uploads import UploadRegistry, UploadSession
from tiesfed.coordinator.rounds.validation import ContributionRules, limits_for
from tiesfed.coordinator.spool import Committed, RoundSpool
from tiesfed.core.methods import get_method
from tiesfed.io.model_io import DEFAULT_SHARD_BYTES
from tiesfed.protos.v1 import MAX_CHUNK_BYTES
from tiesfed.trust import Identity

log = logging.getLogger("tiesfed.coordinator")

State = Literal["open", "finalizing", "finalized", "failed"]


class RoundState:
    """One round's state. Thread-safe; all state changes under `lock`."""

    def __init__(
        self,
        config: RoundConfig,
        spool: RoundSpool,
        aggregator_factory: AggregatorFactory = default_aggregator_factory,
        *,
        base_path: Optional[str] = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        max_chunk_bytes: int = MAX_CHUNK_BYTES,
        pending_buffer_bytes: int = 1 << 30,
        min_free_disk_bytes: int = 0,
        abandon_after_s: float = 300.0,
        clock: Callable[[], float] = time.time,
        signer: Optional[Identity] = None,
        metrics: Metrics = NO_METRICS,
        readiness: AggregatorReadiness = ALWAYS_READY,
        sum_dtype: str = "float64",
        publish_first: bool = False,
    ) -> None:
        self.config = config
        #: whether the factory can build aggregators yet (a coordinator starting Ray in the background)
        self.readiness = readiness
        #: where progress is reported (the coordinator's Prometheus metrics; by default nowhere)
        self.metrics = metrics
        #: the coordinator's identity, which signs the merge (None: an insecure coordinator signs nothing)
        self.signer = signer
        self.id = config.round_id
        self.spool = spool
        self.factory = aggregator_factory
        self.base_path = base_path
        self.shard_bytes = shard_bytes
        self.max_chunk_bytes = max_chunk_bytes
        self.abandon_after_s = abandon_after_s
        self.clock = clock

        opts = config.options
        method = get_method(opts.method)
        self.participants = {p.client_id: p for p in config.participants}
        weighted = any(p.weight != 1.0 for p in config.participants)
        #: float32 sums (the coordinator's `sum_dtype`) halve them, at the cost of exactness
        self.spec = replace(method.finalize_spec(opts, weighted), sum_dtype=sum_dtype_of(sum_dtype))
        self.trims = {p.client_id: method.trim_spec(opts, p.density) for p in config.participants}
        self.rules = ContributionRules(config, self.trims)
        self.manifest = self.rules.manifest
        self.total = self.rules.total
        self.budgets = self.rules.budgets
        self.fold_mode: FoldMode = choose_fold_mode((p.weight for p in config.participants), self.spec)
        self.limits = limits_for(config)

        self.lock = threading.RLock()
        self.event_log = EventLog(self.lock)
        self.cond = self.event_log.cond
        self.events: list[Event] = self.event_log.events
        self.uploads = UploadRegistry(self.id, spool, self.limits)
        self.sessions: dict[str, UploadSession] = self.uploads.by_client
        self.state: State = "open"
        self.message = ""
        self.close_requested = False
        self.merged: Optional[Merged] = None
        self.committed: dict[str, Committed] = {}
        self.agg: Optional[AggregatorLike] = None
        #: the aggregator waits for the factory (`readiness`): records and commits are spooled
        #: and folded when `readiness.attach` gives the round its aggregator. A secure round never
        #: has one: its sums are folded, unmasked and decoded block by block by `secure/`
        self.agg_pending = not readiness.ready and not config.secure_aggregation
        self.agg_error = ""  # why building this round's aggregator failed (it stays pending)
        self.attaching: Optional[threading.Event] = None  # set while `readiness.attach` builds it
        #: while pending: the records of contributions committed meanwhile (client -> its session's
        #: `pending`), and the bytes of decoded records kept in memory for the fold (`readiness`)
        self.held: dict[str, list] = {}
        self.held_bytes = 0
        self.pending_buffer_bytes = pending_buffer_bytes
        #: the spool's file system keeps at least this much free: a chunk that would eat into it is refused
        self.min_free_disk_bytes = min_free_disk_bytes
        #: the aggregator holds exactly the committed contributions folded in
        #: participant order (after `_rebuild`); any later fold makes it False
        self.canonical = True
        self.downloaded: set[str] = set()  # clients that fetched the whole merged stream
        self._deadline_seen = False
        self._finalizer: Optional[threading.Thread] = None
        #: clients whose committed contribution was found damaged on recovery -> what was
        #: wrong; shown in `message` until they upload again (persisted: survives restarts)
        self.lost: dict[str, str] = {}
        #: failed by a finalization error (not a rule): a restart finalizes again from the spool
        self.refinalize_on_restart = False
        #: finalize (clients fetch) once the merged stream is signed, then write the model copy
        self.publish_first = publish_first
        #: finalized, the coordinator's model copy not written yet (persisted: a restart writes it)
        self.model_pending = False
        #: ((size, mtime_ns, inode), monotonic time) of the merged stream's last sha256 check
        self.merged_verified: Optional[tuple[tuple[int, int, int], float]] = None

    def _new_aggregator(self) -> AggregatorLike:
        """From the factory; one that takes `replay` gets `self.replay`."""
        self.readiness.check()
        return new_aggregator(self.factory, self.config.manifest, self.spec, self.replay)

    def replay(self) -> Iterator[FoldedRecord]:
        """Everything folded into the aggregator now, as (name, indices, values, weight),
        read back from the spool: committed contributions in participant order, then
        the records live uploads have folded so far."""
        with self.lock:
            files: list[tuple[Path, float]] = []
            if self.fold_mode != "final" or self.state == "finalizing":
                files = [(self.committed[c].path, p.weight) for c, p in self.participants.items()
                         if c in self.committed]
            live = self.uploads.live_folded(self.participants)
        yield from read_folded(files, live, self.limits)

    @property
    def message(self) -> str:
        """Why the round failed (or what an admin or recovery said), followed by a notice
        for each client whose committed contribution was lost and not uploaded again."""
        notes = [lost_notice(cid, why, self.state) for cid, why in self.lost.items() if cid not in self.committed]
        return "; ".join(m for m in (self._message, *notes) if m)

    @message.setter
    def message(self, value: str) -> None:
        self._message = value

    def _persist(self) -> None:
        """Write the state file (atomically): what a restart needs to come back as it was."""
        self.lost = {c: why for c, why in self.lost.items() if c not in self.committed}
        st = {"state": self.state, "message": self._message, "close_requested": self.close_requested,
              "lost": self.lost, "refinalize_on_restart": self.refinalize_on_restart}
        if self.model_pending:
            st["model_pending"] = True
        if self.merged is not None:
            st.update(merged_sha256=self.merged.sha256, merged_bytes=self.merged.bytes,
                      majority_sign=self.merged.majority_sign)
        st["contributors"] = sorted(self.committed)
        self.spool.save_state(st)

    # ------------------------------------------------------------------ queries

    @property
    def quorum(self) -> int:
        return self.config.quorum or len(self.participants)

    @property
    def deadline(self) -> Optional[float]:
        return self.config.deadline_unix

    def deadline_passed(self, now: Optional[float] = None) -> bool:
        return self.deadline is not None and (now if now is not None else self.clock()) >= self.deadline

    def aggregator_note(self) -> str:
        """What the round's status says about its aggregator: starting or failed (else nothing)."""
        if self.readiness.state == "failed" or (self.agg_pending and not self.agg_error):
            return self.readiness.note()
        if self.agg_pending:
            return (f"the aggregator of round {self.id!r} could not be built: {self.agg_error}; it cannot merge, "
                    "and takes no uploads until the coordinator is restarted")
        return ""

    def _check_aggregator(self) -> None:
        """New uploads are refused (UNAVAILABLE) while nothing could merge them."""
        self.readiness.check()
        if self.agg_pending and self.agg_error and self.state == "open":
            raise RoundError("UNAVAILABLE", self.aggregator_note())

    def check_participant(self, client_id: str) -> None:
        if client_id not in self.participants:
            raise RoundError("PERMISSION_DENIED", f"client {client_id!r} is not on the allowlist of round {self.id!r}")

    def upload_status(self, client_id: str) -> tuple[int, str, Optional[Committed]]:
        """(bytes held of an upload in progress, sha256 of those bytes, the committed contribution)."""
        with self.lock:
            self.check_participant(client_id)
            s = self.sessions.get(client_id)
            c = self.committed.get(client_id)
            if s is None or s.closed:
                return 0, hashlib.sha256().hexdigest(), c
            with s.io_lock:
                return s.offset, s.sha.hexdigest(), c

    def _finished(self) -> bool:
        return self.state in ("finalized", "failed")

    def events_since(self, seq: int, timeout: float) -> list[Event]:
        """Events from `seq` on, waiting up to `timeout` for one if there is none yet."""
        return self.event_log.since(seq, timeout, self._finished)

    def wait_closed(self, timeout: Optional[float] = None) -> bool:
        """Block until the round is finalized or failed."""
        return self.event_log.wait_until(self._finished, timeout)

    def _emit(self, kind: str, log_extra: Optional[dict] = None, **kw) -> Event:
        """Record an event (for Watch), update the phase metric, log it (`log_extra`: more log fields)."""
        with self.cond:
            ev = self.event_log.append(time=self.clock(), kind=kind, committed=len(self.committed),
                                       expected=len(self.participants), state=self.state, **kw)
        self.metrics.phase(self.id, self.state)
        if kind == "ROUND_OPENED":
            self.metrics.members(self.id, {c: (self.committed[c].bytes if c in self.committed else None)
                                           for c in self.participants})
        log_event(self.id, ev, log_extra)
        return ev

    # ------------------------------------------------------------------ shared by the flows

    def _check_accepting(self, client_id: str, new: bool) -> None:
        if self.config.secure_aggregation:  # its contributions go through the SecureAggregation service
            raise RoundError("FAILED_PRECONDITION", f"round {self.id!r} is a secure-aggregation round: it takes "
                             "masked vectors through the SecureAggregation service (tiesfed client submit)")
        if self.state in ("finalizing", "finalized"):
            raise RoundError("FAILED_PRECONDITION", f"round {self.id!r} is {self.state}: it takes no more uploads")
        if self.state == "failed":
            raise RoundError("FAILED_PRECONDITION", f"round {self.id!r} failed: {self.message}")
        if new:
            self._check_aggregator()
        if new and self.config.late_policy == "reject" and self.deadline_passed():
            raise RoundError(
                "FAILED_PRECONDITION",
                f"round {self.id!r}: the deadline passed {self.clock() - self.deadline:.1f} s ago "
                "and the late-upload policy is reject",
            )

    def _discard(self, s: UploadSession, why: str) -> None:
        """Un-fold what `s` folded and drop it (lock held). If some sum was not
        exact, un-folding is not an exact inverse: rebuild from the spool, so the
        round is bit-identical to one that never saw the upload, whatever it held."""
        self._release_held(s.pending)
        s.pending = []
        folded = bool(s.live and s.folded and not s.closed)
        self.uploads.withdraw(s, why, self.agg, self.participants[s.client_id].weight)
        if folded and self.agg is not None and not self.agg.exact():
            log.warning("round %s: the withdrawn upload of %s made sums inexact: rebuilding from the spool",
                        self.id, s.client_id)
            self._rebuild()

    def _hold(self, s: UploadSession, name: str, offset: int, length: int, tensor) -> None:
        """A record validated while the aggregator is pending (lock held): noted, and kept
        decoded while the round's `pending_buffer_bytes` allow (else read again later)."""
        size = tensor.indices.nbytes + tensor.values.nbytes
        if self.held_bytes + size > self.pending_buffer_bytes:
            tensor, size = None, 0
        self.held_bytes += size
        s.pending.append((name, offset, length, tensor))

    def _release_held(self, records: list) -> None:
        """Records held for a fold that will not happen (lock held): their memory goes back."""
        for *_, t in records:
            if t is not None:
                self.held_bytes -= t.indices.nbytes + t.values.nbytes

    def _rebuild(self, replace: Optional[dict[str, Path]] = None, new: Optional[AggregatorLike] = None) -> None:
        """A fresh aggregator (or `new`, empty) from the committed spool (with `replace`
        swapped in), folded in participant order, then the records live uploads have
        folded so far (they stay withdrawable). The old one is let go first: a sharded
        one holds actors the new one needs. While the aggregator is pending nothing is
        folded: attaching it folds all of this then."""
        if new is None:
            if self.agg_pending:
                return
            release(self.agg)
            self.agg = None
            self.agg = self._new_aggregator()
        else:
            self.agg = new
        files = {cid: c.path for cid, c in self.committed.items()}
        files.update(replace or {})
        ordered = [(files[cid], p.weight) for cid, p in self.participants.items() if cid in files]
        live = self.uploads.live_folded(self.participants) if self.fold_mode == "arrival" else []
        for name, indices, values, weight in read_folded(ordered, live, self.limits):
            timed_fold(self.agg, self.metrics, name, indices, values, weight)
        self.canonical = not live


#: Events an operator should notice; the others are logged at INFO.
WARN_EVENTS = frozenset({"UPLOAD_REJECTED", "UPLOAD_ABANDONED", "ROUND_FAILED"})


def log_event(round_id: str, ev: Event, more: Optional[dict] = None) -> None:
    """One log line per round event, with the round and client as extra fields (for --log-format json)."""
    what = [ev.message] if ev.message else []
    if ev.bytes:
        what.insert(0, f"{ev.bytes:,} bytes")
    if ev.sha256:
        what.insert(1 if ev.bytes else 0, f"sha256 {ev.sha256[:16]}")
    extra = {"round": round_id, "event": ev.kind, "state": ev.state, "committed": ev.committed,
             "expected": ev.expected}
    if ev.client_id:
        extra["client"] = ev.client_id
    if ev.sha256:
        extra.update(sha256=ev.sha256, bytes=ev.bytes)
    extra.update(more or {})
    if "reason" in extra:
        what.insert(0, f"reason {extra['reason']}")
    who = f" {ev.client_id}" if ev.client_id else ""
    log.log(logging.WARNING if ev.kind in WARN_EVENTS else logging.INFO, "round %s: %s%s (%d/%d committed)%s",
            round_id, ev.kind, who, ev.committed, ev.expected, ": " + ", ".join(what) if what else "", extra=extra)


def lost_notice(client_id: str, why: str, state: str) -> str:
    """What the round says about a client whose committed contribution was lost."""
    if state == "open":
        return f"the committed contribution of {client_id!r} was lost ({why}): {client_id!r} must upload it again"
    return f"without {client_id!r}: its committed contribution was lost ({why}) and not uploaded again"
