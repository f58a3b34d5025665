"""The integrity guarantee, for any input: a rejected, abandoned, expired or
replaced upload leaves the round bit-identical to one that never saw it, and no
finite input makes the merged model non-finite.

The hostile uploads here carry values far larger than the honest ones at the
same positions, so float64 sums lose the honest bits: un-folding alone would
not restore them (the control test shows it), the round must rebuild from its
spool. Real gRPC on loopback, real files, the in-process aggregator (the Ray
variant is in test_ray_coordinator.py).
"""

from __future__ import annotations

import time

import grpc
import pytest
import torch

from tests.test_federated import (  # noqa: F401
    FAST,
    assert_identical,
    assert_same_state,
    contribution_bytes,
    coordinator,
    family,
    fetch_model,
    local_model,
    open_round,
    raw_upload,
    rejected,
    send,
    snapshot,
)
from tiesfed.coordinator.aggregator import Aggregator
from tiesfed.coordinator.rounds import ParticipantConfig, RoundConfig, TensorEntry
from tiesfed.coordinator.rounds.config import DEFAULT_MAX_ABS_VALUE, value_bound
from tiesfed.coordinator.rounds.events import RoundError
from tiesfed.core.accumulators import FinalizeSpec, fold, new_accumulator, unfold
from tiesfed.core.options import MergeOptions
from tiesfed.protos.codec import SparseTensor

HUGE = 1e27  # times an honest value: far past float64's 53 bits of room


def scaled(factor: float, drop_last: bool = False):
    """A mutation of a contribution: every value times `factor` (same positions and
    signs as the honest one, so it lands in the same per-sign sums)."""

    def mutate(ts: list[SparseTensor]) -> list[SparseTensor]:
        out = [SparseTensor(t.name, t.shape, t.indices, (t.values.double() * factor).float()) for t in ts]
        return out[:-1] if drop_last else out

    return mutate


def hostile(family, factor: float, drop_last: bool = False) -> bytes:
    """Model 0's contribution with every value times `factor`, declaring its trim threshold
    scaled alike (as the client that scaled it would): within the k budget, as the honest one."""
    return contribution_bytes(family, 0, mutate=scaled(factor, drop_last),
                              header={"threshold": lambda t: float(torch.tensor(t, dtype=torch.float64).mul(factor)
                                                                   .float())})


# ----------------------------------------------------------------------------- the algebra


def test_fold_reports_when_a_sum_loses_bits():
    spec = FinalizeSpec()
    acc = new_accumulator(4, spec)
    idx = torch.tensor([0, 1, 2])
    fold(acc, idx, torch.tensor([1e-3, -2e-3, 3e-3]))
    fold(acc, idx, torch.tensor([2e-3, -1e-3, 1e-2]))
    assert acc.exact
    before = {k: v.clone() for k, v in acc.tensors().items()}
    fold(acc, torch.tensor([0]), torch.tensor([1e30]))
    assert not acc.exact  # 1e30 + 3e-3 rounds
    unfold(acc, torch.tensor([0]), torch.tensor([1e30]))
    assert not torch.equal(acc.s_pos, before["s_pos"]), "un-folding restored bits that were lost"
    assert not acc.exact, "exactness must stay lost until a rebuild"


def test_unfold_is_an_exact_inverse_while_exact():
    torch.manual_seed(0)
    spec = FinalizeSpec()
    acc = new_accumulator(1000, spec)
    for _ in range(5):
        idx = torch.randperm(1000)[:200].sort().values
        fold(acc, idx, torch.randn(200) * 0.01)
    assert acc.exact
    before = {k: v.clone() for k, v in acc.tensors().items()}
    idx = torch.randperm(1000)[:300].sort().values
    val = torch.randn(300) * 100
    fold(acc, idx, val)
    unfold(acc, idx, val)
    assert acc.exact
    for k, v in before.items():
        assert torch.equal(v, acc.tensors()[k]), k


# ----------------------------------------------------------------------------- the value bound


def test_values_over_the_bound_are_refused_and_change_nothing(family, tmp_path, coordinator):
    srv = coordinator()
    rnd = open_round(srv)
    assert rnd.config.max_abs_value == DEFAULT_MAX_ABS_VALUE
    send(srv, "r1", "org-b", family, 1)
    rejected(srv, rnd, contribution_bytes(family, 0, mutate=scaled(3e38 / 0.5)), grpc.StatusCode.INVALID_ARGUMENT,
             "max_abs_value", chunk=300)
    send(srv, "r1", "org-a", family, 0)
    send(srv, "r1", "org-c", family, 2)
    assert_identical(fetch_model(srv, family, tmp_path), local_model(family, tmp_path, [0, 1, 2]))


def test_values_at_the_bound_keep_the_merged_model_finite(family, tmp_path, coordinator):
    """The largest upload a round accepts, at λ = 2: every merged weight is finite."""
    srv = coordinator()
    rnd = open_round(srv, options=MergeOptions(**{"lambda": 2.0}))
    bound = rnd.config.max_abs_value

    def to_the_bound(ts):
        return [SparseTensor(t.name, t.shape, t.indices, torch.sign(t.values) * bound) for t in ts]

    # every value at the bound, the bound declared as the trim threshold (all ties, none above it)
    data = contribution_bytes(family, 0, mutate=to_the_bound, header={"threshold": bound})
    receipt = raw_upload(srv, "r1", "org-a", data)
    assert receipt.committed
    send(srv, "r1", "org-b", family, 1)
    send(srv, "r1", "org-c", family, 2)
    merged = fetch_model(srv, family, tmp_path)
    assert all(bool(torch.isfinite(t).all()) for t in merged.values())
    assert max(float(t.abs().max()) for t in merged.values()) > bound  # the hostile values did land


def test_bound_follows_lambda_weights_and_the_narrowest_dtype():
    parts = [ParticipantConfig(client_id=c, weight=w) for c, w in [("a", 1.0), ("b", 3.0)]]
    f16 = [TensorEntry(name="w", shape=(4,), dtype="F16"), TensorEntry(name="v", shape=(2,), dtype="F32")]

    def cfg(**kw):
        return RoundConfig(round_id="r", participants=parts, base_fingerprint="sha256:x", manifest=f16, **kw)

    # mean of weighted values: gain = λ × the largest weight
    assert value_bound(cfg(options=MergeOptions(**{"lambda": 2.0}))) == pytest.approx(65504 / 2 / (2 * 3))
    # task arithmetic sums: gain = λ × Σ weights
    assert value_bound(cfg(options=MergeOptions(method="task_arithmetic"))) == pytest.approx(65504 / 2 / 4)
    f32 = [TensorEntry(name="w", shape=(4,), dtype="F32")]
    assert value_bound(RoundConfig(round_id="r", participants=parts, base_fingerprint="sha256:x",
                                   manifest=f32)) == DEFAULT_MAX_ABS_VALUE
    with pytest.raises(RoundError, match="max_abs_value 1e\\+06 could overflow.*use at most 10917"):
        value_bound(cfg(max_abs_value=1e6))


def test_client_stops_before_uploading_a_value_over_the_bound(family, coordinator, tmp_path):
    """A model that is not a fine-tune of the base is caught on the client, with a reason."""
    srv = coordinator()
    open_round(srv, max_abs_value=1e-4)
    from tiesfed.client.federated import FederatedError

    with pytest.raises(FederatedError, match="over the max_abs_value 0.0001 of round 'r1'"):
        send(srv, "r1", "org-a", family, 0)


# ----------------------------------------------------------------------------- withdrawn uploads


@pytest.fixture
def wide_round(coordinator):
    """A round whose bound lets a hostile client send values that break float64 exactness."""
    srv = coordinator(abandon_after_s=2.0)  # long enough to inspect the partial upload on a busy machine
    return srv, open_round(srv, max_abs_value=1e30)


def test_rejected_hostile_upload_leaves_the_round_bit_identical(family, tmp_path, wide_round):
    srv, rnd = wide_round
    send(srv, "r1", "org-a", family, 0)
    send(srv, "r1", "org-b", family, 1)
    # org-c's stream is org-a's values × 1e27, without its last tensor: every record
    # but the last folds on arrival, then the end marker is refused
    rejected(srv, rnd, hostile(family, HUGE, drop_last=True),
             grpc.StatusCode.INVALID_ARGUMENT, "ends without 1 tensor", client="org-c", chunk=300)
    assert any("rebuilding" in e.message or e.kind == "UPLOAD_REJECTED" for e in rnd.events)
    send(srv, "r1", "org-c", family, 2)
    assert_identical(fetch_model(srv, family, tmp_path), local_model(family, tmp_path, [0, 1, 2]))


def test_control_without_the_rebuild_the_hostile_upload_leaves_a_mark(family, wide_round, monkeypatch):
    """Pretend every sum stayed exact: un-folding alone then leaves the honest sums changed."""
    srv, rnd = wide_round
    monkeypatch.setattr(Aggregator, "exact", lambda self: True)
    send(srv, "r1", "org-a", family, 0)
    send(srv, "r1", "org-b", family, 1)
    before = snapshot(rnd)
    with pytest.raises(grpc.RpcError):
        raw_upload(srv, "r1", "org-c", hostile(family, HUGE, drop_last=True), chunk=300)
    with pytest.raises(AssertionError, match="changed"):
        assert_same_state(before, snapshot(rnd))


def test_abandoned_hostile_upload_leaves_the_round_bit_identical(family, tmp_path, wide_round):
    srv, rnd = wide_round
    send(srv, "r1", "org-b", family, 1)
    send(srv, "r1", "org-c", family, 2)
    before = snapshot(rnd)
    data = hostile(family, HUGE)
    receipt = raw_upload(srv, "r1", "org-a", data[: len(data) // 2], chunk=256)
    assert not receipt.committed and rnd.sessions["org-a"].folded
    deadline = time.monotonic() + 10  # the event comes once the withdrawal (and its rebuild) is done
    while not any(e.kind == "UPLOAD_ABANDONED" for e in rnd.events) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(e.kind == "UPLOAD_ABANDONED" for e in rnd.events)
    assert_same_state(before, snapshot(rnd))
    send(srv, "r1", "org-a", family, 0)
    assert_identical(fetch_model(srv, family, tmp_path), local_model(family, tmp_path, [0, 1, 2]))


def test_replaced_hostile_contribution_leaves_no_trace(family, tmp_path, wide_round):
    srv, rnd = wide_round
    send(srv, "r1", "org-b", family, 1)
    receipt = raw_upload(srv, "r1", "org-a", hostile(family, HUGE))
    assert receipt.committed
    assert not rnd.agg.exact()
    res = send(srv, "r1", "org-a", family, 0)
    assert res.replaced
    send(srv, "r1", "org-c", family, 2)
    assert_identical(fetch_model(srv, family, tmp_path), local_model(family, tmp_path, [0, 1, 2]))


def test_committed_hostile_values_still_merge_in_a_fixed_order(family, tmp_path, coordinator):
    """Sums that lost bits depend on the order of the folds: finalization re-folds in
    participant order, so two rounds that got the same uploads in opposite orders
    publish the same bits."""
    srv = coordinator()
    bad = hostile(family, 1e20)
    merged = []
    for rid, order in (("r1", "cba"), ("r2", "abc")):
        rnd = open_round(srv, round_id=rid, max_abs_value=1e30)
        for who in order:
            if who == "a":
                assert raw_upload(srv, rid, "org-a", bad).committed
            else:
                send(srv, rid, f"org-{who}", family, "abc".index(who))
        assert rnd.wait_closed(60) and rnd.state == "finalized"
        merged.append(fetch_model(srv, family, tmp_path, round_id=rid))
    assert_identical(merged[0], merged[1])
    assert all(bool(torch.isfinite(t).all()) for t in merged[0].values())


# ----------------------------------------------------------------------------- fuzzing the upload path


def test_fuzzed_uploads_never_change_the_round(family, tmp_path, coordinator):
    """Any mangling of a valid upload (cut, bit flip, overwrite, insertion, odd chunking,
    a resume offset): the coordinator answers with a status that names a problem (never
    an internal error), does not hang, keeps memory bounded, and the round is unchanged;
    afterwards the honest merge comes out bit for bit."""
    import psutil
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    srv = coordinator()
    rnd = open_round(srv)
    send(srv, "r1", "org-a", family, 0)
    send(srv, "r1", "org-b", family, 1)
    good = contribution_bytes(family, 2)
    before = snapshot(rnd)
    rss0 = psutil.Process().memory_info().rss
    bad_codes = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}

    @st.composite
    def mangled(draw) -> bytes:
        data = bytearray(good)
        how = draw(st.sampled_from(["cut", "flip", "overwrite", "insert"]))
        at = draw(st.integers(0, len(data) - 1))
        if how == "cut":
            return bytes(data[:at])
        if how == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "overwrite":
            junk = draw(st.binary(min_size=1, max_size=64))
            data[at : at + len(junk)] = junk
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        return bytes(data)

    @settings(max_examples=40, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=mangled(), chunk=st.integers(1, 64 << 10), offset=st.sampled_from([0, 0, 0, 1, 4096]))
    def attempt(data: bytes, chunk: int, offset: int) -> None:
        started = time.monotonic()
        try:
            receipt = raw_upload(srv, "r1", "org-c", data, chunk=max(chunk, len(data) // 200 + 1), offset=offset)
            assert not receipt.committed, "a mangled upload was committed"
        except grpc.RpcError as e:
            assert e.code() not in bad_codes, f"{e.code()}: {e.details()}"
        assert time.monotonic() - started < 30
        with rnd.lock:  # a cut stream stays resumable: withdraw it as an abandoned one would be
            for s in list(rnd.sessions.values()):
                rnd._discard(s, "test: withdrawn")
        assert_same_state(before, snapshot(rnd))

    attempt()
    assert psutil.Process().memory_info().rss - rss0 < 300 << 20
    send(srv, "r1", "org-c", family, 2)
    assert_identical(fetch_model(srv, family, tmp_path), local_model(family, tmp_path, [0, 1, 2]))


# ----------------------------------------------------------------------------- a full disk


def test_an_upload_that_would_fill_the_disk_is_refused_and_changes_nothing(family, tmp_path, coordinator):
    """Real statvfs of the spool: with more reserve asked than the disk has, the chunk is
    refused (RESOURCE_EXHAUSTED, naming the free disk) and the round is as it was; once
    space is back, the same upload commits and the merge equals the local one."""
    import shutil

    free = shutil.disk_usage(tmp_path).free
    from tests.test_metrics import scrape, value

    srv = coordinator(min_free_disk_bytes=free + (1 << 40), metrics_port=0)
    rnd = open_round(srv)
    assert rnd.min_free_disk_bytes == free + (1 << 40)
    err = rejected(srv, rnd, contribution_bytes(family, 0), grpc.StatusCode.RESOURCE_EXHAUSTED, "free disk",
                   chunk=300)
    assert "min_free_disk_bytes" in err.details()
    assert value(scrape(srv.metrics_endpoint.port), "tiesfed_contributions_rejected_total", reason="disk") == 1
    rnd.min_free_disk_bytes = 0  # the operator freed space
    for c, m in (("org-a", 0), ("org-b", 1), ("org-c", 2)):
        send(srv, "r1", c, family, m)
    assert_identical(fetch_model(srv, family, tmp_path), local_model(family, tmp_path, [0, 1, 2]))
