"""Regenerate the README's benchmark tables and benchmarks/results/figures.png.

Runs bench_merge.py, bench_federated.py and bench_shards.py, each in its own
process with `--json` (their printed output passes through unchanged), at the
README's sizes, or at small sizes with --quick (a smoke test, under a minute on
2 cores). From their numbers it writes, under --out (benchmarks/results):

  figures.json  every number, per benchmark, and how the run was made
  tables.md     the README's markdown tables, one block per marker name
  figures.png   three panels: upload bits per parameter against k (fp32,
                fp16 and bf16 values), coordinator peak RSS against the number
                of clients, wall time against the baselines of the same run
                (needs matplotlib: pip install -e '.[bench]')

With --update-readme it replaces README.md's blocks between
`<!-- figures:NAME -->` and `<!-- /figures:NAME -->` with the new ones.

    python benchmarks/figures.py --update-readme    # README sizes, ~6 min on 2 cores
    python benchmarks/figures.py --quick --out /tmp/figs
    python benchmarks/figures.py --from-json benchmarks/results/figures.json --update-readme   # no rerun
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
README = ROOT / "README.md"
BENCH_HINT = "pip install -e '.[bench]'  (or: pip install 'matplotlib>=3.7')"

# The README's sizes (each script's defaults, spelled out so the README does not move when a default does).
FULL = {
    "merge": ["--vocab", "32000", "--hidden", "768", "--inter", "2048", "--layers", "7", "--models", "3",
              "--dtype", "float32", "--k", "20", "--threads", "2"],
    "federated": ["--clients", "2,8,32", "--vocab", "4096", "--hidden", "256", "--inter", "688", "--layers", "4",
                  "--k", "20", "--max-active-uploads", "2", "--repeat", "1"],
    "shards": ["--params", "20e6", "--layers", "8", "--contribs", "4", "--density", "0.2", "--actors", "1,2,4",
               "--repeat", "5"],
}
QUICK = {
    "merge": ["--vocab", "2000", "--hidden", "128", "--inter", "256", "--layers", "1", "--models", "3",
              "--dtype", "float32", "--k", "20", "--threads", "2"],
    "federated": ["--clients", "2,3", "--vocab", "512", "--hidden", "64", "--inter", "128", "--layers", "1",
                  "--k", "20", "--max-active-uploads", "2", "--repeat", "1"],
    "shards": ["--params", "1e6", "--layers", "2", "--contribs", "2", "--density", "0.2", "--actors", "1",
               "--repeat", "1"],
}
SCRIPTS = {"merge": "bench_merge.py", "federated": "bench_federated.py", "shards": "bench_shards.py"}
BLOCKS = ("plot", "merge", "codec", "federated", "shards")


# ---------------------------------------------------------------- running


def run_benchmarks(quick: bool, work: Path, log=print) -> dict:
    """Run the three benchmarks as subprocesses; returns {"meta": ..., name: their --json}."""
    sizes = QUICK if quick else FULL
    data: dict = {}
    started = time.perf_counter()
    seconds = {}
    with tempfile.TemporaryDirectory(prefix="tiesfed-figures-") as tmp:
        for name, script in SCRIPTS.items():
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, str(HERE / script), *sizes[name], "--json", str(out)]
            if name != "shards":
                cmd += ["--work", str(work / (f"quick-{name}" if quick else name))]
            log(f"\n==== {script} {' '.join(sizes[name])}", flush=True)
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, cwd=ROOT)
            seconds[name] = time.perf_counter() - t0
            data[name] = json.loads(out.read_text())
    import torch  # only for the versions below; the benchmarks already imported it

    data["meta"] = {
        "quick": quick,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": data["shards"]["config"]["ray"],
        "args": sizes,
        "bench_s": seconds,
        "total_s": time.perf_counter() - started,
    }
    return data


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            return round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return None


# ---------------------------------------------------------------- tables (pure)


def _para(text: str) -> str:
    """Wrap prose like the README's, never between a number and its unit."""
    glued = re.sub(r"(\d) (ms|s|MiB|MB|min|bits|bytes)\b", "\\1\0\\2", text)
    return textwrap.fill(glued, width=88, break_long_words=False, break_on_hyphens=False).replace("\0", " ")


def _m(n: float) -> str:
    return f"{n / 1e6:.1f}M"


def render_blocks(data: dict, png: str = "benchmarks/results/figures.png") -> dict[str, str]:
    """The README's generated blocks, by marker name, from figures.json's content."""
    meta, mg, fed, sh = data["meta"], data["merge"], data["federated"], data["shards"]
    blocks = {}

    mem = f", {meta['memory_gib']:.0f} GiB" if meta.get("memory_gib") else ""
    blocks["plot"] = f"![benchmarks]({png})\n\n" + _para(
        f"*Regenerated by `python benchmarks/figures.py --update-readme` on {meta['date'][:10]}: "
        f"{meta['cpus']} CPU cores{mem}, torch {meta['torch']}, ray {meta['ray']}; "
        f"all three benchmarks took {meta['total_s'] / 60:.1f} min.*"
    )

    n, t = mg["naive"], mg["tiesfed"]
    blocks["merge"] = "\n".join([
        "| | wall s | peak RSS MiB |",
        "|---|---:|---:|",
        f"| naive dense TIES (baseline) | {n['wall_s']:.1f} | {n['peak_rss_mib']:.0f} |",
        f"| tiesfed merge | {t['wall_s']:.1f} | {t['peak_rss_mib']:.0f} |",
        f"| ratio tiesfed / naive | {mg['ratio']['wall']:.2f} | {mg['ratio']['peak_rss']:.2f} |",
        "",
        _para(f"The outputs agree to {mg['max_abs_diff']:.2g}. tiesfed's peak is {mg['idle_rss_mib']:.0f} MiB "
              f"after imports + {mg['bytes_per_largest_element']:.0f} bytes × the largest tensor "
              f"({_m(mg['largest_tensor'])} elements)."),
    ])

    rows = [
        "| k % | trim M params/s (3 streamed passes) | fp32 bits/param | fp16 bits/param | bf16 bits/param |",
        "|---:|---:|---:|---:|---:|",
    ]
    for c in mg["codec"]:
        b = c["bits_per_param"]
        rows.append(f"| {c['k']:g} | {c['trim_mparams_s']:.1f} | {b['fp32']:.2f} | {b['fp16']:.2f} | {b['bf16']:.2f} |")
    at20 = [c["bits_per_param"] for c in mg["codec"] if c["k"] == 20]
    if at20:
        lo, hi = sorted((at20[0]["bf16"], at20[0]["fp16"]))
        rows += ["", _para(f"(at k = 20 with 16-bit values the upload is {lo:.1f}–{hi:.1f} bits per parameter, "
                           f"against 4.0 targeted and 32 for dense fp32)")]
    blocks["codec"] = "\n".join(rows)

    rows = [
        "| clients | local merge s | federated s | ratio | upload / client | vs dense fp32 | coordinator peak RSS "
        "| bit-identical |",
        "|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in fed["rows"]:
        rows.append(
            f"| {r['clients']} | {r['local_s']:.1f} | {r['wall_s']:.1f} | {r['ratio']:.2f} | "
            f"{r['upload_bytes_per_client'] / 2**20:.2f} MiB ({r['upload_bits_per_param']:.2f} bits/param) | "
            f"{100 * r['upload_vs_dense']:.1f}% | {r['peak_rss_mib']:.0f} MiB | {'yes' if r['identical'] else 'NO'} |")
    first, last = fed["rows"][0], fed["rows"][-1]
    rows += ["", _para(f"Coordinator peak RSS grows {fed['peak_rss_growth_pct']:.1f}% from {first['clients']} to "
                       f"{last['clients']} clients ({first['peak_rss_mib']:.0f} → {last['peak_rss_mib']:.0f} MiB; "
                       f"goal ≤ 5%).")]
    blocks["federated"] = "\n".join(rows)

    rows = [
        "| aggregator | fold M params/s | vs in-process | finalize M params/s | vs in-process |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in sh["rows"]:
        a = r["actors"]
        name = "in-process (baseline)" if a is None else f"Ray, {a} actor{'s' if a > 1 else ''}"
        rows.append(f"| {name} | {r['fold_mparams_s']:.0f} | {r['fold_vs_baseline']:.2f} | "
                    f"{r['finalize_mparams_s']:.1f} | {r['finalize_vs_baseline']:.2f} |")
    cfg, hop = sh["config"], sh["hop"]
    starts = ", ".join(f"{k} {'actor' if k == '1' else 'actors'} {v:.1f} s" for k, v in sh["actor_start_s"].items())
    rows += ["", _para(f"The object-store hop for one {cfg['density']:.0%}-dense {_m(cfg['params'])}-parameter contribution "
                 f"({hop['payload_mb']:.0f} MB): `ray.put` {hop['put_ms']:.0f} ms + zero-copy `ray.get` as numpy "
                 f"{hop['get_ms']:.0f} ms, against {hop['torch_put_ms']:.0f} + {hop['torch_get_ms']:.0f} ms as "
                 f"pickled torch tensors. Starting Ray took {sh['ray_start_s']:.1f} s in this run; starting the "
                 f"actors (importing torch): {starts}.")]
    blocks["shards"] = "\n".join(rows)
    return blocks


def tables_markdown(blocks: dict[str, str]) -> str:
    """tables.md: every block under its marker name, as the README embeds it."""
    parts = ["# Benchmark tables\n\nGenerated by `benchmarks/figures.py`; README.md embeds each block between "
             "`<!-- figures:NAME -->` markers.\n"]
    for name, text in blocks.items():
        parts.append(f"## {name}\n\n{text}\n")
    return "\n".join(parts)


def replace_blocks(text: str, blocks: dict[str, str]) -> str:
    """Replace each `<!-- figures:NAME -->` ... `<!-- /figures:NAME -->` block's body.

    Every name in `blocks` must appear exactly once as an opening and a closing
    marker, in that order; markers for names not in `blocks` are left alone."""
    for name, body in blocks.items():
        start, end = f"<!-- figures:{name} -->", f"<!-- /figures:{name} -->"
        if text.count(start) != 1 or text.count(end) != 1:
            raise ValueError(f"README needs exactly one {start} and one {end} (found {text.count(start)} and "
                             f"{text.count(end)})")
        i, j = text.index(start) + len(start), text.index(end)
        if j < i:
            raise ValueError(f"{end} comes before {start}")
        text = text[:i] + "\n" + body.strip("\n") + "\n" + text[j:]
    return text


def update_readme(readme: Path, blocks: dict[str, str]) -> bool:
    """Rewrite the README's generated blocks in place (re-read right before writing). True if it changed."""
    old = readme.read_text()
    new = replace_blocks(old, blocks)
    if new != old:
        tmp = readme.with_name(readme.name + ".figures-tmp")
        tmp.write_text(new)
        os.replace(tmp, readme)
    return new != old


# ---------------------------------------------------------------- the picture


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot(data: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mg, fed = data["merge"], data["federated"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2), gridspec_kw={"width_ratios": [1, 1, 1.35]})

    # 1. upload size against k
    ax = axes[0]
    ks = [c["k"] for c in mg["codec"]]
    styles = {  # colour, marker, where the value label goes (offset in points, alignment)
        "fp32": ("tab:blue", "o", (-7, 5), "right"),
        "fp16": ("tab:orange", "s", (7, -1), "left"),
        "bf16": ("tab:green", "^", (7, -11), "left"),
    }
    for dt, (color, marker, offset, ha) in styles.items():
        ys = [c["bits_per_param"][dt] for c in mg["codec"]]
        ax.plot(ks, ys, marker=marker, color=color, label=f"{dt} values")
        for k, y in zip(ks, ys):
            ax.annotate(f"{y:.2f}", (k, y), textcoords="offset points", xytext=offset, ha=ha, fontsize=8,
                        color=color, bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8})
    ax.plot([fed["config"]["k"]], [fed["rows"][0]["upload_bits_per_param"]], "kx", ms=8,
            label=f"a whole federated upload, fp32\n({_m(fed['config']['params'])}-param model, over gRPC)")
    ax.set_xticks(ks)
    ax.set_xlim(0, max(ks) * 1.12)
    ax.set_ylim(0, None)
    ax.set_xlabel("k: % of each task vector kept by trim")
    ax.set_ylabel("upload size (bits per parameter)")
    ax.set_title(f"Upload size against k\n(one {_m(mg['config']['params'])}-param model; dense fp32 = 32 bits)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")

    # 2. coordinator memory against clients
    ax = axes[1]
    rows = fed["rows"]
    xs = [r["clients"] for r in rows]
    ax.plot(xs, [r["peak_rss_mib"] for r in rows], "o-", color="tab:red", label="peak RSS (VmHWM)")
    ax.plot(xs, [r["idle_rss_mib"] for r in rows], "o--", color="tab:gray", label="RSS before the round")
    for r in rows:
        ax.annotate(f"{r['peak_rss_mib']:.0f}", (r["clients"], r["peak_rss_mib"]), textcoords="offset points",
                    xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.minorticks_off()
    ax.set_ylim(0, max(r["peak_rss_mib"] for r in rows) * 1.3)
    ax.set_xlabel("clients in the round (log scale)")
    ax.set_ylabel("coordinator RSS (MiB)")
    ax.set_title(f"Coordinator memory against clients\n({_m(fed['config']['params'])} params, "
                 f"{fed['peak_rss_growth_pct']:+.1f}% from {xs[0]} to {xs[-1]} clients)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")

    # 3. wall time against the baselines of the same run
    ax = axes[2]
    groups = [(f"tiesfed merge\nvs naive dense TIES\n{_m(mg['config']['params'])} params, "
               f"{mg['config']['models']} models", "naive dense TIES", mg["naive"]["wall_s"], "tiesfed merge",
               mg["tiesfed"]["wall_s"])]
    for r in rows:
        groups.append((f"federated round\nvs local merge\n{r['clients']} clients", "local merge", r["local_s"],
                       "federated (gRPC)", r["wall_s"]))
    width = 0.38
    for i, (_, bname, b, tname, t) in enumerate(groups):
        bb = ax.bar(i - width / 2, b, width, color="tab:gray", label="baseline (same run)" if i == 0 else None)
        tb = ax.bar(i + width / 2, t, width, color="tab:blue", label="tiesfed" if i == 0 else None)
        ax.bar_label(bb, [f"{b:.1f}"], fontsize=8)
        ax.bar_label(tb, [f"{t:.1f}"], fontsize=8)
        ax.annotate(f"×{t / b:.2f}", (i, max(b, t)), textcoords="offset points", xytext=(0, 16), ha="center",
                    fontsize=9, fontweight="bold")
    ax.set_xticks(range(len(groups)), [g[0] for g in groups], fontsize=8)
    ax.set_ylim(0, max(max(g[2], g[4]) for g in groups) * 1.35)
    ax.set_ylabel("wall time (s)")
    ax.set_title("Wall time against baselines measured in the same run\n(×: tiesfed / baseline)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")

    meta = data["meta"]
    fig.suptitle(f"tiesfed benchmarks{' (--quick sizes)' if meta['quick'] else ''}: {meta['cpus']} CPU cores, "
                 f"no GPU, torch {meta['torch']}, {meta['date'][:10]}", fontsize=11)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke test, not the README's numbers")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for figures.json, tables.md, figures.png")
    ap.add_argument("--work", default=str(ROOT / "bench_out"), help="cache of generated model families")
    ap.add_argument("--update-readme", action="store_true",
                    help="replace README.md's blocks between <!-- figures:NAME --> markers")
    ap.add_argument("--readme", default=str(README), help=argparse.SUPPRESS)
    ap.add_argument("--from-json", metavar="FIGURES_JSON",
                    help="do not run the benchmarks: regenerate tables, PNG (and README) from this figures.json")
    args = ap.parse_args(argv)
    out = Path(args.out)

    mpl = have_matplotlib()
    if not mpl:
        msg = f"matplotlib is not installed: figures.png needs the bench extra: {BENCH_HINT}"
        if args.update_readme:
            print(f"error: {msg} (--update-readme refuses to leave the README's picture stale)", file=sys.stderr)
            return 2
        print(f"note: {msg}; figures.json and tables.md are written without it", file=sys.stderr, flush=True)

    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
    else:
        data = run_benchmarks(args.quick, Path(args.work))
    if args.update_readme and data["meta"]["quick"]:
        print("error: --update-readme with --quick numbers: the README shows the full sizes", file=sys.stderr)
        return 2

    out.mkdir(parents=True, exist_ok=True)
    png = out / "figures.png"
    try:
        png_link = png.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        png_link = str(png)
    blocks = render_blocks(data, png_link)
    (out / "figures.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / "tables.md").write_text(tables_markdown(blocks))
    written = [out / "figures.json", out / "tables.md"]
    if mpl:
        plot(data, png)
        written.append(png)
    print("\nwrote " + ", ".join(str(p) for p in written))
    if not mpl:
        print(f"figures.png not written: matplotlib is missing; install the bench extra: {BENCH_HINT}")
    if args.update_readme:
        changed = update_readme(Path(args.readme), blocks)
        print(f"{args.readme}: {'tables updated' if changed else 'already up to date'}")
    print(f"benchmarks took {data['meta']['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
