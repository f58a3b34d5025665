"""gpu_check.py's part 2: per-operation throughput of the pure layer on one large tensor,
and the same operations once on the CPU as the bit-for-bit reference. Needs only torch.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tiesfed.core.accumulators import (  # noqa: E402
    FinalizeSpec,
    elect,
    finalize,
    fold,
    majority_sign,
    new_accumulator,
    sign_balance,
)
from tiesfed.core.apply import apply_sparse, dense_to_sparse  # noqa: E402
from tiesfed.core.trim import GlobalThreshold, trim_tensor_exact, trim_threshold  # noqa: E402

LLAMA3_EMBED = 128256 * 4096
DEFAULT_ELEMENTS = 64 << 20
#: rough peak device bytes per element of the throughput tensor (3 task vectors,
#: their survivors, accumulators, the checked fold's and finalize's temporaries)
BYTES_PER_ELEMENT = 100
_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shape, dtype and bits (compared on `a`'s device)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    b = b.to(a.device)
    if a.is_floating_point():
        a, b = a.view(_INT[a.element_size()]), b.view(_INT[b.element_size()])
    return torch.equal(a, b)


def pick_elements(dev: torch.device, requested: Optional[int]) -> int:
    if requested:
        return requested
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        fit = int(free * 0.6) // BYTES_PER_ELEMENT
        return LLAMA3_EMBED if fit >= LLAMA3_EMBED else max(1 << 20, min(fit, DEFAULT_ELEMENTS) >> 20 << 20)
    return DEFAULT_ELEMENTS


def best_of(fn: Callable[[], object], dev: torch.device, repeat: int,
            setup: Optional[Callable[[], object]] = None) -> tuple[float, object]:
    """Best wall time of `fn` (synchronized), and its last result. `setup`'s result,
    made outside the timer, is passed to `fn` (a fresh accumulator per fold run)."""
    best, out = math.inf, None
    for _ in range(max(1, repeat)):
        out = None  # the previous run's result is freed before the next is made
        arg = setup() if setup else None
        sync(dev)
        t0 = time.perf_counter()
        out = fn(arg) if setup else fn()
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    return best, out


def throughput_ops(dev: torch.device, taus: list[torch.Tensor], theta0: torch.Tensor, repeat: int,
                   results: dict) -> list[dict]:
    """Time each operation on `dev`; keep its outputs in `results` (by op) for the
    bit-for-bit comparison with the CPU."""
    n = taus[0].numel()
    spec = FinalizeSpec()
    rows: list[dict] = []

    def row(op: str, unit: str, count: int, seconds: float, out: object) -> None:
        rows.append({"op": op, "unit": unit, "count": count, "seconds": seconds,
                     "rate_M_per_s": count / seconds / 1e6 if seconds > 0 else math.inf})
        results[op] = out
        print(f"{dev}: {op}: {rows[-1]['rate_M_per_s']:.0f} M {unit}/s", file=sys.stderr, flush=True)

    def coarse():
        sel = GlobalThreshold(n, 0.2)
        sel.add_coarse(taus[0])
        return sel

    s, sel = best_of(coarse, dev, repeat)
    row("histogram (global trim, coarse pass)", "params", n, s, sel._coarse)
    sel.add_fine(taus[0])
    thr = sel.value
    s, out = best_of(lambda: trim_threshold(taus[0], thr), dev, repeat)
    row("trim_threshold (global top-k 20%)", "params", n, s, out)
    s, out = best_of(lambda: trim_tensor_exact(taus[0], 0.2), dev, repeat)
    row("trim_tensor_exact (per-tensor top-k 20%)", "params", n, s, out)
    parts = [out] + [trim_tensor_exact(t, 0.2) for t in taus[1:]]
    nnz = sum(i.numel() for i, _ in parts)

    def fold_all(acc):
        for idx, val in parts:
            fold(acc, idx, val)
        return acc

    accs = {}
    for label, checked in (("fold (local engine, unchecked)", False), ("fold (coordinator, exact-checked)", True)):
        s, accs[checked] = best_of(fold_all, dev, repeat,
                                   setup=lambda c=checked: new_accumulator(n, spec, dev, track_exact=c))
        row(label, "nnz", nnz, s, accs[checked].tensors())
    parts = None

    def merge():
        acc = accs[False]
        gamma = elect(acc, spec)
        return finalize(acc, spec, majority_sign(sign_balance(gamma)), gamma=gamma)

    s, tau_m = best_of(merge, dev, repeat)
    row("elect + sign_balance + finalize", "params", n, s, tau_m)
    accs.clear()
    s, out = best_of(lambda: apply_sparse(theta0, *dense_to_sparse(tau_m), 1.0), dev, repeat)
    row("dense_to_sparse + apply_sparse (bf16 base)", "params", n, s, out)
    return rows


def throughput(dev: torch.device, n: int, repeat: int, reference: bool) -> dict:
    g = torch.Generator(device=dev).manual_seed(11)
    taus = [torch.randn(n, generator=g, device=dev) * 1e-3 for _ in range(3)]
    theta0 = (torch.randn(n, generator=g, device=dev) * 0.02).to(torch.bfloat16)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    got: dict = {}
    rows = throughput_ops(dev, taus, theta0, repeat, got)
    out = {"elements": n, "repeat": repeat, "rows": rows}
    if dev.type == "cuda":
        out["peak_device_bytes"] = torch.cuda.max_memory_allocated(dev)
    if reference and dev.type != "cpu":
        cpu_taus = [t.cpu() for t in taus]
        del taus
        ref: dict = {}
        cpu_rows = throughput_ops(torch.device("cpu"), cpu_taus, theta0.cpu(), 1, ref)
        for r, c in zip(rows, cpu_rows):
            r["cpu_rate_M_per_s"] = c["rate_M_per_s"]
            r["identical"] = _same_nested(got[r["op"]], ref[c["op"]])
    return out


def _same_nested(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and same_bits(a, b)
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(map(_same_nested, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_nested(a[k], b[k]) for k in a)
    return a == b
