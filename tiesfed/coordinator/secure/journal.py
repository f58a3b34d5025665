"""A secure round's protocol inputs on disk, so that a restarted coordinator rebuilds its
session where it stood instead of failing the round (issue 13).

Layout under ``<spool>/rounds/<round>/secagg/``::

    keys/<client>.msg        the client's KeyAdvert, as it sent it
    shares/<client>.msg      its ShareUpload (support bitmap + sealed boxes)
    unmask/<client>.msg      its UnmaskReply
    masked/<client>.part     a masked upload being received (the prefix a broken stream left)
    masked/<client>.<sha256>.masked  a complete masked upload whose sha256 matched: in the sum
    closed-<phase>.json      {"arrived": [...]}: the phase closed with these clients

A step message arriving by stream is written as its chunks come to ``<round>/.<phase>-<client>-*.incoming``
(`incoming`), never gathered in memory, and renamed into its place above (`adopt`) once its
size and sha256 matched and the session took it; a refused one is deleted. It is parsed from
its file (`messages.from_file`): a share upload's bitmap stays there, read block by block.

Everything here the coordinator has already seen: adverts are public, share boxes are
sealed to their recipients, masked vectors are uniform in the ring. Persisting them adds
no exposure. A message is written (fsync + rename) before its Step is
acknowledged; a phase's closing record is written before anything it closed to reaches a
client, so the key list, the mask requests and the unmask request a restart recomputes
are the ones the clients already hold (the protocol's closes are deterministic: sorted ids).
A replay is the same calls into a fresh `SecAggServer`: closed phases with the clients their
record names, the open phase with every message on disk. The masked vectors stay until the
merge is published (the running sum is rebuilt from them); then the whole folder goes.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Iterator, Optional

from tiesfed.io.files import DamagedFileError, fsync_dir, read_json, sha256_file, write_json_atomic
from tiesfed.trust.secagg import SecAggError
from tiesfed.trust.secagg.messages import KeyAdvert, ShareUpload, UnmaskReply, from_file

if TYPE_CHECKING:
    from tiesfed.coordinator.secure.publish import FlatAggregator
    from tiesfed.coordinator.secure.session import SecureSession

log = logging.getLogger("tiesfed.coordinator")

JOURNAL_DIR = "secagg"
#: The phases whose client message is a Step (the masked vector has its own stream).
STEP_TYPES: dict[str, type] = {"keys": KeyAdvert, "shares": ShareUpload, "unmask": UnmaskReply}
MESSAGE_PHASES = tuple(STEP_TYPES)
CLOSING_PHASES = ("keys", "shares", "masked", "unmask")
READ_PIECE = 1 << 20


class Journal:
    """One secure round's journal folder (`round_dir/secagg`)."""

    def __init__(self, round_dir: Path) -> None:
        self.dir = Path(round_dir) / JOURNAL_DIR

    def _folder(self, name: str) -> Path:
        """`dir/name`, made durably the first time (its entry and the journal's fsync'd)."""
        d = self.dir / name
        if not d.is_dir():
            d.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.dir)
            fsync_dir(self.dir.parent)
        return d

    # ------------------------------------------------------------------ step messages
    def _message_path(self, phase: str, client_id: str) -> Path:
        assert phase in MESSAGE_PHASES, phase
        return self.dir / phase / f"{client_id}.msg"

    def incoming(self, phase: str, client_id: str) -> tuple[Path, BinaryIO]:
        """A fresh file (and its open handle) for a step message as it arrives, beside the
        journal (not in it: until `adopt` it is no part of the round)."""
        assert phase in MESSAGE_PHASES, phase
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{phase}-{client_id}-", suffix=".incoming", dir=self.dir.parent)
        return Path(name), os.fdopen(fd, "wb")

    def adopt(self, phase: str, client_id: str, incoming: Path) -> None:
        """Keep a client's message of `phase`, received into `incoming`: fsync'd and renamed into
        place, durable when this returns."""
        with open(incoming, "rb") as f:
            os.fsync(f.fileno())
        dst = self._folder(phase) / self._message_path(phase, client_id).name
        os.replace(incoming, dst)
        fsync_dir(dst.parent)

    def drop_incoming(self) -> None:
        """Messages whose stream a stop or crash cut short (never acknowledged)."""
        for p in self.dir.parent.glob(".*.incoming"):
            p.unlink(missing_ok=True)

    def forget(self, phase: str, client_id: str) -> None:
        """Drop a message the protocol refused after it was recorded."""
        self._message_path(phase, client_id).unlink(missing_ok=True)

    def message_path(self, phase: str, client_id: str) -> Optional[Path]:
        p = self._message_path(phase, client_id)
        return p if p.is_file() else None

    def message_paths(self, phase: str) -> dict[str, Path]:
        d = self.dir / phase
        return {p.stem: p for p in sorted(d.glob("*.msg"))} if d.is_dir() else {}

    # ------------------------------------------------------------------ phase closes
    def close(self, phase: str, arrived: list[str]) -> None:
        """The commit point of a phase's close: who it closed with."""
        assert phase in CLOSING_PHASES, phase
        write_json_atomic(self.dir / f"closed-{phase}.json", {"phase": phase, "arrived": sorted(arrived)})

    def closed(self, phase: str) -> Optional[list[str]]:
        """Who `phase` closed with; None while it is open. A damaged record raises
        `DamagedFileError` naming the file."""
        p = self.dir / f"closed-{phase}.json"
        if not p.exists():
            return None
        arrived = read_json(p, "secure-aggregation phase record").get("arrived")
        if not (isinstance(arrived, list) and all(isinstance(c, str) for c in arrived)):
            raise DamagedFileError(p, "secure-aggregation phase record", "has no list of clients")
        return arrived

    def started(self) -> bool:
        """Whether any client message reached the journal (the protocol started)."""
        return any(self.message_paths("keys"))

    # ------------------------------------------------------------------ masked uploads
    def partial_path(self, client_id: str) -> Path:
        return self.dir / "masked" / f"{client_id}.part"

    def masked_path(self, client_id: str, sha256: str) -> Path:
        return self.dir / "masked" / f"{client_id}.{sha256}.masked"

    def masked(self) -> dict[str, tuple[Path, str]]:
        """Each complete upload: (its file, the sha256 it was received with)."""
        out = {}
        for p in sorted((self.dir / "masked").glob("*.masked")):
            client_id, sha, _ = p.name.rsplit(".", 2)
            out[client_id] = (p, sha)
        return out

    def open_partial(self, client_id: str):
        """The client's prefix file, for appending at a position (created if absent)."""
        p = self._folder("masked") / self.partial_path(client_id).name
        return open(p, "r+b" if p.exists() else "wb")

    def commit_masked(self, client_id: str, sha256: str) -> Path:
        """A complete upload whose sha256 matched: fsync'd and renamed under its hash, so a
        restart checks it and folds it again."""
        src, dst = self.partial_path(client_id), self.masked_path(client_id, sha256)
        with open(src, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(src, dst)
        fsync_dir(dst.parent)
        return dst

    def partial_files(self) -> list[Path]:
        """The masked prefixes held (one per client, named after it)."""
        return sorted((self.dir / "masked").glob("*.part"))

    def drop_partials(self) -> None:
        for p in (self.dir / "masked").glob("*.part"):
            p.unlink(missing_ok=True)

    def drop_masked(self) -> None:
        """Every masked byte: prefixes and complete uploads (a failed round keeps none)."""
        shutil.rmtree(self.dir / "masked", ignore_errors=True)

    def remove(self) -> None:
        """The whole journal (the merge is published: nothing is replayed any more)."""
        shutil.rmtree(self.dir, ignore_errors=True)


def pieces(path: Path) -> Iterator[bytes]:
    """A file's bytes in pieces of `READ_PIECE`."""
    with open(path, "rb") as f:
        while piece := f.read(READ_PIECE):
            yield piece


def replay(s: "SecureSession") -> Optional["FlatAggregator"]:
    """Rebuild a fresh session from its journal: each closed phase with the clients its record
    names, closed again (the same outbox the clients read before the restart); the open phase
    with every message on disk (one the protocol now refuses was never acknowledged: dropped)
    and the masked prefixes held for their resumes. Returns the aggregator to publish when
    the last phase had closed (the restart came while the merge was being written). A journal
    that contradicts itself raises `DamagedFileError` naming the file."""
    j = s.journal
    receive = {"keys": s.server.receive_advert, "shares": s.server.receive_shares, "unmask": s.server.receive_unmask}
    result = None
    for phase in CLOSING_PHASES:
        closed = j.closed(phase)
        arrived: list[str] = []
        if phase == "masked":
            held = j.masked()
            for c in closed if closed is not None else sorted(held):
                if c not in held:
                    raise DamagedFileError(j.dir / "masked", "secure-aggregation journal",
                                           f"has no masked upload of {c!r}, which the closed phase counted")
                path, sha = held[c]
                if sha256_file(path) != sha:
                    if closed is not None:
                        raise DamagedFileError(path, "masked upload", "does not hash to the sha256 it was received "
                                               "with, and the phase it belongs to has closed")
                    log.warning("round %s: the masked upload of %s is damaged: dropped (the client sends it again)",
                                s.round.id, c)
                    path.unlink(missing_ok=True)
                    continue
                s.fold(c, path)
                arrived.append(c)
        else:
            msgs = j.message_paths(phase)
            for c in closed if closed is not None else sorted(msgs):
                if c not in msgs:
                    raise DamagedFileError(j.dir / phase, "secure-aggregation journal",
                                           f"has no {phase} message of {c!r}, which the closed phase counted")
                try:
                    msg = from_file(msgs[c])  # a bitmap stays in the file
                    if not isinstance(msg, STEP_TYPES[phase]) or msg.client_id != c:
                        raise SecAggError(f"it is not {c!r}'s {STEP_TYPES[phase].__name__}")
                    receive[phase](msg)
                    s.taken[phase, c] = sha256_file(msgs[c])
                except SecAggError as e:
                    if closed is not None:
                        raise DamagedFileError(j.dir / phase / f"{c}.msg", f"{phase} message", f"is refused: {e}") from None
                    log.warning("round %s: the %s message of %s is refused on replay (%s): dropped", s.round.id,
                                phase, c, e)
                    j.forget(phase, c)
                    continue
                if isinstance(msg, KeyAdvert):
                    s.adverts[c] = msg
                arrived.append(c)
        s.arrived = arrived
        if closed is None:
            if phase == "masked":
                s.restore_partials()
            s.deadline.open(s.clock() if arrived or phase != "keys" else None)  # a fresh phase_s to come back
            log.info("round %s: secure session replayed from its journal: phase %s, %d client(s) in", s.round.id,
                     phase, len(arrived))
            return None
        result = s.close_phase(record=False)
    log.info("round %s: secure session replayed from its journal: every phase had closed; publishing again",
             s.round.id)
    return result
