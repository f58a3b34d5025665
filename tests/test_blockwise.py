"""Sub-tensor streaming: a tensor too large for the memory budget is read, trimmed,
merged and written in blocks of its elements, with the very same bytes and report
as when every tensor is handled whole (issue 14)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tiesfed.engine.local as local
import tiesfed.engine.tensor as tensor
from tests.helpers import TOY_SPEC, make_model, random_family
from tiesfed.core.options import MergeConfig, MergeOptions, ModelEntry
from tiesfed.engine import merge
from tiesfed.io.model_io import ModelReader, ShardedWriter


def _family(root: Path, spec: dict, n: int, dtype: torch.dtype = torch.float32, seed: int = 0,
            shards: int = 1) -> tuple[Path, list[Path]]:
    base, tuned = random_family(spec, n, seed=seed, dtype=dtype)
    b = make_model(root / "base", base, shards=shards, config={"model_type": "toy"})
    return b, [make_model(root / f"ft{i}", t, shards=shards) for i, t in enumerate(tuned)]


def _load(path: Path) -> dict[str, torch.Tensor]:
    with ModelReader(path) as r:
        return {n: r.get(n).clone() for n in r.names}


def _same(a: Path, b: Path) -> None:
    x, y = _load(a), _load(b)
    assert x.keys() == y.keys()
    for n in x:
        assert x[n].dtype == y[n].dtype and torch.equal(x[n].view(-1).view(torch.uint8), y[n].view(-1).view(torch.uint8)), n


def _report(r) -> dict:
    """The report, less what may differ: time, folder, and the last bits of a float
    sum of squares (the kept-norm share) accumulated per block."""
    d = {**r.to_json(), "wall_seconds": 0, "output": ""}
    for m in d["models"]:
        m["kept_norm_share"] = round(m["kept_norm_share"], 5)
    return d


def _whole_and_blocks(monkeypatch, cfg: MergeConfig, out: Path, block: int, acc_block: int) -> None:
    whole = merge(cfg, out / "whole", progress=False)
    with monkeypatch.context() as m:
        m.setattr(local, "block_elements", lambda *a: block)
        m.setattr(tensor, "BLOCK", acc_block)
        blocks = merge(cfg, out / "blocks", progress=False)
    _same(out / "whole", out / "blocks")
    assert _report(whole) == _report(blocks)


OPTIONS = [
    {},
    {"trim": "tensor"},
    {"trim": "tensor", "zero_sign": "positive"},
    {"k": 3},
    {"k": 60, "election": "count", "min_support": 2},
    {"disjoint": "max"},
    {"method": "dare_ties", "k": 50, "seed": 7},
    {"method": "task_arithmetic", "lam": 0.5},
    {"method": "average"},
    {"value_dtype": "float16"},
    {"keep_base": ("embed.*",)},
    {"k": 100},
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_blocks_give_the_whole_tensor_result(tmp_path, monkeypatch, opts):
    base, fts = _family(tmp_path, TOY_SPEC, 3, shards=2)
    cfg = MergeConfig(base_model=str(base), models=[ModelEntry(model=str(p)) for p in fts],
                      options=MergeOptions(**opts))
    _whole_and_blocks(monkeypatch, cfg, tmp_path, block=97, acc_block=13)


def test_weighted_bf16_blocks(tmp_path, monkeypatch):
    base, fts = _family(tmp_path, TOY_SPEC, 3, dtype=torch.bfloat16)
    cfg = MergeConfig(base_model=str(base), models=[ModelEntry(model=str(p), weight=w) for p, w in
                                                    zip(fts, (1.0, 0.5, 2.0))],
                      options=MergeOptions(trim="tensor"))
    _whole_and_blocks(monkeypatch, cfg, tmp_path, block=50, acc_block=7)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.integers(1, 700), min_size=1, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    k=st.sampled_from([1.0, 7.5, 20.0, 50.0, 99.0]),
    trim=st.sampled_from(["global", "tensor"]),
    zero_sign=st.sampled_from(["majority", "positive"]),
    block=st.integers(16, 400),
    quantize=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_property_blocks_equal_whole(tmp_path_factory, monkeypatch, sizes, dtype, k, trim, zero_sign, block,
                                     quantize, seed):
    """Any shapes, dtypes, k, block sizes; `quantize` makes many |τ| equal, so ties
    at a threshold (and their lowest-index rule) are exercised."""
    root = tmp_path_factory.mktemp("prop")
    spec = {f"t{i}.weight": (n,) for i, n in enumerate(sizes)}
    base, tuned = random_family(spec, 3, seed=seed, dtype=torch.float32)
    if quantize:
        tuned = [{n: base[n] + torch.round((t[n] - base[n]) * 300) / 300 for n in t} for t in tuned]
    b = make_model(root / "base", {n: t.to(dtype) for n, t in base.items()})
    fts = [make_model(root / f"ft{i}", {n: x.to(dtype) for n, x in t.items()}) for i, t in enumerate(tuned)]
    cfg = MergeConfig(base_model=str(b), models=[ModelEntry(model=str(p)) for p in fts],
                      options=MergeOptions(k=k, trim=trim, zero_sign=zero_sign))
    _whole_and_blocks(monkeypatch, cfg, root, block=block, acc_block=max(1, block // 3))


def test_get_range_and_write_part_round_trip(tmp_path):
    t = {"a": torch.arange(1000, dtype=torch.float32).reshape(10, 100), "b": torch.randn(7).to(torch.bfloat16)}
    src = make_model(tmp_path / "src", t)
    with ModelReader(src) as r:
        assert torch.equal(r.get_range("a", 0, 1000), t["a"].reshape(-1))
        assert torch.equal(r.get_range("a", 333, 334), torch.tensor([333.0]))
        assert torch.equal(r.get_range("b", 2, 7), t["b"][2:])
        with pytest.raises(Exception, match="outside"):
            r.get_range("a", 10, 1001)
        plan = [(n, tuple(r.info(n).shape), r.info(n).dtype) for n in r.names]
        with ShardedWriter(tmp_path / "out", plan) as w:
            for n in r.names:
                numel = r.info(n).numel
                for lo in range(0, numel, 300):
                    w.write_part(n, r.get_range(n, lo, min(lo + 300, numel)))
    _same(src, tmp_path / "out")


def test_write_part_refuses_too_many_elements(tmp_path):
    with ShardedWriter(tmp_path / "out", [("a", (4,), torch.float32)]) as w:
        w.write_part("a", torch.zeros(3))
        with pytest.raises(Exception, match="exceed"):
            w.write_part("a", torch.zeros(2))
        w.write_part("a", torch.zeros(1))


def test_max_memory_too_small_names_the_flag(tmp_path):
    base, fts = _family(tmp_path, TOY_SPEC, 2)
    cfg = MergeConfig(base_model=str(base), models=[ModelEntry(model=str(p)) for p in fts])
    with pytest.raises(ValueError, match="--max-memory"):
        merge(cfg, tmp_path / "out", progress=False, max_memory=100 << 20)


def test_budget_splits_a_large_tensor(tmp_path):
    """A real budget: 2M-element tensors under a budget that fits only ~1M of them
    are done in blocks, and the result equals the whole-tensor merge."""
    spec = {"big.weight": (2048, 1024), "small.weight": (64,)}
    base, fts = _family(tmp_path, spec, 2)
    cfg = MergeConfig(base_model=str(base), models=[ModelEntry(model=str(p)) for p in fts],
                      options=MergeOptions(trim="tensor"))
    merge(cfg, tmp_path / "whole", progress=False)
    budget = local.FIXED_BYTES + 40 * (1 << 20)
    trimmers = [local.ModelTrimmer(local.get_method("ties").trim_spec(cfg.options), str(i), "", 1, None)
                for i in range(2)]
    assert local.block_elements(budget, trimmers) < 2048 * 1024
    merge(cfg, tmp_path / "budget", progress=False, max_memory=budget)
    _same(tmp_path / "whole", tmp_path / "budget")


@pytest.mark.parametrize("span", [None, 53], ids=["whole-records", "span-records"])
def test_apply_merged_in_blocks_equals_whole(tmp_path, monkeypatch, span):
    """A client's fetch (and a shard actor's model write) applies τ_m one record (a
    whole tensor or a span) at a time and block by block over the block size: the same
    bytes as one whole-tensor apply, and never the whole tensor's τ_m when it came in spans."""
    import tiesfed.io.materialize as materialize
    from tiesfed.protos.codec import SparseTensor, StreamWriter

    base_dir, _ = _family(tmp_path, TOY_SPEC, 1, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    path = tmp_path / "merged.tfs"
    with ModelReader(base_dir) as base:
        with open(path, "wb") as f:
            w = StreamWriter(f, {"kind": "merged", "lambda": 1.3, "base_fingerprint": "fp", "method": "ties"})
            for t in base.manifest():
                if not t.dtype.is_floating_point:
                    continue
                idx = torch.sort(torch.randperm(t.numel, generator=g)[: t.numel // 3]).values
                whole = SparseTensor(name=t.name, shape=tuple(t.shape), indices=idx,
                                     values=torch.randn(idx.numel(), generator=g) * 0.01)
                if span is None or t.numel <= span:
                    w.write(whole)
                    continue
                for lo in range(0, t.numel, span):
                    hi = min(lo + span, t.numel)
                    a, b = (int(x) for x in torch.searchsorted(idx, torch.tensor([lo, hi])))
                    w.write(SparseTensor(t.name, tuple(t.shape), idx[a:b], whole.values[a:b], lo, hi - lo))
            w.close()
        materialize.apply_merged(base, path, tmp_path / "whole")
        monkeypatch.setattr(materialize, "APPLY_BLOCK", 37)
        largest = []
        real_apply = materialize._apply
        monkeypatch.setattr(materialize, "_apply", lambda theta0, st, *a: (
            largest.append(st.indices.numel() if st is not None else 0), real_apply(theta0, st, *a))[1])
        materialize.apply_merged(base, path, tmp_path / "blocks")
    _same(tmp_path / "whole", tmp_path / "blocks")
    assert not torch.equal(_load(tmp_path / "whole")["embed.weight"], _load(base_dir)["embed.weight"])
    if span is not None:  # one span's survivors at a time, never a whole tensor's
        assert max(largest) <= span


@pytest.mark.parametrize("trim_kw", [dict(kind="topk", fraction=0.2), dict(kind="topk", fraction=0.2, scope="tensor"),
                                     dict(kind="topk", fraction=0.013, scope="tensor"), dict(kind="dare", fraction=0.4, seed=5),
                                     dict(kind="none", fraction=1.0), dict(kind="topk", fraction=1.0)],
                         ids=lambda d: "-".join(str(v) for v in d.values()))
@pytest.mark.parametrize("quantize", [False, True])
def test_client_trims_large_tensors_in_blocks(tmp_path, monkeypatch, trim_kw, quantize):
    """A client reads a tensor over its block size in blocks and sends it as span records:
    the upload reads back as the very same tensors (joined), header and all."""
    import io

    import tiesfed.client.contribution as contribution
    from tiesfed.core.trim import TrimSpec

    base, tuned = random_family(TOY_SPEC, 1, seed=11, dtype=torch.float32)
    if quantize:  # many equal |τ|: ties at every boundary
        tuned = [{n: base[n] + torch.round((t[n] - base[n]) * 200) / 200 for n in t} for t in tuned]
    b = make_model(tmp_path / "base", {n: t.to(torch.bfloat16) if t.is_floating_point() else t for n, t in base.items()})
    f = make_model(tmp_path / "ft", {n: t.to(torch.bfloat16) if t.is_floating_point() else t for n, t in tuned[0].items()})
    trim = TrimSpec(**trim_kw)

    def upload() -> tuple[bytes, object]:
        stats = contribution.TrimStats()
        buf = io.BytesIO()
        with ModelReader(b) as rb, ModelReader(f) as rf:
            thr = contribution.contribution_threshold(rb, rf, trim)
            contribution.write_contribution(buf, contribution.contribution_header("fp", "0", trim, threshold=thr),
                                            contribution.iter_contribution(rb, rf, trim, model_key="0",
                                                                           threshold=thr, stats=stats))
        return buf.getvalue(), stats

    whole, s1 = upload()
    monkeypatch.setattr(contribution, "CLIENT_BLOCK", 41)
    blocks, s2 = upload()
    assert whole != blocks and b'"span":[41,41]' in blocks  # the large tensors went as span records
    from tiesfed.protos.codec import read_stream

    (h1, t1), (h2, t2) = read_stream(io.BytesIO(whole)), read_stream(io.BytesIO(blocks))
    assert h1 == h2
    for a, c in zip(list(t1), list(t2), strict=True):
        assert (a.name, a.shape, a.values.dtype) == (c.name, c.shape, c.values.dtype)
        assert torch.equal(a.indices, c.indices) and torch.equal(a.values, c.values)
    assert (s1.nnz, s1.threshold) == (s2.nnz, s2.threshold)
    assert s1.kept_norm_share == pytest.approx(s2.kept_norm_share, rel=1e-5)
