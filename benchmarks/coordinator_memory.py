"""Coordinator memory, stated and measured (GitHub issue 14).

Two modes:

  python benchmarks/coordinator_memory.py table
      Accumulator bytes per parameter for each option set, from
      `FinalizeSpec.bytes_per_param`, and on paper the shard actors (and Ray nodes)
      that hold an 8B and a 70B round at a per-actor budget (markdown, for the README).

  python benchmarks/coordinator_memory.py round --family /tmp/fam134 [--coord-arg=--actor-memory=3GB ...]
      One federated round over mutual TLS on loopback, every party its own process
      (`coordinator serve` with Ray + 3 `client submit` + 1 `client fetch`), while a
      poller samples with psutil the RSS of the coordinator process and of each process
      it started (Ray's GCS, raylet, the shard actors). Prints peak RSS per process, CPU
      seconds (user + sys) of the coordinator and of its process tree, and the finalize
      window from the coordinator's JSON log.

The family folder holds `base` and `ft0`..`ft2` (what bench_vs_mergekit.py generates).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.bench_vs_mergekit import (  # noqa: E402
    CLIENTS,
    K,
    Measured,
    coordinator_window,
    ensure_pki,
    tiesfed_cmd,
    tool_env,
)

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


class Poller:
    """Samples the RSS of a process and of its descendants every `period` s (psutil)."""

    def __init__(self, root_pid: int, period: float = 0.25) -> None:
        import psutil

        self.psutil = psutil
        self.root = psutil.Process(root_pid)
        self.period = period
        self.peak: dict[int, dict] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _sample(self, p) -> None:
        try:
            rss = p.memory_info().rss
            name = " ".join(p.cmdline()[:2])[:80] or p.name()
            cpu = p.cpu_times()
        except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, self.psutil.ZombieProcess):
            return
        row = self.peak.setdefault(p.pid, {"pid": p.pid, "peak_rss_mib": 0.0, "name": name})
        row["peak_rss_mib"] = max(row["peak_rss_mib"], rss / MiB)
        row["cpu_s"] = cpu.user + cpu.system
        if name.startswith("ray::") or row["name"].startswith("ray::IDLE"):
            row["name"] = name  # an idle worker that became an actor

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except self.psutil.NoSuchProcess:
                return
            for p in procs:
                self._sample(p)
            self._stop.wait(self.period)

    def stop(self) -> list[dict]:
        self._stop.set()
        self._t.join()
        return sorted(self.peak.values(), key=lambda r: -r["peak_rss_mib"])


def run_round(family: Path, work: Path, coord_args: list[str], timeout: float = 1800,
              tiesfed_src: str | None = None) -> dict:
    env = tool_env(tiesfed_src)
    base, fts = family / "base", [family / f"ft{i}" for i in range(3)]
    pki = ensure_pki(work, env)
    fed = work / "coordinator-memory"
    shutil.rmtree(fed, ignore_errors=True)
    (fed / "logs").mkdir(parents=True)
    port_file = fed / "coordinator.port"
    tf = tiesfed_cmd()
    coord_cmd = [*tf, "coordinator", "serve", "--tls", str(pki / "server"), "--crl", str(pki / "ca" / "crl.pem"),
                 "--spool", str(fed / "spool"), "--base", str(base), "--listen", "127.0.0.1:0",
                 "--port-file", str(port_file), "--round", "r1", "--clients", ",".join(CLIENTS),
                 "--option", f"k={K:g}", "--log-format", "json", *coord_args]
    t0 = time.time()
    coord = Measured(coord_cmd, fed / "logs" / "coordinator.log", env)
    procs = [coord]
    poller = None
    try:
        deadline = time.monotonic() + 60
        import psutil

        while not psutil.Process(coord.proc.pid).children():
            if time.monotonic() > deadline:
                raise RuntimeError("the coordinator did not start")
            time.sleep(0.01)
        poller = Poller(psutil.Process(coord.proc.pid).children()[0].pid)
        deadline = time.monotonic() + 300
        while not (port_file.exists() and port_file.read_text().strip()):
            if not coord.running() or time.monotonic() > deadline:
                raise RuntimeError("the coordinator did not listen:\n" + coord.tail())
            time.sleep(0.02)
        target = f"127.0.0.1:{int(port_file.read_text())}"
        subs = [Measured([*tf, "client", "submit", str(base), str(ft), "--tls", str(pki / c), "--target", target,
                          "--round", "r1", "--json", "-q"], fed / "logs" / f"submit-{c}.log", env)
                for c, ft in zip(CLIENTS, fts)]
        procs += subs
        fetch = Measured([*tf, "client", "fetch", str(base), "-o", str(fed / "out"), "--tls", str(pki / CLIENTS[0]),
                          "--target", target, "--round", "r1", "--timeout", str(timeout), "-q"],
                         fed / "logs" / "fetch.log", env)
        procs.append(fetch)
        sub_res = [s.result(timeout) for s in subs]
        fetch_res = fetch.result(timeout)
        t_done = time.time()
        tree = poller.stop()
        poller = None
        coord.terminate()
        coord_res = coord.result(120, check=False)
    finally:
        if poller is not None:
            poller.stop()
        for p in procs:
            p.stop()
    driver = next((r for r in tree if r["pid"] == coord_res["pid"]), tree[0])
    return {
        "coord_args": coord_args,
        "tiesfed_src": tiesfed_src,
        "wall_s": t_done - t0,
        "coordinator": {"peak_rss_mib": driver["peak_rss_mib"], "cpu_s": driver.get("cpu_s"),
                        "tree_cpu_s": coord_res["user_s"] + coord_res["sys_s"]},
        "processes": tree,
        "submits": [{k: s[k] for k in ("wall_s", "peak_rss_mib", "user_s", "sys_s")} for s in sub_res],
        "fetch": {k: fetch_res[k] for k in ("wall_s", "peak_rss_mib", "user_s", "sys_s")},
        "window": coordinator_window(coord.log),
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
