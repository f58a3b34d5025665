"""benchmarks/figures.py: the README's benchmark tables are generated, and regenerated in place.

The table rendering and the marker replacement are pure functions, tested on a
fixture; one `--quick` run (small sizes, ~25 s on 2 cores) with matplotlib
hidden checks that figures.json and tables.md are still written and that the
script names the extra that the PNG needs; the PNG is then drawn from that
json when matplotlib is installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import figures

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "figures.py"

DATA = {
    "meta": {"quick": False, "date": "2026-01-02T03:04:05+00:00", "cpus": 2, "memory_gib": 23.4, "torch": "2.13.0",
             "ray": "2.60.0", "total_s": 600.0},
    "merge": {
        "config": {"params": 98_700_000, "models": 3, "k": 20},
        "naive": {"wall_s": 24.3, "peak_rss_mib": 7288.0},
        "tiesfed": {"wall_s": 30.1, "peak_rss_mib": 1999.0, "upload_bits_per_param": 5.3},
        "ratio": {"wall": 30.1 / 24.3, "peak_rss": 1999 / 7288},
        "idle_rss_mib": 229.0, "largest_tensor": 24_576_000, "bytes_per_largest_element": 76.0,
        "max_abs_diff": 9.3e-10,
        "codec": [{"k": k, "trim_mparams_s": 10.0 * i, "bits_per_param": {"fp32": b, "fp16": b / 2, "bf16": b / 2.2}}
                  for i, (k, b) in enumerate([(5, 1.45), (20, 5.33), (50, 12.6)], 1)],
    },
    "federated": {
        "config": {"params": 5_300_000, "k": 20},
        "rows": [{"clients": n, "local_s": 1.0 * n, "wall_s": 1.5 * n, "ratio": 1.5,
                  "upload_bytes_per_client": 3.39 * 2**20, "upload_bits_per_param": 5.4, "upload_vs_dense": 0.169,
                  "idle_rss_mib": 300.0, "peak_rss_mib": 424.0 + n, "identical": True} for n in (2, 8, 32)],
        "peak_rss_growth_pct": 7.1,
    },
    "shards": {
        "config": {"params": 18_900_000, "density": 0.2},
        "rows": [{"actors": a, "fold_mparams_s": 100.0, "fold_vs_baseline": 1.0, "finalize_mparams_s": 30.0,
                  "finalize_vs_baseline": 1.0} for a in (None, 1, 2, 4)],
        "actor_start_s": {"1": 1.5, "2": 2.5, "4": 4.0},
        "ray_start_s": 5.0,
        "hop": {"payload_mb": 30.0, "put_ms": 7.0, "get_ms": 0.2, "torch_put_ms": 44.0, "torch_get_ms": 9.0},
    },
}

FIXTURE = """# Project

Intro that must stay.

<!-- figures:plot -->
old picture
<!-- /figures:plot -->

**Local merge** prose that must stay:

<!-- figures:merge -->
| old | table |
|---|---|
| 1 | 2 |
<!-- /figures:merge -->

More prose.
<!-- figures:codec -->
<!-- /figures:codec -->
<!-- figures:federated -->
x
<!-- /figures:federated -->
<!-- figures:shards -->
y
<!-- /figures:shards -->
<!-- figures:someone-else -->
untouched
<!-- /figures:someone-else -->
## Next section
"""


def flat(text: str) -> str:
    """Generated prose is wrapped like the README's: compare it with single spaces."""
    return " ".join(text.split())


def test_render_blocks_gives_the_readme_tables():
    blocks = figures.render_blocks(DATA)
    assert list(blocks) == list(figures.BLOCKS)
    assert blocks["plot"].startswith("![benchmarks](benchmarks/results/figures.png)")
    merge = blocks["merge"].splitlines()
    assert merge[:2] == ["| | wall s | peak RSS MiB |", "|---|---:|---:|"]
    assert merge[2] == "| naive dense TIES (baseline) | 24.3 | 7288 |"
    assert merge[4] == "| ratio tiesfed / naive | 1.24 | 0.27 |"
    assert "agree to 9.3e-10" in flat(blocks["merge"]) and "24.6M elements" in flat(blocks["merge"])
    codec = blocks["codec"].splitlines()
    assert codec[3] == "| 20 | 20.0 | 5.33 | 2.67 | 2.42 |"
    assert "upload is 2.4–2.7 bits per parameter" in flat(blocks["codec"])
    fed = blocks["federated"].splitlines()
    assert len([r for r in fed if r.startswith("| ")]) == 1 + 3  # header + one row per client count
    assert fed[2] == "| 2 | 2.0 | 3.0 | 1.50 | 3.39 MiB (5.40 bits/param) | 16.9% | 426 MiB | yes |"
    assert "grows 7.1% from 2 to 32 clients (426 → 456 MiB; goal ≤ 5%)" in flat(blocks["federated"])
    shards = blocks["shards"].splitlines()
    assert shards[2].startswith("| in-process (baseline) | 100 | 1.00 |")
    assert shards[5].startswith("| Ray, 4 actors |")
    assert "`ray.put` 7 ms" in flat(blocks["shards"]) and "4 actors 4.0 s" in flat(blocks["shards"])
    prose = [line for b in blocks.values() for line in b.splitlines() if not line.startswith("|")]
    assert max(map(len, prose)) <= 88
    md = figures.tables_markdown(blocks)
    for name, body in blocks.items():
        assert f"## {name}\n\n{body}\n" in md


def test_replace_blocks_rewrites_only_between_markers_and_is_idempotent():
    blocks = figures.render_blocks(DATA)
    once = figures.replace_blocks(FIXTURE, blocks)
    for name, body in blocks.items():
        assert f"<!-- figures:{name} -->\n{body}\n<!-- /figures:{name} -->" in once
    assert "| old | table |" not in once and "old picture" not in once
    for keep in ("# Project\n\nIntro that must stay.\n", "**Local merge** prose that must stay:\n", "More prose.",
                 "<!-- figures:someone-else -->\nuntouched\n<!-- /figures:someone-else -->\n## Next section\n"):
        assert keep in once
    assert figures.replace_blocks(once, blocks) == once
    # a rerun with new numbers replaces the previous ones
    data2 = json.loads(json.dumps(DATA))
    data2["merge"]["naive"]["wall_s"] = 99.9
    twice = figures.replace_blocks(once, figures.render_blocks(data2))
    assert "| naive dense TIES (baseline) | 99.9 | 7288 |" in twice and "| 24.3 |" not in twice
    assert twice.count("<!-- figures:merge -->") == 1


@pytest.mark.parametrize("broken", [
    FIXTURE.replace("<!-- /figures:merge -->\n", ""),
    FIXTURE.replace("<!-- figures:shards -->\n", ""),
    FIXTURE + "<!-- figures:plot -->\n<!-- /figures:plot -->\n",
    FIXTURE.replace("<!-- figures:codec -->\n<!-- /figures:codec -->", "<!-- /figures:codec -->\n<!-- figures:codec -->"),
])
def test_replace_blocks_refuses_missing_duplicated_or_swapped_markers(broken):
    with pytest.raises(ValueError, match="figures:"):
        figures.replace_blocks(broken, figures.render_blocks(DATA))


def test_update_readme_in_place(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(FIXTURE)
    blocks = figures.render_blocks(DATA)
    assert figures.update_readme(readme, blocks) is True
    assert readme.read_text() == figures.replace_blocks(FIXTURE, blocks)
    assert figures.update_readme(readme, blocks) is False
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]


def test_the_real_readme_has_every_marker():
    text = (ROOT / "README.md").read_text()
    for name in figures.BLOCKS:
        assert text.count(f"<!-- figures:{name} -->") == 1 and text.count(f"<!-- /figures:{name} -->") == 1
    assert "![benchmarks](benchmarks/results/figures.png)" in text
    # and they are in the Benchmarks section
    section = text.split("## Benchmarks", 1)[1].split("\n## ", 1)[0]
    assert all(f"<!-- figures:{name} -->" in section for name in figures.BLOCKS)


def _env_without_matplotlib(tmp_path: Path) -> dict:
    shadow = tmp_path / "no-matplotlib"
    (shadow / "matplotlib").mkdir(parents=True)
    (shadow / "matplotlib" / "__init__.py").write_text("raise ImportError('matplotlib hidden by test_figures')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(shadow), str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `figures.py --quick` with matplotlib hidden: (completed process, out folder)."""
    tmp = tmp_path_factory.mktemp("figures")
    out = tmp / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--work", str(tmp / "work")],
                          cwd=ROOT, env=_env_without_matplotlib(tmp), capture_output=True, text=True, timeout=300)
    return proc, out


def test_quick_writes_json_and_tables_without_matplotlib(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    both = proc.stdout + proc.stderr
    assert "matplotlib" in both and "pip install -e '.[bench]'" in both
    assert not (out / "figures.png").exists()
    data = json.loads((out / "figures.json").read_text())
    assert set(data) == {"meta", "merge", "federated", "shards"}
    assert data["meta"]["quick"] is True and set(data["meta"]["bench_s"]) == {"merge", "federated", "shards"}
    assert {"naive", "tiesfed", "ratio", "codec", "max_abs_diff"} <= set(data["merge"])
    assert [c["k"] for c in data["merge"]["codec"]] == [5, 20, 50]
    assert all(set(c["bits_per_param"]) == {"fp32", "fp16", "bf16"} for c in data["merge"]["codec"])
    rows = data["federated"]["rows"]
    assert [r["clients"] for r in rows] == [2, 3] and all(r["identical"] for r in rows)
    assert {"local_s", "wall_s", "peak_rss_mib", "upload_bits_per_param"} <= set(rows[0])
    assert [r["actors"] for r in data["shards"]["rows"]] == [None, 1]
    assert {"hop", "ray_start_s", "actor_start_s"} <= set(data["shards"])
    md = (out / "tables.md").read_text()
    for name in figures.BLOCKS:
        assert f"## {name}\n" in md
    assert md == figures.tables_markdown(figures.render_blocks(data, str(out / "figures.png")))


def test_update_readme_needs_matplotlib_and_refuses_quick_numbers(quick_run, tmp_path):
    _, out = quick_run
    readme = tmp_path / "README.md"
    readme.write_text(FIXTURE)
    args = [sys.executable, str(SCRIPT), "--from-json", str(out / "figures.json"), "--out", str(tmp_path / "o"),
            "--readme", str(readme), "--update-readme"]
    hidden = subprocess.run(args, cwd=ROOT, env=_env_without_matplotlib(tmp_path), capture_output=True, text=True)
    assert hidden.returncode == 2 and "pip install -e '.[bench]'" in hidden.stderr
    assert readme.read_text() == FIXTURE
    if figures.have_matplotlib():
        quick = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
        assert quick.returncode == 2 and "--quick" in quick.stderr
        assert readme.read_text() == FIXTURE


def test_png_from_the_quick_json(quick_run, tmp_path):
    """With matplotlib (the bench extra) the PNG is drawn; without it the script says what to install."""
    _, out = quick_run
    proc = subprocess.run([sys.executable, str(SCRIPT), "--from-json", str(out / "figures.json"), "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    png = tmp_path / "figures.png"
    if figures.have_matplotlib():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    else:
        assert not png.exists() and "pip install -e '.[bench]'" in proc.stdout + proc.stderr
    assert json.loads((tmp_path / "figures.json").read_text()) == json.loads((out / "figures.json").read_text())


def test_demo_table_is_cut_from_the_demo_output_and_fits_the_readme_markers():
    from benchmarks.demo_table import demo_block
    from benchmarks.figures import replace_blocks

    out = ("scoreboard: ties test avg 0.575 at λ=1\n"
           "method   λ  average\n-------  -  -------\nTIES     1     57.5\n\nzoo: 4 tasks, built in 9.0s\n")
    block = demo_block(out)
    assert block == "```\nmethod   λ  average\n-------  -  -------\nTIES     1     57.5\n```"
    readme = "intro\n<!-- figures:demo -->\n```\nold\n```\n<!-- /figures:demo -->\nafter\n"
    assert replace_blocks(readme, {"demo": block}) == f"intro\n<!-- figures:demo -->\n{block}\n<!-- /figures:demo -->\nafter\n"
    with pytest.raises(ValueError, match="no table"):
        demo_block("zoo: nothing printed\n")
