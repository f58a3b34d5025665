"""benchmarks/bench_scale.py: its table, and a real run of the budgeted and whole-tensor merges
on a small family (no mergekit, no round: those are the benchmark's own)."""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks import bench_scale as bs

META = {"cpus": 2, "torch": "2.13.0", "date": "2026-01-02T03:04:05+00:00", "loadavg_before": [0.1, 0.1, 0.1]}


def test_table_marks_a_process_over_budget() -> None:
    cfg = dict(bs.LLAMA3)
    fed = {"wall_s": 100.0, "coordinator": {"peak_rss_mib": 1000.0, "user_s": 10, "sys_s": 1},
           "submits": [{"peak_rss_mib": 3000.0, "user_s": 20, "sys_s": 2}] * 3,
           "fetch": {"peak_rss_mib": 5000.0, "user_s": 5, "sys_s": 1},
           "processes": [{"name": "ray::ShardActor.fold", "peak_rss_mib": 2500.0},
                         {"name": "ray::ShardActor", "peak_rss_mib": 2600.0}, {"name": "raylet", "peak_rss_mib": 90.0}]}
    rows = bs.federated_rows(cfg, fed, "4GB", "3GB", "ray")
    assert [r["step"] for r in rows] == ["federated: coordinator (--aggregator ray)", "federated: client submit (largest)",
                                         "federated: client fetch", "federated: shard actor (largest of 2)"]
    assert rows[3]["peak_rss_mib"] == 2600.0 and rows[3]["budget"] == "3GB"
    assert rows[0]["cpu_s"] == 11 + 3 * 22 + 6
    table = bs.render({"rows": rows, "meta": META})
    lines = table.splitlines()
    assert "| 727M | 263M |" in lines[2]
    assert "| 5.24 GB | **no** |" in lines[4]  # 5000 MiB > 4 GB
    assert "| 2.73 GB | yes |" in lines[5]  # 2600 MiB <= 3 GB


def test_budgeted_merge_equals_whole_tensors(tmp_path: Path) -> None:
    # 0.67 GiB leaves room for blocks of ~1.5M elements: the 2M-element embedding takes two
    args = argparse.Namespace(work=str(tmp_path), sizes="5e6", llama3=False, budget="0.67GiB", actor_memory="1GB",
                              whole_budget="8GB", mergekit_venv=str(tmp_path / "never"), skip_mergekit=True,
                              skip_federated=True, tiesfed_src=None, aggregator="spill",
                              steps="merge,whole,mergekit,federated", add_json=None)
    data = bs.run(args, log=lambda *a, **k: None)
    steps = [r["step"] for r in data["rows"]]
    assert steps == ["tiesfed merge", "tiesfed merge, whole tensors"]
    assert data["rows"][0]["equal"] == "byte-identical to whole tensors", data["rows"]
    assert all(r["peak_rss_mib"] > 50 for r in data["rows"])
    assert not (tmp_path / "never").exists()


def test_paper_rows_extrapolate_the_budgeted_merges() -> None:
    rows = [{"params": p, "largest": p // 10, "vocab": 32000, "step": "tiesfed merge", "budget": "4GB",
             "wall_s": 2 + p / 1e7, "cpu_s": 1 + p / 1e7, "peak_rss_mib": 900.0, "equal": ""}
            for p in (30e6, 134e6, 400e6)]
    text = bs.paper({"rows": rows, "budget": "4GB"})
    assert "CPU 1.0 s + 0.100 s per M params" in text and "wall 2.0 s + 0.100 s per M params" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("| Llama-3-70B"))
    assert "| 1051M |" in line and "`--max-memory 4GB`" in line
    assert f"{(1 + 70_553_706_496 / 1e7) / 3600:.1f} h" in line  # CPU 0.1 s per M params
    assert f"{8 * 0.2 * 70_553_706_496 * 3 / 1e9:.0f} GB of spill files" in line
    assert bs.paper({"rows": [], "budget": "4GB"}) == ""
