"""`tiesfed merge` (the streamed engine) against the dense reference of the
paper's Algorithm 1, on sharded model families with conflicting signs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from tests.helpers import make_model, random_family, write_family
from tests.reference import reference_merge
from tiesfed.cli import main
from tiesfed.core.options import MergeConfig, MergeOptions, ModelEntry
from tiesfed.engine import merge
from tiesfed.io.model_io import ModelReader


def load_folder(path: Path) -> dict[str, torch.Tensor]:
    with ModelReader(path) as r:
        return {n: r.get(n).clone() for n in r.names}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return write_family(tmp_path_factory.mktemp("family"), 3)


def assert_close_to_reference(got: dict, want: dict, rel: float = 1e-6):
    assert set(got) == set(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype and g.shape == w.shape, name
        if not w.dtype.is_floating_point:
            assert torch.equal(g, w), name
            continue
        scale = max(w.float().abs().max().item(), 1e-30)
        diff = (g.float() - w.float()).abs().max().item()
        assert diff <= rel * scale, f"{name}: max abs diff {diff} > {rel} x {scale}"


CASES = [
    {},
    {"trim": "tensor"},
    {"k": 5},
    {"k": 60, "election": "count"},
    {"zero_sign": "positive", "election": "count"},
    {"disjoint": "sum"},
    {"disjoint": "max"},
    {"min_support": 2},
    {"lam": 1.7},
    {"method": "task_arithmetic", "lam": 0.5},
    {"method": "average"},
    {"method": "dare_ties", "k": 50, "seed": 3},
    {"k": 100},
    {"value_dtype": "float16"},
    {"keep_base": ("embed.*",)},
]


@pytest.mark.parametrize("opts", CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_engine_equals_dense_reference(family, tmp_path, opts):
    base, tuned, base_dir, paths = family
    cfg = MergeConfig(base_model=str(base_dir), models=[ModelEntry(model=str(p)) for p in paths],
                      options=MergeOptions(**opts))
    report = merge(cfg, tmp_path / "out", progress=False, shard_bytes=4096)
    ref_opts = dict(opts)
    vd = ref_opts.pop("value_dtype", None)
    want = reference_merge(base, tuned, value_dtype=getattr(torch, vd) if vd else None, **ref_opts)
    assert_close_to_reference(load_folder(tmp_path / "out"), want)
    assert len(report.models) == 3
    assert all(0 < m.kept_norm_share <= 1 for m in report.models)


@pytest.mark.parametrize("semantics", ["mergekit", "peft"])
@pytest.mark.parametrize("election", ["mass", "count"])
def test_weighted_merges(family, tmp_path, semantics, election):
    base, tuned, base_dir, paths = family
    weights = [1.0, 2.5, 0.5]
    cfg = MergeConfig(
        base_model=str(base_dir),
        models=[ModelEntry(model=str(p), weight=w) for p, w in zip(paths, weights)],
        options=MergeOptions(weight_semantics=semantics, election=election),
    )
    merge(cfg, tmp_path / "out", progress=False)
    want = reference_merge(base, tuned, weights=weights, weight_semantics=semantics, election=election)
    assert_close_to_reference(load_folder(tmp_path / "out"), want)


def test_per_model_density(family, tmp_path):
    base, tuned, base_dir, paths = family
    dens = [0.1, None, 0.5]
    cfg = MergeConfig(base_model=str(base_dir),
                      models=[ModelEntry(model=str(p), density=d) for p, d in zip(paths, dens)])
    report = merge(cfg, tmp_path / "out", progress=False)
    assert_close_to_reference(load_folder(tmp_path / "out"), reference_merge(base, tuned, densities=dens))
    assert report.models[0].density < report.models[1].density < report.models[2].density


def test_bf16_family(tmp_path):
    base, tuned, base_dir, paths = write_family(tmp_path, 3, seed=1, dtype=torch.bfloat16)
    cfg = MergeConfig(base_model=str(base_dir), models=[ModelEntry(model=str(p)) for p in paths])
    merge(cfg, tmp_path / "out", progress=False)
    got = load_folder(tmp_path / "out")
    assert got["lm_head.weight"].dtype == torch.bfloat16
    assert_close_to_reference(got, reference_merge(base, tuned))


def test_majority_rule_patches_ties(tmp_path):
    """Count election with two opposed models: every overlap is a tie, decided by
    the model-wide majority, which is negative here (so the engine must patch)."""
    base = {"a": torch.zeros(8), "b": torch.zeros(4)}
    t1 = {"a": torch.tensor([1.0, 2, 0, 0, -1, -1, -1, 0]), "b": torch.tensor([-3.0, -1, 0, 0])}
    t2 = {"a": torch.tensor([-2.0, -1, 0, 0, -1, 0, 0, 0]), "b": torch.tensor([1.0, -1, 0, 0])}
    make_model(tmp_path / "base", base)
    p1, p2 = make_model(tmp_path / "t1", t1), make_model(tmp_path / "t2", t2)
    opts = MergeOptions(k=100, election="count")
    cfg = MergeConfig(base_model=str(tmp_path / "base"), models=[ModelEntry(model=str(p1)), ModelEntry(model=str(p2))],
                      options=opts)
    report = merge(cfg, tmp_path / "out", progress=False)
    got = load_folder(tmp_path / "out")
    want = reference_merge(base, [t1, t2], k=100, election="count")
    assert report.majority_sign == -1 and report.tied_params == 3
    assert torch.equal(got["a"], want["a"]) and torch.equal(got["b"], want["b"])
    assert got["a"].tolist() == [-2.0, -1.0, 0, 0, -1.0, -1.0, -1.0, 0]


def test_all_zero_task_vectors_and_one_model(tmp_path):
    base, tuned = random_family({"w": (8, 8)}, 1, seed=2)
    make_model(tmp_path / "base", base)
    same = make_model(tmp_path / "same", base)
    one = make_model(tmp_path / "one", tuned[0])
    cfg = MergeConfig(base_model=str(tmp_path / "base"), models=[ModelEntry(model=str(same))])
    merge(cfg, tmp_path / "o1", progress=False)
    assert torch.equal(load_folder(tmp_path / "o1")["w"], base["w"])
    # one model, k = 100: TIES is task arithmetic
    for method, out in (("ties", "o2"), ("task_arithmetic", "o3")):
        cfg = MergeConfig(base_model=str(tmp_path / "base"), models=[ModelEntry(model=str(one))],
                          options=MergeOptions(method=method, k=100))
        merge(cfg, tmp_path / out, progress=False)
    assert torch.equal(load_folder(tmp_path / "o2")["w"], load_folder(tmp_path / "o3")["w"])
    assert torch.allclose(load_folder(tmp_path / "o2")["w"], tuned[0]["w"], atol=1e-6)


def test_mismatched_model_is_a_clear_error(family, tmp_path):
    base, tuned, base_dir, paths = family
    bad = dict(tuned[0])
    bad["lm_head.weight"] = torch.zeros(95, 16)
    badp = make_model(tmp_path / "bad", bad)
    cfg = MergeConfig(base_model=str(base_dir), models=[ModelEntry(model=str(paths[0])), ModelEntry(model=str(badp))])
    with pytest.raises(ValueError, match="lm_head.weight"):
        merge(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "model.safetensors").exists()
    # ... unless the user pins it to the base
    cfg = cfg.model_copy(update={"options": MergeOptions(keep_base=("lm_head.*",))})
    merge(cfg, tmp_path / "out", progress=False)
    assert torch.equal(load_folder(tmp_path / "out")["lm_head.weight"], base["lm_head.weight"])


def test_cli_merge_report_and_side_files(family, tmp_path):
    base, tuned, base_dir, paths = family
    out = tmp_path / "out"
    res = CliRunner().invoke(
        main,
        ["merge", str(base_dir), *map(str, paths), "-o", str(out), "--k", "30", "--lambda", "1.2",
         "--report", str(tmp_path / "r.json"), "--shard-size", "8KB", "-q", "--upload-size"],
    )
    assert res.exit_code == 0, res.output
    assert "sign conflicts" in res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert 0 < rep["upload_bits_per_param"] < 32 and all(m["upload_bytes"] > 0 for m in rep["models"])
    assert rep["options"]["k"] == 30 and len(rep["models"]) == 3
    assert all(0 < m["conflict_rate"] < 1 for m in rep["models"])
    assert json.loads((out / "config.json").read_text())["model_type"] == "toy"
    assert (out / "model.safetensors.index.json").exists()
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    merged = {}
    for f in sorted(set(idx["weight_map"].values())):
        merged.update(load_file(str(out / f)))
    assert_close_to_reference(merged, reference_merge(base, tuned, k=30, lam=1.2))


def test_cli_yaml_config(family, tmp_path):
    base, tuned, base_dir, paths = family
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(
        "method: ties\n"  # tiesfed's own format (mergekit's names `merge_method`)
        f"base_model: {base_dir}\n"
        "parameters:\n  density: 0.3\n  lambda: 0.9\n"
        "models:\n"
        + "".join(f"  - model: {p}\n    parameters:\n      weight: {w}\n" for p, w in zip(paths, [1, 2, 1]))
    )
    res = CliRunner().invoke(main, ["merge", "--config", str(cfg), "-o", str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    want = reference_merge(base, tuned, k=30, lam=0.9, weights=[1, 2, 1])
    assert_close_to_reference(load_folder(tmp_path / "out"), want)


def test_cli_rejects_bad_options(family, tmp_path):
    _, _, base_dir, paths = family
    res = CliRunner().invoke(main, ["merge", str(base_dir), str(paths[0]), "-o", str(tmp_path / "o"), "--k", "0"])
    assert res.exit_code != 0 and "k" in res.output
    res = CliRunner().invoke(main, ["merge", str(base_dir), str(paths[0]), "-o", str(tmp_path / "o"), "--weights", "1,2"])
    assert res.exit_code != 0 and "weights" in res.output


def test_non_finite_task_vector_is_rejected(family, tmp_path):
    base, tuned, base_dir, paths = family
    bad = dict(tuned[0])
    bad["layers.0.norm.weight"] = bad["layers.0.norm.weight"].clone()
    bad["layers.0.norm.weight"][3] = float("nan")
    badp = make_model(tmp_path / "nan", bad)
    for k in (20, 100):
        cfg = MergeConfig(base_model=str(base_dir), models=[ModelEntry(model=str(badp))], options=MergeOptions(k=k))
        with pytest.raises(ValueError, match=r"layers\.0\.norm\.weight.*non-finite"):
            merge(cfg, tmp_path / f"out{k}", progress=False)


@pytest.mark.parametrize("opts", [{}, {"trim": "tensor"}, {"k": 5, "min_support": 2}, {"disjoint": "max"},
                                  {"method": "task_arithmetic"}, {"zero_sign": "positive", "election": "count"}],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_block_size_changes_no_bit(family, tmp_path, monkeypatch, opts):
    """Folding and finalizing a tensor in blocks (the memory bound) gives the very
    same bytes and report as one block per tensor."""
    import tiesfed.engine.tensor as tensor

    cfg = MergeConfig(base_model=str(family[2]), models=[ModelEntry(model=str(p)) for p in family[3]],
                      options=MergeOptions(**opts))
    whole = merge(cfg, tmp_path / "whole", progress=False)
    monkeypatch.setattr(tensor, "BLOCK", 37)
    blocks = merge(cfg, tmp_path / "blocks", progress=False)
    a, b = load_folder(tmp_path / "whole"), load_folder(tmp_path / "blocks")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    strip = lambda r: {**r.to_json(), "wall_seconds": 0, "output": ""}  # noqa: E731
    assert strip(whole) == strip(blocks)


@pytest.mark.parametrize("k", [20.0, 0.5, 100.0])
def test_global_trim_keeps_what_a_client_uploads(family, k):
    """The merge pass settles each model's threshold from one histogram pass and the
    threshold bucket's candidates: the threshold and the survivors equal the
    client's (two histogram passes, then the trim)."""
    from tiesfed.client.contribution import TrimStats, contribution_threshold, iter_contribution
    from tiesfed.core.methods import get_method

    cfg = MergeConfig(base_model=str(family[2]), models=[ModelEntry(model=str(p)) for p in family[3]],
                      options=MergeOptions(k=k))
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        report = merge(cfg, out, progress=False, overwrite=True)
    trim = get_method("ties").trim_spec(cfg.options)
    for i, path in enumerate(family[3]):
        stats = TrimStats()
        with ModelReader(family[2]) as b, ModelReader(path) as ft:
            thr = contribution_threshold(b, ft, trim)
            list(iter_contribution(b, ft, trim, model_key=str(i), threshold=thr, stats=stats))
        m = report.models[i]
        assert (m.threshold, m.nnz) == (thr, stats.nnz)
        assert m.kept_norm_share == pytest.approx(stats.kept_norm_share, rel=1e-5)
