"""What a round tells the outside: refusals, progress events (and the log watchers wait on),
receipts, the merged result."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

#: Longest message a RoundError carries (the gRPC status details, the event, the log line):
#: messages quote what the caller sent (a header value, a tensor name), which may be a megabyte.
MAX_MESSAGE_CHARS = 2000
#: Events a round keeps for Watch; the oldest half goes beyond this (a client that keeps sending
#: refused uploads must not grow the coordinator's memory without bound).
MAX_EVENTS = 10_000


def bounded(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`message` cut to `limit` characters, saying how much was cut."""
    if len(message) <= limit:
        return message
    return f"{message[:limit]}… ({len(message) - limit:,} more characters)"


class RoundError(Exception):
    """A refused request; `code` is the name of a grpc.StatusCode. The message is bounded
    (`MAX_MESSAGE_CHARS`), whatever it quotes."""

    def __init__(self, code: str, message: str) -> None:
        message = bounded(message)
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

    def __init__(self, lock: threading.RLock, max_events: int = MAX_EVENTS) -> None:
        self.cond = threading.Condition(lock)
        self.events: list[Event] = []  # the newest `max_events` at most
        self.first = 0  # the seq of events[0]
        self.max_events = max_events

    def append(self, **fields) -> Event:
        """Record an event (numbered in order) and wake the waiters; the oldest half of the
        log goes once it holds `max_events` (a watcher behind them resumes at the oldest kept)."""
        with self.cond:
            fields["message"] = bounded(fields.get("message", ""))
            ev = Event(seq=self.first + len(self.events), **fields)
            self.events.append(ev)
            if len(self.events) > self.max_events:
                drop = len(self.events) - self.max_events // 2
                del self.events[:drop]
                self.first += drop
            self.cond.notify_all()
        return ev

    def since(self, seq: int, timeout: float, finished: Callable[[], bool]) -> list[Event]:
        """Events from `seq` on, waiting up to `timeout` for one if there is none yet."""
        with self.cond:
            end = self.first + len(self.events)
            if seq > end:  # the log restarted (coordinator restart)
                seq = self.first
            if seq == end and finished():
                # A watcher whose position came from an earlier incarnation of the log can
                # stand exactly at its end: it still learns how the round ended.
                return [e for e in self.events if e.kind in TERMINAL][-1:]
            if seq == end:
                self.cond.wait(timeout)
            return self.events[max(seq - self.first, 0):]

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
