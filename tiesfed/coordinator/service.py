"""The gRPC face of the coordinator: tiesfed.v1.Coordinator over a RoundManager.

Each method resolves its caller in one place (`_caller`) and delegates to the
round. With mutual TLS the caller is the certificate gRPC verified in the
handshake: its CN is the client id, its OU the role, and its serial is checked
against the CA's revocation list on every call; a metadata id is at most a claim
that must agree. Only an insecure (loopback) coordinator takes the id from the
metadata and admin calls by token.

Domain code raises `RoundError(code, message)`; the `rpc` and `rpc_stream`
decorators are the one place that turns it into a gRPC status.
"""

from __future__ import annotations

import datetime as dt
import functools
import hmac
import json
import logging
from dataclasses import dataclass
from typing import Callable, Generator, Iterator, Optional, TypeVar

import grpc
from pydantic import ValidationError

from tiesfed.coordinator.rounds import (
    Event,
    Merged,
    Receipt,
    Round,
    RoundConfig,
    RoundError,
    RoundManager,
)
from tiesfed.coordinator.rounds.provenance import options_json
from tiesfed.coordinator.streams import ReadAhead, StallWatch, StreamGate
from tiesfed.core.options import validation_message
from tiesfed.protos.v1 import (
    ADMIN_TOKEN_KEY,
    CLIENT_ID_KEY,
    MAX_CHUNK_BYTES,
)
from tiesfed.protos.v1 import tiesfed_pb2 as pb
from tiesfed.protos.v1 import tiesfed_pb2_grpc as pb_grpc
from tiesfed.trust.identity import Peer, RevocationError, RevocationList, peer_identity
from tiesfed.trust.signing import canonical_json

log = logging.getLogger("tiesfed.coordinator")

LATE = {"reject": pb.LATE_POLICY_REJECT, "accept": pb.LATE_POLICY_ACCEPT}
REPLACE = {"replace": pb.REPLACE_POLICY_REPLACE, "refuse": pb.REPLACE_POLICY_REFUSE}
STATE = {
    "open": pb.ROUND_STATE_OPEN,
    "finalizing": pb.ROUND_STATE_FINALIZING,
    "finalized": pb.ROUND_STATE_FINALIZED,
    "failed": pb.ROUND_STATE_FAILED,
}
WATCH_POLL_S = 1.0
#: Upload chunks received ahead of the one being taken (memory: this many chunks per active upload).
UPLOAD_READ_AHEAD = 2
DOWNLOAD_CHUNK = 1 << 20


def _metadata(context: grpc.ServicerContext, key: str) -> Optional[str]:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v
    return None


Handler = TypeVar("Handler", bound=Callable)


def status_code(e: RoundError) -> grpc.StatusCode:
    """The gRPC status of a domain error (its code names a grpc.StatusCode)."""
    return getattr(grpc.StatusCode, e.code, grpc.StatusCode.UNKNOWN)


def rpc(handler: Handler) -> Handler:
    """A unary-response handler whose RoundError becomes the call's status."""

    @functools.wraps(handler)
    def wrapped(self, request, context):
        try:
            return handler(self, request, context)
        except RoundError as e:
            context.abort(status_code(e), e.message)

    return wrapped  # type: ignore[return-value]


def rpc_stream(handler: Handler) -> Handler:
    """A streaming-response handler whose RoundError (before or between
    messages) becomes the call's status."""

    @functools.wraps(handler)
    def wrapped(self, request, context):
        try:
            yield from handler(self, request, context)
        except RoundError as e:
            context.abort(status_code(e), e.message)

    return wrapped  # type: ignore[return-value]


# ----------------------------------------------------------------------------- conversions


def spec_message(r: Round) -> pb.RoundSpec:
    c = r.config
    o = c.options
    return pb.RoundSpec(
        round_id=r.id,
        method=o.method,
        options_json=options_json(c),  # the very string clients sign
        k=o.k,
        **{"lambda": o.lam},
        base_fingerprint=c.base_fingerprint or "",
        manifest=[pb.TensorSpec(name=t.name, shape=list(t.shape), dtype=t.dtype) for t in c.manifest],
        participants=[
            pb.Participant(client_id=p.client_id, weight=p.weight, density=p.density, model_key=p.model_key or "")
            for p in c.participants
        ],
        quorum=r.quorum,
        deadline_unix=c.deadline_unix or 0.0,
        late_policy=LATE[c.late_policy],
        replace_policy=REPLACE[c.replace_policy],
        max_chunk_bytes=r.max_chunk_bytes,
        max_abs_value=c.max_abs_value or 0.0,
        state=STATE[r.state],
    )


def status_message(r: Round) -> pb.RoundStatus:
    with r.lock:
        return pb.RoundStatus(
            round_id=r.id,
            state=STATE[r.state],
            committed_clients=sorted(r.committed),
            quorum=r.quorum,
            expected=len(r.participants),
            deadline_unix=r.deadline or 0.0,
            merged_sha256=r.merged.sha256 if r.merged else "",
            merged_bytes=r.merged.bytes if r.merged else 0,
            message="; ".join(m for m in (r.message, r.aggregator_note()) if m),
            majority_sign=r.merged.majority_sign if r.merged else 0,
        )


def event_message(r: Round, e: Event) -> pb.RoundEvent:
    return pb.RoundEvent(
        seq=e.seq, time_unix=e.time, kind=pb.EventKind.Value(e.kind), round_id=r.id, client_id=e.client_id,
        message=e.message, committed=e.committed, expected=e.expected, state=STATE[e.state], sha256=e.sha256,
        bytes=e.bytes,
    )


def receipt_message(rc: Receipt) -> pb.UploadReceipt:
    return pb.UploadReceipt(
        committed=rc.committed, committed_offset=rc.committed_offset, sha256=rc.sha256, bytes=rc.bytes, nnz=rc.nnz,
        duplicate=rc.duplicate, replaced=rc.replaced, committed_count=rc.committed_count,
    )


def _send_merged(merged: Merged, offset: int, context: grpc.ServicerContext) -> Generator[pb.DownloadChunk, None, int]:
    """The merged stream from `offset`, one chunk at a time (so memory per download is
    one chunk plus gRPC's buffers); returns the offset it got to."""
    step = min(DOWNLOAD_CHUNK, MAX_CHUNK_BYTES)
    pos = offset
    with open(merged.path, "rb") as f:
        f.seek(offset)
        yield pb.DownloadChunk(offset=pos, data=b"", total_bytes=merged.bytes, sha256=merged.sha256)
        while pos < merged.bytes and context.is_active():
            data = f.read(min(step, merged.bytes - pos))
            if not data:
                break
            yield pb.DownloadChunk(offset=pos, data=data, total_bytes=merged.bytes, sha256=merged.sha256)
            pos += len(data)
    return pos


def _progressed(chunks: Generator[pb.DownloadChunk, None, int],
                progress: Callable[[], None]) -> Generator[pb.DownloadChunk, None, int]:
    """`chunks`, calling `progress()` each time one has gone out (gRPC asks for the next)."""
    try:
        while True:
            chunk = next(chunks)
            yield chunk
            progress()
    except StopIteration as stop:
        return stop.value


def _with_provenance(chunks: Generator[pb.DownloadChunk, None, int],
                     provenance: Optional[dict]) -> Generator[pb.DownloadChunk, None, int]:
    """`chunks` with the merge's signature record (`Round.merged_provenance`, as stored) on
    the first message, which a client with an identity verifies before it keeps any data."""
    if provenance is None:
        return (yield from chunks)
    try:
        head = next(chunks)
    except StopIteration as stop:
        return stop.value
    head.merged_manifest_json = canonical_json(provenance["manifest"]).decode()
    head.merged_signature = bytes.fromhex(provenance["signature_hex"])
    head.coordinator_cert_pem = provenance["cert_pem"]
    yield head
    return (yield from chunks)


def _json_field(field: str, text: str) -> object:
    """A request's JSON field; nesting past Python's recursion limit is bad JSON too."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{field} is not JSON: {e}") from None


def _enum_field(field: str, names: dict[str, int], value: int) -> str:
    """The name of a proto enum value; proto3 enums are open, so a caller may send any int."""
    for name, v in names.items():
        if v == value:
            return name
    raise ValueError(f"{field} {value} is not one of {sorted(names.values())} ({', '.join(names)})")


def round_config_from_request(req: pb.OpenRoundRequest, max_round_params: Optional[int] = None) -> RoundConfig:
    """Validate an OpenRound request as a RoundConfig (errors name the field), before
    anything is allocated; `max_round_params` bounds the manifest."""
    options = _json_field("options_json", req.options_json) if req.options_json else {}
    data: dict = {
        "round_id": req.round_id,
        "options": options,
        "participants": [
            {
                "client_id": p.client_id,
                "weight": p.weight or 1.0,
                "density": p.density if p.HasField("density") else None,
                "model_key": p.model_key or None,
            }
            for p in req.participants
        ],
        "quorum": req.quorum or None,
        "deadline_unix": req.deadline_unix or None,
        "deadline_s": req.deadline_seconds or None,
        "base_fingerprint": req.base_fingerprint or None,
        "max_abs_value": req.max_abs_value or None,
        "manifest": [{"name": t.name, "shape": tuple(t.shape), "dtype": t.dtype or "F32"} for t in req.manifest]
        or None,
    }
    if req.late_policy:
        data["late_policy"] = _enum_field("late_policy", LATE, req.late_policy)
    if req.replace_policy:
        data["replace_policy"] = _enum_field("replace_policy", REPLACE, req.replace_policy)
    if req.secure_aggregation:
        data["secure_aggregation"] = True
    if req.secagg_json:  # without secure_aggregation the round config refuses it, naming both
        data["secagg"] = _json_field("secagg_json", req.secagg_json)
    return RoundConfig.model_validate(data, context={"max_round_params": max_round_params})


# ----------------------------------------------------------------------------- service


@dataclass(frozen=True)
class Caller:
    """Who is calling, as `_caller` resolved it: the id, the role, and (with TLS) the
    verified certificate, which the upload path keeps beside a contribution."""

    client_id: str
    role: str
    peer: Optional[Peer] = None


class CoordinatorService(pb_grpc.CoordinatorServicer):
    """The servicer. With `tls`, callers are their verified certificates (checked against
    `revocation` when given) and admin calls need an admin certificate; without it, ids
    come from metadata and `admin_token` guards OpenRound/CloseRound (required: there is
    no unauthenticated admin). `gate` caps the long-lived calls (see `streams`)."""

    def __init__(self, manager: RoundManager, admin_token: Optional[str], gate: StreamGate, *, tls: bool = False,
                 revocation: Optional[RevocationList] = None) -> None:
        if tls and admin_token is not None:
            raise ValueError("an admin token with TLS: admin calls need an admin certificate instead")
        if not tls and (not admin_token or not admin_token.strip()):
            raise ValueError("admin token is empty: the coordinator needs one for OpenRound/CloseRound")
        if revocation is not None and not tls:
            raise ValueError("a revocation list needs TLS: without certificates there is nothing to revoke")
        self.manager = manager
        self.admin_token = admin_token
        self.gate = gate
        self.tls = tls
        self.revocation = revocation
        #: a Download whose reader stopped reading is cancelled after the uploads' stall_after_s
        self.stalls = StallWatch(manager.slots.stall_after_s)
        manager.on_tick(self.stalls.cancel_stalled)

    # -- helpers
    def _caller(self, context: grpc.ServicerContext, role: str = "client") -> Caller:
        """The one place that says who is calling, and whether that caller may make a
        call of `role` (client: participant calls; admin: OpenRound/CloseRound)."""
        if not self.tls:
            if role == "admin":
                self._check_token(context)
                return Caller("admin", "admin")
            cid = _metadata(context, CLIENT_ID_KEY)
            if not cid:
                raise RoundError("UNAUTHENTICATED", f"no client id: send gRPC metadata {CLIENT_ID_KEY!r}")
            return Caller(cid, "client")
        peer = peer_identity(context)
        if peer is None or not peer.client_id:
            raise RoundError("UNAUTHENTICATED", "no verified client certificate naming a client id")
        self._check_revoked(peer)
        if peer.not_after <= dt.datetime.now(dt.timezone.utc):
            raise RoundError("UNAUTHENTICATED", f"the certificate of {peer.client_id!r} (serial {peer.serial:x}) "
                             f"expired at {peer.not_after.isoformat()}")
        claimed = _metadata(context, CLIENT_ID_KEY)
        if claimed is not None and claimed != peer.client_id:
            raise RoundError("PERMISSION_DENIED", f"metadata {CLIENT_ID_KEY!r} claims {claimed!r}, but the "
                             f"certificate names {peer.client_id!r}: the id is the certificate's")
        if peer.role != role:
            what = ("OpenRound and CloseRound need an admin certificate" if role == "admin"
                    else "participant calls need a client certificate")
            raise RoundError("PERMISSION_DENIED", f"{what}; the certificate of {peer.client_id!r} has the "
                             f"role {peer.role!r}")
        return Caller(peer.client_id, role, peer)

    def _check_revoked(self, peer: Peer) -> None:
        if self.revocation is None:
            return
        try:
            revoked = self.revocation.is_revoked(peer.serial)
        except RevocationError as e:  # fail closed: a call we cannot check is not let through
            log.error("%s", e)
            raise RoundError("UNAVAILABLE", f"the coordinator cannot check revocation: {e}") from None
        if revoked:
            raise RoundError("UNAUTHENTICATED", f"certificate serial {peer.serial:x} ({peer.client_id!r}) "
                             "is revoked")

    def _check_token(self, context: grpc.ServicerContext) -> None:
        """Insecure mode's admin check: the token in the metadata."""
        assert self.admin_token is not None
        got = _metadata(context, ADMIN_TOKEN_KEY) or ""
        if not hmac.compare_digest(got.encode(), self.admin_token.encode()):
            raise RoundError("PERMISSION_DENIED", f"admin call without the right {ADMIN_TOKEN_KEY!r} metadata")

    def _participant_round(self, round_id: str, context: grpc.ServicerContext) -> tuple[Round, str]:
        cid = self._caller(context).client_id
        r = self.manager.get(round_id)
        r.check_participant(cid)
        return r, cid

    # -- admin
    @rpc
    def OpenRound(self, request, context):
        self._caller(context, "admin")
        try:
            cfg = round_config_from_request(request, self.manager.max_round_params)
        except (ValidationError, ValueError) as e:
            msg = validation_message(e) if isinstance(e, ValidationError) else str(e)
            raise RoundError("INVALID_ARGUMENT", f"bad round: {msg}") from None
        return spec_message(self.manager.open_round(cfg))

    @rpc
    def CloseRound(self, request, context):
        self._caller(context, "admin")
        r = self.manager.get(request.round_id)
        r.close(abort=request.abort)
        return status_message(r)

    # -- participants
    @rpc
    def GetRoundSpec(self, request, context):
        r, _ = self._participant_round(request.round_id, context)
        return spec_message(r)

    @rpc
    def GetRoundStatus(self, request, context):
        r, _ = self._participant_round(request.round_id, context)
        return status_message(r)

    @rpc
    def UploadStatus(self, request, context):
        r, cid = self._participant_round(request.round_id, context)
        offset, prefix, committed = r.upload_status(cid)
        return pb.UploadStatusReply(
            committed_offset=offset, prefix_sha256=prefix, committed=committed is not None,
            committed_sha256=committed.sha256 if committed else "",
        )

    @rpc
    def ReserveUpload(self, request, context):
        r, cid = self._participant_round(request.round_id, context)
        with r.lock:
            r._check_accepting(cid, new=False)
            r._check_aggregator()  # no slot for an upload nothing could merge
        if request.wait_seconds > 0:  # a waiting call holds a thread: it counts as long-lived
            with self.gate.held("ReserveUpload", cid):
                lease = self.manager.reserve_upload(cid, r.id, request.wait_seconds)
        else:
            lease = self.manager.reserve_upload(cid, r.id, 0.0)
        if lease is None:
            return pb.ReserveUploadReply(granted=False)
        return pb.ReserveUploadReply(granted=True, lease=lease, lease_seconds=self.manager.lease_s)

    @rpc
    def Upload(self, request_iterator, context):
        caller = self._caller(context)  # caller.peer: the verified certificate (None when insecure)
        cid = caller.client_id
        self.manager.check_known_client(cid)
        # At most max_active_uploads streams are read at once. The others wait
        # here (bounded) before their first message is read, held back by gRPC
        # flow control, so memory stays flat in the number of clients; a stream
        # that delivers no new bytes while it holds a slot is cancelled by the
        # manager's watchdog. The client's lease (UPLOAD_LEASE_KEY) is found by its id.
        with self.gate.held("Upload", cid), \
                self.manager.upload_slot(cid, context.cancel, context.is_active) as progress:
            first = next(request_iterator, None)
            if first is None:
                raise RoundError("INVALID_ARGUMENT", "empty upload stream")
            r = self.manager.get(first.round_id)
            s = r.begin_upload(cid, first.offset, peer=caller.peer)
            receipt = None
            # the next chunks are received while this thread writes, decodes, checks and folds
            ahead = ReadAhead(request_iterator, UPLOAD_READ_AHEAD, f"upload-{cid}")
            try:
                chunk = first
                while True:
                    if chunk.round_id and chunk.round_id != r.id:
                        raise RoundError("INVALID_ARGUMENT", "chunks of one upload name different rounds")
                    receipt = r.feed(s, chunk.offset, chunk.data, chunk.signature)
                    progress(len(chunk.data))  # empty chunks are not progress
                    if receipt is not None:
                        break
                    chunk = next(ahead, None)
                    if chunk is None:
                        break
            except RoundError:
                r.detach(s)
                raise
            except Exception:  # the stream broke (client gone, cancelled): keep the bytes for a resume
                r.detach(s)
                if context.is_active():
                    raise
                return pb.UploadReceipt()
            finally:
                ahead.stop()
            paused = r.detach(s)
            return receipt_message(receipt if receipt is not None else paused)

    @rpc_stream
    def Watch(self, request, context) -> Iterator[pb.RoundEvent]:
        r, cid = self._participant_round(request.round_id, context)
        seq = request.from_seq
        with self.gate.held("Watch", cid):
            while context.is_active():
                events = r.events_since(seq, WATCH_POLL_S)
                for e in events:
                    yield event_message(r, e)
                    seq = e.seq + 1
                    if e.kind in ("ROUND_FINALIZED", "ROUND_FAILED"):
                        return

    @rpc_stream
    def Download(self, request, context) -> Iterator[pb.DownloadChunk]:
        r, cid = self._participant_round(request.round_id, context)
        # the gate first: checking the merged stream may hash it, which a refused call must not cost
        with self.gate.held("Download", cid):
            merged = r.merged_to_serve()  # its sha256 checked first; a damaged one is rebuilt
            if request.offset > merged.bytes:
                raise RoundError("OUT_OF_RANGE", f"offset {request.offset} is past the end ({merged.bytes} bytes)")
            with self.stalls.watch(context.cancel) as progress:
                pos = yield from _with_provenance(_progressed(_send_merged(merged, request.offset, context), progress),
                                                  r.merged_provenance())
        if pos == merged.bytes:
            with r.lock:
                r.downloaded.add(cid)
