"""The tools a benchmark runs, each in a fresh measured process: mergekit 0.1.5 (installed
into its own venv when missing), `tiesfed merge`, and a federated round over mutual TLS on
loopback (coordinator, clients and fetch, every party its own process)."""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import N_MODELS
from benchmarks.measure import Measured, TreeSampler, measure

HERE = Path(__file__).resolve().parent
MERGEKIT_VERSION = "0.1.5"
TORCH_PIN = "torch==2.13.0"
DEFAULT_VENV = HERE / ".venvs" / "mergekit"
K = 20.0
CLIENTS = [f"client-{i}" for i in range(N_MODELS)]



def tool_env(tiesfed_src: str | None = None) -> dict:
    """The measured processes' environment; `tiesfed_src`: a checkout whose tiesfed/ the tiesfed
    commands import instead of the installed one (e.g. a `git worktree` of a fixed commit)."""
    env = dict(os.environ)
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    if tiesfed_src:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(tiesfed_src).resolve()), *filter(None, [env.get("PYTHONPATH")])])
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "TIESFED_COORDINATOR", "TIESFED_TLS", "TIESFED_CLIENT_ID"):
        env.pop(k, None)
    return env


def tiesfed_source(env: dict) -> dict:
    """Where the measured tiesfed comes from: its folder, git commit and whether the tree differs from it."""
    code = "import tiesfed, os; print(os.path.dirname(os.path.dirname(os.path.abspath(tiesfed.__file__))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/")
    src = out.stdout.strip()
    info = {"path": src}
    git = subprocess.run(["git", "-C", src, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if git.returncode == 0:
        info["commit"] = git.stdout.strip()
        st = subprocess.run(["git", "-C", src, "status", "--porcelain", "--", "tiesfed"], capture_output=True,
                            text=True)
        info["dirty"] = bool(st.stdout.strip())
    return info


def tiesfed_cmd() -> list[str]:
    """The `tiesfed` command of this interpreter's environment (its console script, else -m)."""
    exe = Path(sys.executable).parent / "tiesfed"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "tiesfed.cli"]


def mergekit_version(venv: Path) -> str | None:
    py = venv / "bin" / "python"
    if not py.exists():
        return None
    out = subprocess.run([str(py), "-m", "pip", "show", "mergekit"], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    return None


def ensure_mergekit(venv: Path, log=print) -> Path:
    """mergekit==0.1.5 in its own venv (torch first, from the pinned CPU build); returns mergekit-yaml."""
    exe = venv / "bin" / "mergekit-yaml"
    if exe.exists() and mergekit_version(venv) == MERGEKIT_VERSION:
        log(f"mergekit {MERGEKIT_VERSION}: already installed in {venv}")
        return exe
    t0 = time.perf_counter()
    py = venv / "bin" / "python"
    if not py.exists():
        log(f"mergekit: creating a venv in {venv}")
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    for what in ([TORCH_PIN], [f"mergekit=={MERGEKIT_VERSION}"]):
        log(f"mergekit: {py} -m pip install {' '.join(what)}", flush=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *what], check=True)
    got = mergekit_version(venv)
    if got != MERGEKIT_VERSION or not exe.exists():
        raise RuntimeError(f"mergekit install in {venv} gave version {got!r}, no {exe}" if not exe.exists()
                           else f"mergekit install in {venv} gave version {got!r}, not {MERGEKIT_VERSION}")
    log(f"mergekit {MERGEKIT_VERSION}: installed in {venv} ({time.perf_counter() - t0:.0f} s)")
    return exe



def mergekit_yaml(base: Path, fts: list[Path]) -> str:
    lines = ["merge_method: ties", f"base_model: {base}", "models:"]
    for f in fts:
        lines += [f"  - model: {f}", "    parameters:", f"      density: {K / 100:g}", "      weight: 1.0"]
    lines += ["parameters:", "  normalize: true", "dtype: float32"]
    return "\n".join(lines) + "\n"


def mergekit_cmd(exe: Path, cfg_file: Path, out: Path) -> list[str]:
    return [str(exe), str(cfg_file), str(out), "--no-copy-tokenizer", "--quiet"]


def run_mergekit(exe: Path, base: Path, fts: list[Path], run: Path, env: dict) -> dict:
    out = run / "out-mergekit"
    shutil.rmtree(out, ignore_errors=True)
    cfg = run / "mergekit-ties.yml"
    cfg.write_text(mergekit_yaml(base, fts))
    res = measure(mergekit_cmd(exe, cfg, out), run / "logs" / "mergekit.log", env)
    res["out"] = str(out)
    return res


def tiesfed_merge_args(scope: str) -> list[str]:
    """Merge flags of a row: 'tensor' (mergekit's semantics) or 'default' (the paper's)."""
    common = ["--k", f"{K:g}", "-q"]
    if scope == "tensor":
        return ["--trim", "tensor", "--zero-sign", "positive", *common]
    return common


def run_tiesfed_merge(scope: str, base: Path, fts: list[Path], run: Path, env: dict,
                      extra: tuple[str, ...] = (), tag: str = "") -> dict:
    """`tiesfed merge` of one row (`extra`: more flags, e.g. --max-memory; `tag` names its output)."""
    out = run / f"out-tiesfed-{scope}{tag}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [*tiesfed_cmd(), "merge", str(base), *map(str, fts), "-o", str(out), *tiesfed_merge_args(scope), *extra]
    res = measure(cmd, run / "logs" / f"tiesfed-merge-{scope}{tag}.log", env)
    res["out"] = str(out)
    return res



def ensure_pki(work: Path, env: dict) -> Path:
    """A throwaway CA, a server identity for 127.0.0.1/localhost and one per client (cached): what
    `tiesfed pki init` / `tiesfed pki issue` write, made in this process (not timed either way)."""
    from tiesfed.trust import pki as ca

    pki = work / "pki"
    done = pki / "done"
    if done.exists():
        return pki
    shutil.rmtree(pki, ignore_errors=True)
    ca.init_ca(pki / "ca")
    ca.issue(pki / "ca", pki / "server", server_names=["127.0.0.1", "localhost"])
    for c in CLIENTS:
        ca.issue(pki / "ca", pki / c, client_id=c)
    done.write_text("ok\n")
    return pki


def _parse_log_times(path: Path) -> list[dict]:
    rows = []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return rows
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return rows


def _event_time(ev: dict) -> float | None:
    t = ev.get("time") or ev.get("ts") or ev.get("timestamp")
    if isinstance(t, (int, float)):
        return float(t)
    if isinstance(t, str):
        try:
            return datetime.datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def coordinator_window(log: Path) -> dict:
    """From the coordinator's JSON log: when the first upload started, when the round finalized,
    and how long its finalize (the merge of the folded contributions) took."""
    first_upload = finalized = finalize_s = None
    for ev in _parse_log_times(log):
        msg = str(ev.get("message", ""))
        t = _event_time(ev)
        if t is None:
            continue
        if first_upload is None and re.search(r"upload from \S+ started", msg):
            first_upload = t
        if ev.get("event") == "ROUND_FINALIZED" and finalized is None:
            finalized = t
        m = re.search(r"merged \d+ contribution\(s\) in ([0-9.]+) s", msg)
        if m:
            finalize_s = float(m.group(1))
    return {"first_upload": first_upload, "finalized": finalized, "finalize_s": finalize_s}


def run_federated(base: Path, fts: list[Path], run: Path, work: Path, env: dict, timeout: float = 1800,
                  aggregator: str = "local", coordinator_args: tuple[str, ...] = (),
                  submit_args: tuple[str, ...] = (), fetch_args: tuple[str, ...] = (),
                  sample_tree: bool = False, one_client_at_a_time: bool = False) -> dict:
    """A round over mutual TLS on loopback; every party its own measured process (`*_args`: more
    flags for each command). `sample_tree` also samples the peak RSS of every process
    below the coordinator (Ray's raylet and shard actors, which its rusage does not count).
    `one_client_at_a_time`: each submit starts when the previous one ends (organisations are
    separate machines; on one small machine their peaks need not add up)."""
    pki = ensure_pki(work, env)
    fed = run / "federated"
    shutil.rmtree(fed, ignore_errors=True)
    (fed / "logs").mkdir(parents=True)
    port_file = fed / "coordinator.port"
    tf = tiesfed_cmd()
    coord_cmd = [*tf, "coordinator", "serve", "--tls", str(pki / "server"), "--crl", str(pki / "ca" / "crl.pem"),
                 "--spool", str(fed / "spool"), "--base", str(base), "--listen", "127.0.0.1:0",
                 "--port-file", str(port_file), "--round", "r1", "--clients", ",".join(CLIENTS),
                 "--option", f"k={K:g}", "--aggregator", aggregator, "--log-format", "json", *coordinator_args]
    procs: list[Measured] = []
    t0 = time.time()
    coord = Measured(coord_cmd, fed / "logs" / "coordinator.log", env)
    procs.append(coord)
    tree = TreeSampler(coord.proc.pid) if sample_tree else None
    try:
        deadline = time.monotonic() + 300
        while not (port_file.exists() and port_file.read_text().strip()):
            if not coord.running() or time.monotonic() > deadline:
                raise RuntimeError("the coordinator did not listen:\n" + coord.tail())
            time.sleep(0.02)
        t_listen = time.time()
        target = f"127.0.0.1:{int(port_file.read_text())}"
        subs, sub_res = [], []
        for c, ft in zip(CLIENTS, fts):
            if one_client_at_a_time and subs:
                sub_res.append(subs[-1].result(timeout))
            subs.append(Measured([*tf, "client", "submit", str(base), str(ft), "--tls", str(pki / c),
                                  "--target", target, "--round", "r1", "--json", "-q", *submit_args],
                                 fed / "logs" / f"submit-{c}.log", env))
            procs.append(subs[-1])
        out = fed / "out"
        fetch = Measured([*tf, "client", "fetch", str(base), "-o", str(out), "--tls", str(pki / CLIENTS[0]),
                          "--target", target, "--round", "r1", "--timeout", str(timeout), "-q", *fetch_args],
                         fed / "logs" / "fetch.log", env)
        procs.append(fetch)
        sub_res += [s.result(timeout) for s in subs[len(sub_res):]]
        fetch_res = fetch.result(timeout)
        t_done = time.time()
        coord.terminate()
        coord_res = coord.result(120, check=False)
    finally:
        for p in procs:
            p.stop()
        processes = tree.stop() if tree else []
    submits = []
    for s in sub_res:
        lines = [ln for ln in Path(s["log"]).read_text(errors="replace").splitlines() if ln.startswith("{")]
        info = json.loads(lines[-1]) if lines else {}
        submits.append({**s, "bytes_sent": info.get("bytes_sent"), "density": info.get("density"),
                        "seconds_in_process": info.get("seconds")})
    window = coordinator_window(coord.log)
    return {
        "wall_s": t_done - t0,
        "listen_s": t_listen - t0,
        "coordinator": coord_res,
        "submits": submits,
        "fetch": fetch_res,
        "peak_rss_mib": max([coord_res["peak_rss_mib"], fetch_res["peak_rss_mib"],
                             *(s["peak_rss_mib"] for s in submits)]),
        "window": window,
        "out": str(out),
        "processes": processes,
    }


