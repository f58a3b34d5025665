"""Measuring a benchmark step: wall time, CPU time and peak RSS of a command in a fresh process.

`Measured` runs a command under a tiny launcher that forks, execs it and reads the child's
rusage from os.wait4 (ru_maxrss: the largest RSS of the child or any descendant it waited
for). `TreeSampler` polls the RSS of every process below one (Ray's raylet and workers are
not waited for by the command, so rusage misses them) and keeps each one's peak.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

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


class TreeSampler:
    """Peak RSS of each process below `pid` (and `pid` itself), sampled every `period` s in a thread."""

    def __init__(self, pid: int, period: float = 0.2) -> None:
        self.pid, self.period = pid, period
        self.peaks: dict[int, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for p in procs:
                try:
                    rss, cpu, name = p.memory_info().rss, p.cpu_times(), " ".join(p.cmdline()[:3])[:120]
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                row = self.peaks.setdefault(p.pid, {"rss": 0, "name": name})
                row["rss"] = max(row["rss"], rss)
                row["cpu_s"] = cpu.user + cpu.system
                if name.startswith("ray::"):
                    row["name"] = name  # an idle Ray worker that became an actor
            self._stop.wait(self.period)

    def stop(self) -> list[dict]:
        """Stop sampling; each process seen, largest peak first: pid, name, peak_rss_mib, cpu_s
        (user + sys at its last sample)."""
        self._stop.set()
        self._thread.join(5)
        rows = [{"pid": pid, "name": v["name"], "peak_rss_mib": v["rss"] / 2**20, "cpu_s": v.get("cpu_s", 0.0)}
                for pid, v in self.peaks.items()]
        return sorted(rows, key=lambda r: -r["peak_rss_mib"])
