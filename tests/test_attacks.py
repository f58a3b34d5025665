"""Attacks on a running coordinator that the other suites do not cover: hostile admin
requests (enum values outside the proto's, JSON nested past Python's recursion limit,
non-finite numbers), hostile upload streams and downloads, each over real gRPC on
loopback. Every refused call gets a status naming the problem (never UNKNOWN or
INTERNAL) and leaves the round as it was (`snapshot`); the honest round still merges
exactly the local engine's model.
"""

from __future__ import annotations

import datetime as dt
import math
import threading

import grpc
import pytest

from tests.helpers import wait_until
from tests.test_admin import admin_call, round_dirs
from tests.test_federated import (  # noqa: F401
    CLIENTS,
    FAST,
    assert_identical,
    assert_same_state,
    contribution_bytes,
    coordinator,
    family,
    fetch_model,
    load_folder,
    local_model,
    open_round,
    raw_upload,
    rejected,
    send,
    snapshot,
)
from tests.test_identity import secure  # noqa: F401
from tiesfed.client.federated import fetch, submit
from tiesfed.coordinator.rounds.events import EventLog
from tiesfed.protos.v1 import CLIENT_ID_KEY, channel_options
from tiesfed.protos.v1 import secagg_pb2 as spb
from tiesfed.protos.v1 import secagg_pb2_grpc as spb_grpc
from tiesfed.protos.v1 import tiesfed_pb2 as pb
from tiesfed.protos.v1 import tiesfed_pb2_grpc as pb_grpc
from tiesfed.trust.identity import Identity, secure_channel

TOKEN = "s3cret-admin"
DEEP = "[" * 100_000 + "]" * 100_000  # valid JSON, nested past Python's recursion limit


def _open(**fields) -> pb.OpenRoundRequest:
    return pb.OpenRoundRequest(**{"round_id": "r2", "participants": [pb.Participant(client_id="org-a")],
                                  "base_fingerprint": "0" * 64,
                                  "manifest": [pb.TensorSpec(name="w", shape=[4], dtype="F32")], **fields})


HOSTILE_ROUNDS = {
    "late policy outside the enum": (dict(late_policy=99), "late_policy"),
    "replace policy outside the enum": (dict(replace_policy=-3), "replace_policy"),
    "options nested past the recursion limit": (dict(options_json=DEEP), "options_json"),
    "secagg nested past the recursion limit": (dict(secure_aggregation=True, secagg_json=DEEP), "secagg_json"),
    "NaN weight": (dict(participants=[pb.Participant(client_id="org-a", weight=math.nan)]), "weight"),
    "NaN deadline": (dict(deadline_unix=math.nan), "deadline"),
    "infinite deadline seconds": (dict(deadline_seconds=math.inf), "deadline"),
    "NaN bound": (dict(max_abs_value=math.nan), "max_abs_value"),
    "infinite secure phase": (dict(participants=[pb.Participant(client_id=c) for c in CLIENTS], secure_aggregation=True,
                                   secagg_json='{"phase_s": Infinity}'), "secagg.phase_s"),
    "infinite secure rate": (dict(participants=[pb.Participant(client_id=c) for c in CLIENTS], secure_aggregation=True,
                                  secagg_json='{"min_rate": Infinity}'), "secagg.min_rate"),
    "path traversal in the round id": (dict(round_id="../../etc"), "round_id"),
    "round id of dots": (dict(round_id=".."), "round_id"),
    "path traversal in a client id": (dict(participants=[pb.Participant(client_id="../x")]), "client_id"),
}


@pytest.mark.parametrize("case", list(HOSTILE_ROUNDS))
def test_hostile_open_round_is_a_clear_refusal(family, tmp_path, coordinator, case):
    """Before: an enum value outside the proto's (proto3 enums are open) and JSON nested
    past the recursion limit were UNKNOWN (a KeyError, a RecursionError), and a NaN or
    infinite deadline, phase_s or min_rate opened a round (whose spooled JSON then said
    null: a round no restart could load). Now each is INVALID_ARGUMENT naming the field,
    nothing written, the open round untouched."""
    srv = coordinator(admin_token=TOKEN)
    rnd = open_round(srv)
    before, dirs = snapshot(rnd), round_dirs(srv)
    fields, match = HOSTILE_ROUNDS[case]
    with pytest.raises(grpc.RpcError) as ei:
        admin_call(srv, "OpenRound", _open(**fields), TOKEN)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (ei.value.code(), ei.value.details()[:300])
    assert match in ei.value.details(), ei.value.details()[:300]
    assert round_dirs(srv) == dirs and set(srv.manager.rounds) == {"r1"}
    assert_same_state(before, snapshot(rnd))


# ----------------------------------------------------------------------------- upload streams

HOSTILE_HEADERS = {
    "trim not an object": ({"trim": "topk"}, "trim"),
    "trim a list": ({"trim": [1, 2]}, "trim"),
}


@pytest.mark.parametrize("case", list(HOSTILE_HEADERS))
def test_hostile_stream_header_is_refused_and_changes_nothing(family, tmp_path, coordinator, case):
    """Before: a header whose 'trim' was not an object was INTERNAL (an AttributeError in
    the header check). Now INVALID_ARGUMENT naming the key; the round as it was."""
    srv = coordinator()
    rnd = open_round(srv)
    send(srv, "r1", "org-b", family, 1)
    header, match = HOSTILE_HEADERS[case]
    data = contribution_bytes(family, 0, header=header)
    rejected(srv, rnd, data, grpc.StatusCode.INVALID_ARGUMENT, match)
    for i, c in [(0, "org-a"), (2, "org-c")]:
        send(srv, "r1", c, family, i)
    assert rnd.wait_closed(60) and rnd.state == "finalized"
    assert_identical(fetch_model(srv, family, tmp_path), local_model(family, tmp_path, [0, 1, 2]))


# ----------------------------------------------------------------------------- identity across rounds


def _every_participant_call(srv, who, round_id: str, data: bytes) -> dict:
    """Each participant RPC of both services on `round_id`, as `who` over mutual TLS: name -> call."""
    def unary(service, method, req):
        def call():
            with secure_channel(srv.target, Identity.load(who, check_time=False), options=channel_options()) as ch:
                stub = (pb_grpc.CoordinatorStub if service == "c" else spb_grpc.SecureAggregationStub)(ch)
                out = getattr(stub, method)(req, timeout=20)
                return list(out) if method in ("Watch", "Download", "PollStream") else out
        return call

    def streamed(service, method, msgs):
        def call():
            with secure_channel(srv.target, Identity.load(who, check_time=False), options=channel_options()) as ch:
                stub = (pb_grpc.CoordinatorStub if service == "c" else spb_grpc.SecureAggregationStub)(ch)
                return getattr(stub, method)(iter(msgs), timeout=20)
        return call

    rid = round_id
    return {
        "GetRoundSpec": unary("c", "GetRoundSpec", pb.GetRoundSpecRequest(round_id=rid)),
        "GetRoundStatus": unary("c", "GetRoundStatus", pb.GetRoundStatusRequest(round_id=rid)),
        "UploadStatus": unary("c", "UploadStatus", pb.UploadStatusRequest(round_id=rid)),
        "ReserveUpload": unary("c", "ReserveUpload", pb.ReserveUploadRequest(round_id=rid)),
        "Upload": streamed("c", "Upload", [pb.UploadChunk(round_id=rid, offset=0, data=data[:4096])]),
        "Watch": unary("c", "Watch", pb.WatchRequest(round_id=rid)),
        "Download": unary("c", "Download", pb.DownloadRequest(round_id=rid)),
        "GetSecureSpec": unary("s", "GetSecureSpec", spb.SecureSpecRequest(round_id=rid)),
        "Status": unary("s", "Status", spb.SecureSpecRequest(round_id=rid)),
        "MaskedStatus": unary("s", "MaskedStatus", spb.SecureSpecRequest(round_id=rid)),
        "Poll": unary("s", "Poll", spb.SecAggPoll(round_id=rid, phase="keys")),
        "PollStream": unary("s", "PollStream", spb.SecAggPoll(round_id=rid, phase="keys")),
        "Step": unary("s", "Step", spb.SecAggStep(round_id=rid, phase="keys", payload=b"x")),
        "StepStream": streamed("s", "StepStream", [spb.StepChunk(round_id=rid, phase="keys", total_bytes=1,
                                                                 data=b"x")]),
        "UploadMasked": streamed("s", "UploadMasked", [spb.MaskedChunk(round_id=rid, offset=0, data=b"x",
                                                                       total_bytes=1)]),
    }


def test_a_participant_of_one_round_cannot_act_on_another(secure, family, pki, tmp_path):  # noqa: F811
    """org-a (of r1) against r2 (org-d's alone, finalized, its merge on disk) on every
    participant RPC of both services: PERMISSION_DENIED naming org-a; the coordinator's
    own server certificate used as a client: refused in the handshake. Nothing changes."""
    srv = secure()
    r1 = open_round(srv)
    r2 = open_round(srv, "r2", clients=["org-d"])
    data = contribution_bytes(family, 0)
    submit(srv.target, "r2", None, family[0], family[1][3], retry=FAST, tls=Identity.load(pki.client("org-d")))
    assert r2.wait_closed(60) and r2.state == "finalized"
    # the server's certificate (no clientAuth usage) is refused in the handshake
    code, name = grpc.StatusCode.UNAVAILABLE, "Socket closed"
    for target, who in ((r1, pki.server), (r2, pki.client("org-a"))):
        before = snapshot(target)
        for rpc_name, call in _every_participant_call(srv, who, target.id, data).items():
            with pytest.raises(grpc.RpcError) as ei:
                call()
            assert ei.value.code() == code, (rpc_name, ei.value.code(), ei.value.details())
            assert name in ei.value.details(), (rpc_name, ei.value.details())
        assert_same_state(before, snapshot(target))
        assert not list(target.spool.partial_dir.iterdir())
        code, name = grpc.StatusCode.PERMISSION_DENIED, "'org-a'"
    assert r2.downloaded == set()
    for i, c in enumerate(CLIENTS):
        submit(srv.target, "r1", None, family[0], family[1][i], retry=FAST, tls=Identity.load(pki.client(c)))
    assert r1.wait_closed(60) and r1.state == "finalized"
    out = tmp_path / "fetched"
    fetch(srv.target, "r1", None, family[0], out, timeout=60, retry=FAST, tls=Identity.load(pki.client("org-a")))
    assert_identical(load_folder(out), local_model(family, tmp_path, [0, 1, 2]))


# ----------------------------------------------------------------------------- replacements


@pytest.mark.parametrize("policy", ["replace", "refuse"])
@pytest.mark.parametrize("bad", ["incomplete", "over the bound", "stale base"])
def test_a_refused_replacement_keeps_the_committed_contribution(family, tmp_path, coordinator, policy, bad):
    """A committed client sends a bad replacement (under either policy): refused, the
    committed contribution and the accumulators exactly as they were."""
    srv = coordinator()
    rnd = open_round(srv, replace_policy=policy)
    send(srv, "r1", "org-a", family, 0)
    send(srv, "r1", "org-b", family, 1)
    data = {
        "incomplete": lambda: contribution_bytes(family, 3, mutate=lambda ts: ts[:-1]),
        "over the bound": lambda: contribution_bytes(family, 3, mutate=lambda ts: ts[:-1] + [type(ts[-1])(
            ts[-1].name, ts[-1].shape, ts[-1].indices, ts[-1].values * 1e9)]),
        "stale base": lambda: contribution_bytes(family, 3, fp="sha256:" + "0" * 64),
    }[bad]()
    before = snapshot(rnd)
    with pytest.raises(grpc.RpcError) as ei:
        raw_upload(srv, "r1", "org-a", data)
    assert ei.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION), \
        (ei.value.code(), ei.value.details())
    assert_same_state(before, snapshot(rnd))
    assert not list(rnd.spool.partial_dir.iterdir())
    send(srv, "r1", "org-c", family, 2)
    assert rnd.wait_closed(60) and rnd.state == "finalized"
    assert_identical(fetch_model(srv, family, tmp_path), local_model(family, tmp_path, [0, 1, 2]))


# ----------------------------------------------------------------------------- certificates


def test_not_yet_valid_revoked_admin_and_unreadable_crl(family, tmp_path):  # noqa: F811
    """A federation of its own (its CRL is damaged here): a client certificate valid only
    from tomorrow is refused in the handshake; a revoked admin certificate cannot open or
    close a round (UNAUTHENTICATED, naming the serial); a CRL that is damaged, deleted or
    rolled back to an older one (validly signed) fails closed (UNAVAILABLE for every
    caller, admin included), and works again once restored. Nothing changes meanwhile."""
    from tiesfed.coordinator.server import CoordinatorConfig, CoordinatorServer
    from tiesfed.trust import pki as ca

    root = tmp_path / "fed"
    ca.init_ca(root / "ca")
    ca.issue(root / "ca", root / "server", server_names=["127.0.0.1"])
    ca.issue(root / "ca", root / "ops", admin_name="ops")
    bad_ops = ca.issue(root / "ca", root / "ops-old", admin_name="ops-old")
    ca.issue(root / "ca", root / "org-a", client_id="org-a")
    ca.issue(root / "ca", root / "org-a-future", client_id="org-a",
             not_before=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1))
    crl = root / "ca" / "crl.pem"
    stale = crl.read_bytes()  # signed by the CA, before the revocation
    ca.revoke(root / "ca", bad_ops.serial_hex)
    srv = CoordinatorServer(CoordinatorConfig(listen="127.0.0.1:0", spool_dir=tmp_path / "spool",
                                              base_model=str(family[0]), aggregator="local",
                                              tls_dir=root / "server", crl=root / "ca" / "crl.pem")).start()
    try:
        rnd = open_round(srv, clients=["org-a"])
        before = snapshot(rnd)

        def call(who, method, req):
            with secure_channel(srv.target, Identity.load(who, check_time=False), options=channel_options()) as ch:
                return getattr(pb_grpc.CoordinatorStub(ch), method)(req, timeout=20)

        def refused(who, method, req, code, *says):
            with pytest.raises(grpc.RpcError) as ei:
                call(who, method, req)
            assert ei.value.code() == code, (method, ei.value.code(), ei.value.details())
            for s in says:
                assert s in ei.value.details(), ei.value.details()

        spec = pb.GetRoundSpecRequest(round_id="r1")
        opening = pb.OpenRoundRequest(round_id="r2", participants=[pb.Participant(client_id="org-a")])
        closing = pb.CloseRoundRequest(round_id="r1", abort=True)
        refused(root / "org-a-future", "GetRoundSpec", spec, grpc.StatusCode.UNAVAILABLE)
        for method, req in (("OpenRound", opening), ("CloseRound", closing)):
            refused(root / "ops-old", method, req, grpc.StatusCode.UNAUTHENTICATED, "revoked", bad_ops.serial_hex)
        good = crl.read_bytes()
        crl.write_bytes(good[: len(good) // 2])  # damaged under the running coordinator
        refused(root / "org-a", "GetRoundSpec", spec, grpc.StatusCode.UNAVAILABLE, "revocation", "unreadable")
        refused(root / "ops", "CloseRound", closing, grpc.StatusCode.UNAVAILABLE, "revocation", "unreadable")
        crl.unlink()  # before: a missing list meant nothing revoked, so the revoked admin got back in
        for who in ("ops", "ops-old"):
            refused(root / who, "OpenRound", opening, grpc.StatusCode.UNAVAILABLE, "revocation", "gone")
        crl.write_bytes(stale)  # before: an older list, validly signed, was taken too
        refused(root / "ops-old", "OpenRound", opening, grpc.StatusCode.UNAVAILABLE, "revocation", "older")
        assert set(srv.manager.rounds) == {"r1"}
        assert_same_state(before, snapshot(rnd))
        crl.write_bytes(good)
        assert call(root / "org-a", "GetRoundSpec", spec).round_id == "r1"
        assert call(root / "ops", "OpenRound", opening).round_id == "r2"
    finally:
        srv.stop(grace=0)


# ----------------------------------------------------------------------------- bounded memory


def test_a_megabyte_in_a_header_value_is_refused_with_a_bounded_message(family, tmp_path, coordinator):
    """Before: the refusal quoted the header's 900 KiB 'kind' in full: the status was too big
    to send (the client got RESOURCE_EXHAUSTED, not the reason) and each attempt kept ~1 MB
    in the round's event log, so a client that repeated it grew the coordinator without
    bound. Now: INVALID_ARGUMENT naming the key, the message cut, the log small."""
    srv = coordinator()
    rnd = open_round(srv)
    send(srv, "r1", "org-b", family, 1)
    data = contribution_bytes(family, 0, header={"kind": "x" * (900 << 10)})
    for _ in range(3):
        err = rejected(srv, rnd, data, grpc.StatusCode.INVALID_ARGUMENT, "stream header kind")
        assert len(err.details()) < 4000 and "more characters" in err.details()
    assert sum(len(e.message) for e in rnd.events) < 3 * 4000
    for i, c in [(0, "org-a"), (2, "org-c")]:
        send(srv, "r1", c, family, i)
    assert rnd.wait_closed(60) and rnd.state == "finalized"
    assert_identical(fetch_model(srv, family, tmp_path), local_model(family, tmp_path, [0, 1, 2]))


def test_the_event_log_is_bounded_and_watchers_resume_in_it():
    log = EventLog(threading.RLock(), max_events=10)
    for i in range(25):
        log.append(time=0.0, kind="UPLOAD_REJECTED", message=f"#{i}")
    assert 5 <= len(log.events) <= 10 and log.events[-1].seq == 24
    assert [e.seq for e in log.events] == list(range(log.first, 25))
    assert log.since(0, 0.0, lambda: False)[0].seq == log.first  # behind the kept ones: the oldest kept
    assert [e.seq for e in log.since(23, 0.0, lambda: False)] == [23, 24]
    assert log.since(25, 0.0, lambda: False) == []
    log.append(time=0.0, kind="ROUND_FINALIZED")
    assert [e.kind for e in log.since(10**9, 0.0, lambda: True)][-1] == "ROUND_FINALIZED"


def test_a_download_that_is_never_read_is_cancelled(family, tmp_path, coordinator, monkeypatch):
    """Before: a Download whose client stopped reading blocked on flow control for as long as
    the connection lived, holding its thread and one of the capped download slots: 16
    clients that never read took all 32 for good. Now a download that sends nothing for
    stall_after_s is cancelled, its slot freed; one that reads is served to the end."""
    from tiesfed.coordinator import service

    srv = coordinator(stall_after_s=1.0, max_workers=64, max_watch_streams=16, max_download_streams=4,
                      max_upload_streams=8)
    rnd = open_round(srv)
    for i, c in enumerate(CLIENTS):
        send(srv, "r1", c, family, i)
    assert rnd.wait_closed(60) and rnd.state == "finalized"
    before = snapshot(rnd)
    # tiny chunks, and a reader whose flow-control window stays small (no BDP probing):
    # the coordinator's sends block once the window is full
    unread = channel_options() + [("grpc.http2.bdp_probe", 0)]
    with grpc.insecure_channel(srv.target, options=unread) as ch, monkeypatch.context() as m:
        m.setattr(service, "DOWNLOAD_CHUNK", 1)
        stub = pb_grpc.CoordinatorStub(ch)
        hogs = [stub.Download(pb.DownloadRequest(round_id="r1"), metadata=((CLIENT_ID_KEY, c),), timeout=60)
                for c in ("org-a", "org-a", "org-b", "org-b")]
        try:
            assert wait_until(lambda: srv.gate.in_flight("Download") == 4, 10)  # all four stuck in a send
            assert wait_until(lambda: srv.gate.in_flight("Download") == 0, 20)  # every one cut off
        finally:
            for h in hogs:
                h.cancel()
    assert_same_state(before, snapshot(rnd))
    assert_identical(fetch_model(srv, family, tmp_path, client="org-a"), local_model(family, tmp_path, [0, 1, 2]))


@pytest.mark.parametrize("field", ["stall_after_s", "min_upload_rate", "lease_s", "abandon_after_s",
                                   "num_cpus_per_actor"])
@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_operator_timeouts_and_rates_must_be_finite(field, value):
    """Was: `stall_after_s: .inf` (or a min_upload_rate of ∞) was taken, turning the watchdogs off
    or cancelling every slot holder; a config naming a NaN or ∞ is refused naming the field."""
    from pydantic import ValidationError

    from tiesfed.coordinator.server import CoordinatorConfig

    with pytest.raises(ValidationError, match=f"{field}[\\s\\S]*finite"):
        CoordinatorConfig(**{field: value})
