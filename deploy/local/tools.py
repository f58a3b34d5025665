"""Helpers for deploy/local/run.sh (torch + safetensors only; no test code needed).

    python tools.py ports N W        N free loopback ports, then two ranges of W free ports (first-last)
    python tools.py family DIR [--dtype D]
                                     a base and three fine-tunes, ~2.6M parameters: the matrices in D
                                     (default float32), the norms in bfloat16, an int64 buffer
    python tools.py compare A B      every tensor of model folders A and B equal, bit for bit
    python tools.py pids --match S   processes whose command line contains S: pid, start time, name
    python tools.py stop [--pids F] --match S ...
                                     stop the processes listed in F (as `pids` wrote it) and those
                                     matching now, with all their descendants: SIGTERM, then SIGKILL
    python tools.py listening --match S ...
                                     the listening sockets of those processes and their descendants:
                                     fails unless every one is on a loopback address
    python tools.py ray-start ARGS   `ray start ARGS`, allowed to add a worker node while
                                     RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps every address loopback

`pids`, `stop` and `listening` never list this process or its ancestors (the script that runs them).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import time
from pathlib import Path


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def ports(n: int, width: int) -> None:
    """`n` single ports and two ranges of `width` ports, all free on 127.0.0.1 now and disjoint,
    drawn below Linux's ephemeral range (32768+) so that outgoing connections do not take them."""
    rng = random.SystemRandom()
    taken: set[int] = set()
    singles: list[int] = []
    while len(singles) < n:
        p = rng.randrange(20000, 32000)
        if p not in taken and _free(p):
            taken.add(p)
            singles.append(p)
    ranges = []
    while len(ranges) < 2:
        lo = rng.randrange(20000, 32000 - width)
        block = range(lo, lo + width)
        if not taken.intersection(block) and all(_free(p) for p in block):
            taken.update(block)
            ranges.append(f"{lo}-{lo + width - 1}")
    print(" ".join(map(str, singles)), " ".join(ranges))


def family(out: Path, dtype: str = "float32") -> None:
    """Task vectors of 0.01·N(0, 1) on a N(0, 1) base: in bfloat16 they are a few ulps, so the
    top-k threshold has many ties (the matrices stay float32 unless `dtype` says otherwise)."""
    import torch
    from safetensors.torch import save_file

    mat = getattr(torch, dtype)
    h, vocab, ffn, layers = 256, 2048, 1024, 2
    spec: dict[str, tuple[tuple[int, ...], torch.dtype]] = {"model.embed.weight": ((vocab, h), mat)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for m in "qkvo":
            spec[p + f"attn.{m}.weight"] = ((h, h), mat)
        spec[p + "mlp.up.weight"] = ((ffn, h), mat)
        spec[p + "mlp.down.weight"] = ((h, ffn), mat)
        spec[p + "norm.weight"] = ((h,), torch.bfloat16)
    spec["lm_head.weight"] = ((vocab, h), mat)
    spec["position_ids"] = ((1, 64), torch.int64)  # a non-float buffer, identical everywhere

    g = torch.Generator().manual_seed(0)
    base: dict[str, torch.Tensor] = {}
    tuned: list[dict[str, torch.Tensor]] = [{}, {}, {}]
    for name, (shape, dt) in spec.items():
        if not dt.is_floating_point:
            base[name] = torch.arange(torch.Size(shape).numel(), dtype=dt).reshape(shape)
            for m in tuned:
                m[name] = base[name].clone()
            continue
        b, shared, opposite = (torch.randn(shape, generator=g) for _ in range(3))
        base[name] = b.to(dt)
        for t, m in enumerate(tuned):  # task vectors that agree on some mass and fight over the rest
            tau = 0.01 * (0.5 * shared + (1 if t % 2 == 0 else -1) * opposite + 0.5 * torch.randn(shape, generator=g))
            m[name] = (b + tau).to(dt)

    meta = {"format": "pt"}
    names = list(base)
    half = len(names) // 2
    (out / "base").mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, group in enumerate((names[:half], names[half:])):
        fn = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: base[n].contiguous() for n in group}, str(out / "base" / fn), metadata=meta)
        weight_map.update(dict.fromkeys(group, fn))
    total = sum(t.numel() * t.element_size() for t in base.values())
    (out / "base" / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "base" / "config.json").write_text(json.dumps({"model_type": "toy", "hidden_size": h}))
    for t, m in enumerate(tuned):
        (out / f"ft{t}").mkdir(parents=True, exist_ok=True)
        save_file({n: x.contiguous() for n, x in m.items()}, str(out / f"ft{t}" / "model.safetensors"), metadata=meta)
    params = sum(t.numel() for t in base.values())
    print(f"{params} parameters, {total} bytes per model")


def _load(folder: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"no safetensors in {folder}")
    out: dict = {}
    for f in files:
        for n, t in load_file(str(f)).items():
            if n in out:
                raise SystemExit(f"{n} twice in {folder}")
            out[n] = t
    return out


def compare(a: Path, b: Path) -> None:
    import torch

    x, y = _load(a), _load(b)
    bad = []
    if set(x) != set(y):
        bad.append(f"tensor names differ: only in {a}: {sorted(set(x) - set(y))}, only in {b}: {sorted(set(y) - set(x))}")
    for n in sorted(set(x) & set(y)):
        if x[n].dtype != y[n].dtype or x[n].shape != y[n].shape:
            bad.append(f"{n}: {x[n].dtype} {tuple(x[n].shape)} vs {y[n].dtype} {tuple(y[n].shape)}")
        elif not torch.equal(x[n], y[n]):
            diff = (x[n] != y[n]).sum().item()
            bad.append(f"{n}: {diff} of {x[n].numel()} elements differ")
    if bad:
        print("\n".join(["DIFFERENT:", *bad]))
        raise SystemExit(1)
    nbytes = sum(t.numel() * t.element_size() for t in x.values())
    print(f"{len(x)} tensors, {nbytes} bytes: equal")


def _ours() -> set[int]:
    """This process and its ancestors (whose command lines may name the work dir too)."""
    import psutil

    me = psutil.Process()
    return {me.pid, *(p.pid for p in me.parents())}


def _matching(patterns: list[str]) -> list:
    import psutil

    skip, out = _ours(), []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        if p.pid in skip or p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmd = " ".join(p.info["cmdline"] or [])
        if any(s in cmd for s in patterns):
            out.append(p)
    return out


def pids(patterns: list[str]) -> None:
    for p in _matching(patterns):
        try:
            print(p.pid, f"{p.create_time():.3f}", os.path.basename(p.cmdline()[0]), " ".join(p.cmdline()[1:])[:300])
        except Exception:  # gone meanwhile
            pass


def _recorded(path: str | None) -> list:
    """The processes of a `pids` listing that still run (same pid and start time)."""
    import psutil

    out = []
    if not path or not os.path.exists(path):
        return out
    for line in open(path):
        parts = line.split()
        if len(parts) < 2:
            continue
        try:
            p = psutil.Process(int(parts[0]))
            if abs(p.create_time() - float(parts[1])) < 0.01:
                out.append(p)
        except (psutil.Error, ValueError):
            pass
    return out


def _signal(procs: list, sig: str, t0: float) -> None:
    import psutil

    for p in procs:
        try:
            print(f"{time.monotonic() - t0:5.1f}s {sig} {p.pid} {p.name()}", flush=True)
            p.terminate() if sig == "SIGTERM" else p.kill()
        except psutil.Error:
            pass


def stop(patterns: list[str], pids_file: str | None, grace: float) -> None:
    """Stop the recorded and matching processes and their descendants: first everything but
    the GCS (raylets, their agents and workers, the coordinator), then the GCS and the rest;
    SIGTERM, then SIGKILL for what is left after `grace` seconds. Again while new ones turn up
    (a raylet may start a worker meanwhile)."""
    import psutil

    t0 = time.monotonic()
    for _ in range(5):
        procs = _tree(patterns, pids_file)
        if not procs:
            print(f"{time.monotonic() - t0:5.1f}s nothing left to stop")
            return
        gcs = [p for p in procs.values() if _name(p) == "gcs_server"]
        for group in ([p for p in procs.values() if p not in gcs], gcs):
            _signal(group, "SIGTERM", t0)
            _, alive = psutil.wait_procs(group, timeout=grace)
            _signal(alive, "SIGKILL", t0)
            _, alive = psutil.wait_procs(alive, timeout=10)
            if alive:
                raise SystemExit(f"still running after SIGKILL: {[p.pid for p in alive]}")
    raise SystemExit("processes kept appearing")


def _name(p) -> str:
    try:
        return p.name()
    except Exception:
        return ""


def _tree(patterns: list[str], pids_file: str | None = None) -> dict:
    """The recorded and matching processes and all their descendants, by pid (never ours)."""
    import psutil

    procs = {}
    for p in [*_recorded(pids_file), *_matching(patterns)]:
        procs[p.pid] = p
        try:
            for c in p.children(recursive=True):
                procs[c.pid] = c
        except psutil.Error:
            pass
    skip = _ours()
    return {k: v for k, v in procs.items() if k not in skip}


def listening(patterns: list[str]) -> None:
    import ipaddress

    import psutil

    bad, n = [], 0
    for p in _tree(patterns).values():
        try:
            conns = p.net_connections(kind="inet")
            name = p.name()
        except psutil.Error:
            continue
        for c in conns:
            if c.status != psutil.CONN_LISTEN:
                continue
            n += 1
            ip = ipaddress.ip_address(c.laddr.ip)
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
                ip = ip.ipv4_mapped
            if not ip.is_loopback:
                bad.append(f"{name} (pid {p.pid}) listens on {c.laddr.ip}:{c.laddr.port}")
    if bad:
        raise SystemExit("not loopback:\n" + "\n".join(bad))
    print(f"{n} listening sockets, all on loopback")


def ray_start(argv: list[str]) -> None:
    """`ray start` itself, minus one guard: with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (which makes
    Ray use 127.0.0.1 wherever it picks an address) `ray start --address` aborts with "Multi-node
    Ray clusters are not supported on Windows and OSX", and with =1 it rewrites the address
    127.0.0.1 to the host's routable one and its raylet binds every interface. So the CLI's
    module sees the flag on, while the rest of Ray (and every daemon it starts) sees it off."""
    import types

    import ray._private.ray_constants as ray_constants
    import ray.scripts.scripts as scripts

    view = types.SimpleNamespace(**{k: getattr(ray_constants, k) for k in dir(ray_constants) if not k.startswith("__")})
    view.ENABLE_RAY_CLUSTER = True
    scripts.ray_constants = view
    sys.argv = ["ray", "start", *argv]
    scripts.main()


if __name__ == "__main__":
    if sys.argv[1:2] == ["ray-start"]:
        ray_start(sys.argv[2:])
        raise SystemExit(0)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("ports")
    a.add_argument("n", type=int)
    a.add_argument("width", type=int)
    a = sub.add_parser("family")
    a.add_argument("out", type=Path)
    a.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    a = sub.add_parser("compare")
    a.add_argument("a", type=Path)
    a.add_argument("b", type=Path)
    a = sub.add_parser("pids")
    a.add_argument("--match", action="append", required=True)
    a = sub.add_parser("listening")
    a.add_argument("--match", action="append", required=True)
    a = sub.add_parser("stop")
    a.add_argument("--match", action="append", default=[])
    a.add_argument("--pids", dest="pids_file")
    a.add_argument("--grace", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL")
    args = ap.parse_args()
    if args.cmd == "ports":
        ports(args.n, args.width)
    elif args.cmd == "family":
        family(args.out, args.dtype)
    elif args.cmd == "compare":
        compare(args.a, args.b)
    elif args.cmd == "pids":
        pids(args.match)
    elif args.cmd == "listening":
        listening(args.match)
    else:
        stop(args.match, args.pids_file, args.grace)
