"""Span records in real rounds (issue 14): clients that send large tensors as span
records, each with its own block size, merge bit for bit like the local engine (and so
like whole-tensor uploads); span records out of order, with gaps, overlaps or
duplicates, or a tensor left unfinished, are refused and leave the round as it was;
span records taken while the aggregator starts are folded once it is up."""

from __future__ import annotations

import io

import grpc
import pytest
import torch

from tests.test_fast_federated import GatedFactory, gated_server, wait_until
from tests.test_federated import (  # noqa: F401  (coordinator, family: the fixtures)
    CLIENTS,
    FAST,
    assert_identical,
    contribution_bytes,
    coordinator,
    family,
    fetch_model,
    load_folder,
    local_model,
    open_round,
    rejected,
)
from tiesfed.client.federated import submit
from tiesfed.core.options import MergeOptions
from tiesfed.protos.codec import SparseTensor, read_stream

#: elements per record for each client: many spans, a few, none (the toy's largest tensor has 1,536)
BLOCKS = [100, 700, None]


def spans_of(t: SparseTensor, block: int) -> list[SparseTensor]:
    """`t` as span records of `block` elements (a whole record where it fits)."""
    if t.numel <= block:
        return [t]
    out = []
    for lo in range(0, t.numel, block):
        hi = min(lo + block, t.numel)
        a, b = (int(x) for x in torch.searchsorted(t.indices, torch.tensor([lo, hi])))
        out.append(SparseTensor(t.name, t.shape, t.indices[a:b], t.values[a:b], lo, hi - lo))
    return out


def span_records(path) -> int:
    with open(path, "rb") as f:
        return sum(t.is_span for t in read_stream(f, spans=True)[1])


@pytest.mark.parametrize("opts, weights", [
    ({}, None),
    ({"trim": "tensor", "k": 30}, None),
    ({"method": "average"}, [0.5, 2.0, 1.0]),  # divides by the total weight: counted once per tensor
    ({"method": "dare_ties", "k": 50, "seed": 3}, None),
    ({"disjoint": "max"}, None),  # folds at commit
    ({"election": "count"}, [0.3, 1.7, 1.1]),  # folds in model order at the end
], ids=["paper-defaults", "tensor-topk", "average-weighted", "dare", "dis-max", "weighted-inexact"])
def test_span_uploads_merge_like_the_engine(family, tmp_path, coordinator, opts, weights):
    srv = coordinator()
    options = MergeOptions(**opts)
    rnd = open_round(srv, options=options, weights=weights)
    for i, c in enumerate(CLIENTS):
        res = submit(srv.target, "r1", c, family[0], family[1][i], retry=FAST, insecure=True, chunk_bytes=700,
                     block=BLOCKS[i])
        assert not res.duplicate
    assert rnd.wait_closed(60) and rnd.state == "finalized", rnd.message
    assert [span_records(rnd.committed[c].path) > 0 for c in CLIENTS] == [True, True, False]
    want = local_model(family, tmp_path, [0, 1, 2], options, weights)
    assert_identical(fetch_model(srv, family, tmp_path), want)
    assert_identical(load_folder(rnd.spool.model_dir), want)


def _bad(records: list[SparseTensor], case: str) -> list[SparseTensor]:
    """An honest span contribution with its spans of the embedding spoiled as `case` says."""
    at = [i for i, t in enumerate(records) if t.name == "embed.weight"]
    first, last = at[0], at[-1]
    r = list(records)
    if case == "gap":
        del r[first + 2]
    elif case == "overlap":
        a = r[first + 1]  # starts 10 elements early: a valid record over ones already covered
        r[first + 1] = SparseTensor(a.name, a.shape, a.indices, a.values, a.start - 10, a.count + 10)
    elif case == "duplicate":
        r.insert(first + 2, r[first + 1])
    elif case == "out-of-order":
        r[first + 1], r[first + 2] = r[first + 2], r[first + 1]
    elif case == "interleaved":
        r.insert(first + 1, r.pop(last + 1))
    elif case == "unfinished":
        del r[last]
    elif case == "late-start":
        del r[first]
    return r


@pytest.mark.parametrize("case, match", [
    ("gap", "leaves a gap"),
    ("overlap", "overlaps elements already covered"),
    ("duplicate", "overlaps elements already covered"),
    ("out-of-order", "leaves a gap"),
    ("interleaved", "records must cover it in order"),
    ("unfinished", "the next record is of tensor"),
    ("late-start", "not 0"),
])
def test_bad_span_orders_are_refused_and_change_nothing(family, tmp_path, coordinator, case, match):
    srv = coordinator()
    rnd = open_round(srv)
    submit(srv.target, "r1", CLIENTS[1], family[0], family[1][1], retry=FAST, insecure=True, block=300)
    honest = contribution_bytes(family, 0, mutate=lambda ts: [s for t in ts for s in spans_of(t, 100)])
    _, tensors = read_stream(io.BytesIO(honest), spans=True)
    assert sum(t.is_span for t in tensors) > 10
    data = contribution_bytes(family, 0, mutate=lambda ts: _bad([s for t in ts for s in spans_of(t, 100)], case))
    rejected(srv, rnd, data, grpc.StatusCode.INVALID_ARGUMENT, match, chunk=512)
    # the honest one is taken afterwards, and the round merges as the engine does
    submit(srv.target, "r1", CLIENTS[0], family[0], family[1][0], retry=FAST, insecure=True, block=100)
    submit(srv.target, "r1", CLIENTS[2], family[0], family[1][2], retry=FAST, insecure=True)
    assert rnd.wait_closed(60) and rnd.state == "finalized", rnd.message
    assert_identical(fetch_model(srv, family, tmp_path), local_model(family, tmp_path, [0, 1, 2]))


def test_a_tensor_left_unfinished_at_the_end_is_refused(family, coordinator):
    srv = coordinator()
    rnd = open_round(srv)

    def cut_last(ts):
        out = [s for t in ts for s in spans_of(t, 100)]
        return out[:-1]  # the last tensor (lm_head) loses its last span

    data = contribution_bytes(family, 0, mutate=cut_last)
    rejected(srv, rnd, data, grpc.StatusCode.INVALID_ARGUMENT, "the stream ends inside the tensor", chunk=512)


def test_per_tensor_budget_counts_every_span(family, coordinator):
    """A tensor top-k's int(k*n) bound holds over the spans of a tensor, not per span."""
    srv = coordinator()
    opts = MergeOptions(trim="tensor", k=20)
    rnd = open_round(srv, options=opts)
    full = contribution_bytes(family, 0, options=MergeOptions(trim="tensor", k=100),
                              mutate=lambda ts: [s for t in ts for s in spans_of(t, 300)])
    _, ts = read_stream(io.BytesIO(full), spans=True)
    emb = [t for t in ts if t.name == "embed.weight"]
    assert all(t.nnz <= int(0.2 * 1536) for t in emb) and sum(t.nnz for t in emb) > int(0.2 * 1536)
    header_fix = contribution_bytes(family, 0, options=opts,
                                    mutate=lambda _: [s for t in read_stream(io.BytesIO(full))[1]
                                                      for s in spans_of(t, 300)])
    rejected(srv, rnd, header_fix, grpc.StatusCode.INVALID_ARGUMENT, "more than int(k*n)", chunk=512)


def test_span_records_taken_while_the_aggregator_starts(family, tmp_path):
    factory = GatedFactory()
    srv = gated_server(family, tmp_path, factory, pending_buffer_bytes=3000)  # some kept decoded, some not
    try:
        rnd = srv.manager.get("r1")
        for i, c in enumerate(CLIENTS[:2]):
            submit(srv.target, "r1", c, family[0], family[1][i], retry=FAST, insecure=True, block=BLOCKS[i])
        assert rnd.agg_pending and sorted(rnd.held) == CLIENTS[:2]
        with rnd.lock:  # every span record held on its own: folded as it is, one span at a time
            names = [n for n, *_ in rnd.held[CLIENTS[0]]]
            assert len(names) > len(set(names)) and len(rnd.held[CLIENTS[1]]) > len(set(names))
        factory.gate.set()
        wait_until(lambda: not rnd.agg_pending)
        submit(srv.target, "r1", CLIENTS[2], family[0], family[1][2], retry=FAST, insecure=True, block=200)
        assert rnd.wait_closed(60) and rnd.state == "finalized", rnd.message
        assert_identical(fetch_model(srv, family, tmp_path), local_model(family, tmp_path, [0, 1, 2]))
    finally:
        factory.gate.set()
        srv.stop(grace=0)
