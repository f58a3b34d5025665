"""SpillAggregator: spill files replayed block by block give the resident Aggregator's bits."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_accumulators import SPECS as ACCUMULATOR_SPECS
from tests.test_federated import (  # noqa: F401  (family: the fixture)
    CLIENTS,
    FAST,
    assert_identical,
    family,
    load_folder,
    local_model,
)
from tiesfed.client.federated import fetch, submit
from tiesfed.coordinator.aggregator import Aggregator
from tiesfed.coordinator.rounds import finalize as finalize_mod
from tiesfed.coordinator.spill_aggregator import (
    DIR_PREFIX,
    SpillAggregator,
    SpillAggregatorFactory,
    block_elems_for,
)
from tiesfed.core.accumulators import FinalizeSpec, majority_sign
from tiesfed.protos.codec import encode_tensor, join_spans, read_stream

REPO = Path(__file__).resolve().parents[1]

# test_accumulators' option sets, and those whose finalize differs elsewhere
SPECS = [
    *ACCUMULATOR_SPECS,
    FinalizeSpec(zero_sign="positive"),
    FinalizeSpec(min_support=2),
    FinalizeSpec(sum_dtype=torch.float32),
    FinalizeSpec(weighted=True, sum_dtype=torch.float32),
]


def _record(g: torch.Generator, numel: int, density: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    keep = torch.rand(numel, generator=g) < density
    idx = keep.nonzero().flatten()
    vals = torch.randn(idx.numel(), generator=g).to(dtype)
    vals = torch.where(vals == 0, torch.ones_like(vals), vals)  # records carry nonzero values
    return idx, vals


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@settings(max_examples=60, deadline=None)
@given(
    spec=st.sampled_from(SPECS),
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=6),
    block=st.integers(1, 257),
    n_records=st.integers(0, 8),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    unfold=st.booleans(),
    span=st.integers(1, 400),
)
def test_bit_identical_to_resident(tmp_path_factory, spec, sizes, block, n_records, seed, dtype, unfold, span):
    g = torch.Generator().manual_seed(seed)
    manifest = [(f"t{i}", n) for i, n in enumerate(sizes)]
    res = Aggregator(manifest, spec)
    spill = SpillAggregator(manifest, spec, block_elems=block, buffer_bytes=int(seed % 3) * 200,
                            spill_root=tmp_path_factory.mktemp("spill"))
    weights = [1.0, 0.5, 2.0, -0.75, 1.0 / 3.0] if spec.weighted else [1.0]
    folded = []
    for r in range(n_records):
        name, numel = manifest[int(torch.randint(len(manifest), (1,), generator=g))]
        idx, vals = _record(g, numel, float(torch.rand(1, generator=g)), dtype)
        w = weights[r % len(weights)]
        for agg in (res, spill):
            agg.fold(name, idx, vals, w)
        folded.append((name, idx, vals, w))
        if unfold and spec.invertible and folded and r % 3 == 2:  # withdraw an earlier one
            name, idx, vals, w = folded.pop(0)
            for agg in (res, spill):
                agg.fold(name, idx, vals, w, direction=-1)
    assert spill.exact() == res.exact()
    assert spill.sign_balance() == res.sign_balance()
    majority = majority_sign(res.sign_balance())
    want = list(res.finalize(majority))
    got = list(spill.finalize(majority))
    assert [n for n, _ in got] == [n for n, _ in want]
    for (_, a), (_, b) in zip(got, want):
        assert _same(a, b)
    # the records the coordinator writes: the resident path's records (spans over `span`), bit for bit
    shapes = {n: (s,) for n, s in manifest}
    with patch.object(finalize_mod, "SPAN_ELEMS", span):
        expect = list(finalize_mod.merged_records(iter(want), shapes))
    got_recs = list(spill.finalize_records(majority, shapes, span))
    assert [(r.name, r.start, r.count) for r in got_recs] == [(r.name, r.start, r.count) for r in expect]
    for r, e in zip(got_recs, expect):
        assert torch.equal(r.indices, e.indices) and _same(r.values, e.values)
        assert encode_tensor(r) == encode_tensor(e)  # the same stream bytes
    spill.close()
    assert not spill.dir.exists()


def test_bad_input_changes_nothing(tmp_path):
    spec = FinalizeSpec(disjoint="max")
    spill = SpillAggregator([("a", 10)], spec, block_elems=4, spill_root=tmp_path)
    with pytest.raises(KeyError, match="not in the round's manifest"):
        spill.fold("b", torch.tensor([1]), torch.tensor([1.0]))
    with pytest.raises(IndexError, match="out of range"):
        spill.fold("a", torch.tensor([3, 10]), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="not invertible"):
        spill.fold("a", torch.tensor([3]), torch.tensor([1.0]), direction=-1)
    assert spill.disk_bytes() == 0
    assert spill.sign_balance() == 0
    assert [t.tolist() for _, t in spill.finalize(1)] == [[0.0] * 10]


def test_rebuilt_aggregator_starts_empty_and_stale_dirs_go(tmp_path):
    factory = SpillAggregatorFactory(tmp_path, block_elems=8)
    spec = FinalizeSpec()
    a = factory([("w", 20)], spec)
    a.fold("w", torch.tensor([0, 9, 19]), torch.tensor([1.0, -2.0, 3.0]))
    a.flush()
    assert a.disk_bytes() > 0
    b = factory([("w", 20)], spec)  # a rebuild: its own, empty directory
    assert b.dir != a.dir and b.disk_bytes() == 0
    assert all(v == 0 for _, t in b.finalize(1) for v in t.tolist())
    dead = tmp_path / f"{DIR_PREFIX}999999999-x"  # a killed coordinator's leftovers
    dead.mkdir()
    SpillAggregatorFactory(tmp_path)
    assert not dead.exists() and a.dir.exists() and b.dir.exists()
    a.close()
    b.close()


def test_block_from_budget():
    spec = FinalizeSpec()
    assert block_elems_for(spec, 1 << 30) == 1 << 23  # 1 GiB / (24 + 48) bytes, a power of two
    assert block_elems_for(spec, 1) == 1 << 10
    assert block_elems_for(FinalizeSpec(weighted=True), 1 << 40) == 1 << 24


def test_large_tensor_as_spans(tmp_path):
    """A tensor over the span size is written as span records from its element 0, each
    gathered from the block pieces it straddles (blocks of 128 start at flat element 0)."""
    spec = FinalizeSpec()
    manifest = [("small", 5), ("big", 1000), ("tail", 7)]
    spill = SpillAggregator(manifest, spec, block_elems=128, spill_root=tmp_path)
    res = Aggregator(manifest, spec)
    g = torch.Generator().manual_seed(3)
    for name, n in itertools.islice(itertools.cycle(manifest), 9):
        idx, vals = _record(g, n, 0.4, torch.float32)
        spill.fold(name, idx, vals)
        res.fold(name, idx, vals)
    m = majority_sign(res.sign_balance())
    recs = list(spill.finalize_records(m, {n: (s,) for n, s in manifest}, 300))
    big = [r for r in recs if r.name == "big"]
    assert [(r.start, r.count) for r in big] == [(0, 300), (300, 300), (600, 300), (900, 100)]
    assert [r.name for r in recs if r.count is None] == ["small", "tail"]
    dense = dict(res.finalize(m))["big"]
    t = join_spans(big)
    assert torch.equal(t.indices, dense.nonzero().flatten()) and torch.equal(t.values, dense[t.indices])


# ----------------------------------------------------------------------------- a real round, killed and restarted


def _serve(tmp_path: Path, family, pki, port_file: Path, listen: str = "127.0.0.1:0") -> subprocess.Popen:
    """`coordinator serve --aggregator spill` with mutual TLS, blocks of 1,024 parameters (the
    toy family's embedding and head straddle two blocks)."""
    cfg = tmp_path / "coordinator.yaml"
    cfg.write_text("spill_memory: 80000\n")
    port_file.unlink(missing_ok=True)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    p = subprocess.Popen(
        [sys.executable, "-m", "tiesfed.cli", "coordinator", "serve", "--config", str(cfg), "--spool",
         str(tmp_path / "spool"), "--base", str(family[0]), "--listen", listen, "--port-file", str(port_file),
         "--aggregator", "spill", "--tls", str(pki.server), "--round", "r1", "--clients", ",".join(CLIENTS)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serve.log", "ab"),
        stdin=subprocess.DEVNULL,
    )
    end = time.monotonic() + 120
    while not port_file.exists() or not port_file.read_text().strip():
        assert p.poll() is None and time.monotonic() < end, (tmp_path / "serve.log").read_text()[-3000:]
        time.sleep(0.1)
    return p


def test_round_with_spill_coordinator_killed_and_restarted_equals_local_merge(tmp_path, family, pki):
    base_dir, paths, _ = family
    port_file = tmp_path / "port"
    proc = _serve(tmp_path, family, pki, port_file)
    try:
        target = f"127.0.0.1:{int(port_file.read_text())}"
        for i, c in enumerate(CLIENTS[:2]):
            submit(target, "r1", c, base_dir, paths[i], retry=FAST, tls=pki.client(c))
        spill_root = tmp_path / "spool" / "spill"
        left = list(spill_root.glob(f"{DIR_PREFIX}{proc.pid}-*"))
        assert len(left) == 1  # this coordinator's spill directory (folds are buffered, then appended)
        proc.kill()  # kill -9 mid-round: its spill files stay behind
        proc.wait(30)
        proc = _serve(tmp_path, family, pki, port_file, listen=target)
        assert not left[0].exists()  # the dead coordinator's spill directory is removed at start
        submit(target, "r1", CLIENTS[2], base_dir, paths[2], retry=FAST, tls=pki.client(CLIENTS[2]))
        out = tmp_path / "fetched"
        fetch(target, "r1", CLIENTS[0], base_dir, out, timeout=120, retry=FAST, tls=pki.client(CLIENTS[0]))
    finally:
        proc.terminate()
        proc.wait(30)
    assert_identical(load_folder(out), local_model(family, tmp_path, [0, 1, 2]))
    assert_identical(load_folder(tmp_path / "spool" / "rounds" / "r1" / "model"), load_folder(out))
    with open(tmp_path / "spool" / "rounds" / "r1" / "merged.tfs", "rb") as f:
        records = list(read_stream(f, spans=True)[1])
    # tensors under the coordinator's span size go whole, as the resident path writes them,
    # though the embedding and head straddle the spill's 1,024-parameter blocks
    assert {"embed.weight", "lm_head.weight"} <= {t.name for t in records}
    assert all(t.count is None for t in records)
