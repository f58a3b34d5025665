"""GPU check, end to end: `tiesfed merge --device cuda` against `--device cpu` on a generated family.

    PYTHONPATH=. python benchmarks/gpu_merge.py --params 134e6 --work /tmp/gpu-merge

Each merge runs the real CLI in a fresh process (wall time measured around it);
the two outputs' safetensors files must be byte-identical (the pure layer's
bit-identity, checked op by op in gpu_check.py, carried through the engine,
its blockwise folding and the writer). Prints a Markdown table; --json writes it.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import count_params, family, shapes_for  # noqa: E402


def run_merge(base: Path, fts: list[Path], out: Path, device: str, extra: list[str]) -> float:
    cmd = [sys.executable, "-c", "from tiesfed.cli import main; main()", "merge", str(base), *map(str, fts),
           "-o", str(out), "--device", device, "--overwrite", "-q", *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def same_tree(a: Path, b: Path) -> bool:
    files = sorted(p.name for p in a.glob("*.safetensors"))
    return files == sorted(p.name for p in b.glob("*.safetensors")) and all(
        filecmp.cmp(a / f, b / f, shallow=False) for f in files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=134e6)
    ap.add_argument("--work", type=Path, default=Path("/tmp/tiesfed-gpu-merge"))
    ap.add_argument("--device", default="cuda", help="the device compared with the CPU")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    cfg = shapes_for(args.params)
    base, fts = family(args.work, cfg)
    rows = []
    for label, extra in (("defaults (global, majority)", []),
                         ("--trim tensor --zero-sign positive", ["--trim", "tensor", "--zero-sign", "positive"]),
                         ("--method dare_ties --k 30", ["--method", "dare_ties", "--k", "30"]),
                         ("--method average", ["--method", "average"])):
        cpu = run_merge(base, fts, args.work / "out-cpu", "cpu", extra)
        gpu = run_merge(base, fts, args.work / "out-dev", args.device, extra)
        rows.append({"case": label, "cpu_s": cpu, "cuda_s": gpu,
                     "identical": same_tree(args.work / "out-cpu", args.work / "out-dev")})
    print(f"`tiesfed merge`, {count_params(cfg) / 1e6:.0f}M params, 3 fine-tunes, fp32, "
          f"{os.cpu_count()} CPUs (each a fresh process, wall s):\n")
    print(f"| case | cpu | {args.device} | outputs |\n|---|---:|---:|---|")
    for r in rows:
        print(f"| {r['case']} | {r['cpu_s']:.1f} | {r['cuda_s']:.1f} | "
              f"{'byte-identical' if r['identical'] else 'DIFFER'} |")
    if args.json:
        args.json.write_text(json.dumps({"params": count_params(cfg), "rows": rows}, indent=1))
    sys.exit(0 if all(r["identical"] for r in rows) else 1)


if __name__ == "__main__":
    main()
