"""The parameter space sharded over Ray actors: `ShardedAggregator`.

Same four methods as `tiesfed.coordinator.aggregator.Aggregator` (fold, sign_balance,
finalize, merged), with each shard's accumulators living in one `ShardActor`
(on a GPU when the actor was given one). Every actor runs the very same pure
functions of `tiesfed.core.accumulators` on its flat range, element by element,
so the result is bit-identical to the single-process aggregator. Actor start-up,
fold routing and recovery are `shard_pool.ShardPool`'s; this module adds the
outputs.

Data path
  sign_balance: the one scalar all-reduce (a sum of per-actor ints).
  finalize: every actor computes its range in parallel (elementwise, in 1M
  element chunks) and keeps the float32 result; the driver pulls shard outputs
  in order (one shard ahead, prefetched) and yields tensors in manifest order,
  one at a time, each a fresh writable tensor (`finalize_views`: read-only views
  where a tensor lies in one shard). The driver so holds at most two shard
  outputs (4 bytes a parameter of a shard each) and one tensor.
  write_model: with the base on a shared filesystem, the actors write the full
  merged model's safetensors files in parallel.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import ray
import torch
from ray.exceptions import RayActorError

from tiesfed.coordinator.shard_actor import from_wire
from tiesfed.coordinator.shard_pool import ShardLostError, ShardPool
from tiesfed.core.accumulators import majority_sign
from tiesfed.core.apply import dense_to_sparse
from tiesfed.protos.codec import SparseTensor

__all__ = ["ShardedAggregator", "ShardLostError"]

log = logging.getLogger(__name__)


class ShardedAggregator(ShardPool):
    """`Aggregator`'s interface over Ray actors, one per non-empty shard
    (constructor arguments: `ShardPool`)."""

    def __enter__(self) -> "ShardedAggregator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ election
    def sign_balance(self) -> int:
        """Σ_p γ_p over the whole model (the one scalar all-reduce)."""
        self._check_open()
        if self.spec.combine != "disjoint":
            return 0
        for _ in range(self._max_restarts + 2):
            self.recover()
            refs = {s: a.sign_balance.remote() for s, a in self._actors.items()}
            try:
                return int(sum(ray.get(list(refs.values()), timeout=self._call_timeout)))
            except RayActorError:
                continue
        raise ShardLostError("shard actors keep restarting")

    def exact(self) -> bool:
        """Every actor's sums so far were exact (a barrier: outstanding folds first)."""
        self._check_open()
        for _ in range(self._max_restarts + 2):
            self.recover()
            refs = [a.exact.remote() for a in self._actors.values()]
            try:
                return all(ray.get(refs, timeout=self._call_timeout))
            except RayActorError:
                continue
        raise ShardLostError("shard actors keep restarting")

    def _stage(self, shards: Iterable[int], majority: int) -> None:
        for s in shards:
            wt = None
            if self.spec.combine == "average":
                wt = {p.tensor: self._weight_totals[p.tensor] for p in self.plan.shards[s]}
            self._stage_refs[s] = self._actors[s].stage.remote(majority, wt)

    def finalize(self, majority: int) -> Iterator[tuple[str, torch.Tensor]]:
        """Compute every shard's output in parallel, then yield (name, τ_m
        flat float32 CPU) in manifest order, one tensor at a time."""
        self._check_open()
        self.recover()
        self._stage(self._actors, majority)  # results come back through `take`
        return self._assemble(majority)

    def finalize_views(self, majority: int) -> Iterator[tuple[str, torch.Tensor]]:
        """`finalize`, for a reader that does not write to the tensors: a tensor that lies
        within one shard comes as a read-only view of that shard's output, not a copy
        (a 262M-element embedding is 1 GiB less in this process). A view is valid
        until the next one is taken."""
        self._check_open()
        self.recover()
        self._stage(self._actors, majority)
        return self._assemble(majority, copy=False)

    def merged(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Election's all-reduce then the disjoint merge, tensor by tensor."""
        return self.finalize(majority_sign(self.sign_balance()))

    def write_model(self, base_path: str, merged_path: str, out_dir: str | Path, shard_bytes: int,
                    metadata: dict[str, str]) -> list[Path]:
        """The full merged model, written by the shard actors in parallel: the base's
        tensors are packed in order into output shards (at most `shard_bytes`, and at
        least one per actor when the model is big enough) and each actor writes some.
        Needs the base and the spool on a filesystem every actor's node can read.
        The actors first let their accumulators go (the merged stream holds the result),
        so an actor's peak is its accumulators or its share of the write, not both;
        the aggregator is then spent: a later fold or finalize needs a new one."""
        from tiesfed.io.model_io import INDEX_FILE, ModelReader, pack_shards, shard_name

        self._check_open()
        self._reap()  # nothing is in flight into the state about to go
        ray.get([a.release_state.remote() for a in self._actors.values()], timeout=self._call_timeout)
        self._spent = True
        with ModelReader(base_path) as base:
            infos = base.manifest()
        total = sum(t.nbytes for t in infos)
        groups = pack_shards(infos, max(1, min(shard_bytes, -(-total // max(1, len(self._actors))))))
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        files = [out_dir / shard_name(i + 1, len(groups)) for i in range(len(groups))]
        actors = list(self._actors.values())
        refs = [
            actors[i % len(actors)].write_model_part.remote(
                str(base_path), str(merged_path), [t.name for t in g], str(files[i]), metadata
            )
            for i, g in enumerate(groups)
        ]
        ray.get(refs, timeout=self._call_timeout)
        index = {
            "metadata": {"total_size": total},
            "weight_map": {t.name: files[i].name for i, g in enumerate(groups) for t in g},
        }
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return files

    def _assemble(self, majority: int, copy: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        output = self._outputs(majority)
        for name, n in self.manifest:
            if n == 0:
                yield name, torch.zeros(0, dtype=torch.float32)
                continue
            pieces = self.plan.pieces_of(name)
            if len(pieces) == 1:
                p = pieces[0]
                flat = output(p.shard)  # read-only view of the object store: copy out unless told not to
                out = flat[p.offset_in_shard:p.offset_in_shard + p.numel]
                if copy:
                    out = out.clone()
                if p.offset_in_shard == 0 and p.numel == flat.numel():
                    output(None)  # the shard was just this tensor
                del flat
            else:
                out = torch.empty(n, dtype=torch.float32)
                for p in pieces:
                    out[p.start:p.stop] = output(p.shard)[p.offset_in_shard:p.offset_in_shard + p.numel]
            yield name, out
            del out

    def finalize_records(self, majority: int, shapes: dict[str, tuple[int, ...]],
                         span_elems: int) -> Iterator[SparseTensor]:
        """The merged records, cut as `rounds.finalize.merged_records` cuts them (a tensor
        of at most `span_elems` elements whole, a larger one as span records from element
        0), each gathered from the shard outputs it overlaps: this process holds one span
        and at most two shard outputs, never a tensor that spans shards."""
        self._check_open()
        self.recover()
        self._stage(self._actors, majority)
        sizes = dict(self.manifest)
        for name, lo, hi, dense in self._chunks_of(majority, span_elems):
            idx, val = dense_to_sparse(dense)
            n = sizes[name]
            if (lo, hi) == (0, n) and n <= span_elems:
                yield SparseTensor(name, shapes[name], idx, val)
            else:
                yield SparseTensor(name, shapes[name], idx + lo, val, start=lo, count=hi - lo)
            del dense

    def _outputs(self, majority: int) -> Callable[[Optional[int]], Optional[torch.Tensor]]:
        """Shard outputs pulled in plan order, the next one prefetched: `output(s)` is shard
        s's (read-only), `output(None)` lets the current one go."""
        order = [s for s in self.plan.nonempty_shards()]
        nxt = {a: b for a, b in zip(order, order[1:])}
        pending: dict[int, ray.ObjectRef] = {}
        cur: list = [None, None]  # shard, its output

        def output(s: Optional[int]) -> Optional[torch.Tensor]:
            if s is None or s != cur[0]:
                cur[0] = cur[1] = None  # drop the previous shard's output
            if s is None or cur[0] == s:
                return cur[1]
            ref = pending.pop(s, None) or self._actors[s].take.remote()
            if s in nxt and nxt[s] not in pending:  # prefetch one shard ahead
                pending[nxt[s]] = self._actors[nxt[s]].take.remote()
            cur[0], cur[1] = s, self._fetch(s, ref, majority)
            return cur[1]

        return output

    def _chunks_of(self, majority: int, span_elems: int) -> Iterator[tuple[str, int, int, torch.Tensor]]:
        """(name, lo, hi, merged values of elements [lo, hi)) in manifest order: whole tensors
        up to `span_elems` elements, spans of `span_elems` above; a read-only view where the
        range lies in one shard, else gathered from the shards it spans."""
        output = self._outputs(majority)
        for name, n in self.manifest:
            pieces = self.plan.pieces_of(name) if n else []
            cuts = [(0, n)] if n <= span_elems else [(lo, min(n, lo + span_elems)) for lo in range(0, n, span_elems)]
            for lo, hi in cuts:
                parts = [p for p in pieces if p.start < hi and p.stop > lo]
                if len(parts) == 1:
                    p = parts[0]
                    a = p.offset_in_shard + lo - p.start
                    chunk = output(p.shard)[a:a + hi - lo]
                else:
                    chunk = torch.zeros(hi - lo, dtype=torch.float32)
                    for p in parts:
                        a, b = max(lo, p.start), min(hi, p.stop)
                        off = p.offset_in_shard - p.start
                        chunk[a - lo:b - lo] = output(p.shard)[off + a:off + b]
                yield name, lo, hi, chunk
                del chunk

    def _fetch(self, s: int, ref: ray.ObjectRef, majority: int) -> torch.Tensor:
        for _ in range(self._max_restarts + 2):
            try:
                stage_ref = self._stage_refs.pop(s, None)
                if stage_ref is not None:
                    ray.get(stage_ref, timeout=self._call_timeout)  # surfaces a failed finalize
                gen, flat = ray.get(ref, timeout=self._call_timeout)
            except RayActorError:
                gen, flat = None, None
            if flat is not None and gen == self._gen.get(s):
                return from_wire(flat)
            # the actor restarted after staging: rebuild it (and any other), restage, retry
            log.warning("shard %d lost its staged output; rebuilding", s)
            self.recover()
            self._stage([s], majority)
            ref = self._actors[s].take.remote()
        raise ShardLostError(f"shard {s}: output lost repeatedly")
