"""What a round tells the outside: refusals, progress events (and the log watchers wait on),
receipts, the merged result."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional


class RoundError(Exception):
    """A refused request; `code` is the name of a grpc.StatusCode."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Event:
    seq: int
    time: float
    kind: str  # the EventKind names of the proto
    client_id: str = ""
    message: str = ""
    committed: int = 0
    expected: int = 0
    state: str = "open"
    sha256: str = ""
    bytes: int = 0


TERMINAL = ("ROUND_FINALIZED", "ROUND_FAILED")


class EventLog:
    """A round's progress events, for Watch. Its condition is on the round's lock,
    so waiters wake on every event and see the round's state as of that event."""

    def __init__(self, lock: threading.RLock) -> None:
        self.cond = threading.Condition(lock)
        self.events: list[Event] = []

    def append(self, **fields) -> Event:
        """Record an event (numbered in order) and wake the waiters."""
        with self.cond:
            ev = Event(seq=len(self.events), **fields)
            self.events.append(ev)
            self.cond.notify_all()
        return ev

    def since(self, seq: int, timeout: float, finished: Callable[[], bool]) -> list[Event]:
        """Events from `seq` on, waiting up to `timeout` for one if there is none yet."""
        with self.cond:
            if seq > len(self.events):  # the log restarted (coordinator restart)
                seq = 0
            if seq == len(self.events) and finished():
                # A watcher whose position came from an earlier incarnation of the log can
                # stand exactly at its end: it still learns how the round ended.
                return [e for e in self.events if e.kind in TERMINAL][-1:]
            if seq == len(self.events):
                self.cond.wait(timeout)
            return self.events[seq:]

    def wait_until(self, done: Callable[[], bool], timeout: Optional[float]) -> bool:
        """Block until `done()` (checked on every event, and each second); False on timeout."""
        end = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while not done():
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self.cond.wait(left if left is not None else 1.0)
            return True


@dataclass
class Receipt:
    committed: bool
    committed_offset: int
    sha256: str = ""
    bytes: int = 0
    nnz: int = 0
    duplicate: bool = False
    replaced: bool = False
    committed_count: int = 0


@dataclass
class Merged:
    sha256: str
    bytes: int
    majority_sign: int
    path: Path
