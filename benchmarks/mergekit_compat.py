"""Run a set of mergekit YAML files through mergekit 0.1.5 and through `tiesfed merge
--config`, unchanged, and compare the merged models element by element.

A small Llama-shaped family (base + 3 fine-tunes, fp32 and bf16; ~0.3M parameters), and tiny
transformers-built GPT-2, Qwen2 and Mistral (bf16) families for the random methods, are
written under --work; each config is written there, run by `mergekit-yaml` (its venv:
--mergekit-venv, default benchmarks/.venvs/mergekit; CPU) and by tiesfed in-process.
Per config the table shows the fraction of elements that differ, the largest |diff|,
how many differ by more than rounding (4 ulps of the tensor's largest value) and how
many of those sit at a cut-off tie (some model's |τ| equals its tensor's k-th largest
|τ| and more than one element has that value: either tool may keep either). Both tools
run with the same random seed (`mergekit-yaml --random-seed`, `tiesfed merge --random-seed`),
so DARE and DELLA draw the same masks in both and are compared element by element too.
--update-readme replaces the README's <!-- figures:mergekit-compat --> block with the table.

    PYTHONPATH=. python benchmarks/mergekit_compat.py [--work DIR] [--only NAME...] [--json out.json] [--update-readme]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SEED = 7  # mergekit-yaml --random-seed and tiesfed merge --random-seed: the same DARE and DELLA masks
BLOCK = "mergekit-compat"
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


HF_ARCHS = ("gpt2", "qwen2", "mistral")


def hf_paths(work: Path, arch: str) -> tuple[Path, list[Path]]:
    root = work / f"family-{arch}"
    return root / "base", [root / f"ft{i}" for i in range(3)]


def hf_family(work: Path, arch: str) -> tuple[Path, list[Path]]:
    """A tiny transformers model of another architecture (GPT-2 and Qwen2 with tied embeddings,
    Mistral in bf16 with 11 layers: `layers.10` sorts before `layers.2`) and 3 fine-tunes."""
    import transformers as tr

    tr.logging.disable_progress_bar()
    make = {
        "gpt2": lambda: tr.GPT2LMHeadModel(tr.GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=200,
                                                         n_positions=64, bos_token_id=0, eos_token_id=0)),
        "qwen2": lambda: tr.Qwen2ForCausalLM(tr.Qwen2Config(num_hidden_layers=3, hidden_size=32, intermediate_size=64,
                                                            num_attention_heads=2, num_key_value_heads=1,
                                                            vocab_size=200, tie_word_embeddings=True)),
        "mistral": lambda: tr.MistralForCausalLM(tr.MistralConfig(
            num_hidden_layers=11, hidden_size=32, intermediate_size=64, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=200)).to(torch.bfloat16),
    }[arch]
    root = work / f"family-{arch}"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = make()
        base.save_pretrained(root / "base")
        fts = []
        for i in range(3):
            m = make()
            m.load_state_dict(base.state_dict())
            with torch.no_grad():
                for t in m.parameters():
                    t.add_(0.01 * torch.randn_like(t))
            m.save_pretrained(root / f"ft{i}")
            fts.append(root / f"ft{i}")
    if arch == "gpt2":  # a tokenizer, for `tokenizer_source: base`
        from tokenizers import Tokenizer, models

        vocab = {f"w{i}": i for i in range(200)}
        tok = tr.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0")),
                                         unk_token="w0", eos_token="w0", bos_token="w0")
        for folder in (root / "base", *fts):
            tok.save_pretrained(folder)
    return root / "base", fts


def configs(b32: tuple[Path, list[Path]], b16: tuple[Path, list[Path]],
            hf: dict[str, tuple[Path, list[Path]]]) -> dict[str, dict]:
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
        "dare_ties_gradients": {
            "merge_method": "dare_ties", "base_model": str(base), "parameters": {"density": [0.2, 0.9, 0.4]},
            "models": models(fts, [{"weight": [1.0, 0.5]}, {"weight": 0.8, "density": 1.0},
                                   {"weight": 0.6, "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.6}]}])},
        "dare_linear_bf16": {"merge_method": "dare_linear", "base_model": str(base16),
                             "models": models(fts16, [{"weight": 0.5, "density": 0.3}] * 3)},
        "dare_ties_bf16": {"merge_method": "dare_ties", "base_model": str(base16),
                           "models": models(fts16, [{"weight": 1.0, "density": 0.5}] * 3)},
        "della_bf16": {"merge_method": "della", "base_model": str(base16), "parameters": {"epsilon": 0.1},
                       "models": models(fts16, [{"weight": 1.0, "density": 0.4}] * 3)},
        "della_linear_gradients": {
            "merge_method": "della_linear", "base_model": str(base),
            "parameters": {"density": [0.3, 0.7], "epsilon": 0.1},
            "models": models(fts, [{"weight": 0.5}, {"weight": 0.3, "epsilon": 0.2}, {"weight": 0.2}])},
    }
    w3 = [{"weight": 1.0}, {"weight": 0.7}, {"weight": 0.5, "density": 0.6}]
    for arch, method in (("gpt2", "dare_ties"), ("qwen2", "della"), ("mistral", "dare_ties"), ("mistral", "della")):
        b, f = hf[arch]
        out[f"{method}_{arch}"] = {"merge_method": method, "base_model": str(b),
                                   "parameters": {"density": 0.4, **({"epsilon": 0.1} if method == "della" else {})},
                                   "models": models(f, w3)}
    out["dare_ties_gpt2_tokenizer"] = {**out["dare_ties_gpt2"], "tokenizer_source": "base"}
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
        if d >= 1 or (m.sparsifier and m.sparsifier["method"] in ("random", "della_magprune")):
            continue  # a random mask has no cut
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


def vote_ties(cfg_path: Path, base: Weights, fts: list[Weights], model_paths: list[str]) -> dict[str, torch.Tensor]:
    """Per tensor, the elements whose TIES vote lies within rounding of 0 in mergekit's compute dtype:
    |Σ w·τ̂| ≤ ε·Σ |w·τ̂| (τ̂ each model's sparsified τ; mergekit votes on τ rounded to that dtype, tiesfed
    on the exact τ, so either sign may win). The random masks are replayed with `SEED` in mergekit's order."""
    from tiesfed.core.mergekit_rng import MergekitDraw, mergekit_generator
    from tiesfed.core.sparsify import sparsify, sparsify_entry
    from tiesfed.core.tensor_params import layer_count, position, resolve
    from tiesfed.io.merge_config import load_config

    cfg = load_config(cfg_path)
    if cfg.options.method != "ties":
        return {}
    layers = layer_count(base.where)
    by_path = {p: w for p, w in zip(model_paths, fts)}
    gen = mergekit_generator(SEED)
    out = {}
    for name in sorted(base.where):  # mergekit's order: the draws of every tensor, in turn
        b = base.get(name)
        cast = getattr(torch, cfg.dtype) if cfg.dtype else b.dtype
        draw = MergekitDraw(gen, cast)
        b = b.to(cast).float()
        at = position(name, layers)
        vote = torch.zeros(b.shape, dtype=torch.float64)
        scale = torch.zeros(b.shape, dtype=torch.float64)
        for m in cfg.models:
            tau = by_path[m.model].get(name).to(cast).float() - b
            d = min(max(resolve(name, m.density_settings or (), at, 1.0), 0.0), 1.0)
            w = resolve(name, m.weight_settings or (), at, m.weight)
            if m.sparsifier:
                t = sparsify_entry(tau, m.sparsifier, d, name, at, seed=0, model_key="", draw=draw)
            else:
                t = sparsify(tau, "magnitude", d)
            vote += w * t.double()
            scale += (w * t.double()).abs()
        out[name] = vote.abs() <= torch.finfo(cast).eps * scale
    return out


def compare(mk: Path, tf: Path, cfg_path: Path, base: Path, fts: list[Path]) -> dict:
    a, b = Weights(mk), Weights(tf)
    wb, wf = Weights(base), [Weights(f) for f in fts]
    names = sorted(set(a.where) & set(b.where))
    missing = sorted(set(a.where) ^ set(b.where))
    differ = total = big = at_tie = at_vote = 0
    votes = None
    worst = 0.0
    dtypes = set()
    for n in names:
        x, y = a.get(n), b.get(n)
        dtypes.add(f"{str(x.dtype).removeprefix('torch.')}/{str(y.dtype).removeprefix('torch.')}")
        ne = x != y
        differ += int(ne.sum())
        total += x.numel()
        if ne.any():
            diff = (x.double() - y.double()).abs()
            worst = max(worst, diff.max().item())
            tol = 4 * torch.finfo(x.dtype).eps * max(x.abs().max().item(), y.abs().max().item())
            large = diff > tol
            big += int(large.sum())
            if large.any():
                cut = cut_ties(cfg_path, n, wb, wf, [str(f) for f in fts])
                at_tie += int((large & cut).sum())
                votes = votes if votes is not None else vote_ties(cfg_path, wb, wf, [str(f) for f in fts])
                if n in votes:
                    at_vote += int((large & ~cut & votes[n]).sum())
    r = {"elements": total, "differing": differ, "fraction": differ / max(total, 1), "max_abs_diff": worst,
         "beyond_rounding": big, "at_cut_ties": at_tie, "at_vote_ties": at_vote, "dtypes": sorted(dtypes),
         "missing": missing}
    return r


def run(args) -> list[dict]:
    import yaml

    from tiesfed.engine import merge
    from tiesfed.io.merge_config import load_config

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    b32, b16 = family(work, torch.float32), family(work, torch.bfloat16)
    hf = {arch: hf_paths(work, arch) for arch in HF_ARCHS}  # built when a config needs one
    families = {str(f[0]): f for f in (b32, b16, *hf.values())}
    built = set()
    exe = Path(args.mergekit_venv) / "bin" / "mergekit-yaml"
    rows = []
    for name, cfg in configs(b32, b16, hf).items():
        if args.only and name not in args.only:
            continue
        for arch in HF_ARCHS:
            if cfg.get("base_model") == str(hf[arch][0]) and arch not in built:
                hf_family(work, arch)
                built.add(arch)
        cfg_path = work / f"{name}.yml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        mk, tf = work / "out" / name / "mergekit", work / "out" / name / "tiesfed"
        t0 = time.perf_counter()
        res = subprocess.run([str(exe), str(cfg_path), str(mk), "--no-copy-tokenizer", "--quiet",
                              "--allow-crimes", "--random-seed", str(SEED)], capture_output=True, text=True, cwd=work)
        if res.returncode != 0:
            rows.append({"config": name, "error": "mergekit: " + res.stderr.strip().splitlines()[-1]})
            continue
        t1 = time.perf_counter()
        try:
            merge(load_config(cfg_path, cwd=work), tf, progress=False, overwrite=True, random_seed=SEED)
        except Exception as e:  # noqa: BLE001 - reported in the table
            rows.append({"config": name, "error": f"tiesfed: {e}"})
            continue
        t2 = time.perf_counter()
        fam = families.get(cfg.get("base_model"), b32)
        bf16 = fam is b16 or "mistral" in name
        row = {"config": name, "label": LABELS.get(name, name), "dtype_path": _dtype_path(cfg, bf16),
               **compare(mk, tf, cfg_path, fam[0], fam[1]), "mergekit_s": t1 - t0, "tiesfed_s": t2 - t1}
        rows.append(row)
        print(_line(row), flush=True)
    return rows


#: the README's name for each config
LABELS = {
    "ties": "ties (density 0.2)", "ties_no_density": "ties, no density",
    "ties_weights_no_normalize": "ties, weights, normalize false, int8_mask",
    "ties_gradients": "ties, density/weight gradients, filters, λ 1.2", "ties_negative_weight": "ties, negative weight",
    "ties_count": "ties, out_dtype bfloat16", "task_arithmetic": "task_arithmetic (weights 0.5, 0.3, −0.2)",
    "task_arithmetic_normalize": "task_arithmetic, normalize", "linear": "linear (base listed)",
    "linear_no_base": "linear, no base_model", "ties_bf16": "ties", "ties_bf16_dtype_float32": "ties, dtype float32",
    "ties_fp32_dtype_bf16": "ties, dtype bfloat16", "ties_rescale": "ties, rescale (L1)",
    "breadcrumbs": "breadcrumbs (density 0.5, gamma 0.05/0.1)",
    "breadcrumbs_ties": "breadcrumbs_ties (density gradient, normalize)",
    "dare_ties": "dare_ties (density 0.5)", "dare_ties_no_rescale": "dare_ties, rescale false",
    "dare_linear": "dare_linear (density 0.5)", "della": "della (density 0.5, epsilon 0.1)",
    "della_linear": "della_linear (epsilon 0.2)",
    "dare_ties_gradients": "dare_ties, density gradient, filter, a model at density 1",
    "dare_linear_bf16": "dare_linear (density 0.3)", "dare_ties_bf16": "dare_ties (density 0.5)",
    "della_bf16": "della (density 0.4, epsilon 0.1)",
    "della_linear_gradients": "della_linear, density gradient, per-model epsilon",
    "dare_ties_gpt2": "dare_ties, GPT-2 (tied embeddings)",
    "dare_ties_gpt2_tokenizer": "dare_ties, GPT-2, tokenizer_source base", "della_qwen2": "della, Qwen2 (tied embeddings, biases)",
    "dare_ties_mistral": "dare_ties, Mistral, 11 layers", "della_mistral": "della, Mistral, 11 layers",
}
_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _dtype_path(cfg: dict, bf16: bool) -> str:
    """Stored dtype, and → the output's where `dtype`/`out_dtype` change it."""
    src = "bf16" if bf16 else "fp32"
    out = _SHORT.get(cfg.get("out_dtype") or cfg.get("dtype") or "", src)
    return src if out == src else f"{src} → {out}"


def _line(r: dict) -> str:
    if "error" in r:
        return f"| {r['config']} | error: {r['error']} |"
    big, cut, vote = r["beyond_rounding"], r["at_cut_ties"], r["at_vote_ties"]
    kinds = " or ".join(k for n, k in ((cut, "cut-off ties"), (vote, "vote ties")) if n)
    if not big:
        note = "0"
    elif cut + vote == big:
        note = f"{big}, all at {kinds}"
    else:
        note = f"{big}: {cut} at cut-off ties, {vote} at vote ties"
    return f"| {r['label']} | {r['dtype_path']} | {r['fraction']:.1e} | {r['max_abs_diff']:.1e} | {note} |"


HEADER = "| config | dtypes | differing fraction | max abs diff | beyond 4 ulps |\n|---|---|---|---|---|"


def render_block(rows: list[dict]) -> str:
    """The README's table: every config's row, then how it was made."""
    lines = [HEADER, *(_line(r) for r in rows)]
    lines.append(f"\n*Regenerated by `PYTHONPATH=. python benchmarks/mergekit_compat.py --update-readme` on "
                 f"{datetime.date.today().isoformat()}: mergekit 0.1.5 and tiesfed with `--random-seed {SEED}`, "
                 f"torch {torch.__version__}, {platform.machine()} CPU.*")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "bench_out" / "mergekit_compat"))
    ap.add_argument("--mergekit-venv", default=str(ROOT / "benchmarks" / ".venvs" / "mergekit"))
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--json")
    ap.add_argument("--update-readme", action="store_true",
                    help=f"replace README.md's <!-- figures:{BLOCK} --> block (needs every config, no errors)")
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    args = ap.parse_args()
    print(HEADER)
    rows = run(args)
    for r in rows:
        if "error" in r:
            print(_line(r))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    failed = any("error" in r for r in rows)
    if args.update_readme:
        if failed or args.only:
            print("error: --update-readme needs every config run without errors", file=sys.stderr)
            return 1
        from benchmarks.figures import update_readme

        changed = update_readme(Path(args.readme), {BLOCK: render_block(rows)})
        print(f"README block {BLOCK}: {'updated' if changed else 'unchanged'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
