"""Benchmark of the federated round over gRPC on loopback against the local engine.

For 2, 8 and 32 simulated clients (one fine-tuned model each, generated
Llama-shaped family, cached under --work) it runs, in one go:
- the local `tiesfed.engine.merge` of the same models (wall time);
- a federated round: the coordinator in its own process (`tiesfed coordinator
  serve`, so its peak RSS is its own), every client a thread of this process
  submitting over gRPC, client 0 fetching and applying the merge; wall time
  from the first submit to the merged model on disk;
and checks the two outputs are bit-identical. It prints a markdown table:
wall time ratio, bytes on the wire per client against dense fp32, and the
coordinator's peak RSS (growth from the fewest to the most clients).

    python benchmarks/bench_federated.py                    # ~5M params, 2/8/32 clients
    python benchmarks/bench_federated.py --layers 8 --hidden 512 --vocab 16000   # bigger
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import llama_shapes, write_family  # noqa: E402
from tiesfed.client.federated import fetch, submit  # noqa: E402
from tiesfed.core.options import MergeConfig, MergeOptions, ModelEntry  # noqa: E402
from tiesfed.engine import merge  # noqa: E402
from tiesfed.io.model_io import (  # noqa: E402
    DTYPE_TO_ST,
    ModelReader,
    fingerprint,
    mergeable,  # noqa: E402
)


def identical(a: Path, b: Path) -> bool:
    with ModelReader(a) as ra, ModelReader(b) as rb:
        return ra.names == rb.names and all(torch.equal(ra.get(n), rb.get(n)) for n in ra.names)


def start_coordinator(work: Path, round_cfg: dict, max_active_uploads: int,
                      malloc_tuning: bool = True) -> tuple[subprocess.Popen, int]:
    cfg = {
        "listen": "127.0.0.1:0",
        "spool_dir": str(work / "spool"),
        "max_active_uploads": max_active_uploads,
        "rounds": [round_cfg],
        "aggregator": "local",  # the accumulators in the measured process (bench_shards.py measures Ray)
        "insecure": True,  # loopback; measures the round, not TLS (mutual TLS for benchmarks comes next)
    }
    if not malloc_tuning:
        cfg.update(malloc_arena_max=None, malloc_mmap_threshold=None)
    (work / "coordinator.yaml").write_text(json.dumps(cfg))
    port_file = work / "port"
    port_file.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tiesfed.cli", "coordinator", "serve", "--config", str(work / "coordinator.yaml"),
         "--port-file", str(port_file)],
        stdout=open(work / "coordinator.log", "w"), stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("coordinator did not start:\n" + (work / "coordinator.log").read_text()[-3000:])
        time.sleep(0.05)
    return proc, int(port_file.read_text())


def stop_coordinator(proc: subprocess.Popen) -> float:
    """The coordinator's peak RSS in MiB (VmHWM: since its exec, so not polluted by
    this process's RSS, which a forked child's rusage maxrss inherits), then SIGTERM."""
    peak = rss_mib(proc.pid, "VmHWM")
    proc.send_signal(signal.SIGTERM)
    proc.wait()
    return peak


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_round(n: int, base: Path, fts: list[Path], opts: MergeOptions, work: Path, fp: str, manifest: list,
              args) -> dict:
    rid = f"bench-{n}"
    ids = [f"client-{i}" for i in range(n)]
    round_cfg = {
        "round_id": rid,
        "options": opts.model_dump(mode="json", by_alias=True),
        "participants": ids,
        "base_fingerprint": fp,
        "manifest": manifest,
    }
    rwork = work / f"fed-{n}"
    shutil.rmtree(rwork, ignore_errors=True)
    rwork.mkdir(parents=True)
    proc, port = start_coordinator(rwork, round_cfg, args.max_active_uploads, not args.no_malloc_tuning)
    target = f"127.0.0.1:{port}"
    try:
        idle_rss = rss_mib(proc.pid)
        results: list = [None] * n
        errors: list = []

        def client(i: int) -> None:
            try:
                results[i] = submit(target, rid, ids[i], base, fts[i], chunk_bytes=args.chunk_bytes,
                                    work_dir=rwork, insecure=True)
            except BaseException as e:
                errors.append(e)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        fetched = {}

        def fetcher() -> None:
            try:
                fetched["r"] = fetch(target, rid, ids[0], base, rwork / "out", timeout=3600, insecure=True)
            except BaseException as e:
                errors.append(e)

        ft = threading.Thread(target=fetcher)
        ft.start()
        for t in threads:
            t.join()
        t_up = time.perf_counter() - t0
        ft.join()
        wall = time.perf_counter() - t0
        if errors:
            raise errors[0]
    finally:
        peak_rss = stop_coordinator(proc)
    return {
        "wall_s": wall,
        "uploads_s": t_up,
        "upload_bytes": sum(r.bytes_sent for r in results),
        "download_bytes": fetched["r"].bytes_downloaded,
        "idle_rss_mib": idle_rss,
        "peak_rss_mib": peak_rss,
        "out": rwork / "out",
        "dir": rwork,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", default="2,8,32", help="client counts, comma separated")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--inter", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--k", type=float, default=20.0)
    p.add_argument("--chunk-bytes", type=int, default=1 << 20)
    p.add_argument("--max-active-uploads", type=int, default=2)
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="run the coordinator with glibc's default arenas and mmap threshold")
    p.add_argument("--repeat", type=int, default=1, help="runs per client count: best wall time, highest RSS")
    p.add_argument("--work", default="bench_out/federated", help="cache of the model family and scratch space")
    p.add_argument("--json", metavar="OUT", help="also write every number printed to this JSON file")
    a = p.parse_args(argv)
    counts = [int(c) for c in a.clients.split(",")]
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)

    shapes = llama_shapes(a.vocab, a.hidden, a.inter, a.layers)
    t = time.perf_counter()
    family = work / f"family-v{a.vocab}-h{a.hidden}-i{a.inter}-l{a.layers}-n{max(counts)}"
    base, fts = write_family(family, max(counts), torch.float32, shapes, seed=0)
    print(f"model family: {max(counts)} fine-tuned + base, {sum(map(lambda s: torch.Size(s).numel(), shapes.values())):,}"
          f" params each ({time.perf_counter() - t:.1f} s)", flush=True)
    opts = MergeOptions(k=a.k)
    with ModelReader(base) as r:
        fp = fingerprint(r)
        manifest = [{"name": t.name, "shape": list(t.shape), "dtype": DTYPE_TO_ST[t.dtype]}
                    for t in mergeable(r.manifest(), opts.keep_base)]
    params = sum(torch.Size(m["shape"]).numel() for m in manifest)

    rows = []
    for n in counts:
        local_out = work / f"local-{n}"
        cfg = MergeConfig(base_model=str(base), models=[ModelEntry(model=str(f)) for f in fts[:n]], options=opts)
        local_s, feds, same = [], [], True
        for _ in range(a.repeat):
            shutil.rmtree(local_out, ignore_errors=True)
            t = time.perf_counter()
            merge(cfg, local_out, progress=False)
            local_s.append(time.perf_counter() - t)
            fed = run_round(n, base, fts, opts, work, fp, manifest, a)
            same &= identical(local_out, fed["out"])
            shutil.rmtree(local_out, ignore_errors=True)
            shutil.rmtree(fed["dir"], ignore_errors=True)
            feds.append(fed)
        row = {
            "clients": n, "local_s": min(local_s), "identical": same,
            "wall_s": min(f["wall_s"] for f in feds), "uploads_s": min(f["uploads_s"] for f in feds),
            "upload_bytes": feds[0]["upload_bytes"], "download_bytes": feds[0]["download_bytes"],
            "idle_rss_mib": max(f["idle_rss_mib"] for f in feds), "peak_rss_mib": max(f["peak_rss_mib"] for f in feds),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    dense = 4 * params
    print()
    print(f"{params:,} mergeable fp32 parameters per model, k = {a.k:g}%, chunk {a.chunk_bytes >> 10} KiB, "
          f"at most {a.max_active_uploads} uploads read at once; {os.cpu_count()} CPU cores, loopback; "
          f"best wall time and highest RSS of {a.repeat} run(s)")
    print()
    print("| clients | local merge (s) | federated (s) | ratio | upload / client | vs dense fp32 | download | "
          "coordinator idle RSS | coordinator peak RSS | bit-identical |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|")
    for r in rows:
        up = r["upload_bytes"] / r["clients"]
        print(f"| {r['clients']} | {r['local_s']:.1f} | {r['wall_s']:.1f} | {r['wall_s'] / r['local_s']:.2f} | "
              f"{up / 2**20:.2f} MiB ({8 * up / params:.2f} bit/param) | {100 * up / dense:.1f}% | "
              f"{r['download_bytes'] / 2**20:.2f} MiB ({100 * r['download_bytes'] / dense:.1f}%) | "
              f"{r['idle_rss_mib']:.0f} MiB | {r['peak_rss_mib']:.0f} MiB | {'yes' if r['identical'] else 'NO'} |")
    lo, hi = rows[0], rows[-1]
    growth = 100 * (hi["peak_rss_mib"] / lo["peak_rss_mib"] - 1)
    print()
    print(f"coordinator peak RSS {lo['clients']} -> {hi['clients']} clients: {lo['peak_rss_mib']:.0f} -> "
          f"{hi['peak_rss_mib']:.0f} MiB ({growth:+.1f}%; goal <= +5%)")
    if a.json:
        result = {
            "config": {"params": params, "vocab": a.vocab, "hidden": a.hidden, "inter": a.inter, "layers": a.layers,
                       "k": a.k, "chunk_bytes": a.chunk_bytes, "max_active_uploads": a.max_active_uploads,
                       "malloc_tuning": not a.no_malloc_tuning, "repeat": a.repeat, "cpus": os.cpu_count()},
            "rows": [{**r, "ratio": r["wall_s"] / r["local_s"],
                      "upload_bytes_per_client": r["upload_bytes"] / r["clients"],
                      "upload_bits_per_param": 8 * r["upload_bytes"] / r["clients"] / params,
                      "upload_vs_dense": r["upload_bytes"] / r["clients"] / dense,
                      "download_vs_dense": r["download_bytes"] / dense} for r in rows],
            "peak_rss_growth_pct": growth,
        }
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
