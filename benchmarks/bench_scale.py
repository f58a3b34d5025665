"""How tiesfed's memory and time grow with the model (GitHub issue 14), each step in a fresh process.

Families (fp32, base + 3 fine-tunes, k = 20, generated and cached under --work):
Llama-2-shaped ones of about 30M, 134M and 400M parameters (vocab 32,000), and a
Llama-3-shaped one of 0.73B whose embedding and head are 128,256 × 2,048 = 262M
elements each (hidden 2,048, inter 8,192, 3 layers): the tensor that made an 8B
merge need ~40 GB before tensors were streamed in blocks.

On every family: `tiesfed merge --max-memory BUDGET` (defaults: global trim, majority
sign). On the largest family, in the same run:
  - the same merge with a budget that fits whole tensors: the outputs must be byte-identical;
  - mergekit 0.1.5 (`mergekit-yaml`, TIES, density 0.2), as a baseline;
  - a federated round, every party its own process and given the budget: the coordinator
    with `--aggregator spill` (accumulators in per-block files, one block in memory; or
    `--aggregator ray`: resident in Ray actors of --actor-memory, its process tree sampled
    so the actors are measured too), the clients submitting one after another
    (organisations are separate machines) with --max-memory, then a fetch.
Then, on paper (formulas in the README): Llama-3-8B and 70B.

    python benchmarks/bench_scale.py                      # about 30 min on 2 cores
    python benchmarks/bench_scale.py --sizes 30e6 --no-llama3 --skip-mergekit --skip-federated  # smoke
    python benchmarks/bench_scale.py --update-readme      # replaces <!-- figures:scale -->
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import N_MODELS, count_params, family, shapes_for  # noqa: E402
from benchmarks.diff import compare  # noqa: E402
from benchmarks.peers import (  # noqa: E402
    DEFAULT_VENV,
    ensure_mergekit,
    run_federated,
    run_mergekit,
    run_tiesfed_merge,
    tiesfed_source,
    tool_env,
)

BLOCK = "scale"
#: Llama-3 8B and 70B for the paper rows: parameters, and their embedding's elements (vocab × hidden)
PAPER = {"Llama-3-8B": (8_030_261_248, 128256 * 4096), "Llama-3-70B": (70_553_706_496, 128256 * 8192)}
#: bytes a spilled survivor takes on the coordinator's disk (int32 index + float32 value)
SPILL_BYTES = 8
K_FRACTION = 0.2
DEFAULT_WORK = Path("/tmp/tiesfed-bench-vs-mergekit")  # families shared with bench_vs_mergekit
SIZES = (30e6, 134e6, 400e6)
LLAMA3 = {"vocab": 128256, "hidden": 2048, "inter": 8192, "layers": 3}
GB = 10**9


def largest_tensor(cfg: dict) -> int:
    return max(cfg["vocab"] * cfg["hidden"], cfg["inter"] * cfg["hidden"])


def _row(cfg: dict, step: str, budget: str, res: dict, equal: str = "") -> dict:
    return {"params": count_params(cfg), "largest": largest_tensor(cfg), "vocab": cfg["vocab"], "step": step,
            "budget": budget, "wall_s": res["wall_s"], "cpu_s": res.get("user_s", 0) + res.get("sys_s", 0),
            "peak_rss_mib": res["peak_rss_mib"], "equal": equal}


def same_files(a: Path, b: Path) -> bool:
    """Every safetensors file of two outputs byte for byte."""
    fa, fb = sorted(p.name for p in a.glob("*.safetensors")), sorted(p.name for p in b.glob("*.safetensors"))
    return bool(fa) and fa == fb and all(filecmp.cmp(a / n, b / n, shallow=False) for n in fa)


def federated_rows(cfg: dict, res: dict, budget: str, actor_memory: str, aggregator: str = "spill") -> list[dict]:
    """One row per kind of process in the round (largest of each kind), wall for the whole round."""
    kinds: dict[str, float] = {f"coordinator (--aggregator {aggregator})": res["coordinator"]["peak_rss_mib"],
                               "client submit (largest)": max(s["peak_rss_mib"] for s in res["submits"]),
                               "client fetch": res["fetch"]["peak_rss_mib"]}
    actors = [p for p in res.get("processes", []) if "ShardActor" in p["name"]]
    if actors:
        kinds[f"shard actor (largest of {len(actors)})"] = max(p["peak_rss_mib"] for p in actors)
    cpu = sum(p.get("user_s", 0) + p.get("sys_s", 0) for p in [res["coordinator"], *res["submits"], res["fetch"]])
    rows = []
    for kind, rss in kinds.items():
        b = actor_memory if kind.startswith("shard actor") else budget
        rows.append({"params": count_params(cfg), "largest": largest_tensor(cfg), "vocab": cfg["vocab"],
                     "step": f"federated: {kind}", "budget": b, "wall_s": res["wall_s"], "cpu_s": cpu,
                     "peak_rss_mib": rss, "equal": ""})
    return rows


def run(args, log=print) -> dict:
    env = tool_env(args.tiesfed_src)
    work = Path(args.work).resolve()
    runs = work / "scale"
    runs.mkdir(parents=True, exist_ok=True)
    cfgs = [shapes_for(float(s)) for s in (args.sizes.split(",") if args.sizes else SIZES)]
    if args.llama3:
        cfgs.append(dict(LLAMA3))
    budget = ["--max-memory", args.budget]
    steps = set(args.steps.split(","))
    rows: list[dict] = []
    for cfg in cfgs:
        base, fts = family(work, cfg, log)
        here = runs / f"p{count_params(cfg)}"
        last, r = cfg is cfgs[-1], None
        if "merge" in steps or (last and steps & {"whole", "federated"}):
            r = run_tiesfed_merge("default", base, fts, here, env, extra=tuple(budget), tag="-budget")
            rows.append(_row(cfg, "tiesfed merge", args.budget, r))
            log(json.dumps(rows[-1]), flush=True)
        if not last:
            if r:
                shutil.rmtree(r["out"], ignore_errors=True)
            continue
        # the largest family: whole tensors, mergekit, a federated round
        if "whole" in steps:
            whole = run_tiesfed_merge("default", base, fts, here, env, extra=("--max-memory", args.whole_budget),
                                      tag="-whole")
            same = same_files(Path(r["out"]), Path(whole["out"]))
            rows[-1]["equal"] = "byte-identical to whole tensors" if same else "DIFFERS from whole tensors"
            rows.append(_row(cfg, "tiesfed merge, whole tensors", args.whole_budget, whole, "(the reference)"))
            log(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(whole["out"], ignore_errors=True)
        if "mergekit" in steps and not args.skip_mergekit:
            exe = ensure_mergekit(Path(args.mergekit_venv), log)
            mk = run_mergekit(exe, base, fts, here, env)
            rows.append(_row(cfg, "mergekit 0.1.5 (baseline)", "–", mk))
            log(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(mk["out"], ignore_errors=True)
        if "federated" in steps and not args.skip_federated:
            coord = ("--actor-memory", args.actor_memory) if args.aggregator == "ray" else ()
            fed = run_federated(base, fts, here, work, env, aggregator=args.aggregator, coordinator_args=coord,
                                submit_args=tuple(budget), fetch_args=tuple(budget), sample_tree=True,
                                one_client_at_a_time=True)
            fed_rows = federated_rows(cfg, fed, args.budget, args.actor_memory, args.aggregator)
            d = compare(Path(r["out"]), Path(fed["out"]))
            fed_rows[0]["equal"] = "bit-identical to tiesfed merge" if d["identical"] else \
                f"{100 * d['fraction']:.3g}% of elements differ from tiesfed merge"
            rows += fed_rows
            for x in fed_rows:
                log(json.dumps(x), flush=True)
            shutil.rmtree(fed["out"], ignore_errors=True)
        if r:
            shutil.rmtree(r["out"], ignore_errors=True)
    from benchmarks.bench_vs_mergekit import meta_info

    earlier = []
    for f in args.add_json or []:
        earlier += json.loads(Path(f).read_text())["rows"]
    return {"rows": earlier + rows, "budget": args.budget, "actor_memory": args.actor_memory,
            "meta": {**meta_info(), "tiesfed": tiesfed_source(env)}}


def render(data: dict) -> str:
    out = ["| params | largest tensor | step | budget | wall s | CPU s | peak RSS | under budget | result |",
           "|---:|---:|---|---|---:|---:|---:|:---:|---|"]
    from tiesfed.cli.common import parse_size

    for r in data["rows"]:
        peak = r["peak_rss_mib"] * 2**20
        under = "–" if r["budget"] in ("–", "") else ("yes" if peak <= parse_size(r["budget"]) else "**no**")
        out.append(f"| {r['params'] / 1e6:.0f}M | {r['largest'] / 1e6:.0f}M | {r['step']} | {r['budget']} | "
                   f"{r['wall_s']:.1f} | {r['cpu_s']:.1f} | {peak / GB:.2f} GB | {under} | {r['equal']} |")
    m = data["meta"]
    out += ["", f"*fp32, base + {N_MODELS} fine-tunes, k = 20, each step in a fresh process; "
                f"{m['cpus']} CPU cores, torch {m['torch']}, {m['date'][:10]}, load average before "
                f"{m['loadavg_before'][0]:.1f}; `python benchmarks/bench_scale.py`. The federated rows share "
                f"one round's wall and CPU time (all its processes); clients submitted one after another.*"]
    if data.get("note"):
        out += ["", data["note"]]
    extra = paper(data)
    return "\n".join(out) + ("\n\n" + extra if extra else "")


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x (b = y / x through 0 for a single point)."""
    n = len(xs)
    if n == 1:
        return 0.0, ys[0] / xs[0]
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx, b


def paper(data: dict) -> str:
    """8B and 70B on paper: time linear in parameters (fit over the budgeted merges), memory
    the budget (what the table measured: peaks under it whatever the largest tensor)."""
    rows = [r for r in data["rows"] if r["step"] == "tiesfed merge"]
    if not rows:
        return ""
    ca, cb = fit_line([r["params"] for r in rows], [r["cpu_s"] for r in rows])
    wa, wb = fit_line([r["params"] for r in rows], [r["wall_s"] for r in rows])
    budget = data["budget"]
    out = [f"On paper (fp32, 3 fine-tunes, k = 20; CPU and wall linear in parameters, least squares over the "
           f"budgeted merges above: CPU {ca:.1f} s + {cb * 1e6:.3f} s per M params, wall {wa:.1f} s + "
           f"{wb * 1e6:.3f} s per M params on this machine):", "",
           "| model | largest tensor | `tiesfed merge` / each client: memory | local merge: CPU, wall | "
           "spill coordinator: memory, disk (3 clients) |", "|---|---:|---|---|---|"]
    for name, (n, largest) in PAPER.items():
        disk = SPILL_BYTES * K_FRACTION * n * N_MODELS
        out.append(f"| {name} | {largest / 1e6:.0f}M | under `--max-memory {budget}` (peak measured under it at "
                   f"every size above) | {(ca + cb * n) / 3600:.1f} h, {(wa + wb * n) / 3600:.1f} h | one block "
                   f"in memory, {disk / GB:.0f} GB of spill files |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(DEFAULT_WORK), help="generated families (cached), outputs, logs")
    ap.add_argument("--sizes", help="Llama-2-shaped family sizes, comma separated (default 30e6,134e6,400e6)")
    ap.add_argument("--no-llama3", dest="llama3", action="store_false", help="skip the 0.73B Llama-3-shaped family")
    ap.add_argument("--budget", default="4GB", help="--max-memory of every tiesfed process (default 4GB)")
    ap.add_argument("--aggregator", default="spill", choices=["spill", "ray", "local"],
                    help="the coordinator's --aggregator in the round (default spill: accumulators on disk, one "
                         "block in memory; ray keeps them resident in actors of --actor-memory)")
    ap.add_argument("--actor-memory", default="3GB", help="with --aggregator ray: its --actor-memory (default 3GB)")
    ap.add_argument("--whole-budget", default="16GB", help="a budget that holds whole tensors (the reference run)")
    ap.add_argument("--mergekit-venv", default=str(DEFAULT_VENV), help="venv holding mergekit 0.1.5 (made if needed)")
    ap.add_argument("--steps", default="merge,whole,mergekit,federated",
                    help="which steps to run (comma separated; the largest family's merge runs when whole or "
                         "federated needs it)")
    ap.add_argument("--add-json", action="append", metavar="JSON",
                    help="rows of an earlier run (its --json) to put first in the table")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--skip-federated", action="store_true")
    ap.add_argument("--tiesfed-src", metavar="DIR", help="a checkout whose tiesfed/ to measure")
    ap.add_argument("--json", metavar="OUT", help="also write every number to this JSON file")
    ap.add_argument("--update-readme", action="store_true", help=f"replace README.md's <!-- figures:{BLOCK} -->")
    ap.add_argument("--readme", default=str(ROOT / "README.md"), help=argparse.SUPPRESS)
    ap.add_argument("--render", metavar="JSON", help="no run: render the table of an earlier --json")
    args = ap.parse_args(argv)
    data = json.loads(Path(args.render).read_text()) if args.render else run(args)
    text = render(data)
    print(f"\n<!-- figures:{BLOCK} -->\n{text}\n<!-- /figures:{BLOCK} -->")
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1, default=str) + "\n")
    if args.update_readme:
        from benchmarks.figures import update_readme

        print(f"{args.readme}: {'updated' if update_readme(Path(args.readme), {BLOCK: text}) else 'unchanged'}")
    return 0 if all(r["equal"] != "DIFFERS from whole tensors" for r in data["rows"]) else 1


if __name__ == "__main__":
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    sys.exit(main())
