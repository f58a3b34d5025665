"""The merged model's README.md: a card that says it is a merge, for local merges and
federated rounds, with the config beside it from which the merge runs again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from tests.helpers import write_family
from tests.test_federated import CLIENTS, FAST, coordinator, family, fetch, open_round, send  # noqa: F401
from tiesfed.cli import main
from tiesfed.core.options import MergeConfig, MergeOptions, ModelEntry
from tiesfed.engine import merge
from tiesfed.io.merge_config import load_config
from tiesfed.io.model_card import MERGEKIT_CONFIG, ROUND_CONFIG, TIESFED_CONFIG, base_front_matter
from tiesfed.io.model_io import ModelReader

BASE_CARD = """---
license: apache-2.0
language: [en]
---
# The Base Model

UNIQUE-BASE-SENTENCE: this is the base and nothing else.
"""


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    head, _, _ = text[4:].partition("\n---\n")
    meta = yaml.safe_load(head)
    assert isinstance(meta, dict)
    return meta


@pytest.fixture
def models(tmp_path):
    _, _, base, paths = write_family(tmp_path / "fam", 3, seed=3)
    (Path(base) / "README.md").write_text(BASE_CARD)
    return Path(base), [Path(p) for p in paths]


def check_card(out: Path, names: list[str]) -> tuple[dict, str]:
    text = (out / "README.md").read_text()
    meta = front_matter(text)
    assert meta["tags"] == ["merge", "tiesfed"]
    assert meta["license"] == "apache-2.0"  # the base's
    assert meta["library_name"] == "transformers"  # the base has a config.json
    assert "UNIQUE-BASE-SENTENCE" not in text and "The Base Model" not in text
    for n in names:
        assert n in text, n
    try:
        from huggingface_hub import ModelCard
    except ImportError:
        return meta, text
    card = ModelCard(text)
    assert card.data.to_dict()["tags"] == ["merge", "tiesfed"]
    assert card.data.to_dict()["base_model"] == meta["base_model"]
    return meta, text


def test_local_card_and_its_config_rerun(models, tmp_path):
    base, paths = models
    cfg = MergeConfig(base_model=str(base),
                      models=[ModelEntry(model=str(paths[0]), weight=0.7), ModelEntry(model=str(paths[1]), density=0.3)],
                      options=MergeOptions(k=25, lam=1.3, trim="tensor", zero_sign="positive"))
    out = tmp_path / "out"
    merge(cfg, out, progress=False)
    meta, text = check_card(out, [str(paths[0]), str(paths[1])])
    assert meta["base_model"] == str(base)
    assert "| lambda | 1.3 |" in text and "| trim | tensor |" in text and "| zero_sign | positive |" in text
    assert f"| {paths[0]} | 0.7 | 0.25 |" in text and f"| {paths[1]} | 1 | 0.3 |" in text
    assert TIESFED_CONFIG in text
    # the config beside the card is tiesfed's own format and gives the same merge again
    again = load_config(out / TIESFED_CONFIG)
    assert again == cfg
    out2 = tmp_path / "out2"
    merge(again, out2, progress=False)
    with ModelReader(out) as a, ModelReader(out2) as b:
        assert a.names == b.names and all(torch.equal(a.get(n), b.get(n)) for n in a.names)


def test_mergekit_card_keeps_the_yaml(models, tmp_path, monkeypatch):
    base, paths = models
    monkeypatch.chdir(tmp_path)
    mk = {"merge_method": "ties", "base_model": str(base), "parameters": {"normalize": True},
          "models": [{"model": str(paths[0]), "parameters": {"weight": [0.2, 0.8], "density": 0.5}},
                     {"model": str(paths[2]), "parameters": {"weight": 1.0}}],
          "dtype": "float32"}
    src = tmp_path / "mk.yaml"
    src.write_text(yaml.safe_dump(mk))
    res = CliRunner().invoke(main, ["merge", "--config", str(src), "-o", str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    _, text = check_card(out, [str(paths[0]), str(paths[2])])
    assert (out / MERGEKIT_CONFIG).read_text() == src.read_text()  # verbatim, as mergekit writes it
    assert not (out / TIESFED_CONFIG).exists()
    assert "| semantics | mergekit |" in text
    assert f"| {paths[0]} | per tensor: [0.2, 0.8] | 0.5 |" in text  # a gradient is shown as given
    assert f"| {paths[2]} | 1.0 | 1 |" in text  # mergekit's default density: keep all
    assert json.loads((out / "config.json").read_text())["model_type"] == "toy"  # the side files still come
    mk.update(merge_method="breadcrumbs", parameters={"gamma": 0.02})
    src.write_text(yaml.safe_dump(mk))
    res = CliRunner().invoke(main, ["merge", "--config", str(src), "-o", str(tmp_path / "bc"), "-q"])
    assert res.exit_code == 0, res.output
    assert f"| {paths[0]} | per tensor: [0.2, 0.8] | 0.5 (magnitude_outliers) |" in (tmp_path / "bc" / "README.md").read_text()


def test_base_without_a_card(tmp_path):
    _, _, base, paths = write_family(tmp_path / "fam", 2, seed=1)
    (Path(base) / "config.json").unlink()
    assert base_front_matter(Path(base)) == {}
    out = tmp_path / "out"
    merge(MergeConfig(base_model=str(base), models=[ModelEntry(model=str(p)) for p in paths]), out, progress=False)
    meta = front_matter((out / "README.md").read_text())
    assert "license" not in meta and "library_name" not in meta and meta["base_model"] == str(base)


@pytest.mark.parametrize("head", ["", "---\nlicense: [unclosed\n---\nbody", "---\n- a list\n---\n"])
def test_base_front_matter_that_is_not_a_mapping(tmp_path, head):
    (tmp_path / "README.md").write_text(head)
    assert base_front_matter(tmp_path) == {}


def test_federated_round_card(family, tmp_path, coordinator):  # noqa: F811
    base_dir = Path(family[0])
    (base_dir / "README.md").write_text(BASE_CARD)
    try:
        srv = coordinator()
        rnd = open_round(srv, options=MergeOptions(k=40, lam=1.5), weights=[0.5, 2.0, 1.0])
        for i, c in enumerate(CLIENTS):
            send(srv, "r1", c, family, i)
        assert rnd.wait_closed(60) and rnd.state == "finalized"
        out = rnd.spool.model_dir
        digests = {c: rnd.committed[c].sha256 for c in CLIENTS}
        _, text = check_card(out, CLIENTS)
        assert "federated TIES-Merging round `r1`" in text
        for c, w in zip(CLIENTS, ["0.5", "2", "1"]):
            assert f"| {c} | {w} | 0.4 | `{digests[c]}` |" in text
        assert rnd.merged.sha256 in text
        cfg = yaml.safe_load((out / ROUND_CONFIG).read_text())
        assert cfg["round_id"] == "r1" and cfg["options"]["lambda"] == 1.5
        assert [p["client_id"] for p in cfg["participants"]] == CLIENTS
        # a client's fetched model gets a card too, from the merged stream (contributors, options)
        got = tmp_path / "fetched"
        fetch(srv.target, "r1", "org-a", str(base_dir), got, timeout=60, retry=FAST, insecure=True)
        _, text = check_card(got, CLIENTS)
        assert "federated TIES-Merging round `r1`" in text and "| lambda | 1.5 |" in text
    finally:
        (base_dir / "README.md").unlink()
