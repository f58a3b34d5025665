"""The federated client: submit a contribution to a round, fetch the merged model.

    from tiesfed.client.federated import submit, fetch
    submit("127.0.0.1:50051", "r1", "org-a", base="base/", model="ft-a/")
    fetch("127.0.0.1:50051", "r1", "org-a", base="base/", out_dir="merged/")

`submit` reads the round's spec, checks that its base is the round's base
(fingerprint and manifest), trims with the round's options through the same
`iter_contribution` the local engine uses, and uploads the encoded stream as
one pipelined gRPC client stream: a producer thread encodes tensor by tensor
into a local spool file while the sender streams that file in chunks, so
memory is one tensor plus one chunk. After a broken connection it backs off,
asks the coordinator how many bytes it holds (and their sha256), and resumes
from there out of the local spool.

`fetch` watches the round until it is finalized, downloads the merged task
vector with resume, checks its sha256, and applies θ₀ + λ·τ_m to its own base
with `tiesfed.core.apply.apply_sparse` into a Hugging Face style folder.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import grpc
from tqdm.auto import tqdm

from tiesfed.client.contribution import (
    VALUE_DTYPES,
    TrimStats,
    contribution_header,
    iter_contribution,
    write_contribution,
)
from tiesfed.core.methods import get_method
from tiesfed.core.options import MergeOptions
from tiesfed.io.files import sha256_file
from tiesfed.io.materialize import apply_merged
from tiesfed.io.model_io import (
    DEFAULT_SHARD_BYTES,
    ModelReader,
    check_compatible,
    fingerprint,
    mergeable,
)
from tiesfed.protos.v1 import (
    CLIENT_ID_KEY,
    KEEPALIVE_TIME_MS,
    MAX_CHUNK_BYTES,
    UPLOAD_LEASE_KEY,
    channel_options,
    check_target,
)
from tiesfed.protos.v1 import tiesfed_pb2 as pb
from tiesfed.protos.v1 import tiesfed_pb2_grpc as pb_grpc

log = logging.getLogger("tiesfed.client")

DEFAULT_CHUNK_BYTES = 1 << 20
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED})

#: Test hook of `submit`: called as fault(attempt, chunk_index) before each chunk is
#: sent; returning True breaks the connection there (the call is cancelled).
Fault = Callable[[int, int], bool]


class FederatedError(RuntimeError):
    """A round refused a request, or a transfer could not be completed.

    `code` is the gRPC status name when the coordinator answered with one.
    """

    def __init__(self, message: str, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.code = code

    @classmethod
    def from_rpc(cls, e: grpc.RpcError, what: str) -> "FederatedError":
        code = e.code() if hasattr(e, "code") else None
        details = e.details() if hasattr(e, "details") else str(e)
        name = code.name if code is not None else None
        return cls(f"{what}: {name}: {details}", name)


@dataclass(frozen=True)
class Retry:
    """Exponential backoff with jitter for transient failures."""

    attempts: int = 8
    backoff_s: float = 0.2
    max_backoff_s: float = 10.0

    def sleep(self, n: int) -> None:
        delay = min(self.max_backoff_s, self.backoff_s * (2**n))
        time.sleep(delay * (0.5 + random.random() / 2))


class Connection:
    """A channel to the coordinator with this client's identity in the metadata.

    `wait_s` > 0: the first call waits up to that long for a coordinator that
    is not listening yet (started after its clients), redialling with gRPC's
    bounded backoff and logging each wait, instead of failing at once.
    """

    def __init__(
        self, target: str, client_id: str, retry: Retry = Retry(), *, wait_s: float = 0.0,
        keepalive_ms: int = KEEPALIVE_TIME_MS,
    ) -> None:
        self.target = check_target(target)
        self.client_id = client_id
        self.retry = retry
        self.channel = grpc.insecure_channel(target, options=channel_options(keepalive_ms))
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self.metadata = ((CLIENT_ID_KEY, client_id),)
        if wait_s > 0:
            self.wait_ready(wait_s)

    def wait_ready(self, wait_s: float, report_every_s: float = 5.0) -> None:
        """Block until the channel connects, at most `wait_s` seconds."""
        started = time.monotonic()
        while True:
            left = wait_s - (time.monotonic() - started)
            try:
                grpc.channel_ready_future(self.channel).result(timeout=max(0.0, min(left, report_every_s)))
                return
            except grpc.FutureTimeoutError:
                waited = time.monotonic() - started
                if waited >= wait_s:
                    raise FederatedError(
                        f"no coordinator answered at {self.target} within {wait_s:g} s "
                        "(is it running? --wait-for-coordinator waits longer)", "UNAVAILABLE") from None
                log.warning("waiting for the coordinator at %s: %.0f of %g s", self.target, waited, wait_s)

    def call(self, name: str, request, timeout: float = 60.0):
        """A unary call, retried on transient errors."""
        method = getattr(self.stub, name)
        for n in range(self.retry.attempts + 1):
            try:
                return method(request, metadata=self.metadata, timeout=timeout)
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE or n == self.retry.attempts:
                    raise FederatedError.from_rpc(e, f"{name} for {self.client_id!r} at {self.target}") from None
                self.retry.sleep(n)
        raise AssertionError("unreachable")  # pragma: no cover

    def round_spec(self, round_id: str) -> pb.RoundSpec:
        return self.call("GetRoundSpec", pb.GetRoundSpecRequest(round_id=round_id))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def spec_options(spec: pb.RoundSpec) -> MergeOptions:
    return MergeOptions.model_validate_json(spec.options_json)


def check_base(spec: pb.RoundSpec, base: ModelReader, opts: MergeOptions) -> str:
    """The base must be the round's: same fingerprint and mergeable manifest. Returns the fingerprint."""
    fp = fingerprint(base)
    if fp != spec.base_fingerprint:
        raise FederatedError(
            f"base model {base.path} has fingerprint {fp}, but round {spec.round_id!r} merges onto "
            f"{spec.base_fingerprint}: use the round's base model",
            "FAILED_PRECONDITION",
        )
    mine = [(t.name, list(t.shape)) for t in mergeable(base.manifest(), opts.keep_base)]
    theirs = [(t.name, list(t.shape)) for t in spec.manifest]
    if mine != theirs:
        raise FederatedError(
            f"base model {base.path} does not have the round's tensor manifest", "FAILED_PRECONDITION"
        )
    return fp


# ----------------------------------------------------------------------------- submit


class _SpoolPipe:
    """The contribution stream: written once by the encoder, read (and re-read) by the sender."""

    FLUSH = 256 << 10

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "wb", buffering=0)
        self._buf = bytearray()
        self.size = 0  # bytes on disk, visible to readers
        self.done = False
        self.error: Optional[BaseException] = None
        self.cond = threading.Condition()

    def write(self, data) -> int:
        self._buf += data
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

    def chunks(self, start: int, chunk_bytes: int) -> Iterator[tuple[int, bytes]]:
        """(offset, bytes) from `start` to the end of the stream, as it is produced."""
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
                yield pos, data
                pos += len(data)


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


def submit(
    target: str,
    round_id: str,
    client_id: str,
    base: str | Path,
    model: str | Path,
    *,
    device: str = "cpu",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    retry: Retry = Retry(),
    work_dir: Optional[str | Path] = None,
    progress: bool = False,
    wait_for_coordinator: float = 0.0,
    fault: Optional[Fault] = None,
) -> SubmitResult:
    """Compute, trim, encode and upload this client's contribution to `round_id`."""
    started = time.perf_counter()
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be in (0, {MAX_CHUNK_BYTES}], got {chunk_bytes}")
    with Connection(target, client_id, retry, wait_s=wait_for_coordinator) as conn, tempfile.TemporaryDirectory(
        prefix="tiesfed-submit-", dir=work_dir
    ) as tmp:
        spec = conn.round_spec(round_id)
        chunk_bytes = min(chunk_bytes, spec.max_chunk_bytes or MAX_CHUNK_BYTES)
        opts = spec_options(spec)
        me = next((p for p in spec.participants if p.client_id == client_id), None)
        if me is None:  # the coordinator already refuses this; be clear anyway
            raise FederatedError(f"client {client_id!r} is not a participant of round {round_id!r}", "PERMISSION_DENIED")
        method = get_method(opts.method)
        trim = method.trim_spec(opts, me.density if me.HasField("density") else None)
        value_dtype = VALUE_DTYPES[opts.value_dtype] if opts.value_dtype else None

        with ModelReader(base) as b, ModelReader(model) as ft:
            fp = check_base(spec, b, opts)
            check_compatible(b, ft, opts.keep_base)
            pipe = _SpoolPipe(Path(tmp) / f"{round_id}-{client_id}.tfs")
            stats = TrimStats()
            header = contribution_header(fp, me.model_key, trim, round_id=round_id, client_id=client_id)

            def produce() -> None:
                try:
                    write_contribution(
                        pipe, header,
                        iter_contribution(b, ft, trim, model_key=me.model_key, keep_base=opts.keep_base,
                                          device=device, value_dtype=value_dtype, stats=stats),
                    )
                    pipe.finish()
                except BaseException as e:  # handed to the sender, which raises it
                    pipe.fail(e)

            producer = threading.Thread(target=produce, name=f"encode-{client_id}", daemon=True)
            producer.start()
            try:
                result = _send(conn, round_id, pipe, chunk_bytes, retry, progress, fault)
            finally:
                producer.join()
        result.stats = stats
        result.seconds = time.perf_counter() - started
        return result


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
) -> SubmitResult:
    sent = 0
    resumed: list[int] = []
    bar = tqdm(unit="B", unit_scale=True, disable=not progress, desc=f"upload {conn.client_id}")
    try:
        for attempt in range(retry.attempts + 1):
            start = 0
            if attempt > 0:
                st = conn.call("UploadStatus", pb.UploadStatusRequest(round_id=round_id))
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
                nonlocal sent
                try:
                    for i, (off, data) in enumerate(pipe.chunks(start, chunk_bytes)):
                        if fault is not None and fault(attempt, i):
                            ready.wait()
                            holder["call"].cancel()
                            return
                        yield pb.UploadChunk(round_id=round_id, offset=off, data=data)
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
                if not transient or attempt == retry.attempts:
                    if isinstance(e, grpc.RpcError):
                        raise FederatedError.from_rpc(e, f"upload of {conn.client_id!r} to round {round_id!r}") from None
                    raise FederatedError(f"upload of {conn.client_id!r} to round {round_id!r} was cancelled",
                                         "CANCELLED") from None
                log.info("upload of %s interrupted; resuming", conn.client_id)
                retry.sleep(attempt)
                continue
            if "error" in holder:
                raise holder["error"]
            if receipt.committed:
                return SubmitResult(
                    round_id=round_id, client_id=conn.client_id, sha256=receipt.sha256, bytes=receipt.bytes,
                    bytes_sent=sent, nnz=receipt.nnz, attempts=attempt + 1, resumed_from=resumed,
                    duplicate=receipt.duplicate, replaced=receipt.replaced,
                )
            retry.sleep(attempt)  # the stream ended before the end marker: resume it
        raise FederatedError(f"upload of {conn.client_id!r} to round {round_id!r}: gave up after "
                             f"{retry.attempts + 1} attempts", "UNAVAILABLE")
    finally:
        bar.close()


# ----------------------------------------------------------------------------- fetch


@dataclass
class FetchResult:
    round_id: str
    out_dir: Path
    sha256: str
    total_bytes: int
    bytes_downloaded: int
    attempts: int
    header: dict = field(default_factory=dict)
    seconds: float = 0.0


def wait_finalized(conn: Connection, round_id: str, timeout: Optional[float] = None) -> tuple[str, int]:
    """Watch the round until it is finalized: (sha256, bytes) of the merged stream."""
    end = None if timeout is None else time.monotonic() + timeout
    seq, failures = 0, 0
    while True:
        left = None if end is None else end - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError(f"round {round_id!r} not finalized within {timeout} s")
        try:
            for ev in conn.stub.Watch(pb.WatchRequest(round_id=round_id, from_seq=seq), metadata=conn.metadata,
                                      timeout=left):
                seq = ev.seq + 1
                if ev.kind == pb.ROUND_FINALIZED:
                    return ev.sha256, ev.bytes
                if ev.kind == pb.ROUND_FAILED:
                    raise FederatedError(f"round {round_id!r} failed: {ev.message}", "FAILED_PRECONDITION")
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and end is not None and time.monotonic() >= end:
                raise TimeoutError(f"round {round_id!r} not finalized within {timeout} s") from None
            if e.code() not in RETRYABLE or failures >= conn.retry.attempts:
                raise FederatedError.from_rpc(e, f"watching round {round_id!r}") from None
            conn.retry.sleep(failures)
            failures += 1


def download(conn: Connection, round_id: str, path: Path, sha256: str, total: int,
             progress: bool = False) -> tuple[int, int]:
    """Download the merged stream into `path`, resuming from what it holds.

    Returns (bytes downloaded, attempts). The file's sha256 must be `sha256`.
    """
    got = 0
    failures = 0
    for whole in range(2):  # a second pass from zero if a stale partial file fails the digest
        pos = path.stat().st_size if path.exists() else 0
        if pos > total:
            pos = 0
        with open(path, "r+b" if path.exists() else "wb") as f, tqdm(
            total=total, initial=pos, unit="B", unit_scale=True, disable=not progress, desc=f"download {round_id}"
        ) as bar:
            f.truncate(pos)
            f.seek(pos)
            while pos < total:
                try:
                    for ch in conn.stub.Download(pb.DownloadRequest(round_id=round_id, offset=pos),
                                                 metadata=conn.metadata):
                        if ch.sha256 != sha256 or ch.total_bytes != total:
                            raise FederatedError(f"round {round_id!r}: the merged stream changed while downloading")
                        if ch.offset != pos:
                            raise FederatedError(f"download of round {round_id!r}: chunk at {ch.offset}, expected {pos}")
                        if ch.data:
                            f.write(ch.data)
                            pos += len(ch.data)
                            got += len(ch.data)
                            bar.update(len(ch.data))
                except grpc.RpcError as e:
                    if e.code() not in RETRYABLE or failures >= conn.retry.attempts:
                        raise FederatedError.from_rpc(e, f"download of round {round_id!r}") from None
                    conn.retry.sleep(failures)
                    failures += 1
            f.flush()
            os.fsync(f.fileno())
        if sha256_file(path) == sha256:
            return got, whole + 1 + failures
        path.unlink()
    raise FederatedError(f"download of round {round_id!r}: sha256 mismatch after a fresh download", "DATA_LOSS")


def fetch(
    target: str,
    round_id: str,
    client_id: str,
    base: str | Path,
    out_dir: str | Path,
    *,
    timeout: Optional[float] = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    retry: Retry = Retry(),
    progress: bool = False,
    keep_merged: bool = False,
    wait_for_coordinator: float = 0.0,
) -> FetchResult:
    """Wait for the round, download the merged task vector, apply it to `base` into `out_dir`."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    with Connection(target, client_id, retry, wait_s=wait_for_coordinator) as conn, ModelReader(base) as b:
        spec = conn.round_spec(round_id)
        fp = check_base(spec, b, spec_options(spec))
        sha, total = wait_finalized(conn, round_id, timeout)
        out_dir.mkdir(parents=True, exist_ok=True)
        part = out_dir / f".tiesfed-merged-{round_id}.tfs.part"
        got, attempts = download(conn, round_id, part, sha, total, progress)
        header = apply_merged(b, part, out_dir, shard_bytes=shard_bytes, expected_fingerprint=fp)
        if keep_merged:
            part.replace(out_dir / "merged_task_vector.tfs")
        else:
            part.unlink()
    return FetchResult(round_id, out_dir, sha, total, got, attempts, header, time.perf_counter() - started)

