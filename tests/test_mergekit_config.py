"""mergekit-format configs: the loader's defaults, errors and paths, mergekit's gradient
rule, and a merge that equals a dense reference written with mergekit 0.1.5's semantics
(its `GeneralizedTaskArithmeticMerge.merge_group` and `linear_merge`, restated here:
the tests do not need mergekit itself)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import make_model, write_family
from tiesfed.core.tensor_params import evaluate_setting, layer_count, position
from tiesfed.engine import merge
from tiesfed.io.merge_config import load_config
from tiesfed.io.mergekit_config import MergekitConfigError, from_mergekit
from tiesfed.io.model_io import ModelReader

SPEC = {
    "embed.weight": (40, 8),
    **{f"layers.{i}.{n}.weight": (8, 8) for i in range(3) for n in ("attn.q", "mlp.up")},
    **{f"layers.{i}.norm.weight": (8,) for i in range(3)},
    "lm_head.weight": (40, 8),
    "position_ids": ((1, 16), torch.int64),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return write_family(tmp_path_factory.mktemp("mkfamily"), 3, spec=SPEC)


def load_folder(path: Path) -> dict[str, torch.Tensor]:
    with ModelReader(path) as r:
        return {n: r.get(n).clone() for n in r.names}


# ------------------------------------------------------------------ mergekit's rules, restated


def mk_gradient(values: list[float], t: float) -> float:
    """mergekit.config.evaluate_setting for a list of numbers (0.1.5)."""
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def mk_t(name: str, layers: int) -> float:
    """mergekit's plan: t = idx / (layers - 1) inside the layers (1 with one), 0 for pre/post weights."""
    if not name.startswith("layers."):
        return 0.0
    idx = int(name.split(".")[1])
    return idx / (layers - 1) if layers > 1 else 1.0


def mk_setting(name: str, setting, t: float):
    if setting is None:
        return None
    if isinstance(setting, (int, float)):
        return float(setting)
    if all(isinstance(e, (int, float)) for e in setting):
        return mk_gradient([float(e) for e in setting], t)
    for cond in setting:
        if cond.get("filter") in (None, "*") or cond["filter"] in name:
            return mk_setting(name, cond["value"], t)
    return None


def mk_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return delta
    k = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    mask[torch.argsort(delta.abs().reshape(-1), descending=True)[:k]] = 1
    return delta * mask.reshape(delta.shape)


def mk_outliers(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit.sparsify.magnitude_outliers (0.1.5)."""
    if density >= 1:
        return delta
    n = delta.numel()
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    mask = torch.zeros(n, dtype=delta.dtype)
    mask[torch.sort(delta.abs().reshape(-1)).indices[bottom:bottom + target]] = 1
    return delta * mask.reshape(delta.shape)


def mk_l1(delta: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """mergekit.sparsify.rescaled_masked_tensor, l1."""
    before, after = delta.abs().sum(), masked.abs().sum()
    return masked if before < 1e-7 or after < 1e-7 else masked * (before / after)


def mk_gta(base, fts, weights, densities, *, consensus: bool, sparsify, normalize: bool, lam: float):
    """`sparsify`: True (magnitude), False, or a function (delta, density) -> sparsified delta."""
    fn = mk_magnitude if sparsify is True else sparsify
    deltas = torch.stack([fn(f - base, d) if sparsify else f - base for f, d in zip(fts, densities)])
    w = torch.tensor(weights, dtype=deltas.dtype).reshape(-1, *([1] * base.dim()))
    deltas = deltas * w
    if consensus:
        majority = (deltas.sum(0) >= 0).to(deltas.dtype) * 2 - 1
        mask = (deltas.sign() == majority).to(deltas.dtype)
        mixed = (deltas * mask).sum(0)
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(0)
        divisor = w.sum(0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return (base + mixed).to(base.dtype)


def reference(base, tuned, models: list[dict], params: dict, **kw) -> dict[str, torch.Tensor]:
    layers = layer_count(base)
    out = {}
    for name, b in base.items():
        if not b.is_floating_point():
            out[name] = b
            continue
        t = mk_t(name, layers)
        ws, ds = [], []
        for m in models:
            p = m.get("parameters", {})
            w = mk_setting(name, p.get("weight"), t)
            ws.append(w if w is not None else mk_setting(name, params.get("weight"), t))
            d = mk_setting(name, p.get("density"), t)
            d = d if d is not None else mk_setting(name, params.get("density"), t)
            ds.append(1.0 if d is None else d)
        out[name] = mk_gta(b, [ft[name] for ft in tuned], ws, ds, lam=params.get("lambda", 1.0), **kw)
    return out


def assert_close(got: dict, want: dict, rel: float = 1e-6) -> None:
    assert set(got) == set(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype and g.shape == w.shape, name
        scale = max(w.float().abs().max().item(), 1e-30)
        diff = (g.float() - w.float()).abs().max().item()
        assert diff <= rel * scale, f"{name}: max abs diff {diff} > {rel} x {scale}"


# ------------------------------------------------------------------ the loader


def cfg(**kw) -> dict:
    return {"merge_method": "ties", "base_model": "/m/base",
            "models": [{"model": "/m/a", "parameters": {"weight": 1.0}},
                       {"model": "/m/b", "parameters": {"weight": 0.5}}], **kw}


def test_defaults_are_mergekits():
    c = from_mergekit(cfg())
    o = c.options
    assert c.semantics == "mergekit"
    assert (o.method, o.trim, o.zero_sign, o.election, o.disjoint, o.weight_semantics, o.lam) == \
        ("ties", "tensor", "positive", "mass", "mean", "mergekit", 1.0)
    assert all(m.density is None or m.density == 1.0 for m in c.models)  # density defaults to 1.0, not 20%
    assert [m.density_default for m in c.models] == [1.0, 1.0]
    assert from_mergekit(cfg(merge_method="dare_ties")).options.disjoint == "sum"  # dare_ties sums
    assert from_mergekit(cfg(parameters={"normalize": False})).options.disjoint == "sum"
    assert from_mergekit(cfg(merge_method="task_arithmetic")).options.method == "task_arithmetic"
    assert from_mergekit(cfg(merge_method="task_arithmetic", parameters={"normalize": True})).options.method \
        == "average"
    lin = from_mergekit(cfg(merge_method="linear", parameters={"weight": 0.2}))
    assert lin.options.method == "average" and lin.models[-1].model == "/m/base"  # the base joins, τ = 0
    c = from_mergekit(cfg(dtype="bfloat16", out_dtype="torch.float16",
                          parameters={"int8_mask": True, "lambda": 1.5}, name="mega-step-1"))
    assert (c.dtype, c.out_dtype, c.options.lam) == ("bfloat16", "float16", 1.5)


def test_negative_weights_and_gradients_are_accepted():
    c = from_mergekit(cfg(parameters={"density": [0.1, 0.5]},
                          models=[{"model": "/m/a", "parameters": {"weight": -0.5}},
                                  {"model": "/m/b", "parameters": {"weight": [1, 0.2], "density": 0.3}}]))
    assert c.models[0].weight_settings == (-0.5, None)
    assert c.models[1].density_settings == (0.3, [0.1, 0.5])


@pytest.mark.parametrize("change, field", [
    ({"models": None, "slices": [{"sources": []}]}, "slices[0].sources"),
    ({"slices": [{"sources": []}]}, "models"),  # models and slices: mergekit wants exactly one
    ({"merge_method": "slerp"}, "merge_method"),
    ({"merge_method": "model_stock"}, "merge_method"),
    ({"merge_method": "della", "parameters": {"density": 0.1, "epsilon": 0.2}}, "models[0].parameters.epsilon"),
    ({"models": [{"model": "/m/a", "parameters": {"weight": 1, "epsilon": 0.1}}]}, "models[0].parameters.epsilon"),
    ({"tokenizer_source": "union"}, "tokenizer_source"),
    ({"parameters": {"lambda": [1, 2]}}, "parameters.lambda"),
    ({"parameters": {"foo": 1}}, "parameters.foo"),
    ({"dtype": "int8"}, "dtype"),
    ({"chat_template": "chatml"}, "chat_template"),
    ({"models": [{"model": "/m/a", "parameters": {"weight": 1}}, {"model": "/m/b"}]},
     "models[1].parameters.weight"),
    ({"models": [{"model": "/m/a", "parameters": {"weight": 1, "gamma": 0.1}}]}, "models[0].parameters.gamma"),
    ({"models": [{"model": "/m/a+/m/lora", "parameters": {"weight": 1}}]}, "models[0].model"),
    ({"models": [{"model": "/m/a", "parameters": {"weight": 1}}] * 2}, "models[1].model"),
])
def test_unsupported_is_refused_naming_the_field(change, field):
    with pytest.raises(MergekitConfigError) as e:
        from_mergekit(cfg(**change))
    assert str(e.value).startswith(field + ":"), str(e.value)


def test_linear_without_normalize_needs_weights_summing_to_one():
    ok = {"merge_method": "linear", "parameters": {"normalize": False},
          "models": [{"model": "/m/a", "parameters": {"weight": 0.25}},
                     {"model": "/m/b", "parameters": {"weight": 0.75}}]}
    assert from_mergekit(ok).options.method == "task_arithmetic"
    ok["models"][1]["parameters"]["weight"] = 0.5
    with pytest.raises(MergekitConfigError, match="^parameters.normalize"):
        from_mergekit(ok)


def test_paths_resolve_from_the_working_directory(tmp_path, monkeypatch):
    sub = tmp_path / "configs"
    sub.mkdir()
    y = sub / "m.yml"
    y.write_text(yaml.safe_dump(cfg(base_model="models/base", models=[{"model": "models/a",
                                                                       "parameters": {"weight": 1}}])))
    monkeypatch.chdir(tmp_path)
    for m in ("models/base", "models/a"):
        (tmp_path / m).mkdir(parents=True)
    c = load_config(y)
    assert c.base_model == os.path.join(str(tmp_path), "models/base")  # mergekit: from the working directory
    assert c.models[0].model == os.path.join(str(tmp_path), "models/a")
    own = sub / "own.yml"  # tiesfed's own format keeps its rule: from the YAML's folder
    own.write_text("method: ties\nbase_model: base\nmodels: [a]\n")
    c = load_config(own)
    assert (c.semantics, c.base_model, c.options.trim, c.options.k) == ("tiesfed", str(sub / "base"), "global", 20.0)


def test_gradient_rule_is_mergekits():
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(5)] + ["model.embed_tokens.weight",
                                                                           "lm_head.weight", "model.norm.weight"]
    layers = layer_count(names)
    assert layers == 5
    for values in ([0.1, 0.9], [0.2, 0.7, 0.3], [1, 0, 1, 0.5, 0.25, 2]):
        for n in names:
            t = position(n, layers)
            want_t = int(n.split(".")[2]) / 4 if ".layers." in n else 0.0
            assert t == want_t
            assert evaluate_setting(n, values, t) == mk_gradient([float(v) for v in values], want_t)
    assert position("model.layers.0.x.weight", 1) == 1.0
    f = [{"filter": "self_attn", "value": 0.3}, {"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.9}]
    assert evaluate_setting("model.layers.2.self_attn.q_proj.weight", f, 0.5) == 0.3
    assert evaluate_setting("model.layers.2.mlp.up_proj.weight", f, 0.5) == 0.5
    assert evaluate_setting("model.norm.weight", f, 0.0) == 0.9
    assert evaluate_setting("model.norm.weight", f[:2], 0.0) is None


# ------------------------------------------------------------------ merges equal mergekit's semantics


def run(tmp_path, raw: dict, name: str) -> dict[str, torch.Tensor]:
    y = tmp_path / f"{name}.yml"
    y.write_text(yaml.safe_dump(raw))
    merge(load_config(y), tmp_path / name, progress=False)
    return load_folder(tmp_path / name)


def test_ties_equals_mergekits_semantics(family, tmp_path):
    base, tuned, base_dir, paths = family
    params = {"density": [0.2, 0.6, 0.4], "lambda": 1.1, "int8_mask": True}
    models = [{"model": str(paths[0]), "parameters": {"weight": [1.0, 0.4]}},
              {"model": str(paths[1]), "parameters": {"weight": -0.5, "density": 0.3}},
              {"model": str(paths[2]), "parameters": {"weight": [{"filter": "attn", "value": 0.7},
                                                                  {"value": 1.2}]}}]
    for normalize in (True, False):
        p = {**params, "normalize": normalize}
        raw = {"merge_method": "ties", "base_model": str(base_dir), "parameters": p, "models": models}
        got = run(tmp_path, raw, f"ties-{normalize}")
        assert_close(got, reference(base, tuned, models, p, consensus=True, sparsify=True, normalize=normalize))


def test_ties_without_density_keeps_everything(family, tmp_path):
    base, tuned, base_dir, paths = family
    models = [{"model": str(p), "parameters": {"weight": 1.0}} for p in paths]
    raw = {"merge_method": "ties", "base_model": str(base_dir), "models": models}
    want = reference(base, tuned, models, {}, consensus=True, sparsify=True, normalize=True)
    assert_close(run(tmp_path, raw, "ties-dense"), want)


@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic_equals_mergekits(family, tmp_path, normalize):
    base, tuned, base_dir, paths = family
    models = [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(paths, [0.5, -0.3, 0.6])]
    raw = {"merge_method": "task_arithmetic", "base_model": str(base_dir), "parameters": {"normalize": normalize},
           "models": models}
    want = reference(base, tuned, models, {}, consensus=False, sparsify=False, normalize=normalize)
    assert_close(run(tmp_path, raw, f"ta-{normalize}"), want)


def test_linear_is_the_weighted_average_of_the_models(family, tmp_path):
    base, tuned, base_dir, paths = family
    ws = [0.4, 0.3, 0.2, 0.1]
    raw = {"merge_method": "linear", "base_model": str(base_dir),
           "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip([base_dir, *paths], ws)]}
    got = run(tmp_path, raw, "linear")
    for name, b in base.items():
        if not b.is_floating_point():
            assert torch.equal(got[name], b)
            continue
        want = sum(w * m[name] for w, m in zip(ws, [base, *tuned])) / sum(ws)
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6 * want.abs().max().item())


def test_dtype_and_out_dtype(family, tmp_path):
    """`dtype` casts the inputs when read: the same merge as of models stored in that dtype."""
    base, tuned, base_dir, paths = family
    models = [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.5}} for p in paths]
    raw = {"merge_method": "ties", "base_model": str(base_dir), "dtype": "bfloat16", "models": models}
    got = run(tmp_path, raw, "bf16")
    assert got["embed.weight"].dtype == torch.bfloat16 and got["position_ids"].dtype == torch.int64

    def cast(m):
        return {n: t.to(torch.bfloat16) if t.is_floating_point() else t for n, t in m.items()}

    b16 = make_model(tmp_path / "b16" / "base", cast(base))
    p16 = [make_model(tmp_path / "b16" / f"ft{i}", cast(m)) for i, m in enumerate(tuned)]
    raw16 = {"merge_method": "ties", "base_model": str(b16),
             "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.5}} for p in p16]}
    want = run(tmp_path, raw16, "stored-bf16")
    assert all(torch.equal(got[n], want[n]) for n in want)
    raw["out_dtype"] = "float32"
    got = run(tmp_path, raw, "bf16-out32")
    assert got["embed.weight"].dtype == torch.float32
    assert torch.equal(got["embed.weight"].to(torch.bfloat16), want["embed.weight"])


def test_cli_runs_a_mergekit_config_and_names_a_bad_field(family, tmp_path):
    from click.testing import CliRunner

    from tiesfed.cli.app import main

    base, tuned, base_dir, paths = family
    models = [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.4}} for p in paths]
    y = tmp_path / "mk.yml"
    y.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(base_dir), "models": models}))
    res = CliRunner().invoke(main, ["merge", "--config", str(y), "-o", str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    assert_close(load_folder(tmp_path / "out"),
                 reference(base, tuned, models, {}, consensus=True, sparsify=True, normalize=True))
    y.write_text(yaml.safe_dump({"merge_method": "slerp", "base_model": str(base_dir), "models": models}))
    res = CliRunner().invoke(main, ["merge", "--config", str(y), "-o", str(tmp_path / "out2"), "-q"])
    assert res.exit_code != 0 and "merge_method" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_per_tensor_settings_in_blocks_give_the_whole_tensor_result(family, tmp_path, monkeypatch, method):
    """A tensor streamed in blocks (the memory bound) gets the same bytes with per-tensor
    densities and weights, negative ones and a cast dtype."""
    import tiesfed.engine.local as local
    import tiesfed.engine.tensor as tensor

    _, _, base_dir, paths = family
    raw = {"merge_method": method, "base_model": str(base_dir), "dtype": "bfloat16", "out_dtype": "float32",
           "parameters": {"density": [0.2, 0.7, 0.4]},
           "models": [{"model": str(paths[0]), "parameters": {"weight": [1.0, 0.3]}},
                      {"model": str(paths[1]), "parameters": {"weight": -0.6, "density": 0.5}},
                      {"model": str(paths[2]), "parameters": {"weight": 0.8}}]}
    whole = run(tmp_path, raw, "whole")
    with monkeypatch.context() as m:
        m.setattr(local, "block_elements", lambda *a: 23)
        m.setattr(tensor, "BLOCK", 7)
        blocks = run(tmp_path, raw, "blocks")
    assert whole.keys() == blocks.keys()
    for n in whole:
        assert whole[n].dtype == blocks[n].dtype and torch.equal(whole[n], blocks[n]), n


def test_sparsifier_needs_whole_tensors(family, tmp_path, monkeypatch):
    import tiesfed.engine.local as local

    _, _, base_dir, paths = family
    raw = {"merge_method": "dare_ties", "base_model": str(base_dir),
           "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.5}} for p in paths]}
    monkeypatch.setattr(local, "block_elements", lambda *a: 23)
    with pytest.raises(ValueError, match="needs whole tensors: give a larger --max-memory"):
        run(tmp_path, raw, "blocks")
    assert not list((tmp_path / "blocks").glob("*.safetensors"))  # refused before any work


# ------------------------------------------------------------------ breadcrumbs, della, DARE's rescale


def test_loader_maps_the_sparsifiers():
    c = from_mergekit(cfg(merge_method="breadcrumbs", parameters={"gamma": 0.05, "density": 0.5}))
    assert c.options.method == "task_arithmetic"
    assert c.models[0].sparsifier == {"method": "magnitude_outliers", "rescale": False, "gamma": (None, 0.05),
                                      "gamma_default": 0.01}
    c = from_mergekit(cfg(merge_method="della", parameters={"density": 0.5}))
    assert (c.options.method, c.options.disjoint) == ("ties", "mean")  # della normalizes by default
    assert c.models[0].sparsifier["method"] == "della_magprune" and c.models[0].sparsifier["rescale"] is True
    c = from_mergekit(cfg(merge_method="della_linear", parameters={"normalize": True, "density": 0.5}))
    assert c.options.method == "average"
    c = from_mergekit(cfg(merge_method="dare_ties", parameters={"rescale": False}))
    assert c.models[0].sparsifier == {"method": "random", "rescale": False} and c.options.disjoint == "sum"
    assert from_mergekit(cfg(merge_method="dare_linear", parameters={"normalize": True})).options.method == "average"
    assert from_mergekit(cfg()).models[0].sparsifier is None  # ties: tiesfed's own per-tensor top-k
    assert from_mergekit(cfg(parameters={"rescale": True})).models[0].sparsifier == {"method": "magnitude",
                                                                                    "rescale": True}


@pytest.mark.parametrize("method, normalize", [("breadcrumbs", False), ("breadcrumbs", True),
                                               ("breadcrumbs_ties", False), ("breadcrumbs_ties", True)])
def test_breadcrumbs_equals_mergekits(family, tmp_path, method, normalize):
    base, tuned, base_dir, paths = family
    params = {"density": [0.3, 0.8], "gamma": 0.05, "normalize": normalize, "lambda": 0.9}
    gammas = [0.05, [0.0, 0.2], 0.1]
    models = [{"model": str(p), "parameters": {"weight": w, **({"gamma": g} if i else {})}}
              for i, (p, w, g) in enumerate(zip(paths, [1.0, 0.6, -0.4], gammas))]
    raw = {"merge_method": method, "base_model": str(base_dir), "parameters": params, "models": models}
    got = run(tmp_path, raw, f"{method}-{normalize}")
    layers = layer_count(base)
    for name, b in base.items():
        if not b.is_floating_point():
            continue
        t = mk_t(name, layers)
        ds = [mk_setting(name, params["density"], t)] * 3
        gs = [mk_setting(name, g, t) if i else 0.05 for i, g in enumerate(gammas)]
        deltas = [mk_outliers(ft[name] - b, d, g) for ft, d, g in zip(tuned, ds, gs)]
        want = mk_gta(b, [b + x for x in deltas], [1.0, 0.6, -0.4], ds, consensus=method == "breadcrumbs_ties",
                      sparsify=False, normalize=normalize, lam=0.9)
        assert_close({name: got[name]}, {name: want})


def test_ties_with_rescale_equals_mergekits(family, tmp_path):
    base, tuned, base_dir, paths = family
    models = [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.3}} for p in paths]
    raw = {"merge_method": "ties", "base_model": str(base_dir), "parameters": {"rescale": True}, "models": models}
    want = reference(base, tuned, models, {}, consensus=True, normalize=True,
                     sparsify=lambda d, k: mk_l1(d, mk_magnitude(d, k)))
    assert_close(run(tmp_path, raw, "ties-l1"), want, rel=1e-5)


def _taus(base, got):
    return {n: (got[n].double() - b.double()) for n, b in base.items() if b.is_floating_point()}


@pytest.mark.parametrize("method, params", [
    ("della_linear", {"density": 0.4, "epsilon": 0.1}),
    ("dare_linear", {"density": 0.4}),
    ("dare_linear", {"density": 0.4, "rescale": False}),
])
def test_random_sparsifiers(family, tmp_path, method, params):
    """One model, weight 1: the merged τ is the model's sparsified τ. Kept about `density`
    of it, reproducibly; values τ itself, scaled to τ's L1 norm per tensor when rescaled."""
    base, tuned, base_dir, paths = family
    raw = {"merge_method": method, "base_model": str(base_dir), "parameters": params,
           "models": [{"model": str(paths[0]), "parameters": {"weight": 1.0}}]}
    got, again = _taus(base, run(tmp_path, raw, "a")), _taus(base, run(tmp_path, raw, "b"))
    kept = total = 0
    rescale = params.get("rescale", True)
    for name, tau_hat in got.items():
        assert torch.equal(tau_hat, again[name])  # seeded
        tau = tuned[0][name].double() - base[name].double()
        on = tau_hat != 0
        kept += int(on.sum())
        total += on.numel()
        ratio = tau_hat[on] / tau[on]
        # one scale per tensor (up to θ's fp32 rounding, relative to a small τ)
        assert torch.allclose(ratio, ratio.median().expand_as(ratio), rtol=1e-3)
        if rescale:
            torch.testing.assert_close(tau_hat.abs().sum(), tau.abs().sum(), rtol=1e-4, atol=0)
            assert ratio.median() > 1.5  # about 1/density
        else:
            torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=1e-3, atol=0)
    assert abs(kept / total - 0.4) < 0.06


def test_della_keeps_large_magnitudes_more_often():
    from tiesfed.core.sparsify import della_probabilities, outlier_window, sparsify

    tau = torch.tensor([[0.1, -0.4, 0.3, 0.2, -0.5], [5.0, 1.0, -3.0, 2.0, 4.0]])
    p = della_probabilities(tau, 0.5, 0.2)
    ranks = torch.tensor([[0, 3, 2, 1, 4], [4, 0, 2, 1, 3]], dtype=torch.float32)
    torch.testing.assert_close(p, 0.3 + ranks / 4 * 0.4)  # per row, d − ε ... d + ε
    torch.testing.assert_close(della_probabilities(torch.tensor([2.0, -1.0, 3.0]), 0.5, 0.1),
                               torch.tensor([0.5, 0.4, 0.6]))
    big = torch.randn(200, 400)
    gen = torch.Generator().manual_seed(0)
    out = sparsify(big, "della_magprune", 0.5, epsilon=0.3, generator=gen)
    order = big.abs().argsort(dim=1)
    kept = (out != 0).float().gather(1, order)
    assert kept[:, :100].mean() < 0.3 < 0.7 < kept[:, -100:].mean()  # smallest kept ~0.27, largest ~0.73
    assert outlier_window(100, 0.5, 0.1) == (40, 90) and outlier_window(100, 0.95, 0.1) == (0, 95)
    with pytest.raises(ValueError, match="density ± epsilon"):
        sparsify(big, "della_magprune", 0.1, epsilon=0.2, generator=gen)


def test_federated_merge_refuses_a_gamma_gradient(family, tmp_path):
    """A round runs the sparsifier on its clients (tests/test_federated_sparsifiers.py), with one gamma:
    a gradient over the layers stays local, refused naming the field."""
    from tiesfed.federated_merge import federated_merge

    _, _, base_dir, paths = family
    raw = {"merge_method": "breadcrumbs", "base_model": str(base_dir), "parameters": {"gamma": [0.0, 0.1]},
           "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.5}} for p in paths]}
    with pytest.raises(ValueError, match=r"models\[0\] .*\.gamma: \[0.0, 0.1\] is a gradient"):
        federated_merge(from_mergekit(raw), tmp_path / "out", aggregator="local")
    assert not (tmp_path / "out").exists()
