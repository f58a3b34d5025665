"""The coordinator's memory, stated and bounded (pure arithmetic: no Ray, no I/O).

A round's accumulators are resident: `FinalizeSpec.bytes_per_param` bytes for each
parameter (24 with the defaults: float64 S⁺ and S⁻, int32 C⁺ and C⁻), split over
the shard actors. An actor also keeps its range's float32 output between `stage` and
`take` (4 bytes a parameter) and has a floor of its own (the Python process, torch,
the Ray worker, fold and finalize temporaries, which the actor keeps to fixed-size
chunks). So an actor holding n parameters needs about

    ACTOR_BASE_BYTES + n × (bytes_per_param + 4)

and a per-actor budget B gives at least ceil(N × (bytes_per_param + 4) / (B − ACTOR_BASE_BYTES))
shards for a round of N parameters. `check_cluster` says, with the numbers, when the
cluster's memory cannot hold them.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import torch

from tiesfed.core.accumulators import FinalizeSpec

__all__ = [
    "ACTOR_BASE_BYTES",
    "DEFAULT_ACTOR_MEMORY",
    "MemoryBudgetError",
    "SUM_DTYPES",
    "parse_bytes",
    "actor_bytes",
    "actor_bytes_per_param",
    "check_cluster",
    "default_actor_memory",
    "shards_for_budget",
    "sum_dtype_of",
]

GiB = 1 << 30
#: An actor's own floor: the worker process with torch and Ray loaded (~300 MiB measured
#: here) plus its fold and finalize temporaries (bounded by the actor's chunking).
ACTOR_BASE_BYTES = 512 << 20
#: The per-actor budget when none is given and the cluster reports no memory.
DEFAULT_ACTOR_MEMORY = 4 * GiB
#: Bytes a parameter of staged output (float32) takes in an actor until the driver takes it.
STAGED_BYTES_PER_PARAM = 4


#: The accumulator sum dtypes a coordinator offers (`sum_dtype`): float64 is exact, float32 half the bytes.
SUM_DTYPES = {"float64": torch.float64, "float32": torch.float32}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(value: int | float | str) -> int:
    """A byte count: a number, or a string with a unit (3GB, 2.5GiB, 500MB). ValueError if not."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, (int, float)):
        n = float(value)
    else:
        t = str(value).strip().upper().replace(" ", "")
        num = t.rstrip("KMGTIB")
        try:
            n = float(num) * _UNITS[t[len(num):]]
        except (ValueError, KeyError):
            raise ValueError(f"not a size: {value!r} (e.g. 3GB, 2.5GiB, 500MB)") from None
    if not math.isfinite(n) or n <= 0:
        raise ValueError(f"a size must be positive, got {value!r}")
    return int(n)


def sum_dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a `sum_dtype` setting (ValueError naming the choices)."""
    try:
        return SUM_DTYPES[name]
    except KeyError:
        raise ValueError(f"sum_dtype {name!r}: use one of {', '.join(SUM_DTYPES)}") from None


class MemoryBudgetError(ValueError):
    """A round's accumulators do not fit the per-actor budget or the cluster."""


def actor_bytes_per_param(spec: FinalizeSpec) -> int:
    """Resident bytes a shard actor needs per parameter it holds: accumulators and staged output."""
    return spec.bytes_per_param() + STAGED_BYTES_PER_PARAM


def actor_bytes(numel: int, spec: FinalizeSpec) -> int:
    """Peak memory of an actor holding `numel` parameters (what it asks Ray for)."""
    return ACTOR_BASE_BYTES + numel * actor_bytes_per_param(spec)


def shards_for_budget(total: int, spec: FinalizeSpec, budget: int) -> int:
    """Fewest shards whose actors each stay within `budget` bytes for a round of `total` parameters."""
    usable = budget - ACTOR_BASE_BYTES
    if usable <= 0:
        raise MemoryBudgetError(
            f"a per-actor memory budget of {budget / GiB:.2f} GiB leaves nothing for accumulators: an actor "
            f"takes about {ACTOR_BASE_BYTES / GiB:.2f} GiB of its own; give more than that")
    return max(1, math.ceil(total * actor_bytes_per_param(spec) / usable))


def default_actor_memory(cluster: Mapping[str, float]) -> int:
    """A budget sized from the cluster: its memory over its CPUs (one actor per CPU),
    at most `DEFAULT_ACTOR_MEMORY`, at least twice an actor's floor."""
    mem, cpus = float(cluster.get("memory", 0) or 0), float(cluster.get("CPU", 0) or 0)
    if mem <= 0:
        return DEFAULT_ACTOR_MEMORY
    per_cpu = int(mem / max(1.0, cpus))
    return max(2 * ACTOR_BASE_BYTES, min(DEFAULT_ACTOR_MEMORY, per_cpu))


def check_cluster(num_shards: int, per_actor: int, cluster: Mapping[str, float], total: int,
                  spec: FinalizeSpec, budget: Optional[int] = None) -> None:
    """MemoryBudgetError, with the numbers, when `num_shards` actors of `per_actor` bytes
    each exceed the cluster's memory (Ray's `memory` resource)."""
    mem = float(cluster.get("memory", 0) or 0)
    need = num_shards * per_actor
    if mem > 0 and need > mem:
        why = f" at a budget of {budget / GiB:.2f} GiB per actor" if budget else ""
        raise MemoryBudgetError(
            f"the round's accumulators do not fit the Ray cluster: {total:,} parameters × "
            f"{actor_bytes_per_param(spec)} bytes (accumulators {spec.bytes_per_param()} + staged output "
            f"{STAGED_BYTES_PER_PARAM}) in {num_shards} shard actor(s){why} need {need / GiB:.2f} GiB "
            f"({per_actor / GiB:.2f} GiB each), the cluster offers {mem / GiB:.2f} GiB of memory: add nodes, "
            "use sum_dtype float32 (smaller sums), use --aggregator spill (accumulators a block at a time, "
            "folds spilled to disk: memory flat in the model size), or give the coordinator fewer parameters "
            "per round")
