"""Merges of real transformers models, built from tiny configs: the output loads with
`from_pretrained` with no missing or unexpected keys, keeps its dtype and generates.
Also the inputs people bring: GPT-2's tied embeddings stored once or twice, a
`pytorch_model.bin`, a Mistral fine-tune on a Llama base."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

transformers = pytest.importorskip("transformers")

from tiesfed.cli import main  # noqa: E402
from tiesfed.core.options import MergeConfig, MergeOptions, ModelEntry  # noqa: E402
from tiesfed.engine import merge  # noqa: E402
from tiesfed.io.model_io import ModelError, ModelReader  # noqa: E402

SMALL = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=64)


def build(kind: str, dtype: torch.dtype = torch.float32):
    t = transformers
    if kind == "llama":
        cfg, cls = t.LlamaConfig(**SMALL), t.LlamaForCausalLM
    elif kind == "mistral":
        cfg, cls = t.MistralConfig(**SMALL), t.MistralForCausalLM
    elif kind == "qwen2":
        cfg, cls = t.Qwen2Config(**SMALL), t.Qwen2ForCausalLM
    else:
        cfg = t.GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=0,
                           eos_token_id=0)
        cls = t.GPT2LMHeadModel
    torch.manual_seed(0)
    return cls(cfg).to(dtype).eval()


def fine_tune(model, seed: int):
    """A copy with every parameter moved a little: a stand-in for a fine-tune."""
    ft = type(model)(model.config).to(next(model.parameters()).dtype).eval()
    ft.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g).to(p.dtype))
    return ft


def save_bin(model, folder: Path) -> Path:
    """A `torch.save` of the state dict, as older code and many training scripts write it: tied
    parameters are both stored (sharing storage)."""
    folder.mkdir(parents=True)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def load_checked(out: Path, cls, dtype: torch.dtype):
    model, info = cls.from_pretrained(out, output_loading_info=True, dtype=dtype)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert next(model.parameters()).dtype == dtype
    ids = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert ids.shape == (1, 7)
    return model


def run(base: Path, models: list[Path], out: Path, **opts) -> Path:
    cfg = MergeConfig(base_model=str(base), models=[ModelEntry(model=str(m)) for m in models],
                      options=MergeOptions(**opts))
    merge(cfg, out, progress=False)
    return out


@pytest.mark.parametrize("kind, dtype", [("llama", torch.float32), ("llama", torch.bfloat16),
                                         ("qwen2", torch.float32), ("gpt2", torch.float32)])
def test_merged_model_loads_and_generates(tmp_path, kind, dtype):
    base = build(kind, dtype)
    base.save_pretrained(tmp_path / "base")
    paths = []
    for i in range(2):
        fine_tune(base, i + 1).save_pretrained(tmp_path / f"ft{i}")
        paths.append(tmp_path / f"ft{i}")
    out = run(tmp_path / "base", paths, tmp_path / "out", k=30)
    merged = load_checked(out, type(base), dtype)
    moved = [not torch.equal(a, b) for a, b in zip(merged.state_dict().values(), base.state_dict().values())]
    assert any(moved)  # the merge changed the weights
    if kind == "gpt2":
        assert merged.lm_head.weight.data_ptr() == merged.transformer.wte.weight.data_ptr()  # still tied


def test_gpt2_tied_duplicate_in_a_fine_tune(tmp_path):
    """Base stored by save_pretrained (wte only); one fine-tune as a torch.save state dict
    (lm_head.weight stored too): merged, equal to the merge of the same weights stored once."""
    base = build("gpt2")
    base.save_pretrained(tmp_path / "base")
    ft = fine_tune(base, 1)
    ft.save_pretrained(tmp_path / "ft-st")
    save_bin(ft, tmp_path / "ft-bin")
    with ModelReader(tmp_path / "ft-bin") as r:
        assert "lm_head.weight" in r and "transformer.wte.weight" in r  # both stored
    other = tmp_path / "ft2"
    fine_tune(base, 2).save_pretrained(other)
    a = run(tmp_path / "base", [tmp_path / "ft-bin", other], tmp_path / "a")
    b = run(tmp_path / "base", [tmp_path / "ft-st", other], tmp_path / "b")
    with ModelReader(a) as ra, ModelReader(b) as rb:
        assert ra.names == rb.names and "lm_head.weight" not in ra
        assert all(torch.equal(ra.get(n), rb.get(n)) for n in ra.names)
    load_checked(a, transformers.GPT2LMHeadModel, torch.float32)


def test_gpt2_base_stores_both_copies(tmp_path):
    """The base stores lm_head.weight and wte (a torch.save), the fine-tunes only wte: the
    fine-tunes' head reads as their embeddings; the output keeps the base's layout."""
    base = build("gpt2")
    save_bin(base, tmp_path / "base")
    paths = []
    for i in range(2):
        fine_tune(base, i + 1).save_pretrained(tmp_path / f"ft{i}")
        paths.append(tmp_path / f"ft{i}")
    out = run(tmp_path / "base", paths, tmp_path / "out", trim="tensor")
    with ModelReader(out) as r:
        assert "lm_head.weight" in r
        assert torch.equal(r.get("lm_head.weight"), r.get("transformer.wte.weight"))  # merged alike
    load_checked(out, transformers.GPT2LMHeadModel, torch.float32)


def test_untied_head_in_a_fine_tune_is_not_a_duplicate(tmp_path):
    base = build("gpt2")
    base.save_pretrained(tmp_path / "base")
    ft = fine_tune(base, 1)
    sd = {k: v.clone() for k, v in ft.state_dict().items()}
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1.0  # no longer the embeddings
    (tmp_path / "ft").mkdir()
    ft.config.save_pretrained(tmp_path / "ft")
    torch.save(sd, tmp_path / "ft" / "pytorch_model.bin")
    with pytest.raises(ModelError, match="'lm_head.weight': not in the base model"):
        run(tmp_path / "base", [tmp_path / "ft"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bin_inputs_merge_like_safetensors(tmp_path):
    base = build("llama")
    base.save_pretrained(tmp_path / "base")
    fts = [fine_tune(base, i + 1) for i in range(2)]
    for i, ft in enumerate(fts):
        ft.save_pretrained(tmp_path / f"st{i}")
    save_bin(fts[0], tmp_path / "bin0")
    # a sharded pickle checkpoint with its index, as transformers 4 wrote them
    sharded = tmp_path / "bin1"
    sharded.mkdir()
    fts[1].config.save_pretrained(sharded)
    sd = fts[1].state_dict()
    names = list(sd)
    halves = {"pytorch_model-00001-of-00002.bin": names[:10], "pytorch_model-00002-of-00002.bin": names[10:]}
    for file, part in halves.items():
        torch.save({n: sd[n] for n in part}, sharded / file)
    import json
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, part in halves.items() for n in part}}))
    a = run(tmp_path / "base", [tmp_path / "bin0", sharded], tmp_path / "a")
    b = run(tmp_path / "base", [tmp_path / "st0", tmp_path / "st1"], tmp_path / "b")
    with ModelReader(a) as ra, ModelReader(b) as rb:
        assert ra.names == rb.names and all(torch.equal(ra.get(n), rb.get(n)) for n in ra.names)
    load_checked(a, transformers.LlamaForCausalLM, torch.float32)


def test_mistral_fine_tune_on_llama_base(tmp_path):
    base = build("llama")
    base.save_pretrained(tmp_path / "base")
    mistral = build("mistral")
    assert set(mistral.state_dict()) == set(base.state_dict())  # same names and shapes: only config.json differs
    fine_tune(mistral, 1).save_pretrained(tmp_path / "ft")
    args = ["merge", str(tmp_path / "base"), str(tmp_path / "ft"), "-o", str(tmp_path / "out"), "-q"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0
    assert "architecture" in res.output and "model_type: 'mistral', base has 'llama'" in res.output
    assert "MistralForCausalLM" in res.output and "--allow-architecture-mismatch" in res.output
    assert not (tmp_path / "out").exists()
    res = CliRunner().invoke(main, args + ["--allow-architecture-mismatch"])
    assert res.exit_code == 0, res.output
    load_checked(tmp_path / "out", transformers.LlamaForCausalLM, torch.float32)


def test_resized_vocabulary(tmp_path):
    base = build("llama")
    base.save_pretrained(tmp_path / "base")
    ft = fine_tune(base, 1)
    ft.resize_token_embeddings(72)
    ft.save_pretrained(tmp_path / "ft")
    args = ["merge", str(tmp_path / "base"), str(tmp_path / "ft"), "-o", str(tmp_path / "out"), "-q"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0
    assert "'model.embed_tokens.weight': shape [72, 16], base has [64, 16]: a resized vocabulary" in res.output
    assert "--keep-base 'model.embed_tokens.weight'" in res.output and "'lm_head.weight'" in res.output
    assert not (tmp_path / "out").exists()
    res = CliRunner().invoke(main, args + ["--keep-base", "model.embed_tokens.weight", "--keep-base", "lm_head.weight"])
    assert res.exit_code == 0, res.output
    merged = load_checked(tmp_path / "out", transformers.LlamaForCausalLM, torch.float32)
    assert torch.equal(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)
