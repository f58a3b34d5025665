"""A client's side of a secure round (issue 13) over gRPC: `tiesfed client submit` runs it
when the round's spec says the round is secure, with no flag of its own.

The trimmed contribution comes from the same trimmer as a plain upload (`iter_contribution`,
the same threshold, the same value dtype), each record placed in the round's flat parameter
space (the manifest's tensors concatenated in order); then `SecAggClient` runs the protocol:
keys → support and shares → the masked vector (streamed in chunks) → unmasking shares.

Memory is bounded by the client's block, never by the model: `TrimmedPieces` re-runs the
trimmer record by record (a tensor, or one block of a larger one) each time it is read.
The support bitmap comes from a first read, the masked vector from a second one (and again
for a resumed upload), checked record by record against the first (`SecAggClient`). The
bitmap (deflated, about 0.1 byte a parameter at k = 20 %) and U's, as received, stay in
unlinked temporary files, read block by block: a share upload is sent from its file, and a
`PollStream` answer is received into one (`from_blob` leaves U's bitmap there).
Its secrets live in this process only: a client restarted mid-round is a dropout.
"""

from __future__ import annotations

import hashlib
import itertools
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, TypeVar, Union

import grpc
import torch

from tiesfed.client.connection import RETRYABLE, Connection, FederatedError, log
from tiesfed.client.contribution import TrimStats, contribution_threshold, iter_contribution
from tiesfed.core.methods import get_method
from tiesfed.core.options import MergeOptions
from tiesfed.core.trim import TrimSpec
from tiesfed.io.model_io import ModelReader
from tiesfed.protos.v1 import MAX_CHUNK_BYTES
from tiesfed.protos.v1 import secagg_pb2 as spb
from tiesfed.protos.v1 import secagg_pb2_grpc as spb_grpc
from tiesfed.protos.v1 import tiesfed_pb2 as pb
from tiesfed.trust.secagg import SecAggClient, SecAggError
from tiesfed.trust.secagg.blob import FileBlob, Outgoing
from tiesfed.trust.secagg.client import Pieces
from tiesfed.trust.secagg.messages import KeyList, MaskRequest, Message, UnmaskRequest, from_blob, to_parts
from tiesfed.trust.secagg.params import SecAggRound, from_public_json

#: Flat elements of a record one piece covers at most: the secure client quantises and lays out
#: a piece at a time (tens of bytes a survivor), so a record of a whole block is cut.
PIECE_ELEMS = 1 << 22
#: Seconds one Poll waits on the coordinator before asking again.
POLL_S = 5.0
#: Largest chunk of a step message or a poll's answer (the coordinator's bound too): the
#: support phase's messages carry whole bitmaps (about numel/8 bytes), far above gRPC's limit.
STEP_CHUNK_BYTES = 1 << 20
T = TypeVar("T")
#: A masked upload broken with one of these resumes (DATA_LOSS: the coordinator dropped a
#: prefix whose hash was wrong, so the vector goes again from 0).
RESUMABLE = RETRYABLE | {grpc.StatusCode.CANCELLED, grpc.StatusCode.DATA_LOSS}
#: Test hook, as `submit`'s: fault(attempt, piece_index) before each masked piece is sent;
#: True breaks the connection there (the call is cancelled).
Fault = Callable[[int, int], bool]


def secure_spec(conn: Connection, round_id: str) -> Optional[spb.SecureSpec]:
    """The round's secure parameters, or None for a plain round (or a coordinator without the service)."""
    try:
        s = _call(conn, "GetSecureSpec", spb.SecureSpecRequest(round_id=round_id))
    except FederatedError as e:
        if e.code == "UNIMPLEMENTED":
            return None
        raise
    return s if s.secure else None


def _call(conn: Connection, name: str, request, timeout: float = 60.0):
    """A unary SecureAggregation call, retried on transient errors as `Connection.call` does."""
    method = getattr(spb_grpc.SecureAggregationStub(conn.channel), name)
    for n in range(conn.retry.attempts + 1):
        try:
            return method(request, metadata=conn.metadata, timeout=timeout)
        except grpc.RpcError as e:
            if e.code() not in RETRYABLE or n == conn.retry.attempts:
                raise FederatedError.from_rpc(e, f"{name} for {conn.client_id!r} at {conn.target}") from None
            conn.retry.sleep(n)
    raise AssertionError("unreachable")  # pragma: no cover


def _retried(conn: Connection, name: str, call: Callable[[], T]) -> T:
    """`call()` (a streaming SecureAggregation call, made afresh each time), retried on
    transient errors as `_call` retries a unary one."""
    for n in range(conn.retry.attempts + 1):
        try:
            return call()
        except grpc.RpcError as e:
            if e.code() not in RETRYABLE or n == conn.retry.attempts:
                raise FederatedError.from_rpc(e, f"{name} for {conn.client_id!r} at {conn.target}") from None
            conn.retry.sleep(n)
    raise AssertionError("unreachable")  # pragma: no cover


def step_stream(conn: Connection, round_id: str, phase: str, payload: Union[bytes, Outgoing],
                chunk_bytes: int = STEP_CHUNK_BYTES) -> spb.SecAggAck:
    """One step message through `StepStream`, in chunks of at most `chunk_bytes` (1 MiB): the
    first names the round, phase and size, the last carries the sha256. `payload`: bytes, or an
    `Outgoing` (a share upload whose bitmap is read from its file chunk by chunk)."""
    size = max(1, min(chunk_bytes, STEP_CHUNK_BYTES))
    out = payload if isinstance(payload, Outgoing) else Outgoing([payload])

    def chunks() -> Iterator[spb.StepChunk]:
        at = 0
        for data in itertools.chain(out.chunks(size), [b""] if not out.size else []):
            yield spb.StepChunk(round_id=round_id if at == 0 else "", phase=phase if at == 0 else "",
                                total_bytes=out.size if at == 0 else 0, data=data,
                                sha256=out.sha256 if at + len(data) == out.size else "")
            at += len(data)

    stub = spb_grpc.SecureAggregationStub(conn.channel)
    return _retried(conn, "StepStream", lambda: stub.StepStream(chunks(), metadata=conn.metadata, timeout=600))


def poll_stream(conn: Connection, round_id: str, phase: str, wait_s: float,
                chunk_bytes: int = STEP_CHUNK_BYTES, workdir: Optional[Path] = None) -> Optional[FileBlob]:
    """What `phase` closed to for this client, through `PollStream` (None: not closed within
    `wait_s`), received into an unlinked temporary file (a mask request carries U's bitmap: it
    is not gathered in memory); its size and sha256 are checked against the first chunk's."""
    stub = spb_grpc.SecureAggregationStub(conn.channel)
    req = spb.SecAggPoll(round_id=round_id, phase=phase, wait_seconds=wait_s,
                         max_chunk_bytes=max(1, min(chunk_bytes, STEP_CHUNK_BYTES)))

    def one() -> Optional[FileBlob]:
        it = stub.PollStream(req, metadata=conn.metadata, timeout=wait_s + 600)
        first = next(it, None)
        if first is None or not first.ready:
            return None
        sha, got = hashlib.sha256(), 0
        with tempfile.TemporaryFile(prefix="secagg-answer-", dir=workdir) as f:
            for chunk in itertools.chain([first], it):
                if got + len(chunk.data) > first.total_bytes:
                    raise FederatedError(f"the coordinator's {phase} answer runs past the {first.total_bytes} bytes "
                                         "it declared", "DATA_LOSS")
                f.write(chunk.data)
                sha.update(chunk.data)
                got += len(chunk.data)
            if got != first.total_bytes or sha.hexdigest() != first.sha256:
                raise FederatedError(f"the coordinator's {phase} answer: {got} bytes received, "
                                     f"{first.total_bytes} declared, or not the sha256 it declared", "DATA_LOSS")
            return FileBlob.of(f)

    return _retried(conn, "PollStream", one)


def secagg_round(spec: pb.RoundSpec, secure: spb.SecureSpec, opts: MergeOptions) -> SecAggRound:
    """The round's `SecAggRound` as this client derives it: the public numbers the coordinator
    announces, the finalize spec from the round's options and the weights from its participants."""
    weights = {p.client_id: p.weight or 1.0 for p in spec.participants}
    fin = get_method(opts.method).finalize_spec(opts, any(w != 1.0 for w in weights.values()))
    rnd = from_public_json(spec.round_id, secure.params_json, fin, weights)
    numel = sum(int(torch.tensor(list(t.shape), dtype=torch.int64).prod()) for t in spec.manifest)
    if rnd.numel != numel:
        raise FederatedError(f"round {spec.round_id!r}: the secure parameters count {rnd.numel} parameters, "
                             f"the manifest {numel}", "FAILED_PRECONDITION")
    return rnd


class TrimmedPieces:
    """The trimmed task vector as `SecAggClient` pieces: (flat range, flat int64 indices, float64
    values) per record of `iter_contribution`, cut at `PIECE_ELEMS`, read again from the models
    on every call, with the global threshold found once (so every read keeps the same
    survivors). `stats` hears the first read."""

    def __init__(self, spec: pb.RoundSpec, base: ModelReader, ft: ModelReader, trim: TrimSpec, opts: MergeOptions,
                 model_key: str, *, device: str = "cpu", value_dtype: Optional[torch.dtype] = None,
                 block: Optional[int] = None, stats: Optional[TrimStats] = None) -> None:
        self.offsets, at = {}, 0
        for t in spec.manifest:
            self.offsets[t.name] = at
            at += int(torch.tensor(list(t.shape), dtype=torch.int64).prod())
        self.spec, self.base, self.ft, self.trim, self.opts, self.model_key = spec, base, ft, trim, opts, model_key
        self.device, self.value_dtype, self.block, self.stats = device, value_dtype, block, stats
        self.threshold = contribution_threshold(base, ft, trim, keep_base=opts.keep_base, device=device, block=block)
        self.reads = 0

    def __call__(self) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        from tiesfed.client.submit import within_bound

        stats, self.reads = (self.stats if self.reads == 0 else None), self.reads + 1
        for st in within_bound(iter_contribution(self.base, self.ft, self.trim, model_key=self.model_key,
                                                 keep_base=self.opts.keep_base, device=self.device,
                                                 value_dtype=self.value_dtype, stats=stats,
                                                 threshold=self.threshold, block=self.block),
                               self.spec.max_abs_value, self.spec.round_id):
            off = self.offsets[st.name]
            for a in range(st.start, st.stop, PIECE_ELEMS):  # float64/int64 copies of a piece at a time
                b = min(st.stop, a + PIECE_ELEMS)
                i, j = (int(x) for x in torch.searchsorted(st.indices, torch.tensor([a, b], dtype=st.indices.dtype)))
                yield off + a, off + b, st.indices[i:j].to(torch.int64) + off, st.values[i:j].to(torch.float64)


def flat_contribution(spec: pb.RoundSpec, base: ModelReader, ft: ModelReader, trim: TrimSpec, opts: MergeOptions,
                      model_key: str, *, device: str = "cpu", value_dtype: Optional[torch.dtype] = None,
                      block: Optional[int] = None, stats: Optional[TrimStats] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The trimmed task vector as (flat int64 indices, values) over the round's parameter space,
    whole in memory (16 bytes a survivor: tests and small models; `submit_secure` streams
    `TrimmedPieces` instead): the very records a plain upload would carry."""
    pieces = TrimmedPieces(spec, base, ft, trim, opts, model_key, device=device, value_dtype=value_dtype,
                           block=block, stats=stats)
    idx, val = [], []
    for _, _, i, v in pieces():
        idx.append(i)
        val.append(v)
    if not idx:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float64)
    return torch.cat(idx), torch.cat(val)


def _resume(pieces: Iterator[bytes], start: int,
            prefix_sha256: str) -> Optional[tuple[int, "hashlib._Hash", Iterator[bytes]]]:
    """(start, the hash of the bytes before it, the bytes from there) if the regenerated
    prefix hashes to what the coordinator holds; else None (the vector is sent afresh)."""
    sha, at, tail = hashlib.sha256(), 0, b""
    for piece in pieces:
        cut = min(len(piece), start - at)
        sha.update(piece[:cut])
        at += cut
        if at == start:
            tail = piece[cut:]
            break
    if at != start or sha.hexdigest() != prefix_sha256:
        log.warning("the coordinator's %d masked bytes are not this client's; sending them again from 0", start)
        return None
    return start, sha, itertools.chain([tail] if tail else [], pieces)


class SecureFlow:
    """One client's secure round over `conn`, one method per phase (`run` does them all)."""

    def __init__(self, conn: Connection, rnd: SecAggRound, indices: Optional[torch.Tensor] = None,
                 values: Optional[torch.Tensor] = None, chunk_bytes: int = 1 << 20, fault: Optional[Fault] = None,
                 *, pieces: Optional[Pieces] = None, workdir: Optional[Path] = None) -> None:
        if conn.identity is None:
            raise FederatedError("a secure round needs mutual TLS (--tls): each client signs its keys with its "
                                 "certificate key", "FAILED_PRECONDITION")
        try:
            self.client = SecAggClient(conn.identity, rnd, indices, values, pieces=pieces, workdir=workdir)
        except (SecAggError, ValueError) as e:
            raise FederatedError(f"round {rnd.round_id!r}: {e}", "INVALID_ARGUMENT") from None
        self.conn, self.round, self.chunk_bytes = conn, rnd, min(chunk_bytes, MAX_CHUNK_BYTES)
        self.sent = 0
        self.sha256 = hashlib.sha256()  # of the masked vector, once sent
        self.fault = fault
        self.workdir = workdir  # where the support phase's bitmaps go (unlinked files); None: TMPDIR
        self.resumed_from: list[int] = []
        self.attempts = 1

    def _step(self, phase: str, msg: Union[Message, bytes]) -> None:
        """Send a step message (or its bytes); a share upload's bitmap is read from its file as it goes."""
        out = Outgoing([msg] if isinstance(msg, bytes) else to_parts(msg))
        step_stream(self.conn, self.round.round_id, phase, out, self.chunk_bytes)
        self.sent += out.size

    def _poll(self, phase: str, kind: Callable[..., T]) -> T:
        """Wait for `phase` to close (the coordinator's deadline bounds it) and read what it closed to."""
        while True:
            payload = poll_stream(self.conn, self.round.round_id, phase, POLL_S, self.chunk_bytes, self.workdir)
            if payload is not None:
                msg = from_blob(payload)  # U's bitmap stays in the file
                if not isinstance(msg, kind):
                    raise FederatedError(f"the coordinator answered phase {phase!r} with a {type(msg).__name__}")
                return msg

    def keys(self) -> None:
        self._step("keys", self.client.advertise())

    def shares(self) -> None:
        self._step("shares", self.client.share(self._poll("keys", KeyList)))

    def masked(self) -> None:
        """The masked vector over U, streamed chunk by chunk; after a transport error it backs
        off (the connection's retry policy), asks how much the coordinator holds and resumes
        there, regenerating the same bytes (the masks are deterministic) and checking the
        held prefix's sha256 on the way."""
        req = self._poll("shares", MaskRequest)
        lay = self.round.layout
        per = max(1, self.chunk_bytes // (lay.width * lay.bytes_per_element))
        pieces: Iterator[bytes] = self.client.masked_stream(req, per)  # accepts req: U is known after it
        total = lay.width * lay.bytes_per_element * self.client.support_size
        retry = self.conn.retry
        for attempt in range(retry.attempts + 1):
            start, sha = 0, hashlib.sha256()
            if attempt > 0:
                st = _call(self.conn, "MaskedStatus", spb.SecureSpecRequest(round_id=self.round.round_id))
                if st.committed:
                    return
                pieces = self.client.masked_again(per)
                if st.total_bytes == total and 0 < st.committed_offset <= total:
                    resumed = _resume(pieces, st.committed_offset, st.prefix_sha256)
                    if resumed is None:
                        pieces = self.client.masked_again(per)
                    else:
                        start, sha, pieces = resumed
                        self.resumed_from.append(start)
            self.attempts = attempt + 1
            try:
                self._stream(attempt, start, sha, pieces, total)
                self.sha256 = sha
                return
            except grpc.RpcError as e:
                err = e
            except grpc.FutureCancelledError:
                err = None
            code = err.code() if err is not None else grpc.StatusCode.CANCELLED
            if code not in RESUMABLE or attempt == retry.attempts:
                if err is not None:
                    raise FederatedError.from_rpc(err, f"UploadMasked for {self.conn.client_id!r}") from None
                raise FederatedError(f"UploadMasked for {self.conn.client_id!r} was cancelled", "CANCELLED")
            log.warning("masked upload of %s interrupted (%s); resuming, attempt %d of %d", self.conn.client_id,
                        code.name, attempt + 2, retry.attempts + 1)
            retry.sleep(attempt)

    def _stream(self, attempt: int, start: int, sha: "hashlib._Hash", pieces: Iterator[bytes], total: int) -> None:
        """One UploadMasked call sending bytes start.. of the vector (`sha` holds the prefix's
        hash and takes the rest); the chunk with the last bytes carries the whole hash."""
        rid = self.round.round_id
        ready, holder = threading.Event(), {}

        def chunks() -> Iterator[spb.MaskedChunk]:
            at = start
            yield spb.MaskedChunk(round_id=rid, offset=start, data=b"", total_bytes=total)
            for i, piece in enumerate(pieces):
                if self.fault is not None and self.fault(attempt, i):
                    ready.wait()
                    holder["call"].cancel()
                    return
                sha.update(piece)
                last = at + len(piece) == total
                yield spb.MaskedChunk(round_id=rid, offset=at, data=piece, sha256=sha.hexdigest() if last else "")
                at += len(piece)
                self.sent += len(piece)

        stub = spb_grpc.SecureAggregationStub(self.conn.channel)
        holder["call"] = stub.UploadMasked.future(chunks(), metadata=self.conn.metadata, timeout=600)
        ready.set()
        holder["call"].result()

    def unmask(self) -> None:
        self._step("unmask", self.client.unmask(self._poll("masked", UnmaskRequest)))

    def run(self) -> None:
        started = time.monotonic()
        for phase in (self.keys, self.shares, self.masked, self.unmask):
            try:
                phase()
            except SecAggError as e:  # a check of what the coordinator relayed failed
                raise FederatedError(f"round {self.round.round_id!r}: secure aggregation refused: {e}",
                                     "FAILED_PRECONDITION") from None
        log.info("secure round %s: %s sent its masked vector and unmasking shares (%d bytes, %.1f s)",
                 self.round.round_id, self.conn.client_id, self.sent, time.monotonic() - started)


def submit_secure(conn: Connection, spec: pb.RoundSpec, secure: spb.SecureSpec, base: ModelReader, ft: ModelReader,
                  trim: TrimSpec, opts: MergeOptions, model_key: str, *, device: str, value_dtype: Optional[torch.dtype],
                  block: Optional[int], chunk_bytes: int, started: float, fault: Optional[Fault] = None,
                  workdir: Optional[Path] = None):
    """`submit`'s secure branch: trim as a plain upload would, then run the protocol. Returns a
    `SubmitResult` (sha256: of the masked vector sent; bytes: everything sent)."""
    from tiesfed.client.submit import SubmitResult

    rnd = secagg_round(spec, secure, opts)
    stats = TrimStats()
    pieces = TrimmedPieces(spec, base, ft, trim, opts, model_key, device=device, value_dtype=value_dtype,
                           block=block, stats=stats)
    flow = SecureFlow(conn, rnd, chunk_bytes=chunk_bytes, fault=fault, pieces=pieces, workdir=workdir)
    flow.run()
    return SubmitResult(spec.round_id, conn.client_id, flow.sha256.hexdigest(), flow.sent, flow.sent,
                        flow.client.survivors, flow.attempts, flow.resumed_from, stats=stats,
                        seconds=time.perf_counter() - started, signed=True)
