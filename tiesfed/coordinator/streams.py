"""Long-lived calls (Upload, Watch, Download, a waiting ReserveUpload) counted and capped.

gRPC's sync server runs each call on a worker thread for as long as it lasts,
so idle streams could take every thread and leave none for the short calls
(GetRoundSpec, UploadStatus, ...). `StreamGate` admits a long-lived call only
while its pool (total) and the caller's own count (per client id) are under
their caps; the caps add up to well below the server's worker threads, so a
short call always finds one. An excess call is refused at once with
RESOURCE_EXHAUSTED naming the limit, instead of queueing for a thread.
"""

from __future__ import annotations

import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional

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
