"""Upload slots: how many upload streams are read at once, and who holds them.

At most `capacity` streams are read at once, whatever the number of clients,
so memory stays flat. A client first reserves a slot (`reserve`, a lease: it
holds no stream while it waits), then opens its Upload stream, which claims
the lease (`hold`). The rules that keep honest clients from being starved:

- first come, first served: waiters queue, and a free slot goes to the head;
- one client id holds at most one slot, as a lease or as a stream, and has at
  most one upload stream open, so a few ids cannot take every slot;
- progress is bytes: a holder that delivers no new bytes for `stall_after_s`
  is cancelled by `cancel_stalled` (a stream of empty chunks is not progress);
- and rate: while another client waits for a slot, a holder that has averaged
  under `min_rate` bytes a second since it took its slot (after a grace of
  `stall_after_s`) gives it up, so a few bytes now and then cannot keep a slot
  from the others (the client resumes where it was, from the back of the queue);
- every wait is bounded, and an unclaimed lease lapses after `lease_s`.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from tiesfed.coordinator.rounds.events import RoundError

log = logging.getLogger("tiesfed.coordinator")

#: Longest a ReserveUpload call waits for a slot (the client asks again after it).
MAX_RESERVE_WAIT_S = 60.0
#: Longest a client's new upload stream waits for its own previous one to let go.
OWN_STREAM_WAIT_S = 5.0
#: How often a waiting upload stream checks that its caller is still there.
_WAIT_STEP_S = 0.5


@dataclass(eq=False)
class _Stream:
    """One client's upload stream: waiting for a slot, or holding one."""

    client_id: str
    cancel: Callable[[], object]
    last_progress: float
    holding: bool = False
    held_since: float = 0.0  # when it took its slot
    delivered: int = 0  # new bytes since then

    def too_slow(self, now: float, grace_s: float, min_rate: float) -> bool:
        return self.delivered < min_rate * (now - self.held_since - grace_s)


def _always() -> bool:
    return True


class UploadSlots:
    """The upload slots of one coordinator; thread-safe (one condition guards all)."""

    def __init__(self, capacity: int, stall_after_s: float, lease_s: float, min_rate: float = float(1 << 20)) -> None:
        self.capacity = capacity
        self.stall_after_s = stall_after_s
        self.min_rate = min_rate
        self.lease_s = lease_s
        self._cond = threading.Condition()
        self._free = capacity
        self._queue: deque[object] = deque()  # waiters, first come first served
        self._streams: dict[str, _Stream] = {}  # the one upload stream of each client
        self._leases: dict[str, tuple[str, float]] = {}  # client -> (lease, monotonic expiry)

    # ------------------------------------------------------------------ state (tests, status)

    def holders(self) -> dict[str, str]:
        """Who holds a slot now: client id -> "lease" or "stream"."""
        with self._cond:
            out = {c: "lease" for c in self._leases}
            out.update({c: "stream" for c, s in self._streams.items() if s.holding})
            return out

    @property
    def free(self) -> int:
        with self._cond:
            return self._free

    # ------------------------------------------------------------------ taking a slot

    def _take(self, deadline: float, wanted: Callable[[], bool]) -> bool:
        """Under the condition: queue for a slot until `deadline`; False if none came
        or the waiter stopped being `wanted` (its caller left, its client changed)."""
        me = object()
        self._queue.append(me)
        try:
            while True:
                if not wanted():
                    return False
                if self._queue[0] is me and self._free > 0:
                    self._free -= 1
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, _WAIT_STEP_S))
        finally:
            self._queue.remove(me)
            self._cond.notify_all()  # the next in line may be at the head now

    def reserve(self, client_id: str, wait_s: float) -> Optional[str]:
        """A lease on a slot for `client_id`, waiting up to `wait_s` (None if none came).

        A client that already holds a lease gets that lease again (its expiry
        unchanged); one whose upload stream is still open waits for it to end
        first: never a second slot."""
        deadline = time.monotonic() + min(max(wait_s, 0.0), MAX_RESERVE_WAIT_S)

        def no_stream() -> bool:
            return client_id not in self._streams

        with self._cond:
            while True:
                held = self._leases.get(client_id)
                if held is not None:
                    return held[0]
                if no_stream() and self._take(deadline, no_stream):
                    lease = secrets.token_hex(16)
                    self._leases[client_id] = (lease, time.monotonic() + self.lease_s)
                    return lease
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, _WAIT_STEP_S))

    @contextmanager
    def hold(
        self, client_id: str, cancel: Callable[[], object], alive: Callable[[], bool] = _always,
        wait_s: Optional[float] = None,
    ) -> Iterator[Callable[[int], None]]:
        """Hold a slot for an upload stream of `client_id`: the client's lease if it holds
        one, else the next free slot within `wait_s` (default `lease_s`). Yields
        `progress(nbytes)`, to call with each chunk's size: only new bytes count.

        RESOURCE_EXHAUSTED if the client's other upload stream does not end within
        OWN_STREAM_WAIT_S, or no slot comes in time."""
        entry = _Stream(client_id, cancel, time.monotonic())
        wait = self.lease_s if wait_s is None else wait_s
        with self._cond:
            if not self._cond.wait_for(lambda: client_id not in self._streams, OWN_STREAM_WAIT_S):
                raise RoundError(
                    "RESOURCE_EXHAUSTED",
                    f"client {client_id!r} already has an upload stream open: one per client id at a time",
                )
            self._streams[client_id] = entry
            try:
                if self._leases.pop(client_id, None) is None and not self._take(time.monotonic() + wait, alive):
                    raise RoundError(
                        "RESOURCE_EXHAUSTED",
                        f"no upload slot came free within {wait:g} s ({self.capacity} slot(s), "
                        "--max-active-uploads): reserve one with ReserveUpload, then upload",
                    )
            except BaseException:
                del self._streams[client_id]
                self._cond.notify_all()
                raise
            entry.holding = True
            entry.last_progress = entry.held_since = time.monotonic()

        def progress(nbytes: int) -> None:
            if nbytes > 0:
                entry.last_progress = time.monotonic()
                entry.delivered += nbytes

        try:
            yield progress
        finally:
            with self._cond:
                if self._streams.get(client_id) is entry:
                    del self._streams[client_id]
                self._free += 1
                self._cond.notify_all()

    # ------------------------------------------------------------------ the ticker's work

    def cancel_stalled(self) -> int:
        """Cancel every holder without new bytes for `stall_after_s`, and, while someone waits
        for a slot, every holder under `min_rate`; how many."""
        now = time.monotonic()
        with self._cond:
            waiting = bool(self._queue)
            stalled = [s for s in self._streams.values()
                       if s.holding and now - s.last_progress > self.stall_after_s]
            slow = [s for s in self._streams.values() if s.holding and waiting and s not in stalled
                    and s.too_slow(now, self.stall_after_s, self.min_rate)]
            for s in stalled + slow:
                s.last_progress = now  # once per stall
                s.held_since, s.delivered = now, 0  # and a fresh account: cancelled once, not at every tick
        for s in stalled:
            log.warning("cancelling the upload stream of %r: no new bytes for %.0f s", s.client_id,
                        self.stall_after_s)
            s.cancel()
        for s in slow:
            log.warning("cancelling the upload stream of %r: under %s bytes/s while another client waits for a "
                        "slot (it resumes from where it was)", s.client_id, f"{self.min_rate:,.0f}")
            s.cancel()
        return len(stalled) + len(slow)

    def expire_leases(self) -> int:
        """Free the slots of leases not claimed in time; how many."""
        now = time.monotonic()
        with self._cond:
            lapsed = [c for c, (_, exp) in self._leases.items() if now > exp]
            for c in lapsed:
                del self._leases[c]
            if lapsed:
                self._free += len(lapsed)
                self._cond.notify_all()
        return len(lapsed)
