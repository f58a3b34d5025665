"""The top-k budget of a federated round, with the paper's ties at the threshold.

A global top-k trim keeps |τ| ≥ t, t the int(n·k)-th largest |τ|: every tie at t
survives. bfloat16 task vectors of a few ulps take few distinct values, so far more
than int(n·k) survive; the contribution declares t in its header and the coordinator
checks every value against it and bounds the values strictly above it by int(n·k).
Real gRPC on loopback, the in-process coordinator, a bfloat16 model family (this
module's `family`, which the imported `coordinator` fixture serves).
"""

from __future__ import annotations

import grpc
import pytest
import torch

from tests.helpers import write_family
from tests.test_federated import (  # noqa: F401
    CLIENTS,
    FAST,
    assert_identical,
    contribution_bytes,
    coordinator,
    fetch_model,
    local_model,
    open_round,
    raw_upload,
    rejected,
    send,
)
from tiesfed.client.contribution import contribution_threshold, iter_contribution
from tiesfed.core.methods import get_method
from tiesfed.core.options import MergeOptions
from tiesfed.core.trim import keep_count
from tiesfed.io.model_io import ModelReader, fingerprint
from tiesfed.protos.codec import SparseTensor, read_stream

#: ~53k parameters: enough ties for more than the old slack (1% + 1024) over int(n·k).
SPEC = {
    "embed.weight": (256, 64),
    "layers.0.attn.q.weight": (64, 64),
    "layers.0.mlp.up.weight": (256, 64),
    "layers.0.norm.weight": (64,),
    "lm_head.weight": (256, 64),
    "position_ids": ((1, 32), torch.int64),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A bfloat16 base (N(0, 1)) and four fine-tunes 0.01·N(0, 1) away: a few bf16 ulps."""
    _, _, base_dir, paths = write_family(tmp_path_factory.mktemp("bf16family"), 4, seed=11,
                                         dtype=torch.bfloat16, base_shards=2, spec=SPEC)
    with ModelReader(base_dir) as r:
        fp = fingerprint(r)
    return base_dir, paths, fp


def honest(family, model: int, options: MergeOptions = MergeOptions()) -> tuple[float, int, int]:
    """(declared threshold, nonzeros, values strictly above it) of a client's contribution."""
    trim = get_method(options.method).trim_spec(options)
    with ModelReader(family[0]) as b, ModelReader(family[1][model]) as ft:
        t = contribution_threshold(b, ft, trim)
        ts = list(iter_contribution(b, ft, trim, model_key=str(model), threshold=t))
    above = sum(int((s.values.abs() > torch.tensor(t).to(s.values.dtype)).sum()) for s in ts)
    return t, sum(s.nnz for s in ts), above


def test_the_family_has_ties_beyond_the_old_slack(family):
    """The premise: honest survivors exceed the old budget, those strictly above t do not."""
    with ModelReader(family[0]) as r:
        assert {r.get(n).dtype for n in r.names if n != "position_ids"} == {torch.bfloat16}
    total = sum(torch.Size(s).numel() for n, s in SPEC.items() if n != "position_ids")
    k = keep_count(total, 0.2)
    for m in range(3):
        t, nnz, above = honest(family, m)
        assert t > 0 and nnz > int(k * 1.01) + 1024 and above <= k


@pytest.mark.parametrize(
    "opts",
    [{}, {"k": 10, "value_dtype": "float16", "lam": 1.3}, {"trim": "tensor", "k": 30}, {"value_dtype": "float32"}],
    ids=["paper-defaults", "k10-fp16-values", "tensor-scope", "fp32-values"],
)
def test_bf16_family_merges_federated_like_local(family, tmp_path, coordinator, opts):
    """Every client's upload is accepted, the merge is the local engine's bit for bit, and
    each committed stream declares the threshold the local engine kept at."""
    options = MergeOptions(**opts)
    srv = coordinator()
    rnd = open_round(srv, options=options)
    results = [send(srv, "r1", c, family, i) for i, c in enumerate(CLIENTS)]
    assert rnd.wait_closed(60) and rnd.state == "finalized"
    assert_identical(fetch_model(srv, family, tmp_path), local_model(family, tmp_path, [0, 1, 2], options))
    if options.trim == "global":
        for i, (c, res) in enumerate(zip(CLIENTS, results)):
            with open(rnd.committed[c].path, "rb") as f:
                header, _ = read_stream(f)
            t, nnz, _ = honest(family, i, options)
            assert header["threshold"] == t == res.stats.threshold and res.nnz == nnz
            assert nnz > keep_count(rnd.total, options.k / 100)  # ties kept, as the paper keeps them
    else:
        assert all(r.stats.threshold is None for r in results)


def test_threshold_rules_refuse_and_change_nothing(family, tmp_path, coordinator):
    """A missing or malformed threshold, a value below it, and more than int(n·k) values above
    it are each refused, naming the problem; the round is as if they never came."""
    srv = coordinator()
    rnd = open_round(srv)
    send(srv, "r1", "org-b", family, 1)
    t, nnz, above = honest(family, 0)
    assert above <= keep_count(rnd.total, 0.2) < nnz  # so declaring t / 2 puts all of them above

    def below_in_last(ts: list[SparseTensor]) -> list[SparseTensor]:
        """One value of the last tensor far below the threshold (after the others folded)."""
        last = ts[-1]
        vals = last.values.clone()
        vals[0] = torch.sign(vals[0]) * 1e-6
        return ts[:-1] + [SparseTensor(last.name, last.shape, last.indices, vals)]

    cases = [
        ({"header": {"threshold": None}}, "does not declare its trim threshold"),
        ({"header": {"threshold": -0.5}}, "declares trim threshold -0.5"),
        ({"header": {"threshold": "0.01"}}, "declares trim threshold '0.01'"),
        ({"header": {"threshold": True}}, "declares trim threshold True"),
        ({"mutate": below_in_last}, "value below the declared trim threshold"),
        ({"header": {"threshold": lambda v: v / 2}}, "values above its declared threshold"),
        ({"header": {"threshold": 0.0}}, "over the budget of topk trim at 20%"),
    ]
    for kw, match in cases:
        rejected(srv, rnd, contribution_bytes(family, 0, **kw), grpc.StatusCode.INVALID_ARGUMENT, match, chunk=300)
    assert [e.kind for e in rnd.events].count("UPLOAD_REJECTED") == len(cases)
    # the honest ones still go in, and the merge is the local engine's
    send(srv, "r1", "org-a", family, 0)
    send(srv, "r1", "org-c", family, 2)
    assert_identical(fetch_model(srv, family, tmp_path), local_model(family, tmp_path, [0, 1, 2]))


def test_tensor_scope_keeps_exactly_int_kn_per_tensor(family, coordinator):
    """Tensor-scope top-k: a tensor with more than int(k·n) nonzeros is refused at that tensor."""
    srv = coordinator()
    rnd = open_round(srv, options=MergeOptions(k=20, trim="tensor"))
    want = get_method("ties").trim_spec(MergeOptions(k=20, trim="tensor"))
    as_tensor_k20 = {"kind": want.kind, "fraction": want.fraction, "scope": want.scope, "seed": want.seed}
    data = contribution_bytes(family, 0, options=MergeOptions(k=100), header={"trim": as_tensor_k20})
    rejected(srv, rnd, data, grpc.StatusCode.INVALID_ARGUMENT, "over the budget of topk trim at 20% per tensor")
    # the honest one fits exactly
    assert raw_upload(srv, "r1", "org-a", contribution_bytes(family, 0, options=MergeOptions(k=20, trim="tensor")))
