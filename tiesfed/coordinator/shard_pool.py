"""The driver's side of the shard actors: `ShardPool` starts one `ShardActor` per
non-empty shard, routes folds to them, and rebuilds lost ones from the replay.
`sharded_aggregator.ShardedAggregator` adds the outputs (all-reduce, finalize).

Data path
  fold: the driver cuts a sorted sparse contribution by owner (`ShardPlan.split`,
  one searchsorted, no per-element Python) and sends each slice to its owner as
  the arguments of an async actor call: Ray stores each argument above 100 KB
  in the object store once, as a numpy array the actor maps without a copy
  (`to_wire`). Slices under `batch_bytes` are buffered per shard and shipped
  several to a call (`fold_many`, same order), since each call costs
  milliseconds of IPC on a busy host. At most `max_inflight` calls /
  `max_inflight_bytes` bytes stay outstanding; beyond that the driver waits for
  the oldest half, so uploads continue while actors fold. Each shard receives
  its slices in fold order, so even inexact (weighted) float64 sums round
  exactly as in `Aggregator`.

Recovery
  Actors are created with `max_restarts`; a restarted actor comes back empty
  with a new `generation()` uuid. Failed fold calls (actor died / unavailable)
  only mark their shard dirty: re-sending just that slice would be wrong (the
  new instance lost everything before it too), and rebuilding in the middle of
  a `fold` would double count whatever the replay already holds of it. At the
  barriers (`sign_balance`, `finalize`, `recover()`), after every outstanding
  call has finished, the driver compares generations; each restarted or dirty
  shard is reset to empty and re-folded from `replay()`: only the slices it
  owns, in replay order. So `replay()` must yield exactly the contributions
  passed to `fold` so far (the coordinator's durable spool), as
  ``(name, indices, values, weight)`` or ``(name, indices, values, weight,
  direction)``; folds from before a restart that are absent from the replay are
  lost (withdrawn ones may simply be left out). Unweighted sums are exact, so
  any replay order gives the same bits; with non-dyadic weights, replay in the
  original order for bit-identity. Without `replay`, a restart is an error at
  the next barrier. A restart during `finalize` (after the outputs were
  computed) is handled the same way: rebuild, recompute that shard, go on.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections import OrderedDict
from typing import Callable, Iterable, Optional, Union

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from tiesfed.coordinator.shard_actor import ShardActor, to_wire
from tiesfed.coordinator.shard_plan import (
    DEFAULT_MIN_ELEMS_PER_SHARD,
    ShardPlan,
    num_shards_for,
    plan_shards,
)
from tiesfed.core.accumulators import FinalizeSpec

__all__ = ["ReplayItem", "ShardLostError", "ShardPool"]

log = logging.getLogger(__name__)

ReplayItem = Union[
    tuple[str, torch.Tensor, torch.Tensor, float],
    tuple[str, torch.Tensor, torch.Tensor, float, int],
]

_INT32_MAX = 2**31 - 1



def init_ray(address: Optional[str] = None, log_to_driver: bool = True) -> None:
    """Join the cluster at `address`, or start a Ray of our own.

    Without an address Ray would join whatever `RAY_ADDRESS` or the last `ray
    start` on this machine names, a stranger's cluster; `address="local"` always
    starts a new instance, in a temp dir of its own (another user's /tmp/ray
    cannot clash with it). It binds loopback unless told otherwise.
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
        return
    ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=log_to_driver,
             _temp_dir=tempfile.mkdtemp(prefix="tiesfed-ray-"))

class ShardLostError(RuntimeError):
    """A shard's state is gone (actor restarted or dead) and cannot be rebuilt."""


class ShardPool:
    """Shard actors and the fold traffic to them, one actor per non-empty shard.

    manifest: (name, numel) in model order. num_shards: None picks one per GPU
    (GPUs present) or per CPU, capped so shards hold >= min_elems_per_shard
    (`shard_plan.num_shards_for`). Shards a plan leaves empty get no actor.
    replay: returns an iterator over every contribution folded so far (see the
    module docstring); needed to survive actor restarts.
    ray_address: used only if Ray is not initialized yet; with None a local Ray
    (num_cpus = os.cpu_count(), no dashboard) is started. Either way the
    Ray session is shut down by `close()` only if this object started it.
    memory_per_actor: bytes each actor asks Ray for (`memory=`; see `coordinator.memory`),
    so that Ray places it on a node with that much free; None asks for nothing.
    """

    def __init__(
        self,
        manifest: Iterable[tuple[str, int]],
        spec: FinalizeSpec,
        num_shards: Optional[int] = None,
        num_gpus_per_actor: float = 0.0,
        num_cpus_per_actor: float = 1.0,
        max_restarts: int = 3,
        replay: Optional[Callable[[], Iterable[ReplayItem]]] = None,
        ray_address: Optional[str] = None,
        *,
        scheduling_strategy: object = "SPREAD",
        resources: Optional[dict[str, float]] = None,
        min_elems_per_shard: int = DEFAULT_MIN_ELEMS_PER_SHARD,
        max_inflight: int = 64,
        max_inflight_bytes: int = 1 << 30,
        batch_bytes: int = 4 << 20,
        startup_timeout_s: float = 300.0,
        call_timeout_s: float = 600.0,
        on_rebuild: Optional[Callable[[int], None]] = None,
        memory_per_actor: Optional[int] = None,
    ) -> None:
        self.spec = spec
        self._on_rebuild = on_rebuild  # told how many shards each recovery rebuilt (the coordinator's metrics)
        self.manifest = [(str(n), int(k)) for n, k in manifest]
        self._replay = replay
        self._max_inflight = max(1, int(max_inflight))
        self._max_inflight_bytes = int(max_inflight_bytes)
        self._batch_bytes = int(batch_bytes)
        self._pending: dict[int, list] = {}
        self._pending_bytes: dict[int, int] = {}
        self._call_timeout = float(call_timeout_s)
        self._max_restarts = int(max_restarts)
        self._owns_ray = False
        self._actors: dict[int, "ray.actor.ActorHandle"] = {}
        self._closed = False
        self._spent = False  # the actors let their accumulators go (`write_model`): `reset` first
        if not ray.is_initialized():
            init_ray(ray_address)
            self._owns_ray = True
        try:
            total = sum(k for _, k in self.manifest)
            if num_shards is None:
                res = dict(ray.cluster_resources())
                if num_gpus_per_actor <= 0:
                    res.pop("GPU", None)  # CPU actors: one per CPU even where GPUs exist
                num_shards = num_shards_for(
                    res,
                    total,
                    min_elems_per_shard=min_elems_per_shard,
                    num_gpus_per_actor=num_gpus_per_actor if num_gpus_per_actor > 0 else 1.0,
                    num_cpus_per_actor=num_cpus_per_actor if num_cpus_per_actor > 0 else 1.0,
                )
            self.plan: ShardPlan = plan_shards(self.manifest, num_shards)
            self._idx_dtype = torch.int32 if max(self.plan.shard_sizes()) <= _INT32_MAX else torch.int64
            self._weight_totals: dict[str, float] = {n: 0.0 for n, _ in self.manifest}
            self._inflight: "OrderedDict[ray.ObjectRef, tuple[int, int]]" = OrderedDict()
            self._inflight_bytes = 0
            self._dirty: set[int] = set()
            self._stage_refs: dict[int, ray.ObjectRef] = {}  # ShardedAggregator.finalize's stage calls
            self._task_errors: list[BaseException] = []
            opts: dict = dict(
                num_cpus=num_cpus_per_actor,
                num_gpus=num_gpus_per_actor,
                max_restarts=max_restarts,
                max_task_retries=0,
            )
            if scheduling_strategy is not None:
                opts["scheduling_strategy"] = scheduling_strategy
            if resources:
                opts["resources"] = dict(resources)
            if memory_per_actor:
                opts["memory"] = int(memory_per_actor)  # Ray places the actor where this much is free
            for s in self.plan.nonempty_shards():
                self._actors[s] = ShardActor.options(**opts).remote(s, self.plan.shards[s], spec, None)
            refs = {s: a.generation.remote() for s, a in self._actors.items()}
            try:
                gens = ray.get(list(refs.values()), timeout=startup_timeout_s)
            except GetTimeoutError:
                mem = f", {opts['memory'] / (1 << 30):.2f} GiB memory" if opts.get("memory") else ""
                raise RuntimeError(
                    f"{len(self._actors)} shard actors ({opts['num_cpus']} CPU, {opts['num_gpus']} GPU{mem} each) "
                    f"did not start within {startup_timeout_s}s; cluster has {ray.cluster_resources()}"
                ) from None
            self._gen: dict[int, str] = dict(zip(refs.keys(), gens))
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ lifecycle
    @property
    def actors(self) -> dict[int, "ray.actor.ActorHandle"]:
        """shard id -> actor handle (non-empty shards only)."""
        return dict(self._actors)

    def close(self) -> None:
        """Kill the actors; shut Ray down if this object started it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for a in self._actors.values():
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        self._actors = {}
        self._inflight = OrderedDict()
        self._pending, self._pending_bytes = {}, {}
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("ShardedAggregator is closed")
        if self._spent:
            raise RuntimeError("ShardedAggregator has let its accumulators go (after write_model): build a new one")

    # ------------------------------------------------------------------ fold
    def fold(self, name: str, indices: torch.Tensor, values: torch.Tensor, weight: float = 1.0,
             direction: int = 1) -> None:
        """Fold one sparse contribution to tensor `name` (sorted unique flat
        indices, values), asynchronously. Input errors (unknown name, index out
        of range, bad direction) raise here; a failed actor call marks its
        shard for a rebuild at the next barrier instead."""
        self._check_open()
        if direction not in (1, -1):
            raise ValueError("direction must be +1 or -1")
        if direction == -1 and self.spec.needs_extrema:
            raise ValueError("disjoint max is not invertible: rebuild the accumulator instead")
        if name not in self.plan.sizes:
            raise KeyError(f"tensor {name!r} is not in the round's manifest")
        parts = self.plan.split(name, indices, values, index_dtype=self._idx_dtype)
        weight = float(weight)
        self._weight_totals[name] += direction * weight
        self._send(parts, weight, direction)

    def _send(self, parts: Iterable[tuple[int, torch.Tensor, torch.Tensor]], weight: float, direction: int,
              only: Optional[set[int]] = None) -> None:
        # Every Ray call with an object-store argument costs a few IPC round
        # trips (milliseconds on a busy host), so slices below `batch_bytes`
        # are buffered per shard and shipped together (`fold_many`, applied in
        # the same order). Tensors travel as call arguments: Ray stores each
        # argument above 100 KB in the object store once, smaller ones inline.
        for shard, li, v in parts:
            if only is not None and shard not in only:
                continue
            nbytes = li.numel() * li.element_size() + v.numel() * v.element_size()
            if nbytes >= self._batch_bytes:
                self._flush(shard)  # keep this shard's order
                ref = self._actors[shard].fold.remote(to_wire(li), to_wire(v), weight, direction)
                self._submit(shard, ref, nbytes)
            else:
                self._pending.setdefault(shard, []).append((to_wire(li), to_wire(v), weight, direction))
                self._pending_bytes[shard] = self._pending_bytes.get(shard, 0) + nbytes
                if self._pending_bytes[shard] >= self._batch_bytes:
                    self._flush(shard)
        # all of a contribution is submitted before any wait, so a wait never
        # leaves a contribution half-sent
        if len(self._inflight) > self._max_inflight or self._inflight_bytes > self._max_inflight_bytes:
            self._reap(max(1, len(self._inflight) // 2))

    def _submit(self, shard: int, ref: ray.ObjectRef, nbytes: int) -> None:
        self._inflight[ref] = (shard, nbytes)
        self._inflight_bytes += nbytes

    def _flush(self, shard: Optional[int] = None) -> None:
        """Ship buffered small slices (of one shard, or all)."""
        for s in [shard] if shard is not None else list(self._pending):
            items = self._pending.pop(s, None)
            nbytes = self._pending_bytes.pop(s, 0)
            if not items:
                continue
            if len(items) == 1:
                ref = self._actors[s].fold.remote(*items[0])
            else:
                ref = self._actors[s].fold_many.remote(items)
            self._submit(s, ref, nbytes)

    def _reap(self, n: Optional[int] = None) -> None:
        """Wait for `n` outstanding calls (default: flush the buffers, then all)
        and check their results.

        Failures never raise here: the shard is marked dirty and rebuilt from
        the replay at the next barrier (a fold that raised inside the actor may
        have half-updated its state; if it fails again in the replay, the
        barrier raises)."""
        if n is None:
            self._flush()
        if not self._inflight:
            return
        refs = list(self._inflight.keys())
        n = len(refs) if n is None else min(n, len(refs))
        ready, _ = ray.wait(refs, num_returns=n, timeout=self._call_timeout, fetch_local=False)
        if len(ready) < n:
            raise TimeoutError(f"shard actors did not finish {n} fold calls within {self._call_timeout}s")
        for ref in ready:
            shard, nbytes = self._inflight.pop(ref)
            self._inflight_bytes -= nbytes
            try:
                ray.get(ref)
            except RayActorError as e:  # died, restarting, unavailable: rebuild at the barrier
                log.warning("shard %d: fold call lost (%s); will rebuild from replay", shard, type(e).__name__)
                self._dirty.add(shard)
            except RayTaskError as e:  # the fold itself raised: state may be half-updated
                log.error("shard %d: fold failed: %s", shard, e)
                self._dirty.add(shard)
                self._task_errors.append(e)

    def flush(self) -> None:
        """Ship buffered slices and wait until every actor has applied every
        fold so far (no recovery: lost calls only mark their shard dirty)."""
        self._check_open()
        self._reap()

    # ------------------------------------------------------------------ recovery
    def _generations(self, shards: Iterable[int]) -> dict[int, str]:
        refs = {s: self._actors[s].generation.remote() for s in shards}
        out: dict[int, str] = {}
        for s, ref in refs.items():
            last: Optional[BaseException] = None
            for attempt in range(8):
                try:
                    out[s] = ray.get(ref, timeout=self._call_timeout)
                    break
                except RayActorError as e:  # a call in flight at the death fails; later ones wait
                    last = e
                    time.sleep(0.1 * (attempt + 1))
                    ref = self._actors[s].generation.remote()
            else:
                raise ShardLostError(f"shard {s}: actor is gone ({last})") from last
        return out

    def recover(self) -> list[int]:
        """Barrier: finish outstanding calls, then rebuild every restarted or
        dirty shard from `replay()`. Returns the shards rebuilt."""
        self._check_open()
        rebuilt: list[int] = []
        for _ in range(2 * (self._max_restarts + 2)):
            self._reap()
            gens = self._generations(self._actors)
            stale = sorted(s for s in self._actors if gens[s] != self._gen[s] or s in self._dirty)
            if not stale:
                return rebuilt
            if self._replay is None:
                why = f" (last fold error: {self._task_errors[-1]})" if self._task_errors else ""
                raise ShardLostError(
                    f"shards {stale} restarted or failed and lost their accumulators; no replay was given{why}")
            log.warning("rebuilding shards %s from replay", stale)
            # a restarted actor was re-created with the constructor's spec: pass the current one
            reset = {s: self._actors[s].reset.remote(self.spec) for s in stale}
            ok: set[int] = set()
            for s, ref in reset.items():
                try:
                    self._gen[s] = ray.get(ref, timeout=self._call_timeout)
                    self._dirty.discard(s)
                    ok.add(s)
                except RayActorError:
                    self._dirty.add(s)
            if ok:
                errors_before = len(self._task_errors)
                for item in self._replay():
                    name, idx, vals, w = item[0], item[1], item[2], float(item[3])
                    d = int(item[4]) if len(item) > 4 else 1
                    self._send(self.plan.split(name, idx, vals, index_dtype=self._idx_dtype), w, d, only=ok)
                self._reap()
                if len(self._task_errors) > errors_before:
                    err = self._task_errors[-1]
                    raise RuntimeError(f"folding the replay into shards {sorted(ok)} failed: {err}") from err
                rebuilt.extend(s for s in ok if s not in rebuilt)
                if self._on_rebuild is not None:
                    self._on_rebuild(len(ok))
        raise ShardLostError("shard actors keep restarting during recovery")

    def reset(self, spec: Optional[FinalizeSpec] = None) -> None:
        """Start a new round on the same actors (no actor start-up cost):
        outstanding calls finish, every shard is emptied, optionally switching
        to another FinalizeSpec. From here on `replay()` must yield only the
        contributions folded after this call."""
        self._spent = False  # every shard gets fresh accumulators below
        self._check_open()
        self._pending, self._pending_bytes = {}, {}  # unsent folds of the old round
        self._reap()  # failures of the old round no longer matter: every shard is emptied
        if spec is not None:
            self.spec = spec
        self._weight_totals = {n: 0.0 for n, _ in self.manifest}
        self._stage_refs = {}
        self._task_errors = []
        refs = {s: a.reset.remote(self.spec) for s, a in self._actors.items()}
        for s, ref in refs.items():
            try:
                self._gen[s] = ray.get(ref, timeout=self._call_timeout)
                self._dirty.discard(s)
            except RayActorError:
                self._dirty.add(s)  # restarting: the next barrier resets it (empty replay is fine)

