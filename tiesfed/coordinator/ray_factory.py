"""The coordinator's default aggregator: one ShardedAggregator per round, all on
one Ray session that the coordinator starts (embedded default) or joins
(`--ray-address`, a cluster started with `ray start`).

A coordinator starts Ray in the background (`start_background`), so that it listens
at once. Ray ties the processes it starts (GCS, raylet) to the *thread* that
started them (PR_SET_PDEATHSIG), so that thread stays alive, parked, until `close`
and shuts Ray down itself.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterable, Optional

from tiesfed.coordinator.memory import (
    actor_bytes,
    check_cluster,
    default_actor_memory,
    shards_for_budget,
)
from tiesfed.coordinator.ray_shards import ReplayItem, ShardedAggregator
from tiesfed.coordinator.shard_plan import num_shards_for
from tiesfed.coordinator.shard_pool import init_ray
from tiesfed.core.accumulators import FinalizeSpec

log = logging.getLogger("tiesfed.coordinator")

#: Tries at starting Ray in the background, `START_BACKOFF_S` × the attempt apart: on an
#: overloaded host its start can time out once and succeed the next time.
START_ATTEMPTS = 3
START_BACKOFF_S = 5.0


@dataclass
class RayAggregatorFactory:
    """Callable `(manifest, spec, replay=None) -> ShardedAggregator`.

    num_shards None: one per GPU (with GPU actors) or per CPU of the cluster,
    capped so that shards are not tiny (`default_shards`); then raised, whatever the
    rule gave, until each actor's accumulators fit `actor_memory` bytes (None: sized
    from the cluster, `memory.default_actor_memory`). CPU actors ask Ray for the memory
    they will hold (`memory=`), so Ray places them where it is; a round the cluster
    cannot hold is refused with the numbers (`memory.MemoryBudgetError`). Actors ask
    for a fraction of a CPU by default so that several rounds can be open at once on a
    small machine, less where the memory budget asks for more actors than CPUs.
    """

    ray_address: Optional[str] = None
    num_shards: Optional[int] = None
    num_gpus_per_actor: float = 0.0
    num_cpus_per_actor: float = 0.5
    max_restarts: int = 3
    #: per-actor memory budget in bytes (None: from the cluster)
    actor_memory: Optional[int] = None
    #: told how many shard actors each recovery rebuilt (the coordinator's restart counter)
    on_rebuild: Optional[Callable[[int], None]] = None
    what: ClassVar[str] = "Ray"  # in status messages
    _owns_ray: bool = field(default=False, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _owner: Optional[threading.Thread] = field(default=None, init=False, repr=False)
    _release: threading.Event = field(default_factory=threading.Event, init=False, repr=False)

    def start(self) -> None:
        """Start a local Ray, or join `ray_address`; idempotent, and a caller arriving
        while another thread starts it waits for that start."""
        import ray

        with self._lock:
            if ray.is_initialized():
                return
            init_ray(self.ray_address, log_to_driver=False)
            self._owns_ray = True
        log.info("Ray %s: %s", "joined at " + self.ray_address if self.ray_address else "started locally",
                 ray.cluster_resources())

    def start_background(self, done: Callable[[Optional[BaseException]], None]) -> None:
        """`start()` on a thread of its own (`START_ATTEMPTS` tries), then `done(None)` (or
        `done(error)`) on it.
        Ray already up: at once, on this thread. The thread then stays parked until
        `close`, which has it shut Ray down (see the module)."""
        import ray

        if ray.is_initialized():
            done(None)
            return

        def run() -> None:
            for attempt in range(1, START_ATTEMPTS + 1):
                try:
                    self.start()
                    break
                except Exception as e:  # e.g. "the node timed out during startup" on an overloaded host
                    if attempt == START_ATTEMPTS:
                        done(e)  # reported, not raised: the coordinator serves on and says so
                        return
                    log.warning("Ray did not start (attempt %d of %d): %s; trying again in %g s", attempt,
                                START_ATTEMPTS, e, START_BACKOFF_S * attempt)
                    self._abandon()
                    time.sleep(START_BACKOFF_S * attempt)
                except BaseException as e:
                    done(e)
                    return
            try:
                done(None)
            finally:
                self._release.wait()
                self._shutdown()

        self._owner = threading.Thread(target=run, name="ray-owner", daemon=True)
        self._owner.start()

    def __call__(
        self,
        manifest: list[tuple[str, int]],
        spec: FinalizeSpec,
        replay: Optional[Callable[[], Iterable[ReplayItem]]] = None,
    ) -> ShardedAggregator:
        self.start()
        num_shards, cpus_each, memory = self.layout(manifest, spec)
        return ShardedAggregator(
            manifest,
            spec,
            num_shards=num_shards,
            num_gpus_per_actor=self.num_gpus_per_actor,
            num_cpus_per_actor=cpus_each,
            max_restarts=self.max_restarts,
            replay=replay,
            on_rebuild=self.on_rebuild,
            memory_per_actor=memory,
        )

    def layout(self, manifest: list[tuple[str, int]], spec: FinalizeSpec) -> tuple[int, float, Optional[int]]:
        """(shards, CPUs per actor, bytes of memory per actor or None) for a round: the
        count rule, raised to fit the memory budget, checked against the cluster."""
        import ray

        cluster = dict(ray.cluster_resources())
        total = sum(n for _, n in manifest)
        rule = self.num_shards or self.default_shards(manifest) or num_shards_for(
            cluster, total, num_gpus_per_actor=self.num_gpus_per_actor)
        budget = self.actor_memory or default_actor_memory(cluster)
        need = shards_for_budget(total, spec, budget)
        shards = max(rule, min(need, max(1, total)))
        if shards > rule:
            log.info("%d shard actors (not %d): %s parameters at %d bytes each fit a budget of %.2f GiB an actor",
                     shards, rule, f"{total:,}", spec.bytes_per_param(), budget / (1 << 30))
        cpus = float(cluster.get("CPU", 0) or 0)
        cpus_each = self.num_cpus_per_actor
        if self.num_gpus_per_actor <= 0 and cpus > 0 and shards * cpus_each > cpus:
            cpus_each = max(0.0001, int(cpus / shards * 10_000) / 10_000)  # Ray's resource precision
        if self.num_gpus_per_actor > 0:
            return shards, cpus_each, None  # the accumulators live in GPU memory, not the host's
        per_actor = actor_bytes(-(-total // shards), spec)
        check_cluster(shards, per_actor, dict(ray.available_resources()), total, spec, budget)
        return shards, cpus_each, per_actor

    def default_shards(self, manifest: list[tuple[str, int]]) -> Optional[int]:
        """CPU actors: one per CPU of the cluster (not one per `num_cpus_per_actor`, which
        is what an actor reserves), capped so that shards are not tiny; each is a process
        that takes seconds of CPU to start, and folds no faster for sharing a core. GPU
        actors: None (the pool's one per GPU)."""
        if self.num_gpus_per_actor > 0:
            return None
        import ray

        cpus = {k: v for k, v in ray.cluster_resources().items() if k != "GPU"}
        return num_shards_for(cpus, sum(n for _, n in manifest), num_cpus_per_actor=1.0)

    def close(self) -> None:
        """Shut Ray down if this factory started it (on the thread that started it, after
        a start still in progress has ended)."""
        owner, self._owner = self._owner, None
        if owner is not None:
            self._release.set()
            owner.join()
        self._shutdown()

    def _abandon(self) -> None:
        """What a failed start left behind goes (a start is then tried afresh)."""
        import ray

        try:
            ray.shutdown()
        except Exception:
            log.debug("ray.shutdown after a failed start", exc_info=True)

    def _shutdown(self) -> None:
        with self._lock:
            if self._owns_ray:
                import ray

                ray.shutdown()
                self._owns_ray = False
