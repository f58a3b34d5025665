"""When a secure round's open phase stops waiting: its deadline rule, apart from the protocol.

A phase closes `phase_s` after it opened, unless an expected client that has not arrived yet
has a stream attached (its message, or its masked vector) that is still making progress: it
delivered bytes within the last `phase_s`, *and* it keeps up an average of `min_rate` bytes a
second since it first attached in this phase (after a grace of `phase_s`). The first part
lets an honest slow client finish; the second stops a participant that trickles a few bytes
now and then from holding the round open: a stream of B bytes can hold the phase open at most
`phase_s + B / min_rate` seconds past its first attach, and B is capped by what the phase's
message may declare.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional


@dataclass
class _Stream:
    attached: int  # streams of this client attached now
    first: float  # when it first attached in this phase
    last: float  # when its last bytes arrived
    delivered: int = 0  # bytes it delivered in this phase


@dataclass
class PhaseClock:
    """The open phase's deadline (not thread-safe: the session calls it under its lock)."""

    phase_s: float
    min_rate: float  # bytes per second
    opened_at: Optional[float] = None  # None: not started (the key phase starts at the first advert)
    _streams: dict[str, _Stream] = field(default_factory=dict)

    def open(self, now: Optional[float]) -> None:
        """A new phase (`now` None: its clock starts later, with `start`)."""
        self.opened_at = now
        self._streams.clear()

    def start(self, now: float) -> None:
        if self.opened_at is None:
            self.opened_at = now

    @property
    def deadline(self) -> float:
        """The plain deadline, as the status shows it (0: not started)."""
        return 0.0 if self.opened_at is None else self.opened_at + self.phase_s

    def attach(self, client: str, now: float) -> None:
        s = self._streams.get(client)
        if s is None:
            self._streams[client] = _Stream(attached=1, first=now, last=now)
        else:
            s.attached += 1
            s.last = now

    def advance(self, client: str, nbytes: int, now: float) -> None:
        s = self._streams.get(client)
        if s is not None and nbytes > 0:  # only bytes count: empty chunks do not hold the phase open
            s.delivered += nbytes
            s.last = now

    def detach(self, client: str) -> None:
        s = self._streams.get(client)
        if s is not None:
            s.attached = max(0, s.attached - 1)  # its bytes still count if it comes back

    def holds(self, client: str, now: float) -> bool:
        """Whether this client's stream keeps the phase open past its deadline."""
        s = self._streams.get(client)
        if s is None or not s.attached or now - s.last >= self.phase_s:
            return False
        return now < s.first + self.phase_s + s.delivered / self.min_rate

    def late(self, missing: Iterable[str], now: float) -> bool:
        """Whether the phase is over for the clients still `missing`."""
        if self.opened_at is None or now < self.opened_at + self.phase_s:
            return False
        return not any(self.holds(c, now) for c in missing)
