"""A whole federated round in one call, over real gRPC on loopback.

`federated_merge(config, out_dir)` starts a coordinator on 127.0.0.1 (a free
port) with its spool in a temporary folder, runs one client per fine-tuned
model in its own thread (`tiesfed.client.federated.submit`), fetches the merged model
into `out_dir` (`tiesfed.client.federated.fetch`), and stops everything. The result is
the same model `tiesfed.engine.merge` writes for the same config, bit for bit.
The demo and the tests use it; a real deployment runs the same pieces as
`tiesfed coordinator serve` and `tiesfed client submit|fetch` on separate machines.
"""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from tiesfed.client.federated import (
    DEFAULT_CHUNK_BYTES,
    FetchResult,
    Retry,
    SubmitResult,
    fetch,
    submit,
)
from tiesfed.coordinator.rounds import (
    AggregatorFactory,
    ParticipantConfig,
    RoundConfig,
    TensorEntry,
)
from tiesfed.coordinator.server import CoordinatorConfig, CoordinatorServer
from tiesfed.core.options import MergeConfig
from tiesfed.io.mergekit_config import round_plan
from tiesfed.io.model_io import (
    DEFAULT_SHARD_BYTES,
    DTYPE_TO_ST,
    ModelReader,
    fingerprint,
    mergeable,
)
from tiesfed.trust import pki


@dataclass
class FederatedResult:
    out_dir: Path
    round_id: str
    params: int  # mergeable parameters
    clients: list[SubmitResult] = field(default_factory=list)
    fetch: Optional[FetchResult] = None
    upload_bytes: int = 0  # contribution streams, summed over clients
    upload_bytes_sent: int = 0  # what went on the wire upstream, resends included
    download_bytes: int = 0  # the merged stream, downloaded once
    wall_seconds: float = 0.0
    submit_seconds: float = 0.0  # until the last client's upload was committed
    merged_sha256: str = ""

    @property
    def wire_bytes(self) -> int:
        """Bytes on the wire: uploads (resends included) plus the download."""
        return self.upload_bytes_sent + self.download_bytes

    @property
    def dense_fp32_bytes(self) -> int:
        """What shipping every fine-tuned model's mergeable weights as fp32 would cost."""
        return 4 * self.params * len(self.clients)

    def format(self) -> str:
        n = len(self.clients)
        per = self.upload_bytes / n if n else 0
        return (
            f"federated round {self.round_id}: {n} clients over gRPC on loopback, {self.params:,} parameters\n"
            f"  upload {self.upload_bytes:,} B ({8 * per / self.params:.2f} bits/param per client), "
            f"download {self.download_bytes:,} B, wire total {self.wire_bytes:,} B = "
            f"{100 * self.wire_bytes / max(self.dense_fp32_bytes, 1):.1f}% of dense fp32 uploads\n"
            f"  {self.wall_seconds:.1f} s (uploads done after {self.submit_seconds:.1f} s) -> {self.out_dir}"
        )


def federated_merge(
    config: MergeConfig,
    out_dir: str | Path,
    *,
    progress: bool = False,
    device: str = "cpu",
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    work_dir: Optional[str | Path] = None,
    aggregator_factory: Optional[AggregatorFactory] = None,
    aggregator: Literal["ray", "local"] = "ray",
    round_id: str = "local",
    timeout: Optional[float] = None,
    tls: bool = True,
) -> FederatedResult:
    """Merge `config.models` into `config.base_model` through a federated round on loopback.

    The coordinator shards over Ray actors (a local Ray) unless `aggregator` is
    "local" or an `aggregator_factory` is given (e.g. one Ray session shared by
    many rounds, see tiesfed.demo.merge).

    With `tls` (the default) the round runs over mutual TLS, as between
    organisations: a throwaway CA issues the coordinator's certificate (for
    127.0.0.1) and one client certificate per model, every upload is signed and
    the fetch verifies the coordinator's signed merge. `tls=False` uses plaintext
    on loopback."""
    started = time.perf_counter()
    opts, plan = round_plan(config)
    with ModelReader(config.base_model) as base:
        fp = fingerprint(base)
        manifest = [
            TensorEntry(name=t.name, shape=tuple(t.shape), dtype=DTYPE_TO_ST[t.dtype])
            for t in mergeable(base.manifest(), opts.keep_base)
        ]
    ids = [f"client-{i}" for i in range(len(config.models))]
    round_cfg = RoundConfig(
        round_id=round_id,
        options=opts,
        participants=[
            ParticipantConfig(client_id=cid, weight=w, density=d, model_key=str(i))
            for i, (cid, (w, d)) in enumerate(zip(ids, plan))
        ],
        base_fingerprint=fp,
        manifest=manifest,
    )
    result = FederatedResult(out_dir=Path(out_dir), round_id=round_id, params=sum(t.numel for t in manifest))

    with tempfile.TemporaryDirectory(prefix="tiesfed-federated-", dir=work_dir) as tmp:
        identities = make_identities(Path(tmp) / "pki", ids) if tls else None
        transport = {"tls_dir": identities["server"]} if identities else {"insecure": True}
        server_cfg = CoordinatorConfig(
            listen="127.0.0.1:0", spool_dir=Path(tmp) / "spool", rounds=[round_cfg], aggregator=aggregator,
            **transport,
        )
        with CoordinatorServer(server_cfg, aggregator_factory=aggregator_factory) as srv:
            target = srv.target
            results: list[Optional[SubmitResult]] = [None] * len(ids)
            errors: list[BaseException] = []

            def run_client(i: int) -> None:
                try:
                    results[i] = submit(
                        target, round_id, ids[i], config.base_model, config.models[i].model, device=device,
                        chunk_bytes=chunk_bytes, work_dir=tmp, progress=progress, retry=Retry(),
                        vocab="base" if config.vocab else None, **client_transport(identities, ids[i]),
                    )
                except BaseException as e:  # stop the round so the fetch does not wait forever
                    errors.append(e)
                    try:
                        srv.manager.get(round_id).close(abort=True)
                    except Exception:
                        pass

            threads = [threading.Thread(target=run_client, args=(i,), name=f"client-{i}") for i in range(len(ids))]
            for t in threads:
                t.start()
            fetched: dict = {}

            def run_fetch() -> None:
                try:
                    fetched["result"] = fetch(
                        target, round_id, ids[0], config.base_model, out_dir, timeout=timeout,
                        shard_bytes=shard_bytes, progress=progress, **client_transport(identities, ids[0]),
                    )
                except BaseException as e:
                    fetched["error"] = e

            fetcher = threading.Thread(target=run_fetch, name="fetch")
            fetcher.start()
            for t in threads:
                t.join()
            result.submit_seconds = time.perf_counter() - started
            fetcher.join()
            if errors:
                raise errors[0]
            if "error" in fetched:
                raise fetched["error"]

    result.clients = [r for r in results if r is not None]
    result.fetch = fetched["result"]
    result.upload_bytes = sum(r.bytes for r in result.clients)
    result.upload_bytes_sent = sum(r.bytes_sent for r in result.clients)
    result.download_bytes = result.fetch.bytes_downloaded
    result.merged_sha256 = result.fetch.sha256
    result.wall_seconds = time.perf_counter() - started
    return result


def make_identities(folder: Path, client_ids: list[str]) -> dict[str, Path]:
    """A throwaway CA with a coordinator identity for loopback and one per client."""
    pki.init_ca(folder / "ca", name="tiesfed federated_merge CA")
    out = {"server": folder / "server"}
    pki.issue(folder / "ca", out["server"], server_names=["127.0.0.1", "localhost"])
    for cid in client_ids:
        out[cid] = folder / cid
        pki.issue(folder / "ca", out[cid], client_id=cid)
    return out


def client_transport(identities: Optional[dict[str, Path]], client_id: str) -> dict:
    """`submit`/`fetch` keyword arguments: the client's identity, or plaintext."""
    return {"tls": identities[client_id]} if identities else {"insecure": True}
