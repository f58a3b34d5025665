"""Uploads in progress: one client's partial spool file, digest and stream reader
(`UploadSession`), and a round's sessions by client (`UploadRegistry`).

Every chunk is appended to the partial file and fed to an incremental
`StreamReader`, so memory per session is one record (a tensor sent as span
records: the spans of the one tensor in progress, `parts`). A session records what
the round's rules and folding need (tensors seen, the span order, nonzeros, values
above the declared trim threshold, records folded); the round decides, under its
lock, what happens to it.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional

from tiesfed.coordinator.aggregator import AggregatorLike
from tiesfed.coordinator.rounds.aggregation import unfold_records
from tiesfed.coordinator.rounds.config import ParticipantConfig
from tiesfed.coordinator.rounds.events import RoundError
from tiesfed.coordinator.spool import Committed, RoundSpool
from tiesfed.protos.codec import CodecError, Limits, Record, SpanCover, StreamReader
from tiesfed.trust import Peer


@dataclass(eq=False)
class UploadSession:
    """One client's upload in progress."""

    client_id: str
    path: Path
    live: bool  # folds records as they arrive
    reader: StreamReader
    file: object = None
    offset: int = 0
    sha: "hashlib._Hash" = field(default_factory=hashlib.sha256)
    seen: set = field(default_factory=set)
    #: the order of span records: each tensor's back to back, covering it once
    cover: SpanCover = field(default_factory=SpanCover)
    parts: list[Record] = field(default_factory=list)  # span records of the tensor in progress
    tensor_nnz: int = 0  # nonzeros of the tensor in progress (a per-tensor budget)
    nnz: int = 0
    threshold: Optional[float] = None  # the global top-k threshold its header declares
    above: int = 0  # values strictly above that threshold (global top-k)
    folded: list = field(default_factory=list)  # (name, offset, length) in the partial file
    #: records validated while the aggregator was not up yet: (name, offset, length, the decoded
    #: record or None where the round's buffer was full); see `readiness`
    pending: list = field(default_factory=list)
    compare: Optional[Committed] = None  # refuse policy: the committed stream to match
    attached: bool = False
    last_active: float = 0.0
    ended: bool = False  # its end marker arrived
    closed: bool = False  # committed, or discarded
    reason: str = ""
    cleanup_pending: bool = False
    peer: Optional[Peer] = None  # the certificate of the stream attached last (None: insecure)
    signature: bytes = b""  # the client's signature of the manifest, sent with the last bytes
    io_lock: threading.Lock = field(default_factory=threading.Lock)  # offset and sha move together

    @classmethod
    def start(
        cls, client_id: str, path: Path, *, live: bool, limits: Limits, compare: Optional[Committed]
    ) -> "UploadSession":
        """A new session writing its partial file from byte 0."""
        s = cls(client_id=client_id, path=path, live=live, reader=StreamReader(limits), compare=compare)
        s.file = open(path, "wb")
        return s

    def check_chunk(self, offset: int, data: bytes, max_chunk_bytes: int) -> None:
        """A chunk must continue where the file ends, fit the limit, and precede the end marker."""
        if offset != self.offset:
            raise RoundError("INVALID_ARGUMENT", f"chunk at offset {offset}, expected offset {self.offset}")
        if len(data) > max_chunk_bytes:
            raise RoundError(
                "INVALID_ARGUMENT", f"chunk of {len(data)} bytes exceeds the limit of {max_chunk_bytes} bytes"
            )
        if self.ended:
            raise RoundError("INVALID_ARGUMENT", "data after the contribution's end marker")

    def append(self, data: bytes) -> list:
        """Write a chunk to the partial file; the codec events it completes."""
        with self.io_lock:
            self.file.write(data)
            self.file.flush()
            self.sha.update(data)
            self.offset += len(data)
        try:
            return self.reader.feed(data)
        except CodecError as e:
            raise RoundError("INVALID_ARGUMENT", f"malformed contribution from {self.client_id!r}: {e}") from None

    def seal(self) -> str:
        """The end marker arrived: make the partial file durable; its sha256."""
        self.ended = True
        self.file.flush()
        os.fsync(self.file.fileno())
        self.close_file()
        return self.sha.hexdigest()

    def close_file(self) -> None:
        f = self.file
        self.file = None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass

    def remove_partial(self) -> None:
        """Close and delete the partial file (a committed one has been renamed away)."""
        self.close_file()
        self.cleanup_pending = False
        if self.path.exists() and self.path.suffix == ".part":
            self.path.unlink(missing_ok=True)


class UploadRegistry:
    """A round's uploads in progress, one per client: attach, resume, close, withdraw.

    Not locked itself: the round calls it under its lock. A session's stream
    thread writes to the session's file without the lock; closing one here while
    its stream is attached leaves the file to that thread (`cleanup_pending`).
    """

    def __init__(self, round_id: str, spool: RoundSpool, limits: Limits) -> None:
        self.round_id = round_id
        self.spool = spool
        self.limits = limits
        self.by_client: dict[str, UploadSession] = {}

    def attach(
        self,
        client_id: str,
        offset: int,
        *,
        live: bool,
        compare: Optional[Committed],
        discard: Callable[[UploadSession, str], None],
        clock: Callable[[], float],
    ) -> UploadSession:
        """Attach a stream: offset 0 starts over (`discard`ing any earlier session),
        anything else resumes the session holding exactly that many bytes."""
        s = self.by_client.get(client_id)
        if s is not None and s.attached:
            raise RoundError(
                "ABORTED", f"another upload stream of client {client_id!r} is still attached; retry shortly"
            )
        if offset == 0:
            if s is not None:
                discard(s, "restarted from offset 0")
            s = UploadSession.start(
                client_id, self.spool.partial_path(client_id), live=live, limits=self.limits, compare=compare
            )
            self.by_client[client_id] = s
        elif s is None or s.offset != offset:
            held = 0 if s is None else s.offset
            raise RoundError(  # ABORTED: a concurrency conflict; ask UploadStatus again and retry
                "ABORTED",
                f"cannot resume the upload of {client_id!r} at offset {offset}: the coordinator holds "
                f"{held} byte(s) of it (ask UploadStatus, or start over at offset 0)",
            )
        s.attached = True
        s.last_active = clock()
        return s

    def close(self, s: UploadSession, why: str) -> None:
        """Mark `s` closed (committed or discarded) and forget it."""
        s.closed = True
        s.reason = f"upload of {s.client_id!r} to round {self.round_id!r} {why}"
        if self.by_client.get(s.client_id) is s:
            del self.by_client[s.client_id]

    def withdraw(self, s: UploadSession, why: str, agg: Optional[AggregatorLike], weight: float) -> None:
        """Un-fold what `s` folded into `agg` and drop it."""
        if s.closed:
            return
        if s.live and s.folded and agg is not None:
            unfold_records(agg, s.path, s.folded, weight, self.limits)
            s.folded = []
        self.close(s, why)
        if s.attached:
            s.cleanup_pending = True  # the stream's thread removes the file when it lets go
        else:
            s.remove_partial()

    def idle(self, now: float, after_s: float) -> list[UploadSession]:
        """Detached sessions without activity for more than `after_s` (abandoned)."""
        return [s for s in list(self.by_client.values()) if not s.attached and now - s.last_active > after_s]

    def live_folded(
        self, participants: Mapping[str, ParticipantConfig]
    ) -> list[tuple[Path, list[tuple[str, int, int]], float]]:
        """(path, folded records, weight) of each open session that folded on arrival."""
        return [(s.path, list(s.folded), participants[s.client_id].weight)
                for s in self.by_client.values() if s.live and s.folded and not s.closed]
