"""peft LoRA adapters as merge inputs (read as W0 + s·B·A, as `merge_and_unload()` builds
them) and as an output (`--lora-rank`: a truncated SVD of the merged ΔW that
`PeftModel.from_pretrained` loads), locally and on a federated client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tests.test_federated import CLIENTS, FAST  # noqa: E402
from tests.test_transformers_models import build, fine_tune  # noqa: E402
from tiesfed.cli import main  # noqa: E402
from tiesfed.client.federated import fetch  # noqa: E402
from tiesfed.coordinator.rounds import ParticipantConfig, RoundConfig  # noqa: E402
from tiesfed.coordinator.server import CoordinatorConfig, CoordinatorServer  # noqa: E402
from tiesfed.core.options import MergeConfig, MergeOptions, ModelEntry  # noqa: E402
from tiesfed.engine import merge  # noqa: E402
from tiesfed.io.lora import LoraReader  # noqa: E402
from tiesfed.io.model_io import ModelError, ModelReader, check_compatible  # noqa: E402

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj", "embed_tokens"], "gpt2": ["c_attn", "c_fc", "wte"]}


def adapter(base_model, folder: Path, seed: int, **cfg) -> Path:
    """A trained-looking adapter: peft's init (B = 0) with B (and an embedding's A) randomised, saved by peft."""
    kind = "gpt2" if base_model.config.model_type == "gpt2" else "llama"
    model = type(base_model)(base_model.config).to(next(base_model.parameters()).dtype).eval()
    model.load_state_dict(base_model.state_dict())
    opts = dict(r=4, lora_alpha=8, target_modules=TARGETS[kind], fan_in_fan_out=kind == "gpt2")
    pm = peft.get_peft_model(model, peft.LoraConfig(**{**opts, **cfg}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "lora_embedding_" in n:  # (an embedding's A starts at 0 in peft)
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(folder)
    return folder


def merged_and_unloaded(base: Path, ad: Path, cls, dtype: torch.dtype, out: Path) -> Path:
    """The reference: peft's own merge of the adapter into the base, saved by transformers."""
    model = peft.PeftModel.from_pretrained(cls.from_pretrained(base, dtype=dtype), ad).merge_and_unload()
    model.save_pretrained(out)
    return out


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    with ModelReader(folder) as r:
        return {n: r.get(n) for n in r.names}


@pytest.fixture(params=[("llama", torch.float32), ("llama", torch.bfloat16), ("gpt2", torch.float32)],
                ids=["llama-fp32", "llama-bf16", "gpt2-fp32"])
def family(request, tmp_path):
    kind, dtype = request.param
    model = build(kind, dtype)
    base = tmp_path / "base"
    model.save_pretrained(base)
    ads = [adapter(model, tmp_path / f"ad{i}", seed=i) for i in range(2)]
    ref = [merged_and_unloaded(base, a, type(model), dtype, tmp_path / f"ref{i}") for i, a in enumerate(ads)]
    full = tmp_path / "full"
    fine_tune(model, seed=7).save_pretrained(full)
    return model, base, ads, ref, full


def test_adapter_reads_as_its_merged_model(family):
    """Every tensor, whole and in flat blocks (one element, a row's edge, across rows), equals
    the `merge_and_unload()` model's bit for bit."""
    _, base, ads, ref, _ = family
    for ad, want in zip(ads, ref):
        want_t = tensors(want)
        with ModelReader(base) as b, ModelReader(ad) as a:
            assert isinstance(a, LoraReader) and a.modules
            check_compatible(b, a)
            assert set(a.names) == set(want_t)
            for n in a.names:
                got = a.get(n)
                assert got.dtype == want_t[n].dtype and torch.equal(got, want_t[n]), n
                flat, k = want_t[n].reshape(-1), want_t[n].numel()
                for lo, hi in {(0, 1), (k - 1, k), (3, min(k, 37)), (k // 3, k // 2 + 1), (5, k)}:
                    assert torch.equal(a.get_range(n, lo, hi), flat[lo:hi]), (n, lo, hi)
            assert sum(not torch.equal(a.get(n), b.get(n)) for n in a.modules) == len(a.modules)


@pytest.mark.parametrize("opts", [{"method": "ties", "k": 30}, {"method": "ties", "trim": "tensor", "k": 50},
                                  {"method": "task_arithmetic"}])
def test_merge_of_adapters_equals_merge_of_merged_models(family, tmp_path, opts):
    """Adapters (and a full fine-tune beside them) merge to exactly what their merge_and_unload()
    models merge to."""
    _, base, ads, ref, full = family

    def run(models: list[Path], out: Path) -> dict[str, torch.Tensor]:
        cfg = MergeConfig(base_model=str(base), models=[ModelEntry(model=str(m)) for m in models],
                          options=MergeOptions(**opts))
        merge(cfg, out, progress=False)
        return tensors(out)

    got = run([*ads, full], tmp_path / "from-adapters")
    want = run([*ref, full], tmp_path / "from-merged")
    assert set(got) == set(want)
    for n in want:
        assert got[n].dtype == want[n].dtype and torch.equal(got[n], want[n]), n
    assert any(not torch.equal(got[n], v) for n, v in tensors(base).items())  # the merge did something


def test_blockwise_merge_of_adapters(tmp_path):
    """Under a --max-memory that splits the targets into blocks (get_range: B[rows] @ A, a block
    starting and ending mid-row), adapters still merge to what their merged models do."""
    from tiesfed.engine.local import FIXED_BYTES

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=1100, intermediate_size=1100, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    base = tmp_path / "base"
    model.save_pretrained(base)
    ads = [adapter(model, tmp_path / f"ad{i}", seed=i, target_modules=["q_proj", "down_proj"]) for i in range(2)]
    ref = [merged_and_unloaded(base, a, type(model), torch.float32, tmp_path / f"ref{i}") for i, a in enumerate(ads)]
    budget = FIXED_BYTES + (30 << 20)
    # two models at k = 20 hold 24 + 12·0.4 bytes per element: a block of ~1.09M elements < 1100² = 1.21M
    assert (30 << 20) // (24 + 12 * 0.4) < 1100 * 1100

    def run(models: list[Path], out: Path) -> dict[str, torch.Tensor]:
        merge(MergeConfig(base_model=str(base), models=[ModelEntry(model=str(m)) for m in models]), out,
              progress=False, max_memory=budget)
        return tensors(out)

    got, want = run(ads, tmp_path / "a"), run(ref, tmp_path / "r")
    for n in want:
        assert torch.equal(got[n], want[n]), n
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"], tensors(base)[
        "model.layers.0.self_attn.q_proj.weight"])


def test_bin_adapter(tmp_path):
    """An adapter saved as adapter_model.bin (safe_serialization=False) reads the same."""
    model = build("llama")
    base = tmp_path / "base"
    model.save_pretrained(base)
    st = adapter(model, tmp_path / "st", seed=2)
    pt = tmp_path / "pt"
    pt.mkdir()
    (pt / "adapter_config.json").write_bytes((st / "adapter_config.json").read_bytes())
    from safetensors.torch import load_file
    torch.save(load_file(st / "adapter_model.safetensors"), pt / "adapter_model.bin")
    with ModelReader(base) as b, ModelReader(st) as a, ModelReader(pt) as c:
        check_compatible(b, a)
        check_compatible(b, c)
        assert a.modules and set(a.modules) == set(c.modules)
        for n in a.names:
            assert torch.equal(a.get(n), c.get(n)), n


@pytest.mark.parametrize("cfg", [{"use_rslora": True},
                                 {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"layers.1.self_attn.q_proj": 3}}])
def test_rslora_and_patterns(tmp_path, cfg):
    model = build("llama")
    base = tmp_path / "base"
    model.save_pretrained(base)
    ad = adapter(model, tmp_path / "ad", seed=3, **cfg)
    want = tensors(merged_and_unloaded(base, ad, type(model), torch.float32, tmp_path / "ref"))
    with ModelReader(base) as b, ModelReader(ad) as a:
        check_compatible(b, a)
        for n in a.names:
            assert torch.equal(a.get(n), want[n]), n


def test_lora_output_loads_in_peft(tmp_path):
    """--lora-rank writes an adapter peft loads: its merged weights are the merged ΔW's truncated
    SVD, and at full rank the merged model itself."""
    model = build("llama")
    base = tmp_path / "base"
    model.save_pretrained(base)
    ads = [adapter(model, tmp_path / f"ad{i}", seed=i) for i in range(2)]
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["merge", str(base), *map(str, ads), "-o", str(out), "-q", "--k", "40",
                                    "--lora-rank", "3"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["base_model_name_or_path"] == str(base)
    merged, theta0 = tensors(out), tensors(base)
    loaded = peft.PeftModel.from_pretrained(type(model).from_pretrained(base), out / "adapter")
    got = {k: v.detach() for k, v in loaded.merge_and_unload().state_dict().items()}
    targets = [n for n in theta0 if any(f".{t}." in n for t in TARGETS["llama"])]
    assert len(targets) == 2 * 3 + 1
    for n in theta0:
        if n not in targets:
            assert torch.equal(got[n], theta0[n]), n
            continue
        delta = (merged[n] - theta0[n]).double()
        if "embed" in n:
            delta = delta.T
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        want = (u[:, :3] * s[:3]) @ vh[:3]
        want = want.T if "embed" in n else want
        assert torch.allclose((got[n] - theta0[n]).double(), want, atol=2e-6), n
        assert s[3] > 1e-3  # rank 3 really truncates
    ids = loaded.generate(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert ids.shape == (1, 6)
    # full rank (16 ≥ every target's smaller side but the embedding's): the merged model back
    out2 = tmp_path / "out2"
    merge(MergeConfig(base_model=str(base), models=[ModelEntry(model=str(a)) for a in ads],
                      options=MergeOptions(k=40)), out2, progress=False, lora_rank=16, lora_out=tmp_path / "lora16")
    loaded = peft.PeftModel.from_pretrained(type(model).from_pretrained(base), tmp_path / "lora16")
    got = loaded.merge_and_unload().state_dict()
    for n in targets:
        assert torch.allclose(got[n], merged[n], atol=2e-6), n


def test_gpt2_lora_output(tmp_path):
    """fan_in_fan_out (Conv1D) targets and the tied embedding round-trip through the output adapter."""
    model = build("gpt2")
    base = tmp_path / "base"
    model.save_pretrained(base)
    ads = [adapter(model, tmp_path / f"ad{i}", seed=i) for i in range(2)]
    out = tmp_path / "out"
    merge(MergeConfig(base_model=str(base), models=[ModelEntry(model=str(a)) for a in ads],
                      options=MergeOptions(k=40)), out, progress=False, lora_rank=64)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    merged = tensors(out)
    loaded = peft.PeftModel.from_pretrained(type(model).from_pretrained(base), out / "adapter")
    got = loaded.merge_and_unload().state_dict()
    for n, want in merged.items():
        assert torch.allclose(got[n], want, atol=2e-6), n


def test_refusals_change_nothing(tmp_path):
    model = build("llama")
    base = tmp_path / "base"
    model.save_pretrained(base)
    good = adapter(model, tmp_path / "good", seed=1)
    cases = {
        "use_dora": adapter(model, tmp_path / "dora", seed=1, use_dora=True, target_modules=["q_proj"]),
        "bias='all'": adapter(model, tmp_path / "bias", seed=1, bias="all", target_modules=["q_proj"]),
    }
    other_cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1)
    cases["does not fit base"] = adapter(transformers.LlamaForCausalLM(other_cfg).eval(), tmp_path / "wide", seed=1)
    for match, ad in cases.items():
        out = tmp_path / f"out-{ad.name}"
        with pytest.raises(ModelError, match=match.replace("(", r"\(")):
            merge(MergeConfig(base_model=str(base), models=[ModelEntry(model=str(ad))]), out, progress=False)
        assert not out.exists() or not any(out.iterdir())
    with pytest.raises(ModelError, match="is a LoRA adapter"):
        merge(MergeConfig(base_model=str(good), models=[ModelEntry(model=str(good))]), tmp_path / "o", progress=False)
    full = tmp_path / "full"
    fine_tune(model, 5).save_pretrained(full)
    res = CliRunner().invoke(main, ["merge", str(base), str(full), "-o", str(tmp_path / "o2"), "-q",
                                    "--lora-rank", "4"])
    assert res.exit_code != 0 and "needs at least one LoRA adapter input" in res.output
    assert not (tmp_path / "o2").exists() or not any((tmp_path / "o2").iterdir())
    with ModelReader(good) as a, pytest.raises(ModelError, match="reads as a model only over its base"):
        a.get("model.layers.0.self_attn.q_proj.weight")


def test_federated_client_submits_an_adapter(tmp_path):
    """`tiesfed client submit BASE ADAPTER_DIR` in a real round: the merge equals the local merge
    of the merge_and_unload() models."""
    model = build("llama")
    base = tmp_path / "base"
    model.save_pretrained(base)
    ads = [adapter(model, tmp_path / f"ad{i}", seed=i) for i in range(2)]
    full = tmp_path / "full"
    fine_tune(model, 7).save_pretrained(full)
    inputs = [*ads, full]
    ref = [merged_and_unloaded(base, a, type(model), torch.float32, tmp_path / f"ref{i}") for i, a in enumerate(ads)]
    opts = MergeOptions(k=30)
    srv = CoordinatorServer(CoordinatorConfig(listen="127.0.0.1:0", spool_dir=tmp_path / "spool",
                                              base_model=str(base), aggregator="local", insecure=True)).start()
    try:
        rnd = srv.manager.open_round(RoundConfig(round_id="r1", options=opts,
                                                 participants=[ParticipantConfig(client_id=c) for c in CLIENTS]))
        runner = CliRunner()
        for c, m in zip(CLIENTS, inputs):
            res = runner.invoke(main, ["client", "submit", str(base), str(m), "--target", srv.target, "--round", "r1",
                                       "--client-id", c, "-q", "--insecure"])
            assert res.exit_code == 0, res.output
        assert rnd.wait_closed(60) and rnd.state == "finalized"
        got = tmp_path / "fetched"
        fetch(srv.target, "r1", "org-a", str(base), got, timeout=60, retry=FAST, insecure=True)
    finally:
        srv.stop(grace=0)
    want = tmp_path / "local"
    merge(MergeConfig(base_model=str(base), models=[ModelEntry(model=str(m)) for m in [*ref, full]], options=opts),
          want, progress=False)
    got_t, want_t = tensors(got), tensors(want)
    for n in want_t:
        assert torch.equal(got_t[n], want_t[n]), n
