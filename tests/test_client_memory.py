"""A client's memory and passes (issues 14 and 11): the block its budget allows, the
pipeline bounded in bytes, span records equal (joined) to whole-tensor ones over
shapes, dtypes, trims and block sizes, and the one-pass global threshold equal to
the two-pass radix select, whether its sample places the window well or not."""

from __future__ import annotations

import io
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tiesfed.client.threshold as threshold
from tests.helpers import make_model, random_family
from tiesfed.client.budget import FIXED_BYTES, MIN_BLOCK, client_block, kept_fraction, queue_bytes
from tiesfed.client.contribution import (
    TrimStats,
    _tau_blocks,
    contribution_header,
    contribution_threshold,
    iter_contribution,
    write_contribution,
)
from tiesfed.client.pipeline import Prefetch
from tiesfed.core.trim import GlobalThreshold, TrimSpec
from tiesfed.io.model_io import ModelReader, mergeable
from tiesfed.protos.codec import read_stream

HSET = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.function_scoped_fixture])
TRIMS = [TrimSpec(kind="topk", fraction=0.2, scope="global"), TrimSpec(kind="topk", fraction=0.07, scope="tensor"),
         TrimSpec(kind="dare", fraction=0.4, seed=5), TrimSpec(kind="none", fraction=1.0),
         TrimSpec(kind="topk", fraction=1.0, scope="tensor")]


def test_the_block_follows_the_budget():
    g = TrimSpec(kind="topk", fraction=0.2, scope="global")
    t = TrimSpec(kind="topk", fraction=0.2, scope="tensor")
    assert kept_fraction(g) == 1.0 and kept_fraction(t) == 0.2  # a global trim may keep a whole tensor
    small, big = client_block(2 << 30, g), client_block(8 << 30, g)
    assert MIN_BLOCK <= small < big and 3.9 < (big * 84 + FIXED_BYTES) / (small * 84 + FIXED_BYTES) < 4.1
    assert client_block(2 << 30, t) > 2 * small  # fewer survivors per element: a larger block
    assert queue_bytes(small, g) >= 24 * small
    with pytest.raises(ValueError, match="too small for a client: give at least"):
        client_block(FIXED_BYTES + 1000, g)


def test_prefetch_holds_at_most_max_bytes_ahead():
    """Items of 6 bytes under a 10-byte bound: one waits in the queue, the producer holds
    the next, however deep the queue could be by count."""
    made = []

    def source():
        for i in range(20):
            made.append(i)
            yield bytes(6)

    with Prefetch(source, 10, "test-bytes", max_bytes=10, weigh=len) as items:
        deadline = time.monotonic() + 30
        while len(made) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert len(made) == 2  # one queued, one waiting for room: not 10
        assert sum(1 for _ in items) == 20
    one = Prefetch(lambda: iter([bytes(50), bytes(1)]), 4, "test-big", max_bytes=10, weigh=len)
    assert [len(x) for x in one] == [50, 1]  # an item larger than the bound still passes, alone
    one.close()


def _family(tmp_path, shapes, dtype, seed):
    base, tuned = random_family(shapes, 1, seed=seed, dtype=dtype)
    tuned = [{n: base[n] + torch.round((t[n] - base[n]) * 300) / 300 for n in t} for t in tuned]  # ties at boundaries
    return make_model(tmp_path / f"b{seed}", base), make_model(tmp_path / f"f{seed}", tuned[0])


def _upload(b, f, trim, block=None) -> tuple[bytes, TrimStats]:
    stats = TrimStats()
    buf = io.BytesIO()
    with ModelReader(b) as rb, ModelReader(f) as rf:
        thr = contribution_threshold(rb, rf, trim, block=block)
        write_contribution(buf, contribution_header("fp", "0", trim, threshold=thr),
                           iter_contribution(rb, rf, trim, model_key="0", threshold=thr, stats=stats, block=block))
    return buf.getvalue(), stats


@HSET
@given(rows=st.integers(1, 40), cols=st.integers(1, 24), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       trim=st.sampled_from(TRIMS), block=st.integers(1, 200), seed=st.integers(0, 50))
def test_span_records_equal_whole_ones(tmp_path_factory, rows, cols, dtype, trim, block, seed):
    """Whatever the block, the records read back (joined) as the whole-tensor ones, and the
    trim's figures agree."""
    tmp = tmp_path_factory.mktemp("spans")
    b, f = _family(tmp, {"emb": (rows, cols), "w": (7, 5), "n": (5,)}, dtype, seed)
    whole, s1 = _upload(b, f, trim, block=1 << 30)
    spans, s2 = _upload(b, f, trim, block=block)
    (h1, t1), (h2, t2) = read_stream(io.BytesIO(whole)), read_stream(io.BytesIO(spans))
    assert h1 == h2
    for a, c in zip(list(t1), list(t2), strict=True):
        assert (a.name, a.shape, a.values.dtype) == (c.name, c.shape, c.values.dtype)
        assert torch.equal(a.indices, c.indices) and torch.equal(a.values, c.values), a.name
    assert (s1.nnz, s1.numel, s1.threshold) == (s2.nnz, s2.numel, s2.threshold)
    _, raw = read_stream(io.BytesIO(spans), spans=True)
    assert max((t.stop - t.start for t in raw), default=0) <= max(block, 5 * 7)


def _two_pass(b, f, fraction) -> float:
    with ModelReader(b) as rb, ModelReader(f) as rf:
        ts = mergeable(rb.manifest(), ())
        g = GlobalThreshold(sum(t.numel for t in ts), fraction)
        for t in ts:
            for _, tau in _tau_blocks(rb, rf, t, "cpu"):
                g.add_coarse(tau)
        g.close_coarse()
        for t in ts:
            for _, tau in _tau_blocks(rb, rf, t, "cpu"):
                g.add_fine(tau)
        return g.value


@pytest.mark.parametrize("sample, ranks, widest", [
    (1 << 20, 0.02, 1 << 21),  # the whole (small) model sampled: the window holds the rank
    (64, 0.02, 1 << 21),  # a rough sample of runs
    (64, 0.0, 0),  # an empty window: missed, the two passes settle it
])
@pytest.mark.parametrize("fraction", [0.2, 0.013, 0.6, 0.9999])
def test_one_pass_threshold_equals_the_two_pass_select(tmp_path, monkeypatch, sample, ranks, widest, fraction):
    monkeypatch.setattr(threshold, "SAMPLE", sample)
    monkeypatch.setattr(threshold, "SAMPLE_RUNS", 16)
    monkeypatch.setattr(threshold, "WINDOW_RANKS", ranks)
    monkeypatch.setattr(threshold, "MAX_WINDOW", widest)
    if not widest:
        monkeypatch.setattr(threshold, "window", lambda sample, q: (0, 0))
    b, f = _family(tmp_path, {"emb": (60, 16), "w": (16, 16), "n": (16,)}, torch.float32, 3)
    trim = TrimSpec(kind="topk", fraction=fraction, scope="global")
    stages = []

    class Rec:
        def stage(self, desc, total):
            stages.append(desc)

        def update(self, n):
            pass

    with ModelReader(b) as rb, ModelReader(f) as rf:
        got = contribution_threshold(rb, rf, trim, progress=Rec(), block=100)
    assert got == _two_pass(b, f, fraction)
    if not widest:
        assert stages == ["histogram", "histogram (coarse)", "histogram (fine)"]
    elif sample > 2000:
        assert stages == ["histogram"]


def test_one_pass_threshold_rejects_nan(tmp_path):
    base, tuned = random_family({"w": (8, 8)}, 1, seed=1)
    tuned[0]["w"][3, 3] = float("nan")
    b, f = make_model(tmp_path / "b", base), make_model(tmp_path / "f", tuned[0])
    with ModelReader(b) as rb, ModelReader(f) as rf, pytest.raises(ValueError, match="non-finite"):
        contribution_threshold(rb, rf, TrimSpec(kind="topk", fraction=0.2, scope="global"))


def test_submit_pipeline_threads_stop(tmp_path):
    """No thread of a finished pipeline is left behind (the byte bound's waits end)."""
    before = {t.name for t in threading.enumerate()}
    with Prefetch(lambda: iter([bytes(8)] * 5), 2, "test-stop", max_bytes=8, weigh=len) as items:
        next(items)
    assert {t.name for t in threading.enumerate()} - before == set()
