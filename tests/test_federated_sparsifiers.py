"""mergekit's sparsifiers in a federated round: each client runs `core.sparsify` on its own
tensors, from the round's options, and the round's model equals `tiesfed merge`'s bit for bit
(the random ones seeded per client as the local engine seeds each model). Real rounds: an
in-process coordinator and clients over gRPC on loopback (`federated_merge`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from tests.helpers import write_family
from tiesfed.client.contribution import iter_contribution
from tiesfed.client.federated import Retry, submit
from tiesfed.coordinator.rounds import ParticipantConfig, RoundConfig
from tiesfed.coordinator.server import CoordinatorConfig, CoordinatorServer
from tiesfed.core.methods import get_method
from tiesfed.core.options import MergeConfig, MergeOptions, ModelEntry
from tiesfed.engine import merge
from tiesfed.federated_merge import federated_merge
from tiesfed.io.mergekit_config import RoundPlanError, from_mergekit, round_plan
from tiesfed.io.model_io import ModelReader

SPEC = {
    "embed.weight": (24, 8),
    **{f"layers.{i}.{n}.weight": (8, 8) for i in range(2) for n in ("attn.q", "mlp.up")},
    **{f"layers.{i}.norm.weight": (8,) for i in range(2)},
    "lm_head.weight": (24, 8),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return write_family(tmp_path_factory.mktemp("spfamily"), 3, seed=3, spec=SPEC)


def load_folder(path: Path) -> dict[str, torch.Tensor]:
    with ModelReader(path) as r:
        return {n: r.get(n).clone() for n in r.names}


def both(config: MergeConfig, tmp_path: Path, name: str, tls: bool = False) -> tuple[dict, dict]:
    """The local merge's model and a federated round's, for one config."""
    merge(config, tmp_path / f"{name}-local", progress=False)
    federated_merge(config, tmp_path / f"{name}-fed", aggregator="local", tls=tls, timeout=120)
    return load_folder(tmp_path / f"{name}-local"), load_folder(tmp_path / f"{name}-fed")


def assert_identical(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for n, w in want.items():
        assert got[n].dtype == w.dtype and torch.equal(got[n], w), f"{n} differs"


def mk(family, method: str, params: dict, weights=(1.0, 0.5, 0.75), own: list | None = None) -> MergeConfig:
    _, _, base_dir, paths = family
    models = [{"model": str(p), "parameters": {"weight": w, **((own or [{}] * 3)[i])}}
              for i, (p, w) in enumerate(zip(paths, weights))]
    return from_mergekit({"merge_method": method, "base_model": str(base_dir), "parameters": params,
                          "models": models})


@pytest.mark.parametrize("method, params", [
    ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.05}),
    ("della", {"density": 0.5, "epsilon": 0.1}),
    ("dare_ties", {"density": 0.4, "rescale": False}),
    ("dare_linear", {"density": 0.4}),  # mergekit's L1 rescale
    ("ties", {"density": 0.1}),  # mergekit keeps max(1, int(d·n)): one of an 8-element norm
])
def test_mergekit_config_round_equals_local_merge(family, tmp_path, method, params):
    config = mk(family, method, params)
    local, fed = both(config, tmp_path, method)
    assert_identical(fed, local)
    base = load_folder(family[2])
    changed = sum(int((local[n] != b).sum()) for n, b in base.items())
    assert 0 < changed < sum(b.numel() for b in base.values())  # sparsified, not dropped or kept whole


def test_tiesfed_options_round_equals_local_merge(family, tmp_path):
    """tiesfed's own config names the sparsifier in its options; per-participant densities; mTLS."""
    _, _, base_dir, paths = family
    opts = MergeOptions(method="ties", sparsifier="della", k=50, epsilon=0.2, rescale=True, seed=11)
    config = MergeConfig(base_model=str(base_dir), options=opts,
                         models=[ModelEntry(model=str(p), weight=w, density=d)
                                 for p, w, d in zip(paths, (1.0, 2.0, 0.5), (None, 0.4, 0.6))])
    local, fed = both(config, tmp_path, "della", tls=True)
    assert_identical(fed, local)
    other = config.model_copy(update={"options": opts.model_copy(update={"seed": 12})})
    merge(other, tmp_path / "seed12", progress=False)
    assert any(not torch.equal(v, local[n]) for n, v in load_folder(tmp_path / "seed12").items())  # seeded


def test_breadcrumbs_trim_spec_and_contribution(family):
    """The client's records are the sparsifier's survivors: int(d·n) per tensor for breadcrumbs."""
    _, _, base_dir, paths = family
    opts = MergeOptions(method="task_arithmetic", sparsifier="breadcrumbs", k=50, gamma=0.1)
    trim = get_method("task_arithmetic").trim_spec(opts, 0.25)
    assert (trim.kind, trim.fraction, trim.sparsifier.method, trim.sparsifier.gamma) == \
        ("sparsify", 0.25, "magnitude_outliers", 0.1)
    with ModelReader(base_dir) as b, ModelReader(paths[0]) as ft:
        for rec in iter_contribution(b, ft, trim, model_key="0"):
            n = rec.shape[0] * (rec.shape[1] if len(rec.shape) > 1 else 1)
            assert rec.nnz == int(0.25 * n), rec.name


@pytest.mark.parametrize("kw, field", [
    ({"sparsifier": "della", "method": "dare_ties"}, "drops at random already"),
    ({"sparsifier": "dare", "gamma": 0.1}, "gamma is a setting of the breadcrumbs"),
    ({"epsilon": 0.1}, "epsilon is a setting of a sparsifier"),
    ({"rescale": True}, "rescale is a setting of a sparsifier"),
    ({"sparsifier": "della", "k": 10, "epsilon": 0.2}, "density ± epsilon"),
    ({"sparsifier": "breadcrumbs", "gamma": 1.5}, "gamma"),
    ({"sparsifier": "slerp"}, "sparsifier"),
])
def test_option_errors(kw, field):
    with pytest.raises(ValidationError, match=field):
        MergeOptions(**kw)


@pytest.mark.parametrize("method, params, own, weights, field", [
    ("breadcrumbs", {"density": [0.2, 0.6]}, None, (1.0, 1.0, 1.0), r"models\[0\] .*\.density: .*gradient"),
    ("breadcrumbs", {"density": 0.5}, [{"gamma": 0.1}, {}, {}], (1.0, 1.0, 1.0), r"models\[1\] .*\.gamma"),
    ("della", {"density": 0.5}, None, (1.0, -0.5, 1.0), r"models\[1\] .*\.weight: -0.5"),
])
def test_round_refuses_what_it_cannot_carry(family, tmp_path, method, params, own, weights, field):
    config = mk(family, method, params, weights, own)
    with pytest.raises(RoundPlanError, match=field):
        round_plan(config)
    with pytest.raises(RoundPlanError):
        federated_merge(config, tmp_path / "out", aggregator="local", tls=False)
    assert not (tmp_path / "out").exists()


def test_round_refuses_a_dtype_cast(family):
    config = mk(family, "ties", {"density": 0.5}).model_copy(update={"dtype": "bfloat16"})
    with pytest.raises(RoundPlanError, match="dtype: bfloat16 casts"):
        round_plan(config)
    assert round_plan(config.model_copy(update={"dtype": "float32"}))[0].sparsifier == "magnitude"


def test_client_refuses_a_tensor_over_its_block(family, tmp_path):
    """A sparsifier needs whole tensors: a client whose block is smaller refuses before it uploads."""
    _, _, base_dir, paths = family
    cfg = CoordinatorConfig(listen="127.0.0.1:0", spool_dir=tmp_path / "spool", base_model=str(base_dir),
                            aggregator="local", insecure=True)
    with CoordinatorServer(cfg) as srv:
        srv.manager.open_round(RoundConfig(round_id="r1", participants=[ParticipantConfig(client_id="a")],
                                           options=MergeOptions(sparsifier="breadcrumbs", k=50)))
        with pytest.raises(ValueError, match="'embed.weight' has 192 elements, more than the 100 .*needs whole "
                                             "tensors: give a larger --max-memory"):
            submit(srv.target, "r1", "a", base_dir, paths[0], insecure=True, block=100,
                   retry=Retry(attempts=0))
        assert not list((tmp_path / "spool").rglob("*.tfs"))  # nothing uploaded
        assert not list((tmp_path / "spool").rglob("*.part"))
    with ModelReader(base_dir) as b, ModelReader(paths[0]) as ft:
        trim = get_method("ties").trim_spec(MergeOptions(sparsifier="dare", k=50))
        with pytest.raises(ValueError, match="needs whole tensors"):
            next(iter_contribution(b, ft, trim, model_key="0", block=100))


def test_cli_names_the_same_options(family, tmp_path):
    from click.testing import CliRunner

    from tiesfed.cli.app import main

    _, _, base_dir, paths = family
    args = ["merge", str(base_dir), *map(str, paths), "-q", "--sparsifier", "breadcrumbs", "--k", "50"]
    res = CliRunner().invoke(main, [*args, "--gamma", "0.05", "--rescale", "-o", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    opts = MergeOptions(sparsifier="breadcrumbs", k=50, gamma=0.05, rescale=True)
    merge(MergeConfig(base_model=str(base_dir), models=[ModelEntry(model=str(p)) for p in paths], options=opts),
          tmp_path / "api", progress=False)
    assert_identical(load_folder(tmp_path / "cli"), load_folder(tmp_path / "api"))
    res = CliRunner().invoke(main, [*args, "--epsilon", "0.1", "-o", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "epsilon is a setting of the della sparsifier" in res.output
    assert not (tmp_path / "bad").exists()
