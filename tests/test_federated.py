"""The federated merge over real gRPC on loopback, with real files.

Every coordinator binds 127.0.0.1 on a free port and is stopped by its
fixture's finalizer. Each rejection test snapshots the aggregator before the
bad upload and checks it is bit-identical afterwards, then that the round
still produces the local engine's model bit for bit.
"""

from __future__ import annotations

import ast
import io
import json
import time
from pathlib import Path

import grpc
import pytest
import torch
from click.testing import CliRunner

from tests.helpers import TOY_SPEC as SPEC
from tests.helpers import make_model, random_family, write_family
from tiesfed.cli import main
from tiesfed.client.contribution import (
    contribution_header,
    contribution_threshold,
    iter_contribution,
    write_contribution,
)
from tiesfed.client.federated import (
    Connection,
    FederatedError,
    Retry,
    download,
    fetch,
    submit,
)
from tiesfed.coordinator.rounds import ParticipantConfig, RoundConfig, nnz_budget
from tiesfed.coordinator.server import (
    CoordinatorConfig,
    CoordinatorServer,
    load_coordinator_config,
)
from tiesfed.core.methods import get_method
from tiesfed.core.options import MergeConfig, MergeOptions, ModelEntry
from tiesfed.engine import merge
from tiesfed.federated_merge import federated_merge
from tiesfed.io.model_io import ModelReader, fingerprint
from tiesfed.protos.codec import SparseTensor
from tiesfed.protos.v1 import (
    ADMIN_TOKEN_KEY,
    CLIENT_ID_KEY,
    MAX_CHUNK_BYTES,
    channel_options,
)
from tiesfed.protos.v1 import tiesfed_pb2 as pb
from tiesfed.protos.v1 import tiesfed_pb2_grpc as pb_grpc

CLIENTS = ["org-a", "org-b", "org-c"]
FAST = Retry(attempts=6, backoff_s=0.05, max_backoff_s=0.5)


# ----------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A sharded base and four fine-tuned models (the fourth is a stand-in for replacements)."""
    _, _, base_dir, paths = write_family(tmp_path_factory.mktemp("fedfamily"), 4, seed=7)
    with ModelReader(base_dir) as r:
        fp = fingerprint(r)
    return base_dir, paths, fp


@pytest.fixture
def coordinator(tmp_path, family):
    """Start coordinators (on a free loopback port); all are stopped at teardown, pass or fail.
    Insecure: in-process fast path: round logic; identity is tested over mTLS in test_identity.py."""
    started: list[CoordinatorServer] = []

    def start(spool: Path | None = None, aggregator_factory=None, **kw) -> CoordinatorServer:
        cfg = CoordinatorConfig(
            listen="127.0.0.1:0", spool_dir=spool or tmp_path / "spool", base_model=str(family[0]),
            **{"aggregator": "local", "insecure": True, **kw},
        )
        srv = CoordinatorServer(cfg, aggregator_factory=aggregator_factory)
        started.append(srv)
        return srv.start()

    yield start
    for srv in started:
        srv.stop(grace=0)


def open_round(srv, round_id="r1", clients=CLIENTS, weights=None, **kw):
    parts = [ParticipantConfig(client_id=c, weight=(weights[i] if weights else 1.0)) for i, c in enumerate(clients)]
    return srv.manager.open_round(RoundConfig(round_id=round_id, participants=parts, **kw))


def local_model(family, tmp_path, models, options=MergeOptions(), weights=None) -> dict[str, torch.Tensor]:
    base_dir, paths, _ = family
    entries = [ModelEntry(model=str(paths[m]), weight=(weights[i] if weights else 1.0)) for i, m in enumerate(models)]
    out = tmp_path / f"local-{time.monotonic_ns()}"
    merge(MergeConfig(base_model=str(base_dir), models=entries, options=options), out, progress=False)
    return load_folder(out)


def load_folder(path: Path) -> dict[str, torch.Tensor]:
    with ModelReader(path) as r:
        return {n: r.get(n).clone() for n in r.names}


def assert_identical(got: dict, want: dict) -> None:
    assert list(got) == list(want) or set(got) == set(want)
    for n, w in want.items():
        assert got[n].dtype == w.dtype and got[n].shape == w.shape, n
        assert torch.equal(got[n], w), f"{n} differs"


def fetch_model(srv, family, tmp_path, round_id="r1", client="org-a") -> dict[str, torch.Tensor]:
    out = tmp_path / f"fetched-{time.monotonic_ns()}"
    fetch(srv.target, round_id, client, family[0], out, timeout=60, retry=FAST, insecure=True)
    return load_folder(out)


def send(srv, round_id, client, family, model: int, **kw):
    return submit(srv.target, round_id, client, family[0], family[1][model], retry=FAST, insecure=True, **kw)


def snapshot(rnd) -> dict:
    """Everything a fold can change: accumulator tensors and scalars, committed contributions."""
    with rnd.lock:
        acc = {
            name: ({k: v.clone() for k, v in a.tensors().items()}, a.contributions, a.weight_total)
            for name, a in (rnd.agg._acc.items() if rnd.agg is not None else ())
        }
        return {"acc": acc, "committed": {c: x.sha256 for c, x in rnd.committed.items()},
                "sessions": sorted(rnd.sessions), "state": rnd.state}


def assert_same_state(a: dict, b: dict) -> None:
    assert a["committed"] == b["committed"] and a["sessions"] == b["sessions"] and a["state"] == b["state"]
    assert a["acc"].keys() == b["acc"].keys()
    for name, (ta, ca, wa) in a["acc"].items():
        tb, cb, wb = b["acc"][name]
        assert (ca, wa) == (cb, wb), name
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{name}.{k} changed"


def contribution_bytes(family, model: int, options=MergeOptions(), model_key="0", fp=None, mutate=None,
                       header=None) -> bytes:
    """A contribution stream built like a client does, optionally tampered with: `mutate`
    its tensors, `header` entries declared instead of the honest ones (None: left out;
    a callable: applied to the honest value)."""
    base_dir, paths, real_fp = family
    trim = get_method(options.method).trim_spec(options)
    with ModelReader(base_dir) as b, ModelReader(paths[model]) as ft:
        threshold = contribution_threshold(b, ft, trim)
        tensors = list(iter_contribution(b, ft, trim, model_key=model_key, threshold=threshold))
    if mutate:
        tensors = mutate(tensors)
    meta = contribution_header(fp or real_fp, model_key, trim, threshold=threshold)
    for k, v in (header or {}).items():
        honest = meta.pop(k, None)
        if v is not None:
            meta[k] = v(honest) if callable(v) else v
    buf = io.BytesIO()
    write_contribution(buf, meta, tensors)
    return buf.getvalue()


def raw_upload(srv, round_id, client, data: bytes, chunk=64 << 10, offset=0, options=None, metadata=None):
    """Stream bytes to Upload with a plain stub; returns the receipt or raises grpc.RpcError."""
    with grpc.insecure_channel(srv.target, options=options or channel_options()) as ch:
        stub = pb_grpc.CoordinatorStub(ch)

        def reqs():
            for i in range(0, len(data), chunk):
                yield pb.UploadChunk(round_id=round_id, offset=offset + i, data=data[i : i + chunk])

        md = metadata if metadata is not None else ((CLIENT_ID_KEY, client),)
        return stub.Upload(reqs(), metadata=md, timeout=30)


def rejected(srv, rnd, data, code, match, client="org-a", **kw):
    """A bad upload is refused with `code` and a message matching `match`, changing nothing."""
    before = snapshot(rnd)
    with pytest.raises(grpc.RpcError) as ei:
        raw_upload(srv, rnd.id, client, data, **kw)
    assert ei.value.code() == code, ei.value.details()
    assert match in ei.value.details()
    assert_same_state(before, snapshot(rnd))
    assert not list(rnd.spool.partial_dir.iterdir())
    return ei.value


# ----------------------------------------------------------------------------- equivalence


WEIGHTED = [0.5, 2.0, 1.0]


@pytest.mark.parametrize(
    "opts, weights",
    [
        ({}, None),
        ({"election": "count", "k": 30, "lam": 1.3, "trim": "tensor"}, None),
        ({"value_dtype": "float16"}, WEIGHTED),
        ({"method": "dare_ties", "k": 50, "seed": 3}, None),
        ({"disjoint": "max"}, None),  # not invertible: folds at commit instead of on arrival
        ({"election": "count"}, [0.3, 1.7, 1.1]),  # inexact products: folds in model order at the end
    ],
    ids=["paper-defaults", "count-election", "weighted-fp16", "dare", "dis-max", "weighted-inexact"],
)
def test_federated_equals_local_merge(family, tmp_path, opts, weights):
    base_dir, paths, _ = family
    options = MergeOptions(**opts)
    models = [ModelEntry(model=str(p), weight=(weights[i] if weights else 1.0)) for i, p in enumerate(paths[:3])]
    cfg = MergeConfig(base_model=str(base_dir), models=models, options=options)
    res = federated_merge(cfg, tmp_path / "fed", chunk_bytes=1024, aggregator="local")
    want = local_model(family, tmp_path, [0, 1, 2], options, weights)
    assert_identical(load_folder(tmp_path / "fed"), want)
    assert json.loads((tmp_path / "fed" / "config.json").read_text())["model_type"] == "toy"
    assert len(res.clients) == 3 and all(c.attempts == 1 for c in res.clients)
    assert 0 < res.upload_bytes < res.dense_fp32_bytes and res.download_bytes > 0
    assert res.wire_bytes == res.upload_bytes_sent + res.download_bytes


def test_coordinator_writes_the_full_model_too(family, tmp_path, coordinator):
    srv = coordinator()
    rnd = open_round(srv, options=MergeOptions(k=40, lam=1.5))
    for i, c in enumerate(CLIENTS):
        send(srv, "r1", c, family, i)
    assert rnd.wait_closed(60) and rnd.state == "finalized"
    want = local_model(family, tmp_path, [0, 1, 2], MergeOptions(k=40, lam=1.5))
    assert_identical(load_folder(rnd.spool.model_dir), want)
    assert_identical(fetch_model(srv, family, tmp_path), want)
    # Watch replays the round's progress and ends with the digest of the merge
    with grpc.insecure_channel(srv.target, options=channel_options()) as ch:
        events = list(pb_grpc.CoordinatorStub(ch).Watch(pb.WatchRequest(round_id="r1"),
                                                         metadata=((CLIENT_ID_KEY, "org-c"),), timeout=10))
    kinds = [pb.EventKind.Name(e.kind) for e in events]
    assert kinds == ["ROUND_OPENED"] + ["UPLOAD_COMMITTED"] * 3 + ["ROUND_FINALIZING", "ROUND_FINALIZED"]
    assert events[-1].sha256 == rnd.merged.sha256 and events[-1].bytes == rnd.merged.bytes
    # a download resumes from the bytes a partial file already holds
    with Connection(srv.target, "org-b", FAST, insecure=True) as conn:
        part = tmp_path / "merged.part"
        part.write_bytes(rnd.merged.path.read_bytes()[:1000])
        got, _ = download(conn, "r1", part, rnd.merged.sha256, rnd.merged.bytes)
    assert got == rnd.merged.bytes - 1000 and part.read_bytes() == rnd.merged.path.read_bytes()


# ----------------------------------------------------------------------------- interrupted uploads


def test_broken_connection_resumes_from_committed_offset(family, tmp_path, coordinator):
    srv = coordinator()
    rnd = open_round(srv)

    def fault(attempt: int, i: int) -> bool:
        """Break the first attempt once the coordinator holds and has folded part of the stream."""
        if attempt > 0 or i == 0:
            return False
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # wait until the chunks sent so far have arrived
            s = rnd.sessions.get("org-a")
            if s is not None and s.offset == 256 * i:
                return bool(s.folded)
            time.sleep(0.005)
        raise AssertionError("the coordinator never received the first chunks")

    res = send(srv, "r1", "org-a", family, 0, chunk_bytes=256, fault=fault)
    assert res.attempts == 2 and res.resumed_from and res.resumed_from[0] > 0
    assert res.bytes_sent < 2 * res.bytes  # resumed, not started over
    for i, c in enumerate(CLIENTS[1:], 1):
        send(srv, "r1", c, family, i)
    assert_identical(fetch_model(srv, family, tmp_path), local_model(family, tmp_path, [0, 1, 2]))


def test_breaks_that_make_progress_do_not_use_up_the_retries(family, tmp_path, coordinator):
    """A stream broken after every 3rd chunk (as a slow client loses its slot to a waiting one)
    with one retry allowed: each break leaves the coordinator holding more, so the count starts
    again, and the upload completes after many more attempts than retries."""
    srv = coordinator()
    rnd = open_round(srv)

    def fault(attempt: int, i: int) -> bool:
        if i < 3:
            return False
        deadline = time.monotonic() + 10  # the 3 chunks arrived: the break is after progress
        while rnd.sessions.get("org-a") is None or rnd.sessions["org-a"].offset < 3 * 256 * (attempt + 1):
            assert time.monotonic() < deadline, "the coordinator never received the chunks"
            time.sleep(0.005)
        return True

    one_retry = Retry(attempts=1, backoff_s=0.01, max_backoff_s=0.05)
    res = submit(srv.target, "r1", "org-a", family[0], family[1][0], retry=one_retry, insecure=True,
                 chunk_bytes=256, fault=fault)
    assert res.attempts > 3 and len(res.resumed_from) == res.attempts - 1
    assert res.bytes_sent == res.bytes  # every break resumed where the coordinator was

    tried: set[int] = set()  # breaks before any byte arrives: no progress, so the one retry is all

    def at_once(attempt: int, i: int) -> bool:
        tried.add(attempt)
        return True

    with pytest.raises(FederatedError, match="was cancelled"):
        submit(srv.target, "r1", "org-b", family[0], family[1][1], retry=one_retry, insecure=True,
               chunk_bytes=256, fault=at_once)
    assert tried == {0, 1}


def test_abandoned_upload_expires_and_is_unfolded(family, tmp_path, coordinator):
    srv = coordinator(abandon_after_s=0.5)
    rnd = open_round(srv)
    send(srv, "r1", "org-b", family, 1)
    before = snapshot(rnd)
    data = contribution_bytes(family, 0)
    # the stream stops after a few records, without its end marker: a resumable partial
    receipt = raw_upload(srv, "r1", "org-a", data[: len(data) // 2], chunk=256)
    assert not receipt.committed and receipt.committed_offset == len(data) // 2
    assert rnd.sessions["org-a"].folded
    deadline = time.monotonic() + 10  # the event comes once the withdrawal is done
    while not any(e.kind == "UPLOAD_ABANDONED" for e in rnd.events) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(e.kind == "UPLOAD_ABANDONED" for e in rnd.events)
    assert_same_state(before, snapshot(rnd))
    send(srv, "r1", "org-a", family, 0)
    send(srv, "r1", "org-c", family, 2)
    assert_identical(fetch_model(srv, family, tmp_path), local_model(family, tmp_path, [0, 1, 2]))


# ----------------------------------------------------------------------------- one contribution per client


def test_duplicate_upload_counted_once(family, tmp_path, coordinator):
    srv = coordinator()
    rnd = open_round(srv)
    first = send(srv, "r1", "org-a", family, 0)
    before = snapshot(rnd)
    again = send(srv, "r1", "org-a", family, 0)
    assert again.duplicate and again.sha256 == first.sha256 and not first.duplicate
    assert_same_state(before, snapshot(rnd))
    assert len(rnd.committed) == 1
    for i, c in enumerate(CLIENTS[1:], 1):
        send(srv, "r1", c, family, i)
    assert_identical(fetch_model(srv, family, tmp_path), local_model(family, tmp_path, [0, 1, 2]))


def test_replacement_before_the_round_closes(family, tmp_path, coordinator):
    srv = coordinator()
    rnd = open_round(srv)
    wrong = send(srv, "r1", "org-a", family, 3)
    right = send(srv, "r1", "org-a", family, 0)
    assert right.replaced and right.sha256 != wrong.sha256
    assert rnd.committed["org-a"].sha256 == right.sha256
    assert len(list(rnd.spool.contrib_dir.glob("org-a-*.tfs"))) == 1
    for i, c in enumerate(CLIENTS[1:], 1):
        send(srv, "r1", c, family, i)
    assert_identical(fetch_model(srv, family, tmp_path), local_model(family, tmp_path, [0, 1, 2]))


@pytest.mark.parametrize("mode, opts, weights", [
    ("commit", {"disjoint": "max"}, None),
    ("final", {}, [0.3, 1.7, 1.1]),
])
def test_replacement_when_folding_is_not_on_arrival(family, tmp_path, coordinator, mode, opts, weights):
    srv = coordinator()
    options = MergeOptions(**opts)
    rnd = open_round(srv, options=options, weights=weights)
    assert rnd.fold_mode == mode
    send(srv, "r1", "org-a", family, 3)
    # a rejected upload changes nothing here either
    rejected(srv, rnd, contribution_bytes(family, 1, model_key="1", mutate=lambda ts: ts[:-1]),
             grpc.StatusCode.INVALID_ARGUMENT, "ends without", client="org-b")
    assert send(srv, "r1", "org-a", family, 0).replaced
    for i, c in enumerate(CLIENTS[1:], 1):
        send(srv, "r1", c, family, i)
    want = local_model(family, tmp_path, [0, 1, 2], options, weights)
    assert_identical(fetch_model(srv, family, tmp_path), want)


def test_replacement_refused_by_policy(family, tmp_path, coordinator):
    srv = coordinator()
    rnd = open_round(srv, replace_policy="refuse")
    send(srv, "r1", "org-a", family, 3)
    before = snapshot(rnd)
    with pytest.raises(FederatedError) as ei:
        send(srv, "r1", "org-a", family, 0)
    assert ei.value.code == "FAILED_PRECONDITION" and "refuses replacements" in str(ei.value)
    assert_same_state(before, snapshot(rnd))
    assert send(srv, "r1", "org-a", family, 3).duplicate  # the same one again is still fine
    for i, c in enumerate(CLIENTS[1:], 1):
        send(srv, "r1", c, family, i)
    assert_identical(fetch_model(srv, family, tmp_path), local_model(family, tmp_path, [3, 1, 2]))


# ----------------------------------------------------------------------------- deadline and quorum


def test_late_upload_rejected_and_quorum_not_met(family, coordinator):
    srv = coordinator()
    rnd = open_round(srv, quorum=2, deadline_s=1.5, late_policy="reject")
    send(srv, "r1", "org-a", family, 0)
    assert rnd.wait_closed(10) and rnd.state == "failed"
    assert "quorum not met" in rnd.message
    with pytest.raises(FederatedError) as ei:
        send(srv, "r1", "org-b", family, 1)
    assert ei.value.code == "FAILED_PRECONDITION" and "failed" in str(ei.value)
    with pytest.raises(FederatedError, match="quorum not met"):
        fetch(srv.target, "r1", "org-b", family[0], family[0].parent / "never", timeout=10, retry=FAST,
              insecure=True)


def test_a_client_checks_the_architecture_unless_told_not_to(family, tmp_path, coordinator):
    """A Mistral fine-tune of a Llama base is refused before anything is sent, naming what
    differs; `allow_architecture_mismatch` (`--allow-architecture-mismatch`) uploads it."""
    import json
    import shutil

    from tiesfed.io.model_io import ModelError

    srv = coordinator()
    rnd = open_round(srv)
    base, ft = tmp_path / "base", tmp_path / "ft"
    shutil.copytree(family[0], base)
    shutil.copytree(family[1][0], ft)
    for folder, arch, kind in ((base, "LlamaForCausalLM", "llama"), (ft, "MistralForCausalLM", "mistral")):
        (folder / "config.json").write_text(json.dumps({"architectures": [arch], "model_type": kind}))
    with pytest.raises(ModelError, match="mistral"):
        submit(srv.target, "r1", "org-a", base, ft, retry=FAST, insecure=True)
    assert not rnd.committed and not rnd.sessions
    res = submit(srv.target, "r1", "org-a", base, ft, retry=FAST, insecure=True, allow_architecture_mismatch=True)
    assert not res.duplicate and "org-a" in rnd.committed


def test_late_upload_rejected_after_deadline(family, coordinator):
    """Between the deadline and the coordinator's tick the policy itself refuses."""
    srv = coordinator()
    rnd = open_round(srv, quorum=2, deadline_s=30, late_policy="reject")
    data = contribution_bytes(family, 1, model_key="1")
    srv.manager.tick_s = 3600  # no tick may fail the round first (one already waiting ends within 0.2 s)
    time.sleep(0.5)
    rnd.clock = lambda: time.time() + 60  # the deadline has passed for this round
    rejected(srv, rnd, data, grpc.StatusCode.FAILED_PRECONDITION, "late-upload policy is reject", client="org-b")


def test_late_upload_accepted_while_not_finalized(family, tmp_path, coordinator):
    srv = coordinator()
    rnd = open_round(srv, quorum=2, deadline_s=1.0, late_policy="accept")
    send(srv, "r1", "org-a", family, 0)
    time.sleep(1.5)
    assert rnd.deadline_passed() and rnd.state == "open"
    send(srv, "r1", "org-b", family, 1)  # late, accepted; quorum met after the deadline: finalize
    assert rnd.wait_closed(30) and rnd.state == "finalized"
    assert_identical(fetch_model(srv, family, tmp_path), local_model(family, tmp_path, [0, 1]))
    with pytest.raises(FederatedError) as ei:
        send(srv, "r1", "org-c", family, 2)
    assert ei.value.code == "FAILED_PRECONDITION" and "finalized" in str(ei.value)


def test_admin_close_needs_quorum(family, tmp_path, coordinator):
    srv = coordinator(admin_token="s3cret")
    rnd = open_round(srv, quorum=2)
    send(srv, "r1", "org-a", family, 0)
    with grpc.insecure_channel(srv.target, options=channel_options()) as ch:
        stub = pb_grpc.CoordinatorStub(ch)
        admin = ((ADMIN_TOKEN_KEY, "s3cret"),)
        with pytest.raises(grpc.RpcError) as ei:
            stub.CloseRound(pb.CloseRoundRequest(round_id="r1"), metadata=((ADMIN_TOKEN_KEY, "guess"),))
        assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED
        before = snapshot(rnd)
        with pytest.raises(grpc.RpcError) as ei:
            stub.CloseRound(pb.CloseRoundRequest(round_id="r1"), metadata=admin)
        assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "quorum not met" in ei.value.details()
        assert_same_state(before, snapshot(rnd))
        send(srv, "r1", "org-b", family, 1)
        assert rnd.state == "open"  # quorum, but not everyone and no deadline: waits
        st = stub.CloseRound(pb.CloseRoundRequest(round_id="r1"), metadata=admin, timeout=60)
        assert st.state == pb.ROUND_STATE_FINALIZED and list(st.committed_clients) == ["org-a", "org-b"]
    assert_identical(fetch_model(srv, family, tmp_path), local_model(family, tmp_path, [0, 1]))


# ----------------------------------------------------------------------------- validation


def test_wrong_base_fingerprint(family, tmp_path, coordinator):
    srv = coordinator()
    rnd = open_round(srv)
    # the client notices first ...
    other = make_model(tmp_path / "other-base", random_family(SPEC, 1, seed=99)[0])
    with pytest.raises(FederatedError) as ei:
        submit(srv.target, "r1", "org-a", other, family[1][0], retry=FAST, insecure=True)
    assert ei.value.code == "FAILED_PRECONDITION" and "fingerprint" in str(ei.value)
    # ... and so does the coordinator
    data = contribution_bytes(family, 0, fp="sha256:" + "0" * 64)
    rejected(srv, rnd, data, grpc.StatusCode.FAILED_PRECONDITION, "computed against base")


def test_wrong_shapes_and_incomplete_contributions(family, tmp_path, coordinator):
    srv = coordinator()
    rnd = open_round(srv)
    send(srv, "r1", "org-b", family, 1)

    def reshape_last(ts):
        t = ts[-1]
        return ts[:-1] + [SparseTensor(t.name, (t.numel,), t.indices, t.values)]

    def rename_first(ts):
        t = ts[0]
        return [SparseTensor("no.such.tensor", t.shape, t.indices, t.values)] + ts[1:]

    cases = [
        (reshape_last, "has shape"),
        (lambda ts: ts[:-1], "ends without 1 tensor"),
        (rename_first, "not in the manifest"),
        (lambda ts: ts + ts[-1:], "appears twice"),
    ]
    for mutate, match in cases:
        # each fails after earlier records were folded: they must be un-folded exactly
        rejected(srv, rnd, contribution_bytes(family, 0, mutate=mutate), grpc.StatusCode.INVALID_ARGUMENT, match,
                 chunk=300)
    assert [e.kind for e in rnd.events].count("UPLOAD_REJECTED") == len(cases)
    send(srv, "r1", "org-a", family, 0)
    send(srv, "r1", "org-c", family, 2)
    assert_identical(fetch_model(srv, family, tmp_path), local_model(family, tmp_path, [0, 1, 2]))


def test_nonzeros_over_the_k_budget(family, coordinator):
    srv = coordinator()
    rnd = open_round(srv, options=MergeOptions(k=10))
    k10 = get_method("ties").trim_spec(MergeOptions(k=10))
    k100 = get_method("ties").trim_spec(MergeOptions(k=100))
    # honest about another trim: refused by its header
    rejected(srv, rnd, contribution_bytes(family, 0, options=MergeOptions(k=100)), grpc.StatusCode.INVALID_ARGUMENT,
             "trimmed with")
    # declaring the round's trim (and a threshold every value clears) but carrying every entry:
    # refused by the count
    with ModelReader(family[0]) as b, ModelReader(family[1][0]) as ft:
        full = list(iter_contribution(b, ft, k100, model_key="0"))
    assert sum(t.nnz for t in full) > nnz_budget(k10, rnd.total)
    buf = io.BytesIO()
    write_contribution(buf, contribution_header(family[2], "0", k10, threshold=0.0), full)
    rejected(srv, rnd, buf.getvalue(), grpc.StatusCode.INVALID_ARGUMENT, "over the budget", chunk=512)


def test_oversized_and_malformed_chunks(family, tmp_path, coordinator):
    srv = coordinator()
    rnd = open_round(srv)
    send(srv, "r1", "org-b", family, 1)
    # a chunk over 4 MiB: refused by the chunk check, or by gRPC's message limit when far over
    big_opts = [("grpc.max_send_message_length", 16 << 20), ("grpc.max_receive_message_length", 16 << 20)]
    rejected(srv, rnd, b"\0" * (MAX_CHUNK_BYTES + 1024), grpc.StatusCode.INVALID_ARGUMENT, "exceeds the limit",
             chunk=MAX_CHUNK_BYTES + 1024, options=big_opts)
    rejected(srv, rnd, b"\0" * (2 * MAX_CHUNK_BYTES), grpc.StatusCode.RESOURCE_EXHAUSTED, "",
             chunk=2 * MAX_CHUNK_BYTES, options=big_opts)
    # garbage
    rejected(srv, rnd, b"definitely not a contribution" * 10, grpc.StatusCode.INVALID_ARGUMENT, "bad magic")
    # a valid prefix, then a corrupted record: what was folded is withdrawn
    data = bytearray(contribution_bytes(family, 0))
    data[len(data) - 200] ^= 0xFF
    rejected(srv, rnd, bytes(data), grpc.StatusCode.INVALID_ARGUMENT, "malformed contribution", chunk=256)
    # a chunk at the wrong offset
    good = contribution_bytes(family, 0)
    rejected(srv, rnd, good, grpc.StatusCode.ABORTED, "cannot resume", offset=100)
    send(srv, "r1", "org-a", family, 0)
    send(srv, "r1", "org-c", family, 2)
    assert_identical(fetch_model(srv, family, tmp_path), local_model(family, tmp_path, [0, 1, 2]))


def test_client_not_on_the_allowlist(family, coordinator):
    srv = coordinator()
    rnd = open_round(srv)
    with pytest.raises(FederatedError) as ei:
        submit(srv.target, "r1", "mallory", family[0], family[1][0], retry=FAST, insecure=True)
    assert ei.value.code == "PERMISSION_DENIED" and "allowlist" in str(ei.value)
    data = contribution_bytes(family, 0)
    rejected(srv, rnd, data, grpc.StatusCode.PERMISSION_DENIED, "allowlist", client="mallory")
    rejected(srv, rnd, data, grpc.StatusCode.UNAUTHENTICATED, "client id", metadata=())
    with grpc.insecure_channel(srv.target, options=channel_options()) as ch:
        stub = pb_grpc.CoordinatorStub(ch)
        for call, req in ((stub.GetRoundSpec, pb.GetRoundSpecRequest(round_id="r1")),
                          (stub.UploadStatus, pb.UploadStatusRequest(round_id="r1"))):
            with pytest.raises(grpc.RpcError) as ei:
                call(req, metadata=((CLIENT_ID_KEY, "mallory"),))
            assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as ei:
            list(stub.Download(pb.DownloadRequest(round_id="r1"), metadata=((CLIENT_ID_KEY, "mallory"),)))
        assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED


# ----------------------------------------------------------------------------- restart, CLI, stubs


def test_restarted_coordinator_recovers_the_round(family, tmp_path, coordinator):
    spool = tmp_path / "durable"
    srv = coordinator(spool=spool)
    rnd = open_round(srv)
    send(srv, "r1", "org-a", family, 0)
    send(srv, "r1", "org-b", family, 1)
    before = snapshot(rnd)
    srv.stop(grace=0)
    srv2 = coordinator(spool=spool)
    rnd2 = srv2.manager.get("r1")
    assert_same_state(before, snapshot(rnd2))
    send(srv2, "r1", "org-c", family, 2)
    assert_identical(fetch_model(srv2, family, tmp_path), local_model(family, tmp_path, [0, 1, 2]))
    srv2.stop(grace=0)
    srv3 = coordinator(spool=spool)  # a finished round comes back finished, downloadable
    rnd3 = srv3.manager.get("r1")
    assert rnd3.state == "finalized"
    assert_identical(fetch_model(srv3, family, tmp_path), local_model(family, tmp_path, [0, 1, 2]))
    # a watcher whose position (from the old log) is exactly the new log's end still sees the end
    with grpc.insecure_channel(srv3.target, options=channel_options()) as ch:
        events = list(pb_grpc.CoordinatorStub(ch).Watch(
            pb.WatchRequest(round_id="r1", from_seq=len(rnd3.events)), metadata=((CLIENT_ID_KEY, "org-a"),),
            timeout=10))
    assert [pb.EventKind.Name(e.kind) for e in events] == ["ROUND_FINALIZED"]


def test_cli_submit_and_fetch(family, tmp_path, coordinator):
    srv = coordinator()
    open_round(srv, options=MergeOptions(k=25, lam=0.9))
    runner = CliRunner()
    for i, c in enumerate(CLIENTS):
        res = runner.invoke(main, ["client", "submit", str(family[0]), str(family[1][i]), "--target", srv.target,
                                   "--round", "r1", "--client-id", c, "-q", "--chunk-size", "2KiB", "--insecure"])
        assert res.exit_code == 0, res.output
        assert "committed" in res.output
    out = tmp_path / "cli-out"
    res = runner.invoke(main, ["client", "fetch", str(family[0]), "-o", str(out), "--target", srv.target,
                               "--round", "r1", "--client-id", "org-a", "-q", "--timeout", "60", "--insecure"])
    assert res.exit_code == 0, res.output
    assert_identical(load_folder(out), local_model(family, tmp_path, [0, 1, 2], MergeOptions(k=25, lam=0.9)))
    res = runner.invoke(main, ["client", "submit", str(family[0]), str(family[1][0]), "--target", srv.target,
                               "--round", "r1", "--client-id", "nobody", "-q", "--insecure"])
    assert res.exit_code != 0 and "PERMISSION_DENIED" in res.output


def test_coordinator_yaml_is_validated(tmp_path):
    good = tmp_path / "c.yaml"
    good.write_text(
        "listen: 127.0.0.1:0\nspool_dir: spool\nrounds:\n"
        "  - round_id: r1\n    participants: [a, {client_id: b, weight: 2}]\n    options: {k: 10}\n"
        "    quorum: 1\n    deadline_s: 60\n    late_policy: accept\n"
    )
    cfg = load_coordinator_config(good)
    assert cfg.spool_dir == tmp_path / "spool"
    r = cfg.rounds[0]
    assert r.options.k == 10 and [p.model_key for p in r.participants] == ["0", "1"] and r.participants[1].weight == 2
    for bad, msg in (
        ("rounds: [{round_id: r1, participants: [a, a]}]", "listed twice"),
        ("rounds: [{round_id: r1, participants: [a], quorum: 2}]", "quorum"),
        ("rounds: [{round_id: 'r 1', participants: [a]}]", "round id"),
        ("rounds: [{round_id: r1, participants: [a], late_policy: maybe}]", "late_policy"),
        ("max_active_uploads: 0", "max_active_uploads"),
        ("no_such_field: 1", "no_such_field"),
    ):
        (tmp_path / "b.yaml").write_text(bad)
        with pytest.raises(Exception, match=msg):
            load_coordinator_config(tmp_path / "b.yaml")


def test_committed_stubs_are_current(tmp_path):
    from importlib.metadata import version

    pytest.importorskip("grpc_tools")
    from tiesfed.protos.generate import GENERATED, ROOT, generate

    fresh = generate(tmp_path)
    committed = [ROOT / g for g in GENERATED]
    from google.protobuf import descriptor_pb2

    # the proto itself: the committed descriptor is the one the .proto compiles to
    def descriptor(path: Path) -> bytes:
        src = path.read_text()
        start = src.index("AddSerializedFile(") + len("AddSerializedFile(")
        blob = ast.literal_eval(src[start : src.index("')", start) + 1])
        fd = descriptor_pb2.FileDescriptorProto.FromString(blob)
        return fd.SerializeToString(deterministic=True)

    for i in range(0, len(GENERATED), 3):  # each proto's _pb2.py (tiesfed.proto, secagg.proto)
        assert descriptor(fresh[i]) == descriptor(committed[i]), \
            f"{committed[i].name} is stale: run python -m tiesfed.protos.generate"
    made_by = committed[2].read_text().split("GRPC_GENERATED_VERSION = '")[1].split("'")[0]
    if version("grpcio-tools") != made_by:
        pytest.skip(f"byte comparison needs grpcio-tools {made_by} (installed: {version('grpcio-tools')})")
    for f, c in zip(fresh, committed):
        assert f.read_bytes() == c.read_bytes(), f"{c.name} is stale: run python -m tiesfed.protos.generate"


def test_replay_reproduces_the_aggregator(family, tmp_path):
    """What a sharded aggregator re-folds after losing a shard: `Round.replay()`
    (committed contributions and the folded part of live uploads) rebuilds the
    accumulators bit for bit."""
    from tiesfed.coordinator.aggregator import Aggregator

    given = {}

    def factory(manifest, spec, replay):
        given["replay"] = replay
        return Aggregator(manifest, spec)

    cfg = CoordinatorConfig(listen="127.0.0.1:0", spool_dir=tmp_path / "spool", base_model=str(family[0]),
                            aggregator="local", insecure=True)  # in-process: round logic only
    with CoordinatorServer(cfg, aggregator_factory=factory) as srv:
        rnd = open_round(srv, weights=[0.5, 2.0, 1.0])
        assert given["replay"] == rnd.replay
        send(srv, "r1", "org-b", family, 1)
        data = contribution_bytes(family, 0)
        assert not raw_upload(srv, "r1", "org-a", data[: len(data) // 2], chunk=256).committed
        assert rnd.sessions["org-a"].folded
        rebuilt = Aggregator([(t.name, t.numel) for t in rnd.config.manifest], rnd.spec)
        for name, idx, val, w in rnd.replay():
            rebuilt.fold(name, idx, val, w)
        for name, acc in rnd.agg._acc.items():
            other = rebuilt._acc[name]
            assert (acc.contributions, acc.weight_total) == (other.contributions, other.weight_total)
            for k, v in acc.tensors().items():
                assert torch.equal(v, getattr(other, k)), f"{name}.{k}"


def test_stalled_stream_is_cancelled_and_resumable(family, tmp_path, coordinator):
    """A stream that holds an upload slot without sending is cut off by the watchdog;
    what it delivered stays for a resume, and the slot goes to the next client."""
    srv = coordinator(stall_after_s=0.5, max_active_uploads=1)
    open_round(srv)
    data = contribution_bytes(family, 0)
    with grpc.insecure_channel(srv.target, options=channel_options()) as ch:
        stub = pb_grpc.CoordinatorStub(ch)

        def stalling():
            yield pb.UploadChunk(round_id="r1", offset=0, data=data[:1000])
            time.sleep(3)

        with pytest.raises(grpc.RpcError) as ei:
            stub.Upload(stalling(), metadata=((CLIENT_ID_KEY, "org-a"),), timeout=30)
        assert ei.value.code() == grpc.StatusCode.CANCELLED
        st = stub.UploadStatus(pb.UploadStatusRequest(round_id="r1"), metadata=((CLIENT_ID_KEY, "org-a"),))
        assert st.committed_offset == 1000
    receipt = raw_upload(srv, "r1", "org-a", data[1000:], offset=1000)  # resume by hand
    assert receipt.committed and receipt.bytes == len(data)
    for i, c in enumerate(CLIENTS[1:], 1):
        send(srv, "r1", c, family, i)
    assert_identical(fetch_model(srv, family, tmp_path), local_model(family, tmp_path, [0, 1, 2]))


def test_model_written_by_the_coordinator_when_the_parallel_write_fails(family, tmp_path, coordinator):
    """A sharded aggregator writes the model in its actors; where that fails (say the base
    is not on a shared filesystem) the coordinator writes it itself, same bits."""
    from tiesfed.coordinator.aggregator import Aggregator

    calls = []

    class NoSharedFilesystem(Aggregator):
        def write_model(self, base_path, merged_path, out_dir, shard_bytes, metadata):
            calls.append(out_dir)
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / "half-written.safetensors").write_bytes(b"junk")
            raise FileNotFoundError(base_path)

    srv = coordinator(aggregator_factory=lambda manifest, spec: NoSharedFilesystem(manifest, spec))
    rnd = open_round(srv)
    for i, c in enumerate(CLIENTS):
        send(srv, "r1", c, family, i)
    assert rnd.wait_closed(60) and rnd.state == "finalized"
    assert calls == [rnd.spool.model_dir]
    assert not (rnd.spool.model_dir / "half-written.safetensors").exists()
    assert_identical(load_folder(rnd.spool.model_dir), local_model(family, tmp_path, [0, 1, 2]))
