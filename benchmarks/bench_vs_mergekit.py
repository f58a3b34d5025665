"""tiesfed against mergekit 0.1.5's TIES on this machine, each tool in a fresh process.

One run (GitHub issue 11, "Speed") prints a markdown table of wall time and peak RSS,
as ratios against mergekit measured in the same run:

  a. mergekit 0.1.5 `mergekit-yaml` with its usual TIES config (density 0.2, weight 1.0,
     normalize: true, dtype float32), CPU; installed into its own venv
     (--mergekit-venv, default benchmarks/.venvs/mergekit) unless already there;
  b. `tiesfed merge --trim tensor --zero-sign positive --k 20` (mergekit's semantics);
  c. `tiesfed merge --k 20` (defaults: global trim, majority sign: the paper's);
  d. a federated round over mutual TLS on loopback, every party its own process:
     `tiesfed coordinator serve --aggregator local` + 3 concurrent `tiesfed client
     submit` + 1 `tiesfed client fetch`; wall from the coordinator's start to the
     merged model on disk, peak RSS per process;

on a generated Llama-shaped fp32 family (base + 3 fine-tunes, sharded safetensors,
cached under --work; ~134M parameters: vocab 32000, hidden 768, inter 2048, 12 layers).
Equality checks: (b) against mergekit's output (fraction of differing elements, max
|diff|), (c) against (d) bit for bit. Goals of the issue are printed PASS/FAIL (the exit
code does not depend on them). Wall time and peak RSS come from a tiny launcher process
that forks, execs the command and reads the child's rusage from os.wait4 (ru_maxrss:
the largest RSS of the child or any descendant it waited for; the launcher's own ~10 MiB
at fork time is its floor).

    python benchmarks/bench_vs_mergekit.py                      # 134M, installs mergekit once
    python benchmarks/bench_vs_mergekit.py --repeat 3 --json out.json
    python benchmarks/bench_vs_mergekit.py --quick --skip-mergekit   # ~10M smoke run
    git worktree add /tmp/tf-head HEAD && python benchmarks/bench_vs_mergekit.py --tiesfed-src /tmp/tf-head

The measured tiesfed is the one this interpreter imports (an editable install measures the
working tree as it is, uncommitted changes included: the report names the commit and says so),
or --tiesfed-src's. --update-readme replaces the README's <!-- figures:vs-mergekit --> block; the markers must
already be there. How wall and memory grow with the model's size: benchmarks/bench_scale.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

# the pieces live in their own modules; these names stay importable from here
from benchmarks.common import N_MODELS, count_params, family, shapes_for  # noqa: E402,F401
from benchmarks.diff import compare, explain_selection  # noqa: E402
from benchmarks.measure import Measured, measure  # noqa: E402,F401
from benchmarks.peers import (  # noqa: E402,F401
    CLIENTS,
    DEFAULT_VENV,
    MERGEKIT_VERSION,
    K,
    coordinator_window,
    ensure_mergekit,
    ensure_pki,
    mergekit_cmd,
    mergekit_yaml,
    run_federated,
    run_mergekit,
    run_tiesfed_merge,
    tiesfed_cmd,
    tiesfed_merge_args,
    tiesfed_source,
    tool_env,
)

DEFAULT_WORK = Path("/tmp/tiesfed-bench-vs-mergekit")
BLOCK = "vs-mergekit"


# ---------------------------------------------------------------- rendering (pure)


def best(runs: list[dict]) -> dict:
    """Min wall time over repeats, max peak RSS (a peak is a peak)."""
    r = dict(min(runs, key=lambda x: x["wall_s"]))
    r["peak_rss_mib"] = max(x["peak_rss_mib"] for x in runs)
    r["walls"] = [x["wall_s"] for x in runs]
    return r


ROW_NAMES = {
    "mergekit": "mergekit 0.1.5 `mergekit-yaml` (TIES, baseline)",
    "tensor": "`tiesfed merge --trim tensor --zero-sign positive`",
    "default": "`tiesfed merge` (global trim, majority sign)",
    "federated": "federated round: coordinator + 3 × submit + fetch (mTLS, loopback)",
}


def table_rows(data: dict) -> list[dict]:
    rows = []
    mk = data.get("mergekit")
    for key in ("mergekit", "tensor", "default", "federated"):
        r = data.get(key)
        if not r:
            continue
        tool = ROW_NAMES[key]
        extra = data.get("config", {}).get("coordinator_args")
        if key == "federated" and extra:
            tool += f", coordinator `{' '.join(extra)}`"
        row = {"key": key, "tool": tool, "wall_s": r["wall_s"], "peak_rss_mib": r["peak_rss_mib"],
               "wall_ratio": None, "rss_ratio": None}
        if mk:
            row["wall_ratio"] = r["wall_s"] / mk["wall_s"]
            row["rss_ratio"] = r["peak_rss_mib"] / mk["peak_rss_mib"]
        rows.append(row)
    return rows


def _ratio(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def render_table(data: dict) -> str:
    lines = ["| tool | wall s | peak RSS MB | wall / mergekit | RSS / mergekit |", "|---|---:|---:|---:|---:|"]
    for r in table_rows(data):
        rss = f"{r['peak_rss_mib'] * 2**20 / 1e6:.0f}"
        if r["key"] == "federated":
            rss += " (largest process)"
        lines.append(f"| {r['tool']} | {r['wall_s']:.1f} | {rss} | {_ratio(r['wall_ratio'])} | "
                     f"{_ratio(r['rss_ratio'])} |")
    return "\n".join(lines)


def goals(data: dict) -> list[tuple[str, bool | None, str]]:
    """(goal, passed or None when not measured, the numbers)."""
    mk = data.get("mergekit")
    out = []
    for key, name in (("tensor", "tensor scope"), ("default", "global scope")):
        r = data.get(key)
        if not (mk and r):
            out.append((f"tiesfed merge ({name}) wall ≤ 0.5× mergekit and peak RSS ≤ mergekit's", None,
                        "not measured"))
            continue
        w, m = r["wall_s"] / mk["wall_s"], r["peak_rss_mib"] / mk["peak_rss_mib"]
        out.append((f"tiesfed merge ({name}) wall ≤ 0.5× mergekit and peak RSS ≤ mergekit's",
                    w <= 0.5 and m <= 1.0, f"wall {w:.2f}×, RSS {m:.2f}×"))
    f = data.get("federated")
    if mk and f:
        w = f["wall_s"] / mk["wall_s"]
        out.append(("federated round end to end ≤ 1.0× mergekit wall", w <= 1.0, f"{w:.2f}×"))
    else:
        out.append(("federated round end to end ≤ 1.0× mergekit wall", None, "not measured"))
    return out


def throughput(data: dict) -> dict:
    p = data["config"]["params"]
    f = data.get("federated")
    res = {}
    if f:
        res["client_mparams_s"] = [p / s["wall_s"] / 1e6 for s in f["submits"]]
        w = f.get("window") or {}
        if w.get("first_upload") and w.get("finalized") and w["finalized"] > w["first_upload"]:
            res["coordinator_mparams_s"] = p * len(f["submits"]) / (w["finalized"] - w["first_upload"]) / 1e6
            res["coordinator_basis"] = "first upload start to finalize (coordinator log)"
        else:
            span = f["fetch"]["end"] - f["coordinator"]["start"]
            res["coordinator_mparams_s"] = p * len(f["submits"]) / span / 1e6
            res["coordinator_basis"] = "coordinator start to merged model fetched"
        if w.get("finalize_s"):
            res["finalize_s"] = w["finalize_s"]
            res["finalize_mparams_s"] = p * len(f["submits"]) / w["finalize_s"] / 1e6
    for key in ("mergekit", "tensor", "default"):
        if data.get(key):
            res[f"{key}_mparams_s"] = p * N_MODELS / data[key]["wall_s"] / 1e6
    return res


def render_block(data: dict) -> str:
    """The README block (between <!-- figures:vs-mergekit --> markers)."""
    c, meta = data["config"], data["meta"]
    parts = [render_table(data), ""]
    notes = []
    if data.get("tensor_vs_mergekit"):
        e = data["tensor_vs_mergekit"]
        t = e.get("ties") or {}
        n = e["selection"]
        share = "all" if t and t["at_tie"] == n else f"{t.get('at_tie', 0):,} of them"
        why = (f"; the other {n:,} by more, {share} where a task vector ties at its k-th largest magnitude and "
               f"the two tools keep different ones of the tied values" if t else f"; {n:,} differ by more")
        notes.append(f"`--trim tensor --zero-sign positive` against mergekit: {100 * e['fraction']:.3g}% of elements "
                     f"differ, max |diff| {e['max_abs_diff']:.2g}: {e['differing'] - e['selection']:,} by at most "
                     f"4 ulps (rounding, max {e['max_rounding_diff']:.2g}){why}.")
    if data.get("default_vs_federated"):
        e = data["default_vs_federated"]
        notes.append("The federated model is bit-identical to `tiesfed merge`." if e["identical"] else
                     f"The federated model differs from `tiesfed merge` in {100 * e['fraction']:.4g}% of elements.")
    f = data.get("federated")
    if f:
        tp = throughput(data)
        notes.append(f"The coordinator listened after {f['listen_s']:.1f} s; each client read, trimmed, encoded and "
                     f"sent at {min(tp['client_mparams_s']):.1f}–{max(tp['client_mparams_s']):.1f} M params/s "
                     f"(whole process), the coordinator folded {tp['coordinator_mparams_s']:.1f} M params/s "
                     f"({tp['coordinator_basis']}).")
    ok = [g for g in goals(data) if g[1] is not None]
    if ok:
        notes.append("Goals: " + "; ".join(f"{g[0]}: {'PASS' if g[1] else 'FAIL'} ({g[2]})" for g in ok) + ".")
    notes.append(f"*{c['params'] / 1e6:.1f}M-parameter Llama-shaped fp32 family (vocab {c['vocab']}, hidden "
                 f"{c['hidden']}, inter {c.get('inter', '?')}, {c['layers']} layers), base + {N_MODELS} fine-tunes, "
                 f"k = 20; each tool in a fresh process, best wall of {c['repeat']}; {meta['cpus']} CPU cores, "
                 f"torch {meta['torch']}, {meta['date'][:10]}; `python benchmarks/bench_vs_mergekit.py`.*")
    from benchmarks.figures import _para

    return "\n".join(parts) + "\n" + "\n\n".join(_para(n) for n in notes)


# ---------------------------------------------------------------- main


def meta_info() -> dict:
    import torch

    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "cpus": os.cpu_count(),
            "machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
            "loadavg_before": os.getloadavg()}


def run_all(args, log=print) -> dict:
    env = tool_env(getattr(args, "tiesfed_src", None))
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    exe = None if args.skip_mergekit else ensure_mergekit(Path(args.mergekit_venv), log)
    cfg = shapes_for(args.params)
    params = count_params(cfg)
    base, fts = family(work, cfg, log)
    run = work / "run"
    run.mkdir(parents=True, exist_ok=True)
    data: dict = {"config": {**cfg, "params": params, "models": N_MODELS, "k": K, "repeat": args.repeat,
                             "coordinator_args": list(getattr(args, "coordinator_arg", None) or []),
                             "work": str(work)},
                  "meta": {**meta_info(), "tiesfed": tiesfed_source(env)}}
    src = data["meta"]["tiesfed"]
    log(f"tiesfed from {src['path']}" + (f" at {src['commit']}{' + uncommitted changes' if src.get('dirty') else ''}"
                                        if src.get("commit") else ""), flush=True)
    if exe:
        data["mergekit_yaml"] = mergekit_yaml(base, fts)
        data["mergekit_cmd"] = mergekit_cmd(exe, run / "mergekit-ties.yml", run / "out-mergekit")
    data["tiesfed_cmds"] = {s: ["tiesfed", "merge", "BASE", "FT0", "FT1", "FT2", "-o", "OUT", *tiesfed_merge_args(s)]
                            for s in ("tensor", "default")}
    runs: dict[str, list] = {"mergekit": [], "tensor": [], "default": [], "federated": []}
    for i in range(args.repeat):
        tag = f" (run {i + 1}/{args.repeat})" if args.repeat > 1 else ""
        if exe:
            runs["mergekit"].append(run_mergekit(exe, base, fts, run, env))
            log(f"mergekit{tag}: {runs['mergekit'][-1]['wall_s']:.1f} s, "
                f"{runs['mergekit'][-1]['peak_rss_mib']:.0f} MiB", flush=True)
        for scope in ("tensor", "default"):
            runs[scope].append(run_tiesfed_merge(scope, base, fts, run, env))
            log(f"tiesfed merge {scope}{tag}: {runs[scope][-1]['wall_s']:.1f} s, "
                f"{runs[scope][-1]['peak_rss_mib']:.0f} MiB", flush=True)
        if not args.skip_federated:
            f = run_federated(base, fts, run, work, env, coordinator_args=tuple(getattr(args, "coordinator_arg", None)
                                                                               or ()))
            runs["federated"].append(f)
            log(f"federated round{tag}: {f['wall_s']:.1f} s (listening after {f['listen_s']:.1f} s), "
                f"coordinator {f['coordinator']['peak_rss_mib']:.0f} MiB, submits "
                + ", ".join(f"{s['peak_rss_mib']:.0f}" for s in f["submits"])
                + f" MiB, fetch {f['fetch']['peak_rss_mib']:.0f} MiB", flush=True)
    for key, rs in runs.items():
        if rs:
            data[key] = best(rs)
    # the outputs left on disk are the last run's
    if exe:
        data["tensor_vs_mergekit"] = compare(run / "out-tiesfed-tensor", run / "out-mergekit")
        data["default_vs_mergekit"] = compare(run / "out-tiesfed-default", run / "out-mergekit")
        if data["tensor_vs_mergekit"]["selection"]:
            data["tensor_vs_mergekit"]["ties"] = explain_selection(run / "out-tiesfed-tensor", run / "out-mergekit",
                                                                   base, fts, K / 100)
    if not args.skip_federated:
        data["default_vs_federated"] = compare(run / "out-tiesfed-default", Path(runs["federated"][-1]["out"]))
    data["throughput"] = throughput(data)
    data["goals"] = [{"goal": g, "pass": p, "numbers": n} for g, p, n in goals(data)]
    data["meta"]["loadavg_after"] = os.getloadavg()
    return data


def report(data: dict, print=print) -> None:
    c = data["config"]
    src = data["meta"].get("tiesfed", {})
    print(f"\n## tiesfed vs mergekit {MERGEKIT_VERSION}: {c['params'] / 1e6:.1f}M params, base + {N_MODELS} "
          f"fine-tunes, fp32, k = {c['k']:g}; {data['meta']['cpus']} CPU cores; best wall of {c['repeat']}\n")
    if src.get("path"):
        dirty = " + uncommitted changes to tiesfed/" if src.get("dirty") else ""
        at = f" at {src['commit']}{dirty}" if src.get("commit") else " (not a git checkout)"
        print(f"tiesfed: {src['path']}{at}\n")
    if data.get("mergekit_yaml"):
        print("mergekit config (mergekit-ties.yml):\n")
        print("```yaml\n" + data["mergekit_yaml"] + "```")
        print("command: " + " ".join(data["mergekit_cmd"]) + "\n")
    for s, cmd in data["tiesfed_cmds"].items():
        print(f"tiesfed ({s}): {' '.join(cmd)}")
    print()
    print(render_table(data))
    print()
    for key, label in (("tensor_vs_mergekit", "tiesfed --trim tensor --zero-sign positive vs mergekit"),
                       ("default_vs_mergekit", "tiesfed defaults (global, majority) vs mergekit (for scale)"),
                       ("default_vs_federated", "tiesfed merge (defaults) vs the federated round's model")):
        e = data.get(key)
        if not e:
            continue
        verdict = "IDENTICAL" if e["identical"] else (
            f"{e['differing']:,} of {e['elements']:,} elements differ ({100 * e['fraction']:.4g}%), max |diff| "
            f"{e['max_abs_diff']:.3g}: {e['rounding']:,} by at most 4 ulps of the tensor's largest value (rounding, "
            f"max {e['max_rounding_diff']:.2g}), "
            f"{e['selection']:,} by more (another value selected or not"
            + (f"; {e['ties']['at_tie']:,} of them at a tie at the k-th value, {e['ties']['other']:,} not)"
               if e.get("ties") else ")"))
        extra = ""
        if e["only_in_a"] or e["only_in_b"]:
            extra = f"; tensors only in one: {e['only_in_a'][:3]} / {e['only_in_b'][:3]}"
        print(f"{label}: {verdict}; dtypes {e['dtypes']}{extra}")
    tp = data["throughput"]
    f = data.get("federated")
    if f:
        print(f"\nfederated: coordinator listening after {f['listen_s']:.1f} s; round {f['wall_s']:.1f} s from "
              f"coordinator start to merged model on disk; peak RSS per process: coordinator "
              f"{f['coordinator']['peak_rss_mib']:.0f} MiB, submits "
              + ", ".join(f"{s['peak_rss_mib']:.0f}" for s in f["submits"])
              + f" MiB, fetch {f['fetch']['peak_rss_mib']:.0f} MiB")
        print("throughput: per client (process start to exit: import, read, trim, encode, send) "
              + ", ".join(f"{x:.1f}" for x in tp["client_mparams_s"])
              + f" M params/s; coordinator {tp['coordinator_mparams_s']:.1f} M params/s × {N_MODELS} clients "
              f"({tp['coordinator_basis']})")
        if "finalize_s" in tp:
            print(f"coordinator finalize (merge of the {N_MODELS} folded contributions, written): "
                  f"{tp['finalize_s']:.2f} s, "
                  f"{tp['finalize_mparams_s']:.1f} M params/s × {N_MODELS}")
    cpu = [f"{k} {data[k]['user_s'] + data[k]['sys_s']:.1f}" for k in ("mergekit", "tensor", "default")
           if data.get(k) and "user_s" in data[k]]
    if f:
        procs = [f["coordinator"], *f["submits"], f["fetch"]]
        cpu.append(f"federated {sum(p['user_s'] + p['sys_s'] for p in procs):.1f} (all 5 processes)")
    if cpu:
        print("CPU s (user + sys, less sensitive than wall time to other jobs): " + ", ".join(cpu))
    for key in ("mergekit", "tensor", "default"):
        if f"{key}_mparams_s" in tp:
            print(f"throughput {key}: {tp[f'{key}_mparams_s']:.1f} M params/s (params × {N_MODELS} models / wall)")
    print("\ngoals (issue 11; the exit code does not depend on them):")
    for g in data["goals"]:
        v = "n/a" if g["pass"] is None else "PASS" if g["pass"] else "FAIL"
        print(f"  {v}: {g['goal']} — {g['numbers']}")
    la, lb = data["meta"]["loadavg_before"], data["meta"].get("loadavg_after")
    print(f"\nload average before {la[0]:.2f}, after {lb[0]:.2f} (above ~0.5 before a run: another job was "
          f"running; timings are noisy)" if lb else "")
    print(f"\n<!-- figures:{BLOCK} -->\n{render_block(data)}\n<!-- /figures:{BLOCK} -->")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(DEFAULT_WORK), help="generated families (cached), outputs, logs")
    ap.add_argument("--mergekit-venv", default=str(DEFAULT_VENV), help="venv holding mergekit 0.1.5 (made if needed)")
    ap.add_argument("--params", type=float, default=134e6, help="family size in parameters (default 134e6)")
    ap.add_argument("--quick", action="store_true", help="a ~10M family: a smoke run")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each: best wall time, highest peak RSS")
    ap.add_argument("--skip-mergekit", action="store_true", help="no mergekit (no install, no ratios)")
    ap.add_argument("--skip-federated", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--coordinator-arg", action="append", metavar="ARG",
                    help="one more argument for the round's `coordinator serve` (repeatable), e.g. "
                         "--coordinator-arg=--publish-first")
    ap.add_argument("--json", metavar="OUT", help="also write every number to this JSON file")
    ap.add_argument("--update-readme", action="store_true",
                    help=f"replace README.md's <!-- figures:{BLOCK} --> block; the markers must be there")
    ap.add_argument("--readme", default=str(ROOT / "README.md"), help=argparse.SUPPRESS)
    ap.add_argument("--tiesfed-src", metavar="DIR",
                    help="a checkout whose tiesfed/ to measure instead of the installed one (put first on PYTHONPATH), "
                         "e.g. `git worktree add /tmp/tf HEAD`")
    args = ap.parse_args(argv)
    if args.quick:
        args.params = 10e6
    data = run_all(args)
    report(data)
    blocks = {BLOCK: render_block(data)}
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1, default=str) + "\n")
    if args.update_readme:
        from benchmarks.figures import update_readme

        if args.quick:
            print("error: --update-readme with --quick numbers", file=sys.stderr)
            return 2
        try:
            changed = update_readme(Path(args.readme), blocks)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{args.readme}: {'updated' if changed else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
