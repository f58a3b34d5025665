"""Long-lived calls (Upload, Watch, Download, a waiting ReserveUpload) counted and capped.

gRPC's sync server runs each call on a worker thread for as long as it lasts,
so idle streams could take every thread and leave none for the short calls
(GetRoundSpec, UploadStatus, ...). `StreamGate` admits a long-lived call only
while its pool (total) and the caller's own count (per client id) are under
their caps; the caps add up to well below the server's worker threads, so a
short call always finds one. An excess call is refused at once with
RESOURCE_EXHAUSTED naming the limit, instead of queueing for a thread.

`ReadAhead` reads an upload's stream on a thread of its own, a few chunks ahead of
the worker thread that takes them. `StallWatch` cancels a Download (or a secure
round's poll answer) whose reader stopped reading: flow control would block its send, and hold its thread and capped
slot, for as long as the connection lives.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional

from tiesfed.coordinator.rounds import RoundError


@dataclass(frozen=True)
class Cap:
    """A kind of call: the pool it draws from, and how many one client id may hold."""

    pool: str
    per_client: int
    per_client_setting: Optional[str]  # the coordinator setting that sets `per_client` (None: fixed)


class StreamGate:
    """Counts the long-lived calls in flight, by pool and by (kind, client id)."""

    def __init__(self, pools: Mapping[str, tuple[int, str]], kinds: Mapping[str, Cap]) -> None:
        """`pools`: pool -> (most calls at once, the setting that says so); `kinds`: call -> Cap."""
        self.pools = dict(pools)
        self.kinds = dict(kinds)
        self._lock = threading.Lock()
        self._in_pool: Counter[str] = Counter()
        self._mine: Counter[tuple[str, str]] = Counter()

    def in_flight(self, pool: str | None = None) -> int:
        """Calls admitted now (in one pool, or in all)."""
        with self._lock:
            return self._in_pool[pool] if pool else sum(self._in_pool.values())

    def try_enter(self, kind: str, client_id: str) -> None:
        """Admit one call of `kind` for `client_id`, or raise RESOURCE_EXHAUSTED."""
        cap = self.kinds[kind]
        most, setting = self.pools[cap.pool]
        with self._lock:
            if self._mine[kind, client_id] >= cap.per_client:
                why = f"coordinator setting {cap.per_client_setting}" if cap.per_client_setting else "a fixed limit"
                raise RoundError(
                    "RESOURCE_EXHAUSTED",
                    f"client {client_id!r} already has {cap.per_client} {kind} call(s) open, the most one client "
                    f"id may hold ({why}); close one first",
                )
            if self._in_pool[cap.pool] >= most:
                raise RoundError(
                    "RESOURCE_EXHAUSTED",
                    f"the coordinator serves {most} {cap.pool} call(s) at once (coordinator setting {setting}) "
                    "and all are taken; retry later",
                )
            self._in_pool[cap.pool] += 1
            self._mine[kind, client_id] += 1

    def leave(self, kind: str, client_id: str) -> None:
        with self._lock:
            self._in_pool[self.kinds[kind].pool] -= 1
            self._mine[kind, client_id] -= 1
            if not self._mine[kind, client_id]:
                del self._mine[kind, client_id]

    @contextmanager
    def held(self, kind: str, client_id: str) -> Iterator[None]:
        """`try_enter` ... `leave`: the count drops when the handler's thread lets go,
        not when the client hangs up, since the thread is what the cap protects."""
        self.try_enter(kind, client_id)
        try:
            yield
        finally:
            self.leave(kind, client_id)


class ReadAhead:
    """A call's request stream read on a thread of its own, at most `depth` messages ahead,
    so that receiving the next chunk of an upload overlaps taking this one (writing it,
    decoding and validating its records, folding them). Memory: `depth` messages.

    Messages, then the end or the error that ended the stream, come out in order, as
    from the stream itself. `stop` lets the reader go; it does not wait for it, since it
    may be blocked in the stream until the call ends, which it then sees and exits."""

    _END = object()

    def __init__(self, stream: Iterator, depth: int, name: str) -> None:
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._done = False
        threading.Thread(target=self._read, args=(stream,), name=name, daemon=True).start()

    def _read(self, stream: Iterator) -> None:
        try:
            for message in stream:
                if not self._put((message, None)):
                    return
            self._put((self._END, None))
        except BaseException as e:  # the stream broke: the taker raises it where it would have
            self._put((self._END, e))

    def _put(self, entry: tuple) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> "ReadAhead":
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        message, error = self._q.get()
        if message is not self._END:
            return message
        self._done = True
        if error is not None:
            raise error
        raise StopIteration

    def stop(self) -> None:
        self._stop.set()
        self._done = True
        while True:  # what was read ahead is let go now
            try:
                self._q.get_nowait()
            except queue.Empty:
                return


class StallWatch:
    """Server-streaming calls that must keep sending: one whose last message has not gone out
    for `stall_after_s` (its reader stopped reading) is cancelled by `cancel_stalled`, which
    the rounds' ticker calls."""

    def __init__(self, stall_after_s: float) -> None:
        self.stall_after_s = stall_after_s
        self._lock = threading.Lock()
        self._calls: dict[int, list] = {}  # id -> [last progress (monotonic), cancel]
        self._next = 0

    @contextmanager
    def watch(self, cancel: Callable[[], object]) -> Iterator[Callable[[], None]]:
        """Watch one call; yields `progress()`, to call each time a message has gone out."""
        with self._lock:
            key, self._next = self._next, self._next + 1
            entry = self._calls[key] = [time.monotonic(), cancel]

        def progress() -> None:
            entry[0] = time.monotonic()

        try:
            yield progress
        finally:
            with self._lock:
                self._calls.pop(key, None)

    def cancel_stalled(self, now: Optional[float] = None) -> int:
        """Cancel every watched call without progress for `stall_after_s`; how many."""
        now = time.monotonic() if now is None else now
        with self._lock:
            stalled = [k for k, (last, _) in self._calls.items() if now - last >= self.stall_after_s]
            cancels = [self._calls.pop(k)[1] for k in stalled]
        for cancel in cancels:
            cancel()
        return len(cancels)
