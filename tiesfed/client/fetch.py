"""Fetch: wait for the round, download the merged task vector with resume, check its
sha256, and apply θ₀ + λ·τ_m to this client's own base."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import grpc
from tqdm.auto import tqdm

from tiesfed.client.connection import (
    RETRYABLE,
    Connection,
    FederatedError,
    Retry,
    check_base,
    spec_options,
)
from tiesfed.io.files import sha256_file
from tiesfed.io.materialize import apply_merged
from tiesfed.io.model_io import (
    DEFAULT_SHARD_BYTES,
    ModelReader,
)
from tiesfed.protos.v1 import tiesfed_pb2 as pb


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
                started_at = pos
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
                    continue
                if pos < total and pos == started_at:  # the stream ended early and brought nothing
                    if failures >= conn.retry.attempts:
                        raise FederatedError(f"download of round {round_id!r}: the coordinator's stream stops at "
                                             f"byte {pos:,} of {total:,}", "DATA_LOSS")
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

