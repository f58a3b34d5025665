"""Run a coordinator: configuration (YAML, validated by pydantic) and the gRPC server.

    from tiesfed.coordinator.server import CoordinatorConfig, CoordinatorServer
    with CoordinatorServer(CoordinatorConfig(spool_dir=tmp, listen="127.0.0.1:0")) as srv:
        print(srv.target)            # "127.0.0.1:<port>"
        srv.manager.open_round(...)  # or rounds: [...] in the config

A YAML file has the fields of `CoordinatorConfig`; each entry of `rounds`
those of `tiesfed.coordinator.rounds.RoundConfig` (opened at start unless the spool
already holds a round of that id, which is then recovered instead).

Transport: mutual TLS (`tls_dir`, a server identity from `tiesfed pki issue`), or,
said out loud, `insecure` on a loopback address; a coordinator with neither refuses
to start rather than fall back to plaintext.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Literal, Optional

import grpc
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tiesfed.coordinator.admin import TOKEN_FILE as ADMIN_TOKEN_FILE
from tiesfed.coordinator.admin import check_token, generate_token, write_token_file
from tiesfed.coordinator.config_names import cli_names
from tiesfed.coordinator.listen import check_listen
from tiesfed.coordinator.memory import parse_bytes
from tiesfed.coordinator.metrics import CoordinatorMetrics, MetricsEndpoint
from tiesfed.coordinator.rounds import (
    AggregatorFactory,
    RoundConfig,
    RoundManager,
)
from tiesfed.coordinator.rounds.config import DEFAULT_MAX_ROUND_PARAMS
from tiesfed.coordinator.rounds.readiness import AggregatorReadiness
from tiesfed.coordinator.secure.servicer import add_secure_aggregation
from tiesfed.coordinator.service import CoordinatorService
from tiesfed.coordinator.spool import SpoolLock
from tiesfed.coordinator.streams import Cap, StreamGate
from tiesfed.io.model_io import DEFAULT_SHARD_BYTES
from tiesfed.protos.v1 import KEEPALIVE_TIME_MS, MAX_CHUNK_BYTES, server_options
from tiesfed.protos.v1 import tiesfed_pb2_grpc as pb_grpc
from tiesfed.trust.identity import Identity, RevocationList, server_credentials

log = logging.getLogger("tiesfed.coordinator")

#: Worker threads always left to short calls, whatever the long-lived ones hold.
UNARY_THREADS = 32

INSECURE_WARNING = """\
*****************************************************************************
*  WARNING: --insecure. This coordinator speaks PLAINTEXT and takes client  *
*  ids on trust from metadata: anyone who can connect can upload as any     *
*  participant and read the merge. For loopback demos and tests only; for   *
*  real rounds use --tls (`tiesfed pki issue CA --server HOST -o DIR`).     *
*****************************************************************************"""


class CoordinatorConfig(BaseModel):
    """How a coordinator runs (flags of `tiesfed coordinator serve` override these)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # a NaN or ∞ timeout or rate is a typo

    listen: str = Field("127.0.0.1:50051", description="host:port to bind; port 0 picks a free one")
    spool_dir: Path = Field(Path("tiesfed-spool"), description="durable spool (rounds, contributions, outputs)")
    base_model: Optional[str] = Field(None, description="the base model: manifest, fingerprint, full merged model")
    shard_bytes: int = Field(DEFAULT_SHARD_BYTES, gt=0, description="shard size of the merged model folder")
    tls_dir: Optional[Path] = Field(
        None, description="server identity folder (cert.pem, key.pem, ca.pem, from `tiesfed pki issue CA "
        "--server NAMES -o DIR`): mutual TLS; callers are known by the certificates the CA gave them"
    )
    crl: Optional[Path] = Field(None, description="the CA's crl.pem (with tls_dir): revoked certificates are "
                                "refused; re-read when it changes, so a revocation needs no restart")
    insecure: bool = Field(False, description="plaintext, client ids from metadata, admin by token: loopback "
                           "demos and in-process tests only (refused on any other address)")
    admin_token: Optional[str] = Field(
        None, description="insecure mode only: required in the metadata of OpenRound/CloseRound; none: one "
        "is generated at start, printed, and written to <spool>/admin-token (mode 0600); empty: refused"
    )
    max_workers: int = Field(
        512, ge=4, description="gRPC worker threads; each call in flight holds one, so the long-lived calls "
        f"(max_*_streams, summed) must leave at least {UNARY_THREADS} for the short ones (GetRoundSpec, ...)"
    )
    max_watch_streams: int = Field(256, ge=1, description="Watch streams open at once; more are refused "
                                   "with RESOURCE_EXHAUSTED")
    max_download_streams: int = Field(32, ge=1, description="Download streams at once (each holds about "
                                      "3 MiB in flight: one 1 MiB chunk plus gRPC's buffers)")
    max_upload_streams: int = Field(128, ge=1, description="Upload streams plus ReserveUpload calls waiting "
                                    "for a slot, at once (only max_active_uploads of them are read)")
    max_watches_per_client: int = Field(2, ge=1, description="Watch streams one client id may hold")
    max_downloads_per_client: int = Field(2, ge=1, description="Download streams one client id may hold")
    max_round_params: Optional[int] = Field(
        None, ge=1, description="most parameters one round may merge, checked before its accumulators "
        "(16-40 bytes a parameter) are allocated; default: this host's memory / 16 with the local "
        f"aggregator, {DEFAULT_MAX_ROUND_PARAMS:,} with Ray"
    )
    max_active_uploads: int = Field(2, ge=1, description="uploads read at once: memory is the accumulators "
                                    "plus this many records in flight, whatever the number of clients")
    max_chunk_bytes: int = Field(MAX_CHUNK_BYTES, gt=0, le=MAX_CHUNK_BYTES)
    pending_buffer_bytes: int = Field(
        1 << 30, ge=0, description="while the aggregator (Ray) starts, records received are kept decoded, up "
        "to this many bytes per round, so that folding them once it is up need not read and decode them again "
        "from the spool (the rest is)"
    )
    abandon_after_s: float = Field(300.0, gt=0, description="an interrupted upload is dropped after this idle time")
    min_free_disk_bytes: int = Field(1 << 30, ge=0, description="an upload chunk that would leave the spool's "
                                     "file system with less free space than this is refused (RESOURCE_EXHAUSTED; "
                                     "the round is left as it was) instead of filling the disk mid-round")
    stall_after_s: float = Field(120.0, gt=0, description="an upload stream holding a slot without progress "
                                 "for this long is cancelled (the client resumes it), and so is a download "
                                 "that sends nothing for this long (its reader stopped reading)")
    min_upload_rate: float = Field(float(1 << 20), gt=0, description="bytes a second an upload stream must "
                                   "average (after a grace of stall_after_s) to keep its slot while another "
                                   "client waits for one (cancelled, it resumes from the back of the queue)")
    lease_s: float = Field(30.0, gt=0, description="a reserved upload slot lapses if its stream does not open")
    keepalive_ms: int = Field(KEEPALIVE_TIME_MS, ge=100, description="clients ping this often on quiet streams; "
                              "the server accepts pings twice as often (tests compress it)")
    malloc_arena_max: Optional[int] = Field(
        2, ge=1, description="glibc malloc arenas of a `serve` process (default: 8 per core; with a thread "
        "per client stream their fragmentation grows memory with the number of clients)"
    )
    malloc_mmap_threshold: Optional[int] = Field(
        128 << 10, ge=0, description="glibc: blocks from this size on are mmap'd and go back to the OS when "
        "freed (the default threshold creeps up to 32 MiB and leaves decode buffers in the heap)"
    )
    aggregator: Literal["ray", "local", "spill"] = Field(
        "ray", description="ray: accumulators sharded over Ray actors (a local Ray unless ray_address); "
        "local: in this process; spill: in this process, one block at a time, folds appended to spill "
        "files under <spool>/spill (memory flat in the model size)"
    )
    ray_address: Optional[str] = Field(None, description="join this Ray cluster (started with `ray start`)")
    num_shards: Optional[int] = Field(None, ge=1, description="shard actors per round (default: from the cluster)")
    num_gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per shard actor; fractions allowed")
    num_cpus_per_actor: float = Field(0.5, gt=0, description="CPUs per shard actor; fractions allowed")
    max_restarts: int = Field(3, ge=0, description="restarts of a lost shard actor (rebuilt from the spool)")
    actor_memory: Optional[int] = Field(
        None, gt=0, description="memory budget of one shard actor, bytes or a size (3GB): a round gets as many "
        "actors as its accumulators need at this budget, each asking Ray for its memory (default: the "
        "cluster's memory per CPU, at most 4 GiB)")
    spill_memory: Optional[int] = Field(
        None, gt=0, description="aggregator spill: bytes or a size (1GiB) for one block's accumulators and work; "
        "the block of parameters folded at once follows from it (default 1 GiB)")
    publish_first: bool = Field(
        False, description="finalize a round (clients fetch) as soon as the merged stream is signed, and write "
        "the coordinator's own model copy after; a failed copy is retried and logged but no longer fails the "
        "round (default: the copy is part of finalization)")
    sum_dtype: Literal["float64", "float32"] = Field(
        "float64", description="dtype of the accumulator sums: float64 (exact: the same bits whatever the "
        "arrival order, and as the local merge) or float32 (8 bytes a parameter less; results then depend on "
        "the order contributions are committed in, within float32 rounding)")
    metrics_port: Optional[int] = Field(None, ge=0, le=65535, description="serve Prometheus metrics at "
                                        "http://metrics_host:PORT/metrics; 0 picks a free port (logged); none: off")
    metrics_host: str = Field("127.0.0.1", description="address of the metrics endpoint (plain HTTP, no "
                              "authentication: widen it only behind a firewall or a scraping proxy)")
    rounds: list[RoundConfig] = Field(default_factory=list)

    @field_validator("actor_memory", "spill_memory", mode="before")
    @classmethod
    def _size(cls, v: object) -> object:
        """A size with a unit (3GB, 2.5GiB) as well as a number of bytes."""
        return parse_bytes(v) if isinstance(v, str) else v

    @model_validator(mode="before")
    @classmethod
    def _cli_names(cls, data: object) -> object:
        """The CLI's names (spool, base, round + clients, ...) are accepted too."""
        return cli_names(data)

    @field_validator("admin_token")
    @classmethod
    def _token(cls, v: Optional[str]) -> Optional[str]:
        return check_token(v, "admin_token (--admin-token)")

    @model_validator(mode="after")
    def _threads(self) -> "CoordinatorConfig":
        streams = self.max_watch_streams + self.max_download_streams + self.max_upload_streams
        if streams + UNARY_THREADS > self.max_workers:
            raise ValueError(
                f"max_watch_streams + max_download_streams + max_upload_streams = {streams} leaves fewer than "
                f"{UNARY_THREADS} of max_workers = {self.max_workers} threads for short calls: raise "
                "max_workers or lower the stream limits"
            )
        return self


def load_coordinator_config(path: str | Path) -> CoordinatorConfig:
    """Read a coordinator YAML; relative paths are taken from the YAML's folder."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text()) or {}
    cfg = CoordinatorConfig.model_validate(raw)
    upd: dict = {}
    if not cfg.spool_dir.is_absolute():
        upd["spool_dir"] = path.parent / cfg.spool_dir
    if cfg.base_model and not Path(cfg.base_model).expanduser().is_absolute():
        upd["base_model"] = str(path.parent / cfg.base_model)
    for key in ("tls_dir", "crl"):
        value = getattr(cfg, key)
        if value is not None and not value.expanduser().is_absolute():
            upd[key] = path.parent / value
    return cfg.model_copy(update=upd)


def is_loopback(listen: str) -> bool:
    """Whether `host:port` binds only this machine (127.0.0.0/8, ::1, localhost)."""
    host = listen.rsplit(":", 1)[0] if ":" in listen else listen
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_transport(config: CoordinatorConfig) -> tuple[Optional[Identity], Optional[RevocationList]]:
    """Check the transport settings and load the server identity and revocation list.

    Mutual TLS unless `insecure` is asked for explicitly, and plaintext only where no
    other machine can connect; errors name the flags (and YAML keys) to fix."""
    if config.tls_dir is not None and config.insecure:
        raise ValueError("give --tls (YAML tls_dir) or --insecure, not both")
    if config.tls_dir is None and not config.insecure:
        raise ValueError(
            "the coordinator refuses to start without transport security: give --tls IDENTITY_DIR "
            "(YAML tls_dir; a server identity from `tiesfed pki issue CA --server HOST -o DIR`), or "
            "--insecure (YAML insecure: true) for a plaintext demo on a loopback address"
        )
    if config.insecure:
        if not is_loopback(config.listen):
            raise ValueError(
                f"--insecure serves plaintext with unverified client ids, so only on a loopback address "
                f"(127.0.0.1, ::1, localhost), not on {config.listen!r}: give --tls IDENTITY_DIR instead"
            )
        if config.crl is not None:
            raise ValueError("--crl needs --tls: without certificates there is nothing to revoke")
        return None, None
    assert config.tls_dir is not None
    if config.admin_token is not None:
        raise ValueError("--admin-token is for --insecure only: with --tls, admin calls need an admin "
                         "certificate (`tiesfed pki issue CA --admin NAME -o DIR`)")
    identity = Identity.load(config.tls_dir.expanduser())
    if identity.role != "server":
        raise ValueError(f"--tls {config.tls_dir} holds a {identity.role} certificate; the coordinator "
                         "needs a server identity (`tiesfed pki issue CA --server HOST -o DIR`)")
    revocation = None
    if config.crl is not None:
        if not config.crl.expanduser().is_file():
            raise ValueError(f"--crl {config.crl}: no such file (the CA folder's crl.pem)")
        revocation = RevocationList(config.crl.expanduser(), identity.ca_pem)
    return identity, revocation


def default_max_round_params(aggregator: str) -> int:
    """Rounds whose accumulators (at least 16 bytes a parameter) fit this host's memory when
    they live in this process; sharded over Ray, the fixed default."""
    if aggregator == "local":
        try:
            return max(1, os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 16)
        except (ValueError, OSError, AttributeError):
            pass
    return DEFAULT_MAX_ROUND_PARAMS


def stream_gate(config: CoordinatorConfig) -> StreamGate:
    """The caps on long-lived calls: Watch, Download, and Upload with waiting ReserveUploads;
    a secure round's polls count as watches, its step streams and masked uploads as uploads."""
    return StreamGate(
        pools={"Watch": (config.max_watch_streams, "max_watch_streams"),
               "Download": (config.max_download_streams, "max_download_streams"),
               "Upload": (config.max_upload_streams, "max_upload_streams")},
        kinds={"Watch": Cap("Watch", config.max_watches_per_client, "max_watches_per_client"),
               "Download": Cap("Download", config.max_downloads_per_client, "max_downloads_per_client"),
               # one stream per client id (the manager's rule); a second one may wait for the first to end
               "Upload": Cap("Upload", 2, None),
               "ReserveUpload": Cap("Upload", 1, None),
               # a secure round's calls that hold a thread: its long polls as watches, its
               # step messages and masked vector as uploads (one in flight, one dying)
               "SecurePoll": Cap("Watch", 2, None),
               "SecureStep": Cap("Upload", 2, None),
               "SecureUpload": Cap("Upload", 2, None)},
    )


class CoordinatorServer:
    """A RoundManager behind a gRPC server. `start()` recovers the spool and listens; an
    aggregator factory that starts (Ray) then starts in the background (`wait_ready`), and
    the rounds receive meanwhile (see `rounds.readiness`)."""

    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        aggregator_factory: Optional[AggregatorFactory] = None,
    ) -> None:
        self.config = config
        # first: a coordinator that would serve without security stops before it touches anything
        self.identity, self.revocation = load_transport(config)
        self.metrics = CoordinatorMetrics()  # a registry of its own: coordinators in one process do not clash
        self.metrics_endpoint: Optional[MetricsEndpoint] = None
        self.ray_factory = None
        if aggregator_factory is None and config.aggregator == "ray":
            from tiesfed.coordinator.ray_factory import RayAggregatorFactory

            self.ray_factory = aggregator_factory = RayAggregatorFactory(
                ray_address=config.ray_address,
                num_shards=config.num_shards,
                num_gpus_per_actor=config.num_gpus_per_actor,
                num_cpus_per_actor=config.num_cpus_per_actor,
                max_restarts=config.max_restarts,
                actor_memory=config.actor_memory,
                on_rebuild=self.metrics.shards_rebuilt,
            )
        if aggregator_factory is None and config.aggregator == "spill":
            from tiesfed.coordinator.spill_aggregator import SpillAggregatorFactory

            aggregator_factory = SpillAggregatorFactory(Path(config.spool_dir) / "spill",
                                                        **({"memory_bytes": config.spill_memory}
                                                           if config.spill_memory else {}))
        # a factory that starts (Ray) starts in the background once the server listens: until
        # then uploads are spooled and the rounds' aggregators wait (`rounds.readiness`)
        self.starter = getattr(aggregator_factory, "start_background", None)
        self.readiness = AggregatorReadiness(ready=not callable(self.starter),
                                             what=getattr(aggregator_factory, "what", "aggregator"))
        self.started_aggregator = False
        self.manager = RoundManager(
            readiness=self.readiness,
            spool_dir=config.spool_dir,
            aggregator_factory=aggregator_factory,
            base_path=config.base_model,
            shard_bytes=config.shard_bytes,
            max_active_uploads=config.max_active_uploads,
            max_chunk_bytes=config.max_chunk_bytes,
            pending_buffer_bytes=config.pending_buffer_bytes,
            min_free_disk_bytes=config.min_free_disk_bytes,
            abandon_after_s=config.abandon_after_s,
            stall_after_s=config.stall_after_s,
            min_upload_rate=config.min_upload_rate,
            lease_s=config.lease_s,
            max_round_params=config.max_round_params or default_max_round_params(config.aggregator),
            signer=self.identity,  # signs each merge (merged.sig.json); None when insecure
            metrics=self.metrics,
            sum_dtype=config.sum_dtype,
            publish_first=config.publish_first,
        )
        # no unauthenticated admin: an admin certificate with TLS; insecure, a token given or one
        # made here (written to the spool at start)
        self.admin_token_generated = self.identity is None and config.admin_token is None
        self.admin_token: Optional[str] = None if self.identity is not None else (
            config.admin_token or generate_token())
        self.admin_token_file = Path(config.spool_dir) / ADMIN_TOKEN_FILE
        self.gate = stream_gate(config)
        self.server: Optional[grpc.Server] = None
        self.spool_lock = SpoolLock(config.spool_dir)  # one coordinator per spool
        self.port: Optional[int] = None

    @property
    def target(self) -> str:
        host = self.config.listen.rsplit(":", 1)[0]
        if host in ("", "0.0.0.0", "[::]"):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    def start(self) -> "CoordinatorServer":
        """Lock the spool (SpoolLockedError naming the holder if another coordinator has it),
        recover it, open the configured rounds, serve."""
        self.spool_lock.acquire()  # before recovery, which deletes half-received uploads
        try:
            self._serve_metrics()  # bound early: a taken port fails before Ray starts
            return self._start()
        except BaseException:
            self._stop_metrics()
            self.spool_lock.release()
            raise

    def _serve_metrics(self) -> None:
        """Publish the metrics over HTTP when `metrics_port` is set (0: a free port, logged)."""
        if self.config.metrics_port is not None and self.metrics_endpoint is None:
            self.metrics_endpoint = MetricsEndpoint(self.metrics.registry, self.config.metrics_host,
                                                    self.config.metrics_port)

    def _stop_metrics(self) -> None:
        endpoint, self.metrics_endpoint = self.metrics_endpoint, None
        if endpoint is not None:
            endpoint.stop()

    def _start(self) -> "CoordinatorServer":
        check_listen(self.config.listen)  # a taken port is one line naming it, before Ray starts
        recovered = self.manager.recover()  # folds once the aggregator is up
        if recovered:
            log.info("recovered round(s) from the spool: %s", ", ".join(recovered))
        for rc in self.config.rounds:
            if rc.round_id not in self.manager.rounds and rc.round_id not in self.manager.unrecovered:
                self.manager.open_round(rc)
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.config.max_workers, thread_name_prefix="tiesfed-rpc"),
            options=server_options(self.config.keepalive_ms),
        )
        if self.admin_token_generated:
            assert self.admin_token is not None
            write_token_file(self.config.spool_dir, self.admin_token)
        else:  # a token from an earlier start would mislead --admin-token-file
            self.admin_token_file.unlink(missing_ok=True)
        service = CoordinatorService(self.manager, self.admin_token, self.gate, tls=self.identity is not None,
                                     revocation=self.revocation)
        pb_grpc.add_CoordinatorServicer_to_server(service, server)
        self.secure = add_secure_aggregation(service, server, self.identity.ca_pem if self.identity else None)
        try:
            if self.identity is not None:
                port = server.add_secure_port(self.config.listen, server_credentials(self.identity))
            else:
                log.warning("INSECURE: plaintext on %s, client ids taken from metadata", self.config.listen)
                port = server.add_insecure_port(self.config.listen)
        except RuntimeError:  # gRPC raises "Failed to bind" (taken since check_listen)
            port = 0
        if port == 0:
            raise OSError(f"cannot listen on {self.config.listen}")
        server.start()
        self.server, self.port = server, port
        self.manager.start()
        log.info("coordinator listening on %s (%s, spool %s)%s", self.target,
                 "mutual TLS" if self.identity else "INSECURE", self.config.spool_dir,
                 f"; {self.readiness.what} starting in the background" if callable(self.starter) else "")
        if callable(self.starter):  # Ray: off the critical path, reported by `aggregator_started`
            self.started_aggregator = True
            self.manager.start_aggregator(self.starter)
        return self

    def wait_ready(self, timeout: Optional[float] = None) -> bool:
        """Block until the aggregator is up (True) or `timeout` (False); RoundError if it failed."""
        return self.readiness.wait_ready(timeout)

    def stop(self, grace: Optional[float] = 1.0) -> None:
        """Stop serving (open streams get `grace` seconds), then stop the rounds' ticker."""
        if self.server is not None:
            self.server.stop(grace).wait()
            self.server = None
        if self.started_aggregator:  # a start in progress ends first (its thread attaches the rounds)
            self.readiness.wait_settled()
        if getattr(self, "secure", None) is not None:  # secure rounds' phase drivers end with the server
            self.secure.stop()
        self.manager.stop()
        if self.ray_factory is not None:
            self.ray_factory.close()
        self._stop_metrics()
        self.spool_lock.release()

    def __enter__(self) -> "CoordinatorServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def tune_malloc(arena_max: Optional[int], mmap_threshold: Optional[int]) -> bool:
    """glibc's mallopt(M_ARENA_MAX) and mallopt(M_MMAP_THRESHOLD) (what MALLOC_ARENA_MAX and
    MALLOC_MMAP_THRESHOLD_ do) for a coordinator process; a no-op elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = True
        if arena_max:
            ok &= bool(libc.mallopt(-8, arena_max))  # M_ARENA_MAX
        if mmap_threshold is not None:
            ok &= bool(libc.mallopt(-3, mmap_threshold))  # M_MMAP_THRESHOLD
        return ok
    except (OSError, AttributeError):
        return False


def serve(
    config: CoordinatorConfig,
    *,
    port_file: Optional[str | Path] = None,
    exit_when_done: bool = False,
    linger_s: float = 300.0,
) -> None:
    """Run until SIGINT/SIGTERM. With `exit_when_done`, also stop once every round is
    finished and every participant of a finalized round has downloaded the merge
    (or `linger_s` seconds after the last round finished)."""
    stop = threading.Event()

    def on_signal(signum, frame):  # noqa: ARG001
        stop.set()

    tune_malloc(config.malloc_arena_max, config.malloc_mmap_threshold)
    srv = CoordinatorServer(config)  # checks the transport before anything starts
    if srv.identity is None:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    srv.start()
    # after start(): ray.init installs its own SIGTERM handler (sys.exit), ours must win
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    finished_at: Optional[float] = None
    try:
        if port_file:
            tmp = Path(str(port_file) + ".tmp")
            tmp.write_text(f"{srv.port}\n")
            tmp.replace(port_file)
        how = f"mutual TLS as {srv.identity.name}" if srv.identity is not None else "INSECURE"
        starting = f"; {srv.readiness.what} starting in the background" if not srv.readiness.ready else ""
        print(f"tiesfed coordinator listening on {srv.target} ({how}), spool {config.spool_dir}{starting}", flush=True)
        if srv.admin_token_generated:
            print(f"admin token (generated; also in {srv.admin_token_file}, mode 0600): {srv.admin_token}",
                  flush=True)
        while not stop.wait(0.5):
            if not exit_when_done:
                continue
            rounds = list(srv.manager.rounds.values())
            if not rounds or any(r.state not in ("finalized", "failed") for r in rounds):
                finished_at = None
                continue
            finished_at = finished_at or time.monotonic()
            fetched = all(r.state == "failed" or set(r.participants) <= r.downloaded for r in rounds)
            if fetched or time.monotonic() - finished_at > linger_s:
                break
    finally:
        srv.stop(grace=2.0)
        for s, h in old.items():
            signal.signal(s, h)
