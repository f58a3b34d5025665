"""The coordinator's default aggregator: one ShardedAggregator per round, all on
one Ray session that the coordinator starts (embedded default) or joins
(`--ray-address`, a cluster started with `ray start`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from tiesfed.coordinator.ray_shards import ReplayItem, ShardedAggregator
from tiesfed.coordinator.shard_pool import init_ray
from tiesfed.core.accumulators import FinalizeSpec

log = logging.getLogger("tiesfed.coordinator")


@dataclass
class RayAggregatorFactory:
    """Callable `(manifest, spec, replay=None) -> ShardedAggregator`.

    num_shards None: one per GPU (with GPU actors) or per CPU of the cluster,
    capped so that shards are not tiny. Actors ask for a fraction of a CPU by
    default so that several rounds can be open at once on a small machine.
    """

    ray_address: Optional[str] = None
    num_shards: Optional[int] = None
    num_gpus_per_actor: float = 0.0
    num_cpus_per_actor: float = 0.5
    max_restarts: int = 3
    #: told how many shard actors each recovery rebuilt (the coordinator's restart counter)
    on_rebuild: Optional[Callable[[int], None]] = None
    _owns_ray: bool = field(default=False, init=False)

    def start(self) -> None:
        """Start a local Ray, or join `ray_address`; idempotent."""
        import ray

        if ray.is_initialized():
            return
        init_ray(self.ray_address, log_to_driver=False)
        self._owns_ray = True
        log.info("Ray %s: %s", "joined at " + self.ray_address if self.ray_address else "started locally",
                 ray.cluster_resources())

    def __call__(
        self,
        manifest: list[tuple[str, int]],
        spec: FinalizeSpec,
        replay: Optional[Callable[[], Iterable[ReplayItem]]] = None,
    ) -> ShardedAggregator:
        self.start()
        return ShardedAggregator(
            manifest,
            spec,
            num_shards=self.num_shards,
            num_gpus_per_actor=self.num_gpus_per_actor,
            num_cpus_per_actor=self.num_cpus_per_actor,
            max_restarts=self.max_restarts,
            replay=replay,
            on_rebuild=self.on_rebuild,
        )

    def close(self) -> None:
        """Shut Ray down if this factory started it."""
        if self._owns_ray:
            import ray

            ray.shutdown()
            self._owns_ray = False
