"""Coordinator memory, stated and bounded (issue 14): the per-actor budget sets the
shard count and Ray's `memory=` request, a round the cluster cannot hold is refused
with the numbers, actors fold big slices in bounded pieces (same bits), and float32
sums are an option: smaller, within a stated tolerance of the exact result."""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray binds and advertises 127.0.0.1
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.test_federated import (  # noqa: E402, F401  (fixtures)
    CLIENTS,
    coordinator,
    family,
    fetch_model,
    local_model,
    open_round,
    send,
)
from tests.test_ray_shards import MANIFEST, contributions, reference  # noqa: E402
from tiesfed.coordinator.aggregator import Aggregator  # noqa: E402
from tiesfed.coordinator.memory import (  # noqa: E402
    ACTOR_BASE_BYTES,
    MemoryBudgetError,
    actor_bytes,
    actor_bytes_per_param,
    check_cluster,
    default_actor_memory,
    parse_bytes,
    shards_for_budget,
)
from tiesfed.coordinator.server import CoordinatorConfig  # noqa: E402
from tiesfed.coordinator.shard_actor import ShardActorLocal  # noqa: E402
from tiesfed.coordinator.shard_plan import plan_shards  # noqa: E402
from tiesfed.core.accumulators import FinalizeSpec, majority_sign  # noqa: E402
from tiesfed.protos.codec import read_stream  # noqa: E402

GiB = 1 << 30
F32 = FinalizeSpec(sum_dtype=torch.float32)


# ---------------------------------------------------------------- the arithmetic


def test_bytes_per_param_per_option_set():
    assert FinalizeSpec().bytes_per_param() == 24  # float64 S+ S-, int32 C+ C-
    assert F32.bytes_per_param() == 16  # the sums halve, the counts stay
    assert FinalizeSpec(weighted=True).bytes_per_param() == 40
    assert FinalizeSpec(weighted=True, sum_dtype=torch.float32).bytes_per_param() == 24
    assert FinalizeSpec(combine="sum").bytes_per_param() == 16
    assert actor_bytes_per_param(FinalizeSpec()) == 28  # + the staged float32 output


def test_shards_follow_the_budget():
    n = 730_000_000  # the Llama-3-shaped 0.73B family
    s = shards_for_budget(n, FinalizeSpec(), 3 * GiB)
    assert s == -(-n * 28 // (3 * GiB - ACTOR_BASE_BYTES))
    assert actor_bytes(-(-n // s), FinalizeSpec()) <= 3 * GiB < actor_bytes(-(-n // (s - 1)), FinalizeSpec())
    assert shards_for_budget(n, F32, 3 * GiB) < s  # float32 sums: fewer actors
    assert shards_for_budget(1000, FinalizeSpec(), 3 * GiB) == 1
    with pytest.raises(MemoryBudgetError, match="leaves nothing for accumulators"):
        shards_for_budget(n, FinalizeSpec(), ACTOR_BASE_BYTES)


def test_a_cluster_too_small_is_refused_with_the_numbers():
    with pytest.raises(MemoryBudgetError) as ei:
        check_cluster(8, 3 * GiB, {"memory": 16 * GiB}, 730_000_000, FinalizeSpec(), 3 * GiB)
    msg = str(ei.value)
    assert "730,000,000 parameters" in msg and "8 shard actor(s)" in msg and "24.00 GiB" in msg
    assert "16.00 GiB" in msg and "float32" in msg
    check_cluster(5, 3 * GiB, {"memory": 16 * GiB}, 1, FinalizeSpec())  # fits: no error
    check_cluster(99, 3 * GiB, {}, 1, FinalizeSpec())  # no memory reported: nothing to check


def test_default_budget_from_the_cluster():
    assert default_actor_memory({}) == 4 * GiB
    assert default_actor_memory({"memory": 6 * GiB, "CPU": 2}) == 3 * GiB
    assert default_actor_memory({"memory": 64 * GiB, "CPU": 2}) == 4 * GiB  # at most 4 GiB
    assert default_actor_memory({"memory": 1 * GiB, "CPU": 16}) == 2 * ACTOR_BASE_BYTES


def test_sizes_and_settings_are_checked():
    assert parse_bytes("3GB") == 3 * 10**9 and parse_bytes("2.5GiB") == int(2.5 * GiB) and parse_bytes(512) == 512
    for bad in ("3 parsecs", "-1GB", "0", True):
        with pytest.raises(ValueError):
            parse_bytes(bad)
    cfg = CoordinatorConfig(actor_memory="3GiB", sum_dtype="float32")
    assert cfg.actor_memory == 3 * GiB and cfg.sum_dtype == "float32"
    with pytest.raises(ValueError, match="sum_dtype"):
        CoordinatorConfig(sum_dtype="float16")
    with pytest.raises(ValueError, match="not a size"):
        CoordinatorConfig(actor_memory="lots")


# ---------------------------------------------------------------- actors, in-process


@pytest.mark.parametrize("spec_name", ["ties", "weighted"])
def test_actor_folds_big_slices_in_pieces_with_the_same_bits(spec_name):
    spec = FinalizeSpec() if spec_name == "ties" else FinalizeSpec(weighted=True)
    weights = (1.0, 1.0, 1.0, 1.0) if spec_name == "ties" else (0.3, 1.7, 1.0, 2.5)
    contribs = contributions(MANIFEST, weights=weights)
    plan = plan_shards(MANIFEST, 2)
    whole, pieces = ({s: ShardActorLocal(s, plan.shards[s], spec) for s in plan.nonempty_shards()}
                     for _ in range(2))
    for a in pieces.values():
        a.fold_elems = 7  # every slice of more than 7 entries is folded in pieces
    for name, idx, val, w in contribs:
        for s, li, v in plan.split(name, idx, val):
            whole[s].fold(li, v, w)
            pieces[s].fold(li, v, w)
    for s in whole:
        assert pieces[s].state_digest() == whole[s].state_digest()
        assert pieces[s].acc.contributions == whole[s].acc.contributions
        assert pieces[s].acc.weight_total == whole[s].acc.weight_total


# ---------------------------------------------------------------- float32 sums


def test_float32_sums_stay_close_to_the_exact_result():
    contribs = contributions(MANIFEST)
    exact = dict(reference(MANIFEST, FinalizeSpec(), contribs))
    agg = Aggregator(MANIFEST, F32)
    for name, idx, val, w in contribs:
        agg.fold(name, idx, val, w)
    got = dict(agg.merged())
    assert got.keys() == exact.keys()
    for name, want in exact.items():
        # a mean of <= 4 float32 values: float32 sums round at most a few ulps away
        torch.testing.assert_close(got[name], want, rtol=4 * torch.finfo(torch.float32).eps, atol=1e-30)


def test_federated_round_with_float32_sums(family, tmp_path, coordinator):
    srv = coordinator(sum_dtype="float32")
    rnd = open_round(srv)
    assert rnd.spec.sum_dtype == torch.float32 and rnd.spec.bytes_per_param() == 16
    for i, c in enumerate(CLIENTS):
        send(srv, "r1", c, family, i)
    assert rnd.wait_closed(60) and rnd.state == "finalized"
    with open(rnd.spool.merged_path, "rb") as f:
        header, _ = read_stream(f)
    assert header["sum_dtype"] == "float32"  # the merge says it is not the exact one
    got, want = fetch_model(srv, family, tmp_path), local_model(family, tmp_path, [0, 1, 2])
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_default_round_header_unchanged(family, tmp_path, coordinator):
    srv = coordinator()
    rnd = open_round(srv)
    assert rnd.spec.sum_dtype == torch.float64
    for i, c in enumerate(CLIENTS):
        send(srv, "r1", c, family, i)
    assert rnd.wait_closed(60) and rnd.state == "finalized"
    with open(rnd.spool.merged_path, "rb") as f:
        header, _ = read_stream(f)
    assert "sum_dtype" not in header


# ---------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    from tiesfed.coordinator.shard_pool import init_ray

    if ray.is_initialized():
        ray.shutdown()
    init_ray(None, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_budget_raises_the_shard_count_and_asks_ray_for_memory(ray_session):
    from tiesfed.coordinator.ray_factory import RayAggregatorFactory

    ray = ray_session
    spec = FinalizeSpec()
    total = sum(n for _, n in MANIFEST)
    # a budget that leaves room for ~3000 parameters an actor: several shards for 8,658
    budget = ACTOR_BASE_BYTES + 3000 * actor_bytes_per_param(spec)
    factory = RayAggregatorFactory(num_shards=1, actor_memory=budget)
    shards, cpus_each, memory = factory.layout(MANIFEST, spec)
    assert shards == shards_for_budget(total, spec, budget) == 3
    assert memory == actor_bytes(-(-total // 3), spec) <= budget
    assert cpus_each * shards <= ray.cluster_resources()["CPU"]
    contribs = contributions(MANIFEST)
    with factory(MANIFEST, spec) as agg:
        assert len(agg.actors) == 3
        for name, idx, val, w in contribs:
            agg.fold(name, idx, val, w)
        want = dict(reference(MANIFEST, spec, contribs))
        got = dict(agg.merged())
        assert all(torch.equal(got[n], want[n]) for n in want)
        views = dict((n, t.clone()) for n, t in agg.finalize_views(1))
        assert all(torch.equal(views[n], t) for n, t in agg.finalize(1))
        # each actor holds its memory request in Ray's accounting while it lives
        held = ray.cluster_resources()["memory"] - ray.available_resources().get("memory", 0.0)
        assert held == pytest.approx(3 * memory, rel=1e-6)


@pytest.mark.parametrize("span", [1, 97, 1000, 10**6])
def test_sharded_records_are_the_dense_paths_without_a_whole_tensor(ray_session, span):
    """`finalize_records` on Ray shards: the records `merged_records` cuts from whole tensors
    (spans straddling shard boundaries included), bit for bit and byte for byte, while the
    coordinator gathers one span at a time."""
    from unittest.mock import patch

    import tiesfed.coordinator.rounds.finalize as finalize_mod
    from tiesfed.coordinator.ray_factory import RayAggregatorFactory
    from tiesfed.protos.codec import encode_tensor

    spec = FinalizeSpec()
    shapes = {n: (k,) for n, k in MANIFEST}
    with RayAggregatorFactory(num_shards=3)(MANIFEST, spec) as agg:
        assert any(len(agg.plan.pieces_of(n)) > 1 for n, _ in MANIFEST)  # some tensor spans shards
        for name, idx, val, w in contributions(MANIFEST):
            agg.fold(name, idx, val, w)
        majority = majority_sign(agg.sign_balance())
        with patch.object(finalize_mod, "SPAN_ELEMS", span):
            want = list(finalize_mod.merged_records(agg.finalize(majority), shapes))
        got = list(agg.finalize_records(majority, shapes, span))
    assert [(r.name, r.start, r.count) for r in got] == [(r.name, r.start, r.count) for r in want]
    for r, e in zip(got, want):
        assert torch.equal(r.indices, e.indices) and torch.equal(r.values, e.values)
        assert encode_tensor(r) == encode_tensor(e)


def test_a_round_the_cluster_cannot_hold_is_refused(ray_session):
    from tiesfed.coordinator.ray_factory import RayAggregatorFactory

    factory = RayAggregatorFactory(actor_memory=2 * GiB)
    with pytest.raises(MemoryBudgetError, match="do not fit the Ray cluster"):
        factory.layout([("huge", 10**11)], FinalizeSpec())  # ~2.8 TB of accumulators: no actor is started


def test_cli_and_yaml_name_the_settings_alike(tmp_path):
    from click.testing import CliRunner

    from tiesfed.cli.app import main
    from tiesfed.coordinator.server import load_coordinator_config

    y = tmp_path / "coordinator.yaml"
    y.write_text("actor-memory: 3GB\nsum-dtype: float32\n")
    cfg = load_coordinator_config(str(y))
    assert cfg.actor_memory == 3 * 10**9 and cfg.sum_dtype == "float32"
    res = CliRunner().invoke(main, ["coordinator", "serve", "--insecure", "--spool", str(tmp_path / "s"),
                                    "--actor-memory", "lots"])
    assert res.exit_code == 2 and "not a size" in res.output and not (tmp_path / "s").exists()
    res = CliRunner().invoke(main, ["coordinator", "serve", "--insecure", "--spool", str(tmp_path / "s"),
                                    "--sum-dtype", "float16"])
    assert res.exit_code == 2 and "float16" in res.output and not (tmp_path / "s").exists()


def test_actor_lets_its_accumulators_go_before_the_model_write():
    spec = FinalizeSpec()
    plan = plan_shards(MANIFEST, 2)
    a = ShardActorLocal(0, plan.shards[0], spec)
    a.stage(1)
    assert a.release_state() == plan.shard_size(0) * spec.bytes_per_param()
    assert a.acc.numel == 0 and a.take()[1] is None
    a.reset()  # usable again only after a reset
    assert a.acc.numel == plan.shard_size(0)


def test_the_readme_table_comes_from_bytes_per_param():
    from benchmarks.coordinator_memory import option_sets, render_nodes, render_table

    table = render_table(3 * GiB)
    for label, spec in option_sets():
        row = next(ln for ln in table.splitlines() if ln.startswith(f"| {label} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1:3] == [str(spec.bytes_per_param()), str(actor_bytes_per_param(spec))]
        assert cells[3].endswith(f", {shards_for_budget(8_030_261_248, spec, 3 * GiB)}")
    assert "| Llama-3-70B | float64 | 736 | 36 |" in render_nodes(3 * GiB, 64 * GiB)


def test_big_merged_tensors_go_out_as_span_records(family, tmp_path, coordinator, monkeypatch):
    """Above SPAN_ELEMS a merged tensor is published as span records (the coordinator holds one
    span's nonzeros at a time); the coordinator's model copy and a client's fetch are the same."""
    from tests.test_federated import assert_identical, load_folder
    from tiesfed.coordinator.rounds import finalize as finalize_mod

    monkeypatch.setattr(finalize_mod, "SPAN_ELEMS", 100)
    srv = coordinator()
    rnd = open_round(srv)
    for i, c in enumerate(CLIENTS):
        send(srv, "r1", c, family, i)
    assert rnd.wait_closed(60) and rnd.state == "finalized"
    with open(rnd.spool.merged_path, "rb") as f:
        _, records = read_stream(f, spans=True)
        spans = [t for t in records if t.is_span]
    assert spans and all(t.count <= 100 and t.indices.numel() == 0 or
                         (t.start <= int(t.indices.min()) and int(t.indices.max()) < t.stop) for t in spans)
    want = local_model(family, tmp_path, [0, 1, 2])
    assert_identical(load_folder(rnd.spool.model_dir), want)
    assert_identical(fetch_model(srv, family, tmp_path), want)
