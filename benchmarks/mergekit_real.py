"""Run published mergekit YAML files (`tests/data/mergekit_real/*.yml`, their model paths
rewritten to `./base`, `./ft1` … `./ft5`) through mergekit 0.1.5 and through tiesfed,
unchanged, and compare the merged models.

Both tools run with the working directory set to a generated family (a 32-layer Llama,
hidden size 16, fp32, 128-token vocabulary with a real `tokenizers` tokenizer; the
fine-tunes' tokenizer_config.json adds a chat template), so the configs' relative paths
and published `layer_range: [0, 32]` resolve as written. Per config the table shows
whether each tool ran (and tiesfed's error where it refused), the output's tensors against
mergekit's (same names, shapes and dtypes), the fraction of elements that differ, how many
differ by more than rounding (4 ulps) and how many of those sit at a cut-off tie; for DARE
and DELLA (random masks in each tool) the norm ratio of the merged task vectors; and
whether the tokenizer vocabulary and chat template match mergekit's output. Then three generated
configs over a fine-tune that appended tokens and grew its embeddings (`added_tokens_*`):
`tokenizer_source: base` (tiesfed reads its rows at the base's) and `union` (the output grows
the rows of its tokens).

    PYTHONPATH=. python benchmarks/mergekit_real.py [--work DIR] [--only NAME...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "data" / "mergekit_real"
SHAPE = {"vocab": 128, "hidden": 16, "inter": 32, "layers": 32}
N_FINETUNES = 5
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
RANDOM = ("dare_ties", "dare_linear", "della", "della_linear")


def hf_config(dtype: str = "float32") -> dict:
    c = SHAPE
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": dtype,
        "vocab_size": c["vocab"], "hidden_size": c["hidden"], "intermediate_size": c["inter"],
        "num_hidden_layers": c["layers"], "num_attention_heads": 1, "num_key_value_heads": 1,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2,
    }


def write_tokenizer(folder: Path, vocab: int, chat_template: str | None) -> None:
    """A word-level fast tokenizer of `vocab` tokens (<unk>, <s>, </s>, w3 …), as save_pretrained writes it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
           "unk_token": "<unk>", "model_max_length": 64}
    if chat_template:
        cfg["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1) + "\n")


def write_real_family(root: Path, n_finetunes: int = N_FINETUNES, seed: int = 0) -> Path:
    """`root`/base and `root`/ft1 … ft`n`: Llama-shaped fp32 models with config.json and a tokenizer;
    the fine-tunes' tokenizers carry a chat template, the base's none. Returns `root`."""
    from benchmarks.common import llama_shapes
    from tiesfed.io.model_io import ShardedWriter

    root = Path(root)
    marker = root / "family.json"
    want = {"shape": SHAPE, "n": n_finetunes, "seed": seed, "version": 1}
    if marker.exists() and json.loads(marker.read_text()) == want:
        return root
    shapes = llama_shapes(**SHAPE)
    folders = [root / "base", *(root / f"ft{i}" for i in range(1, n_finetunes + 1))]
    plan = [(n, s, torch.float32) for n, s in shapes.items()]
    writers = [ShardedWriter(f, plan, overwrite=True) for f in folders]
    g = torch.Generator().manual_seed(seed)
    for name, shape in shapes.items():
        b = torch.randn(shape, generator=g) * 0.02 + (1.0 if name.endswith("norm.weight") else 0.0)
        shared = torch.randn(shape, generator=g)
        writers[0].write(name, b)
        for t, w in enumerate(writers[1:]):
            own = torch.randn(shape, generator=g)
            w.write(name, b + 1e-3 * (0.6 * shared + (1 if t % 2 else -1) * 0.4 * own + own))
    for w in writers:
        w.close()
    text = json.dumps(hf_config(), indent=1) + "\n"
    for i, f in enumerate(folders):
        (f / "config.json").write_text(text)
        write_tokenizer(f, SHAPE["vocab"], CHAT_TEMPLATE if i else None)
    marker.write_text(json.dumps(want))
    return root


#: tokens a fine-tune appends after the base's vocabulary (as `tokenizer.add_special_tokens` does), and the
#: rows its embeddings and output head grow to (the added tokens, padded to a multiple of 8)
ADDED_TOKENS = ("<pad>", "<|im_start|>", "<|im_end|>")
ADDED_ROWS = 136
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def write_added_tokens_model(family: Path, name: str = "ft_added", source: str = "ft1",
                             tokens: tuple[str, ...] = ADDED_TOKENS, rows: int = ADDED_ROWS, seed: int = 7) -> Path:
    """`family`/`name`: `source` with `tokens` appended to its tokenizer (special added tokens) and its
    embeddings and output head grown to `rows` rows (new rows random), config.json's vocab_size to match."""
    import shutil

    from tokenizers import AddedToken, Tokenizer

    from tiesfed.io.model_io import ModelReader, ShardedWriter

    src, dst = Path(family) / source, Path(family) / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    tok = Tokenizer.from_file(str(dst / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
    tok.save(str(dst / "tokenizer.json"))
    g = torch.Generator().manual_seed(seed)
    with ModelReader(src) as r:
        data = {n: r.get(n) for n in r.names}
    for n in VOCAB_TENSORS:
        t = data[n]
        data[n] = torch.cat([t, 0.02 * torch.randn(rows - t.shape[0], *t.shape[1:], generator=g, dtype=t.dtype)])
    for f in dst.glob("*.safetensors*"):
        f.unlink()
    with ShardedWriter(dst, [(n, tuple(t.shape), t.dtype) for n, t in data.items()], overwrite=True) as w:
        for n, t in data.items():
            w.write(n, t)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "vocab_size": rows}, indent=1) + "\n")
    return dst


def added_tokens_configs(family: Path, out: Path) -> list[Path]:
    """mergekit configs over a fine-tune that appended tokens (`write_added_tokens_model`): ties and
    task_arithmetic with `tokenizer_source: base` (tiesfed reads its rows at the base's), and ties with
    `union` (the output grows by the rows of its tokens)."""
    import yaml

    write_added_tokens_model(family)
    models = [{"model": "./ft_added", "parameters": {"weight": 1.0, "density": 0.5}},
              {"model": "./ft2", "parameters": {"weight": 0.7, "density": 0.5}}]
    cases = {
        "added_tokens_ties_base": {"merge_method": "ties", "base_model": "./base", "models": models,
                                   "parameters": {"normalize": True}, "tokenizer_source": "base", "dtype": "float32"},
        "added_tokens_task_arithmetic_base": {"merge_method": "task_arithmetic", "base_model": "./base",
                                              "models": models, "tokenizer": {"source": "base"}},
        "added_tokens_ties_union": {"merge_method": "ties", "base_model": "./base", "models": models,
                                    "tokenizer_source": "union", "dtype": "float32"},
    }
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, raw in cases.items():
        path = out / f"{name}.yml"
        path.write_text(f"# generated: {added_tokens_configs.__doc__.split(':')[0]}\n" + yaml.safe_dump(raw))
        paths.append(path)
    return paths


def tokenizer_view(folder: Path) -> dict:
    """What a user sees of a merged model's tokenizer: its vocabulary (size and digest) and chat template."""
    import hashlib

    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001 - reported
        return {"error": f"{type(e).__name__}: {e}"[:120]}
    vocab = sorted(tok.get_vocab().items())
    digest = hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:12]
    template = tok.chat_template
    return {"vocab": len(vocab), "vocab_sha": digest,
            "chat_template": hashlib.sha256(template.encode()).hexdigest()[:12] if template else None}


def vote_ties(cfg_path: Path, family: Path, mk: Path, tf: Path) -> int:
    """For a ties config: the elements beyond rounding and not at a cut-off tie whose vote is itself a tie
    within the compute dtype's rounding: |Σ w·τ̂| ≤ 8 ulps of Σ |w·τ̂| (mergekit sums in that dtype, tiesfed
    in float64, so either sign may win)."""
    from benchmarks.mergekit_compat import Weights, cut_ties
    from tiesfed.core.tensor_params import layer_count, position, resolve
    from tiesfed.io.merge_config import load_config

    cfg = load_config(cfg_path, cwd=family)
    a, b, base = Weights(mk), Weights(tf), Weights(family / "base")
    by_path = {str(f): Weights(f) for f in _finetunes(family)}
    layers = layer_count(base.where)
    found = 0
    for n in sorted(a.where):
        x, y = a.get(n), b.get(n)
        tol = 4 * torch.finfo(x.dtype).eps * max(x.abs().max().item(), y.abs().max().item())
        odd = (x.double() - y.double()).abs() > tol
        if not odd.any():
            continue
        odd &= ~cut_ties(cfg_path, n, base, list(by_path.values()), list(by_path))
        cast = getattr(torch, cfg.dtype) if cfg.dtype else base.get(n).dtype
        b0 = base.get(n).to(cast)
        mass = torch.zeros(x.shape, dtype=torch.float64)
        size = torch.zeros(x.shape, dtype=torch.float64)
        for m in cfg.models:
            t = position(n, layers)
            w = resolve(n, m.weight_settings or (), t, m.weight)
            d = resolve(n, m.density_settings or (), t, 1.0)
            tau = (by_path[m.model].get(n)[: b0.shape[0]].to(cast) - b0).double()  # a grown vocabulary: base rows
            k = max(1, int(d * tau.numel()))
            kept = tau.abs() >= tau.abs().flatten().topk(k).values[-1]
            mass += w * tau * kept
            size += (w * tau * kept).abs()
        found += int((odd & (mass.abs() <= 8 * torch.finfo(cast).eps * size)).sum())
    return found


def _finetunes(family: Path) -> list[Path]:
    return [family / f"ft{i}" for i in range(1, N_FINETUNES + 1)] + [p for p in [family / "ft_added"] if p.exists()]


def run_one(path: Path, family: Path, out: Path, exe: Path) -> dict:
    from benchmarks.mergekit_compat import compare
    from tiesfed.engine import merge
    from tiesfed.io.merge_config import load_config

    name = path.stem
    row: dict = {"config": name}
    mk, tf = out / name / "mergekit", out / name / "tiesfed"
    t0 = time.perf_counter()
    res = subprocess.run([str(exe), str(path), str(mk), "--quiet", "--allow-crimes", "--random-seed", "0"],
                         capture_output=True, text=True, cwd=family)
    row["mergekit_s"] = time.perf_counter() - t0
    said = [ln for ln in res.stderr.splitlines() if "Error" in ln] or res.stderr.strip().splitlines() or ["?"]
    row["mergekit"] = "ok" if res.returncode == 0 else "error: " + said[-1].strip()[:160]
    t1 = time.perf_counter()
    try:
        cfg = load_config(path, cwd=family)
        merge(cfg, tf, progress=False, overwrite=True, source_config=path)
        row["tiesfed"] = "ok"
    except Exception as e:  # noqa: BLE001 - reported in the table
        row["tiesfed"] = f"refused: {e}".replace("\n", " ")[:300]
        return row
    row["tiesfed_s"] = time.perf_counter() - t1
    if res.returncode != 0:
        return row
    import yaml

    method = yaml.safe_load(path.read_text())["merge_method"]
    fts = _finetunes(family)
    cwd = os.getcwd()
    os.chdir(family)  # compare re-reads the config: its paths resolve from here, as mergekit's did
    try:
        row.update(compare(mk, tf, path, family / "base", fts, method in RANDOM))
    finally:
        os.chdir(cwd)
    if method == "ties" and row["beyond_rounding"] > row["at_cut_ties"]:
        row["at_vote_ties"] = vote_ties(path, family, mk, tf)
    row["tokenizer_mergekit"], row["tokenizer_tiesfed"] = tokenizer_view(mk), tokenizer_view(tf)
    return row


def _line(r: dict) -> str:
    if r.get("tiesfed", "").startswith("refused") or "elements" not in r:
        return f"| {r['config']} | {r['mergekit']} | {r.get('tiesfed')} | | | |"
    if "norm_ratio" in r:
        diff = f"random masks: norm ratio {r['norm_ratio']:.3f}"
    else:
        votes = f", {r['at_vote_ties']} at vote ties" if "at_vote_ties" in r else ""
        diff = (f"{r['fraction']:.1e} differ, {r['beyond_rounding']} beyond 4 ulps "
                f"({r['at_cut_ties']} at cut-off ties{votes})")
    same = "same" if not r["missing"] else f"differ: {r['missing'][:3]}"
    tok = "same" if r["tokenizer_mergekit"] == r["tokenizer_tiesfed"] else \
        f"mergekit {r['tokenizer_mergekit']}, tiesfed {r['tokenizer_tiesfed']}"
    return f"| {r['config']} | ok | ok | {same}, {', '.join(r['dtypes'])} | {diff} | {tok} |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "bench_out" / "mergekit_real"))
    ap.add_argument("--configs", default=str(CONFIGS))
    ap.add_argument("--mergekit-venv", default=str(ROOT / "benchmarks" / ".venvs" / "mergekit"))
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--json")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    family = write_real_family(work / "family")
    exe = Path(args.mergekit_venv).resolve() / "bin" / "mergekit-yaml"
    print("| config | mergekit | tiesfed | tensors (names, shapes; dtypes) | elements | tokenizer |")
    print("|---|---|---|---|---|---|")
    rows = []
    paths = sorted(Path(args.configs).glob("*.yml")) + added_tokens_configs(family, work / "added_tokens")
    for path in paths:
        if args.only and path.stem not in args.only:
            continue
        row = run_one(path.resolve(), family, work / "out", exe)
        rows.append(row)
        print(_line(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
