"""Run a set of mergekit YAML files through mergekit 0.1.5 and through `tiesfed merge
--config`, unchanged, and compare the merged models element by element.

A small Llama-shaped family (base + 3 fine-tunes, fp32 and bf16; ~0.3M parameters) is
written under --work; each config is written there, run by `mergekit-yaml` (its venv:
--mergekit-venv, default benchmarks/.venvs/mergekit; CPU) and by tiesfed in-process.
Per config the table shows the fraction of elements that differ, the largest |diff|,
how many differ by more than rounding (4 ulps of the tensor's largest value) and how
many of those sit at a cut-off tie (some model's |τ| equals its tensor's k-th largest
|τ| and more than one element has that value: either tool may keep either). DARE and
DELLA draw their own random masks in each tool, so for dare_* and della* only the norms
and the relative L2 distance of the merged task vectors are meaningful (their rows say so).

    PYTHONPATH=. python benchmarks/mergekit_compat.py [--work DIR] [--only NAME...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPE = {"vocab": 512, "hidden": 64, "inter": 128, "layers": 4}


def hf_config(dtype: str) -> dict:
    c = SHAPE
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": dtype,
        "vocab_size": c["vocab"], "hidden_size": c["hidden"], "intermediate_size": c["inter"],
        "num_hidden_layers": c["layers"], "num_attention_heads": 1, "num_key_value_heads": 1,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
    }


def family(work: Path, dtype: torch.dtype) -> tuple[Path, list[Path]]:
    from benchmarks.common import llama_shapes, write_family

    name = str(dtype).removeprefix("torch.")
    base, fts = write_family(work / f"family-{name}", 3, dtype, llama_shapes(**SHAPE))
    text = json.dumps(hf_config(name), indent=1) + "\n"
    for m in (base, *fts):
        (m / "config.json").write_text(text)
    return base, fts


def configs(b32: tuple[Path, list[Path]], b16: tuple[Path, list[Path]]) -> dict[str, dict]:
    """name -> mergekit config (as a dict; written as YAML)."""

    def models(fts, params):
        return [{"model": str(f), "parameters": p} for f, p in zip(fts, params)]

    base, fts = b32
    base16, fts16 = b16
    w1 = [{"weight": 1.0, "density": 0.2}] * 3
    out = {
        "ties": {"merge_method": "ties", "base_model": str(base), "models": models(fts, w1)},
        "ties_no_density": {"merge_method": "ties", "base_model": str(base),
                            "models": models(fts, [{"weight": 1.0}] * 3)},
        "ties_weights_no_normalize": {
            "merge_method": "ties", "base_model": str(base), "parameters": {"normalize": False, "int8_mask": True},
            "models": models(fts, [{"weight": 1.0, "density": 0.3}, {"weight": 0.5, "density": 0.5},
                                   {"weight": 0.8, "density": 0.2}])},
        "ties_gradients": {
            "merge_method": "ties", "base_model": str(base),
            "parameters": {"density": [0.1, 0.5, 0.3], "lambda": 1.2},
            "models": models(fts, [{"weight": [1.0, 0.3]},
                                   {"weight": [{"filter": "self_attn", "value": 0.7}, {"value": 1.0}]},
                                   {"weight": 0.9, "density": 0.25}])},
        "ties_negative_weight": {
            "merge_method": "ties", "base_model": str(base), "parameters": {"density": 0.4},
            "models": models(fts, [{"weight": 1.0}, {"weight": -0.5}, {"weight": 0.7}])},
        "ties_count": {"merge_method": "ties", "base_model": str(base), "dtype": "float32", "out_dtype": "bfloat16",
                       "models": models(fts, w1)},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": str(base),
                            "models": models(fts, [{"weight": 0.5}, {"weight": 0.3}, {"weight": -0.2}])},
        "task_arithmetic_normalize": {"merge_method": "task_arithmetic", "base_model": str(base),
                                      "parameters": {"normalize": True},
                                      "models": models(fts, [{"weight": 0.5}, {"weight": 0.3}, {"weight": 1.0}])},
        "linear": {"merge_method": "linear", "base_model": str(base),
                   "models": [{"model": str(base), "parameters": {"weight": 0.4}},
                              *models(fts, [{"weight": 0.3}, {"weight": 0.2}, {"weight": 0.1}])]},
        "linear_no_base": {"merge_method": "linear",
                           "models": models(fts, [{"weight": 1.0}, {"weight": 2.0}, {"weight": 1.0}])},
        "ties_bf16": {"merge_method": "ties", "base_model": str(base16), "models": models(fts16, w1)},
        "ties_bf16_dtype_float32": {"merge_method": "ties", "base_model": str(base16), "dtype": "float32",
                                    "models": models(fts16, w1)},
        "ties_fp32_dtype_bf16": {"merge_method": "ties", "base_model": str(base), "dtype": "bfloat16",
                                 "models": models(fts, w1)},
        "dare_ties": {"merge_method": "dare_ties", "base_model": str(base),
                      "models": models(fts, [{"weight": 1.0, "density": 0.5}] * 3)},
        "dare_linear": {"merge_method": "dare_linear", "base_model": str(base),
                        "models": models(fts, [{"weight": 0.5, "density": 0.5}] * 3)},
        "dare_ties_no_rescale": {"merge_method": "dare_ties", "base_model": str(base),
                                 "parameters": {"rescale": False},
                                 "models": models(fts, [{"weight": 1.0, "density": 0.5}] * 3)},
        "ties_rescale": {"merge_method": "ties", "base_model": str(base), "parameters": {"rescale": True},
                         "models": models(fts, [{"weight": 1.0, "density": 0.3}] * 3)},
        "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": str(base),
                        "parameters": {"density": 0.5, "gamma": 0.05},
                        "models": models(fts, [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2, "gamma": 0.1}])},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": str(base),
                             "parameters": {"density": [0.3, 0.7], "normalize": True},
                             "models": models(fts, [{"weight": 1.0}, {"weight": 0.7}, {"weight": 1.0,
                                                                                        "gamma": 0.02}])},
        "della": {"merge_method": "della", "base_model": str(base), "parameters": {"epsilon": 0.1},
                  "models": models(fts, [{"weight": 1.0, "density": 0.5}] * 3)},
        "della_linear": {"merge_method": "della_linear", "base_model": str(base),
                         "models": models(fts, [{"weight": 0.5, "density": 0.5, "epsilon": 0.2}] * 3)},
    }
    del out["ties_count"]["dtype"]  # out_dtype alone: computed as stored (fp32), written as bf16
    return out


class Weights:
    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.where = {}
        for f in sorted(Path(folder).glob("*.safetensors")):
            h = safe_open(str(f), framework="pt")
            for n in h.keys():
                self.where[n] = h

    def get(self, name: str) -> torch.Tensor:
        return self.where[name].get_tensor(name)


def cut_ties(cfg_path: Path, name: str, base: Weights, fts: list[Weights], model_paths: list[str]) -> torch.Tensor:
    """Elements where some model's |τ| sits at a tie at its tensor's cut (k-th largest, k = max(1, int(d·n));
    for breadcrumbs both ends of its window of ascending ranks)."""
    from tiesfed.core.sparsify import outlier_window
    from tiesfed.core.tensor_params import layer_count, position, resolve
    from tiesfed.io.merge_config import load_config

    cfg = load_config(cfg_path)
    layers = layer_count(base.where)
    b = base.get(name)
    cast = getattr(torch, cfg.dtype) if cfg.dtype else b.dtype
    b = b.to(cast).float()
    tied = torch.zeros(b.shape, dtype=torch.bool)
    by_path = {p: w for p, w in zip(model_paths, fts)}
    for m in cfg.models:
        if m.model not in by_path:
            continue
        d = resolve(name, m.density_settings or (), position(name, layers), 1.0)
        n = b.numel()
        theta = by_path[m.model].get(name)[: b.shape[0]]  # a grown vocabulary: its rows at the base's
        tau = (theta.to(cast).float() - b).to(cast).float().abs()
        if d >= 1:
            continue
        if m.sparsifier and m.sparsifier["method"] == "magnitude_outliers":
            g = resolve(name, m.sparsifier["gamma"] or (), position(name, layers), m.sparsifier["gamma_default"])
            lo, hi = outlier_window(n, d, g)
            ranks = [j for j in (lo, hi - 1) if 0 <= j < n and hi > lo]
        else:
            ranks = [n - max(1, int(d * n))]
        ascending = tau.reshape(-1).sort().values
        for j in ranks:
            at = ascending[j]
            if int((tau == at).sum()) > 1:
                tied |= tau == at
    return tied


def compare(mk: Path, tf: Path, cfg_path: Path, base: Path, fts: list[Path], dare: bool) -> dict:
    a, b = Weights(mk), Weights(tf)
    wb, wf = Weights(base), [Weights(f) for f in fts]
    names = sorted(set(a.where) & set(b.where))
    missing = sorted(set(a.where) ^ set(b.where))
    differ = total = big = at_tie = 0
    worst = 0.0
    num = den = n_mk = n_tf = 0.0
    dtypes = set()
    for n in names:
        x, y = a.get(n), b.get(n)
        dtypes.add(f"{str(x.dtype).removeprefix('torch.')}/{str(y.dtype).removeprefix('torch.')}")
        ne = x != y
        differ += int(ne.sum())
        total += x.numel()
        if dare:
            t0 = wb.get(n).double()
            num += float(((x.double() - y.double()) ** 2).sum())
            den += float(((x.double() - t0) ** 2).sum())
            n_mk += float(((x.double() - t0) ** 2).sum())
            n_tf += float(((y.double() - t0) ** 2).sum())
        if ne.any():
            diff = (x.double() - y.double()).abs()
            worst = max(worst, diff.max().item())
            tol = 4 * torch.finfo(x.dtype).eps * max(x.abs().max().item(), y.abs().max().item())
            large = diff > tol
            big += int(large.sum())
            if large.any() and not dare:
                at_tie += int((large & cut_ties(cfg_path, n, wb, wf, [str(f) for f in fts])).sum())
    r = {"elements": total, "differing": differ, "fraction": differ / max(total, 1), "max_abs_diff": worst,
         "beyond_rounding": big, "at_cut_ties": at_tie, "dtypes": sorted(dtypes), "missing": missing}
    if dare:
        r["rel_l2_of_merged_tau"] = (num / den) ** 0.5 if den else 0.0
        r["norm_ratio"] = (n_tf / n_mk) ** 0.5 if n_mk else 0.0
    return r


def run(args) -> list[dict]:
    import yaml

    from tiesfed.engine import merge
    from tiesfed.io.merge_config import load_config

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    b32, b16 = family(work, torch.float32), family(work, torch.bfloat16)
    exe = Path(args.mergekit_venv) / "bin" / "mergekit-yaml"
    rows = []
    for name, cfg in configs(b32, b16).items():
        if args.only and name not in args.only:
            continue
        cfg_path = work / f"{name}.yml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        mk, tf = work / "out" / name / "mergekit", work / "out" / name / "tiesfed"
        t0 = time.perf_counter()
        res = subprocess.run([str(exe), str(cfg_path), str(mk), "--no-copy-tokenizer", "--quiet",
                              "--allow-crimes", "--random-seed", "0"], capture_output=True, text=True, cwd=work)
        if res.returncode != 0:
            rows.append({"config": name, "error": "mergekit: " + res.stderr.strip().splitlines()[-1]})
            continue
        t1 = time.perf_counter()
        try:
            merge(load_config(cfg_path, cwd=work), tf, progress=False, overwrite=True)
        except Exception as e:  # noqa: BLE001 - reported in the table
            rows.append({"config": name, "error": f"tiesfed: {e}"})
            continue
        t2 = time.perf_counter()
        fam = b16 if cfg.get("base_model") == str(b16[0]) else b32
        random = name.startswith(("dare", "della"))
        row = {"config": name, **compare(mk, tf, cfg_path, fam[0], fam[1], random),
               "mergekit_s": t1 - t0, "tiesfed_s": t2 - t1}
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def _line(r: dict) -> str:
    if "error" in r:
        return f"| {r['config']} | error: {r['error']} |"
    note = (f"random masks: ‖τ_tiesfed‖/‖τ_mergekit‖ = {r['norm_ratio']:.3f}, ‖τ diff‖/‖τ_mergekit‖ = "
            f"{r['rel_l2_of_merged_tau']:.3f}" if "rel_l2_of_merged_tau" in r
            else f"{r['beyond_rounding']} beyond rounding, {r['at_cut_ties']} of them at cut-off ties")
    return (f"| {r['config']} | {', '.join(r['dtypes'])} | {r['fraction']:.2e} | {r['max_abs_diff']:.2e} | {note} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "bench_out" / "mergekit_compat"))
    ap.add_argument("--mergekit-venv", default=str(ROOT / "benchmarks" / ".venvs" / "mergekit"))
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--json")
    args = ap.parse_args()
    print("| config | dtypes (mergekit/tiesfed) | differing fraction | max abs diff | beyond rounding |")
    print("|---|---|---|---|---|")
    rows = run(args)
    for r in rows:
        if "error" in r:
            print(_line(r))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
