"""Published mergekit configs (tests/data/mergekit_real, model paths rewritten to ./base,
./ft1 … ./ft5) run unchanged on a generated 32-layer Llama family: each either merges, and
its output has the base's tensors with the dtypes mergekit writes and the tokenizer mergekit
would give it, or is refused with an error naming the field. Then the features they need,
one by one: slices and modules that keep every layer in place, tokenizer_source, chat_template,
and a fine-tune that appended tokens (read at the base's rows under tokenizer_source: base / --vocab base).
(`benchmarks/mergekit_real.py` runs the same files through mergekit 0.1.5 and compares.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("tokenizers")  # the family's tokenizer (installed with transformers, the test extra)

from benchmarks.mergekit_real import (  # noqa: E402
    ADDED_ROWS,
    ADDED_TOKENS,
    CHAT_TEMPLATE,
    CONFIGS,
    VOCAB_TENSORS,
    write_added_tokens_model,
    write_real_family,
)
from tiesfed.engine import merge  # noqa: E402
from tiesfed.io.merge_config import load_config  # noqa: E402
from tiesfed.io.mergekit_config import MergekitConfigError, RoundPlanError, from_mergekit, round_plan  # noqa: E402
from tiesfed.io.model_io import ModelReader, ShardedWriter  # noqa: E402
from tiesfed.io.tokenizer_source import chat_template_of, vocabulary  # noqa: E402

#: every stored config: None where it merges, else the field its error starts with
EXPECTED = {
    "absa_dare_linear": None,
    "absa_dare_ties": None,
    "absa_della": None,
    "biomistral_hindi_della_linear": "models",  # the only model is the base: nothing to merge
    "della_math_code_modules": None,
    "ethos_alpha_della_linear": None,
    "gemma_blend_rebase_ties": None,
    "gemma_moon_dare_ties": None,
    "holland_magnum_task_arithmetic_slices": None,
    "hx_mistral_linear_slices": "slices[0].sources[1].layer_range",  # a frankenmerge (mergekit fails on it too)
    "llama3_linear_union": None,
    "mergekit_bio_merge": None,
    "mergekit_gradient_slerp": "merge_method",
    "mergekit_linear": None,
    "mergekit_mega": "",  # two YAML documents: the error names the file
    "mergekit_orcamini_passthrough": "merge_method",
    "mergekit_ties_gradients": None,
    "mergekit_vlm_ties": None,
    "repleteai_dare_ties": None,
    "repleteai_task_arithmetic": None,
    "review13_breadcrumbs": None,
    "sapientia_occulta_della": None,
    "scrambled_eggs_breadcrumbs_ties": None,
}
#: configs whose output takes a fine-tune's tokenizer or chat template (the base's has none)
WITH_TEMPLATE = {"ethos_alpha_della_linear", "gemma_blend_rebase_ties", "gemma_moon_dare_ties", "llama3_linear_union",
                 "mergekit_linear"}


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Path:
    return write_real_family(tmp_path_factory.mktemp("real") / "family")


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    with ModelReader(folder) as r:
        return {n: r.get(n).clone() for n in r.names}


def test_every_stored_config_has_an_expectation():
    stored = {p.stem for p in CONFIGS.glob("*.yml")}
    assert stored == set(EXPECTED)
    assert len(stored) >= 15
    for p in CONFIGS.glob("*.yml"):
        assert p.read_text().startswith("# source: "), p.name  # each names where it was published


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_published_config(family, tmp_path, name):
    path = CONFIGS / f"{name}.yml"
    field = EXPECTED[name]
    if field is not None:
        with pytest.raises(MergekitConfigError) as e:
            load_config(path, cwd=family)
        msg = str(e.value)
        assert msg.startswith(f"{field}:" if field else str(path)), msg
        return
    cfg = load_config(path, cwd=family)
    out = tmp_path / "out"
    merge(cfg, out, progress=False, source_config=path)
    raw = yaml.safe_load(path.read_text())
    want = getattr(torch, raw.get("out_dtype") or raw.get("dtype") or "float32")
    with ModelReader(family / "base") as b, ModelReader(out) as o:
        assert o.names == b.names
        for n in b.names:
            assert o.info(n).shape == b.info(n).shape and o.info(n).dtype == want, n
            assert torch.isfinite(o.get(n).float()).all(), n
    assert vocabulary(out) == vocabulary(family / "base")
    assert (chat_template_of(out) == CHAT_TEMPLATE) == (name in WITH_TEMPLATE)
    assert (out / "mergekit_config.yml").read_text() == path.read_text()  # kept verbatim beside the card
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == str(want).removeprefix("torch.")


# ------------------------------------------------------------------ slices and modules


#: breadcrumbs_ties: per-model weight and density, a vote, and (unlike ties' radix top-k on 288 small
#: tensors) quick enough here
METHOD = "breadcrumbs_ties"


def _slices_config(sources_params, slices=((0, 32),), **extra) -> dict:
    return {"merge_method": METHOD, "base_model": "./base", "dtype": "float32", **extra,
            "slices": [{"sources": [{"model": m, "layer_range": list(r), **({"parameters": p} if p else {})}
                                    for m, p in sources_params]} for r in slices]}


MODELS = [("./base", None), ("./ft1", {"weight": 1.0, "density": 0.5}), ("./ft2", {"weight": 0.6, "density": 0.3})]
AS_MODELS = {"merge_method": METHOD, "base_model": "./base", "dtype": "float32",
             "models": [{"model": m, **({"parameters": p} if p else {})} for m, p in MODELS]}


def _merge(family, tmp_path, raw: dict, name: str) -> dict[str, torch.Tensor]:
    out = tmp_path / name
    merge(from_mergekit(raw, cwd=family), out, progress=False)
    return tensors(out)


def test_a_slice_over_every_layer_merges_as_models(family, tmp_path):
    want = _merge(family, tmp_path, AS_MODELS, "models")
    one = _merge(family, tmp_path, _slices_config(MODELS), "one-slice")
    halves = _merge(family, tmp_path, _slices_config(MODELS, slices=((0, 16), (16, 32))), "two-slices")
    modules = _merge(family, tmp_path, {**AS_MODELS, "models": None, "modules": {"default": {
        "slices": _slices_config(MODELS)["slices"]}}}, "modules")
    for got in (one, halves, modules):
        assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)


def test_slice_parameters_rank_between_a_models_and_the_merges(family):
    raw = _slices_config([("./base", None), ("./ft1", {"density": 0.5}), ("./ft2", {"weight": 0.2})],
                         parameters={"weight": 0.9, "density": 0.7})
    raw["slices"][0]["parameters"] = {"weight": 0.4}
    c = from_mergekit(raw, cwd=family)
    assert [m.weight_settings for m in c.models] == [(None, 0.4, 0.9), (0.2, 0.4, 0.9)]
    assert [m.density_settings for m in c.models] == [(0.5, None, 0.7), (None, None, 0.7)]
    lam = {**raw, "parameters": {"lambda": 2.0}}
    lam["slices"][0]["parameters"] = {"lambda": 0.5, "weight": 1}
    assert from_mergekit(lam, cwd=family).options.lam == 0.5  # the slice's, over the merge's


@pytest.mark.parametrize("change, field", [
    (lambda r: r["slices"][0]["sources"][1].update(layer_range=[16, 32]), "slices[0].sources[1].layer_range"),
    (lambda r: [r["slices"].pop(), *(s.update(layer_range=[0, 24]) for s in r["slices"][0]["sources"])],
     "slices"),  # layers 24 to 31 dropped
    (lambda r: [s["sources"].pop(0) for s in r["slices"]], "slices[0].sources"),  # the base is not a source
    (lambda r: r["slices"][1]["sources"][1].update(parameters={"weight": 0.5}), "slices[1]"),
    (lambda r: r["slices"].reverse(), "slices[0].sources[0].layer_range"),  # layers reordered
    (lambda r: r.update(parameters={"density": [0.2, 0.8]}), "slices"),  # a gradient restarts per slice
    (lambda r: r["slices"][0].update(residual_weight=0.5), "slices[0].residual_weight"),
    (lambda r: r.update(modules={"text_decoder": {"slices": r.pop("slices")}}), "modules"),
])
def test_slices_that_move_layers_or_vary_are_refused_naming_the_field(family, change, field):
    raw = _slices_config(MODELS, slices=((0, 16), (16, 32)))
    change(raw)
    with pytest.raises(MergekitConfigError) as e:
        from_mergekit(raw, cwd=family)
    assert str(e.value).startswith(field + ":"), str(e.value)


# ------------------------------------------------------------------ tokenizer_source, chat_template


def _other_tokenizer(family: Path, tmp_path: Path) -> Path:
    """ft2's weights with a tokenizer that names one token differently."""
    other = tmp_path / "ft_other"
    shutil.copytree(family / "ft2", other)
    data = json.loads((other / "tokenizer.json").read_text())
    data["model"]["vocab"]["renamed"] = data["model"]["vocab"].pop("w7")
    (other / "tokenizer.json").write_text(json.dumps(data))
    return other


@pytest.mark.parametrize("source", ["union", "base", "./ft2", {"source": "union"}, {"source": "./ft1"}])
def test_tokenizer_source_with_the_bases_vocabulary_merges_as_without(family, tmp_path, source):
    key = "tokenizer" if isinstance(source, dict) else "tokenizer_source"
    c = from_mergekit({**AS_MODELS, key: source}, cwd=family)
    plain = from_mergekit(AS_MODELS, cwd=family)
    assert c.models == plain.models and c.options == plain.options
    named = not (source in ("union", "base") or source == {"source": "union"})
    assert (c.tokenizer_source is not None) == named
    out = tmp_path / "out"
    merge(c, out, progress=False)
    assert (chat_template_of(out) == CHAT_TEMPLATE) == named  # a fine-tune's tokenizer carries the template
    assert vocabulary(out) == vocabulary(family / "base")
    card = (out / "README.md").read_text()  # the card says whose tokenizer the output has
    assert ("the tokenizer is `" in card) == named and ("config, tokenizer and other side files are the base's"
                                                       in card) != named


def test_tokenizer_source_is_refused_where_mergekit_would_rebuild_the_embeddings(family, tmp_path):
    other = _other_tokenizer(family, tmp_path)
    raw = {**AS_MODELS, "models": [*AS_MODELS["models"], {"model": str(other), "parameters": {"weight": 1}}]}
    for key, value in (("tokenizer_source", "union"), ("tokenizer", {"source": "base"})):
        with pytest.raises(MergekitConfigError, match=rf"^{key}(\.source)?: .*vocabulary is not the base's"):
            from_mergekit({**raw, key: value}, cwd=family)
    assert from_mergekit(raw, cwd=family).tokenizer_source is None  # without a source: as mergekit, no re-indexing
    padded = tmp_path / "padded"  # config.json's vocab_size above the tokenizer's: mergekit would resize
    shutil.copytree(family / "base", padded)
    cfg = json.loads((padded / "config.json").read_text())
    (padded / "config.json").write_text(json.dumps({**cfg, "vocab_size": cfg["vocab_size"] + 8}))
    with pytest.raises(MergekitConfigError, match="^tokenizer_source: .*embedding rows"):
        from_mergekit({**AS_MODELS, "base_model": str(padded), "tokenizer_source": "base",
                       "models": AS_MODELS["models"][1:]}, cwd=family)
    for tok, field in (({"source": "union", "tokens": {"<x>": {"source": "./ft1"}}}, "tokenizer.tokens"),
                       ({"source": "union", "pad_to_multiple_of": 64}, "tokenizer.pad_to_multiple_of")):
        with pytest.raises(MergekitConfigError, match=f"^{field}:"):
            from_mergekit({**AS_MODELS, "tokenizer": tok}, cwd=family)


def test_chat_template(family, tmp_path):
    auto = from_mergekit({**AS_MODELS, "chat_template": "auto"}, cwd=family)
    assert auto.chat_template == CHAT_TEMPLATE  # the fine-tunes' (2 of 3 models carry it)
    text = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    c = from_mergekit({**AS_MODELS, "chat_template": text}, cwd=family)
    merge(c, tmp_path / "out", progress=False)
    assert chat_template_of(tmp_path / "out") == text
    assert "The chat template is the config's" in (tmp_path / "out" / "README.md").read_text()
    with pytest.raises(MergekitConfigError, match="^chat_template: 'chatml' names one of mergekit's bundled"):
        from_mergekit({**AS_MODELS, "chat_template": "chatml"}, cwd=family)
    with pytest.raises(RoundPlanError, match="^chat_template:"):
        round_plan(c)
    assert round_plan(from_mergekit({**AS_MODELS, "tokenizer_source": "union"}, cwd=family))  # the base's: fine


def test_merged_slices_config_loads_with_transformers(family, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "out"
    merge(load_config(CONFIGS / "holland_magnum_task_arithmetic_slices.yml", cwd=family), out, progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), torch_dtype="auto")
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = tok("w3 w4 w5", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, ids.shape[1] + 3)
    assert model.dtype == torch.bfloat16


def test_hub_ids_resolve_from_the_local_cache_or_are_refused(family, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tuned-7b" / "snapshots" / "abc123"
    snap.parent.mkdir(parents=True)
    snap.symlink_to(family / "ft1", target_is_directory=True)
    (cache / "models--acme--tuned-7b" / "refs").mkdir()
    (cache / "models--acme--tuned-7b" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    raw = {**AS_MODELS, "models": [{"model": "acme/tuned-7b", "parameters": {"weight": 1.0}}]}
    assert from_mergekit(raw, cwd=family).models[0].model == str(snap)  # as mergekit finds a downloaded model
    raw["models"].append({"model": "acme/other-7b@v2", "parameters": {"weight": 1.0}})
    with pytest.raises(MergekitConfigError, match=r"^models\[1\]\.model: .*huggingface-cli download acme/other-7b"):
        from_mergekit(raw, cwd=family)


def test_what_mergekit_ignores_per_model_is_ignored_and_slices_run_federated(family):
    raw = {**AS_MODELS, "parameters": {"lambda": 1.5},
           "models": [{"model": "./base", "parameters": {"weight": 3.0, "density": 0.1, "epsilon": 0.2}},
                      {"model": "./ft1", "parameters": {"weight": 1.0, "lambda": 0.2, "normalize": True}}]}
    c = from_mergekit(raw, cwd=family)  # the base's parameters, a model's lambda/normalize: mergekit reads neither
    # (breadcrumbs_ties sums by default; the model's normalize: true changes nothing)
    assert (c.options.lam, c.options.disjoint, [m.model for m in c.models]) == (1.5, "sum", [str(family / "ft1")])
    sliced = yaml.safe_load((CONFIGS / "holland_magnum_task_arithmetic_slices.yml").read_text())
    del sliced["dtype"]  # a round carries no cast
    opts, plan = round_plan(from_mergekit(sliced, cwd=family))
    assert plan == [(0.5, 1.0), (0.5, 1.0)] and opts.method == "task_arithmetic"  # density: mergekit's 1.0


# ------------------------------------------------------------------ a fine-tune that appended tokens

ADDED = {**AS_MODELS, "models": [{"model": "./base"},
                                 {"model": "./ft_added", "parameters": {"weight": 1.0, "density": 0.5}},
                                 {"model": "./ft2", "parameters": {"weight": 0.6, "density": 0.3}}]}


def _with(raw: dict, model: str) -> dict:
    return {**raw, "models": [{**m, "model": model} if m["model"] == "./ft_added" else m for m in raw["models"]]}


@pytest.fixture(scope="module")
def added(family) -> Path:
    """family/ft_added (ft1 with 3 tokens appended, embeddings and head grown to 136 rows) and the
    reference family/ft_cut: its tensors cut to the base's 128 rows, with the base's tokenizer."""
    ft = write_added_tokens_model(family)
    cut = family / "ft_cut"
    shutil.copytree(family / "base", cut, dirs_exist_ok=True)
    with ModelReader(ft) as r:
        data = {n: r.get(n)[:128].clone() if n in VOCAB_TENSORS else r.get(n) for n in r.names}
    with ShardedWriter(cut, [(n, tuple(t.shape), t.dtype) for n, t in data.items()], overwrite=True) as w:
        for n, t in data.items():
            w.write(n, t)
    return ft


def _same(a: Path, b: Path) -> None:
    x, y = tensors(a), tensors(b)
    assert sorted(x) == sorted(y)
    for n in x:
        assert torch.equal(x[n], y[n]), n


def test_added_tokens_fixture_is_what_a_resized_fine_tune_looks_like(family, added):
    with ModelReader(added) as r, ModelReader(family / "ft1") as ft1:
        for n in VOCAB_TENSORS:
            assert r.info(n).shape == (ADDED_ROWS, 16)
            assert torch.equal(r.get(n)[:128], ft1.get(n))
    v = vocabulary(added)
    assert {t: v[t] for t in ADDED_TOKENS} == {"<pad>": 128, "<|im_start|>": 129, "<|im_end|>": 130}
    assert json.loads((added / "config.json").read_text())["vocab_size"] == ADDED_ROWS


def test_tokenizer_source_base_reads_appended_tokens_at_the_bases_rows(family, added, tmp_path):
    transformers = pytest.importorskip("transformers")
    for key, value in (("tokenizer_source", "base"), ("tokenizer", {"source": "base"})):
        c = from_mergekit({**ADDED, key: value}, cwd=family)
        assert c.vocab == "base" and c.tokenizer_source is None
    out, ref = tmp_path / "out", tmp_path / "ref"
    merge(c, out, progress=False)
    merge(from_mergekit(_with(ADDED, "./ft_cut"), cwd=family), ref, progress=False)  # the rows cut by hand
    _same(out, ref)
    with ModelReader(out) as r:
        assert [r.info(n).shape for n in VOCAB_TENSORS] == [(128, 16)] * 2
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 128
    assert vocabulary(out) == vocabulary(family / "base")  # the base's tokenizer: the added tokens dropped
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == 128 and "<pad>" not in tok.get_vocab()
    assert model.get_input_embeddings().weight.shape == (128, 16)


def test_tokenizer_source_union_grows_the_rows_of_one_fine_tunes_added_tokens(family, added, tmp_path):
    transformers = pytest.importorskip("transformers")
    c = from_mergekit({**ADDED, "tokenizer_source": "union"}, cwd=family)
    assert c.vocab == "union"
    out = tmp_path / "out"
    merge(c, out, progress=False)
    # the reference, as mergekit's PermutedVocabulary hands the models to the merge: every model's rows for
    # the base's tokens, then ft_added's rows of its 3 tokens (the base and ft2 lack them: the donor's)
    with ModelReader(added) as r:
        tail = {n: r.get(n)[128:131].clone() for n in VOCAB_TENSORS}
    ref_dirs = {}
    for name in ("base", "ft_cut", "ft2"):
        d = tmp_path / f"grown_{name}"
        shutil.copytree(family / name, d)
        with ModelReader(family / name) as r:
            data = {n: torch.cat([r.get(n), tail[n]]) if n in VOCAB_TENSORS else r.get(n) for n in r.names}
        with ShardedWriter(d, [(n, tuple(t.shape), t.dtype) for n, t in data.items()], overwrite=True) as w:
            for n, t in data.items():
                w.write(n, t)
        ref_dirs[name] = str(d)
    raw = {**ADDED, "base_model": ref_dirs["base"], "models": [
        {**m, "model": {"./base": ref_dirs["base"], "./ft_added": ref_dirs["ft_cut"], "./ft2": ref_dirs["ft2"]}[m["model"]]}
        for m in ADDED["models"]]}
    merge(from_mergekit(raw, cwd=family), tmp_path / "ref", progress=False)
    _same(out, tmp_path / "ref")
    got = tensors(out)
    for n in VOCAB_TENSORS:  # every τ is 0 on the new rows: the donor's rows, as they are
        assert got[n].shape == (131, 16) and torch.equal(got[n][128:], tail[n])
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 131
    v = vocabulary(out)
    assert len(v) == 131 and {t: v[t] for t in ADDED_TOKENS} == {"<pad>": 128, "<|im_start|>": 129, "<|im_end|>": 130}
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.convert_tokens_to_ids("<|im_end|>") == 130 and model.get_input_embeddings().weight.shape == (131, 16)
    with pytest.raises(RoundPlanError, match="^tokenizer_source: union: "):
        round_plan(c)


def test_cli_vocab_base_and_the_yaml_key(family, added, tmp_path):
    from click.testing import CliRunner

    from tiesfed.cli import main

    args = ["merge", str(family / "base"), str(added), str(family / "ft2"), "-q", "--k", "100"]
    res = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "no")])
    assert res.exit_code != 0 and "resized vocabulary (136 rows, base 128)" in res.output
    assert "--vocab base" in res.output and "tokenizer_source: base" in res.output and "'lm_head.weight'" in res.output
    assert not (tmp_path / "no").exists()
    res = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "out"), "--vocab", "base"])
    assert res.exit_code == 0, res.output
    ref = [str(family / "base"), str(family / "ft_cut"), str(family / "ft2")]
    res = CliRunner().invoke(main, ["merge", *ref, "-q", "--k", "100", "-o", str(tmp_path / "ref")])
    assert res.exit_code == 0, res.output
    _same(tmp_path / "out", tmp_path / "ref")
    res = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "union"), "--vocab", "union"])
    assert res.exit_code == 0, res.output
    with ModelReader(tmp_path / "union") as r:
        assert r.info("lm_head.weight").shape == (131, 16)
    assert "tokens a fine-tune appended" in (tmp_path / "union" / "README.md").read_text()
    yml = tmp_path / "merge.yml"
    yml.write_text(yaml.safe_dump({"method": "ties", "base_model": str(family / "base"), "vocab": "base",
                                   "models": [str(added), str(family / "ft2")], "options": {"k": 100}}))
    merge(load_config(yml), tmp_path / "yaml", progress=False)
    _same(tmp_path / "yaml", tmp_path / "ref")


def _moved(family: Path, tmp_path: Path, added: Path) -> Path:
    """ft_added with the base's tokens w5 and w6 swapped: its rows are not the base's."""
    moved = tmp_path / "ft_moved"
    shutil.copytree(added, moved)
    data = json.loads((moved / "tokenizer.json").read_text())
    v = data["model"]["vocab"]
    v["w5"], v["w6"] = v["w6"], v["w5"]
    (moved / "tokenizer.json").write_text(json.dumps(data))
    return moved


def test_what_cannot_be_read_at_the_bases_rows_is_refused_naming_the_option(family, added, tmp_path):
    from tiesfed.core.options import MergeConfig, ModelEntry
    from tiesfed.io.model_io import ModelError

    with pytest.raises(MergekitConfigError, match=r"^tokenizer\.source: .* appends 3 token\(s\) to the base's "
                                                  r"vocabulary \('<pad>', .*give tokenizer_source: base"):
        from_mergekit({**ADDED, "tokenizer": {"source": "./ft_added"}}, cwd=family)  # a model source
    write_added_tokens_model(family, "ft_added2", "ft2", ("<x>",), 130)
    two = {**ADDED, "models": [*ADDED["models"][:2], {"model": "./ft_added2", "parameters": {"weight": 1.0}}]}
    with pytest.raises(MergekitConfigError, match="^tokenizer_source: 'union': more than one model appends tokens "
                                                  r"\(.*ft_added, .*ft_added2\): .*give tokenizer_source: base"):
        from_mergekit({**two, "tokenizer_source": "union"}, cwd=family)
    assert from_mergekit({**two, "tokenizer_source": "base"}, cwd=family).vocab == "base"
    plain = from_mergekit(ADDED, cwd=family)  # no tokenizer source: mergekit stops at the shapes too
    with pytest.raises(ModelError, match="resized vocabulary .*tokenizer_source: base"):
        merge(plain, tmp_path / "plain", progress=False)
    assert not (tmp_path / "plain").exists()
    moved = _moved(family, tmp_path, added)
    with pytest.raises(MergekitConfigError, match="^tokenizer_source: 'base': .*ft_moved's vocabulary is not the "
                                                  "base's .*token 'w5'"):
        from_mergekit({**_with(ADDED, str(moved)), "tokenizer_source": "base"}, cwd=family)
    cfg = MergeConfig(base_model=str(family / "base"), models=[ModelEntry(model=str(moved))], vocab="base")
    with pytest.raises(ModelError, match=r"does not start with the base's: the base's token 'w5' \(id 5\) is id 6"):
        merge(cfg, tmp_path / "moved", progress=False)
    assert not (tmp_path / "moved").exists()
    # a round: union would grow the output's rows, which no client holds
    with pytest.raises(RoundPlanError, match=r"^tokenizer_source: union: .*ft_added \('model.embed_tokens.weight': "
                                             r"136 rows, base 128\) appended tokens.*client submit --vocab base"):
        round_plan(from_mergekit({**ADDED, "tokenizer_source": "union"}, cwd=family))
    with pytest.raises(RoundPlanError, match="^vocab: union: "):
        round_plan(cfg.model_copy(update={"models": [ModelEntry(model=str(added))], "vocab": "union"}))
    assert round_plan(from_mergekit({**AS_MODELS, "tokenizer_source": "union"}, cwd=family))  # none resized: fine


def test_a_round_reads_each_clients_model_at_the_bases_rows(family, added, tmp_path):
    from tiesfed.federated_merge import federated_merge

    c = from_mergekit({**ADDED, "tokenizer_source": "base"}, cwd=family)
    assert round_plan(c)
    federated_merge(c, tmp_path / "fed", aggregator="local", tls=False, timeout=120)
    merge(c, tmp_path / "local", progress=False)
    _same(tmp_path / "fed", tmp_path / "local")  # each client cut its own rows: the local merge, bit for bit


def test_reader_keeps_a_flat_prefix_of_rows(family, added, tmp_path):
    from tiesfed.io.model_io import ModelError, fingerprint
    from tiesfed.io.vocab_rows import GrownReader

    n = "lm_head.weight"
    with ModelReader(added) as r:
        full = r.get(n)
        r.keep_rows(n, 128)
        assert r.info(n).shape == (128, 16) and torch.equal(r.get(n), full[:128])
        assert torch.equal(r.get_range(n, 100, 2048), full.reshape(-1)[100:2048])
        assert b"".join(bytes(c) for c in r.iter_raw(n, 1000)) == full[:128].contiguous().numpy().tobytes()
        with pytest.raises(ModelError, match="outside"):
            r.get_range(n, 0, 2049)
        with pytest.raises(ModelError, match="cannot keep 200"):
            r.keep_rows(n, 200)
        cut_fp = fingerprint(r)
    bin_dir = tmp_path / "bin"  # a PyTorch checkpoint reads the same
    bin_dir.mkdir()
    torch.save({"lm_head.weight": full}, bin_dir / "pytorch_model.bin")
    with ModelReader(bin_dir) as b:
        b.keep_rows(n, 128)
        assert torch.equal(b.get(n), full[:128]) and torch.equal(b.get_range(n, 5, 9), full.reshape(-1)[5:9])
    with ModelReader(family / "ft_cut") as c, ModelReader(added) as r:
        for name in VOCAB_TENSORS:
            r.keep_rows(name, 128)
        assert fingerprint(r) != cut_fp  # (both cut now, not only the head)
        assert fingerprint(r) == fingerprint(c)  # ft_cut = ft_added cut: same bytes, same fingerprint
    with ModelReader(family / "base") as b, ModelReader(added) as r:  # union's reader: base rows + a donor's tail
        grown = GrownReader(b, {n: [(b, n, 0, 2048), (r, n, 2048, 2048 + 48)]})
        want = torch.cat([b.get(n), full[128:131]])
        assert grown.info(n).shape == (131, 16) and torch.equal(grown.get(n), want)
        assert torch.equal(grown.get_range(n, 2040, 2060), want.reshape(-1)[2040:2060])  # across the two parts
        assert [t.shape for t in grown.manifest() if t.name == n] == [(131, 16)] and n in grown


def test_cli_client_submit_vocab_base_in_a_round(family, added, tmp_path):
    """`tiesfed client submit BASE FT_ADDED --vocab base` against a running coordinator: the
    client cuts its own grown rows; the fetched merge equals `tiesfed merge --vocab base`."""
    from click.testing import CliRunner

    from tiesfed.cli import main
    from tiesfed.client.federated import fetch
    from tiesfed.coordinator.rounds import ParticipantConfig, RoundConfig
    from tiesfed.coordinator.server import CoordinatorConfig, CoordinatorServer
    from tiesfed.core.options import MergeOptions

    base, models = family / "base", [family / "ft2", added]
    srv = CoordinatorServer(CoordinatorConfig(listen="127.0.0.1:0", spool_dir=tmp_path / "spool",
                                              base_model=str(base), aggregator="local", insecure=True)).start()
    try:
        rnd = srv.manager.open_round(RoundConfig(round_id="r1", options=MergeOptions(k=30), participants=[
            ParticipantConfig(client_id=c) for c in ("org-a", "org-b")]))
        runner = CliRunner()
        refused = runner.invoke(main, ["client", "submit", str(base), str(added), "--target", srv.target, "--round",
                                       "r1", "--client-id", "org-b", "-q", "--insecure"])
        assert refused.exit_code != 0 and "--vocab base" in refused.output  # the grown model alone: named option
        for c, m in zip(("org-a", "org-b"), models):
            res = runner.invoke(main, ["client", "submit", str(base), str(m), "--target", srv.target, "--round", "r1",
                                       "--client-id", c, "-q", "--insecure", "--vocab", "base"])
            assert res.exit_code == 0, res.output
        assert rnd.wait_closed(60) and rnd.state == "finalized", rnd.message
        fetch(srv.target, "r1", "org-a", str(base), tmp_path / "fed", timeout=60, insecure=True)
    finally:
        srv.stop(grace=0)
    res = CliRunner().invoke(main, ["merge", str(base), *map(str, models), "-o", str(tmp_path / "local"), "-q",
                                    "--k", "30", "--vocab", "base"])
    assert res.exit_code == 0, res.output
    _same(tmp_path / "fed", tmp_path / "local")
