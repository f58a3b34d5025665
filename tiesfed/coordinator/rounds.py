"""Rounds: who may join, what they upload, when the merge happens. No gRPC here.

A `Round` owns one merge: its configuration (options, participants and
weights, quorum, deadline, policies), its durable spool, its aggregator, its
upload sessions and its event log. The gRPC service (`tiesfed.coordinator.service`)
only translates calls and errors; everything that must survive a restart or
be tested without a network lives here.

Uploads. An `UploadSession` receives one client's codec stream chunk by
chunk: every chunk is appended to a partial spool file and fed to an
incremental `StreamReader`; each completed record is validated against the
round (manifest name, shape, no duplicate, nonzeros within the client's k
budget; the codec checks indices, order, values and checksums) and, when the
round folds on arrival, folded into the aggregator at once. Memory per
session is one record; the number of sessions receiving at once is bounded by
the manager's upload slots, so coordinator memory is flat in the number of
clients. At the codec's end marker the contribution is complete: fsync,
checksum, atomic rename, pointer (see `tiesfed.coordinator.spool`).

A rejected upload (or one abandoned and expired) is withdrawn: its folded
records are read back from the partial file and un-folded. `unfold` is exact
when the accumulator sums are (float64 sums of float32 values with weights of
few significant bits), so such rounds fold on arrival ("arrival" mode). A
round whose spec cannot un-fold (disjoint max) folds each contribution when it
is committed and rebuilds its aggregator from the committed spool to replace
one ("commit"). A round whose weights make the sums inexact folds nothing
until it finalizes, then every contribution in participant order ("final"), so
its result does not depend on the order uploads arrived in. In every mode a
rejected upload leaves the aggregator exactly as it was, and the merge equals
the local engine's (which folds in model order) bit for bit.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
import os
import secrets
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tiesfed.coordinator.aggregator import Aggregator, AggregatorLike
from tiesfed.coordinator.spool import Committed, RoundSpool, check_id, iter_round_dirs
from tiesfed.core.accumulators import FinalizeSpec, majority_sign
from tiesfed.core.methods import get_method
from tiesfed.core.options import MergeOptions
from tiesfed.core.trim import TrimSpec
from tiesfed.io.files import fsync_dir, sha256_file
from tiesfed.io.model_io import DEFAULT_SHARD_BYTES, mergeable
from tiesfed.protos.codec import (
    CodecError,
    End,
    Header,
    Limits,
    Record,
    SparseTensor,
    StreamReader,
    StreamWriter,
    read_record_at,
    read_stream,
)
from tiesfed.protos.v1 import MAX_CHUNK_BYTES

log = logging.getLogger("tiesfed.coordinator")

AggregatorFactory = Callable[[list[tuple[str, int]], FinalizeSpec], AggregatorLike]
LatePolicy = Literal["reject", "accept"]
ReplacePolicy = Literal["replace", "refuse"]
State = Literal["open", "finalizing", "finalized", "failed"]
#: arrival: fold each record as it arrives, un-fold to withdraw (exact sums, invertible spec);
#: commit: fold a contribution once committed, rebuild to replace one (disjoint max);
#: final: fold every contribution in participant order at finalization (weights whose
#: products make the sums inexact: the fold order must not depend on arrival order).
FoldMode = Literal["arrival", "commit", "final"]



def default_aggregator_factory(manifest: list[tuple[str, int]], spec: FinalizeSpec) -> AggregatorLike:
    """The in-process aggregator (the Ray-sharded one offers the same interface)."""
    return Aggregator(manifest, spec)


class RoundError(Exception):
    """A refused request; `code` is the name of a grpc.StatusCode."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# ----------------------------------------------------------------------------- configuration


class ParticipantConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    client_id: str
    weight: float = Field(1.0, gt=0)
    density: Optional[float] = Field(None, gt=0, le=1, description="fraction kept; overrides k")
    model_key: Optional[str] = Field(None, description="seeds DARE; default: the participant's index")

    @field_validator("client_id")
    @classmethod
    def _id(cls, v: str) -> str:
        return check_id("client id", v)

    @field_validator("weight")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("weight must be finite")
        return v


class TensorEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    shape: tuple[int, ...]
    dtype: str = "F32"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class RoundConfig(BaseModel):
    """One round, as given in the coordinator's YAML or by OpenRound."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    round_id: str
    options: MergeOptions = MergeOptions()
    participants: list[ParticipantConfig] = Field(min_length=1)
    quorum: Optional[int] = Field(None, ge=1, description="default: every participant")
    deadline_unix: Optional[float] = Field(None, description="absolute deadline, seconds since the epoch")
    deadline_s: Optional[float] = Field(None, gt=0, description="deadline relative to when the round opens")
    late_policy: LatePolicy = "reject"
    replace_policy: ReplacePolicy = "replace"
    base_fingerprint: Optional[str] = None
    manifest: Optional[list[TensorEntry]] = None

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, data: object) -> object:
        """Participants may be given as bare ids; each gets its index as DARE model key."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        parts = []
        for i, p in enumerate(data.get("participants") or []):
            if isinstance(p, str):
                p = {"client_id": p}
            elif isinstance(p, ParticipantConfig):
                p = p.model_dump()
            else:
                p = dict(p)
            if p.get("model_key") is None:
                p["model_key"] = str(i)
            parts.append(p)
        data["participants"] = parts
        return data

    @field_validator("round_id")
    @classmethod
    def _rid(cls, v: str) -> str:
        return check_id("round id", v)

    @model_validator(mode="after")
    def _consistent(self) -> "RoundConfig":
        ids = [p.client_id for p in self.participants]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"participants listed twice: {', '.join(dup)}")
        if self.quorum is not None and self.quorum > len(ids):
            raise ValueError(f"quorum {self.quorum} exceeds the {len(ids)} participants")
        if self.manifest is not None:
            names = [t.name for t in self.manifest]
            if len(set(names)) != len(names):
                raise ValueError("manifest lists a tensor twice")
        return self

    def resolved(self, now: float, fingerprint: Optional[str], manifest: Optional[list[TensorEntry]]) -> "RoundConfig":
        """Fill what the coordinator supplies at open: deadline, quorum, base fingerprint, manifest."""
        upd: dict = {}
        if self.deadline_unix is None and self.deadline_s is not None:
            upd["deadline_unix"] = now + self.deadline_s
        if self.quorum is None:
            upd["quorum"] = len(self.participants)
        if self.base_fingerprint is None:
            upd["base_fingerprint"] = fingerprint
        if self.manifest is None:
            upd["manifest"] = manifest
        out = self.model_copy(update=upd)
        if not out.base_fingerprint or out.manifest is None:
            raise RoundError(
                "INVALID_ARGUMENT",
                f"round {self.round_id!r} needs a base fingerprint and a tensor manifest: "
                "give them, or start the coordinator with --base",
            )
        if not out.manifest:
            raise RoundError("INVALID_ARGUMENT", f"round {self.round_id!r}: the manifest has no mergeable tensor")
        return out


def nnz_budget(trim: TrimSpec, total: int) -> int:
    """Most nonzeros a contribution of `total` parameters may carry under `trim`.

    top-k keeps int(D·f) (plus threshold ties: 1% and 1024 of slack); DARE keeps
    a Binomial(D, f) count (1% + 6 standard deviations + 1024); no trim: all.
    """
    if trim.kind == "none" or trim.fraction >= 1:
        return total
    if trim.kind == "topk":
        return min(total, int(int(total * trim.fraction) * 1.01) + 1024)
    mean = total * trim.fraction
    sd = math.sqrt(total * trim.fraction * (1 - trim.fraction))
    return min(total, int(mean * 1.01 + 6 * sd) + 1024)


def exact_weight(w: float) -> bool:
    """Weights of at most 8 significant bits keep the float64 accumulator sums exact."""
    m, _ = math.frexp(w)
    return (m * 256).is_integer()


# ----------------------------------------------------------------------------- runtime objects


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
    nnz: int = 0
    folded: list = field(default_factory=list)  # (name, offset, length) in the partial file
    compare: Optional[Committed] = None  # refuse policy: the committed stream to match
    attached: bool = False
    last_active: float = 0.0
    ended: bool = False  # its end marker arrived
    closed: bool = False  # committed, or discarded
    reason: str = ""
    cleanup_pending: bool = False
    io_lock: threading.Lock = field(default_factory=threading.Lock)  # offset and sha move together

    def close_file(self) -> None:
        f = self.file
        self.file = None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass


class Round:
    """One federated merge round. Thread-safe; all state changes under `lock`."""

    def __init__(
        self,
        config: RoundConfig,
        spool: RoundSpool,
        aggregator_factory: AggregatorFactory = default_aggregator_factory,
        *,
        base_path: Optional[str] = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        max_chunk_bytes: int = MAX_CHUNK_BYTES,
        abandon_after_s: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
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
        self.spec = method.finalize_spec(opts, weighted)
        self.trims = {p.client_id: method.trim_spec(opts, p.density) for p in config.participants}
        self.manifest = {t.name: t for t in config.manifest}
        self.total = sum(t.numel for t in config.manifest)
        self.budgets = {cid: nnz_budget(t, self.total) for cid, t in self.trims.items()}
        if not all(exact_weight(p.weight) for p in config.participants):
            self.fold_mode: FoldMode = "final"
        elif not self.spec.invertible:
            self.fold_mode = "commit"
        else:
            self.fold_mode = "arrival"
        biggest = max((t.numel for t in config.manifest), default=1)
        self.limits = Limits(
            max_numel=max(biggest, 1), max_payload_bytes=16 * biggest + 4096, max_header_bytes=1 << 20
        )

        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.state: State = "open"
        self.message = ""
        self.close_requested = False
        self.merged: Optional[Merged] = None
        self.committed: dict[str, Committed] = {}
        self.sessions: dict[str, UploadSession] = {}
        self.events: list[Event] = []
        self.agg: Optional[AggregatorLike] = None
        self.downloaded: set[str] = set()  # clients that fetched the whole merged stream
        self._deadline_seen = False
        self._finalizer: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def create(cls, config: RoundConfig, spool: RoundSpool, aggregator_factory: AggregatorFactory, **kw) -> "Round":
        """Open a new round: write it to the spool, start an empty aggregator."""
        r = cls(config, spool, aggregator_factory, **kw)
        spool.create(config.model_dump(mode="json", by_alias=True))
        r._persist()
        if r.fold_mode != "final":
            r.agg = r._new_aggregator()
        r._emit("ROUND_OPENED", message=f"round {r.id} opened for {len(r.participants)} participant(s)")
        return r

    @classmethod
    def recover(cls, spool: RoundSpool, aggregator_factory: AggregatorFactory, **kw) -> "Round":
        """Load a round from the spool after a restart.

        Finished rounds come back as they were. An open (or interrupted
        finalizing) round drops half-received uploads, verifies each committed
        contribution's checksum and folds it again; a round whose admin had
        asked to close it finalizes again.
        """
        config = RoundConfig.model_validate(spool.load_config())
        r = cls(config, spool, aggregator_factory, **kw)
        st = spool.load_state()
        r.message = st.get("message", "")
        r.close_requested = bool(st.get("close_requested")) or st.get("state") == "finalizing"
        if st.get("state") in ("finalized", "failed"):
            r.state = st["state"]
            if r.state == "finalized":
                r.merged = Merged(st["merged_sha256"], int(st["merged_bytes"]), int(st["majority_sign"]), spool.merged_path)
            r._emit("ROUND_OPENED", message=f"round {r.id} recovered ({r.state})")
            r._emit("ROUND_FINALIZED" if r.state == "finalized" else "ROUND_FAILED", message=r.message,
                    sha256=r.merged.sha256 if r.merged else "", bytes=r.merged.bytes if r.merged else 0)
            return r
        spool.clear_partials()
        spool.remove_orphans()
        spool.clear_outputs()
        if r.fold_mode != "final":
            r.agg = r._new_aggregator()
        dropped = []
        for cid, c in spool.committed().items():
            p = r.participants.get(cid)
            if p is None or not c.path.is_file() or sha256_file(c.path) != c.sha256:
                log.warning("round %s: dropping contribution of %s: missing or checksum mismatch", r.id, cid)
                spool.drop(cid)
                dropped.append(cid)
                continue
            if r.fold_mode != "final":
                r._fold_file(c.path, p.weight, +1)
            r.committed[cid] = c
        with r.lock:
            r.state = "open"
            r._persist()
            msg = f"round {r.id} recovered with {len(r.committed)} committed contribution(s)"
            if dropped:
                msg += f"; dropped (checksum mismatch): {', '.join(dropped)}"
            r._emit("ROUND_OPENED", message=msg)
            r._maybe_finalize()
        return r

    def _new_aggregator(self) -> AggregatorLike:
        """From the factory; one that takes `replay` (a sharded aggregator rebuilding a
        restarted shard) gets `self.replay`."""
        manifest = [(t.name, t.numel) for t in self.config.manifest]
        try:
            takes_replay = "replay" in inspect.signature(self.factory).parameters
        except (TypeError, ValueError):
            takes_replay = False
        if takes_replay:
            return self.factory(manifest, self.spec, replay=self.replay)
        return self.factory(manifest, self.spec)

    def replay(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, float]]:
        """Everything folded into the aggregator now, as (name, indices, values, weight),
        read back from the spool: committed contributions in participant order, then
        the records live uploads have folded so far."""
        with self.lock:
            files: list[tuple[Path, float]] = []
            if self.fold_mode != "final" or self.state == "finalizing":
                files = [(self.committed[c].path, p.weight) for c, p in self.participants.items()
                         if c in self.committed]
            live = [(s.path, list(s.folded), self.participants[s.client_id].weight)
                    for s in self.sessions.values() if s.live and s.folded and not s.closed]
        for path, weight in files:
            with open(path, "rb") as f:
                _, tensors = read_stream(f, self.limits)
                for t in tensors:
                    yield t.name, t.indices, t.values, weight
        for path, folded, weight in live:
            with open(path, "rb") as f:
                for name, off, length in folded:
                    t = read_record_at(f, off, length, self.limits)
                    yield name, t.indices, t.values, weight

    def _persist(self) -> None:
        st = {"state": self.state, "message": self.message, "close_requested": self.close_requested}
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

    def events_since(self, seq: int, timeout: float) -> list[Event]:
        """Events from `seq` on, waiting up to `timeout` for one if there is none yet."""
        with self.cond:
            if seq > len(self.events):  # the log restarted (coordinator restart)
                seq = 0
            if seq == len(self.events) and self.state in ("finalized", "failed"):
                # A watcher whose position came from an earlier incarnation of the log can
                # stand exactly at its end: it still learns how the round ended.
                return [e for e in self.events if e.kind in ("ROUND_FINALIZED", "ROUND_FAILED")][-1:]
            if seq == len(self.events):
                self.cond.wait(timeout)
            return self.events[seq:]

    # ------------------------------------------------------------------ events

    def _emit(self, kind: str, **kw) -> Event:
        with self.cond:
            ev = Event(
                seq=len(self.events), time=self.clock(), kind=kind, committed=len(self.committed),
                expected=len(self.participants), state=self.state, **kw,
            )
            self.events.append(ev)
            self.cond.notify_all()
        log.info("round %s: %s %s %s", self.id, kind, kw.get("client_id", ""), kw.get("message", ""))
        return ev

    # ------------------------------------------------------------------ uploads

    def _check_accepting(self, client_id: str, new: bool) -> None:
        if self.state in ("finalizing", "finalized"):
            raise RoundError("FAILED_PRECONDITION", f"round {self.id!r} is {self.state}: it takes no more uploads")
        if self.state == "failed":
            raise RoundError("FAILED_PRECONDITION", f"round {self.id!r} failed: {self.message}")
        if new and self.config.late_policy == "reject" and self.deadline_passed():
            raise RoundError(
                "FAILED_PRECONDITION",
                f"round {self.id!r}: the deadline passed {self.clock() - self.deadline:.1f} s ago "
                "and the late-upload policy is reject",
            )

    def begin_upload(self, client_id: str, offset: int) -> UploadSession:
        """Attach an upload stream: offset 0 starts over, anything else resumes."""
        with self.lock:
            self.check_participant(client_id)
            self._check_accepting(client_id, new=offset == 0)
            s = self.sessions.get(client_id)
            if s is not None and s.attached:
                raise RoundError(
                    "ABORTED", f"another upload stream of client {client_id!r} is still attached; retry shortly"
                )
            if offset == 0:
                if s is not None:
                    self._discard(s, "restarted from offset 0")
                path = self.spool.partial_path(client_id)
                old = self.committed.get(client_id)
                s = UploadSession(
                    client_id=client_id,
                    path=path,
                    live=self.fold_mode == "arrival" and old is None,
                    reader=StreamReader(self.limits),
                    compare=old if (old is not None and self.config.replace_policy == "refuse") else None,
                )
                s.file = open(path, "wb")
                self.sessions[client_id] = s
            elif s is None or s.offset != offset:
                held = 0 if s is None else s.offset
                raise RoundError(  # ABORTED: a concurrency conflict; ask UploadStatus again and retry
                    "ABORTED",
                    f"cannot resume the upload of {client_id!r} at offset {offset}: the coordinator holds "
                    f"{held} byte(s) of it (ask UploadStatus, or start over at offset 0)",
                )
            s.attached = True
            s.last_active = self.clock()
            return s

    def detach(self, s: UploadSession) -> Receipt:
        """The stream feeding `s` ended or broke: keep what arrived for a resume."""
        with self.lock:
            s.attached = False
            s.last_active = self.clock()
            if s.cleanup_pending:
                self._remove_partial(s)
            return Receipt(committed=False, committed_offset=0 if s.closed else s.offset,
                           committed_count=len(self.committed))

    def feed(self, s: UploadSession, offset: int, data: bytes) -> Optional[Receipt]:
        """Take one chunk. Returns the receipt once the contribution is committed.

        Raises RoundError (after withdrawing the whole upload) when anything is wrong.
        """
        if s.closed:
            raise RoundError("FAILED_PRECONDITION", s.reason or "this upload is closed")
        try:
            if offset != s.offset:
                raise RoundError("INVALID_ARGUMENT", f"chunk at offset {offset}, expected offset {s.offset}")
            if len(data) > self.max_chunk_bytes:
                raise RoundError(
                    "INVALID_ARGUMENT", f"chunk of {len(data)} bytes exceeds the limit of {self.max_chunk_bytes} bytes"
                )
            if s.ended:
                raise RoundError("INVALID_ARGUMENT", "data after the contribution's end marker")
            if not data:
                return None
            if s.compare is not None:
                self._compare(s, data)
            with s.io_lock:
                s.file.write(data)
                s.file.flush()
                s.sha.update(data)
                s.offset += len(data)
            try:
                events = s.reader.feed(data)
            except CodecError as e:
                raise RoundError("INVALID_ARGUMENT", f"malformed contribution from {s.client_id!r}: {e}") from None
            receipt = None
            for ev in events:
                if isinstance(ev, Record):
                    self._take_record(s, ev)
                elif isinstance(ev, Header):
                    self._check_header(s, ev.meta)
                elif isinstance(ev, End):
                    receipt = self._commit(s)
            s.last_active = self.clock()
            return receipt
        except RoundError as e:
            self.reject(s, e.message)
            raise
        except Exception as e:  # an I/O error or a bug: withdraw, and say so
            log.exception("round %s: upload of %s failed", self.id, s.client_id)
            self.reject(s, f"internal error: {e!r}")
            raise RoundError("INTERNAL", f"coordinator error while receiving the upload: {e!r}") from e

    def _compare(self, s: UploadSession, data: bytes) -> None:
        """Refuse policy: a re-upload must be byte-identical to the committed one."""
        c = s.compare
        with open(c.path, "rb") as f:
            f.seek(s.offset)
            same = f.read(len(data)) == data
        if not same:
            raise RoundError(
                "FAILED_PRECONDITION",
                f"client {s.client_id!r} already committed a different contribution (sha256 {c.sha256[:16]}…) "
                f"and round {self.id!r} refuses replacements",
            )

    def _check_header(self, s: UploadSession, h: dict) -> None:
        if h.get("kind") != "contribution":
            raise RoundError("INVALID_ARGUMENT", f"stream header kind is {h.get('kind')!r}, expected 'contribution'")
        fp = h.get("base_fingerprint")
        if fp != self.config.base_fingerprint:
            raise RoundError(
                "FAILED_PRECONDITION",
                f"contribution of {s.client_id!r} was computed against base {fp!r}, "
                f"but round {self.id!r} merges onto base {self.config.base_fingerprint!r}",
            )
        want = self.trims[s.client_id]
        got = h.get("trim") or {}
        keys = ["kind", "fraction"] + (["scope"] if want.kind == "topk" else []) + (["seed"] if want.kind == "dare" else [])
        bad = [k for k in keys if got.get(k) != getattr(want, k)]
        if bad:
            raise RoundError(
                "INVALID_ARGUMENT",
                f"contribution of {s.client_id!r} was trimmed with {({k: got.get(k) for k in keys})}, "
                f"round {self.id!r} asks for {({k: getattr(want, k) for k in keys})}",
            )

    def _take_record(self, s: UploadSession, ev: Record) -> None:
        t = ev.tensor
        e = self.manifest.get(t.name)
        if e is None:
            raise RoundError("INVALID_ARGUMENT", f"tensor {t.name!r} is not in the manifest of round {self.id!r}")
        if t.name in s.seen:
            raise RoundError("INVALID_ARGUMENT", f"tensor {t.name!r} appears twice in the contribution")
        if tuple(t.shape) != tuple(e.shape):
            raise RoundError(
                "INVALID_ARGUMENT", f"tensor {t.name!r} has shape {list(t.shape)}, the round's base has {list(e.shape)}"
            )
        s.seen.add(t.name)
        s.nnz += t.nnz
        budget = self.budgets[s.client_id]
        if s.nnz > budget:
            trim = self.trims[s.client_id]
            raise RoundError(
                "INVALID_ARGUMENT",
                f"contribution of {s.client_id!r} carries more than {budget:,} nonzeros (at {t.name!r}): "
                f"over the budget of {trim.kind} trim at {100 * trim.fraction:g}% of {self.total:,} parameters",
            )
        if s.live:
            with self.lock:
                if s.closed:
                    raise RoundError("FAILED_PRECONDITION", s.reason)
                self._check_accepting(s.client_id, new=False)
                self.agg.fold(t.name, t.indices, t.values, self.participants[s.client_id].weight)
                s.folded.append((t.name, ev.offset, ev.length))

    def _commit(self, s: UploadSession) -> Receipt:
        missing = [n for n in self.manifest if n not in s.seen]
        if missing:
            raise RoundError(
                "INVALID_ARGUMENT",
                f"contribution of {s.client_id!r} ends without {len(missing)} tensor(s) of the manifest, e.g. "
                + ", ".join(repr(m) for m in missing[:5]),
            )
        s.ended = True
        s.file.flush()
        os.fsync(s.file.fileno())
        s.close_file()
        sha = s.sha.hexdigest()
        cid = s.client_id
        weight = self.participants[cid].weight
        with self.lock:
            if s.closed:
                raise RoundError("FAILED_PRECONDITION", s.reason)
            self._check_accepting(cid, new=False)
            old = self.committed.get(cid)
            if old is not None and old.sha256 == sha:
                self._close_session(s, "duplicate of the committed contribution")
                self._remove_partial(s)
                self._emit("UPLOAD_DUPLICATE", client_id=cid, sha256=sha, bytes=s.offset,
                           message="identical to the committed contribution: nothing changes")
                return Receipt(True, 0, sha, s.offset, s.nnz, duplicate=True, committed_count=len(self.committed))
            if old is not None and self.config.replace_policy == "refuse":
                raise RoundError(
                    "FAILED_PRECONDITION",
                    f"client {cid!r} already committed a different contribution (sha256 {old.sha256[:16]}…) "
                    f"and round {self.id!r} refuses replacements",
                )
            if self.fold_mode == "final":
                pass  # folded in participant order when the round finalizes
            elif old is None:
                if not s.live:
                    self._fold_file(s.path, weight, +1)
            elif self.fold_mode == "arrival":
                self._fold_file(old.path, weight, -1)
                self._fold_file(s.path, weight, +1)
            else:
                try:
                    self._rebuild({cid: s.path})
                except Exception as e:  # no aggregator to go on with
                    log.exception("round %s: rebuilding the aggregator failed", self.id)
                    self._fail(f"rebuilding the aggregator from the spool failed: {e!r}")
                    raise RoundError("INTERNAL", f"round {self.id!r} failed: {self.message}") from e
            c = self.spool.commit(cid, s.path, sha, s.offset, s.nnz)
            self.committed[cid] = c
            self._close_session(s, "committed")
            self._persist()
            self._emit("UPLOAD_REPLACED" if old is not None else "UPLOAD_COMMITTED", client_id=cid, sha256=sha,
                       bytes=s.offset, message=f"{s.nnz:,} nonzeros")
            receipt = Receipt(True, 0, sha, s.offset, s.nnz, replaced=old is not None,
                              committed_count=len(self.committed))
            self._maybe_finalize()
            return receipt

    def reject(self, s: UploadSession, why: str) -> None:
        """Withdraw an upload that failed validation; the round is left as it was."""
        with self.lock:
            if s.closed:
                return
            self._discard(s, f"rejected: {why}")
            self._emit("UPLOAD_REJECTED", client_id=s.client_id, message=why)

    def _discard(self, s: UploadSession, why: str) -> None:
        """Un-fold what `s` folded and drop it (lock held)."""
        if s.closed:
            return
        if s.live and s.folded and self.agg is not None:
            weight = self.participants[s.client_id].weight
            with open(s.path, "rb") as f:
                for name, off, length in s.folded:
                    t = read_record_at(f, off, length, self.limits)
                    self.agg.fold(name, t.indices, t.values, weight, direction=-1)
            s.folded = []
        self._close_session(s, why)
        if s.attached:
            s.cleanup_pending = True  # the stream's thread removes the file when it lets go
        else:
            self._remove_partial(s)

    def _close_session(self, s: UploadSession, why: str) -> None:
        s.closed = True
        s.reason = f"upload of {s.client_id!r} to round {self.id!r} {why}"
        if self.sessions.get(s.client_id) is s:
            del self.sessions[s.client_id]

    @staticmethod
    def _remove_partial(s: UploadSession) -> None:
        s.close_file()
        s.cleanup_pending = False
        if s.path.exists() and s.path.suffix == ".part":
            s.path.unlink(missing_ok=True)

    def _fold_file(self, path: Path, weight: float, direction: int) -> None:
        with open(path, "rb") as f:
            _, tensors = read_stream(f, self.limits)
            for t in tensors:
                self.agg.fold(t.name, t.indices, t.values, weight, direction=direction)

    def _rebuild(self, replace: Optional[dict[str, Path]] = None) -> None:
        """A fresh aggregator from the committed spool (with `replace` swapped in),
        folded in participant order. The old one is let go first: a sharded one
        holds actors the new one needs."""
        self._release(self.agg)
        self.agg = None
        self.agg = self._new_aggregator()
        files = {cid: c.path for cid, c in self.committed.items()}
        files.update(replace or {})
        for cid in self.participants:
            if cid in files:
                self._fold_file(files[cid], self.participants[cid].weight, +1)

    @staticmethod
    def _release(agg: Optional[AggregatorLike]) -> None:
        """Let an aggregator go (one with resources elsewhere, e.g. actors, may have `close`)."""
        close = getattr(agg, "close", None)
        if callable(close):
            close()

    # ------------------------------------------------------------------ closing

    def _maybe_finalize(self, now: Optional[float] = None) -> None:
        """Finalize when quorum is met and everyone is in, or the deadline passed, or an admin asked."""
        if self.state != "open" or len(self.committed) < self.quorum:
            return
        if len(self.committed) == len(self.participants) or self.deadline_passed(now) or self.close_requested:
            self._start_finalizer()

    def _start_finalizer(self) -> None:
        if self._finalizer is None:
            self._finalizer = threading.Thread(target=self._finalize, name=f"finalize-{self.id}", daemon=True)
            self._finalizer.start()

    def tick(self, now: Optional[float] = None) -> None:
        """Periodic work: expire abandoned uploads, act on the deadline."""
        now = self.clock() if now is None else now
        with self.lock:
            if self.state != "open":
                return
            for s in list(self.sessions.values()):
                if not s.attached and now - s.last_active > self.abandon_after_s:
                    self._discard(s, f"abandoned (idle {now - s.last_active:.0f} s)")
                    self._emit("UPLOAD_ABANDONED", client_id=s.client_id, message=s.reason)
            if self.deadline_passed(now) and not self._deadline_seen:
                self._deadline_seen = True
                if len(self.committed) >= self.quorum:
                    self._maybe_finalize(now)
                elif self.config.late_policy == "reject":
                    self._fail(f"quorum not met by the deadline: {len(self.committed)} of {self.quorum} "
                               "contribution(s) committed")

    def close(self, abort: bool = False, timeout: Optional[float] = None) -> None:
        """Admin: finalize now (quorum must be met), or abort. Waits for the finalization."""
        with self.lock:
            if abort:
                if self.state in ("finalized", "failed"):
                    raise RoundError("FAILED_PRECONDITION", f"round {self.id!r} is already {self.state}")
                if self.state == "open":
                    self._fail("aborted by the admin")
                return
            if self.state == "failed":
                raise RoundError("FAILED_PRECONDITION", f"round {self.id!r} failed: {self.message}")
            if self.state == "open":
                if len(self.committed) < self.quorum:
                    raise RoundError(
                        "FAILED_PRECONDITION",
                        f"round {self.id!r}: quorum not met ({len(self.committed)} of {self.quorum} "
                        "contribution(s) committed)",
                    )
                self.close_requested = True
                self._persist()
                self._start_finalizer()
            t = self._finalizer
        if t is not None:
            t.join(timeout)

    def _fail(self, why: str) -> None:
        self.state = "failed"
        self.message = why
        for s in list(self.sessions.values()):
            self._discard(s, f"stopped: round failed ({why})")
        self._release(self.agg)
        self.agg = None
        self._persist()
        self._emit("ROUND_FAILED", message=why)

    def wait_closed(self, timeout: Optional[float] = None) -> bool:
        """Block until the round is finalized or failed."""
        end = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while self.state not in ("finalized", "failed"):
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self.cond.wait(left if left is not None else 1.0)
            return True

    def _finalize(self) -> None:
        with self.lock:
            if self.state != "open":
                return
            self.state = "finalizing"
            for s in list(self.sessions.values()):
                self._discard(s, "stopped: the round is finalizing")
            self._persist()
            self._emit("ROUND_FINALIZING", message=f"merging {len(self.committed)} contribution(s)")
            contributors = sorted(self.committed)
        try:
            if self.fold_mode == "final":
                self._rebuild()
            merged = self._write_merged(self.agg, contributors)
            if self.base_path:
                self._write_model(merged.path)
        except Exception as e:
            log.exception("round %s: finalization failed", self.id)
            with self.lock:
                self.state = "failed"
                self.message = f"finalization failed: {e!r}"
                self._release(self.agg)
                self.agg = None
                self._persist()
                self._emit("ROUND_FAILED", message=self.message)
            return
        with self.lock:
            self.state = "finalized"
            self.merged = merged
            self._release(self.agg)
            self.agg = None  # the accumulators are no longer needed
            self._persist()
            self._emit("ROUND_FINALIZED", sha256=merged.sha256, bytes=merged.bytes,
                       message=f"majority sign {merged.majority_sign:+d}")

    def _write_merged(self, agg: AggregatorLike, contributors: list[str]) -> Merged:
        """sign_balance all-reduce -> finalize -> the merged task vector as a codec stream."""
        from tiesfed.core.apply import dense_to_sparse

        opts = self.config.options
        majority = majority_sign(agg.sign_balance()) if self.spec.combine == "disjoint" else 0
        header = {
            "kind": "merged",
            "round_id": self.id,
            "method": opts.method,
            "lambda": opts.lam,
            "base_fingerprint": self.config.base_fingerprint,
            "options": opts.model_dump(mode="json", by_alias=True),
            "majority_sign": majority,
            "contributors": contributors,
        }
        final = self.spool.merged_path
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            w = StreamWriter(f, header)
            for name, tau in agg.finalize(majority):
                idx, val = dense_to_sparse(tau)
                w.write(SparseTensor(name, self.manifest[name].shape, idx, val))
            w.close()
            f.flush()
            os.fsync(f.fileno())
        sha = sha256_file(tmp)
        size = tmp.stat().st_size
        os.replace(tmp, final)
        fsync_dir(final.parent)
        return Merged(sha, size, majority, final)

    def _write_model(self, merged_path: Path) -> None:
        """The full merged model: by the shard actors in parallel where the aggregator
        can (a Ray-sharded one, base and spool on a shared filesystem), else here."""
        from tiesfed.io.materialize import apply_merged
        from tiesfed.io.model_io import ModelReader, copy_side_files

        parallel = getattr(self.agg, "write_model", None)
        if parallel is not None:
            try:
                parallel(self.base_path, str(merged_path), self.spool.model_dir, self.shard_bytes,
                         {"tiesfed_method": self.config.options.method})
                copy_side_files(Path(self.base_path), self.spool.model_dir)
                return
            except Exception as e:  # e.g. the base is not readable on every node
                log.warning("round %s: parallel model write failed (%r); writing it here", self.id, e)
                self.spool.clear_outputs(keep_merged=True)
        with ModelReader(self.base_path) as base:
            apply_merged(base, merged_path, self.spool.model_dir, shard_bytes=self.shard_bytes)


# ----------------------------------------------------------------------------- manager


class RoundManager:
    """Every round of one coordinator, its spool, upload slots and the ticker."""

    def __init__(
        self,
        spool_dir: str | Path,
        *,
        aggregator_factory: Optional[AggregatorFactory] = None,
        base_path: Optional[str] = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        max_active_uploads: int = 2,
        max_chunk_bytes: int = MAX_CHUNK_BYTES,
        abandon_after_s: float = 300.0,
        stall_after_s: float = 120.0,
        lease_s: float = 30.0,
        tick_s: float = 0.2,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.spool_dir = Path(spool_dir)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.factory = aggregator_factory or default_aggregator_factory
        self.base_path = base_path
        self.clock = clock
        self.tick_s = tick_s
        self.max_chunk_bytes = max_chunk_bytes
        self.upload_slots = threading.BoundedSemaphore(max_active_uploads)
        self.stall_after_s = stall_after_s
        self._active: dict[int, list] = {}  # slot holders: id -> [last activity, cancel]
        self.lease_s = lease_s
        self._leases: dict[str, tuple[str, float]] = {}  # reserved slots: lease -> (client, expiry)
        self._round_kw = dict(
            base_path=base_path, shard_bytes=shard_bytes, max_chunk_bytes=max_chunk_bytes,
            abandon_after_s=abandon_after_s, clock=clock,
        )
        self.rounds: dict[str, Round] = {}
        self.lock = threading.Lock()
        self._base_fp: Optional[str] = None
        self._stop = threading.Event()
        self._ticker: Optional[threading.Thread] = None

    def recover(self) -> list[str]:
        """Load every round found in the spool."""
        found = []
        for sp in iter_round_dirs(self.spool_dir):
            if sp.round_id in self.rounds:
                continue
            r = Round.recover(sp, self.factory, **self._round_kw)
            with self.lock:
                self.rounds[r.id] = r
            found.append(r.id)
        return found

    def _base_info(self, keep_base) -> tuple[Optional[str], Optional[list[TensorEntry]]]:
        if not self.base_path:
            return None, None
        from tiesfed.io.model_io import DTYPE_TO_ST, ModelReader, fingerprint

        with ModelReader(self.base_path) as base:
            if self._base_fp is None:
                self._base_fp = fingerprint(base)
            manifest = [
                TensorEntry(name=t.name, shape=tuple(t.shape), dtype=DTYPE_TO_ST[t.dtype])
                for t in mergeable(base.manifest(), keep_base)
            ]
        return self._base_fp, manifest

    def open_round(self, config: RoundConfig) -> Round:
        with self.lock:
            if config.round_id in self.rounds or RoundSpool(self.spool_dir, config.round_id).exists():
                raise RoundError("ALREADY_EXISTS", f"round {config.round_id!r} already exists")
            need_base = config.base_fingerprint is None or config.manifest is None
            fp, manifest = self._base_info(config.options.keep_base) if need_base else (None, None)
            cfg = config.resolved(self.clock(), fp, manifest)
            r = Round.create(cfg, RoundSpool(self.spool_dir, cfg.round_id), self.factory, **self._round_kw)
            self.rounds[r.id] = r
            return r

    def check_known_client(self, client_id: str) -> None:
        """Only participants of some round may queue for an upload slot."""
        with self.lock:
            known = any(client_id in r.participants for r in self.rounds.values())
        if not known:
            raise RoundError("PERMISSION_DENIED", f"client {client_id!r} is not on the allowlist of any round")

    def reserve_upload(self, client_id: str, wait_s: float) -> Optional[str]:
        """Wait up to `wait_s` for an upload slot; returns a lease for it (or None).

        The client then opens its Upload stream with the lease: a client waiting
        for its turn holds no stream, so gRPC buffers nothing for it."""
        self.check_known_client(client_id)
        if not self.upload_slots.acquire(timeout=min(max(wait_s, 0.0), 60.0)):
            return None
        lease = secrets.token_hex(16)
        with self.lock:
            self._leases[lease] = (client_id, time.monotonic() + self.lease_s)
        return lease

    def _claim(self, lease: Optional[str], client_id: str) -> bool:
        """Take over the slot a lease reserved (False: no such lease, lapsed, or someone else's)."""
        if not lease:
            return False
        with self.lock:
            held = self._leases.get(lease)
            if held is None or held[0] != client_id:
                return False
            del self._leases[lease]
            return True

    def _expire_leases(self) -> None:
        now = time.monotonic()
        with self.lock:
            lapsed = [k for k, (_, exp) in self._leases.items() if now > exp]
            for k in lapsed:
                del self._leases[k]
        for _ in lapsed:
            self.upload_slots.release()

    @contextmanager
    def upload_slot(
        self, cancel: Callable[[], object], lease: Optional[str] = None, client_id: str = ""
    ) -> Iterator[Callable[[], None]]:
        """Hold one of the `max_active_uploads` slots (the one `lease` reserved, if valid);
        yields `touch()` to call on progress. A holder without progress for
        `stall_after_s` is cancelled by the ticker."""
        if not self._claim(lease, client_id):
            self.upload_slots.acquire()
        key = id(cancel)
        entry = [time.monotonic(), cancel]
        with self.lock:
            self._active[key] = entry

        def touch() -> None:
            entry[0] = time.monotonic()

        try:
            yield touch
        finally:
            with self.lock:
                self._active.pop(key, None)
            self.upload_slots.release()

    def _cancel_stalled(self) -> None:
        now = time.monotonic()
        with self.lock:
            stalled = [e for e in self._active.values() if now - e[0] > self.stall_after_s]
        for e in stalled:
            log.warning("cancelling an upload stream idle for %.0f s", now - e[0])
            e[0] = now
            e[1]()

    def get(self, round_id: str) -> Round:
        with self.lock:
            r = self.rounds.get(round_id)
        if r is None:
            raise RoundError("NOT_FOUND", f"no round {round_id!r} on this coordinator")
        return r

    def start(self) -> None:
        if self._ticker is None:
            self._ticker = threading.Thread(target=self._tick_loop, name="rounds-ticker", daemon=True)
            self._ticker.start()

    def _tick_loop(self) -> None:
        while not self._stop.wait(self.tick_s):
            self._cancel_stalled()
            self._expire_leases()
            with self.lock:
                rounds = list(self.rounds.values())
            for r in rounds:
                try:
                    r.tick()
                except Exception:  # keep ticking the other rounds
                    log.exception("round %s: tick failed", r.id)

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout)
            self._ticker = None
        with self.lock:
            rounds = list(self.rounds.values())
        for r in rounds:
            t = r._finalizer
            if t is not None:
                t.join(timeout)
