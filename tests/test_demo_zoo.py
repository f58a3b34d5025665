"""The demo zoo and scoreboard, merged with a dense plain-torch reference (no engine)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tiesfed.demo import (
    ZooSpec,
    build_zoo,
    default_zoo_dir,
    evaluate,
    format_table,
    scoreboard,
    table_to_json,
)

SPEC = ZooSpec.small()


# --------------------------------------------------------------------------- dense reference merge

def dense_reference_merge(base_dir: Path, model_dirs: list, method: str, lam: float, out_dir: Path) -> Path:
    """Plain-torch merges, whole models in memory (fine for a tiny MLP).

    ties: trim each task vector to its top 20% magnitudes over all parameters
    (global, keep |τ| ≥ the k-th value), elect γ = sign(Σ τ̂), disjoint mean of
    the agreeing entries, θ0 + λ τ_m. task_arithmetic: θ0 + λ Σ τ.
    average: θ0 + λ mean τ (λ = 1 is the mean of the models).
    """
    base = load_file(str(Path(base_dir) / "model.safetensors"))
    names = sorted(base)
    theta0 = torch.cat([base[n].flatten() for n in names])
    taus = torch.stack([
        torch.cat([load_file(str(Path(d) / "model.safetensors"))[n].flatten() for n in names]) - theta0
        for d in model_dirs
    ])
    if method == "average":
        merged = taus.mean(0)
    elif method == "task_arithmetic":
        merged = taus.sum(0)
    elif method == "ties":
        n = taus.shape[1]
        kth = n - int(0.2 * n)  # keep the top 20%
        thresh = taus.abs().kthvalue(kth, dim=1, keepdim=True).values
        trimmed = torch.where(taus.abs() >= thresh, taus, torch.zeros_like(taus))
        gamma = torch.sign(trimmed.sum(0))
        agree = (torch.sign(trimmed) == gamma) & (trimmed != 0)
        merged = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    else:
        raise ValueError(method)
    theta = theta0 + lam * merged
    out = {}
    offset = 0
    for n in names:
        size = base[n].numel()
        out[n] = theta[offset:offset + size].view_as(base[n]).clone()
        offset += size
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(out, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text((Path(base_dir) / "config.json").read_text())
    return out_dir


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build_zoo(tmp_path_factory.mktemp("zoo") / "z", seed=0, spec=SPEC)


def _bytes(zoo_) -> dict[str, bytes]:
    folders = {"base": zoo_.base, **zoo_.tasks}
    return {f"{k}/{f}": (p / f).read_bytes() for k, p in folders.items() for f in ("model.safetensors", "config.json")}


# --------------------------------------------------------------------------- zoo

def test_layout_is_hf_style(zoo):
    assert zoo.built and set(zoo.tasks) == set(SPEC.tasks) and len(zoo.tasks) >= 3
    for folder in [zoo.base, *zoo.models]:
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["layer_sizes"] == list(SPEC.layer_sizes)
        state = load_file(str(folder / "model.safetensors"))
        assert all(t.dtype == torch.float32 for t in state.values())
        assert set(state) == {f"fc{i}.{k}" for i in (1, 2, 3) for k in ("weight", "bias")}
    # full fine-tuning: every tensor moved
    base = load_file(str(zoo.base / "model.safetensors"))
    ft = load_file(str(zoo.models[0] / "model.safetensors"))
    assert all(not torch.equal(base[n], ft[n]) for n in base)


def test_deterministic(zoo, tmp_path):
    again = build_zoo(tmp_path / "again", seed=0, spec=SPEC)
    assert again.built
    assert again.fingerprint() == zoo.fingerprint()
    assert _bytes(again) == _bytes(zoo)


def test_cached_and_repaired(zoo, tmp_path):
    root = tmp_path / "cache"
    shutil.copytree(zoo.root, root)
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    second = build_zoo(root, seed=0, spec=SPEC)
    assert not second.built  # reused, not retrained
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == mtimes
    assert second.fingerprint() == zoo.fingerprint()
    # an incomplete cache is rebuilt, to the same bytes
    (root / SPEC.tasks[1] / "model.safetensors").unlink()
    third = build_zoo(root, seed=0, spec=SPEC)
    assert third.built and third.fingerprint() == zoo.fingerprint()
    assert not build_zoo(root, seed=0, spec=SPEC).built
    # another seed does not pass for the cached one, and gives other weights
    other = build_zoo(root, seed=3, spec=SPEC)
    assert other.built and other.fingerprint() != zoo.fingerprint()


def test_env_cache_root(zoo, monkeypatch, tmp_path):
    monkeypatch.setenv("TIESFED_CACHE", str(tmp_path / "envcache"))
    expected = default_zoo_dir(0, SPEC)
    assert expected.parent == tmp_path / "envcache" and expected.name.startswith("demo-zoo-v1")
    assert default_zoo_dir(0).name == "demo-zoo-v1"
    shutil.copytree(zoo.root, expected)
    reused = build_zoo(seed=0, spec=SPEC)
    assert reused.root == expected and not reused.built


def test_finetunes_beat_base_on_own_task(zoo):
    base = evaluate(zoo.base, zoo, "test")
    for task, folder in zoo.tasks.items():
        own = evaluate(folder, zoo, "test")[task]
        assert own > base[task] + 0.3, (task, own, base[task])
        assert own > 0.85


# --------------------------------------------------------------------------- scoreboard

def test_scoreboard_with_dense_reference(zoo, tmp_path):
    seen = []
    table = scoreboard(zoo, dense_reference_merge, progress=seen.append, work_dir=tmp_path / "merges")
    text = format_table(table)
    print("\n" + text)
    assert [r.method for r in table.rows] == ["base", "individual", "average", "task_arithmetic", "ties"]
    base = table["base"].average
    assert table["ties"].average > base + 0.1
    assert table["task_arithmetic"].average > base + 0.05
    assert table["individual"].average > table["ties"].average
    assert table["ties"].lam in (0.3, 0.6, 1.0, 1.5, 2.0)
    assert table.merges == 11 and seen
    # λ is the validation argmax of the sweep
    for m in ("task_arithmetic", "ties"):
        sweep = table[m].sweep
        assert table[m].lam == max(sweep, key=lambda k: (sweep[k], -list(sweep).index(k)))
    lines = text.splitlines()
    assert "λ" in lines[0] and "average" in lines[0] and all(t in lines[0] for t in zoo.tasks)
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule aligned
    data = json.loads(table_to_json(table))
    assert data["tasks"] == list(zoo.tasks) and data["rows"][-1]["method"] == "ties"
