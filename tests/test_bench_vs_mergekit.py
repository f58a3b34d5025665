"""benchmarks/bench_vs_mergekit.py without mergekit: the measuring launcher, the table and
goal rendering, the scale fits, and one real run of the tiesfed rows (both trim scopes and a
federated round over mutual TLS, every party its own process) on a ~2M-parameter family."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from benchmarks import bench_vs_mergekit as bvm
from benchmarks.figures import replace_blocks


def test_launcher_measures_wall_rss_and_exit_code(tmp_path: Path) -> None:
    big = bvm.measure([sys.executable, "-c", "import time; b = bytearray(300 * 2**20); time.sleep(0.3)"],
                      tmp_path / "big.log")
    small = bvm.measure([sys.executable, "-S", "-c", "pass"], tmp_path / "small.log")
    assert big["rc"] == 0 and big["wall_s"] >= 0.3
    assert big["peak_rss_mib"] >= 300, big  # the child's own peak, not the launcher's
    assert 0 < small["peak_rss_mib"] < 100, small  # not this (torch-importing) process's RSS
    failed = bvm.Measured([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], tmp_path / "f.log")
    assert failed.result(check=False)["rc"] == 3
    with pytest.raises(RuntimeError, match="boom"):
        failed.result()


def test_launcher_forwards_sigterm(tmp_path: Path) -> None:
    m = bvm.Measured([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
                     tmp_path / "sleep.log")
    import time

    deadline = time.monotonic() + 30
    while "up" not in m.tail() and time.monotonic() < deadline:
        time.sleep(0.05)
    m.terminate()
    r = m.result(30, check=False)
    assert r["rc"] == -15 and r["wall_s"] < 30


FAKE = {
    "config": {"params": 134_000_000, "vocab": 32000, "hidden": 768, "layers": 12, "repeat": 1},
    "meta": {"cpus": 2, "torch": "2.13.0", "date": "2026-01-02T03:04:05+00:00"},
    "mergekit": {"wall_s": 100.0, "peak_rss_mib": 2000.0},
    "tensor": {"wall_s": 40.0, "peak_rss_mib": 1500.0},
    "default": {"wall_s": 60.0, "peak_rss_mib": 1000.0},
    "federated": {"wall_s": 90.0, "peak_rss_mib": 800.0, "listen_s": 2.0,
                  "submits": [{"wall_s": 30.0}] * 3, "fetch": {"end": 110.0}, "coordinator": {"start": 20.0},
                  "window": {"first_upload": 30.0, "finalized": 70.0, "finalize_s": 4.0}},
    "tensor_vs_mergekit": {"identical": False, "differing": 13_400, "fraction": 1e-4, "max_abs_diff": 1e-3,
                           "selection": 4, "max_rounding_diff": 9e-10, "ties": {"at_tie": 4, "other": 0}},
    "default_vs_federated": {"identical": True, "fraction": 0.0},
}


def test_table_goals_and_block() -> None:
    table = bvm.render_table(FAKE)
    lines = table.splitlines()
    assert len(lines) == 6 and "mergekit" in lines[2] and "| 1.00 | 1.00 |" in lines[2]
    assert "| 40.0 | 1573 | 0.40 | 0.75 |" in lines[3]  # 1500 MiB = 1573 MB
    assert "| 0.90 | 0.40 |" in lines[5]
    verdicts = [p for _, p, _ in bvm.goals(FAKE)]
    assert verdicts == [True, False, True]  # tensor 0.40x; default 0.60x wall fails; federated 0.90x
    tp = bvm.throughput(FAKE)
    assert tp["coordinator_mparams_s"] == pytest.approx(134 * 3 / 40)
    assert tp["finalize_mparams_s"] == pytest.approx(134 * 3 / 4)
    block = bvm.render_block(FAKE)
    assert "bit-identical" in block and "PASS" in block and "FAIL" in block
    readme = f"a\n<!-- figures:{bvm.BLOCK} -->\nOLD-BODY\n<!-- /figures:{bvm.BLOCK} -->\nb\n"
    new = replace_blocks(readme, {bvm.BLOCK: block})
    assert "OLD-BODY" not in new and table in new and new.startswith("a\n") and new.endswith("b\n")
    no_mk = {k: v for k, v in FAKE.items() if k != "mergekit"}
    assert "| – | – |" in bvm.render_table(no_mk)
    assert [p for _, p, _ in bvm.goals(no_mk)] == [None, None, None]


def test_shapes() -> None:
    assert bvm.shapes_for(134e6) == {"vocab": 32000, "hidden": 768, "inter": 2048, "layers": 12}
    for target in (10e6, 30e6, 134e6, 400e6, 1e9):
        assert abs(bvm.count_params(bvm.shapes_for(target)) / target - 1) < 0.05


def test_tree_sampler_sees_grandchildren(tmp_path: Path) -> None:
    """Ray's actors are grandchildren of the coordinator that its rusage never counts."""
    from benchmarks.measure import TreeSampler

    code = ("import subprocess, sys; subprocess.run([sys.executable, '-c', "
            "'import time; b = bytearray(200 * 2**20); b[::4096] = bytes(len(b[::4096])); time.sleep(1.5)'])")
    m = bvm.Measured([sys.executable, "-c", code], tmp_path / "tree.log")
    tree = TreeSampler(m.proc.pid, period=0.05)
    m.result(60)
    rows = tree.stop()
    assert len(rows) >= 3  # launcher, child, grandchild
    assert rows[0]["peak_rss_mib"] >= 200, rows  # the grandchild's 200 MiB, seen


def test_tiesfed_rows_on_a_small_family(tmp_path: Path, capsys) -> None:
    """The real thing minus mergekit: every row measured in its own process, outputs compared."""
    args = argparse.Namespace(work=str(tmp_path), mergekit_venv=str(tmp_path / "never"), params=2e6, repeat=1,
                              skip_mergekit=True, skip_federated=False)
    data = bvm.run_all(args, log=lambda *a, **k: None)
    assert not (tmp_path / "never").exists()  # --skip-mergekit installs nothing
    rows = bvm.table_rows(data)
    assert [r["key"] for r in rows] == ["tensor", "default", "federated"]
    for r in rows:
        assert r["wall_s"] > 0 and r["peak_rss_mib"] > 50 and r["wall_ratio"] is None
    f = data["federated"]
    assert f["listen_s"] < f["wall_s"] and len(f["submits"]) == 3
    assert all(s["peak_rss_mib"] > 50 and s["bytes_sent"] > 0 for s in f["submits"])
    assert f["coordinator"]["peak_rss_mib"] > 50 and f["fetch"]["peak_rss_mib"] > 50
    assert data["default_vs_federated"]["identical"], data["default_vs_federated"]
    run = tmp_path / "run"
    for scope in ("tensor", "default"):
        assert list((run / f"out-tiesfed-{scope}").glob("*.safetensors"))
    # the two trim scopes are different merges of the same models
    assert not bvm.compare(run / "out-tiesfed-tensor", run / "out-tiesfed-default")["identical"]
    assert data["throughput"]["coordinator_mparams_s"] > 0
    bvm.report(data)
    out = capsys.readouterr().out
    assert "IDENTICAL" in out and f"<!-- figures:{bvm.BLOCK} -->" in out and "n/a:" in out
