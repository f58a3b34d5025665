"""Whether the rounds' aggregator can be built yet, and a round catching up once it can.

A coordinator listens at once; its aggregator (a Ray session and its shard actors)
starts in the background. Meanwhile uploads are received, validated record by
record and spooled as always; the records of an upload that would fold on arrival
are noted as pending instead (`UploadSession.pending`) and committed contributions
wait in the spool. Once the aggregator is up, `attach` builds the round's aggregator
(outside the round's lock: actors take seconds to start) and folds, under the lock,
exactly what a restart would: the committed contributions in participant order, then
the records live uploads hold so far, which from then on fold on arrival. A round
never finalizes before that: the finalizer waits for `attach` (`ensure`).

If the aggregator fails to start, `AggregatorReadiness` says so (status messages,
the metrics) and new uploads are refused with UNAVAILABLE naming the error.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Literal, Optional

from tiesfed.coordinator.metrics import timed_fold
from tiesfed.coordinator.rounds.aggregation import fold_file, release
from tiesfed.coordinator.rounds.events import RoundError
from tiesfed.protos.codec import read_record_at

if TYPE_CHECKING:
    from tiesfed.coordinator.rounds.state import RoundState

log = logging.getLogger("tiesfed.coordinator")

ReadyState = Literal["starting", "ready", "failed"]


class AggregatorReadiness:
    """starting -> ready, or starting -> failed; thread-safe. `what` names the aggregator
    in messages (e.g. "Ray")."""

    def __init__(self, ready: bool = True, what: str = "aggregator") -> None:
        self.what = what
        self.state: ReadyState = "ready" if ready else "starting"
        self.error = ""
        self.started = time.monotonic()
        self._cond = threading.Condition()

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def set_ready(self) -> None:
        with self._cond:
            self.state = "ready"
            self._cond.notify_all()

    def set_failed(self, error: str) -> None:
        with self._cond:
            self.state = "failed"
            self.error = error
            self._cond.notify_all()

    def wait_settled(self, timeout: Optional[float] = None) -> bool:
        """Block until the start ended, ready or failed (True), or `timeout` (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: self.state != "starting", timeout)

    def wait_ready(self, timeout: Optional[float] = None) -> bool:
        """Block until ready (True) or `timeout` (False); RoundError UNAVAILABLE once failed."""
        with self._cond:
            self._cond.wait_for(lambda: self.state != "starting", timeout)
        self.check()
        return self.ready

    def check(self) -> None:
        """RoundError UNAVAILABLE, naming the error, if the aggregator failed to start."""
        if self.state == "failed":
            raise RoundError("UNAVAILABLE", self.note())

    def note(self) -> str:
        """What a status says about the aggregator: nothing once it is ready."""
        if self.state == "starting":
            return (f"the coordinator's aggregator ({self.what}) is starting "
                    f"({time.monotonic() - self.started:.0f} s so far): uploads are received and spooled "
                    "now, and folded once it is up")
        if self.state == "failed":
            return (f"the coordinator's aggregator ({self.what}) failed to start: {self.error}; it cannot "
                    "merge, and takes no uploads until it is restarted")
        return ""


#: The readiness of an aggregator that needs no starting (the in-process one).
ALWAYS_READY = AggregatorReadiness(ready=True)


def attach(r: "RoundState") -> bool:
    """Give a round whose aggregator was waiting (`agg_pending`) its aggregator, folding
    what it holds (see the module). Idempotent, and one build at a time (the finalizer
    and the starter both may call it; the second waits for the first); returns whether
    this call attached it. Raises what building the aggregator raises (it stays pending)."""
    while True:
        with r.lock:
            if not r.agg_pending:
                return False
            if r.fold_mode == "final" or r.state in ("finalized", "failed"):
                r.agg_pending = False  # folded (if ever) when the round finalizes
                _let_go(r)
                return True
            busy = r.attaching
            if busy is None:  # ours to build: two at once could hold every CPU of the cluster
                r.attaching = busy = threading.Event()
                break
        busy.wait()
    try:
        started = time.monotonic()
        agg = r._new_aggregator()  # not under the lock: Ray actors take a while to start
        built = time.monotonic() - started
        with r.lock:
            if r.state in ("finalized", "failed"):  # aborted meanwhile: nothing to fold
                release(agg)
                r.agg_pending = False
                _let_go(r)
                return False
            try:
                held = _fold_held(r, agg)
            except BaseException:  # nothing half-folded stays: the round waits for another attach
                release(agg)
                raise
            r.agg, r.agg_pending = agg, False
            log.info("round %s: aggregator ready (built in %.1f s); folded %d committed contribution(s) and %d "
                     "record(s) received while it started", r.id, built, len(r.committed), held,
                     extra={"round": r.id, "committed": len(r.committed), "records": held,
                            "seconds": round(built, 3)})
            return True
    finally:
        with r.lock:
            r.attaching = None
        busy.set()


def _fold_held(r: "RoundState", agg) -> int:
    """Fold what the round holds into its new aggregator (lock held): the committed
    contributions in participant order, then the records of live uploads, which from now
    on count as folded (withdrawable). A record kept decoded is folded as it is; one that
    was not (the buffer was full), or a contribution recovered from the spool, is read
    back from its file. Returns the number of records received while it started."""
    records = 0
    for cid, p in r.participants.items():
        c = r.committed.get(cid)
        if c is None:
            continue
        held = r.held.get(cid)
        if held is None:  # recovered from the spool, or folded at commit (commit mode)
            fold_file(agg, c.path, p.weight, +1, r.limits, r.metrics)
            continue
        records += len(held)
        _fold_records(r, agg, c.path, held, p.weight)
    live = [s for s in r.sessions.values() if s.live and not s.closed and s.pending]
    for s in live:
        records += len(s.pending)
        _fold_records(r, agg, s.path, s.pending, r.participants[s.client_id].weight)
    for s in live:  # folded: from now on they are withdrawn by un-folding
        s.folded.extend((name, off, length) for name, off, length, _ in s.pending)
        s.pending = []
    _let_go(r)
    r.canonical = not live
    return records


def _fold_records(r: "RoundState", agg, path, records: list, weight: float) -> None:
    with open(path, "rb") as f:
        for name, off, length, t in records:
            if t is None:
                t = read_record_at(f, off, length, r.limits)
            timed_fold(agg, r.metrics, name, t.indices, t.values, weight)


def _let_go(r: "RoundState") -> None:
    """No record is held any more: their memory goes back."""
    r.held.clear()
    for s in r.sessions.values():
        s.pending = [(name, off, length, None) for name, off, length, _ in s.pending]
    r.held_bytes = 0


def ensure(r: "RoundState") -> None:
    """Before a round finalizes: wait for the aggregator, then attach it (RoundError
    UNAVAILABLE if it failed to start)."""
    if r.agg_pending:
        r.readiness.wait_ready()
        attach(r)
