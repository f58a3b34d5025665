"""Benchmark of `tiesfed merge` against a naive dense in-memory TIES.

Generates a Llama-shaped model family (default ~100M parameters, 3 fine-tuned
variants, fp32, sharded; cached under --work), then in one run prints:
- wall time and peak RSS of `tiesfed merge` vs the paper's flatten-everything
  TIES (each in a fresh process), as ratios, and their max output difference;
- bits per parameter of the wire codec at k = 5, 20, 50 for fp32/fp16/bf16 values;
- trim throughput (global exact top-k, three streamed passes).

    python benchmarks/bench_merge.py                 # ~100M params
    python benchmarks/bench_merge.py --layers 2 --vocab 8000   # quick
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import llama_shapes, run_measured, write_family  # noqa: E402

NAIVE = r"""
import json, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
torch.set_num_threads({threads})
def load(folder):
    sd = {{}}
    for f in sorted(Path(folder).glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd
base = load({base!r}); fts = [load(p) for p in {fts!r}]
names = [n for n, t in base.items() if t.is_floating_point()]
flat = lambda sd: torch.cat([sd[n].float().reshape(-1) for n in names])
b = flat(base)
tv = torch.stack([flat(f) - b for f in fts]); del fts
D = tv.shape[1]; kk = D - int(D * {k} / 100)
kth = tv.abs().kthvalue(kk, dim=1, keepdim=True).values
tv = tv * (tv.abs() >= kth)
sign = torch.sign(tv.sum(0)); sign[sign == 0] = torch.sign(sign.sum())
sel = tv * torch.where(sign > 0, tv > 0, tv < 0)
merged = sel.sum(0) / (sel != 0).sum(0).clamp(min=1)
theta = b + {lam} * merged
out, off = {{}}, 0
for n in names:
    t = base[n]; out[n] = theta[off:off + t.numel()].reshape(t.shape).to(t.dtype); off += t.numel()
Path({out!r}).mkdir(parents=True, exist_ok=True)
save_file(out, {out!r} + "/model.safetensors")
RESULT = {{}}
"""

TIESFED = r"""
import torch
torch.set_num_threads({threads})
from tiesfed.engine import merge
from tiesfed.core.options import MergeConfig, MergeOptions, ModelEntry
cfg = MergeConfig(base_model={base!r}, models=[ModelEntry(model=p) for p in {fts!r}],
                  options=MergeOptions(k={k}, lam={lam}))
rep = merge(cfg, {out!r}, progress=False, overwrite=True)
RESULT = {{}}
"""


def max_diff(a: Path, b: Path) -> float:
    from tiesfed.io.model_io import ModelReader

    worst = 0.0
    with ModelReader(a) as ra, ModelReader(b) as rb:
        for n in ra.names:
            worst = max(worst, (ra.get(n).float() - rb.get(n).float()).abs().max().item())
    return worst


def codec_table(base: Path, ft: Path) -> list[tuple]:
    from tiesfed.client.contribution import iter_contribution
    from tiesfed.core.trim import TrimSpec
    from tiesfed.io.model_io import ModelReader
    from tiesfed.protos.codec import StreamWriter

    rows = []
    with ModelReader(base) as rb, ModelReader(ft) as rf:
        params = rb.total_float_params
        for k in (5, 20, 50):
            spec = TrimSpec(kind="topk", fraction=k / 100)
            t0 = time.perf_counter()
            tensors = list(iter_contribution(rb, rf, spec, model_key="0"))  # sparse: fits easily
            trim_s = time.perf_counter() - t0
            sizes = {}
            for name, dt in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
                buf = io.BytesIO()
                w = StreamWriter(buf, {})
                t1 = time.perf_counter()
                for st in tensors:
                    w.write(st, dt)
                w.close()
                sizes[name] = (8 * w.bytes_written / params, params / (time.perf_counter() - t1) / 1e6)
            rows.append((k, params / trim_s / 1e6, sizes))
            del tensors
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="bench_out/merge", help="folder for the generated family and outputs")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--inter", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=7)
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--k", type=float, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", metavar="OUT", help="also write every number printed to this JSON file")
    args = ap.parse_args(argv)

    work = Path(args.work)
    shapes = llama_shapes(args.vocab, args.hidden, args.inter, args.layers)
    params = sum(torch.Size(s).numel() for s in shapes.values())
    t0 = time.perf_counter()
    base, fts = write_family(work / "family", args.models, getattr(torch, args.dtype), shapes)
    print(f"family: {params / 1e6:.1f}M params x {args.models} fine-tuned, {args.dtype} "
          f"(ready in {time.perf_counter() - t0:.0f} s)")
    fmt = dict(base=str(base), fts=[str(p) for p in fts], k=args.k, lam=1.0, threads=args.threads)
    idle = run_measured("import torch, tiesfed.engine\nRESULT = {}")
    naive = run_measured(NAIVE.format(out=str(work / "naive"), **fmt))
    ours = run_measured(TIESFED.format(out=str(work / "tiesfed"), **fmt))
    diff = max_diff(work / "naive", work / "tiesfed")

    print(f"\n## merge, k={args.k:g}, {args.threads} threads\n")
    print("| | wall s | peak RSS MiB |")
    print("|---|---:|---:|")
    print(f"| naive dense TIES (baseline) | {naive['wall_s']:.1f} | {naive['peak_rss_mib']:.0f} |")
    print(f"| tiesfed merge | {ours['wall_s']:.1f} | {ours['peak_rss_mib']:.0f} |")
    print(f"| ratio tiesfed / naive | {ours['wall_s'] / naive['wall_s']:.2f} | "
          f"{ours['peak_rss_mib'] / naive['peak_rss_mib']:.2f} |")
    largest = max(torch.Size(s).numel() for s in shapes.values())
    per_elem = (ours["peak_rss_mib"] - idle["peak_rss_mib"]) * 2**20 / largest
    print(f"\ntiesfed peak RSS = {idle['peak_rss_mib']:.0f} MiB after imports + {per_elem:.0f} bytes x "
          f"largest tensor ({largest / 1e6:.1f}M elements)")
    print(f"max |tiesfed - naive| over all tensors: {diff:.3g}")

    print("\n## codec and trim (one model)\n")
    print("| k % | trim M params/s | fp32 bits/param | fp16 bits/param | bf16 bits/param | encode M params/s (fp16) |")
    print("|---:|---:|---:|---:|---:|---:|")
    codec = codec_table(base, fts[0])
    # the local merge encodes nothing; what a client would upload is the codec's size at this k
    wire = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[args.dtype]
    ours["upload_bits_per_param"] = next((sizes[wire][0] for k, _, sizes in codec if k == args.k), float("nan"))
    print(f"tiesfed upload size: {ours['upload_bits_per_param']:.2f} bits/param ({args.dtype} values)")
    for k, trim_rate, sizes in codec:
        print(f"| {k} | {trim_rate:.1f} | {sizes['fp32'][0]:.2f} | {sizes['fp16'][0]:.2f} | "
              f"{sizes['bf16'][0]:.2f} | {sizes['fp16'][1]:.0f} |")

    if args.json:
        result = {
            "config": {"params": params, "tensors": len(shapes), "vocab": args.vocab, "hidden": args.hidden,
                       "inter": args.inter, "layers": args.layers, "models": args.models, "dtype": args.dtype,
                       "k": args.k, "threads": args.threads},
            "naive": {"wall_s": naive["wall_s"], "peak_rss_mib": naive["peak_rss_mib"]},
            "tiesfed": {"wall_s": ours["wall_s"], "peak_rss_mib": ours["peak_rss_mib"],
                        "upload_bits_per_param": ours["upload_bits_per_param"]},
            "ratio": {"wall": ours["wall_s"] / naive["wall_s"], "peak_rss": ours["peak_rss_mib"] / naive["peak_rss_mib"]},
            "idle_rss_mib": idle["peak_rss_mib"],
            "largest_tensor": largest,
            "bytes_per_largest_element": per_elem,
            "max_abs_diff": diff,
            "codec": [{"k": k, "trim_mparams_s": trim_rate,
                       "bits_per_param": {dt: v[0] for dt, v in sizes.items()},
                       "encode_mparams_s": {dt: v[1] for dt, v in sizes.items()}}
                      for k, trim_rate, sizes in codec],
        }
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
