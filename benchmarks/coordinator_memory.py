"""Coordinator memory, stated and measured (GitHub issue 14).

Two modes:

  python benchmarks/coordinator_memory.py table
      Accumulator bytes per parameter for each option set, from
      `FinalizeSpec.bytes_per_param`, and on paper the shard actors (and Ray nodes)
      that hold an 8B and a 70B round at a per-actor budget (markdown, for the README).

  python benchmarks/coordinator_memory.py round --family /tmp/fam134 [--coord-arg=--actor-memory=3GB ...]
      One federated round over mutual TLS on loopback, every party its own process
      (`coordinator serve` with Ray + 3 `client submit` + 1 `client fetch`), while
      `benchmarks.measure.TreeSampler` samples with psutil the RSS of the coordinator
      process and of each process it started (Ray's GCS, raylet, the shard actors). Prints peak RSS per process, CPU
      seconds (user + sys) of the coordinator and of its process tree, and the finalize
      window from the coordinator's JSON log.

The family folder holds `base` and `ft0`..`ft2` (what bench_vs_mergekit.py generates).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.peers import run_federated, tool_env  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20

# ---------------------------------------------------------------- table (on paper)

#: Llama-3 parameter counts for the paper rows.
PAPER_MODELS = {"Llama-3-8B": 8_030_261_248, "Llama-3-70B": 70_553_706_496}


def option_sets() -> list[tuple[str, object]]:
    """(label, FinalizeSpec) for each accumulator layout the methods can ask for."""
    import torch

    from tiesfed.core.accumulators import FinalizeSpec

    rows = []
    for dt, dname in ((torch.float64, "float64"), (torch.float32, "float32")):
        rows += [
            (f"TIES (disjoint mean), unweighted, sums {dname}", FinalizeSpec(sum_dtype=dt)),
            (f"TIES, weighted (mergekit semantics), sums {dname}", FinalizeSpec(weighted=True, sum_dtype=dt)),
            (f"TIES, weighted (peft semantics), sums {dname}",
             FinalizeSpec(weighted=True, weight_semantics="peft", sum_dtype=dt)),
            (f"TIES, disjoint max, sums {dname}", FinalizeSpec(disjoint="max", sum_dtype=dt)),
            (f"task arithmetic / average (sum), sums {dname}", FinalizeSpec(combine="sum", sum_dtype=dt)),
        ]
    return rows


def render_table(budget: int) -> str:
    """One row per option set: bytes a parameter, and for each paper model the accumulators'
    total and the shard actors that hold them at `budget` each."""
    from tiesfed.coordinator.memory import ACTOR_BASE_BYTES, actor_bytes_per_param, shards_for_budget

    lines = ["| option set | accumulator bytes/param | actor bytes/param (+ staged output) |"
             + "".join(f" {m}: accumulators, actors at {budget / GiB:g} GiB |" for m in PAPER_MODELS),
             "|---|---:|---:|" + "---:|" * len(PAPER_MODELS)]
    for label, spec in option_sets():
        cells = [label, str(spec.bytes_per_param()), str(actor_bytes_per_param(spec))]
        for n in PAPER_MODELS.values():
            cells.append(f"{n * spec.bytes_per_param() / GiB:,.0f} GiB, {shards_for_budget(n, spec, budget)}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"An actor also takes about {ACTOR_BASE_BYTES / MiB:.0f} MiB of its own (Python, torch, the Ray "
                 "worker, fold and finalize temporaries in fixed-size chunks); actors = "
                 "ceil(N × actor bytes/param / (budget − that)).")
    return "\n".join(lines)


def render_nodes(budget: int, node_bytes: int) -> str:
    """How many nodes of `node_bytes` usable memory hold the paper rounds at `budget` per actor."""
    import torch

    from tiesfed.coordinator.memory import shards_for_budget
    from tiesfed.core.accumulators import FinalizeSpec

    per_node = max(1, node_bytes // budget)
    out = [f"| model | sums | shard actors at {budget / GiB:g} GiB | nodes of {node_bytes / GiB:g} GiB "
           f"({per_node} actors each) |", "|---|---|---:|---:|"]
    for m, n in PAPER_MODELS.items():
        for dt in (torch.float64, torch.float32):
            s = shards_for_budget(n, FinalizeSpec(sum_dtype=dt), budget)
            out.append(f"| {m} | {str(dt).removeprefix('torch.')} | {s} | {math.ceil(s / per_node)} |")
    return "\n".join(out)


# ---------------------------------------------------------------- round (measured)


def run_round(family: Path, work: Path, coord_args: list[str], timeout: float = 1800,
              tiesfed_src: str | None = None) -> dict:
    """One round with the coordinator on Ray (`coord_args` added), every process sampled."""
    env = tool_env(tiesfed_src)
    base, fts = family / "base", [family / f"ft{i}" for i in range(3)]
    res = run_federated(base, fts, work / "coordinator-memory", work, env, timeout, aggregator="ray",
                        coordinator_args=tuple(coord_args), sample_tree=True)
    tree = res["processes"]
    driver = next((r for r in tree if r["pid"] == res["coordinator"]["pid"]), tree[0])
    return {
        "coord_args": coord_args,
        "tiesfed_src": tiesfed_src,
        "wall_s": res["wall_s"],
        "coordinator": {"peak_rss_mib": driver["peak_rss_mib"], "cpu_s": driver.get("cpu_s"),
                        "tree_cpu_s": res["coordinator"]["user_s"] + res["coordinator"]["sys_s"]},
        "processes": tree,
        "submits": [{k: s[k] for k in ("wall_s", "peak_rss_mib", "user_s", "sys_s")} for s in res["submits"]],
        "fetch": {k: res["fetch"][k] for k in ("wall_s", "peak_rss_mib", "user_s", "sys_s")},
        "window": res["window"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("table", help="accumulator bytes/param per option set, and 8B/70B on paper")
    t.add_argument("--budget", default="3GiB", help="per-actor memory budget for the paper rows")
    t.add_argument("--node", default="64GiB", help="usable memory of one Ray node, for the node count")
    r = sub.add_parser("round", help="measure one federated round (coordinator + Ray actors + clients)")
    r.add_argument("--family", required=True, type=Path, help="folder with base, ft0, ft1, ft2")
    r.add_argument("--work", type=Path, default=Path("/tmp/tiesfed-coordinator-memory"))
    r.add_argument("--coord-arg", action="append", default=[], help="extra `coordinator serve` argument")
    r.add_argument("--json", type=Path, help="also write the result here")
    r.add_argument("--tiesfed-src", help="a checkout whose tiesfed/ the measured processes import "
                   "(e.g. a `git worktree` of an earlier commit, for before/after figures)")
    args = ap.parse_args(argv)
    if args.mode == "table":
        from tiesfed.cli.common import parse_size

        budget, node = parse_size(args.budget), parse_size(args.node)
        print(render_table(budget))
        print()
        print(render_nodes(budget, node))
        return 0
    res = run_round(args.family, args.work, args.coord_arg, tiesfed_src=args.tiesfed_src)
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
