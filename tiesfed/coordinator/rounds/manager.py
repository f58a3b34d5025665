"""Every round of one coordinator: the spool they live in, the base they merge onto,
the upload slots (and their leases) that bound memory, and the ticker.

At most `max_active_uploads` streams are read at once, whatever the number of
clients (`slots.UploadSlots`: leases, first come first served, one slot per
client id, progress counted in bytes). A round's size is checked against
`max_round_params` before anything is allocated or written.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from tiesfed.coordinator.metrics import NO_METRICS, Metrics
from tiesfed.coordinator.rounds.aggregation import AggregatorFactory, default_aggregator_factory
from tiesfed.coordinator.rounds.config import DEFAULT_MAX_ROUND_PARAMS, RoundConfig, TensorEntry
from tiesfed.coordinator.rounds.events import RoundError
from tiesfed.coordinator.rounds.finalize import maybe_finalize
from tiesfed.coordinator.rounds.readiness import AggregatorReadiness, attach
from tiesfed.coordinator.rounds.round import Round
from tiesfed.coordinator.rounds.slots import UploadSlots
from tiesfed.coordinator.spool import RoundSpool, iter_round_dirs
from tiesfed.io.model_io import DEFAULT_SHARD_BYTES, mergeable
from tiesfed.protos.v1 import MAX_CHUNK_BYTES
from tiesfed.trust import Identity

log = logging.getLogger("tiesfed.coordinator")


class RoundManager:
    """Every round of one coordinator, its spool, upload slots and the ticker."""

    def __init__(
        self,
        spool_dir: str | Path,
        *,
        aggregator_factory: Optional[AggregatorFactory] = None,
        base_path: Optional[str] = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        max_active_uploads: int = 2,
        max_chunk_bytes: int = MAX_CHUNK_BYTES,
        pending_buffer_bytes: int = 1 << 30,
        min_free_disk_bytes: int = 0,
        abandon_after_s: float = 300.0,
        stall_after_s: float = 120.0,
        min_upload_rate: float = float(1 << 20),
        lease_s: float = 30.0,
        max_round_params: Optional[int] = None,
        tick_s: float = 0.2,
        clock: Callable[[], float] = time.time,
        signer: Optional[Identity] = None,
        metrics: Metrics = NO_METRICS,
        readiness: Optional[AggregatorReadiness] = None,
        sum_dtype: str = "float64",
        publish_first: bool = False,
    ) -> None:
        self.spool_dir = Path(spool_dir)
        self.metrics = metrics  # handed to every round; slot waits are reported here
        #: not ready while the factory starts in the background (`aggregator_started` ends it)
        self.readiness = readiness or AggregatorReadiness(ready=True)
        metrics.aggregator(self.readiness.state)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.factory = aggregator_factory or default_aggregator_factory
        self.base_path = base_path
        self.clock = clock
        self.tick_s = tick_s
        self.max_chunk_bytes = max_chunk_bytes
        self.max_round_params = max_round_params or DEFAULT_MAX_ROUND_PARAMS
        self.slots = UploadSlots(max_active_uploads, stall_after_s, lease_s, min_upload_rate)
        self.lease_s = lease_s
        self._round_kw = dict(
            base_path=base_path, shard_bytes=shard_bytes, max_chunk_bytes=max_chunk_bytes,
            pending_buffer_bytes=pending_buffer_bytes, min_free_disk_bytes=min_free_disk_bytes,
            abandon_after_s=abandon_after_s, clock=clock, signer=signer, metrics=metrics,
            readiness=self.readiness, sum_dtype=sum_dtype, publish_first=publish_first,
        )
        self.rounds: dict[str, Round] = {}
        self.unrecovered: dict[str, str] = {}  # round id -> why its spool folder could not be loaded
        self.lock = threading.Lock()
        self._base_fp: Optional[str] = None
        self._stop = threading.Event()
        self._ticker: Optional[threading.Thread] = None
        self._start_launched = False  # `start_aggregator` was called
        self._on_tick: list[Callable[[], object]] = []  # more watchdogs the ticker runs (`on_tick`)

    def recover(self) -> list[str]:
        """Load every round found in the spool."""
        found = []
        for sp in iter_round_dirs(self.spool_dir):
            if sp.round_id in self.rounds:
                continue
            try:  # one damaged round must not keep the others (or the coordinator) down
                r = Round.recover(sp, self.factory, **self._round_kw)
            except Exception as e:
                log.error("round %s not recovered, its files are left as they are: %s", sp.round_id, e,
                          exc_info=not isinstance(e, ValueError))
                self.unrecovered[sp.round_id] = str(e)
                continue
            with self.lock:
                self.rounds[r.id] = r
                late = r.agg_pending and self.readiness.ready  # the aggregator came up meanwhile
            if late:
                self.attach(r)
            found.append(r.id)
        return found

    def aggregator_started(self, error: Optional[BaseException] = None) -> None:
        """The factory's background start ended (`error`: how it failed): give every round
        waiting for it its aggregator, folding what it received meanwhile; or say why not."""
        took = time.monotonic() - self.readiness.started
        if error is not None:
            self.readiness.set_failed(f"{type(error).__name__}: {error}")
            self.metrics.aggregator("failed")
            log.error("%s", self.readiness.note(), extra={"seconds": round(took, 3)})
            return
        with self.lock:  # rounds opened from here on build their aggregator at once
            self.readiness.set_ready()
            rounds = list(self.rounds.values())
        self.metrics.aggregator("ready")
        log.info("aggregator (%s) ready after %.1f s", self.readiness.what, took, extra={"seconds": round(took, 3)})
        for r in rounds:
            self.attach(r)

    def attach(self, r: Round) -> None:
        """`readiness.attach` for one round, then finalize it if it is due. A failure is
        the round's alone: it stays pending, and its status says why."""
        try:
            attach(r)
        except Exception as e:
            log.exception("round %s: building its aggregator failed", r.id)
            with r.lock:
                r.agg_error = f"{type(e).__name__}: {e}"
            return
        with r.lock:
            maybe_finalize(r)

    def _base_info(self, keep_base: tuple[str, ...]) -> tuple[Optional[str], Optional[list[TensorEntry]]]:
        if not self.base_path:
            return None, None
        from tiesfed.io.model_io import DTYPE_TO_ST, ModelReader, fingerprint

        with ModelReader(self.base_path) as base:
            if self._base_fp is None:
                self._base_fp = fingerprint(base)
            manifest = [
                TensorEntry(name=t.name, shape=tuple(t.shape), dtype=DTYPE_TO_ST[t.dtype])
                for t in mergeable(base.manifest(), keep_base)
            ]
        return self._base_fp, manifest

    def start_aggregator(self, starter: Callable[[Callable[[Optional[BaseException]], None]], None]) -> None:
        """Have `starter` (a factory's `start_background`) start the aggregator, reporting to
        `aggregator_started`. Rounds recovered or opened before wait for it, receiving meanwhile."""
        self._start_launched = True
        starter(self.aggregator_started)

    def open_round(self, config: RoundConfig) -> Round:
        """Open a round (RoundError ALREADY_EXISTS if its id is taken). While the aggregator
        starts, this waits for it: the round's aggregator is built here, at once, as before
        the coordinator started it in the background (UNAVAILABLE if that start failed)."""
        if self._start_launched:
            self.readiness.wait_settled()
            self.readiness.check()
        with self.lock:
            if config.round_id in self.rounds or RoundSpool(self.spool_dir, config.round_id).exists():
                raise RoundError("ALREADY_EXISTS", f"round {config.round_id!r} already exists")
            need_base = config.base_fingerprint is None or config.manifest is None
            fp, manifest = self._base_info(config.options.keep_base) if need_base else (None, None)
            cfg = config.resolved(self.clock(), fp, manifest, self.max_round_params)
            r = Round.create(cfg, RoundSpool(self.spool_dir, cfg.round_id), self.factory, **self._round_kw)
            self.rounds[r.id] = r
            return r

    def check_known_client(self, client_id: str) -> None:
        """Only participants of some round may queue for an upload slot."""
        with self.lock:
            known = any(client_id in r.participants for r in self.rounds.values())
        if not known:
            raise RoundError("PERMISSION_DENIED", f"client {client_id!r} is not on the allowlist of any round")

    def reserve_upload(self, client_id: str, round_id: str, wait_s: float) -> Optional[str]:
        """Wait up to `wait_s` for an upload slot to upload to `round_id`; a lease on it (or None).

        The client then opens its Upload stream with the lease: a client waiting
        for its turn holds no stream, so gRPC buffers nothing for it. A client
        holding a lease gets the same lease again, never a second slot."""
        self.get(round_id).check_participant(client_id)
        started = time.monotonic()
        lease = self.slots.reserve(client_id, wait_s)
        self.metrics.slot_wait("reserve", time.monotonic() - started, lease is not None)
        return lease

    @contextmanager
    def upload_slot(
        self, client_id: str, cancel: Callable[[], object], alive: Optional[Callable[[], bool]] = None
    ) -> Iterator[Callable[[int], None]]:
        """Hold one of the `max_active_uploads` slots for an upload stream: the client's lease
        if it holds one (leases are per client id), else the next free one. Yields
        `progress(nbytes)` to call per chunk; a holder without new bytes for
        `stall_after_s` is cancelled by the ticker."""
        started = time.monotonic()
        granted = False
        try:
            with self.slots.hold(client_id, cancel, alive or (lambda: True)) as progress:
                granted = True
                self.metrics.slot_wait("stream", time.monotonic() - started, True)
                yield progress
        finally:
            if not granted:
                self.metrics.slot_wait("stream", time.monotonic() - started, False)

    def get(self, round_id: str) -> Round:
        with self.lock:
            r = self.rounds.get(round_id)
        if r is None:
            if round_id in self.unrecovered:
                raise RoundError("DATA_LOSS", f"round {round_id!r} could not be recovered from the spool: "
                                 f"{self.unrecovered[round_id]}")
            raise RoundError("NOT_FOUND", f"no round {round_id!r} on this coordinator")
        return r

    def start(self) -> None:
        if self._ticker is None:
            self._ticker = threading.Thread(target=self._tick_loop, name="rounds-ticker", daemon=True)
            self._ticker.start()

    def on_tick(self, watchdog: Callable[[], object]) -> None:
        """Have the ticker also run `watchdog` (e.g. the service's stalled downloads)."""
        self._on_tick.append(watchdog)

    def _tick_loop(self) -> None:
        while not self._stop.wait(self.tick_s):
            self.slots.cancel_stalled()
            self.slots.expire_leases()
            for watchdog in self._on_tick:
                try:
                    watchdog()
                except Exception:
                    log.exception("a watchdog failed")
            with self.lock:
                rounds = list(self.rounds.values())
            for r in rounds:
                try:
                    r.tick()
                except Exception:  # keep ticking the other rounds
                    log.exception("round %s: tick failed", r.id)

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout)
            self._ticker = None
        with self.lock:
            rounds = list(self.rounds.values())
        for r in rounds:
            t = r._finalizer
            if t is not None:
                t.join(timeout)
