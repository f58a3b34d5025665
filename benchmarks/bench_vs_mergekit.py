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
    python benchmarks/bench_vs_mergekit.py --scale              # tiesfed merge at 30M..1B (slow)
    git worktree add /tmp/tf-head HEAD && python benchmarks/bench_vs_mergekit.py --tiesfed-src /tmp/tf-head

The measured tiesfed is the one this interpreter imports (an editable install measures the
working tree as it is, uncommitted changes included: the report names the commit and says so),
or --tiesfed-src's. --update-readme replaces the README's <!-- figures:vs-mergekit --> block
(<!-- figures:scale --> with --scale); the markers must already be there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

MERGEKIT_VERSION = "0.1.5"
TORCH_PIN = "torch==2.13.0"
DEFAULT_VENV = HERE / ".venvs" / "mergekit"
DEFAULT_WORK = Path("/tmp/tiesfed-bench-vs-mergekit")
VOCAB = 32000
BLOCK = "vs-mergekit"
SCALE_BLOCK = "scale"
N_MODELS = 3
K = 20.0

# Llama-2 shapes (vocab 32000) for the paper extrapolation: parameters, largest tensor's elements
EXTRAPOLATE = {"7B": (6_738_415_616, 32000 * 4096), "70B": (68_976_648_192, 32000 * 8192)}

# ---------------------------------------------------------------- measuring a process

# Runs under `python -S` (no site: ~10 MiB) so the child's ru_maxrss, which starts from
# the RSS it had at fork (the launcher's), is not inflated by a big parent.
LAUNCHER = r"""
import json, os, signal, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
t_start = time.time()
p0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    except BaseException as e:
        os.write(2, ("launcher: cannot run %r: %s\n" % (cmd[0], e)).encode())
    os._exit(127)
def forward(sig, frame):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, forward)
_, status, ru = os.wait4(pid, 0)
rc = os.waitstatus_to_exitcode(status)
res = {"pid": pid, "rc": rc, "wall_s": time.perf_counter() - p0, "start": t_start, "end": time.time(),
       "peak_rss_mib": ru.ru_maxrss / 1024, "user_s": ru.ru_utime, "sys_s": ru.ru_stime}
tmp = out + ".tmp"
with open(tmp, "w") as f:
    json.dump(res, f)
os.replace(tmp, out)
sys.exit(0 if rc == 0 else 1)
"""


class Measured:
    """A command running under the launcher; `.result()` waits and returns its measurements."""

    def __init__(self, cmd: list[str], log: Path, env: dict | None = None, cwd: Path | None = None):
        self.cmd = [str(c) for c in cmd]
        self.log = Path(log).resolve()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._res = self.log.with_suffix(".rusage.json")
        self._res.unlink(missing_ok=True)
        self.started = time.time()
        cwd = cwd or self.log.parent  # never a checkout: `python -m` would import its tiesfed/ first
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen([sys.executable, "-S", "-c", LAUNCHER, str(self._res), *self.cmd],
                                         stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, cwd=cwd)

    def running(self) -> bool:
        return self.proc.poll() is None

    def terminate(self) -> None:
        """SIGTERM to the launcher, which forwards it to the command."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, grace: float = 20.0) -> None:
        """Terminate and reap (SIGKILL after `grace` s): for cleanup on failure."""
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def result(self, timeout: float | None = None, check: bool = True) -> dict:
        self.proc.wait(timeout)
        if not self._res.exists():
            raise RuntimeError(f"{self.cmd[0]}: launcher wrote no result (exit {self.proc.returncode}); "
                               f"log {self.log}:\n{self.tail()}")
        res = json.loads(self._res.read_text())
        res["cmd"] = self.cmd
        res["log"] = str(self.log)
        if check and res["rc"] != 0:
            raise RuntimeError(f"{' '.join(self.cmd)} exited {res['rc']}; log {self.log}:\n{self.tail()}")
        return res

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def measure(cmd: list[str], log: Path, env: dict | None = None, timeout: float | None = None) -> dict:
    """Run `cmd` to completion in a fresh process: wall_s, peak_rss_mib, rc, ..."""
    m = Measured(cmd, log, env)
    try:
        return m.result(timeout)
    finally:
        m.stop()


# ---------------------------------------------------------------- environments


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


# ---------------------------------------------------------------- the model family


def shapes_for(params: float) -> dict:
    """A Llama-shaped config (vocab 32000) of about `params` parameters: hidden by size,
    inter = 8/3 hidden rounded to 256 (SwiGLU), layers to make up the rest."""
    hidden = 128 if params < 3e6 else 256 if params < 25e6 else 384 if params < 60e6 else \
        768 if params < 250e6 else 1024 if params < 700e6 else 2048 if params < 3e9 else 4096
    inter = max(256, int(round(hidden * 8 / 3 / 256)) * 256)
    vocab = VOCAB if params >= 25e6 else 8000
    embed = 2 * vocab * hidden
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((params - embed - hidden) / per_layer))
    return {"vocab": vocab, "hidden": hidden, "inter": inter, "layers": layers}


def count_params(cfg: dict) -> int:
    from benchmarks.common import llama_shapes

    total = 0
    for s in llama_shapes(cfg["vocab"], cfg["hidden"], cfg["inter"], cfg["layers"]).values():
        n = 1
        for d in s:
            n *= d
        total += n
    return total


def hf_config(cfg: dict) -> dict:
    """A config.json that transformers (hence mergekit) reads as this Llama shape."""
    heads = max(1, cfg["hidden"] // 64)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": "float32",
        "vocab_size": cfg["vocab"], "hidden_size": cfg["hidden"], "intermediate_size": cfg["inter"],
        "num_hidden_layers": cfg["layers"], "num_attention_heads": heads, "num_key_value_heads": heads,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "note": "generated by tiesfed benchmarks",
    }


def family_name(cfg: dict) -> str:
    return f"family-v{cfg['vocab']}-h{cfg['hidden']}-i{cfg['inter']}-l{cfg['layers']}"


def family(work: Path, cfg: dict, log=print) -> tuple[Path, list[Path]]:
    """Base + 3 fine-tunes (fp32, sharded, cached under work/family-...), each with a config.json."""
    import torch

    from benchmarks.common import llama_shapes, write_family

    root = work / family_name(cfg)
    t0 = time.perf_counter()
    shapes = llama_shapes(cfg["vocab"], cfg["hidden"], cfg["inter"], cfg["layers"])
    base, fts = write_family(root, N_MODELS, torch.float32, shapes)
    text = json.dumps(hf_config(cfg), indent=1) + "\n"
    for m in (base, *fts):
        if not (m / "config.json").exists() or (m / "config.json").read_text() != text:
            (m / "config.json").write_text(text)
    log(f"family: {count_params(cfg) / 1e6:.1f}M params (vocab {cfg['vocab']}, hidden {cfg['hidden']}, inter "
        f"{cfg['inter']}, {cfg['layers']} layers), base + {N_MODELS} fine-tunes, fp32, in {root} "
        f"(ready in {time.perf_counter() - t0:.0f} s)", flush=True)
    return base, fts


# ---------------------------------------------------------------- comparing outputs


class Weights:
    """Tensors of a safetensors folder, read one at a time (safetensors only: no tiesfed internals)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.files = {}
        self.where = {}
        for f in sorted(Path(folder).glob("*.safetensors")):
            h = safe_open(str(f), framework="pt")
            self.files[f] = h
            for n in h.keys():
                self.where[n] = h
        if not self.where:
            raise RuntimeError(f"no safetensors weights in {folder}")

    def get(self, name: str):
        return self.where[name].get_tensor(name)


def ulps(x, y, n: int = 4) -> float:
    """n ulps at the larger of the two tensors' largest magnitudes: the tolerance of 'rounding only'."""
    import torch

    return n * torch.finfo(x.dtype).eps * max(x.abs().max().item(), y.abs().max().item())


def compare(a: Path, b: Path) -> dict:
    """Elements that differ, their fraction, max |a - b|, names present in one only, dtypes."""

    wa, wb = Weights(a), Weights(b)
    common = sorted(set(wa.where) & set(wb.where))
    differ = total = rounding = 0
    worst = worst_rounding = 0.0
    identical = set(wa.where) == set(wb.where)
    dtypes = set()
    for n in common:
        x, y = wa.get(n), wb.get(n)
        dtypes.add((str(x.dtype).replace("torch.", ""), str(y.dtype).replace("torch.", "")))
        if x.dtype != y.dtype or x.shape != y.shape:
            identical = False
        if x.shape != y.shape:
            raise RuntimeError(f"{n}: shape {tuple(x.shape)} in {a}, {tuple(y.shape)} in {b}")
        ne = x != y
        d = int(ne.sum())
        differ += d
        total += x.numel()
        if d:
            identical = False
            diff = (x.double() - y.double()).abs()
            worst = max(worst, diff.max().item())
            # a few ulps of the tensor's largest value: the same selection, summed or divided in another order
            small = ne & (diff <= ulps(x, y))
            rounding += int(small.sum())
            if small.any():
                worst_rounding = max(worst_rounding, diff[small].max().item())
    return {"identical": identical, "differing": differ, "elements": total, "rounding": rounding,
            "max_rounding_diff": worst_rounding, "selection": differ - rounding,
            "fraction": differ / total if total else 0.0, "max_abs_diff": worst,
            "only_in_a": sorted(set(wa.where) - set(wb.where)), "only_in_b": sorted(set(wb.where) - set(wa.where)),
            "dtypes": sorted(dtypes)}


def explain_selection(a: Path, b: Path, base: Path, fts: list[Path], density: float) -> dict:
    """For elements that differ by more than rounding between two tensor-scope merges: how many
    sit where some task vector's |value| equals its tensor's k-th largest |value| (k = int(density
    n)) while more than one element has that value, so either tool may keep either (a tie at the cut)."""
    import torch

    wa, wb, wbase = Weights(a), Weights(b), Weights(base)
    wfs = [Weights(f) for f in fts]
    at_tie = other = 0
    for n in sorted(set(wa.where) & set(wb.where)):
        x, y = wa.get(n), wb.get(n)
        diff = (x.double() - y.double()).abs()
        big = diff > ulps(x, y)
        if not big.any():
            continue
        bt = wbase.get(n).float()
        tied = torch.zeros_like(big)
        k = max(1, int(density * bt.numel()))
        for wf in wfs:
            tv = (wf.get(n).float() - bt).abs()
            kth = tv.reshape(-1).kthvalue(tv.numel() - k + 1).values
            if int((tv == kth).sum()) > 1:
                tied |= tv == kth
        at_tie += int((big & tied).sum())
        other += int((big & ~tied).sum())
    return {"at_tie": at_tie, "other": other}


# ---------------------------------------------------------------- the runs


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


def run_tiesfed_merge(scope: str, base: Path, fts: list[Path], run: Path, env: dict) -> dict:
    out = run / f"out-tiesfed-{scope}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [*tiesfed_cmd(), "merge", str(base), *map(str, fts), "-o", str(out), *tiesfed_merge_args(scope)]
    res = measure(cmd, run / "logs" / f"tiesfed-merge-{scope}.log", env)
    res["out"] = str(out)
    return res


CLIENTS = [f"client-{i}" for i in range(N_MODELS)]


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


def run_federated(base: Path, fts: list[Path], run: Path, work: Path, env: dict, timeout: float = 1800) -> dict:
    """A round over mutual TLS on loopback; every party its own measured process."""
    pki = ensure_pki(work, env)
    fed = run / "federated"
    shutil.rmtree(fed, ignore_errors=True)
    (fed / "logs").mkdir(parents=True)
    port_file = fed / "coordinator.port"
    tf = tiesfed_cmd()
    coord_cmd = [*tf, "coordinator", "serve", "--tls", str(pki / "server"), "--crl", str(pki / "ca" / "crl.pem"),
                 "--spool", str(fed / "spool"), "--base", str(base), "--listen", "127.0.0.1:0",
                 "--port-file", str(port_file), "--round", "r1", "--clients", ",".join(CLIENTS),
                 "--option", f"k={K:g}", "--aggregator", "local", "--log-format", "json"]
    procs: list[Measured] = []
    t0 = time.time()
    coord = Measured(coord_cmd, fed / "logs" / "coordinator.log", env)
    procs.append(coord)
    try:
        deadline = time.monotonic() + 300
        while not (port_file.exists() and port_file.read_text().strip()):
            if not coord.running() or time.monotonic() > deadline:
                raise RuntimeError("the coordinator did not listen:\n" + coord.tail())
            time.sleep(0.02)
        t_listen = time.time()
        target = f"127.0.0.1:{int(port_file.read_text())}"
        subs = []
        for c, ft in zip(CLIENTS, fts):
            subs.append(Measured([*tf, "client", "submit", str(base), str(ft), "--tls", str(pki / c),
                                  "--target", target, "--round", "r1", "--json", "-q"],
                                 fed / "logs" / f"submit-{c}.log", env))
        procs += subs
        out = fed / "out"
        fetch = Measured([*tf, "client", "fetch", str(base), "-o", str(out), "--tls", str(pki / CLIENTS[0]),
                          "--target", target, "--round", "r1", "--timeout", str(timeout), "-q"],
                         fed / "logs" / "fetch.log", env)
        procs.append(fetch)
        sub_res = [s.result(timeout) for s in subs]
        fetch_res = fetch.result(timeout)
        t_done = time.time()
        coord.terminate()
        coord_res = coord.result(60, check=False)
    finally:
        for p in procs:
            p.stop()
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
    }


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
        row = {"key": key, "tool": ROW_NAMES[key], "wall_s": r["wall_s"], "peak_rss_mib": r["peak_rss_mib"],
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


# ---------------------------------------------------------------- scale mode

SCALE_SIZES = (30e6, 134e6, 400e6, 1e9)


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x."""
    n = len(xs)
    if n == 1:
        return 0.0, ys[0] / xs[0]
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx, b


def largest_tensor(cfg: dict) -> int:
    return max(cfg["vocab"] * cfg["hidden"], cfg["inter"] * cfg["hidden"])


def scale_fits(rows: list[dict]) -> dict:
    fits = {}
    for scope in ("default", "tensor"):
        rs = [r for r in rows if r["scope"] == scope]
        if not rs:
            continue
        wa, wb = fit_line([r["params"] for r in rs], [r["wall_s"] for r in rs])
        ca, cb = fit_line([r["params"] for r in rs], [r.get("cpu_s", float("nan")) for r in rs])
        ra, rb = fit_line([r["largest"] for r in rs], [r["peak_rss_mib"] * 2**20 for r in rs])
        fits[scope] = {"wall_fixed_s": wa, "wall_s_per_mparam": wb * 1e6,
                       "cpu_fixed_s": ca, "cpu_s_per_mparam": cb * 1e6,
                       "rss_fixed_mib": ra / 2**20, "rss_bytes_per_largest_element": rb,
                       "extrapolated": {name: {"params": p, "largest": lt, "wall_s": wa + wb * p, "cpu_s": ca + cb * p,
                                               "peak_rss_gib": (ra + rb * lt) / 2**30}
                                        for name, (p, lt) in EXTRAPOLATE.items()}}
    return fits


def render_scale(data: dict) -> str:
    rows = data["rows"]
    out = ["| params | largest tensor | trim scope | wall s | CPU s | peak RSS MB | M params/s (3 models, wall) |",
           "|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        cpu = f"{r['cpu_s']:.1f}" if "cpu_s" in r else "–"
        out.append(f"| {r['params'] / 1e6:.0f}M | {r['largest'] / 1e6:.1f}M | {r['scope']} | {r['wall_s']:.1f} | "
                   f"{cpu} | {r['peak_rss_mib'] * 2**20 / 1e6:.0f} | "
                   f"{r['params'] * N_MODELS / r['wall_s'] / 1e6:.1f} |")
    out += ["", "Extrapolation (fp32, 3 fine-tunes; wall and CPU time (user + sys) linear in parameters, peak RSS = "
            "fixed + bytes × the largest tensor's elements; least squares over the rows above; Llama-2 shapes):", "",
            "| scope | fit: wall | fit: CPU | fit: peak RSS | 7B wall | 7B CPU | 7B peak RSS | 70B wall | 70B CPU | "
            "70B peak RSS |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for scope, f in data["fits"].items():
        e = f["extrapolated"]
        out.append(f"| {scope} | {f['wall_fixed_s']:.1f} s + {f['wall_s_per_mparam']:.3f} s/M params | "
                   f"{f.get('cpu_fixed_s', float('nan')):.1f} s + {f.get('cpu_s_per_mparam', float('nan')):.3f} s/M "
                   f"params | {f['rss_fixed_mib']:.0f} MiB + {f['rss_bytes_per_largest_element']:.0f} B × largest | "
                   f"{e['7B']['wall_s'] / 60:.0f} min | {e['7B'].get('cpu_s', float('nan')) / 60:.0f} min | "
                   f"{e['7B']['peak_rss_gib']:.1f} GiB | {e['70B']['wall_s'] / 60:.0f} min | "
                   f"{e['70B'].get('cpu_s', float('nan')) / 60:.0f} min | {e['70B']['peak_rss_gib']:.1f} GiB |")
    if data.get("note"):
        out += ["", data["note"]]
    return "\n".join(out)


def run_scale(args, env: dict) -> dict:
    """tiesfed merge (defaults and tensor scope) on families of growing size; wall, peak RSS, fits."""
    args.work = str(Path(args.work).resolve())
    work = Path(args.work) / "scale"
    work.mkdir(parents=True, exist_ok=True)
    sizes = [float(s) for s in args.sizes.split(",")] if args.sizes else list(SCALE_SIZES)
    free = shutil.disk_usage(work).free
    note = None
    # families stay cached under --work: a size needs its family (unless there) and one merged output
    kept = []
    for s in sizes:
        cfg = shapes_for(s)
        params = count_params(cfg)
        root = Path(args.work) / family_name(cfg)
        need = 4 * params * (0 if (root / "family.json").exists() else N_MODELS + 1) + 4 * params
        if need > free:
            note = (f"{s / 1e6:.0f}M skipped: needs {need / 1e9:.1f} GB on {work}'s disk, "
                    f"{free / 1e9:.1f} GB free; the largest size that fits was measured")
            print(note, flush=True)
            continue
        free -= need - 4 * params
        kept.append(s)
    rows = []
    for s in kept:
        cfg = shapes_for(s)
        params = count_params(cfg)
        base, fts = family(Path(args.work), cfg)  # shared with the comparison runs' cache
        for scope in ("default", "tensor"):
            runs = []
            for _ in range(args.repeat):
                runs.append(run_tiesfed_merge(scope, base, fts, work / f"run-{params}", env))
                shutil.rmtree(runs[-1]["out"], ignore_errors=True)
            r = best(runs)
            row = {"params": params, "config": cfg, "largest": largest_tensor(cfg), "scope": scope,
                   "wall_s": r["wall_s"], "walls": r["walls"], "cpu_s": r["user_s"] + r["sys_s"],
                   "peak_rss_mib": r["peak_rss_mib"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {**meta_info(), "tiesfed": tiesfed_source(env)}
    return {"rows": rows, "fits": scale_fits(rows), "note": note, "meta": meta}


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
            f = run_federated(base, fts, run, work, env)
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
    ap.add_argument("--json", metavar="OUT", help="also write every number to this JSON file")
    ap.add_argument("--update-readme", action="store_true",
                    help=f"replace README.md's <!-- figures:{BLOCK} --> block (and <!-- figures:{SCALE_BLOCK} --> "
                         f"with --scale); the markers must be there")
    ap.add_argument("--readme", default=str(ROOT / "README.md"), help=argparse.SUPPRESS)
    ap.add_argument("--scale", action="store_true",
                    help="instead: tiesfed merge (defaults and tensor) at 30M, 134M, 400M, 1B params (slow)")
    ap.add_argument("--sizes", help="with --scale: comma separated sizes in parameters, e.g. 30e6,134e6")
    ap.add_argument("--tiesfed-src", metavar="DIR",
                    help="a checkout whose tiesfed/ to measure instead of the installed one (put first on PYTHONPATH), "
                         "e.g. `git worktree add /tmp/tf HEAD`")
    args = ap.parse_args(argv)
    if args.quick:
        args.params = 10e6
    if args.scale:
        data = run_scale(args, tool_env(args.tiesfed_src))
        text = render_scale(data)
        print(f"\n## tiesfed merge at scale (fp32, base + {N_MODELS} fine-tunes, k = 20; {os.cpu_count()} CPU "
              f"cores; best wall of {args.repeat})\n")
        print(text)
        print(f"\n<!-- figures:{SCALE_BLOCK} -->\n{text}\n<!-- /figures:{SCALE_BLOCK} -->")
        blocks = {SCALE_BLOCK: text}
    else:
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
