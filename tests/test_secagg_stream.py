"""Secure aggregation with bounded memory (issue 13): the client reads its contribution in
pieces twice, the coordinator keeps U as a bitmap and the running sum in a file, unmasks and
decodes block by block. With tiny blocks (tensors spanning blocks, U crossing range and tensor
boundaries, empty ranges and gaps, bitmap steps not a multiple of 8) the result equals the
whole-vector reference bit for bit, the merged records equal `merged_records` of the whole
merge byte for byte, and a client's largest range, U chunk and traced allocation stay bounded
by its block on a model many blocks large."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import tiesfed.client.secure as secure_mod
import tiesfed.coordinator.rounds.finalize as fin
import tiesfed.core.secagg.support as support_mod
import tiesfed.trust.secagg.client as client_mod
import tiesfed.trust.secagg.server as server_mod
from tests.helpers import make_model, random_family
from tests.test_secagg_crypto import ORGS, make_pki
from tests.test_secagg_protocol import NUMEL, assert_same, contribution, make_round, plain, wire
from tiesfed.client.secure import TrimmedPieces, flat_contribution
from tiesfed.coordinator.secure.publish import FlatAggregator
from tiesfed.core.accumulators import FinalizeSpec, elect, majority_sign, sign_balance
from tiesfed.core.options import MergeOptions
from tiesfed.core.secagg import FixedPoint, quantise, secure_finalize
from tiesfed.core.secagg.support import SupportReader, SupportWriter, merge_supports, pack_support, release_support
from tiesfed.core.trim import TrimSpec
from tiesfed.io.model_io import ModelReader
from tiesfed.protos.codec import StreamWriter
from tiesfed.protos.v1 import tiesfed_pb2 as pb
from tiesfed.trust.secagg import SecAggClient, SecAggError, SecAggRound, SecAggServer

#: tensor sizes of the flat space (sum NUMEL): one empty, several spanning decode blocks
SIZES = [700, 0, 1, 999, 50, 1250]


@pytest.fixture(scope="module")
def ids(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("secagg-stream-pki"))


@pytest.fixture
def tiny(monkeypatch):
    """Blocks small enough that every multi-block path runs on NUMEL = 3000 parameters."""
    monkeypatch.setattr(support_mod, "BITMAP_BLOCK", 37)  # not a multiple of 8: bits straddle bytes
    monkeypatch.setattr(client_mod, "BITMAP_BLOCK", 37)
    monkeypatch.setattr(server_mod, "RING_BLOCK", 13)


def pieces_of(seed: int, cuts=(0, 5, 333, 334, 1200, 1201, 2500, 2999)):
    """The contribution as pieces over ranges with gaps between some (no survivors there) and empty ones."""
    idx, val = contribution(seed)
    ranges = [(a, b) for a, b in zip(cuts, cuts[1:])][::2] + [(2999, NUMEL)]
    keep = torch.zeros(idx.numel(), dtype=torch.bool)
    out = []
    for a, b in sorted(ranges):
        sel = (idx >= a) & (idx < b)
        keep |= sel
        out.append((a, b, idx[sel], val[sel]))
    return (lambda: iter(out)), idx[keep], val[keep]


def run_streamed(ids, rnd, orgs, drop_before_upload=(), chunk=7):
    sources = {c: pieces_of(ORGS.index(c)) for c in orgs}
    clients = {c: SecAggClient(ids[c], rnd, pieces=sources[c][0]) for c in orgs}
    server = SecAggServer(rnd, ca_pem=ids["org-a"].ca_pem)
    for c in clients.values():
        server.receive_advert(wire(c.advertise()))
    keys = wire(server.close_keys())
    for c in clients.values():
        server.receive_shares(wire(c.share(keys)))
    for cid, req in server.close_shares().items():
        pieces = list(clients[cid].masked_stream(wire(req), chunk))
        assert b"".join(clients[cid].masked_again(chunk)) == b"".join(pieces)  # a resume regenerates the bytes
        if cid not in drop_before_upload:
            server.receive_masked_stream(cid, sum(map(len, pieces)), lambda p=pieces: p)
    req = wire(server.close_masked())
    for cid in req.survivors:
        server.receive_unmask(wire(clients[cid].unmask(req)))
    return server, {c: (s[1], s[2]) for c, s in sources.items()}


def plain_of(rnd, contribs, orgs):
    """`plain` of the protocol tests over the pieces' survivors (the gaps dropped)."""
    import tests.test_secagg_protocol as proto

    saved = proto.contribution
    proto.contribution = lambda i: contribs[ORGS[i]]
    try:
        return plain(rnd, orgs)
    finally:
        proto.contribution = saved


def stream_bytes(records) -> bytes:
    buf = io.BytesIO()
    w = StreamWriter(buf, {"kind": "merged"})
    for st in records:
        w.write(st)
    w.close()
    return buf.getvalue()


@pytest.mark.parametrize("spec", [FinalizeSpec(min_support=2), FinalizeSpec(combine="sum")])
def test_streamed_round_in_tiny_blocks_equals_the_whole_reference(ids, tiny, monkeypatch, spec):
    orgs = ORGS[:4]
    rnd = make_round(4, 3, spec)
    server, contribs = run_streamed(ids, rnd, orgs, drop_before_upload=("org-c",))
    survivors = [c for c in orgs if c != "org-c"]
    ref_acc, ref_merged = plain_of(rnd, contribs, survivors)
    sums = server.finish_stream()
    try:
        acc = sums.accumulator()
        assert_same(acc, secure_finalize(acc, spec), ref_acc, ref_merged)
        manifest = [SimpleNamespace(name=f"t{i}", numel=n) for i, n in enumerate(SIZES)]
        assert sum(SIZES) == NUMEL
        agg = FlatAggregator(sums, manifest, spec, block=50)
        balance = sign_balance(elect(ref_acc, spec)) if spec.combine == "disjoint" else 0
        assert agg.sign_balance() == balance
        majority = majority_sign(balance)
        shapes = {m.name: (m.numel,) for m in manifest}
        monkeypatch.setattr(fin, "SPAN_ELEMS", 64)  # spans cut at 64 as the streamed records are
        whole, at = [], 0
        for m in manifest:
            whole.append((m.name, ref_merged[at:at + m.numel]))
            at += m.numel
        want = list(fin.merged_records(iter(whole), shapes))
        got = list(agg.finalize_records(majority, shapes, 64))
        assert [(r.name, r.start, r.count) for r in got] == [(r.name, r.start, r.count) for r in want]
        assert any(r.count is not None for r in got) and any(r.numel == 0 for r in got)
        assert stream_bytes(got) == stream_bytes(want)
        joined = dict(agg.finalize(majority))
        assert all(torch.equal(joined[n], t) for n, t in whole)
    finally:
        sums.close()
    assert not sums.ring.path.exists()


def test_streamed_client_sends_the_bytes_of_the_in_memory_one(ids, tiny):
    """One client's contribution whole (one piece, U in one read) or in pieces with gaps and tiny
    bitmap steps, with the same keys and seed: the same bitmap, the same masked bytes in the
    same wire pieces, whatever the chunk."""
    rnd = make_round(3, 2)
    src, idx, val = pieces_of(0)
    whole = SecAggClient(ids["org-a"], rnd, idx, val)
    streamed = SecAggClient(ids["org-a"], rnd, pieces=src)
    kept, _ = quantise(idx, val, rnd.fixed)
    assert streamed._bitmap == whole._bitmap == pack_support(kept, NUMEL)
    assert streamed.survivors == whole.survivors == idx.numel()
    others = {c: SecAggClient(ids[c], rnd, *contribution(ORGS.index(c))) for c in ORGS[1:3]}
    server = SecAggServer(rnd)
    for c in (whole, *others.values()):
        server.receive_advert(c.advertise())
    keys = server.close_keys()
    for c in (whole, *others.values()):
        server.receive_shares(c.share(keys))
    req = server.close_shares()["org-a"]
    state = {k: v for k, v in vars(whole).items() if k not in ("_pieces", "_digests", "survivors")}
    vars(streamed).update(state)  # the same keys, seed, peers and shares: only the source differs
    for chunk in (1, 7, 4096):
        want = list(whole.masked_stream(req, chunk)) if chunk == 1 else list(whole.masked_again(chunk))
        got = list(streamed.masked_stream(req, chunk)) if chunk == 1 else list(streamed.masked_again(chunk))
        assert got == want and len(want) == (server.support_size + chunk - 1) // chunk


def test_a_contribution_that_changes_between_the_passes_is_refused(ids, tiny):
    rnd = make_round(3, 2)
    src, idx, val = pieces_of(0)
    calls = []

    def changing():
        calls.append(1)
        for lo, hi, i, v in src():
            yield lo, hi, i, v * (1.5 if len(calls) > 1 and lo >= 1200 else 1.0)

    clients = {"org-a": SecAggClient(ids["org-a"], rnd, pieces=changing)}
    clients.update({c: SecAggClient(ids[c], rnd, *contribution(ORGS.index(c))) for c in ORGS[1:3]})
    server = SecAggServer(rnd)
    for c in clients.values():
        server.receive_advert(c.advertise())
    keys = server.close_keys()
    for c in clients.values():
        server.receive_shares(c.share(keys))
    req = server.close_shares()["org-a"]
    with pytest.raises(SecAggError, match="read again differs"):
        b"".join(clients["org-a"].masked_stream(req, 5))


def test_support_streams_equal_the_whole_ones(tiny):
    g = torch.Generator().manual_seed(3)
    sups = [torch.nonzero(torch.rand(NUMEL, generator=g) < d).reshape(-1) for d in (0.0, 0.05, 0.3, 0.9)]
    for m in (1, 2, 3):
        packed, count = merge_supports([pack_support(s, NUMEL) for s in sups], m, NUMEL)
        ref = release_support(sups, m, NUMEL)
        assert packed == pack_support(ref, NUMEL) and count == ref.numel()
        r = SupportReader(packed, NUMEL)
        got = np.concatenate([r.take(b) for b in (0, 1, 9, 16, 17, 1500, NUMEL)])
        r.close()
        assert np.array_equal(got, ref.numpy())
    w = SupportWriter(NUMEL)
    w.add(10, 20, np.array([10, 19]))
    with pytest.raises(ValueError, match="out of order"):
        w.add(5, 30, np.array([6]))
    bad = pack_support(torch.tensor([1]), NUMEL + 8)  # a longer bitmap
    with pytest.raises(ValueError, match="bytes for"):
        SupportReader(bad, NUMEL).close()


def traced_peak(fn):
    """(fn's result, the peak of what numpy and Python allocated while it ran, in bytes)."""
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def client_memory_figures(tmp: Path) -> dict:
    """A model of 2^20 parameters (tensors up to 2^19) trimmed in blocks of 2^14, one client
    scanning and masking it: its largest range and U chunk (`PEAK`), and the peaks of what numpy
    and Python allocated (tracemalloc) in the plain trimmer alone, in its scan and in its masking."""
    support_mod.BITMAP_BLOCK = client_mod.BITMAP_BLOCK = 1 << 14
    ids = make_pki(tmp / "pki")
    shapes = {"a": (512, 1024), "b": (1024,), "c": (256, 1024), "d": (256, 1024)}
    base_t, fts = random_family(shapes, 2, seed=4)
    base = make_model(tmp / "base", base_t)
    models = [make_model(tmp / f"ft{i}", t) for i, t in enumerate(fts)]
    numel = sum(int(np.prod(s)) for s in shapes.values())
    spec = pb.RoundSpec(round_id="round-1", manifest=[pb.TensorSpec(name=n, shape=list(s)) for n, s in shapes.items()])
    opts, trim, block = MergeOptions(), TrimSpec(kind="topk", fraction=0.2, scope="global"), 1 << 14
    rnd = SecAggRound("round-1", numel, 2, FixedPoint(bound=1.0, max_clients=5), FinalizeSpec())
    with ModelReader(base) as b, ModelReader(models[0]) as f0, ModelReader(models[1]) as f1:
        src = TrimmedPieces(spec, b, f0, trim, opts, "m0", block=block)
        _, trimmer = traced_peak(lambda: sum(1 for _ in src()))  # the plain trimmer's own working set
        a, scan = traced_peak(lambda: SecAggClient(ids["org-a"], rnd, pieces=src))
        other = SecAggClient(ids["org-b"], rnd, *flat_contribution(spec, b, f1, trim, opts, "m1", block=block))
        server = SecAggServer(rnd)
        for c in (a, other):
            server.receive_advert(c.advertise())
        keys = server.close_keys()
        for c in (a, other):
            server.receive_shares(c.share(keys))
        req = server.close_shares()["org-a"]
        sent, masking = traced_peak(lambda: sum(len(p) for p in a.masked_stream(req, 4096)))
        whole = flat_contribution(spec, b, f0, trim, opts, "m0", block=block)
        secure_mod.PIECE_ELEMS = 1000  # records cut into pieces: the same survivors, ranges tiling the space
        cut = list(TrimmedPieces(spec, b, f0, trim, opts, "m0", block=block)())
        tiled = all(p[1] == q[0] for p, q in zip(cut, cut[1:])) and cut[0][0] == 0 and cut[-1][1] == numel
        same = torch.equal(torch.cat([p[2] for p in cut]), whole[0]) and torch.equal(torch.cat([p[3] for p in cut]),
                                                                                       whole[1])
    lay = rnd.layout
    return {"numel": numel, "block": block, "u": server.support_size, "survivors": a.survivors, "sent": sent,
            "want": server.support_size * lay.width * lay.bytes_per_element, "peak": dict(client_mod.PEAK),
            "trimmer": trimmer, "scan": scan, "masking": masking,
            "cut": {"tiled": tiled, "same": same, "longest": max(p[1] - p[0] for p in cut)}}


def test_client_memory_is_bounded_by_its_block(tmp_path):
    """The client's largest range is its block, its largest U chunk the chunk, and what numpy and
    Python allocate while it scans and masks is the trimmer's own working set plus well under a
    byte a parameter (the whole-vector client allocated a bool a parameter for its bitmap, U's
    unpacked bits and 8 bytes a position of U on top). In a fresh process: no other test's
    threads allocate while tracemalloc counts."""
    code = ("import json, sys; from pathlib import Path; from tests.test_secagg_stream import client_memory_figures; "
            "print(json.dumps(client_memory_figures(Path(sys.argv[1]))))")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=root, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    f = json.loads(out.stdout.strip().splitlines()[-1])
    numel = f["numel"]
    assert f["u"] > numel // 4 and f["survivors"] >= numel // 5 and f["sent"] == f["want"]
    assert f["peak"] == {"ranges": f["block"], "positions": 4096}
    assert f["cut"] == {"tiled": True, "same": True, "longest": 1000}
    assert f["scan"] < f["trimmer"] + numel // 4, f
    assert f["masking"] < f["trimmer"] + numel // 2, f
