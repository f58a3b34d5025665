"""Cost of a secure round (tiesfed.trust.secagg) beside the plain round, on synthetic task vectors.

For each top-k (5, 20, 50 %) and each client count it runs the real protocol state machines
(real certificates from a throwaway CA, every message through its bytes) and prints, per
client and per model parameter:
- the plain round's upload: the codec's real encoded contribution (`write_contribution`),
  values in float32 and bfloat16;
- the secure round's phases: keys (advert + key list), support (bitmap + sealed shares up;
  U + boxes down), masked upload (lanes over U), unmasking (request + reply);
- CPU seconds (process time, user+sys of this process) of one client's masking and of the
  coordinator's unmasking, per million parameters, beside a plain fold of the same clients.

Task vectors: τ_c = ρ·shared + √(1−ρ²)·own (Gaussian), so the clients' top-k supports overlap
as fine-tunes of one base do; |U|/M is printed. The public bound is the smallest power of two
above every |τ|. Checks the secure accumulator equals a plain fold of the quantised values.

    python benchmarks/bench_secagg.py                         # 1M params, 5 and 20 clients
    python benchmarks/bench_secagg.py --params 4000000 --clients 5
    python benchmarks/bench_secagg.py --update-readme         # also the README's secagg table
    python benchmarks/bench_secagg.py --round --params 4000000 --clients 3   # whole rounds over gRPC
    python benchmarks/bench_secagg.py --memory --family-params 134e6 --work /tmp/secmem [--tiesfed-src DIR]

`--memory` runs one secure round of 3 clients on a generated Llama-shaped family
(`benchmarks.common.family`), every party its own measured process over mutual TLS
(`benchmarks.peers.run_federated`: `coordinator serve --secure-aggregation`, 3 `client submit`,
1 `client fetch`), and prints each process's peak RSS and CPU seconds and the merged stream's
sha256. `--tiesfed-src` runs another checkout's tiesfed (e.g. an older commit, for before/after).
"""

from __future__ import annotations

import argparse
import io
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from tiesfed.client.contribution import contribution_header, write_contribution
from tiesfed.core.accumulators import FinalizeSpec, fold, new_accumulator
from tiesfed.core.secagg import FixedPoint, quantise, release_support
from tiesfed.core.secagg.encode import dequantise
from tiesfed.core.trim import TrimSpec, trim_tensor_exact
from tiesfed.protos.codec import SparseTensor
from tiesfed.trust import pki as ca
from tiesfed.trust.identity import Identity
from tiesfed.trust.secagg import SecAggClient, SecAggRound, SecAggServer, from_bytes, to_bytes


def task_vectors(n: int, numel: int, rho: float, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(numel, generator=g)
    return [(rho * shared + math.sqrt(1 - rho * rho) * torch.randn(numel, generator=g)) * 0.01 for _ in range(n)]


def plain_bytes(idx: torch.Tensor, val: torch.Tensor, numel: int, k: float, dtype: torch.dtype) -> int:
    header = contribution_header("0" * 64, "bench", TrimSpec("topk", k, "tensor"))
    st = SparseTensor(name="flat", shape=(numel,), indices=idx, values=val.to(dtype))
    return write_contribution(io.BytesIO(), header, [st])


def identities(root: Path, n: int) -> list[Identity]:
    ca.init_ca(root / "ca")
    out = []
    for i in range(n):
        ca.issue(root / "ca", root / f"c{i:03d}", client_id=f"org-{i:03d}")
        out.append(Identity.load(root / f"c{i:03d}"))
    return out


def cpu() -> float:
    return time.process_time()


def secure_round(ids: list[Identity], trimmed, numel: int, t: int, fixed: FixedPoint, spec: FinalizeSpec,
                 min_release: int = 1):
    """Run the protocol; per-client bytes of each message kind (client 0), CPU of masking and unmasking."""
    rnd = SecAggRound("bench", numel, t, fixed, spec, min_release=min_release)
    clients = [SecAggClient(i, rnd, *tv) for i, tv in zip(ids, trimmed)]
    server = SecAggServer(rnd)
    size: dict[str, int] = {}
    for c in clients:
        b = to_bytes(c.advertise())
        size.setdefault("advert", len(b))
        server.receive_advert(from_bytes(b))
    keys = server.close_keys()
    size["key list"] = len(to_bytes(keys))
    for c in clients:
        up = c.share(keys)
        size.setdefault("shares up", len(to_bytes(up)))
        server.receive_shares(up)
    reqs = server.close_shares()
    first = clients[0].id
    size["shares down"] = len(to_bytes(reqs[first]))
    mask_cpu = []
    for c in clients:
        t0 = cpu()
        up = c.masked_input(reqs[c.id])
        mask_cpu.append(cpu() - t0)
        size.setdefault("masked up", len(to_bytes(up)))
        server.receive_masked(up)
    req = server.close_masked()
    size["unmask down"] = len(to_bytes(req))
    for c in clients:
        rep = c.unmask(req)
        size.setdefault("unmask up", len(to_bytes(rep)))
        server.receive_unmask(rep)
    t0 = cpu()
    acc = server.finish()
    unmask_cpu = cpu() - t0
    return acc, size, sum(mask_cpu) / len(mask_cpu), unmask_cpu, server.support.numel(), rnd.layout


def round_timing(params: int, n: int, k: float, secure: bool, root: Path) -> tuple[float, float]:
    """(wall s, CPU s) of one whole round over real gRPC and mutual TLS in this process: a
    coordinator (in-process aggregator, writing the merged model) and n clients on threads
    submitting from their safetensors folders, until the round is finalized."""
    from concurrent.futures import ThreadPoolExecutor

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.common import write_family
    from tiesfed.client.federated import submit
    from tiesfed.coordinator.rounds import RoundConfig
    from tiesfed.coordinator.server import CoordinatorConfig, CoordinatorServer

    if not (root / "ca").exists():
        ca.init_ca(root / "ca")
        ca.issue(root / "ca", root / "server", server_names=["127.0.0.1"])
        for i in range(n):
            ca.issue(root / "ca", root / f"c{i}", client_id=f"org-{i}")
    side = 1024
    shapes = {f"layers.{i}.weight": (side, side) for i in range(max(1, params // (side * side)))}
    base, fts = write_family(root / "family", n, torch.float32, shapes)
    clients = [f"org-{i}" for i in range(n)]
    extra = {"secure_aggregation": True, "secagg": {"bound": 0.0625}} if secure else {}
    rc = RoundConfig(round_id="r1", participants=clients, options={"k": k}, **extra)
    spool = root / f"spool-{'secure' if secure else 'plain'}-{time.monotonic_ns()}"
    cfg = CoordinatorConfig(listen="127.0.0.1:0", spool_dir=spool, base_model=str(base), tls_dir=root / "server",
                            aggregator="local", rounds=[rc])
    w0, c0 = time.perf_counter(), cpu()
    with CoordinatorServer(cfg) as srv, ThreadPoolExecutor(n) as pool:
        list(pool.map(lambda i: submit(srv.target, "r1", None, base, fts[i], tls=root / f"c{i}"), range(n)))
        r = srv.manager.get("r1")
        assert r.wait_closed(600) and r.state == "finalized", r.message
    return time.perf_counter() - w0, cpu() - c0


def memory_round(params: float, work: Path, family_dir: Path | None, tiesfed_src: str | None,
                 plain: bool = False) -> None:
    """One secure round, every party its own process with the default gRPC message limit and
    `phase_s`; peak RSS and CPU of each, the merged sha256."""
    import hashlib
    import json

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.common import count_params, family, shapes_for
    from benchmarks.peers import run_federated, tool_env

    cfg = shapes_for(params)
    base, fts = family(family_dir or work, cfg)
    run = work / f"run-{'plain' if plain else 'src' if tiesfed_src else 'here'}"
    env = tool_env(tiesfed_src)
    res = run_federated(base, fts, run, work, env, timeout=3600,
                        coordinator_args=() if plain else ("--secure-aggregation",))
    merged = next((run / "federated" / "spool").rglob("merged.tfs"))
    sha = hashlib.sha256()
    with open(merged, "rb") as f:
        while piece := f.read(1 << 24):
            sha.update(piece)
    rows = [("coordinator", res["coordinator"]), *((f"client submit {i}", s) for i, s in enumerate(res["submits"])),
            ("client fetch", res["fetch"])]
    print(f"{'plain' if plain else 'secure'} round, {count_params(cfg) / 1e6:.1f}M params, 3 clients, k = 20 %, tiesfed from "
          f"{tiesfed_src or 'this checkout'}; wall {res['wall_s']:.1f} s")
    print("| process | peak RSS MiB | CPU s (user + sys) |")
    print("|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['peak_rss_mib']:.0f} | {r.get('user_s', 0) + r.get('sys_s', 0):.1f} |")
    print(f"merged stream: {merged.stat().st_size:,} bytes, sha256 {sha.hexdigest()}")
    keep = ("peak_rss_mib", "user_s", "sys_s", "wall_s", "rc", "bytes_sent")
    print(json.dumps({"rows": {n: {k: r.get(k) for k in keep} for n, r in rows}, "merged_sha256": sha.hexdigest()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=int, default=1_000_000)
    ap.add_argument("--clients", default="5,20", help="comma-separated client counts")
    ap.add_argument("--k", default="5,20,50", help="comma-separated top-k percentages")
    ap.add_argument("--rho", type=float, default=0.7, help="correlation of the clients' task vectors")
    ap.add_argument("--frac-bits", type=int, default=24)
    ap.add_argument("--min-release", type=int, default=1,
                    help="the release rule: U = positions at least this many clients touched")
    ap.add_argument("--update-readme", action="store_true",
                    help="also write the table into README.md's <!-- figures:secagg --> block")
    ap.add_argument("--round", action="store_true",
                    help="time whole rounds instead: plain and secure, over gRPC and mutual TLS in this process")
    ap.add_argument("--memory", action="store_true",
                    help="peak RSS of each process of one secure round on a generated family (see above)")
    ap.add_argument("--family-params", type=float, default=134e6)
    ap.add_argument("--family-dir", type=Path, help="where the family is (or goes); default: --work")
    ap.add_argument("--work", type=Path, default=Path("/tmp/tiesfed-bench-secagg"))
    ap.add_argument("--tiesfed-src", help="a checkout whose tiesfed the measured processes run")
    ap.add_argument("--plain", action="store_true", help="--memory: the plain round instead, for comparison")
    a = ap.parse_args()
    numel = a.params
    if a.memory:
        memory_round(a.family_params, a.work, a.family_dir, a.tiesfed_src, a.plain)
        return
    if a.round:
        print("| round | clients | params | k % | wall s | CPU s (coordinator + clients, one process) |")
        print("|---|---|---|---|---|---|")
        with tempfile.TemporaryDirectory() as tmp:
            for n in (int(x) for x in a.clients.split(",")):
                for kp in (float(x) for x in a.k.split(",")):
                    for secure in (False, True):
                        wall, cpu_s = round_timing(numel, n, kp, secure, Path(tmp) / f"n{n}")
                        print(f"| {'secure' if secure else 'plain'} | {n} | {numel:,} | {kp:g} | {wall:.2f} | "
                              f"{cpu_s:.2f} |", flush=True)
        return
    spec = FinalizeSpec()
    lines: list[str] = []

    def out(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    print(f"secure aggregation cost, M = {numel:,} params, ρ = {a.rho}, {a.frac_bits} fraction bits; "
          "bytes per parameter per client (B/p)\n")
    out("| clients | k % | ring bits | \\|U\\|/M | plain fp32 | plain bf16 | keys | support up | support down "
        "| masked up | unmask | secure total | mask CPU s/M (1 client) | unmask CPU s/M | plain fold CPU s/M (all clients) |")
    out("|" + "---|" * 15)
    with tempfile.TemporaryDirectory() as tmp:
        all_ids = identities(Path(tmp), max(int(x) for x in a.clients.split(",")))
        for n in (int(x) for x in a.clients.split(",")):
            taus = task_vectors(n, numel, a.rho)
            bound = 2.0 ** math.ceil(math.log2(max(float(tv.abs().max()) for tv in taus)))
            fixed = FixedPoint(bound=bound, max_clients=n, frac_bits=a.frac_bits)
            for kp in (float(x) for x in a.k.split(",")):
                trimmed = [trim_tensor_exact(tv, kp / 100) for tv in taus]
                trimmed = [(i, tv[i].to(torch.float32)) for (i, _), tv in zip(trimmed, taus)]
                fp32 = plain_bytes(*trimmed[0], numel, kp / 100, torch.float32)
                bf16 = plain_bytes(*trimmed[0], numel, kp / 100, torch.bfloat16)
                acc, size, mask_s, unmask_s, u, lay = secure_round(
                    all_ids[:n], trimmed, numel, max(2, n // 2 + 1), fixed, spec, a.min_release)
                quantised = [quantise(i, v, fixed) for i, v in trimmed]
                u_ref = release_support([qi for qi, _ in quantised], a.min_release, numel)
                kept = [(qi[m], dequantise(q[m], fixed)) for qi, q in quantised for m in [torch.isin(qi, u_ref)]]
                ref = new_accumulator(numel, spec)
                t0 = cpu()
                for qi, v in kept:
                    fold(ref, qi, v)
                fold_s = cpu() - t0
                assert all(torch.equal(getattr(acc, f), x) for f, x in ref.tensors().items()), "secure != plain fold"
                keys = size["advert"] + size["key list"]
                sup_up, sup_down = size["shares up"], size["shares down"]
                unm = size["unmask down"] + size["unmask up"]
                total = keys + sup_up + sup_down + size["masked up"] + unm
                per = 1e6 / numel
                out(f"| {n} | {kp:g} | {lay.bits} | {u / numel:.3f} | {fp32 / numel:.3f} | {bf16 / numel:.3f} "
                    f"| {keys / numel:.4f} | {sup_up / numel:.3f} | {sup_down / numel:.3f} "
                    f"| {size['masked up'] / numel:.3f} | {unm / numel:.4f} | {total / numel:.3f} "
                    f"| {mask_s * per:.3f} | {unmask_s * per:.3f} | {fold_s * per:.3f} |")
    if a.update_readme:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from benchmarks.figures import update_readme

        caption = (f"`python benchmarks/bench_secagg.py --update-readme` (M = {numel:,} parameters, ρ = {a.rho}, "
                   f"f = {a.frac_bits}, min_release = {a.min_release}, t = n/2 + 1; {platform.machine()}, "
                   f"{platform.python_implementation()} {platform.python_version()}). Bytes per parameter per client; "
                   "the CPU columns are process seconds per million parameters on a shared machine (orders of "
                   "magnitude only; the byte columns are the same in every run).")
        readme = Path(__file__).resolve().parent.parent / "README.md"
        changed = update_readme(readme, {"secagg": caption + "\n\n" + "\n".join(lines)})
        print(f"{readme}: {'updated' if changed else 'unchanged'}")


if __name__ == "__main__":
    main()
