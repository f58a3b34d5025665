"""`--random-seed`: tiesfed draws the DARE and DELLA masks mergekit 0.1.5 draws with the same seed.

The facts pinned here, read in mergekit's source and checked by tracing its `torch.bernoulli` calls
(benchmarks/mergekit_compat.py compares with mergekit itself when its venv is there):
`set_seed(N)` seeds torch's global CPU generator; the tensors are sparsified in ascending name
order, in each the models in the config's order; `bernoulli` is `torch.bernoulli(full_like(τ, d))`
in float32 (bfloat16 for a bf16 τ) and `della_magprune` a `torch.bernoulli` of rank-based
probabilities. mergekit's functions are restated below and drawn from the *global* generator,
as mergekit draws; tiesfed replays them from its own generator.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import make_model, random_family
from tests.test_mergekit_config import load_folder, mk_gta, mk_l1
from tiesfed.core.mergekit_rng import MergekitDraw, ReplayError, draw_order, mergekit_generator
from tiesfed.core.sparsify import sparsify
from tiesfed.engine import merge
from tiesfed.io.merge_config import load_config

# ------------------------------------------------------------------ mergekit 0.1.5's sparsifiers, restated


def mk_bernoulli(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit.sparsify.bernoulli's mask (CPU), from the global generator."""
    work = tensor.dtype if tensor.dtype == torch.bfloat16 else torch.float32
    return torch.bernoulli(torch.full_like(input=tensor, fill_value=density, dtype=work))


def mk_della(tensor: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """mergekit.sparsify.della_magprune's mask (CPU), from the global generator."""
    work = tensor.dtype if tensor.dtype == torch.bfloat16 else torch.float32
    shape = tensor.shape
    if tensor.dim() < 2:
        tensor = tensor.unsqueeze(0)
    ranks = torch.argsort(tensor.abs(), dim=1, descending=False).argsort(dim=1).to(work) + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    probs = (density - epsilon) + ((ranks - lo) / (hi - lo)).clamp(0, 1) * 2 * epsilon
    return torch.bernoulli(probs).to(work).reshape(shape)


# ------------------------------------------------------------------ the masks, call by call


def test_masks_are_the_global_generators_after_set_seed():
    """A sequence of calls as mergekit makes them (fp32 and bf16, DARE and DELLA, a vector, density 0)
    gives, call by call, the masks torch's global generator gives after manual_seed."""
    g = torch.Generator().manual_seed(3)
    calls = [(torch.randn(64, 32, generator=g), "random", 0.5, 0.0),
             (torch.randn(40, 16, generator=g).to(torch.bfloat16), "random", 0.3, 0.0),  # p rounds to bf16
             (torch.randn(48, 24, generator=g), "della_magprune", 0.4, 0.1),
             (torch.randn(100, generator=g).to(torch.bfloat16), "della_magprune", 0.5, 0.2),  # ranks in bf16
             (torch.randn(8, 8, generator=g), "random", 0.0, 0.0)]  # DARE at density 0 still draws
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        want = [mk_bernoulli(t, d) if m == "random" else mk_della(t, d, e) for t, m, d, e in calls]
        after = torch.random.get_rng_state()
    gen = mergekit_generator(1234)
    for (t, m, d, e), w in zip(calls, want):
        draw = MergekitDraw(gen, t.dtype)
        assert draw.draws(m, d)
        got = draw.keep(t.float(), m, d, e)  # tiesfed's τ is float32; the draw casts it back
        assert got.dtype == torch.bool and torch.equal(got, w != 0)
    assert torch.equal(gen.get_state(), after)  # nothing more, nothing less consumed


def test_no_draw_where_mergekit_draws_none():
    gen = mergekit_generator(5)
    state = gen.get_state()
    draw = MergekitDraw(gen, torch.float32)
    tau = torch.randn(10, 10)
    assert not draw.draws("random", 1.0) and not draw.draws("della_magprune", 0.0)
    assert torch.equal(sparsify(tau, "random", 1.0, draw=draw), tau)
    assert torch.equal(sparsify(tau, "della_magprune", 0.0, epsilon=0.1, draw=draw), torch.zeros_like(tau))
    assert torch.equal(gen.get_state(), state)
    assert torch.equal(sparsify(tau, "random", 0.0, draw=draw), torch.zeros_like(tau))
    assert not torch.equal(gen.get_state(), state)  # mergekit draws at density 0: so does the replay


def test_sparsify_with_a_draw_is_mergekits_result():
    """The masked, L1-rescaled τ: mergekit's `rescaled_masked_tensor` of its mask, bit for bit (fp32)."""
    tau = torch.randn(30, 20, generator=torch.Generator().manual_seed(0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(9)
        want = mk_l1(tau, tau * mk_bernoulli(tau, 0.4))
    got = sparsify(tau, "random", 0.4, rescale=True, draw=MergekitDraw(mergekit_generator(9), torch.float32))
    assert torch.equal(got, want)


# ------------------------------------------------------------------ mergekit's tensor order


def llama_names(layers: int, head: bool = True) -> list[str]:
    per = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "post_attention_layernorm", "mlp.up_proj", "mlp.gate_proj", "mlp.down_proj")
    names = ["model.embed_tokens.weight", *(f"model.layers.{i}.{p}.weight" for i in range(layers) for p in per),
             "model.norm.weight"]
    return names + ["lm_head.weight"] if head else names


LLAMA = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 11}


def test_order_is_by_name_as_strings():
    names = set(llama_names(11))
    order = draw_order(LLAMA, [names, names])
    assert order == sorted(names) and order[0] == "lm_head.weight"
    assert order.index("model.layers.10.input_layernorm.weight") < order.index("model.layers.2.input_layernorm.weight")
    tied = set(llama_names(11, head=False))  # a tied head nobody stores: mergekit skips it
    assert draw_order(LLAMA, [tied, tied]) == sorted(tied)


def test_order_follows_the_architecture():
    qwen = {"architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 1}
    names = set(llama_names(1)) | {f"model.layers.0.self_attn.{p}_proj.bias" for p in "qkv"}
    assert draw_order(qwen, [names]) == sorted(names)
    gpt2 = {"architectures": ["GPT2LMHeadModel"], "n_layer": 2}
    short = {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias",
             *(f"h.{i}.{w}" for i in range(2) for w in ("attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                                                          "attn.c_proj.bias", "ln_1.weight", "ln_1.bias", "ln_2.weight",
                                                          "ln_2.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
                                                          "mlp.c_fc.weight", "mlp.c_fc.bias"))}
    assert draw_order(gpt2, [short, short]) == sorted(short)  # the names as stored (mergekit's aliases)
    long = {f"transformer.{n}" for n in short}
    assert draw_order(gpt2, [long]) == sorted(long)


@pytest.mark.parametrize("config, stored, match", [
    ({"architectures": ["PhiForCausalLM"], "num_hidden_layers": 1}, [set()], "PhiForCausalLM"),
    ({"model_type": "toy"}, [set()], "no architecture"),
    ({"architectures": ["LlamaForCausalLM"]}, [set()], "layer count"),
    (LLAMA, [set(llama_names(11)) - {"model.layers.3.mlp.up_proj.weight"}], "'model.layers.3.mlp.up_proj.weight'"),
    (LLAMA, [set(llama_names(11, head=False)), set(llama_names(11))], "lm_head.weight"),  # a head one stores
])
def test_order_that_cannot_be_replayed_is_refused(config, stored, match):
    with pytest.raises(ReplayError, match=match):
        draw_order(config, stored)


# ------------------------------------------------------------------ whole merges


def llama_family(root, extra: dict | None = None):
    spec = {n: (24, 8) if "embed" in n or "lm_head" in n else (8,) if "norm" in n else (8, 8) for n in llama_names(2)}
    spec.update(extra or {})
    base, tuned = random_family(spec, 3, seed=4)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 2}
    # the base in three shards, in the checkpoint's order: not mergekit's (lm_head comes first there)
    base_dir = make_model(root / "base", base, shards=3, config=cfg)
    paths = [make_model(root / f"ft{i}", t, config=cfg) for i, t in enumerate(tuned)]
    return base, tuned, base_dir, paths


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return llama_family(tmp_path_factory.mktemp("llama"))


def write_yaml(tmp_path, raw: dict):
    y = tmp_path / "mk.yml"
    y.write_text(yaml.safe_dump(raw))
    return y


def assert_same_tau(got: dict, want: dict, base: dict) -> None:
    """The merged task vectors agree to float32 rounding; a different mask would differ by a share of τ."""
    assert set(got) == set(want)
    for n in want:
        g, w = got[n].double() - base[n].double(), want[n].double() - base[n].double()
        assert (g - w).abs().max() <= 1e-4 * w.abs().max(), n


@pytest.mark.parametrize("method, params, mk_sparsify, kw", [
    ("dare_ties", {"density": 0.5}, lambda t, d: mk_l1(t, t * mk_bernoulli(t, d)),
     dict(consensus=True, normalize=False)),
    ("della_linear", {"density": 0.4, "epsilon": 0.2}, lambda t, d: mk_l1(t, t * mk_della(t, d, 0.2)),
     dict(consensus=False, normalize=False)),
])
def test_merge_with_random_seed_draws_mergekits_masks(family, tmp_path, method, params, mk_sparsify, kw):
    base, tuned, base_dir, paths = family
    weights = [1.0, 0.6, 0.8]
    models = [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(paths, weights)]
    y = write_yaml(tmp_path, {"merge_method": method, "base_model": str(base_dir), "parameters": params,
                              "models": models})
    merge(load_config(y), tmp_path / "out", progress=False, random_seed=42)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(42)  # mergekit: set_seed, then every tensor in name order, the models in order
        want = {n: mk_gta(base[n], [t[n] for t in tuned], weights, [params["density"]] * 3, sparsify=mk_sparsify,
                          lam=1.0, **kw)
                for n in sorted(base)}
    assert_same_tau(load_folder(tmp_path / "out"), want, base)
    # the CLI's --random-seed is the same merge, bit for bit
    from click.testing import CliRunner

    from tiesfed.cli.app import main

    res = CliRunner().invoke(main, ["merge", "--config", str(y), "-o", str(tmp_path / "cli"), "-q",
                                    "--random-seed", "42"])
    assert res.exit_code == 0, res.output
    a, b = load_folder(tmp_path / "out"), load_folder(tmp_path / "cli")
    assert all(torch.equal(a[n], b[n]) for n in a)
    card = (tmp_path / "cli" / "README.md").read_text()  # the card reruns it with the same seed
    assert "--random-seed 42" in card and "mergekit's masks replayed" in card


def test_cli_sparsifier_dare_with_random_seed(family, tmp_path):
    """tiesfed's own command line with mergekit's DARE sparsifier: the models in the order given."""
    from click.testing import CliRunner

    from tiesfed.cli.app import main

    base, tuned, base_dir, paths = family
    res = CliRunner().invoke(main, ["merge", str(base_dir), *map(str, paths), "-o", str(tmp_path / "out"), "-q",
                                    "--method", "task_arithmetic", "--sparsifier", "dare", "--k", "40",
                                    "--weights", "1,0.6,0.8", "--random-seed", "5"])
    assert res.exit_code == 0, res.output
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        want = {n: mk_gta(base[n], [t[n] for t in tuned], [1.0, 0.6, 0.8], [0.4] * 3,
                          sparsify=lambda t, d: t * mk_bernoulli(t, d), consensus=False, normalize=False, lam=1.0)
                for n in sorted(base)}
    assert_same_tau(load_folder(tmp_path / "out"), want, base)

def test_random_seed_is_refused_where_mergekits_order_cannot_be_replayed(tmp_path):
    from tiesfed.core.options import MergeConfig, MergeOptions, ModelEntry

    base, _, base_dir, paths = llama_family(tmp_path / "extra", {"model.extra.weight": (4, 4)})
    models = [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.5}} for p in paths]
    y = write_yaml(tmp_path, {"merge_method": "dare_linear", "base_model": str(base_dir), "models": models})
    with pytest.raises(ValueError, match="tiesfed merges 'model.extra.weight', which mergekit does not"):
        merge(load_config(y), tmp_path / "out", progress=False, random_seed=1)
    assert not (tmp_path / "out").exists()
    native = MergeConfig(base_model=str(base_dir), models=[ModelEntry(model=str(p)) for p in paths],
                         options=MergeOptions(method="dare_ties"))
    with pytest.raises(ValueError, match="tiesfed's own dare_ties"):
        merge(native, tmp_path / "out", progress=False, random_seed=1)
    assert not (tmp_path / "out").exists()


MERGEKIT = Path(__file__).resolve().parents[1] / "benchmarks" / ".venvs" / "mergekit"


@pytest.mark.skipif(not (MERGEKIT / "bin" / "mergekit-yaml").exists(), reason="mergekit's venv is not installed "
                    "(python benchmarks/bench_vs_mergekit.py installs it)")
def test_against_mergekit_itself(tmp_path):
    """With mergekit at hand: a DARE-TIES config with density gradients and filters, run by `mergekit-yaml
    --random-seed` and by tiesfed with the same seed, agrees element by element to rounding."""
    import argparse

    from benchmarks import mergekit_compat

    args = argparse.Namespace(work=str(tmp_path), mergekit_venv=str(MERGEKIT), only=["dare_ties_gradients"])
    (row,) = mergekit_compat.run(args)
    assert "error" not in row, row
    assert row["beyond_rounding"] == 0 and row["missing"] == [] and row["elements"] > 0
