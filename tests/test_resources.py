"""Fair, bounded resources under floods, over real gRPC on loopback.

Each attack runs against a real in-process coordinator; an honest client must
get through within a stated bound, the attack must leave the round as it was
(`snapshot`), and the round's merge must equal the local engine's bit for bit.
Every stream a test opens is cancelled (or ends) before it returns.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from tests.helpers import wait_until
from tests.test_federated import (  # noqa: F401
    CLIENTS,
    assert_identical,
    assert_same_state,
    contribution_bytes,
    coordinator,
    family,
    fetch_model,
    local_model,
    open_round,
    send,
    snapshot,
)
from tiesfed.coordinator import service
from tiesfed.coordinator.rounds import RoundError, slots
from tiesfed.coordinator.server import CoordinatorConfig
from tiesfed.protos.v1 import CLIENT_ID_KEY, UPLOAD_LEASE_KEY, channel_options
from tiesfed.protos.v1 import tiesfed_pb2 as pb
from tiesfed.protos.v1 import tiesfed_pb2_grpc as pb_grpc

#: An honest short call answers within this under any flood here.
SHORT_CALL_BOUND_S = 5.0


def md(client: str, *extra: tuple[str, str]) -> tuple:
    return ((CLIENT_ID_KEY, client),) + extra


def empty_chunk_stream(target: str, client: str, stop: threading.Event, out: dict) -> None:
    """An attacker: holds an upload slot with a stream of empty chunks (20 s at most)."""
    with grpc.insecure_channel(target, options=channel_options()) as ch:
        def reqs():
            for _ in range(400):
                if stop.is_set():
                    return
                yield pb.UploadChunk(round_id="r1", offset=0, data=b"")
                time.sleep(0.05)

        try:
            pb_grpc.CoordinatorStub(ch).Upload(reqs(), metadata=md(client), timeout=30)
            out[client] = grpc.StatusCode.OK
        except grpc.RpcError as e:
            out[client] = e.code()


def attack_with_empty_chunks(srv, attackers: list[str], stop: threading.Event, out: dict) -> list[threading.Thread]:
    threads = [threading.Thread(target=empty_chunk_stream, args=(srv.target, c, stop, out)) for c in attackers]
    for t in threads:
        t.start()
    assert wait_until(lambda: srv.manager.slots.holders() == {c: "stream" for c in attackers}, 10), \
        srv.manager.slots.holders()
    return threads


# ----------------------------------------------------------------------------- progress is bytes


def test_empty_chunks_lose_their_slot_and_an_honest_client_gets_through(family, tmp_path, coordinator):
    """Before: the watchdog counted messages, so two streams of empty chunks held both
    slots forever. Now only new bytes are progress: they lose their slots after
    stall_after_s, and an honest upload commits within stall_after_s + 3 s."""
    stall = 1.0
    srv = coordinator(stall_after_s=stall, lease_s=2.0, abandon_after_s=1.0, max_active_uploads=2)
    rnd = open_round(srv)
    before = snapshot(rnd)
    attackers = ["org-b", "org-c"]

    # the attack alone: cut off, and once their empty sessions are abandoned the round is as it was
    stop, out = threading.Event(), {}
    threads = attack_with_empty_chunks(srv, attackers, stop, out)
    t0 = time.monotonic()
    for t in threads:
        t.join(stall + 10)
    cut_after = time.monotonic() - t0
    stop.set()
    assert out == {c: grpc.StatusCode.CANCELLED for c in attackers}
    assert cut_after < stall + 3.0, cut_after
    assert wait_until(lambda: not rnd.sessions, 10), sorted(rnd.sessions)
    assert_same_state(before, snapshot(rnd))
    assert srv.manager.slots.free == 2

    # the attack again, with an honest client queueing behind it: it gets through
    stop, out = threading.Event(), {}
    threads = attack_with_empty_chunks(srv, attackers, stop, out)
    t0 = time.monotonic()
    res = send(srv, "r1", "org-a", family, 0)
    waited = time.monotonic() - t0
    stop.set()
    for t in threads:
        t.join(15)
    assert res.sha256 and not res.duplicate
    assert waited < stall + 3.0, waited
    assert set(rnd.committed) == {"org-a"}

    for i, c in enumerate(attackers, 1):  # the same ids, honest now: their empty sessions start over
        send(srv, "r1", c, family, i)
    assert rnd.wait_closed(60) and rnd.state == "finalized"
    assert_identical(fetch_model(srv, family, tmp_path), local_model(family, tmp_path, [0, 1, 2]))


def test_a_trickled_upload_keeps_its_slot_only_while_nobody_waits(family, tmp_path, coordinator):
    """Before: a stream delivering a few real bytes now and then (here 80 B/s) counted as
    progress and kept its slot for as long as it liked, so with one slot an honest client
    never got in. Now, while another client waits, a holder under min_upload_rate gives
    its slot up; alone, it keeps it. Its bytes stay for a resume, and the round completes."""
    srv = coordinator(stall_after_s=2.0, max_active_uploads=1, min_upload_rate=4096.0)
    rnd = open_round(srv)
    data = contribution_bytes(family, 1)
    stop, out = threading.Event(), {}

    def trickle():
        at = 0
        while at < len(data) and not stop.is_set():
            yield pb.UploadChunk(round_id="r1", offset=at, data=data[at:at + 16])
            at += 16
            time.sleep(0.2)

    def attacker():
        with grpc.insecure_channel(srv.target, options=channel_options()) as ch:
            try:
                pb_grpc.CoordinatorStub(ch).Upload(trickle(), metadata=md("org-b"), timeout=60)
                out["org-b"] = grpc.StatusCode.OK
            except grpc.RpcError as e:
                out["org-b"] = e.code()

    t = threading.Thread(target=attacker)
    t.start()
    try:
        assert wait_until(lambda: srv.manager.slots.holders() == {"org-b": "stream"}, 10)
        time.sleep(3.0)  # past the grace (stall_after_s): alone, it keeps the slot
        assert srv.manager.slots.holders() == {"org-b": "stream"} and "org-b" not in out
        res = send(srv, "r1", "org-a", family, 0)  # queues: the trickle gives its slot up
        assert res.sha256 and not res.duplicate
    finally:
        stop.set()
        t.join(30)
    assert out == {"org-b": grpc.StatusCode.CANCELLED}
    assert rnd.sessions["org-b"].offset > 0  # what it delivered waits for its resume
    send(srv, "r1", "org-b", family, 1)  # the same id, honest now: resumes and commits
    send(srv, "r1", "org-c", family, 2)
    assert rnd.wait_closed(60) and rnd.state == "finalized"
    assert_identical(fetch_model(srv, family, tmp_path), local_model(family, tmp_path, [0, 1, 2]))


# ----------------------------------------------------------------------------- one slot per client id


def test_one_client_id_holds_at_most_one_slot(family, tmp_path, coordinator, monkeypatch):
    """Before: each ReserveUpload took another slot, so one id could hold every lease.
    Now a second reservation returns the same lease, a reservation while the id's
    stream is open is not granted, and a second stream of the id is refused."""
    monkeypatch.setattr(slots, "OWN_STREAM_WAIT_S", 0.5)
    srv = coordinator(max_active_uploads=2, lease_s=10.0)
    rnd = open_round(srv)
    open_round(srv, round_id="r2", clients=["org-x"])
    before = snapshot(rnd)
    with grpc.insecure_channel(srv.target, options=channel_options()) as ch:
        stub = pb_grpc.CoordinatorStub(ch)

        def reserve(client: str, wait: float = 0.5, round_id: str = "r1") -> pb.ReserveUploadReply:
            return stub.ReserveUpload(pb.ReserveUploadRequest(round_id=round_id, wait_seconds=wait),
                                      metadata=md(client), timeout=10)

        first = reserve("org-b")
        again = [reserve("org-b") for _ in range(3)]
        assert first.granted and all(a.granted and a.lease == first.lease for a in again)
        assert srv.manager.slots.holders() == {"org-b": "lease"} and srv.manager.slots.free == 1
        other = reserve("org-a")
        assert other.granted and other.lease != first.lease
        assert not reserve("org-c").granted  # both slots taken, by two different ids

        # a reservation is for a round whose allowlist has the client, not any round
        with pytest.raises(grpc.RpcError) as ei:
            reserve("org-x", round_id="r1")
        assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED and "'r1'" in ei.value.details()
        with pytest.raises(RoundError, match="allowlist of round 'r1'"):
            srv.manager.reserve_upload("org-x", "r1", 0.0)

        # org-b's stream claims its lease; while it is open org-b gets no second slot
        hold = threading.Event()

        head = contribution_bytes(family, 1)[:8]

        def slow():
            yield pb.UploadChunk(round_id="r1", offset=0, data=head)  # 8 bytes of a real stream
            hold.wait(20)

        call = stub.Upload.future(slow(), metadata=md("org-b", (UPLOAD_LEASE_KEY, first.lease)), timeout=30)
        try:
            assert wait_until(lambda: srv.manager.slots.holders().get("org-b") == "stream", 10)
            assert not reserve("org-b").granted
            with pytest.raises(grpc.RpcError) as ei:
                stub.Upload(iter([pb.UploadChunk(round_id="r1", offset=0, data=b"")]), metadata=md("org-b"),
                            timeout=10)
            assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "one per client id" in ei.value.details()
            assert srv.manager.slots.holders() == {"org-b": "stream", "org-a": "lease"}
        finally:
            call.cancel()
            hold.set()
    assert wait_until(lambda: "org-b" not in srv.manager.slots.holders(), 10)
    before["sessions"] = sorted(rnd.sessions)  # org-b's 8 bytes wait for a resume, unfolded
    assert_same_state(before, snapshot(rnd))

    for i, c in enumerate(CLIENTS):
        send(srv, "r1", c, family, i)
    assert rnd.wait_closed(60) and rnd.state == "finalized"
    assert_identical(fetch_model(srv, family, tmp_path), local_model(family, tmp_path, [0, 1, 2]))


# ----------------------------------------------------------------------------- threads for short calls


FLOOD = dict(max_workers=64, max_watch_streams=16, max_download_streams=4, max_upload_streams=8)


def test_idle_stream_flood_leaves_threads_for_short_calls(family, tmp_path, coordinator):
    """Before: ~150 idle Watch streams took all 128 worker threads and GetRoundSpec timed
    out for everyone. Now long-lived calls are capped below max_workers (here 16 Watch,
    8 Upload of 64 threads): the excess is refused at once with RESOURCE_EXHAUSTED, and an
    honest client's short calls answer within SHORT_CALL_BOUND_S; its upload goes through."""
    idle = [f"idle-{i}" for i in range(60)]
    srv = coordinator(stall_after_s=30.0, lease_s=10.0, **FLOOD)
    rnd = open_round(srv, clients=CLIENTS + idle, quorum=len(CLIENTS))
    before = snapshot(rnd)
    stop = threading.Event()
    calls = []
    with grpc.insecure_channel(srv.target, options=channel_options()) as ch:
        stub = pb_grpc.CoordinatorStub(ch)

        def idle_upload():
            stop.wait(30)
            return
            yield  # a generator that sends nothing until the test ends

        try:
            def watch(who: str) -> None:
                calls.append(stub.Watch(pb.WatchRequest(round_id="r1"), metadata=md(who), timeout=60))

            watch(idle[0])  # idle-0 holds its 2, then asks for a third (over its own cap)
            watch(idle[0])
            assert wait_until(lambda: srv.gate.in_flight("Watch") == 2, 10)
            for i in range(2, 150):  # then 60 ids in turn
                watch(idle[0] if i == 2 else idle[i % 60])
            for i in range(40):
                calls.append(stub.Upload.future(idle_upload(), metadata=md(idle[i]), timeout=60))
            assert wait_until(lambda: sum(c.done() for c in calls) >= 150 + 40 - 16 - 8, 10)
            refused = [c for c in calls if c.done()]
            assert all(c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for c in refused)
            details = " ".join(c.details() for c in refused)
            assert "max_watch_streams" in details and "max_watches_per_client" in details
            assert "max_upload_streams" in details
            assert srv.gate.in_flight("Watch") == 16 and srv.gate.in_flight("Upload") == 8

            for name, req in (("GetRoundSpec", pb.GetRoundSpecRequest(round_id="r1")),
                              ("GetRoundStatus", pb.GetRoundStatusRequest(round_id="r1")),
                              ("UploadStatus", pb.UploadStatusRequest(round_id="r1")),
                              ("ReserveUpload", pb.ReserveUploadRequest(round_id="r1"))):
                t0 = time.monotonic()
                getattr(stub, name)(req, metadata=md("org-a"), timeout=SHORT_CALL_BOUND_S)
                assert time.monotonic() - t0 < SHORT_CALL_BOUND_S, name
            assert_same_state(before, snapshot(rnd))
        finally:
            stop.set()
            for c in calls:
                c.cancel()
    assert wait_until(lambda: srv.gate.in_flight() == 0, 10), srv.gate.in_flight()
    assert_same_state(before, snapshot(rnd))

    # the flood is gone; the round's uploads and the fetch (Watch, then Download) go through
    for i, c in enumerate(CLIENTS):
        send(srv, "r1", c, family, i)
    rnd.close(timeout=60)
    assert rnd.state == "finalized"
    assert_identical(fetch_model(srv, family, tmp_path), local_model(family, tmp_path, [0, 1, 2]))


def test_stream_limits_are_below_the_worker_threads():
    """The configured caps must leave threads for short calls, or the config is refused."""
    assert CoordinatorConfig().max_workers >= (CoordinatorConfig().max_watch_streams
                                               + CoordinatorConfig().max_download_streams
                                               + CoordinatorConfig().max_upload_streams + 32)
    with pytest.raises(ValueError, match="max_workers"):
        CoordinatorConfig(max_workers=64, max_watch_streams=32)


# ----------------------------------------------------------------------------- downloads


def test_downloads_are_capped_per_client_and_in_total(family, tmp_path, coordinator, monkeypatch):
    """Before: every stalled Download held its buffers (~3 MiB each), without limit.
    Now a client id holds at most 2, the coordinator serves at most max_download_streams
    (here 4), each with one chunk in flight; the excess is refused at once, and once the
    hogs let go an honest fetch gets the merge, bit for bit."""
    srv = coordinator(**FLOOD)
    rnd = open_round(srv)
    for i, c in enumerate(CLIENTS):
        send(srv, "r1", c, family, i)
    assert rnd.wait_closed(60) and rnd.state == "finalized"
    before = snapshot(rnd)
    calls = []
    with grpc.insecure_channel(srv.target, options=channel_options()) as ch, monkeypatch.context() as m:
        m.setattr(service, "DOWNLOAD_CHUNK", 1)  # tiny chunks: unread streams stall on flow control
        stub = pb_grpc.CoordinatorStub(ch)

        def download(client: str):
            calls.append(stub.Download(pb.DownloadRequest(round_id="r1"), metadata=md(client), timeout=60))
            return calls[-1]

        try:
            hogs = [download("org-a"), download("org-a"), download("org-b"), download("org-b")]
            assert wait_until(lambda: srv.gate.in_flight("Download") == 4, 10)
            third = download("org-a")
            other = download("org-c")
            assert wait_until(lambda: third.done() and other.done(), 10)
            assert third.code() == other.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_downloads_per_client" in third.details()
            assert "max_download_streams" in other.details()
            assert not any(h.done() for h in hogs)
        finally:
            for c in calls:
                c.cancel()
    assert wait_until(lambda: srv.gate.in_flight() == 0, 10), srv.gate.in_flight()
    assert_same_state(before, snapshot(rnd))
    assert_identical(fetch_model(srv, family, tmp_path, client="org-c"), local_model(family, tmp_path, [0, 1, 2]))
