"""Ray-sharded aggregation: bit-identical to the single-process Aggregator,
across a simulated multi-node cluster, through actor restarts."""

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray binds and advertises 127.0.0.1

import pytest
import torch

ray = pytest.importorskip("ray")

from tests.helpers import start_two_node_cluster  # noqa: E402
from tiesfed.coordinator.aggregator import Aggregator  # noqa: E402
from tiesfed.coordinator.ray_shards import (  # noqa: E402
    ShardActorLocal,
    ShardedAggregator,
    ShardLostError,
)
from tiesfed.coordinator.shard_plan import plan_shards  # noqa: E402
from tiesfed.core.accumulators import FinalizeSpec  # noqa: E402

# awkward on purpose: tiny tensors, an empty one, one bigger than the rest together
MANIFEST = [("emb", 3000), ("ln.w", 17), ("empty", 0), ("attn.q", 640), ("bias", 1), ("head", 5000)]

SPECS = {
    "ties": FinalizeSpec(),
    "count": FinalizeSpec(election="count"),
    "max": FinalizeSpec(disjoint="max"),
    "sum": FinalizeSpec(combine="sum"),
    "average-weighted": FinalizeSpec(combine="average", weighted=True),
    "mergekit-weighted": FinalizeSpec(weighted=True, zero_sign="positive"),
    "peft-weighted": FinalizeSpec(weighted=True, weight_semantics="peft"),
    "min-support": FinalizeSpec(min_support=2, disjoint="sum"),
}


def contributions(manifest, n_models=4, density=0.3, seed=0, weights=(1.0, 1.0, 1.0, 1.0)):
    """Random sparse trimmed task vectors with conflicting signs and exact ties.

    Models 0 and 1 cancel exactly on a block of positions (tied mass votes, so
    the majority rule decides there); some contributions skip a tensor; model 2
    uploads bfloat16 values, model 3 float16."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for m in range(n_models):
        for name, n in manifest:
            if n == 0 or (m == 3 and name == "ln.w"):
                continue
            mask = torch.rand(n, generator=gen) < density
            vals = torch.randn(n, generator=gen)
            if m in (0, 1):
                tie = torch.arange(n) % 7 == 0
                mask |= tie
                vals[tie] = torch.linspace(0.5, 1.5, n)[tie] * (1 if m == 0 else -1)
            idx = torch.nonzero(mask).flatten()
            v = vals[idx]
            v[v == 0] = 1.0
            if m == 2:  # half-precision uploads travel as they are (bf16 has no numpy dtype)
                v = v.to(torch.bfloat16)
            elif m == 3:
                v = v.to(torch.float16)
            out.append((name, idx, v, weights[m % len(weights)]))
    return out


def reference(manifest, spec, contribs, withdrawn=()):
    agg = Aggregator(manifest, spec)
    for c in contribs:
        agg.fold(*c)
    for c in withdrawn:
        agg.fold(*c, direction=-1)
    return list(agg.merged())


def assert_bit_equal(got, want):
    assert [n for n, _ in got] == [n for n, _ in want]
    for (name, g), (_, w) in zip(got, want):
        assert g.dtype == torch.float32 and g.shape == w.shape, name
        assert torch.equal(g, w), f"{name}: max diff {(g - w).abs().max()}"


# --------------------------------------------------------------------------- no Ray needed
@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("num_shards", [1, 3, 7])
def test_local_shard_actors_match_aggregator(spec_name, num_shards):
    """The actor class in-process: slicing + per-range accumulators change nothing."""
    spec = SPECS[spec_name]
    contribs = contributions(MANIFEST, weights=(1.0, 0.7, 2.5, 1.3))
    plan = plan_shards(MANIFEST, num_shards)
    shards = {s: ShardActorLocal(s, plan.shards[s], spec, "cpu") for s in plan.nonempty_shards()}
    for a in shards.values():
        a.chunk_elems = 257  # elementwise passes in chunks that straddle piece boundaries
    wt = {n: 0.0 for n, _ in MANIFEST}
    for name, idx, val, w in contribs:
        wt[name] += w
        for s, li, v in plan.split(name, idx, val, index_dtype=torch.int32):
            shards[s].fold(li, v, w, 1)
    balance = sum(a.sign_balance() for a in shards.values())
    want = reference(MANIFEST, spec, contribs)
    agg = Aggregator(MANIFEST, spec)
    for c in contribs:
        agg.fold(*c)
    assert balance == agg.sign_balance()
    majority = (balance > 0) - (balance < 0)
    pieces = {}
    for s, a in shards.items():
        for name, start, stop, t in a.finalize(majority, {p.tensor: wt[p.tensor] for p in plan.shards[s]}):
            pieces.setdefault(name, []).append((start, stop, t))
    got = []
    for name, n in MANIFEST:
        out = torch.zeros(n)
        for start, stop, t in pieces.get(name, []):
            out[start:stop] = t
        got.append((name, out))
    assert_bit_equal(got, want)


# --------------------------------------------------------------------------- Ray
def test_starts_and_stops_its_own_ray_when_none_is_running():
    if ray.is_initialized():
        pytest.skip("another test left Ray running")
    man = [("a", 10), ("b", 5)]
    with ShardedAggregator(man, FinalizeSpec(), num_shards=2, num_cpus_per_actor=0.5) as a:
        assert ray.is_initialized()
        assert {n: k for n, k in ray.cluster_resources().items() if n == "CPU"} == {"CPU": float(os.cpu_count())}
        a.fold("a", torch.tensor([0, 9]), torch.tensor([1.0, -2.0]))
        a.fold("b", torch.tensor([4]), torch.tensor([3.0]))
        out = dict(a.merged())
    assert not ray.is_initialized()
    assert out["a"].tolist() == [1.0] + [0.0] * 8 + [-2.0] and out["b"].tolist() == [0.0] * 4 + [3.0]


@pytest.fixture(scope="module")
def cluster():
    """A head and one more node, one CPU each, on loopback; shut down after the module."""
    if ray.is_initialized():
        ray.shutdown()
    c = start_two_node_cluster()
    try:
        ray.init(address=c.address)
        c.wait_for_nodes()
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


class ListSpool:
    """The coordinator's durable spool, in memory: every contribution folded so far."""

    def __init__(self):
        self.items = []

    def __call__(self):
        return iter(list(self.items))


@pytest.fixture(scope="module")
def spool():
    return ListSpool()


@pytest.fixture(scope="module")
def agg(cluster, spool):
    """3 shard actors spread over the 2 nodes, reused across tests via reset()."""
    with ShardedAggregator(MANIFEST, SPECS["ties"], num_shards=3, num_cpus_per_actor=0.5,
                           max_restarts=3, replay=spool, scheduling_strategy="SPREAD") as a:
        yield a


def fold_all(agg, spool, contribs):
    for c in contribs:
        spool.items.append(c)  # write-ahead, as the durable spool does
        agg.fold(*c)


def test_actors_are_spread_over_nodes(agg):
    infos = ray.get([a.info.remote() for a in agg.actors.values()])
    assert sorted(i["shard_id"] for i in infos) == [0, 1, 2]
    assert len({i["node_id"] for i in infos}) == 2
    assert all(i["device"] == "cpu" for i in infos)
    assert len(ray.nodes()) == 2


@pytest.mark.parametrize("spec_name", list(SPECS))
def test_multinode_bit_identical(agg, spool, spec_name):
    spec = SPECS[spec_name]
    agg.reset(spec)
    spool.items.clear()
    i = list(SPECS).index(spec_name)
    # odd specs: every slice in its own call; even: small slices batched per shard
    agg._batch_bytes = 0 if i % 2 else 4 << 20
    contribs = contributions(MANIFEST, seed=i, weights=(1.0, 0.7, 2.5, 1.3))
    fold_all(agg, spool, contribs)
    want_balance = Aggregator(MANIFEST, spec)
    for c in contribs:
        want_balance.fold(*c)
    assert agg.sign_balance() == want_balance.sign_balance()
    if spec.invertible:  # withdraw one model's tensors again
        gone = contribs[:3]
        for name, idx, val, w in gone:
            agg.fold(name, idx, val, w, direction=-1)
        spool.items[:] = contribs[3:]
        want = reference(MANIFEST, spec, contribs, withdrawn=gone)
    else:
        want = reference(MANIFEST, spec, contribs)
    assert_bit_equal(list(agg.merged()), want)
    assert agg.recover() == []  # nothing was lost
    agg._batch_bytes = 4 << 20


def test_kill_mid_round_then_replay(agg, spool):
    spec = SPECS["ties"]
    agg.reset(spec)
    spool.items.clear()
    contribs = contributions(MANIFEST, seed=11)
    half = len(contribs) // 2
    fold_all(agg, spool, contribs[:half])
    agg.flush()  # the victim really holds state when it dies
    victim = agg.actors[1]
    empty = ShardActorLocal(1, agg.plan.shards[1], spec, "cpu").state_digest()
    assert ray.get(victim.state_digest.remote()) != empty
    gen_before = ray.get(victim.generation.remote())
    ray.kill(victim, no_restart=False)  # comes back empty, as a new generation
    fold_all(agg, spool, contribs[half:])  # keeps folding while it restarts
    got = list(agg.merged())
    assert ray.get(victim.generation.remote()) != gen_before
    assert_bit_equal(got, reference(MANIFEST, spec, contribs))
    # the rebuilt state is bit-identical to folding the same slices in-process
    plan = agg.plan
    local = ShardActorLocal(1, plan.shards[1], spec, "cpu")
    for name, idx, val, w in contribs:
        for s, li, v in plan.split(name, idx, val):
            if s == 1:
                local.fold(li, v, w, 1)
    assert ray.get(victim.state_digest.remote()) == local.state_digest()


def test_kill_after_staging_during_finalize(agg, spool):
    spec = SPECS["count"]
    agg.reset(spec)
    spool.items.clear()
    contribs = contributions(MANIFEST, seed=5)
    fold_all(agg, spool, contribs)
    majority = 1 if agg.sign_balance() >= 0 else -1
    out = agg.finalize(majority)
    ray.get(list(agg._stage_refs.values()))  # every shard has computed its output
    ray.kill(agg.actors[2], no_restart=False)  # ... and shard 2 loses it
    got = list(out)
    ref = Aggregator(MANIFEST, spec)
    for c in contribs:
        ref.fold(*c)
    assert_bit_equal(got, list(ref.finalize(majority)))


def test_fold_validation(agg, spool):
    agg.reset(SPECS["max"])
    spool.items.clear()
    idx, val = torch.tensor([1, 2]), torch.tensor([1.0, -1.0])
    with pytest.raises(KeyError):
        agg.fold("nope", idx, val)
    with pytest.raises(ValueError):
        agg.fold("emb", idx, val, direction=0)
    with pytest.raises(ValueError, match="not invertible"):
        agg.fold("emb", idx, val, direction=-1)
    with pytest.raises(IndexError):
        agg.fold("bias", idx, val)
    agg.fold("empty", torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    out = dict(agg.merged())
    assert list(out) == [n for n, _ in MANIFEST]
    assert out["empty"].shape == (0,) and not any(t.any() for t in out.values())


def test_restart_without_replay_is_an_error(cluster):
    with ShardedAggregator([("w", 100)], FinalizeSpec(), num_shards=1, num_cpus_per_actor=0.25) as a:
        a.fold("w", torch.tensor([1, 5]), torch.tensor([1.0, 2.0]))
        ray.kill(a.actors[0], no_restart=False)
        with pytest.raises(ShardLostError, match="no replay"):
            a.sign_balance()
    assert ray.is_initialized()  # it did not start Ray, so it leaves it running


def test_empty_manifest_needs_no_actors(cluster):
    with ShardedAggregator([("z", 0)], FinalizeSpec(), num_shards=4) as a:
        assert a.actors == {}
        assert a.sign_balance() == 0
        (name, t), = list(a.merged())
        assert name == "z" and t.numel() == 0
