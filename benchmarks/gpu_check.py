"""GPU check (issue 11): the local merge's pure functions on --device against the CPU.

    PYTHONPATH=. python benchmarks/gpu_check.py --device cuda --json gpu_check.json
    PYTHONPATH=. python benchmarks/gpu_check.py --device cpu --quick     # CI: < 20 s

Needs only torch and numpy. It imports the pure layer -- tiesfed.core.trim,
radix, compact, accumulators and apply -- and nothing that pulls pydantic, Ray,
gRPC or cryptography (the options and method registry are pydantic, so the
TrimSpec/FinalizeSpec of each case are built here directly), so it runs from a
bare checkout on a GPU machine that has torch but no package index.

1. Identity. A synthetic Llama-shaped family (a base and 4 fine-tunes, float32
   and bfloat16, seeded) with exact zeros, tied votes (+d and -d on a zero
   base) and runs of equal magnitudes is merged tensor by tensor with the local
   engine's call sequence (tiesfed/engine/local.py, trimmer.py, tensor.py):
   task_vector; trim -- global top-k from GlobalThreshold's two passes then
   trim_threshold, per-tensor trim_tensor_exact, DARE, keep-all; values cast to
   the wire dtype; fold into new_accumulator(track_exact=False) in model order
   (the coordinator's exact-checked fold, combine of two partial folds and
   unfold of a withdrawn contribution as one more case); elect;
   conflict_counts; sign_balance summed over the model for the paper's
   majority rule; finalize; dense_to_sparse; apply_sparse. Once on the CPU and
   once on --device; every intermediate is compared bit for bit: thresholds,
   survivors (indices and values), the accumulators (float64 sums, int32
   counts), elected signs, conflict and tie counts, the majority, the merged
   task vector and θ. (The engine folds a large tensor in blocks of its
   elements; every operation is per element, so whole tensors give the same
   bits.) Each case reports IDENTICAL, or the share of θ that
   differs, its largest |Δ| and the stages that differed, in pipeline order.

   Why identity is expected: every float operation involved is one IEEE
   operation rounded to nearest on either device (no fast-math, no FMA
   contraction across torch ops), each fold adds one value per parameter (the
   indices of one contribution are unique) in the models' order, so the CUDA
   kernel's atomics have no order to change; divisions are correctly rounded;
   DARE's mask is drawn on the CPU. A float64 sum that differs would show up as
   "accumulators" among the stages that differed.

2. Throughput (gpu_throughput.py) on --device for one large tensor (128256 x 4096, Llama 3's
   embedding, where memory allows -- sized from torch.cuda.mem_get_info --
   else 64M elements; --elements overrides): histogram (global trim's coarse
   pass), per-tensor top-k, threshold trim, fold of 3 models' 20% survivors
   (unchecked as the local engine, exact-checked as the coordinator), elect +
   finalize, dense_to_sparse + apply. Best of --repeat, synchronized. The same
   operations then run once on the CPU as the reference: results compared bit
   for bit, CPU rate alongside.

3. Markdown tables on stdout; --json PATH writes everything.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_throughput beside it

from gpu_throughput import pick_elements, same_bits, sync, throughput  # noqa: E402

from tiesfed.core import radix  # noqa: E402
from tiesfed.core.accumulators import (  # noqa: E402
    FinalizeSpec,
    combine,
    conflict_counts,
    elect,
    finalize,
    fold,
    majority_sign,
    new_accumulator,
    sign_balance,
    tie_mask,
    unfold,
)
from tiesfed.core.apply import apply_sparse, dense_to_sparse  # noqa: E402
from tiesfed.core.trim import (  # noqa: E402
    GlobalThreshold,
    TrimSpec,
    dare_seed,
    task_vector,
    trim_dare,
    trim_none,
    trim_tensor_exact,
    trim_threshold,
)

#: modules this script must never load (a GPU machine here has none of them)
HEAVY = ("pydantic", "ray", "grpc", "cryptography")
#: --quick keeps these tensors of the family: one of each kind it treats differently
QUICK_TENSORS = ("embed_tokens", "input_layernorm", "q_proj", "down_proj", "lm_head", "extra.")
_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# --- cases -----------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    trim: TrimSpec
    spec: FinalizeSpec
    lam: float = 1.0
    weights: Optional[tuple[float, ...]] = None
    track_exact: bool = False

    @property
    def needs_majority(self) -> bool:
        return self.spec.combine == "disjoint" and self.spec.zero_sign == "majority"


GLOBAL = TrimSpec(kind="topk", fraction=0.2, scope="global")
CASES = (
    Case("ties global/majority", GLOBAL, FinalizeSpec()),
    Case("ties tensor/positive", TrimSpec(kind="topk", fraction=0.2, scope="tensor"),
         FinalizeSpec(zero_sign="positive")),
    Case("dare_ties", TrimSpec(kind="dare", fraction=0.3, seed=7), FinalizeSpec()),
    Case("task_arithmetic", TrimSpec(kind="none", fraction=1.0), FinalizeSpec(combine="sum"), lam=0.5),
    Case("average (linear)", TrimSpec(kind="none", fraction=1.0), FinalizeSpec(combine="average"),
         weights=(1.0, 0.5, 2.0, 0.3)),
    Case("ties election=count", GLOBAL, FinalizeSpec(election="count")),
    Case("ties disjoint=max", GLOBAL, FinalizeSpec(disjoint="max")),
    Case("ties weighted (mergekit)", GLOBAL, FinalizeSpec(weighted=True), lam=1.3, weights=(1.0, 0.5, 2.0, 0.75)),
    Case("ties global, checked fold (coordinator)", GLOBAL, FinalizeSpec(), track_exact=True),
)


# --- synthetic models ----------------------------------------------------------------


def llama_shapes(hidden: int, layers: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """A Llama-like tensor list (grouped-query k/v at a quarter width), plus two
    tiny tensors for the edge cases of per-tensor top-k (int(0.2·3) = 0)."""
    inter, kv = hidden * 11 // 4, hidden // 4
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv, hidden)),
            (p + "self_attn.v_proj.weight", (kv, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden)),
               ("extra.tiny.bias", (3,)), ("extra.small.bias", (7,))]
    return shapes


@dataclass
class Family:
    dtype: torch.dtype
    base: dict[str, torch.Tensor]
    fts: list[dict[str, torch.Tensor]]

    @property
    def names(self) -> list[str]:
        return list(self.base)

    @property
    def params(self) -> int:
        return sum(t.numel() for t in self.base.values())


def make_family(shapes, n_models: int, dtype: torch.dtype, seed: int) -> Family:
    """Base ~ N(0, 0.02) (norms around 1), task vectors ~ N(0, 1e-3) around a shared
    direction. 5% of positions untouched by every model (exact zeros); 1% tied
    votes: base 0, model 0 moves +d, model 1 moves -d, the others stay, with d
    in {1..4}·2^-8 (exact in bfloat16, and many equal magnitudes). The first
    layer norm is left alone by every model; one tensor's float32 task vectors
    lie on a 2^-14 grid (equal magnitudes at the per-tensor top-k boundary)."""
    g = torch.Generator().manual_seed(seed)
    base: dict[str, torch.Tensor] = {}
    fts: list[dict[str, torch.Tensor]] = [{} for _ in range(n_models)]
    for name, shape in shapes:
        n = math.prod(shape)
        b = torch.randn(n, generator=g) * 0.02
        if name.endswith("norm.weight"):
            b += 1.0
        shared = torch.randn(n, generator=g) * 1e-3
        taus = [shared + torch.randn(n, generator=g) * (1e-3 * (1 + m / 2)) for m in range(n_models)]
        if name.endswith("down_proj.weight"):
            b = torch.round(b * 2**10) / 2**10
            taus = [torch.round(t * 2**14) / 2**14 for t in taus]
        untouched = torch.rand(n, generator=g) < 0.05
        tied = (torch.rand(n, generator=g) < 0.01) & ~untouched
        d = torch.randint(1, 5, (n,), generator=g).to(torch.float32) * 2**-8
        b[tied] = 0.0
        for m, t in enumerate(taus):
            t[untouched] = 0.0
            t[tied] = d[tied] if m == 0 else (-d[tied] if m == 1 else 0.0)
            if name == "model.layers.0.input_layernorm.weight":
                t.zero_()
        base[name] = b.to(dtype).reshape(shape)
        for m, t in enumerate(taus):
            fts[m][name] = (b + t).to(dtype).reshape(shape)
    return Family(dtype, base, fts)


# --- one side of a merge -----------------------------------------------------------


def wire_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The default wire dtype (tiesfed.client.contribution.wire_dtype)."""
    return model_dtype if model_dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


def cast_values(idx: torch.Tensor, val: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """tiesfed.client.contribution.cast_values: values in the wire dtype, those that
    round to zero dropped (that module imports the codec, so it is copied here)."""
    if dtype == val.dtype:
        return idx, val
    out = val.to(dtype)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"task-vector values overflow {dtype}")
    nz = out != 0
    if not bool(nz.all()):
        idx, out = idx[nz], out[nz]
    return idx, out


class Side:
    """The merge of one family under one case on one device, tensor by tensor."""

    def __init__(self, case: Case, fam: Family, dev: torch.device) -> None:
        self.case, self.fam, self.dev = case, fam, dev
        self.weights = case.weights or (1.0,) * len(fam.fts)
        self.thresholds: list[Optional[float]] = [None] * len(fam.fts)
        self.seconds = 0.0

    def tau(self, m: int, name: str) -> torch.Tensor:
        return task_vector(self.fam.base[name].to(self.dev), self.fam.fts[m][name].to(self.dev))

    def global_thresholds(self) -> None:
        """Each model's threshold from GlobalThreshold's two passes (the client's way)."""
        t0 = time.perf_counter()
        for m in range(len(self.fam.fts)):
            sel = GlobalThreshold(self.fam.params, self.case.trim.fraction)
            if sel.trivial:
                continue
            for name in self.fam.names:
                if sel.add_coarse(self.tau(m, name)):
                    raise ValueError("non-finite task vector")
            for name in self.fam.names:
                sel.add_fine(self.tau(m, name))
            self.thresholds[m] = sel.value
        sync(self.dev)
        self.seconds += time.perf_counter() - t0

    def trim(self, m: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        tr = self.case.trim
        tau = self.tau(m, name)
        if tr.kind == "dare":
            idx, val = trim_dare(tau, tr.fraction, dare_seed(tr.seed, str(m), name))
        elif tr.kind == "none" or tr.fraction >= 1.0:
            idx, val = trim_none(tau)
        elif tr.scope == "tensor":
            idx, val = trim_tensor_exact(tau, tr.fraction)
        else:
            idx, val = trim_threshold(tau, self.thresholds[m] or 0.0)
        return cast_values(idx, val, wire_dtype(self.fam.dtype))

    def tensor(self, name: str, majority: Optional[int]) -> dict:
        """trim → fold → elect → (with `majority`) finalize → apply, as the engine does."""
        t0 = time.perf_counter()
        case, spec = self.case, self.case.spec
        theta0 = self.fam.base[name].to(self.dev)
        parts = [self.trim(m, name) for m in range(len(self.fam.fts))]
        acc = new_accumulator(theta0.numel(), spec, self.dev, track_exact=case.track_exact)
        for (idx, val), w in zip(parts, self.weights):
            fold(acc, idx, val, w)
        out: dict = {"parts": parts, "acc": acc}
        if case.track_exact:  # the coordinator's algebra: shards combine, a withdrawal unfolds
            half = len(parts) // 2
            a, b = (new_accumulator(theta0.numel(), spec, self.dev) for _ in range(2))
            for i, ((idx, val), w) in enumerate(zip(parts, self.weights)):
                fold(a if i < half else b, idx, val, w)
            combined = combine(a, b)
            out["combined"] = combined.tensors()
            unfold(combined, *parts[-1], self.weights[-1])
            out["unfolded"] = combined.tensors()
        gamma = None
        if spec.combine == "disjoint":
            gamma = elect(acc, spec)
            out["gamma"] = gamma
            out["balance"] = sign_balance(gamma)
            out["conflicts"] = [conflict_counts(gamma, idx, val) for idx, val in parts]
            out["tied"] = int(torch.count_nonzero(tie_mask(acc, gamma)))
        if majority is not None:
            tau_m = finalize(acc, spec, majority, gamma=gamma) if gamma is not None else finalize(acc, spec)
            idx, val = dense_to_sparse(tau_m)
            out["merged"] = (idx, val)
            out["theta"] = apply_sparse(theta0, idx, val, case.lam)
        sync(self.dev)
        self.seconds += time.perf_counter() - t0
        return out


# --- comparison ----------------------------------------------------------------------


def diff_stats(a: torch.Tensor, b: torch.Tensor) -> tuple[int, float]:
    """(elements whose bits differ, largest |a - b| among them)."""
    a, b = a.detach().cpu().reshape(-1), b.detach().cpu().reshape(-1)
    if a.shape != b.shape:
        return max(a.numel(), b.numel()), math.inf
    if a.is_floating_point():
        bad = a.view(_INT[a.element_size()]) != b.view(_INT[b.element_size()])
    else:
        bad = a != b
    n = int(bad.sum())
    if n == 0:
        return 0, 0.0
    return n, float((a[bad].double() - b[bad].double()).abs().max())


@dataclass
class Result:
    case: str
    dtype: str
    params: int
    first_diff: list[str] = field(default_factory=list)
    theta_diff: int = 0
    max_abs_diff: float = 0.0
    cpu_s: float = 0.0
    dev_s: float = 0.0
    survivors: int = 0

    def check(self, stage: str, ok: bool) -> None:
        if not ok and stage not in self.first_diff:
            self.first_diff.append(stage)

    @property
    def identical(self) -> bool:
        return not self.first_diff and self.theta_diff == 0

    @property
    def status(self) -> str:
        if self.identical:
            return "IDENTICAL"
        return (f"DIFF: {self.theta_diff / self.params:.3g} of θ ({self.theta_diff}), max |Δ| {self.max_abs_diff:.3g}; "
                f"differs at {', '.join(self.first_diff)}")


def compare_tensor(res: Result, a: dict, b: dict) -> None:
    for (ia, va), (ib, vb) in zip(a["parts"], b["parts"]):
        res.check("survivors", same_bits(ia, ib) and same_bits(va, vb))
        res.survivors += ia.numel()
    ta, tb = a["acc"].tensors(), b["acc"].tensors()
    res.check("accumulators", ta.keys() == tb.keys() and all(same_bits(ta[k], tb[k]) for k in ta))
    res.check("exact flag", a["acc"].exact == b["acc"].exact)
    for key in ("combined", "unfolded"):
        if key in a:
            res.check(f"{key} accumulators", all(same_bits(a[key][k], b[key][k]) for k in a[key]))
    if "gamma" in a:
        res.check("elected signs", same_bits(a["gamma"], b["gamma"]))
        res.check("sign balance", a["balance"] == b["balance"])
        res.check("conflict counts", a["conflicts"] == b["conflicts"])
        res.check("tie counts", a["tied"] == b["tied"])


def compare_output(res: Result, a: dict, b: dict) -> None:
    (ia, va), (ib, vb) = a["merged"], b["merged"]
    res.check("merged task vector", same_bits(ia, ib) and same_bits(va, vb))
    n, mx = diff_stats(a["theta"], b["theta"])
    if n:
        res.check("θ", False)
    res.theta_diff += n
    res.max_abs_diff = max(res.max_abs_diff, mx)


def run_case(case: Case, fam: Family, dev: torch.device) -> Result:
    res = Result(case.name, str(fam.dtype).removeprefix("torch."), fam.params)
    cpu, other = Side(case, fam, torch.device("cpu")), Side(case, fam, dev)
    if case.trim.kind == "topk" and case.trim.scope == "global":
        cpu.global_thresholds()
        other.global_thresholds()
        res.check("global threshold", [radix.pattern(t) if t is not None else None for t in cpu.thresholds]
                  == [radix.pattern(t) if t is not None else None for t in other.thresholds])
    # one pass, or two where the paper's majority rule needs the whole model's vote
    first = None if case.needs_majority else 1
    balance = {"cpu": 0, "dev": 0}
    for name in fam.names:
        a, b = cpu.tensor(name, first), other.tensor(name, first)
        compare_tensor(res, a, b)
        balance["cpu"] += a.get("balance", 0)
        balance["dev"] += b.get("balance", 0)
        if first is not None:
            compare_output(res, a, b)
    if case.needs_majority:
        maj_cpu, maj_dev = majority_sign(balance["cpu"]), majority_sign(balance["dev"])
        res.check("majority sign", maj_cpu == maj_dev)
        for name in fam.names:
            compare_output(res, cpu.tensor(name, maj_cpu), other.tensor(name, maj_dev))
    res.cpu_s, res.dev_s = cpu.seconds, other.seconds
    return res


# --- report --------------------------------------------------------------------------


def environment(dev: torch.device) -> dict:
    env = {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
           "device": str(dev), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        env.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    return env


def markdown(report: dict) -> str:
    dev = report["environment"]["device"]
    lines = []
    if report["cases"]:
        lines += [f"Identity, {dev} against cpu ({report['models']} fine-tunes, {report['params']:,} params each):",
                  "", f"| case | dtype | result | survivors | cpu s | {dev} s |", "|---|---|---|---:|---:|---:|"]
    for c in report["cases"]:
        lines.append(f"| {c['case']} | {c['dtype']} | {c['status']} | {c['survivors']:,} | "
                     f"{c['cpu_s']:.2f} | {c['dev_s']:.2f} |")
    t = report["throughput"]
    if t:
        ref = any("cpu_rate_M_per_s" in r for r in t["rows"])
        lines += [""] if lines else []
        lines += [f"Throughput on {dev}, one tensor of {t['elements']:,} elements (best of {t['repeat']}):", "",
                  f"| op | per run | {dev} M/s |" + (" cpu M/s | identical |" if ref else ""),
                  "|---|---:|---:|" + ("---:|---|" if ref else "")]
        for r in t["rows"]:
            line = f"| {r['op']} | {r['count'] / 1e6:.1f}M {r['unit']} | {r['rate_M_per_s']:.0f} |"
            if ref:
                line += f" {r['cpu_rate_M_per_s']:.0f} | {'yes' if r['identical'] else 'NO'} |"
            lines.append(line)
        if "peak_device_bytes" in t:
            lines += ["", f"Peak device memory: {t['peak_device_bytes'] / 2**30:.1f} GiB."]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes (CI): a few seconds on a CPU")
    ap.add_argument("--hidden", type=int, help="hidden size of the synthetic family (default 512, quick 64)")
    ap.add_argument("--layers", type=int, help="layers (default 1, quick 1)")
    ap.add_argument("--vocab", type=int, help="vocabulary (default 4096, quick 256)")
    ap.add_argument("--models", type=int, help="fine-tunes in the family (default 4, quick 3)")
    ap.add_argument("--elements", type=int, help="throughput tensor size (default: 128256x4096 if the GPU "
                                                   "has room, else 64M; quick 1M)")
    ap.add_argument("--repeat", type=int, help="best of this many timed runs (default 3, quick 2)")
    ap.add_argument("--no-identity", action="store_true", help="skip part 1")
    ap.add_argument("--no-throughput", action="store_true", help="skip part 2")
    ap.add_argument("--no-cpu-reference", action="store_true",
                    help="skip the CPU run of the throughput tensor (its comparison and CPU rates)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the report here")
    args = ap.parse_args(argv)

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available (torch {torch.__version__})")
    q = args.quick
    hidden = args.hidden or (64 if q else 512)
    layers = args.layers or 1
    vocab = args.vocab or (256 if q else 4096)
    repeat = args.repeat or (2 if q else 3)
    models = args.models or (3 if q else 4)
    if models < 2:
        ap.error("--models: at least 2 (the tied votes need two)")

    shapes = llama_shapes(hidden, layers, vocab)
    if q:  # one of each kind the family treats differently
        shapes = [(n, s) for n, s in shapes if any(k in n for k in QUICK_TENSORS)]
    cases = []
    started = time.perf_counter()
    for dtype in () if args.no_identity else (torch.float32, torch.bfloat16):
        fam = make_family(shapes, models, dtype, args.seed)
        for case in CASES:
            if case.weights and len(case.weights) != models:
                case = Case(case.name, case.trim, case.spec, case.lam,
                            tuple(case.weights[i % len(case.weights)] for i in range(models)), case.track_exact)
            res = run_case(case, fam, dev)
            cases.append({"case": res.case, "dtype": res.dtype, "status": res.status, "identical": res.identical,
                          "differs_at": res.first_diff, "theta_diff_elements": res.theta_diff,
                          "theta_diff_fraction": res.theta_diff / res.params, "max_abs_diff": res.max_abs_diff,
                          "survivors": res.survivors, "cpu_s": res.cpu_s, "dev_s": res.dev_s})
            print(f"{res.case} [{res.dtype}]: {res.status}", file=sys.stderr, flush=True)
        del fam
    thr = None
    if not args.no_throughput:
        n = args.elements or ((1 << 20) if q else pick_elements(dev, None))
        thr = throughput(dev, n, repeat, reference=not args.no_cpu_reference)
    report = {
        "environment": environment(dev),
        "models": models,
        "params": sum(math.prod(s) for _, s in shapes),
        "cases": cases,
        "all_identical": all(c["identical"] for c in cases)
        and all(r.get("identical", True) for r in (thr["rows"] if thr else [])),
        "throughput": thr,
        "heavy_modules_loaded": [m for m in HEAVY if m in sys.modules],
        "wall_s": time.perf_counter() - started,
    }
    print(markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if report["heavy_modules_loaded"]:
        print(f"loaded what a GPU machine lacks: {report['heavy_modules_loaded']}", file=sys.stderr)
        return 2
    return 0 if report["all_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
