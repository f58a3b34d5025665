"""The loopback deployment (deploy/local/run.sh) end to end, as an operator runs it: a Ray
cluster of two nodes from `ray start`, `tiesfed coordinator serve --ray-address ... --tls`,
three `tiesfed client submit` processes started before the coordinator, one fetch, and the
merge compared bit for bit with `tiesfed merge`; afterwards no process of the run is left.

The script stops what it started by PID (never `ray stop`); if it overruns, the test sends
it SIGTERM (its trap cleans up), and only then kills what is left, and fails.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "deploy" / "local" / "run.sh"
TIMEOUT_S = 600


def processes_naming(*needles: str) -> list[str]:
    """Live processes whose command line contains any of `needles` (not this one)."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        if p.pid == os.getpid() or p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmd = " ".join(p.info["cmdline"] or [])
        if any(n in cmd for n in needles):
            found.append(f"{p.pid}: {cmd[:200]}")
    return found


def kill_naming(*needles: str) -> None:
    """Last resort after a failed run: SIGKILL what is left of it (and its descendants)."""
    procs = set()
    for p in psutil.process_iter(["cmdline"]):
        if p.pid != os.getpid() and any(n in " ".join(p.info["cmdline"] or []) for n in needles):
            procs.add(p)
            try:
                procs.update(p.children(recursive=True))
            except psutil.Error:
                pass
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(list(procs), timeout=10)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_local_deployment_is_bit_identical_and_leaves_nothing_running():
    # a short work dir: Ray's Unix sockets live under it (sun_path holds 107 bytes)
    work = tempfile.mkdtemp(prefix="tfl-", dir="/tmp")
    bindir = os.path.dirname(sys.executable)  # this environment's tiesfed and ray
    env = {
        **os.environ,
        "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
        "PYTHON": sys.executable,
        "KEEP": "0",
    }
    env.pop("TIESFED", None)
    env.pop("RAY", None)
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), work], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True, text=True,
    )
    started = time.monotonic()
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the script's trap stops everything it started
        try:
            out, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        kill_naming(work)
        shutil.rmtree(work, ignore_errors=True)
        pytest.fail(f"deploy/local/run.sh did not finish within {TIMEOUT_S} s:\n{out[-6000:]}")
    wall = time.monotonic() - started

    m = re.search(r"GCS port (\d+)", out)
    gcs = [f"127.0.0.1:{m.group(1)}"] if m else []
    left = processes_naming(work, *gcs)
    if left:
        kill_naming(work, *gcs)
    removed = not Path(work).exists()
    shutil.rmtree(work, ignore_errors=True)
    assert proc.returncode == 0, f"run.sh exited {proc.returncode} after {wall:.0f} s:\n{out[-8000:]}"
    assert "bit-identical: yes" in out, out[-4000:]
    assert "all on loopback" in out, out[-4000:]
    assert not left, "processes of the run left behind:\n" + "\n".join(left)
    assert removed, f"run.sh left its work dir {work}"
