"""Fetch: wait for the round, download the merged task vector with resume, check its
sha256, and apply θ₀ + λ·τ_m to this client's own base.

With mutual TLS the merge must come signed: the first message of each Download
carries the coordinator's manifest (round, merged digest, every contribution it
folded), its signature and its certificate. `verify_merge` checks them against
this client's CA before a byte is kept, so a coordinator-side edit of the merge,
its manifest or its signature stops the fetch with nothing left in `out_dir`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import grpc
from tqdm.auto import tqdm

from tiesfed.client.budget import apply_block
from tiesfed.client.connection import (
    RETRYABLE,
    Connection,
    FederatedError,
    Retry,
    check_base,
    spec_options,
)
from tiesfed.client.progress import Stages
from tiesfed.io.materialize import apply_merged
from tiesfed.io.model_io import (
    DEFAULT_SHARD_BYTES,
    ModelReader,
)
from tiesfed.protos.v1 import tiesfed_pb2 as pb
from tiesfed.trust import SignatureError, TrustError, describe, signing
from tiesfed.trust.identity import Identity


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
    #: the coordinator's verified manifest of the merge (round, merged_sha256, and each
    #: contribution's client_id, sha256, signature_hex, cert_fingerprint); None when insecure
    provenance: Optional[dict[str, Any]] = None


def verify_merge(ch: pb.DownloadChunk, identity: Identity, round_id: str, sha256: str) -> dict[str, Any]:
    """The merge's signed manifest from a Download's first message, checked: the coordinator's
    certificate is a server certificate from our CA, its key signed the manifest, and the
    manifest is this round's and names the stream's digest. Raises FederatedError
    (UNAUTHENTICATED for who signed, DATA_LOSS for what was signed) naming the failed check."""
    what = f"the merge of round {round_id!r}"
    if not (ch.merged_manifest_json and ch.merged_signature and ch.coordinator_cert_pem):
        raise FederatedError(f"{what} comes without the coordinator's signed manifest: refusing an unsigned merge",
                             "UNAUTHENTICATED")
    cert = ch.coordinator_cert_pem.encode()
    try:
        signing.verify_chain(cert, identity.ca_pem)
        role = describe(cert).role
    except (SignatureError, TrustError) as e:
        raise FederatedError(f"{what}: the coordinator's certificate does not check against our CA: {e}",
                             "UNAUTHENTICATED") from None
    if role != "server":
        raise FederatedError(f"{what} is signed by a {role or 'role-less'} certificate, not a coordinator's",
                             "UNAUTHENTICATED")
    try:
        manifest = json.loads(ch.merged_manifest_json)
    except ValueError as e:
        raise FederatedError(f"{what}: its manifest is not JSON: {e}", "DATA_LOSS") from None
    if not isinstance(manifest, dict):
        raise FederatedError(f"{what}: its manifest is not a JSON object", "DATA_LOSS")
    try:
        signing.verify(cert, manifest, ch.merged_signature)
    except SignatureError as e:
        raise FederatedError(f"{what}: the coordinator's signature over its manifest does not verify: {e}",
                             "UNAUTHENTICATED") from None
    if manifest.get("kind") != signing.MERGED_KIND or manifest.get("round_id") != round_id:
        raise FederatedError(f"{what}: the signed manifest is a {manifest.get('kind')!r} of round "
                             f"{manifest.get('round_id')!r}", "UNAUTHENTICATED")
    if manifest.get("merged_sha256") != sha256 or ch.sha256 != sha256:
        raise FederatedError(f"{what}: the signed manifest names the merged sha256 {manifest.get('merged_sha256')}, "
                             f"the stream is {sha256}", "DATA_LOSS")
    if not isinstance(manifest.get("contributions"), list):
        raise FederatedError(f"{what}: the signed manifest lists no contributions", "DATA_LOSS")
    return manifest


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


def first_message(conn: Connection, round_id: str, offset: int) -> pb.DownloadChunk:
    """The first message of a Download from `offset` (its header: digest, size, signature)."""
    for n in range(conn.retry.attempts + 1):
        call = conn.stub.Download(pb.DownloadRequest(round_id=round_id, offset=offset), metadata=conn.metadata,
                                  timeout=60)
        try:
            return next(call)
        except StopIteration:
            raise FederatedError(f"download of round {round_id!r}: the coordinator sent nothing", "DATA_LOSS") from None
        except grpc.RpcError as e:
            if e.code() not in RETRYABLE or n == conn.retry.attempts:
                raise FederatedError.from_rpc(e, f"download of round {round_id!r}") from None
            conn.retry.sleep(n)
        finally:
            call.cancel()
    raise AssertionError("unreachable")  # pragma: no cover


def download(conn: Connection, round_id: str, path: Path, sha256: str, total: int,
             progress: bool = False, check: Optional[Callable[[pb.DownloadChunk], None]] = None) -> tuple[int, int]:
    """Download the merged stream into `path`, resuming from what it holds.

    Returns (bytes downloaded, attempts). The file's sha256 must be `sha256`.
    `check` sees the first message of every Download call before any of its data is written.
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
            digest = _prefix_digest(f, pos)  # the file's sha256, kept as it grows: no second read
            f.seek(pos)
            while pos < total:
                started_at = pos
                first = True
                try:
                    for ch in conn.stub.Download(pb.DownloadRequest(round_id=round_id, offset=pos),
                                                 metadata=conn.metadata):
                        if first and check is not None:
                            check(ch)
                        first = False
                        if ch.sha256 != sha256 or ch.total_bytes != total:
                            raise FederatedError(f"round {round_id!r}: the merged stream changed while downloading")
                        if ch.offset != pos:
                            raise FederatedError(f"download of round {round_id!r}: chunk at {ch.offset}, expected {pos}")
                        if ch.data:
                            f.write(ch.data)
                            digest.update(ch.data)
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
        if digest.hexdigest() == sha256:
            return got, whole + 1 + failures
        path.unlink()
    raise FederatedError(f"download of round {round_id!r}: sha256 mismatch after a fresh download", "DATA_LOSS")


def _prefix_digest(f, n: int) -> "hashlib._Hash":
    """sha256 of the first `n` bytes of the open file `f` (a partial download resumed)."""
    h = hashlib.sha256()
    f.seek(0)
    while n > 0:
        b = f.read(min(n, 1 << 20))
        if not b:
            break
        h.update(b)
        n -= len(b)
    return h


def partial_name(round_id: str) -> str:
    """The download in progress, inside the output folder (a second fetch resumes it)."""
    return f".tiesfed-merged-{round_id}.tfs.part"


def check_fetch_dir(out_dir: Path, round_id: str, overwrite: bool) -> None:
    """Refuse a non-empty output folder unless `overwrite` (the round's partial download aside)."""
    if overwrite or not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ValueError(f"output folder {out_dir} is a file")
    held = sorted(p.name for p in out_dir.iterdir() if p.name != partial_name(round_id))
    if held:
        raise ValueError(f"output folder {out_dir} is not empty ({', '.join(held[:5])}"
                         f"{', ...' if len(held) > 5 else ''}): choose a new or empty folder, or give "
                         "--overwrite to replace its weights")


def fetch(
    target: str,
    round_id: str,
    client_id: Optional[str],
    base: str | Path,
    out_dir: str | Path,
    *,
    timeout: Optional[float] = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    retry: Retry = Retry(),
    progress: bool = False,
    keep_merged: bool = False,
    wait_for_coordinator: float = 0.0,
    tls: str | Path | Identity | None = None,
    insecure: bool = False,
    server_name: Optional[str] = None,
    overwrite: bool = False,
    max_memory: Optional[int] = None,
    block: Optional[int] = None,
) -> FetchResult:
    """Wait for the round, download the merged task vector, apply it to `base` into `out_dir`.

    An `out_dir` holding anything but this round's partial download (kept for a resume)
    is refused before anything is asked of the coordinator, unless `overwrite` (--overwrite):
    then its weights are replaced, as `tiesfed merge --overwrite` does. `max_memory` (bytes)
    sets how much of a tensor of the base is applied at once (`budget.apply_block`);
    `block` sets it directly (tests)."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    check_fetch_dir(out_dir, round_id, overwrite)
    block = block or apply_block(max_memory)
    with Connection(target, client_id, retry, tls=tls, insecure=insecure, server_name=server_name,
                    wait_s=wait_for_coordinator) as conn, ModelReader(base) as b:
        spec = conn.round_spec(round_id)
        fp = check_base(spec, b, spec_options(spec))
        sha, total = wait_finalized(conn, round_id, timeout)
        identity = conn.identity
        verified: dict[str, Any] = {}
        untrusted: list[FederatedError] = []

        def check(ch: pb.DownloadChunk) -> None:
            if identity is not None:
                try:
                    verified.update(verify_merge(ch, identity, round_id, sha))
                except FederatedError as e:
                    untrusted.append(e)
                    raise

        created = not out_dir.exists()
        out_dir.mkdir(parents=True, exist_ok=True)
        part = out_dir / partial_name(round_id)
        try:
            got, attempts = download(conn, round_id, part, sha, total, progress, check)
            if identity is not None and not verified:  # the partial file was whole already: ask once
                check(first_message(conn, round_id, total))
        except FederatedError:
            if untrusted:  # an untrusted merge leaves nothing behind (other failures keep it for a resume)
                part.unlink(missing_ok=True)
                if created:
                    shutil.rmtree(out_dir, ignore_errors=True)
            raise
        with Stages(enabled=progress) as bar:
            bar.stage("write", sum(t.numel for t in b.manifest()))
            header = apply_merged(b, part, out_dir, shard_bytes=shard_bytes, expected_fingerprint=fp,
                                  overwrite=overwrite, progress=bar.update, block=block)
        if keep_merged:
            part.replace(out_dir / "merged_task_vector.tfs")
        else:
            part.unlink()
    return FetchResult(round_id, out_dir, sha, total, got, attempts, header, time.perf_counter() - started,
                       provenance=dict(verified) if identity is not None else None)

