"""Submit: trim, encode and upload this client's contribution, resumably.

Three stages overlap: a trim thread reads the models and trims tensor by tensor
(`iter_contribution`), an encode thread encodes each trimmed record into a local
spool file, and the sender streams that file in chunks. Memory follows the budget
(`max_memory`, `client submit --max-memory`; default half the machine's): it sets
the block (`budget.client_block`), so the trim holds one block of the base,
fine-tuned and task-vector values and a tensor larger than the block travels as
span records of one block each; at most `PIPELINE_DEPTH` records, and at most
`budget.queue_bytes` of them, wait between the trim and the encoder; plus one
chunk. Whatever the tensor's size, the peak is the block's. The stream is the same,
byte for byte, as one thread writing it.
After a broken connection it backs off, asks the coordinator how many bytes it
holds (and their sha256), and resumes from there out of the local spool.

With mutual TLS the stream's sha256 is taken as it is produced, and the chunk
carrying its last bytes (in whichever attempt sends them) carries the client's
signature over the contribution manifest, which the coordinator checks before
it commits.
"""

from __future__ import annotations

import hashlib
import itertools
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import grpc
from tqdm.auto import tqdm

from tiesfed.client.budget import client_block, queue_bytes
from tiesfed.client.connection import (
    RETRYABLE,
    Connection,
    FederatedError,
    Retry,
    check_base,
    log,
    spec_options,
)
from tiesfed.client.contribution import (
    VALUE_DTYPES,
    TrimStats,
    check_whole,
    contribution_header,
    contribution_threshold,
    iter_contribution,
)
from tiesfed.client.pipeline import Prefetch
from tiesfed.client.progress import Prefixed, Stages
from tiesfed.core.methods import get_method
from tiesfed.io.files import sha256_file
from tiesfed.io.model_io import (
    ModelReader,
    check_compatible,
    mergeable,
)
from tiesfed.io.vocab_rows import read_at_base_rows
from tiesfed.protos.codec import SparseTensor, StreamWriter
from tiesfed.protos.v1 import (
    MAX_CHUNK_BYTES,
    UPLOAD_LEASE_KEY,
)
from tiesfed.protos.v1 import tiesfed_pb2 as pb
from tiesfed.trust import signing
from tiesfed.trust.identity import Identity

DEFAULT_CHUNK_BYTES = 1 << 20
#: Trimmed tensors that may wait for the encoder (see the module's docstring).
PIPELINE_DEPTH = 2

#: Test hook of `submit`: called as fault(attempt, chunk_index) before each chunk is
#: sent; returning True breaks the connection there (the call is cancelled).
Fault = Callable[[int, int], bool]

class _SpoolPipe:
    """The contribution stream: written once by the encoder, read (and re-read) by the sender."""

    FLUSH = 256 << 10

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "wb", buffering=0)
        self._buf = bytearray()
        self.size = 0  # bytes on disk, visible to readers
        self.sha = hashlib.sha256()  # of every byte written, complete once `done`
        self.done = False
        self.error: Optional[BaseException] = None
        self.cond = threading.Condition()

    def write(self, data) -> int:
        self._buf += data
        self.sha.update(data)
        if len(self._buf) >= self.FLUSH:
            self._flush()
        return len(data)

    def _flush(self) -> None:
        if self._buf:
            mv = memoryview(self._buf)
            while len(mv):
                n = self._f.write(mv)
                mv = mv[n:]
            n = len(self._buf)
            self._buf = bytearray()
            with self.cond:
                self.size += n
                self.cond.notify_all()

    def finish(self) -> None:
        self._flush()
        self._f.close()
        with self.cond:
            self.done = True
            self.cond.notify_all()

    def fail(self, e: BaseException) -> None:
        try:
            self._f.close()
        finally:
            with self.cond:
                self.error = e
                self.done = True
                self.cond.notify_all()

    def wait_for(self, n: int) -> int:
        """Block until at least n bytes are on disk (or the encoder stopped); returns the size."""
        with self.cond:
            self.cond.wait_for(lambda: self.size >= n or self.done)
            if self.error is not None:
                raise self.error
            return self.size

    def chunks(self, start: int, chunk_bytes: int) -> Iterator[tuple[int, bytes, bool]]:
        """(offset, bytes, whether they are the stream's last) from `start` to the end of
        the stream, as it is produced."""
        with open(self.path, "rb") as f:
            f.seek(start)
            pos = start
            while True:
                with self.cond:
                    self.cond.wait_for(lambda: self.size >= pos + chunk_bytes or self.done)
                    if self.error is not None:
                        raise self.error
                    end = self.size
                    done = self.done
                if pos >= end and done:
                    return
                data = f.read(min(chunk_bytes, end - pos))
                if not data:
                    raise IOError(f"{self.path}: local spool ends early at {pos}")
                yield pos, data, done and pos + len(data) == end
                pos += len(data)


def within_bound(tensors: Iterable[SparseTensor], bound: float, round_id: str) -> Iterator[SparseTensor]:
    """Stop before uploading a value the round would refuse (its `max_abs_value`)."""
    for t in tensors:
        if bound > 0 and t.nnz and (peak := float(t.values.abs().max())) > bound:
            raise FederatedError(
                f"tensor {t.name!r} has a task-vector value of {peak:g}, over the max_abs_value "
                f"{bound:g} of round {round_id!r}: is this model fine-tuned from the round's base?", "INVALID_ARGUMENT")
        yield t


@dataclass
class SubmitResult:
    round_id: str
    client_id: str
    sha256: str
    bytes: int  # size of the contribution stream
    bytes_sent: int  # chunk payload actually sent, resends included
    nnz: int
    attempts: int
    resumed_from: list[int] = field(default_factory=list)
    duplicate: bool = False
    replaced: bool = False
    stats: TrimStats = field(default_factory=TrimStats)
    seconds: float = 0.0
    signed: bool = False  # sent with this client's signature (mutual TLS)


def submit(
    target: str,
    round_id: str,
    client_id: Optional[str],
    base: str | Path,
    model: str | Path,
    *,
    device: str = "cpu",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    retry: Retry = Retry(),
    work_dir: Optional[str | Path] = None,
    progress: bool = False,
    wait_for_coordinator: float = 0.0,
    tls: str | Path | Identity | None = None,
    insecure: bool = False,
    server_name: Optional[str] = None,
    fault: Optional[Fault] = None,
    max_memory: Optional[int] = None,
    block: Optional[int] = None,
    allow_architecture_mismatch: bool = False,
    vocab: Optional[str] = None,
) -> SubmitResult:
    """Compute, trim, encode and upload this client's contribution to `round_id`.
    `max_memory` (bytes) bounds what it holds (see the module's docstring); `block`
    sets the elements per record directly instead (tests). `allow_architecture_mismatch`:
    upload even when MODEL's config.json names another architecture than BASE's. `vocab`
    "base": a MODEL that appended tokens is read at BASE's embedding rows (`io.vocab_rows`)."""
    if vocab not in (None, "base"):
        raise ValueError(f"vocab {vocab!r}: a client reads its model at the base's rows ('base') or as it is")
    started = time.perf_counter()
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"the upload chunk size (--chunk-size) must be at most {MAX_CHUNK_BYTES >> 20} MiB "
                         f"and positive, got {chunk_bytes:,} bytes")
    with Connection(target, client_id, retry, tls=tls, insecure=insecure, server_name=server_name,
                    wait_s=wait_for_coordinator) as conn, tempfile.TemporaryDirectory(
        prefix="tiesfed-submit-", dir=work_dir
    ) as tmp:
        client_id = conn.client_id  # with tls, the certificate's
        spec = conn.round_spec(round_id)
        chunk_bytes = min(chunk_bytes, spec.max_chunk_bytes or MAX_CHUNK_BYTES)
        opts = spec_options(spec)
        me = next((p for p in spec.participants if p.client_id == client_id), None)
        if me is None:  # the coordinator already refuses this; be clear anyway
            raise FederatedError(f"client {client_id!r} is not a participant of round {round_id!r}", "PERMISSION_DENIED")
        method = get_method(opts.method)
        trim = method.trim_spec(opts, me.density if me.HasField("density") else None)
        value_dtype = VALUE_DTYPES[opts.value_dtype] if opts.value_dtype else None
        block = block or client_block(max_memory, trim)

        with ModelReader(base) as b, ModelReader(model) as ft:
            fp = check_base(spec, b, opts)
            if vocab == "base":
                read_at_base_rows(b, ft)
            check_compatible(b, ft, opts.keep_base, allow_architecture_mismatch)
            check_whole(mergeable(b.manifest(), opts.keep_base), trim, block)  # before any upload
            from tiesfed.client.secure import secure_spec, submit_secure  # issue 13: the round says if it is secure

            if (secure := secure_spec(conn, round_id)) is not None:
                return submit_secure(conn, spec, secure, b, ft, trim, opts, me.model_key, device=device,
                                     value_dtype=value_dtype, block=block, chunk_bytes=chunk_bytes, started=started, fault=fault,
                                     workdir=Path(tmp))
            pipe = _SpoolPipe(Path(tmp) / f"{round_id}-{client_id}.tfs")
            stats = TrimStats()
            stages = Stages(enabled=progress)

            stop = threading.Event()  # the sender is done (or gave up): stop producing

            def trimmed() -> Iterator[dict | SparseTensor]:
                """The trim thread: the stream's header, then its tensors (reading, task vector, trim)."""
                stage = Prefixed(stages, f"{client_id}: ")
                # before the header, which declares it: the local engine's stream, byte for byte
                threshold = contribution_threshold(b, ft, trim, keep_base=opts.keep_base, device=device,
                                                   progress=stage, block=block)
                yield contribution_header(fp, me.model_key, trim, threshold=threshold, round_id=round_id,
                                          client_id=client_id)
                tensors = iter_contribution(b, ft, trim, model_key=me.model_key, keep_base=opts.keep_base,
                                            device=device, value_dtype=value_dtype, stats=stats,
                                            progress=stage, threshold=threshold, block=block)
                yield from within_bound(tensors, spec.max_abs_value, round_id)

            def produce() -> None:
                """The encode thread: encodes what the trim thread hands over into the spool pipe."""
                try:
                    with Prefetch(trimmed, PIPELINE_DEPTH, f"trim-{client_id}", max_bytes=queue_bytes(block, trim),
                                  weigh=_record_bytes) as items:
                        header = next(items)
                        assert isinstance(header, dict)
                        writer = StreamWriter(pipe, header)
                        for t in items:
                            if stop.is_set():
                                return
                            writer.write(t)
                        writer.close()
                    pipe.finish()
                except BaseException as e:  # handed to the sender, which raises it
                    pipe.fail(e)
                finally:
                    stages.close()

            producer = threading.Thread(target=produce, name=f"encode-{client_id}", daemon=True)
            producer.start()
            try:
                seal = manifest_signer(conn.identity, spec, client_id)
                result = _send(conn, round_id, pipe, chunk_bytes, retry, progress, fault, seal)
            finally:
                stop.set()
                producer.join()
        result.stats = stats
        result.seconds = time.perf_counter() - started
        return result


def _record_bytes(item: dict | SparseTensor) -> int:
    """What a trimmed record holds while it waits for the encoder."""
    if isinstance(item, SparseTensor):
        return item.indices.nbytes + item.values.nbytes
    return 0


def manifest_signer(identity: Optional[Identity], spec: pb.RoundSpec,
                    client_id: str) -> Optional[Callable[[str], bytes]]:
    """With an identity: sha256 -> this client's signature over the contribution manifest
    (the round's id, base fingerprint and options as its spec states them), else None."""
    if identity is None:
        return None
    key = identity.key_pem

    def seal(sha256: str) -> bytes:
        return signing.sign(key, signing.contribution_manifest(spec.round_id, client_id, spec.base_fingerprint,
                                                               spec.options_json, sha256))

    return seal


def reserve_slot(conn: Connection, round_id: str, wait_s: float = 10.0) -> str:
    """Wait (long polls) until the coordinator grants an upload slot; returns the lease."""
    while True:
        reply = conn.call("ReserveUpload", pb.ReserveUploadRequest(round_id=round_id, wait_seconds=wait_s),
                          timeout=wait_s + 30)
        if reply.granted:
            return reply.lease


def _send(
    conn: Connection,
    round_id: str,
    pipe: _SpoolPipe,
    chunk_bytes: int,
    retry: Retry,
    progress: bool,
    fault: Optional[Fault],
    seal: Optional[Callable[[str], bytes]] = None,
) -> SubmitResult:
    """Stream the pipe to the coordinator, resuming after breaks; `seal(sha256)` signs the
    finished stream (mutual TLS) for the chunk that carries its last bytes. `retry.attempts`
    bounds the breaks in a row without progress: a break after which the coordinator holds
    more of the stream than before (a slow client whose slot went to a waiting one, say)
    starts the count again."""
    sent = 0
    failures, held = 0, 0  # breaks in a row without progress; the most the coordinator held
    signature = b""  # made once, when the last bytes are first sent
    resumed: list[int] = []
    bar = tqdm(unit="B", unit_scale=True, disable=not progress, desc=f"upload {conn.client_id}")
    try:
        for attempt in itertools.count():
            start = 0
            if attempt > 0:
                st = conn.call("UploadStatus", pb.UploadStatusRequest(round_id=round_id))
                if st.committed_offset > held:  # the last stream got further: progress
                    failures, held = 0, st.committed_offset
                if st.committed_offset > 0 and pipe.wait_for(st.committed_offset) >= st.committed_offset:
                    if sha256_file(pipe.path, 0, st.committed_offset) == st.prefix_sha256:
                        start = st.committed_offset
                        resumed.append(start)
            # open the stream only once a chunk is ready and the coordinator granted
            # a slot: it reads a bounded number of streams at once
            pipe.wait_for(start + chunk_bytes)
            md = conn.metadata + ((UPLOAD_LEASE_KEY, reserve_slot(conn, round_id)),)
            ready = threading.Event()  # set once `holder["call"]` exists
            holder: dict = {}

            def requests() -> Iterator[pb.UploadChunk]:
                nonlocal sent, signature
                try:
                    for i, (off, data, last) in enumerate(pipe.chunks(start, chunk_bytes)):
                        if fault is not None and fault(attempt, i):
                            ready.wait()
                            holder["call"].cancel()
                            return
                        if last and seal is not None and not signature:
                            signature = seal(pipe.sha.hexdigest())
                        yield pb.UploadChunk(round_id=round_id, offset=off, data=data,
                                             signature=signature if last else b"")
                        sent += len(data)
                        bar.update(len(data))
                        if pipe.done and bar.total is None:
                            bar.total = pipe.size
                except GeneratorExit:  # gRPC closed the stream: the call's own status says why
                    raise
                except BaseException as e:  # the encoder failed: stop the call, raise it below
                    holder["error"] = e
                    ready.wait()
                    holder["call"].cancel()

            call = conn.stub.Upload.future(requests(), metadata=md)
            holder["call"] = call
            ready.set()
            try:
                receipt = call.result()
            except (grpc.RpcError, grpc.FutureCancelledError) as e:
                if "error" in holder:
                    raise holder["error"]
                if pipe.error is not None:
                    raise pipe.error
                # CANCELLED: our own simulated break, or the coordinator's watchdog
                # dropping a stalled stream; both resume
                cancelled = isinstance(e, grpc.FutureCancelledError) or e.code() == grpc.StatusCode.CANCELLED
                transient = cancelled or e.code() in RETRYABLE
                failures += 1
                if not transient or failures > retry.attempts:
                    if isinstance(e, grpc.RpcError):
                        raise FederatedError.from_rpc(e, f"upload of {conn.client_id!r} to round {round_id!r}") from None
                    raise FederatedError(f"upload of {conn.client_id!r} to round {round_id!r} was cancelled",
                                         "CANCELLED") from None
                log.warning("upload of %s to round %s interrupted (%s); resuming, attempt %d", conn.client_id,
                            round_id, "cancelled" if cancelled else e.code().name, attempt + 2)
                retry.sleep(failures)
                continue
            if "error" in holder:
                raise holder["error"]
            if receipt.committed:
                return SubmitResult(
                    round_id=round_id, client_id=conn.client_id, sha256=receipt.sha256, bytes=receipt.bytes,
                    bytes_sent=sent, nnz=receipt.nnz, attempts=attempt + 1, resumed_from=resumed,
                    duplicate=receipt.duplicate, replaced=receipt.replaced, signed=bool(signature),
                )
            failures += 1
            if failures > retry.attempts:
                raise FederatedError(f"upload of {conn.client_id!r} to round {round_id!r}: gave up after "
                                     f"{failures} attempts in a row without progress", "UNAVAILABLE")
            retry.sleep(failures)  # the stream ended before the end marker: resume it
    finally:
        bar.close()


# ----------------------------------------------------------------------------- fetch


