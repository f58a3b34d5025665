"""The inputs people have: PyTorch pickle checkpoints (read weights-only and memory-mapped),
the architecture check, tied output heads, resized vocabularies and `--shard-size` in
Hugging Face's and mergekit's forms. Each bad input is a clear error that writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tests.helpers import make_model, random_family, write_family
from tiesfed.cli import main
from tiesfed.core.options import MergeConfig, ModelEntry
from tiesfed.engine import merge
from tiesfed.io.compat import architecture_differences, check_compatible, reconcile_tied
from tiesfed.io.model_io import ModelError, ModelReader, fingerprint
from tiesfed.io.shard_size import parse_shard_size

SPEC = {"embed.weight": (12, 4), "layer.weight": (4, 4), "lm_head.weight": (12, 4), "ids": ((3,), torch.int64)}


class NotATensor:
    pass


@pytest.mark.parametrize("text, want", [
    ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("5GiB", 5 * 2**30), ("512MiB", 2**29), ("1e9", 10**9),
    ("2.5e3", 2500), ("1000", 1000), ("5B", 5 * 10**9), ("5b", 5 * 10**9), ("500M", 500 * 10**6),
    ("10K", 10**4), ("2.5gb", 25 * 10**8), (7, 7),
])
def test_shard_size_forms(text, want):
    assert parse_shard_size(text) == want


@pytest.mark.parametrize("text", ["5G", "abc", "", "0", "-1GB", "GB", "5 GB x", "1e400", "0.1"])
def test_shard_size_refused(text):
    with pytest.raises(ValueError, match="not a size|at least 1 byte|too large"):
        parse_shard_size(text)


def test_shard_size_on_the_command_line(tmp_path):
    _, _, base, paths = write_family(tmp_path / "fam", 2, seed=2)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["merge", str(base), *map(str, paths), "-o", str(out), "--shard-size", "5G"])
    assert res.exit_code == 2 and "--shard-size" in res.output and "5GB, 500MB, 5GiB, 1e9" in res.output
    assert not out.exists()
    res = CliRunner().invoke(main, ["merge", str(base), *map(str, paths), "-o", str(out), "--shard-size", "1K",
                                    "-q"])
    assert res.exit_code == 0, res.output
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()  # 1K: mergekit's thousand bytes


# ----------------------------------------------------------------------------- pickle checkpoints


def test_bin_reads_like_safetensors(tmp_path):
    tensors = random_family(SPEC, 1, seed=0, dtype=torch.bfloat16)[0]
    st = make_model(tmp_path / "st", tensors)
    (tmp_path / "bin").mkdir()
    torch.save(tensors, tmp_path / "bin" / "pytorch_model.bin")
    torch.save(tensors, tmp_path / "single.bin")
    with ModelReader(st) as a, ModelReader(tmp_path / "bin") as b, ModelReader(tmp_path / "single.bin") as c:
        def rows(r):
            return sorted((i.name, i.shape, i.dtype) for i in r.manifest())

        assert rows(a) == rows(b) == rows(c)
        for n in a.names:
            assert torch.equal(a.get(n), b.get(n)) and torch.equal(a.get(n), c.get(n))
            assert torch.equal(a.get_range(n, 1, 3), b.get_range(n, 1, 3))
        assert fingerprint(a) == fingerprint(b) == fingerprint(c)  # content, not format
        got = b.get("layer.weight")
        got.add_(1.0)  # a fresh tensor: the checkpoint's mapping is not written through
        assert torch.equal(b.get("layer.weight"), a.get("layer.weight"))


@pytest.mark.parametrize("content, match", [
    ({"w": NotATensor()}, "needs code to load.*NotATensor"),
    ({"state_dict": {"w": torch.zeros(2)}, "optimizer": {}}, "a training checkpoint"),
    ({"w": torch.zeros(2), "step": 3}, "'step' is a int, not a tensor"),
    ([torch.zeros(2)], "holds a list, not a state dict"),
])
def test_bin_refused(tmp_path, content, match):
    torch.save(content, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelError, match=match):
        ModelReader(tmp_path)


def test_legacy_bin_is_read_whole_but_weights_only(tmp_path):
    w = torch.randn(3, 4)
    torch.save({"w": w}, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)  # torch < 1.6
    with ModelReader(tmp_path) as r:
        assert torch.equal(r.get("w"), w)
    torch.save({"w": NotATensor()}, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(ModelError, match="needs code"):
        ModelReader(tmp_path)


def test_bin_garbage_and_missing_shards(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    with pytest.raises(ModelError, match="not a PyTorch checkpoint"):
        ModelReader(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"w": "part1.bin"}}))
    with pytest.raises(ModelError, match="shard file.*missing: part1.bin"):
        ModelReader(tmp_path / "b")


def test_pickle_needing_code_is_never_run(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"w": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelError, match="needs code"):
        ModelReader(tmp_path)
    assert not marker.exists()


# ----------------------------------------------------------------------------- architecture, ties, vocabulary


def test_architecture_differences():
    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16, "vocab_size": 64}
    assert architecture_differences(llama, dict(llama)) == []
    assert architecture_differences(llama, {**llama, "vocab_size": 72}) == []  # left to the tensor check
    assert architecture_differences(llama, {"model_type": "llama"}) == []  # unset is no evidence
    diffs = architecture_differences(llama, {**llama, "model_type": "mistral", "hidden_size": 32})
    assert diffs == ["model_type: 'mistral', base has 'llama'", "hidden_size: 32, base has 16"]


def test_architecture_check_in_the_engine(tmp_path):
    _, _, base, paths = write_family(tmp_path / "fam", 1, seed=4)
    cfg = json.loads((paths[0].parent / "base" / "config.json").read_text())
    (paths[0] / "config.json").write_text(json.dumps({**cfg, "hidden_size": 32}))
    config = MergeConfig(base_model=str(base), models=[ModelEntry(model=str(paths[0]))])
    with pytest.raises(ModelError, match="hidden_size: 32, base has 16"):
        merge(config, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    merge(config, tmp_path / "out", progress=False, allow_architecture_mismatch=True)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_reconcile_tied(tmp_path):
    base_t, (ft_t,) = random_family(SPEC, 1, seed=1)
    ft_t["lm_head.weight"] = ft_t["embed.weight"].clone()
    tied_base = {n: t for n, t in base_t.items() if n != "lm_head.weight"}
    tied_ft = {n: t for n, t in ft_t.items() if n != "lm_head.weight"}
    # the fine-tune stores the tied copy, the base does not: left out
    with ModelReader(make_model(tmp_path / "b1", tied_base)) as b, ModelReader(make_model(tmp_path / "f1", ft_t)) as f:
        assert reconcile_tied(b, f) == ["'lm_head.weight': a tied copy of 'embed.weight', left out (the base stores "
                                        "it once)"]
        assert "lm_head.weight" not in f and f.names == b.names
        check_compatible(b, f)
    # the base stores both (equal), the fine-tune once: its head reads as its embeddings
    both = dict(tied_base, **{"lm_head.weight": tied_base["embed.weight"].clone()})
    with ModelReader(make_model(tmp_path / "b2", both)) as b, ModelReader(make_model(tmp_path / "f2", tied_ft)) as f:
        check_compatible(b, f)
        assert torch.equal(f.get("lm_head.weight"), tied_ft["embed.weight"])
        assert torch.equal(f.get_range("lm_head.weight", 2, 5), tied_ft["embed.weight"].reshape(-1)[2:5])
    # an untied base (head ≠ embeddings) and a fine-tune without a head: missing, as before
    with ModelReader(make_model(tmp_path / "b3", base_t)) as b, ModelReader(make_model(tmp_path / "f3", tied_ft)) as f:
        with pytest.raises(ModelError, match="'lm_head.weight': missing"):
            check_compatible(b, f)


def test_resized_rows_name_the_option(tmp_path):
    base_t, (ft_t,) = random_family(SPEC, 1, seed=2)
    ft_t["embed.weight"] = torch.randn(14, 4)
    with ModelReader(make_model(tmp_path / "b", base_t)) as b, ModelReader(make_model(tmp_path / "f", ft_t)) as f:
        with pytest.raises(ModelError, match=r"'embed.weight': shape \[14, 4\], base has \[12, 4\]: a resized "
                                             r"vocabulary .*--keep-base 'embed.weight'"):
            check_compatible(b, f)
        check_compatible(b, f, keep_base=("embed.*",))
    ft_t["layer.weight"] = torch.randn(4, 5)  # columns differ: not a vocabulary, no such advice
    with ModelReader(make_model(tmp_path / "b", base_t)) as b, ModelReader(make_model(tmp_path / "f2", ft_t)) as f:
        with pytest.raises(ModelError) as e:
            check_compatible(b, f, keep_base=("embed.*",))
        assert "'layer.weight': shape [4, 5], base has [4, 4]" in str(e.value) and "vocabulary" not in str(e.value)
