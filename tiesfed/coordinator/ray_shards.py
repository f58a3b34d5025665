"""The Ray-sharded aggregator's public names, in one place.

Kept so that existing imports (`ray_factory`, tests, benchmarks) stay valid; the
code lives in `shard_actor` (the actor and its wire format), `shard_pool` (actor
start-up, fold routing and batching, replay on actor loss) and
`sharded_aggregator` (all-reduce, parallel finalize, parallel model write).
"""

from __future__ import annotations

from tiesfed.coordinator.shard_actor import ShardActor, ShardActorLocal, Wire, from_wire, to_wire
from tiesfed.coordinator.shard_pool import ReplayItem, ShardLostError, ShardPool
from tiesfed.coordinator.sharded_aggregator import ShardedAggregator

__all__ = [
    "ReplayItem",
    "ShardActor",
    "ShardActorLocal",
    "ShardLostError",
    "ShardPool",
    "ShardedAggregator",
    "Wire",
    "from_wire",
    "to_wire",
]
