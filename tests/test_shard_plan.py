"""The shard plan: balanced contiguous ranges, pieces, routing of sparse contributions."""

import pickle
import random

import pytest
import torch

from tiesfed.coordinator.shard_plan import Piece, ShardPlan, num_shards_for, plan_shards


def check_invariants(manifest, plan: ShardPlan) -> None:
    total = sum(n for _, n in manifest)
    sizes = plan.shard_sizes()
    assert len(sizes) == plan.num_shards == len(plan.shards)
    assert sum(sizes) == total == plan.total
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the extra elements go to the first shards
    # every shard is tiled contiguously by its pieces
    for s, pieces in enumerate(plan.shards):
        off = 0
        for p in pieces:
            assert p.shard == s and p.offset_in_shard == off and p.stop > p.start
            off += p.numel
        assert off == sizes[s]
    # every tensor is tiled contiguously by its pieces, in increasing shard order,
    # and the concatenation of shards is the manifest order
    g = 0
    for name, n in manifest:
        pieces = plan.pieces_of(name)
        assert sum(p.numel for p in pieces) == n
        pos = 0
        for p in pieces:
            assert p.tensor == name and p.start == pos
            assert plan.bounds[p.shard] + p.offset_in_shard == g + p.start
            pos = p.stop
        assert [p.shard for p in pieces] == sorted({p.shard for p in pieces})
        if n == 0:
            assert pieces == []
        g += n


AWKWARD = {
    "tiny tensors, big shards": ([("a", 3), ("b", 2), ("c", 1)], 2),
    "one tensor bigger than the rest": ([("a", 5), ("huge", 1000), ("b", 7), ("c", 1)], 4),
    "one shard": ([("a", 5), ("b", 17), ("c", 0), ("d", 3)], 1),
    "more shards than tensors": ([("a", 10), ("b", 11)], 5),
    "more shards than elements": ([("a", 2), ("z", 0), ("b", 1)], 7),
    "single element": ([("a", 1)], 3),
    "zero-size tensors": ([("z0", 0), ("a", 4), ("z1", 0), ("z2", 0), ("b", 4), ("z3", 0)], 3),
    "all empty": ([("z0", 0), ("z1", 0)], 2),
    "empty manifest": ([], 3),
}


@pytest.mark.parametrize("case", list(AWKWARD))
def test_awkward_manifests(case):
    manifest, s = AWKWARD[case]
    plan = plan_shards(manifest, s)
    check_invariants(manifest, plan)
    total = sum(n for _, n in manifest)
    assert len(plan.nonempty_shards()) == min(s, total)


def test_more_shards_than_elements_leaves_trailing_shards_empty():
    plan = plan_shards([("a", 2), ("b", 1)], 7)
    assert plan.shard_sizes() == [1, 1, 1, 0, 0, 0, 0]
    assert plan.shards[3:] == [[], [], [], []]
    assert plan.pieces_of("a") == [Piece("a", 0, 1, 0, 0), Piece("a", 1, 2, 1, 0)]
    assert plan.nonempty_shards() == [0, 1, 2]


def test_big_tensor_is_cut_and_small_ones_share_a_shard():
    plan = plan_shards([("a", 5), ("huge", 1000), ("b", 7), ("c", 1)], 4)
    assert plan.shard_sizes() == [254, 253, 253, 253]
    assert [p.shard for p in plan.pieces_of("huge")] == [0, 1, 2, 3]
    assert plan.shards[3][-2:] == [Piece("b", 0, 7, 3, 245), Piece("c", 0, 1, 3, 252)]
    assert plan.shards[0][0] == Piece("a", 0, 5, 0, 0)


def test_one_shard_holds_everything_in_order():
    manifest = [("a", 5), ("b", 17), ("c", 0), ("d", 3)]
    plan = plan_shards(manifest, 1)
    assert plan.shards == [[Piece("a", 0, 5, 0, 0), Piece("b", 0, 17, 0, 5), Piece("d", 0, 3, 0, 22)]]


def test_random_manifests_and_determinism():
    rng = random.Random(1)
    for _ in range(200):
        manifest = [(f"t{i}", rng.choice([0, 1, 2, 3, 7, 64, 1000, rng.randrange(5000)]))
                    for i in range(rng.randrange(0, 12))]
        s = rng.randrange(1, 20)
        plan = plan_shards(manifest, s)
        check_invariants(manifest, plan)
        again = plan_shards(list(manifest), s)
        assert again.shards == plan.shards and again.bounds == plan.bounds


def test_validation():
    with pytest.raises(ValueError):
        plan_shards([("a", 3)], 0)
    with pytest.raises(ValueError):
        plan_shards([("a", 3)], -2)
    with pytest.raises(TypeError):
        plan_shards([("a", 3)], 2.0)
    with pytest.raises(ValueError, match="twice"):
        plan_shards([("a", 3), ("a", 4)], 2)
    with pytest.raises(ValueError, match="negative"):
        plan_shards([("a", -1)], 2)
    with pytest.raises(KeyError):
        plan_shards([("a", 3)], 2).pieces_of("nope")


def _sparse(n, density, gen):
    idx = torch.nonzero(torch.rand(n, generator=gen) < density).flatten()
    return idx, torch.randn(idx.numel(), generator=gen)


def _unsplit(plan, name, parts):
    """Map shard-local slices back to tensor-local indices."""
    idx, val = [], []
    for shard, li, v in parts:
        for p in plan.shards[shard]:
            if p.tensor != name:
                continue
            m = (li >= p.offset_in_shard) & (li < p.offset_in_shard + p.numel)
            idx.append(li[m].to(torch.int64) - p.offset_in_shard + p.start)
            val.append(v[m])
        inside = sum(
            int(((li >= p.offset_in_shard) & (li < p.offset_in_shard + p.numel)).sum())
            for p in plan.shards[shard] if p.tensor == name
        )
        assert inside == li.numel(), "a slice reached a shard range that is not this tensor's"
    return torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64), torch.cat(val) if val else torch.zeros(0)


def test_split_routes_every_index_to_its_owner():
    gen = torch.Generator().manual_seed(0)
    manifest = [("a", 5), ("huge", 1000), ("b", 7), ("z", 0), ("c", 1)]
    for s in (1, 2, 3, 4, 9, 2000):
        plan = plan_shards(manifest, s)
        for name, n in manifest:
            for density in (0.0, 0.05, 0.5, 1.0):
                idx, val = _sparse(n, density, gen)
                parts = plan.split(name, idx, val)
                assert [p[0] for p in parts] == sorted({p[0] for p in parts})
                for shard, li, v in parts:
                    assert li.dtype == torch.int64 and li.numel() == v.numel() > 0
                    assert int(li.min()) >= 0 and int(li.max()) < plan.shard_size(shard)
                back_i, back_v = _unsplit(plan, name, parts)
                assert torch.equal(back_i, idx) and torch.equal(back_v, val)


def test_split_unsorted_dtypes_and_errors():
    plan = plan_shards([("a", 10), ("b", 10)], 3)  # global ranges [0,7) [7,14) [14,20)
    parts = plan.split("b", torch.tensor([9, 0, 5], dtype=torch.int32), torch.tensor([3.0, 1.0, 2.0]))
    assert [(s, li.tolist(), v.tolist()) for s, li, v in parts] == [(1, [3], [1.0]), (2, [1, 5], [2.0, 3.0])]
    parts = plan.split("b", torch.tensor([0, 5, 9]), torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16),
                       index_dtype=torch.int32)
    assert all(li.dtype == torch.int32 and v.dtype == torch.bfloat16 for _, li, v in parts)
    assert plan.split("a", torch.zeros(0, dtype=torch.int64), torch.zeros(0)) == []
    with pytest.raises(IndexError):
        plan.split("a", torch.tensor([3, 10]), torch.tensor([1.0, 1.0]))
    with pytest.raises(IndexError):
        plan.split("a", torch.tensor([-1, 3]), torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError):
        plan.split("a", torch.tensor([1, 3]), torch.tensor([1.0]))
    with pytest.raises(TypeError):
        plan.split("a", torch.tensor([1.0, 3.0]), torch.tensor([1.0, 1.0]))
    with pytest.raises(KeyError):
        plan.split("nope", torch.tensor([1]), torch.tensor([1.0]))


def test_split_slices_own_their_storage():
    """Pickling a view ships its whole storage: slices must be compact copies."""
    plan = plan_shards([("a", 100_000)], 4)
    idx = torch.arange(0, 100_000, 2)
    val = torch.randn(idx.numel())
    parts = plan.split("a", idx, val)
    assert len(parts) == 4
    for _, li, v in parts:
        for t in (li, v):
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
        assert len(pickle.dumps((li, v))) < 0.3 * len(pickle.dumps((idx, val)))
    # a view of a larger buffer handed in for a one-piece tensor is compacted too
    plan1 = plan_shards([("a", 100_000)], 1)
    (_, li, v), = plan1.split("a", idx[:10], val[:10])
    assert v.untyped_storage().nbytes() == 10 * 4 and li.untyped_storage().nbytes() == 10 * 8
    # and nothing returned aliases the caller's tensors (it may reuse them at once)
    for p in (plan1, plan):
        i = torch.arange(5, 50_000, 7)
        x = torch.randn(i.numel())
        for _, li, v in p.split("a", i, x) + p.split("a", i[:3], x[:3]):
            assert li.untyped_storage().data_ptr() != i.untyped_storage().data_ptr()
            assert v.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


def test_split_without_python_loop_per_element_is_fast():
    plan = plan_shards([("w", 20_000_000)], 4)
    idx = torch.arange(0, 20_000_000, 5)
    val = torch.randn(idx.numel())
    import time

    t = time.perf_counter()
    parts = plan.split("w", idx, val)
    assert time.perf_counter() - t < 2.0
    assert sum(li.numel() for _, li, _ in parts) == idx.numel()


def test_num_shards_for():
    assert num_shards_for({"CPU": 8.0}) == 8
    assert num_shards_for({"CPU": 8.0, "GPU": 2.0}) == 2
    assert num_shards_for({"CPU": 8.0, "GPU": 1.0}, num_gpus_per_actor=0.25) == 4
    assert num_shards_for({"CPU": 8.0, "GPU": 0.0}) == 8
    assert num_shards_for({"CPU": 8.0}, num_cpus_per_actor=2) == 4
    assert num_shards_for({}) == 1
    assert num_shards_for({"CPU": 64.0}, 10_000, min_elems_per_shard=1_000) == 10
    assert num_shards_for({"CPU": 64.0}, 10, min_elems_per_shard=1_000) == 1
    assert num_shards_for({"CPU": 64.0}, 0) == 1
    assert num_shards_for({"CPU": 64.0}, max_shards=3) == 3
    assert ShardPlan.num_shards_for({"CPU": 3.0}) == 3
