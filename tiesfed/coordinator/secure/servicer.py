"""tiesfed.v1.SecureAggregation: the secure round's RPCs, beside the Coordinator service on
the same server. Every call is authenticated as the Coordinator's calls are (its `_caller`:
the verified certificate, revocation, expiry, the round's allowlist), and every protocol
message must name the caller's own id. Sessions are made on a secure round's first call, or
at start for a round whose journal shows its protocol had started (replayed where it stood).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from typing import Iterator, Optional

import grpc

from tiesfed.coordinator.rounds import Round, RoundError
from tiesfed.coordinator.rounds.intake import check_free_disk
from tiesfed.coordinator.secure.journal import Journal
from tiesfed.coordinator.secure.session import SecureSession
from tiesfed.coordinator.service import CoordinatorService, rpc, rpc_stream
from tiesfed.protos.v1 import secagg_pb2 as spb
from tiesfed.protos.v1 import secagg_pb2_grpc as spb_grpc
from tiesfed.trust.secagg.params import public_json

log = logging.getLogger("tiesfed.coordinator")
#: Largest chunk of StepStream / PollStream data (bytes), well under gRPC's message limit.
SECAGG_CHUNK_BYTES = 1 << 20
#: Smallest PollStream chunk (bytes) whatever the client asks: tiny chunks would turn one answer
#: into a message per byte, work on the coordinator that the caller chooses.
MIN_POLL_CHUNK_BYTES = 4 << 10
#: How long a call waits for its round's replay before answering UNAVAILABLE (clients retry).
REPLAY_WAIT_S = 30.0


class SecureAggregationService(spb_grpc.SecureAggregationServicer):
    """The servicer; `service` is the Coordinator servicer whose caller checks it reuses."""

    def __init__(self, service: CoordinatorService, ca_pem: Optional[bytes]) -> None:
        self.service = service
        self.gate = service.gate  # the Coordinator's caps on calls that hold a thread
        self.manager = service.manager
        self.ca_pem = ca_pem
        self.sessions: dict[str, SecureSession] = {}
        self.replaying: dict[str, threading.Event] = {}  # rounds whose journal a thread is replaying
        self.stopped = False
        self.lock = threading.Lock()
        self.resume_interrupted()

    def resume_interrupted(self) -> None:
        """Secure rounds a restart found mid-protocol carry on from their journals, replayed into
        fresh sessions (each open phase with a fresh `phase_s`) on a thread of their own, so the
        server listens meanwhile; a call to such a round waits for its replay (`_session`). A
        journal that cannot be replayed fails its round, naming why. A finished round's
        leftover journal goes."""
        todo = []
        for r in list(self.manager.rounds.values()):
            journal = Journal(r.spool.dir)
            if not (r.config.secure_aggregation and journal.dir.exists()):
                continue
            if r.state == "finalized":
                journal.remove()
            elif r.state == "failed":
                journal.drop_masked()
            elif r.state == "open" and journal.started():
                self.replaying[r.id] = threading.Event()
                todo.append(r)
        if todo:
            threading.Thread(target=self._replay, args=(todo,), name="secagg-replay", daemon=True).start()

    def _replay(self, rounds: list[Round]) -> None:
        from tiesfed.coordinator.rounds.finalize import fail

        for r in rounds:
            try:
                s = SecureSession(r, self.ca_pem)
                with self.lock:
                    if self.stopped:  # the server stopped meanwhile: the journal waits for the next start
                        s.stop()
                    else:
                        self.sessions[r.id] = s
            except Exception as e:  # a damaged journal: nothing is unmasked from it
                log.error("round %s: its secure-aggregation journal cannot be replayed: %s", r.id, e)
                with r.lock:
                    fail(r, f"secure aggregation: the coordinator restarted and its journal cannot be replayed: {e}")
            finally:
                self.replaying[r.id].set()

    def _session(self, round_id: str, context: grpc.ServicerContext) -> tuple[SecureSession, str, Optional[str]]:
        """(the round's session, the caller's id, its certificate's fingerprint: None when insecure)."""
        caller = self.service._caller(context)
        r: Round = self.manager.get(round_id)
        r.check_participant(caller.client_id)
        if not r.config.secure_aggregation:
            raise RoundError("FAILED_PRECONDITION", f"round {round_id!r} is not a secure-aggregation round")
        replay = self.replaying.get(r.id)
        if replay is not None and not replay.wait(REPLAY_WAIT_S):  # the client retries UNAVAILABLE
            raise RoundError("UNAVAILABLE", f"round {r.id!r}: the coordinator is still replaying its "
                             "secure-aggregation journal after a restart")
        with self.lock:
            s = self.sessions.get(r.id)
            if s is None:
                if r.state != "open":
                    raise RoundError("FAILED_PRECONDITION", f"round {r.id!r} is {r.state}: {r.message}")
                s = self.sessions[r.id] = SecureSession(r, self.ca_pem)
        return s, caller.client_id, caller.peer.fingerprint if caller.peer is not None else None

    @rpc
    def GetSecureSpec(self, request, context):
        caller = self.service._caller(context)
        r = self.manager.get(request.round_id)
        r.check_participant(caller.client_id)
        if not r.config.secure_aggregation:
            return spb.SecureSpec(round_id=r.id, secure=False)
        s, _, _ = self._session(r.id, context)
        return spb.SecureSpec(round_id=r.id, secure=True, params_json=public_json(s.params))

    @rpc
    def Step(self, request, context):
        s, cid, fp = self._session(request.round_id, context)
        with self.gate.held("SecureStep", cid):
            phase = s.step(cid, request.phase, request.payload, fp)
        return spb.SecAggAck(phase=phase)

    @rpc
    def StepStream(self, request_iterator, context):
        """A step message in chunks: the declared size is checked against the round's bound
        before anything is buffered, then the size and sha256 of what arrived; only a whole,
        matching message reaches the session (a bad stream changes nothing)."""
        first = next(request_iterator, None)
        if first is None:
            raise RoundError("INVALID_ARGUMENT", "empty step stream")
        s, cid, fp = self._session(first.round_id, context)
        total, phase = first.total_bytes, first.phase
        limit = s.step_limit(phase)
        if total > limit:
            raise RoundError("INVALID_ARGUMENT", f"a {phase} message of {total} bytes declared by {cid!r}: this "
                             f"round's parameters allow at most {limit}")
        with self.gate.held("SecureStep", cid):
            return spb.SecAggAck(phase=self._gather(s, cid, fp, phase, total, first, request_iterator))

    def _gather(self, s: SecureSession, cid: str, fp: Optional[str], phase: str, total: int, first,
                request_iterator) -> str:
        """A step stream's chunks written to a file as they come (`journal.incoming`: never
        gathered in memory), checked (size, sha256) and handed to the session, which renames a
        taken message into its journal; a bad stream's file is deleted and changes nothing."""
        sha, want, got = hashlib.sha256(), "", 0
        path, f = s.journal.incoming(phase, cid)
        try:
            s.attach(cid)
            try:
                with f:
                    chunk = first
                    while chunk is not None:
                        if (chunk.round_id and chunk.round_id != s.round.id) or (chunk.phase and chunk.phase != phase):
                            raise RoundError("INVALID_ARGUMENT", "chunks of one step stream name different rounds "
                                             "or phases")
                        if got + len(chunk.data) > total:
                            raise RoundError("INVALID_ARGUMENT", f"{phase} message of {cid!r}: more than the "
                                             f"{total} bytes declared")
                        check_free_disk(s.round.spool.dir, len(chunk.data), s.round.min_free_disk_bytes)
                        try:
                            f.write(chunk.data)
                        except OSError as e:
                            raise RoundError("UNAVAILABLE", f"the coordinator cannot write its journal: {e}") from None
                        got += len(chunk.data)
                        sha.update(chunk.data)
                        want = chunk.sha256 or want
                        s.advance(cid, len(chunk.data))
                        try:
                            chunk = next(request_iterator, None)
                        except grpc.RpcError:
                            raise RoundError("CANCELLED", f"{phase} message of {cid!r}: the stream broke") from None
            finally:
                s.detach(cid)
            if got != total:
                raise RoundError("INVALID_ARGUMENT", f"{phase} message of {cid!r} ended after {got} of {total} bytes")
            if want != sha.hexdigest():
                raise RoundError("DATA_LOSS", f"{phase} message of {cid!r}: the {total} bytes received do not have "
                                 f"the sha256 the client sent ({want or 'none'})")
            return s.step_file(cid, phase, path, want, fp)  # renamed into the journal if taken
        finally:
            path.unlink(missing_ok=True)  # a bad stream, or a refused or repeated message: nothing kept

    @rpc_stream
    def PollStream(self, request, context):
        """Poll's answer in chunks of at most `SECAGG_CHUNK_BYTES` (or the client's smaller
        `max_chunk_bytes`); the first chunk carries the whole size and sha256. The gate is held
        while the answer is sent too, so a caller that stops reading holds one of its two polls,
        until the stall watch (the Download's) cancels it after `stall_after_s` without a send."""
        s, cid, _ = self._session(request.round_id, context)
        with self.gate.held("SecurePoll", cid):
            out = s.poll(cid, request.phase, request.wait_seconds)
            phase = s.status()["phase"]
            if out is None:
                yield spb.PollChunk(ready=False, phase=phase)
                return
            size = max(MIN_POLL_CHUNK_BYTES, min(request.max_chunk_bytes or SECAGG_CHUNK_BYTES, SECAGG_CHUNK_BYTES))
            chunks = out.chunks(size)  # read from the outbox's pieces (U from its file) as they go
            with self.service.stalls.watch(context.cancel) as sent:
                yield spb.PollChunk(ready=True, phase=phase, total_bytes=out.size, sha256=out.sha256,
                                    data=next(chunks, b""))
                sent()
                for data in chunks:
                    yield spb.PollChunk(data=data)
                    sent()

    @rpc
    def Poll(self, request, context):
        s, cid, _ = self._session(request.round_id, context)
        with self.gate.held("SecurePoll", cid):
            out = s.poll(cid, request.phase, request.wait_seconds)
        return spb.SecAggReply(ready=out is not None, payload=out.whole() if out is not None else b"",
                               phase=s.status()["phase"])

    @rpc
    def UploadMasked(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None:
            raise RoundError("INVALID_ARGUMENT", "empty masked upload stream")
        s, cid, _ = self._session(first.round_id, context)

        def chunks() -> Iterator[tuple[int, bytes, str]]:
            chunk = first
            while chunk is not None:
                if chunk.round_id and chunk.round_id != s.round.id:
                    raise RoundError("INVALID_ARGUMENT", "chunks of one masked upload name different rounds")
                yield chunk.offset, chunk.data, chunk.sha256
                try:
                    chunk = next(request_iterator, None)
                except grpc.RpcError:  # the client went away: what arrived is kept for its resume
                    raise RoundError("CANCELLED", f"masked upload of {cid!r}: the stream broke") from None

        with self.gate.held("SecureUpload", cid):
            s.upload(cid, first.total_bytes, chunks())
        return spb.SecAggAck(phase=s.status()["phase"])

    @rpc
    def MaskedStatus(self, request, context):
        s, cid, _ = self._session(request.round_id, context)
        held, sha, total, committed = s.masked_status(cid)
        return spb.MaskedUploadStatus(committed_offset=held, prefix_sha256=sha, total_bytes=total,
                                      committed=committed)

    @rpc
    def Status(self, request, context):
        s, _, _ = self._session(request.round_id, context)
        st = s.status()
        return spb.SecAggStatus(round_id=s.round.id, phase=st["phase"], arrived=st["arrived"],
                                waiting_for=st["waiting_for"], phase_deadline_unix=st["deadline"],
                                message=st["message"], threshold=st["threshold"])

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            sessions = list(self.sessions.values())
        for s in sessions:
            s.stop()


def add_secure_aggregation(service: CoordinatorService, server: grpc.Server,
                           ca_pem: Optional[bytes]) -> SecureAggregationService:
    """Register the SecureAggregation service on `server` (the Coordinator's)."""
    secure = SecureAggregationService(service, ca_pem)
    spb_grpc.add_SecureAggregationServicer_to_server(secure, server)
    return secure
