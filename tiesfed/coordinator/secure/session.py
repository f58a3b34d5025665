"""The coordinator's side of one secure round over gRPC: a `SecAggServer` behind a lock,
its phases closed by quorum or deadline, and the round failed (its status says why) when
fewer than t clients are left.

Phases: keys → shares → masked → unmask → done. A phase closes once every client it
expects has sent its message, or at its deadline with whoever arrived (`deadline`: `phase_s`
after it opened, the key phase's clock starting at the first advert, longer while a missing
client's stream keeps making progress). The protocol then refuses fewer than t, and the
round fails with that message before anything is unmasked. What the phase closes to (the
key list, each client's mask request, the unmask request) waits in an outbox for the
clients' polls, as `Outgoing` pieces: the mask requests refer to U's bitmap in its file,
they do not copy it. A step message is taken from a file (`step_file`: a stream writes its
chunks there), parsed without reading its bitmap into memory, and renamed into the journal.
The masked vectors are spooled to a file while they stream in (they are
uniform bytes); a broken stream's prefix stays there and the client resumes at its end
(`masked_status`). A complete one is folded into the one running sum, once. The running
sum is a file in the round's spool folder (`SecAggServer`'s `RingFile`), folded and unmasked
a block at a time and decoded block by block when published (`FlatAggregator`).

Every message, masked upload and phase close is kept in the round's journal (`journal`)
before it is acknowledged or shown, so a restarted coordinator replays it into a fresh
session at the phase it had reached; a client's retry of a message already taken is
acknowledged again (an identical one) or refused (a different one). The journal goes once
the merge is published.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from tiesfed.coordinator.rounds.events import RoundError
from tiesfed.coordinator.rounds.finalize import fail
from tiesfed.coordinator.rounds.intake import check_free_disk
from tiesfed.coordinator.rounds.state import RoundState
from tiesfed.coordinator.secure.deadline import PhaseClock
from tiesfed.coordinator.secure.journal import STEP_TYPES, Journal, pieces, replay
from tiesfed.coordinator.secure.publish import FlatAggregator, publish
from tiesfed.coordinator.secure.release import check_release
from tiesfed.coordinator.secure.settings import effective, secagg_round
from tiesfed.trust.certs import TrustError, fingerprint
from tiesfed.trust.secagg import SecAggError, SecAggServer
from tiesfed.trust.secagg.blob import Outgoing
from tiesfed.trust.secagg.messages import KeyAdvert, Message, from_file, to_parts

log = logging.getLogger("tiesfed.coordinator")

PHASES = ("keys", "shares", "masked", "unmask", "done")
#: Bounds on a step message's size (`step_limit`): the fixed part (a key advert: two keys, a
#: certificate, a signature; the JSON header) and what each client adds (a share box or an
#: unmasking share, with its id); a ShareUpload adds its support bitmap, deflated (zlib's worst
#: case is the raw bitmap plus 5 bytes per 16 KiB stored block).
STEP_FIXED_BYTES = 64 << 10
STEP_PER_CLIENT_BYTES = 1 << 10


class _Partial:
    """A masked upload's received prefix: its size and running sha256 (the bytes are in the spool)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.restart()

    def restart(self) -> None:
        self.size, self.sha = 0, hashlib.sha256()

    def add(self, data: bytes) -> None:
        self.size += len(data)
        self.sha.update(data)


class SecureSession:
    """One secure round's protocol state on the coordinator (thread-safe); rebuilt from the
    round's journal when it has one (a restart)."""

    def __init__(self, r: RoundState, ca_pem: Optional[bytes], clock: Callable[[], float] = time.time) -> None:
        self.round = r
        self.params = secagg_round(r.config)
        settings = effective(r.config)
        self.deadline = PhaseClock(float(settings.phase_s), float(settings.min_rate))
        self.server = SecAggServer(self.params, ca_pem, workdir=r.spool.dir)
        self.clock = clock
        self.cond = threading.Condition()
        self.phase = "keys"
        self.expected: set[str] = set(r.participants)
        self.arrived: list[str] = []
        self.outbox: dict[str, Union[Outgoing, dict[str, Outgoing]]] = {}
        self.failed = ""
        self.uploading: set[str] = set()
        self.partial: dict[str, _Partial] = {}  # masked uploads in progress: what arrived so far
        self.folded: set[str] = set()  # whose masked vector is in the running sum
        self.adverts: dict[str, KeyAdvert] = {}
        self.counted: set[str] = set()  # whose masked vectors are in the sum
        self._sharers: set[str] = set()  # who shared (U1): U counts their supports
        self.taken: dict[tuple[str, str], str] = {}  # (phase, client) → sha256 of the message taken
        self.journal = Journal(r.spool.dir)
        self.journal.drop_incoming()  # streams a stop cut short: never acknowledged
        with self.cond:
            self._pending = replay(self) if self.journal.dir.exists() else None  # to publish: all had closed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drive, name=f"secagg-{r.id}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ arrivals
    def step_limit(self, phase: str) -> int:
        """The most bytes a `phase` step message of this round can need: a larger declared
        size is refused before anything is buffered."""
        if phase not in STEP_TYPES:
            raise RoundError("INVALID_ARGUMENT", f"phase {phase!r} takes no step message (steps: "
                             f"{', '.join(STEP_TYPES)}; the masked vector goes through UploadMasked)")
        n = len(self.round.participants)
        limit = STEP_FIXED_BYTES + n * STEP_PER_CLIENT_BYTES
        if phase == "shares":
            raw = (self.params.numel + 7) // 8
            limit += raw + 5 * (raw // (16 << 10) + 1)
        return limit

    def attach(self, client_id: str) -> None:
        """A stream of this client's opened: while it makes progress, its phase waits (`deadline`)."""
        with self.cond:
            self.deadline.attach(client_id, self.clock())

    def advance(self, client_id: str, nbytes: int) -> None:
        """`nbytes` of an attached stream arrived."""
        with self.cond:
            self.deadline.advance(client_id, nbytes, self.clock())

    def detach(self, client_id: str) -> None:
        with self.cond:
            self.deadline.detach(client_id)

    def _late(self) -> bool:
        """Whether the open phase is past its deadline (lock held)."""
        return self.deadline.late(self.expected - set(self.arrived), self.clock())

    def step(self, client_id: str, phase: str, payload: bytes, cert_fingerprint: Optional[str]) -> str:
        """One client message of `phase` as bytes (the unary Step: small messages); see `step_file`."""
        limit = self.step_limit(phase)
        if len(payload) > limit:
            raise RoundError("INVALID_ARGUMENT", f"a {phase} message of {len(payload)} bytes from {client_id!r}: "
                             f"this round's parameters allow at most {limit}")
        path, f = self.journal.incoming(phase, client_id)
        try:
            with f:
                f.write(payload)
        except OSError as e:
            path.unlink(missing_ok=True)
            raise RoundError("UNAVAILABLE", f"the coordinator cannot write its journal: {e}") from None
        return self.step_file(client_id, phase, path, hashlib.sha256(payload).hexdigest(), cert_fingerprint)

    def step_file(self, client_id: str, phase: str, path: Path, sha256: str, cert_fingerprint: Optional[str]) -> str:
        """One client message of `phase`, received whole into `path` (`journal.incoming`; `sha256`
        its hash); its sender must be the caller (`client_id`, the certificate's). Taken, the file
        is renamed into the journal; refused or a repeat, it is deleted, and nothing changes."""
        try:
            return self._step_file(client_id, phase, path, sha256, cert_fingerprint)
        finally:
            path.unlink(missing_ok=True)  # unless it was adopted (renamed into the journal)

    def _step_file(self, client_id: str, phase: str, path: Path, sha256: str, cert_fingerprint: Optional[str]) -> str:
        limit, size = self.step_limit(phase), path.stat().st_size
        if size > limit:
            raise RoundError("INVALID_ARGUMENT", f"a {phase} message of {size} bytes from {client_id!r}: "
                             f"this round's parameters allow at most {limit}")
        want = STEP_TYPES[phase]
        try:
            msg: Message = from_file(path)  # a bitmap stays in the file
        except SecAggError as e:
            raise RoundError("INVALID_ARGUMENT", f"{phase} message from {client_id!r}: {e}") from None
        if not isinstance(msg, want):
            raise RoundError("INVALID_ARGUMENT", f"phase {phase!r} takes a {want.__name__}, got {type(msg).__name__}")
        if msg.client_id != client_id:
            raise RoundError("PERMISSION_DENIED", f"a {want.__name__} naming {msg.client_id!r} sent by "
                             f"{client_id!r}: a client speaks only for its own certificate's id")
        if isinstance(msg, KeyAdvert) and cert_fingerprint is not None:
            try:
                same = fingerprint(msg.cert_pem) == cert_fingerprint
            except TrustError as e:  # not a certificate at all
                raise RoundError("PERMISSION_DENIED", f"the key advertisement of {client_id!r} carries no usable "
                                 f"certificate: {e}") from None
            if not same:
                raise RoundError("PERMISSION_DENIED", f"the key advertisement of {client_id!r} carries a "
                                 "certificate other than the one it connected with")
        with self.cond:
            if self._taken(client_id, phase, sha256):  # a retry (its ack was lost, or a restart came between)
                return self.phase
            self._check_phase(client_id, phase)
            try:
                self.journal.adopt(phase, client_id, path)  # before the ack: a restart replays it
            except OSError as e:  # nothing taken: the client retries
                raise RoundError("UNAVAILABLE", f"the coordinator cannot write its journal: {e}") from None
            try:
                {"keys": self.server.receive_advert, "shares": self.server.receive_shares,
                 "unmask": self.server.receive_unmask}[phase](msg)
            except SecAggError as e:
                self.journal.forget(phase, client_id)
                raise RoundError("INVALID_ARGUMENT", str(e)) from None
            self.taken[phase, client_id] = sha256
            if isinstance(msg, KeyAdvert):
                self.adverts[client_id] = msg
                self.deadline.start(self.clock())
            self._arrive(client_id)
        return self.phase

    def _taken(self, client_id: str, phase: str, sha256: str) -> bool:
        """Whether this very message (its sha256) was taken already (lock held); a different one
        in its place is ALREADY_EXISTS."""
        if self.failed:
            raise RoundError("FAILED_PRECONDITION", f"round {self.round.id!r} failed: {self.failed}")
        held = self.taken.get((phase, client_id))
        if held is None:
            return False
        if held != sha256:
            raise RoundError("ALREADY_EXISTS", f"client {client_id!r} already sent a different {phase} message")
        log.info("round %s: secure %s from %s again (the same message): acknowledged", self.round.id, phase,
                 client_id)
        return True

    def _check_phase(self, client_id: str, phase: str) -> None:
        if self.failed:
            raise RoundError("FAILED_PRECONDITION", f"round {self.round.id!r} failed: {self.failed}")
        if phase != self.phase:
            raise RoundError("FAILED_PRECONDITION", f"round {self.round.id!r} is in phase {self.phase!r}, "
                             f"not {phase!r}")
        if client_id not in self.expected:
            raise RoundError("FAILED_PRECONDITION", f"client {client_id!r} is not in phase {phase!r} of round "
                             f"{self.round.id!r} (it missed an earlier phase)")
        if client_id in self.arrived:
            raise RoundError("ALREADY_EXISTS", f"client {client_id!r} already sent its {phase} message")

    def _arrive(self, client_id: str) -> None:
        self.arrived.append(client_id)
        log.info("round %s: secure %s from %s (%d of %d)", self.round.id, self.phase, client_id, len(self.arrived),
                 len(self.expected))
        self.cond.notify_all()

    def upload(self, client_id: str, total: int, chunks: Iterator[tuple[int, bytes, str]]) -> None:
        """One stream of the masked vector: (offset, bytes, sha256 on the last chunk) appended to
        the client's spool file, which keeps what a broken stream delivered; the next stream
        resumes at its end (or starts afresh at 0). Folded into the running sum once, when all
        `total` bytes are in and their sha256 is the client's."""
        chunks = iter(chunks)
        head = next(chunks, None)  # its offset is checked before anything is kept for this stream
        with self.cond:
            self._check_phase(client_id, "masked")
            need = self.params.layout.width * self.params.layout.bytes_per_element * self.server.support_size
            if total != need:
                raise RoundError("INVALID_ARGUMENT", f"masked upload of {client_id!r}: {total} bytes declared, "
                                 f"U needs {need}")
            if client_id in self.uploading:
                raise RoundError("ABORTED", f"client {client_id!r} has a masked upload stream open already (a "
                                 "broken one not yet noticed?); ask MaskedStatus and retry")
            held = self.partial[client_id].size if client_id in self.partial else 0
            if head is not None and head[0] not in (0, held):
                raise RoundError("ABORTED", f"masked upload of {client_id!r}: a stream starting at {head[0]}, the "
                                 f"coordinator holds {held} bytes: resume there (MaskedStatus) or start at 0")
            if head is not None and len(head[1]) > total:
                raise RoundError("INVALID_ARGUMENT", f"masked upload of {client_id!r}: a chunk of {len(head[1])} "
                                 f"bytes, more than the {total} declared")
            self.uploading.add(client_id)
            self.attach(client_id)  # the condition's lock is re-entrant
            part = self.partial.setdefault(client_id, _Partial(total))
        path = self.journal.partial_path(client_id)
        try:
            want = ""
            with self.journal.open_partial(client_id) as f:
                for n, (offset, data, sha) in enumerate(itertools.chain([head] if head else [], chunks)):
                    if n == 0 and offset == 0 and part.size:  # the client starts afresh
                        with self.cond:
                            part.restart()
                        f.truncate(0)
                    if offset != part.size:
                        raise RoundError("ABORTED", f"masked upload of {client_id!r}: a chunk at {offset}, the "
                                         f"coordinator holds {part.size} bytes: resume there (MaskedStatus)")
                    if part.size + len(data) > total:
                        raise RoundError("INVALID_ARGUMENT", f"masked upload of {client_id!r}: {part.size + len(data)}"
                                         f" bytes, more than the {total} declared")
                    check_free_disk(self.round.spool.dir, len(data), self.round.min_free_disk_bytes)
                    f.seek(part.size)
                    f.write(data)
                    f.flush()
                    with self.cond:
                        part.add(data)
                        self.advance(client_id, len(data))  # empty chunks do not count as progress
                    want = sha or want
            if part.size != total:
                raise RoundError("INVALID_ARGUMENT", f"masked upload of {client_id!r} ended after {part.size} of "
                                 f"{total} bytes (kept: resume at {part.size})")
            if want != part.sha.hexdigest():
                with self.cond:
                    part.restart()
                path.unlink(missing_ok=True)
                raise RoundError("DATA_LOSS", f"masked upload of {client_id!r}: the {total} bytes held do not "
                                 f"have the sha256 the client sent ({want or 'none'}); send it again from 0")

            with self.cond:
                self._check_phase(client_id, "masked")
                try:
                    done = self.journal.commit_masked(client_id, want)  # before the ack: a restart folds it again
                except OSError as e:  # the prefix stays: the client asks MaskedStatus and resumes
                    raise RoundError("UNAVAILABLE", f"the coordinator cannot write its journal: {e}") from None
                try:
                    self.fold(client_id, done)
                except SecAggError as e:
                    done.unlink(missing_ok=True)
                    raise RoundError("INVALID_ARGUMENT", str(e)) from None
                self.partial.pop(client_id, None)
                self._arrive(client_id)
        finally:
            with self.cond:
                self.uploading.discard(client_id)
            self.detach(client_id)

    def masked_status(self, client_id: str) -> tuple[int, str, int, bool]:
        """(bytes held, their sha256, the size declared, whether the vector is in the sum)."""
        with self.cond:
            if client_id in self.folded:
                need = self.params.layout.width * self.params.layout.bytes_per_element * self.server.support_size
                return need, "", need, True
            if self.failed:
                raise RoundError("FAILED_PRECONDITION", f"round {self.round.id!r} failed: {self.failed}")
            part = self.partial.get(client_id)
            if part is None:
                return 0, hashlib.sha256().hexdigest(), 0, False
            return part.size, part.sha.hexdigest(), part.total, False

    def fold(self, client_id: str, path: Path) -> None:
        """Add a complete masked upload (a file of the journal) to the running sum (lock held)."""
        size = path.stat().st_size
        self.server.receive_masked_stream(client_id, size, lambda: pieces(path))
        self.folded.add(client_id)

    def restore_partials(self) -> None:
        """The masked prefixes the journal holds, as a restart found them (lock held)."""
        total = self.params.layout.width * self.params.layout.bytes_per_element * self.server.support_size
        for path in self.journal.partial_files():
            part = _Partial(total)
            for piece in pieces(path):
                part.add(piece)
            if part.size > total:
                path.unlink(missing_ok=True)
                continue
            self.partial[path.stem] = part

    def _drop_partials(self) -> None:
        """Delete the masked prefixes of uploads that did not complete (the phase closed)."""
        self.journal.drop_partials()
        self.partial.clear()

    # ------------------------------------------------------------------ what clients read
    def poll(self, client_id: str, phase: str, wait_s: float) -> Optional[Outgoing]:
        """What `phase` closed to for this client (None: not closed within `wait_s`), in pieces
        (a mask request's U is read from its file as it is sent)."""
        if phase not in ("keys", "shares", "masked"):
            raise RoundError("INVALID_ARGUMENT", f"nothing to poll in phase {phase!r} (keys, shares, masked)")
        end = time.monotonic() + max(0.0, min(wait_s, 30.0))
        with self.cond:
            while phase not in self.outbox and not self.failed:
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)
            if self.failed:
                raise RoundError("FAILED_PRECONDITION", f"round {self.round.id!r} failed: {self.failed}")
            out = self.outbox[phase]
            if isinstance(out, dict):
                if client_id not in out:
                    raise RoundError("FAILED_PRECONDITION", f"client {client_id!r} is not among the sharers of "
                                     f"round {self.round.id!r} (it missed the share phase)")
                return out[client_id]
            return out

    def status(self) -> dict:
        with self.cond:
            deadline = self.deadline.deadline if self.phase != "done" else 0.0
            return {"phase": "failed" if self.failed else self.phase, "arrived": sorted(self.arrived),
                    "waiting_for": sorted(self.expected - set(self.arrived)) if self.phase != "done" else [],
                    "deadline": deadline, "message": self.failed or self.round.message,
                    "threshold": self.params.threshold}

    # ------------------------------------------------------------------ closing phases
    def _drive(self) -> None:
        if self._pending is not None:  # replayed with every phase closed: the merge was being written
            self._publish(self._pending)
            return
        while not self._stop.is_set():
            with self.cond:
                self.cond.wait(0.2)
                if self.failed or self.phase == "done" or self.round.state != "open":
                    if self.round.state == "failed" and not self.failed:  # an admin abort
                        self.failed = self.round.message
                        self._abandon()
                        self.cond.notify_all()
                    if self.phase == "done" or self.failed:
                        return
                    continue
                everyone = self.expected <= set(self.arrived)
                if not (everyone or self._late()):
                    continue
                try:
                    result = self.close_phase()
                except Exception as e:  # anything else too: a dead driver would leave the round hanging
                    missing = sorted(self.expected - set(self.arrived))
                    if isinstance(e, SecAggError):
                        why = f"{e}"
                    elif isinstance(e, OSError):
                        why = f"the journal could not be written: {e!r}"
                    else:
                        why = f"closing phase {self.phase!r} failed: {e!r}"
                        log.exception("round %s: closing secure phase %s", self.round.id, self.phase)
                    self.failed = why + (f" (missing: {', '.join(missing)})" if missing else "")
                    self._abandon()
                    log.warning("round %s: secure aggregation failed: %s", self.round.id, self.failed)
                    self.cond.notify_all()
                    with self.round.lock:
                        if self.round.state == "open":
                            fail(self.round, f"secure aggregation: {self.failed}")
                    return
                self.cond.notify_all()
            if result is not None:  # outside the session's lock: writing the merge takes a while
                self._publish(result)
                return

    def _abandon(self) -> None:
        """A failed or aborted round keeps no masked byte and no running sum (lock held)."""
        self._drop_partials()
        self.journal.drop_masked()
        self.server.discard()

    def _publish(self, result: FlatAggregator) -> None:
        publish(self.round, result, [self.adverts[c] for c in sorted(self.counted)])
        if self.round.state == "finalized":  # published: nothing is replayed any more
            self.journal.remove()

    def close_phase(self, record: bool = True) -> Optional[FlatAggregator]:
        """Close the current phase (lock held); the aggregator to publish after the last. With
        `record`, who it closed with goes to the journal before any client can read the outbox
        (a replay closes it again without recording)."""
        phase, arrived = self.phase, list(self.arrived)
        result = None
        if phase == "keys":
            kl = self.server.close_keys()
            self.outbox["keys"] = Outgoing(to_parts(kl))
            nxt = {a.client_id for a in kl.adverts}
        elif phase == "shares":
            reqs = self.server.close_shares()
            self.outbox["shares"] = {c: Outgoing(to_parts(m)) for c, m in reqs.items()}  # U: its file, once
            nxt = set(reqs)
            self._sharers = set(reqs)
        elif phase == "masked":
            self._drop_partials()
            check_release(self.journal, self.params, self.server.support_packed, self._sharers, arrived)
            ur = self.server.close_masked()
            self.outbox["masked"] = Outgoing(to_parts(ur))
            nxt = set(ur.survivors)
            self.counted = set(ur.survivors)
        else:
            result = FlatAggregator(self.server.finish_stream(), self.round.config.manifest or [], self.round.spec)
            if self.server.wrong_shares:
                log.warning("round %s: unmasking replies from %s held a wrong share; the secrets were rebuilt "
                            "without them", self.round.id, ", ".join(sorted(self.server.wrong_shares)))
            nxt = set()
        if record:
            self.journal.close(phase, arrived)
        dropped = sorted(self.expected - set(arrived))
        log.info("round %s: secure phase %s closed with %d client(s)%s", self.round.id, phase, len(arrived),
                 f"; missing: {', '.join(dropped)}" if dropped else "")
        self.phase = PHASES[PHASES.index(phase) + 1]
        self.expected, self.arrived = nxt, []
        self.deadline.open(self.clock())
        return result

    def stop(self) -> None:
        """Stop the driver; the journal stays (masked prefixes included) for the next start."""
        self._stop.set()
        with self.cond:  # the running sum file goes (a restart re-folds the journal's masked vectors)
            self.server.discard()
