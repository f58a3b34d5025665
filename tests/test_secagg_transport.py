"""The secure round's transport (issue 13): the support phase's messages stream in chunks
(a round whose bitmaps exceed the gRPC message limit completes), a step's declared size is
bounded by the round, a bad stream changes nothing, and a phase waits past its deadline for
an expected client whose stream makes progress, not for one that stalled.

In-process coordinators and clients over real gRPC and mutual TLS, as in test_secagg_round.
"""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

import tiesfed.coordinator.service as service
import tiesfed.protos.v1 as v1
from tests.helpers import make_model, wait_until
from tests.test_federated import FAST, assert_identical
from tests.test_secagg_round import (  # noqa: F401
    CLIENTS,
    family,
    fetch_secure,
    grid,
    plain_round,
    secure_server,
    secure_status,
    submit_threads,
)
from tiesfed.client.connection import Connection, spec_options
from tiesfed.client.federated import FederatedError
from tiesfed.client.secure import SecureFlow, flat_contribution, secagg_round, secure_spec, step_stream
from tiesfed.coordinator.rounds import RoundConfig
from tiesfed.core.methods import get_method
from tiesfed.core.secagg.support import pack_support
from tiesfed.io.model_io import ModelReader
from tiesfed.protos.v1 import channel_options
from tiesfed.protos.v1 import secagg_pb2 as spb
from tiesfed.protos.v1 import secagg_pb2_grpc as spb_grpc
from tiesfed.protos.v1 import tiesfed_pb2 as pb
from tiesfed.protos.v1 import tiesfed_pb2_grpc as pb_grpc
from tiesfed.trust.identity import Identity, secure_channel
from tiesfed.trust.secagg import SecAggClient
from tiesfed.trust.secagg.messages import to_bytes

LIMIT = 64 << 10  # the gRPC message limit of the small-limit round, on both sides
PHASE_S = 1.5


def config(phase_s: float, threshold: int = 2, **secagg) -> RoundConfig:
    return RoundConfig(round_id="r1", participants=list(CLIENTS), secure_aggregation=True,
                       secagg={"bound": 0.125, "threshold": threshold, "phase_s": phase_s, **secagg})


def wait_done(srv, timeout: float = 60.0) -> str:
    r = srv.manager.get("r1")
    end = time.monotonic() + timeout
    while r.state not in ("finalized", "failed") and time.monotonic() < end:
        time.sleep(0.05)
    return r.state


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A base and three fine-tunes of 1M parameters (|τ| < 0.1 on the 2^-12 grid), and the size
    of client 0's support bitmap (over 64 KiB)."""
    root = tmp_path_factory.mktemp("widefam")
    g = torch.Generator().manual_seed(7)
    shape = (1024, 1024)
    base = {"w": grid(torch.randn(shape, generator=g))}
    tuned = [{"w": base["w"] + grid((0.03 * torch.randn(shape, generator=g)).clamp(-0.09, 0.09))} for _ in CLIENTS]
    tau = (tuned[0]["w"] - base["w"]).flatten()
    top = torch.topk(tau.abs(), tau.numel() // 5).indices.sort().values
    return (make_model(root / "base", base, shards=1, config={"model_type": "toy", "hidden_size": 16}),
            [make_model(root / f"ft{i}", t, shards=1) for i, t in enumerate(tuned)],
            len(pack_support(top, tau.numel())))  # bytes of client 0's k = 20 % support bitmap


def test_a_round_whose_bitmaps_exceed_the_message_limit_completes(wide, tmp_path, pki, secure_server, monkeypatch):
    """With a 64 KiB gRPC message limit on both sides (which real gRPC enforces: a whole
    bitmap in one unary Step is RESOURCE_EXHAUSTED), the secure round's bitmaps and U travel
    in chunks and the merge equals the plain round's bit for bit."""
    want = plain_round(wide, tmp_path, [0, 1, 2])
    assert wide[2] > LIMIT  # the premise: a client's bitmap alone is over the limit
    monkeypatch.setattr(v1, "MAX_MESSAGE_BYTES", LIMIT)
    monkeypatch.setattr(service, "DOWNLOAD_CHUNK", LIMIT // 2)
    srv = secure_server(config(60.0), base=wide[0])
    with secure_channel(srv.target, Identity.load(pki.client("org-a")), options=channel_options()) as ch:
        with pytest.raises(grpc.RpcError) as e:
            spb_grpc.SecureAggregationStub(ch).Step(spb.SecAggStep(round_id="r1", phase="keys",
                                                                   payload=b"\0" * (2 * LIMIT)), timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    results = submit_threads(pki, wide, srv.target, [0, 1, 2], chunk_bytes=LIMIT // 2)
    assert not [r for r in results if isinstance(r, Exception)], results
    assert min(r.bytes for r in results) > 2 * LIMIT  # the support phase alone sent more than a message holds
    assert wait_done(srv) == "finalized", srv.manager.get("r1").message
    assert_identical(fetch_secure(srv.target, pki, wide, tmp_path), want)


def test_step_stream_refuses_an_oversized_declaration_and_a_bad_stream_changes_nothing(family, pki,  # noqa: F811
                                                                                       secure_server):
    """A declared size above what the round's parameters imply is refused before buffering; a
    stream whose bytes do not match its sha256 (or its size) is refused and takes nothing: a
    different message from the same client is accepted afterwards."""
    srv = secure_server(config(60.0))
    conn = Connection(srv.target, tls=pki.client("org-a"), retry=FAST)
    spec = conn.round_spec("r1")
    rnd = secagg_round(spec, secure_spec(conn, "r1"), spec_options(spec))
    ident = Identity.load(pki.client("org-a"))
    first, second = (to_bytes(SecAggClient(ident, rnd, torch.tensor([3]), torch.tensor([0.01])).advertise())
                     for _ in range(2))
    stub = spb_grpc.SecureAggregationStub(conn.channel)

    def send(*chunks: spb.StepChunk) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as e:
            stub.StepStream(iter(chunks), metadata=conn.metadata, timeout=10)
        return e.value

    huge = send(spb.StepChunk(round_id="r1", phase="keys", total_bytes=1 << 40, data=first[:10]))
    assert huge.code() == grpc.StatusCode.INVALID_ARGUMENT and "allow at most" in huge.details()
    bad = send(spb.StepChunk(round_id="r1", phase="keys", total_bytes=len(first), data=first[:100]),
               spb.StepChunk(data=first[100:], sha256="0" * 64))
    assert bad.code() == grpc.StatusCode.DATA_LOSS
    short = send(spb.StepChunk(round_id="r1", phase="keys", total_bytes=len(first) + 1, data=first,
                               sha256=hashlib.sha256(first).hexdigest()))
    assert short.code() == grpc.StatusCode.INVALID_ARGUMENT and "ended after" in short.details()
    assert secure_status(srv.target, pki).arrived == []
    round_dir = srv.secure.sessions["r1"].journal.dir.parent  # the streams were written there as they came
    assert list(round_dir.glob(".*.incoming")) == [] and not (round_dir / "secagg" / "keys").exists()
    assert step_stream(conn, "r1", "keys", second, chunk_bytes=100).phase == "keys"  # nothing of `first` was taken
    assert secure_status(srv.target, pki).arrived == ["org-a"]
    conn.close()


def flows(target: str, pki, family, faults: dict[int, object], chunk_bytes: int) -> list[SecureFlow]:  # noqa: F811
    out = []
    for i, c in enumerate(CLIENTS):
        conn = Connection(target, tls=pki.client(c), retry=FAST)
        spec = conn.round_spec("r1")
        opts = spec_options(spec)
        with ModelReader(family[0]) as b, ModelReader(family[1][i]) as ft:
            idx, val = flat_contribution(spec, b, ft, get_method(opts.method).trim_spec(opts, None), opts,
                                         spec.participants[i].model_key)
        out.append(SecureFlow(conn, secagg_round(spec, secure_spec(conn, "r1"), opts), idx, val, chunk_bytes,
                              fault=faults.get(i)))
    return out


def run_flows(fl: list[SecureFlow]) -> list:
    def one(f: SecureFlow):
        try:
            f.run()
            return None
        except Exception as e:
            return e
        finally:
            f.conn.close()

    with ThreadPoolExecutor(len(fl)) as pool:
        return list(pool.map(one, fl))


def test_a_slow_steady_masked_upload_is_waited_for_past_the_deadline(family, tmp_path, pki,  # noqa: F811
                                                                    secure_server):
    """phase_s = 1.5 s and a masked upload that takes several times that, a piece every
    0.25 s (1 KB/s, above this round's min_rate): the phase stays open while its bytes keep
    coming, and the slow client is counted (the merge of all three)."""
    srv = secure_server(config(PHASE_S, min_rate=256))
    seen: dict[str, float] = {}

    def slow(attempt: int, i: int) -> bool:
        if i == 0:
            seen["deadline"] = secure_status(srv.target, pki).phase_deadline_unix
        time.sleep(0.25)
        seen["last"] = time.time()
        return False

    fl = flows(srv.target, pki, family, {2: slow}, chunk_bytes=256)
    assert run_flows(fl) == [None, None, None]
    assert seen["last"] > seen["deadline"] + PHASE_S  # the premise: it streamed well past the deadline
    assert wait_done(srv) == "finalized", srv.manager.get("r1").message
    assert_identical(fetch_secure(srv.target, pki, family, tmp_path), plain_round(family, tmp_path, [0, 1, 2]))


def test_a_stalled_masked_upload_is_dropped_at_the_deadline(family, tmp_path, pki, secure_server):  # noqa: F811
    """A masked upload that sends a few pieces and then stalls: the phase closes phase_s after
    its last bytes, and the round completes over the other two."""
    srv = secure_server(config(PHASE_S))
    stall = threading.Event()

    def stalled(attempt: int, i: int) -> bool:
        if attempt == 0 and i == 2:
            stall.wait(60)
            return True  # the round is over: break the stream
        return False

    fl = flows(srv.target, pki, family, {2: stalled}, chunk_bytes=256)
    pool = ThreadPoolExecutor(3)
    done = pool.submit(run_flows, fl)
    try:
        assert wait_done(srv) == "finalized", srv.manager.get("r1").message
    finally:
        stall.set()
    errors = done.result(timeout=60)
    pool.shutdown()
    assert errors[:2] == [None, None] and isinstance(errors[2], FederatedError)
    with secure_channel(srv.target, Identity.load(pki.client("org-a")), options=channel_options()) as ch:
        st = pb_grpc.CoordinatorStub(ch).GetRoundStatus(pb.GetRoundStatusRequest(round_id="r1"), timeout=10)
    assert st.state == pb.ROUND_STATE_FINALIZED
    assert_identical(fetch_secure(srv.target, pki, family, tmp_path), plain_round(family, tmp_path, [0, 1]))


def test_a_participants_long_polls_are_capped_and_the_others_still_answer(family, pki, secure_server):  # noqa: F811
    """A secure Poll holds a server thread for up to 30 s, so a participant's polls count as
    Watch calls: two at once, a third is RESOURCE_EXHAUSTED at once naming the cap (before, any
    number could take the worker threads), and another participant's calls still answer."""
    srv = secure_server(config(phase_s=60))
    poll = spb.SecAggPoll(round_id="r1", phase="keys", wait_seconds=4)  # keys stays open: each waits 4 s
    with secure_channel(srv.target, Identity.load(pki.client("org-a")), options=channel_options()) as ch:
        stub = spb_grpc.SecureAggregationStub(ch)
        unary = stub.Poll.future(poll, timeout=30)
        streamed: list = []
        reader = threading.Thread(target=lambda: streamed.extend(stub.PollStream(poll, timeout=30)))
        reader.start()
        end = time.monotonic() + 10
        while srv.gate.in_flight("Watch") < 2:
            assert time.monotonic() < end, "the two polls were not admitted"
            time.sleep(0.02)
        with pytest.raises(grpc.RpcError) as ei:
            stub.Poll(poll, timeout=30)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "SecurePoll" in ei.value.details() and "org-a" in ei.value.details()
        with secure_channel(srv.target, Identity.load(pki.client("org-b")), options=channel_options()) as other:
            st = spb_grpc.SecureAggregationStub(other).Status(spb.SecureSpecRequest(round_id="r1"), timeout=10)
            assert st.phase == "keys"
        assert not unary.result().ready
        reader.join(30)
        assert [c.ready for c in streamed] == [False]
    assert srv.gate.in_flight("Watch") == 0  # released when the calls end


def test_a_poll_answer_that_is_never_read_is_cancelled(family, pki, secure_server, monkeypatch):  # noqa: F811
    """A participant that opens a PollStream and stops reading blocked the coordinator's send on
    flow control, holding a thread and one of its two polls for as long as the connection lived.
    The Download's stall watch now covers the poll's sends: after `stall_after_s` without one, the
    call is cancelled and the poll slot freed. (The answer is made large here, as U's bitmap is
    for a real model, so that it cannot all fit in the flow-control window.)"""
    from tiesfed.coordinator.secure.session import SecureSession

    class Large:
        size, sha256 = 256 << 20, "0" * 64

        def chunks(self, n: int):
            for _ in range(self.size // n):
                yield bytes(n)

    monkeypatch.setattr(SecureSession, "poll", lambda self, cid, phase, wait_s: Large())
    srv = secure_server(config(PHASE_S))
    srv.secure.service.stalls.stall_after_s = 1.0
    unread = channel_options() + [("grpc.http2.bdp_probe", 0)]
    with secure_channel(srv.target, Identity.load(pki.client("org-a")), options=unread) as ch:
        call = spb_grpc.SecureAggregationStub(ch).PollStream(
            spb.SecAggPoll(round_id="r1", phase="keys", wait_seconds=1.0, max_chunk_bytes=1 << 20), timeout=60)
        try:
            assert wait_until(lambda: srv.gate.in_flight("Watch") == 1, 10)  # stuck in a send
            assert wait_until(lambda: srv.gate.in_flight("Watch") == 0, 20)  # cut off, slot freed
            with pytest.raises(grpc.RpcError) as e:
                list(call)
            assert e.value.code() == grpc.StatusCode.CANCELLED
        finally:
            call.cancel()
