"""tiesfed.io.model_io: readers, compatibility, fingerprints, the streaming writer."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import make_model, random_family
from tiesfed.io.model_io import (
    INDEX_FILE,
    ModelError,
    ModelReader,
    ShardedWriter,
    TensorInfo,
    check_compatible,
    copy_side_files,
    fingerprint,
)


def toy_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "embed.weight": torch.randn(16, 8, generator=g),
        "layers.0.attn.weight": torch.randn(8, 8, generator=g).to(torch.float16),
        "layers.0.mlp.weight": torch.randn(8, 24, generator=g).to(torch.bfloat16),
        "layers.1.attn.weight": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "position_ids": torch.arange(12, dtype=torch.int64).reshape(1, 12),
        "norm.weight": torch.randn(8, generator=g),
        "scale": torch.tensor(0.5),
    }


def assert_same(a: dict, b: dict) -> None:
    assert list(sorted(a)) == list(sorted(b))
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- reader


@pytest.mark.parametrize("layout", ["single", "sharded", "lone_file", "lone_in_folder"])
def test_reader_layouts(tmp_path, layout):
    t = toy_tensors()
    if layout == "single":
        path = make_model(tmp_path / "m", t, config={"model_type": "toy"})
        folder = path
    elif layout == "sharded":
        path = make_model(tmp_path / "m", t, shards=3)
        folder = path
        assert len(list(path.glob("model-*-of-00003.safetensors"))) == 3
    elif layout == "lone_file":
        folder = tmp_path / "m"
        folder.mkdir()
        path = folder / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in t.items()}, str(path))
    else:
        folder = path = tmp_path / "m"
        folder.mkdir()
        save_file({k: v.contiguous() for k, v in t.items()}, str(folder / "adapter.safetensors"))

    with ModelReader(path) as r:
        assert r.path == path
        assert r.folder == folder
        assert sorted(r.names) == sorted(t)
        assert len(r.manifest()) == len(t)
        assert [i.name for i in r.manifest()] == r.names
        for n, v in t.items():
            i = r.info(n)
            assert isinstance(i, TensorInfo)
            assert i.shape == tuple(v.shape) and i.dtype == v.dtype
            assert i.numel == v.numel() and i.nbytes == v.numel() * v.element_size()
            assert i.file.parent == folder
            got = r.get(n)
            assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v)
            got = r.get(n, mmap=True)
            assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v)
        assert r.info("layers.0.mlp.weight").is_float
        assert r.info("layers.0.attn.weight").is_float
        assert not r.info("position_ids").is_float
        assert r.total_float_params == sum(v.numel() for v in t.values() if v.is_floating_point())
        with pytest.raises(ModelError, match=r"'nope'.*" + str(path.name)):
            r.info("nope")
        with pytest.raises(ModelError, match="nope"):
            r.get("nope")


def test_reader_order_is_shard_then_offset(tmp_path):
    t = toy_tensors()
    path = make_model(tmp_path / "m", t, shards=3)
    with ModelReader(path) as r:
        files = [r.info(n).file.name for n in r.names]
        assert files == sorted(files)
        for f in set(files):
            offs = [r.byte_range(n)[1] for n in r.names if r.info(n).file.name == f]
            assert offs == sorted(offs)
        names1 = list(r.names)
    with ModelReader(path) as r:
        assert r.names == names1  # stable


def test_reader_bad_paths(tmp_path):
    with pytest.raises(ModelError, match="no such"):
        ModelReader(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="no .safetensors"):
        ModelReader(empty)
    binonly = tmp_path / "bin"
    binonly.mkdir()
    (binonly / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="pytorch_model.bin"):
        ModelReader(binonly)
    two = tmp_path / "two"
    two.mkdir()
    for n in ("a", "b"):
        save_file({"x": torch.zeros(2)}, str(two / f"{n}.safetensors"))
    with pytest.raises(ModelError, match="2 .safetensors files"):
        ModelReader(two)
    txt = tmp_path / "x.txt"
    txt.write_text("hi")
    with pytest.raises(ModelError, match="not a .safetensors"):
        ModelReader(txt)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(ModelError, match="not JSON"):
        ModelReader(bad)
    # truncated data region
    good = tmp_path / "trunc.safetensors"
    save_file({"x": torch.zeros(100)}, str(good))
    good.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(ModelError, match="'x'"):
        ModelReader(good)
    # index naming a missing shard
    sh = make_model(tmp_path / "sh", toy_tensors(), shards=3)
    (sh / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ModelError, match="model-00002-of-00003"):
        ModelReader(sh)


# ----------------------------------------------------------------------------- compatibility


def test_check_compatible(tmp_path):
    base_t, (ft,) = random_family(
        {"a": (4, 4), "b": (8,), "c.lm_head": (3, 4), "ids": ((5,), torch.int64)}, 1, seed=0, dtype=torch.bfloat16
    )
    base = make_model(tmp_path / "base", base_t)
    same = make_model(tmp_path / "same", {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in ft.items()},
                      shards=2)
    with ModelReader(base) as b, ModelReader(same) as o:
        check_compatible(b, o)  # bf16 vs fp32 is fine; sharding is irrelevant

    bad_t = dict(ft)
    del bad_t["a"]
    bad_t["b"] = torch.zeros(9, dtype=torch.bfloat16)
    bad_t["extra"] = torch.zeros(2)
    bad_t["c.lm_head"] = torch.zeros(3, 5, dtype=torch.bfloat16)
    bad_t["ids"] = torch.zeros(5)  # int -> float: dtype class changed
    bad = make_model(tmp_path / "bad", bad_t)
    with ModelReader(base) as b, ModelReader(bad) as o:
        with pytest.raises(ModelError) as ei:
            check_compatible(b, o)
        msg = str(ei.value)
        assert str(bad) in msg
        for frag in ("'a': missing", "'b': shape [9]", "'extra': not in the base", "'c.lm_head': shape", "'ids': dtype F32"):
            assert frag in msg, (frag, msg)
        assert "5 problem" in msg
        with pytest.raises(ModelError) as ei:
            check_compatible(b, o, keep_base=["c.*", "ids"])
        msg = str(ei.value)
        assert "c.lm_head" not in msg and "'ids'" not in msg and "'a': missing" in msg
        check_compatible(b, o, keep_base=["a", "b", "extra", "c.*", "ids"])


def test_check_compatible_caps_list(tmp_path):
    base = make_model(tmp_path / "base", {f"t{i}": torch.zeros(2) for i in range(30)})
    other = make_model(tmp_path / "o", {f"t{i}": torch.zeros(3) for i in range(30)})
    with ModelReader(base) as b, ModelReader(other) as o:
        with pytest.raises(ModelError, match=r"30 problem.*and 10 more"):
            try:
                check_compatible(b, o)
            except ModelError as e:
                assert str(e).count("shape [3]") == 20
                raise ModelError(str(e).replace("\n", " "))


# ----------------------------------------------------------------------------- fingerprint


def test_fingerprint(tmp_path):
    t = toy_tensors()
    def fp(p):  # an odd chunk size exercises chunking
        return fingerprint(ModelReader(p), chunk_bytes=37)

    f1 = fp(make_model(tmp_path / "one", t))
    assert f1.startswith("sha256:") and len(f1) == 7 + 64
    assert fp(make_model(tmp_path / "one_again", t, metadata={"x": "y"})) == f1  # stable, metadata-blind
    assert fp(make_model(tmp_path / "three", t, shards=3)) == f1  # sharding-blind
    assert fingerprint(ModelReader(tmp_path / "three")) == f1  # chunk size irrelevant
    assert fp(make_model(tmp_path / "rev", dict(reversed(list(t.items()))))) == f1  # order-blind

    # one flipped byte in the data region
    p = make_model(tmp_path / "byte", t, shards=3)
    with ModelReader(p) as r:
        f, b, e = r.byte_range("layers.0.mlp.weight")
    raw = bytearray(f.read_bytes())
    raw[b + 5] ^= 1
    f.write_bytes(bytes(raw))
    assert fp(p) != f1

    renamed = dict(t)
    renamed["norm.weight2"] = renamed.pop("norm.weight")
    assert fp(make_model(tmp_path / "name", renamed)) != f1
    retyped = dict(t)
    retyped["layers.0.attn.weight"] = t["layers.0.attn.weight"].view(torch.bfloat16)  # same bytes, other dtype
    assert fp(make_model(tmp_path / "dtype", retyped)) != f1
    reshaped = dict(t)
    reshaped["embed.weight"] = t["embed.weight"].reshape(8, 16)  # same bytes, other shape
    assert fp(make_model(tmp_path / "shape", reshaped)) != f1


# ----------------------------------------------------------------------------- writer


def _plan(t):
    return [(n, tuple(v.shape), v.dtype) for n, v in t.items()]


@pytest.mark.parametrize("max_bytes", [1 << 30, 600, 300, 64, 1])
def test_writer_round_trip(tmp_path, max_bytes):
    t = toy_tensors()
    out = tmp_path / "out"
    with ShardedWriter(out, _plan(t), max_shard_bytes=max_bytes, metadata={"merge": "ties"}) as w:
        for n, v in t.items():
            w.write(n, v)
    files = sorted(p.name for p in out.iterdir())
    assert not [f for f in files if f.startswith(".")], files  # no temp files left
    sizes = {n: v.numel() * v.element_size() for n, v in t.items()}
    if max_bytes == 1 << 30:
        assert files == ["model.safetensors"]
        assert_same(load_file(str(out / "model.safetensors")), t)
    else:
        index = json.loads((out / INDEX_FILE).read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert files == sorted(shards + [INDEX_FILE])
        assert index["metadata"]["total_size"] == sum(sizes.values())
        assert set(index["weight_map"]) == set(t)
        loaded = {}
        for s in shards:
            part = load_file(str(out / s))
            assert {n for n, f in index["weight_map"].items() if f == s} == set(part)
            # greedy packing: a shard exceeds the limit only when it holds one tensor
            assert sum(sizes[n] for n in part) <= max_bytes or len(part) == 1
            loaded.update(part)
        assert_same(loaded, t)
        if max_bytes == 1:
            assert len(shards) == len(t)
            assert shards[0] == f"model-00001-of-{len(t):05d}.safetensors"
    with ModelReader(out) as r:
        assert r.metadata == {"format": "pt", "merge": "ties"}
        assert_same({n: r.get(n) for n in r.names}, t)
        assert fingerprint(r) == fingerprint(ModelReader(make_model(tmp_path / "ref", t)))


def test_writer_big_tensor_own_shard(tmp_path):
    t = {"a": torch.ones(10), "big": torch.arange(100, dtype=torch.float32), "b": torch.ones(10), "c": torch.ones(5)}
    out = tmp_path / "o"
    with ShardedWriter(out, _plan(t), max_shard_bytes=100) as w:
        for n, v in t.items():
            w.write(n, v)
    wm = json.loads((out / INDEX_FILE).read_text())["weight_map"]
    assert wm == {
        "a": "model-00001-of-00003.safetensors",
        "big": "model-00002-of-00003.safetensors",
        "b": "model-00003-of-00003.safetensors",
        "c": "model-00003-of-00003.safetensors",
    }
    assert torch.equal(load_file(str(out / wm["big"]))["big"], t["big"])


def test_writer_alignment_and_mixed_dtypes(tmp_path):
    # a 3-byte uint8 tensor planned before fp32/int64: data still lands aligned
    t = {"u": torch.tensor([1, 2, 3], dtype=torch.uint8), "f": torch.randn(5), "i": torch.arange(3),
         "h": torch.randn(3).to(torch.bfloat16), "flag": torch.tensor([True, False])}
    out = tmp_path / "o"
    with ShardedWriter(out, _plan(t)) as w:
        for n, v in t.items():
            w.write(n, v)
    with ModelReader(out) as r:
        for n in r.names:
            _, b, _ = r.byte_range(n)
            assert b % r.get(n).element_size() == 0
        assert_same({n: r.get(n) for n in r.names}, t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_writer_patch(tmp_path, dtype):
    base = torch.arange(40, dtype=torch.float32).reshape(5, 8).to(dtype)
    other = torch.ones(7, dtype=dtype)
    plan = [("x", (5, 8), dtype), ("y", (7,), dtype)]
    out = tmp_path / "o"
    with ShardedWriter(out, plan, max_shard_bytes=base.numel() * base.element_size()) as w:
        w.write("x", base)
        idx = torch.tensor([0, 3, 39, 17])
        vals = torch.tensor([-1.5, 2.25, 100.0, 7.0], dtype=torch.float64)  # cast to the tensor dtype
        w.patch("x", idx, vals)
        w.write("y", other)
        w.patch("x", torch.tensor([1]), torch.tensor([9.0]))  # after later writes, too
        w.patch("y", torch.tensor([2, 4]), torch.tensor(-3.0))  # one value broadcasts
        w.patch("y", torch.tensor([], dtype=torch.int64), torch.tensor([]))
        with pytest.raises(ModelError, match="out of range"):
            w.patch("x", torch.tensor([40]), torch.tensor([1.0]))
        with pytest.raises(ModelError, match="2 indices but 3 values"):
            w.patch("x", torch.tensor([0, 1]), torch.tensor([1.0, 2.0, 3.0]))
    want = base.reshape(-1).clone()
    want[idx] = vals.to(dtype)
    want[1] = 9
    want_y = other.clone()
    want_y[[2, 4]] = -3
    with ModelReader(out) as r:
        assert len(r.files) == 2
        assert torch.equal(r.get("x"), want.reshape(5, 8))
        assert torch.equal(r.get("y"), want_y)


def test_writer_errors(tmp_path):
    plan = [("a", (2, 3), torch.float32), ("b", (4,), torch.bfloat16)]
    out = tmp_path / "o"
    w = ShardedWriter(out, plan)
    with pytest.raises(ModelError, match="'b' is out of plan order.*'a'"):
        w.write("b", torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(ModelError, match="'zz' is not in the plan"):
        w.write("zz", torch.zeros(4))
    with pytest.raises(ModelError, match=r"shape \[3, 2\]"):
        w.write("a", torch.zeros(3, 2))
    with pytest.raises(ModelError, match="dtype"):
        w.write("a", torch.zeros(2, 3, dtype=torch.float16))
    with pytest.raises(ModelError, match="patch before write"):
        w.patch("b", torch.tensor([0]), torch.tensor([1.0]))
    w.write("a", torch.zeros(2, 3).t().contiguous().t())  # non-contiguous input is fine
    with pytest.raises(ModelError, match="never written.*'b'"):
        w.close()
    w.write("b", torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(ModelError, match="already written"):
        w.write("b", torch.zeros(4, dtype=torch.bfloat16))
    assert [p.name for p in w.close()] == ["model.safetensors"]
    with pytest.raises(ModelError, match="closed"):
        w.write("a", torch.zeros(2, 3))

    # an out_dir with a model in it is refused unless overwrite=True
    with pytest.raises(ModelError, match="already holds"):
        ShardedWriter(out, plan)
    with ShardedWriter(out, [("c", (1,), torch.float32), ("d", (1,), torch.float32)], max_shard_bytes=4,
                       overwrite=True) as w2:
        w2.write("c", torch.ones(1))
        w2.write("d", torch.ones(1))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [INDEX_FILE, "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])

    with pytest.raises(ModelError, match="twice"):
        ShardedWriter(tmp_path / "dup", [("a", (1,), torch.float32)] * 2)


def test_writer_crash_leaves_nothing(tmp_path):
    out = tmp_path / "o"
    plan = [("a", (4,), torch.float32), ("b", (4,), torch.float32)]
    with pytest.raises(RuntimeError):
        with ShardedWriter(out, plan, max_shard_bytes=16) as w:
            w.write("a", torch.ones(4))
            raise RuntimeError("boom")
    assert list(out.iterdir()) == []
    # missing tensors at a clean exit: error and nothing left behind
    with pytest.raises(ModelError, match="never written"):
        with ShardedWriter(out, plan) as w:
            w.write("a", torch.ones(4))
    assert list(out.iterdir()) == []


# ----------------------------------------------------------------------------- side files


def test_copy_side_files(tmp_path):
    src = make_model(tmp_path / "src", toy_tensors(), shards=2, config={"model_type": "toy"})
    for n in ("generation_config.json", "special_tokens_map.json", "tokenizer_config.json", "README.md",
              "tokenizer.model", "vocab.json", "merges.txt"):
        (src / n).write_text(n)
    for n in ("pytorch_model.bin", "pytorch_model.bin.index.json", "optimizer.pt", "flax_model.msgpack",
              "tf_model.h5", "x.ckpt", "y.pth"):
        (src / n).write_text("weights")
    (src / "sub").mkdir()
    (src / "sub" / "f.txt").write_text("nested")
    (src / "link.json").symlink_to(src / "config.json")
    out = tmp_path / "out"
    got = copy_side_files(src, out)
    want = sorted(["config.json", "tokenizer.json", "generation_config.json", "special_tokens_map.json",
                   "tokenizer_config.json", "README.md", "tokenizer.model", "vocab.json", "merges.txt", "link.json"])
    assert got == want
    assert sorted(p.name for p in out.iterdir()) == want
    assert not (out / "link.json").is_symlink()
    assert (out / "config.json").read_text() == (src / "config.json").read_text()


def test_random_family_conflicts():
    base, tuned = random_family({"w": (64, 32), "ids": ((4,), torch.int64)}, 3, seed=7, dtype=torch.bfloat16)
    again, tuned2 = random_family({"w": (64, 32), "ids": ((4,), torch.int64)}, 3, seed=7, dtype=torch.bfloat16)
    assert torch.equal(base["w"], again["w"]) and torch.equal(tuned[2]["w"], tuned2[2]["w"])
    assert base["w"].dtype == torch.bfloat16 and base["ids"].dtype == torch.int64
    taus = [m["w"].float() - base["w"].float() for m in tuned]
    assert all(torch.equal(m["ids"], base["ids"]) for m in tuned)
    conflict = (torch.sign(taus[0]) != torch.sign(taus[1])).float().mean()
    assert 0.2 < conflict < 0.8
    assert (torch.sign(taus[0]) == torch.sign(taus[2])).float().mean() > 0.6
