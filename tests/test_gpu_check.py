"""benchmarks/gpu_check.py (issue 11) on the CPU: the script a GPU machine runs.

A GPU machine here has torch and numpy only, so the script must run from a bare
checkout with PYTHONPATH=. and must not load pydantic, Ray, gRPC or
cryptography. On the CPU it compares the CPU with itself, which still runs every
case's whole call sequence, the comparisons and the timings.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
HEAVY = ("pydantic", "ray", "grpc", "cryptography")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_quick_cpu_run_is_identical_and_measures(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--json", str(out)],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["all_identical"] is True
    cases = report["cases"]
    names = {c["case"] for c in cases}
    for want in ("ties global/majority", "ties tensor/positive", "dare_ties", "task_arithmetic",
                 "ties election=count", "ties disjoint=max"):
        assert want in names
    assert {c["dtype"] for c in cases} == {"float32", "bfloat16"}
    for c in cases:
        assert c["status"] == "IDENTICAL", c
        assert c["survivors"] > 0
    assert proc.stdout.count("IDENTICAL") == len(cases)
    rows = report["throughput"]["rows"]
    assert {r["unit"] for r in rows} == {"params", "nnz"}
    assert any(r["op"].startswith("fold") for r in rows) and any("finalize" in r["op"] for r in rows)
    for r in rows:
        assert r["rate_M_per_s"] > 0 and r["seconds"] > 0, r
    assert report["heavy_modules_loaded"] == []


def test_script_imports_nothing_a_gpu_machine_lacks():
    code = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('gpu_check', {str(SCRIPT)!r})\n"
        "mod = sys.modules['gpu_check'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(mod)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('tiesfed',) + mod.HEAVY)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not [m for m in loaded if m.split(".")[0] in HEAVY], loaded
    # only the pure layer, without its pydantic modules
    for mod in loaded:
        assert mod in ("tiesfed", "tiesfed.core") or mod.startswith("tiesfed.core."), mod
        assert mod not in ("tiesfed.core.options", "tiesfed.core.methods"), mod
    assert "tiesfed.core.accumulators" in loaded
