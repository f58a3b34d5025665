"""A secure round survives its coordinator (issue 13): the protocol's inputs are journalled in
the round's spool, a restarted coordinator replays them to the phase it had reached, and the
clients ride through on their retries. Real processes, real gRPC, mutual TLS.

The coordinator is a `tiesfed coordinator serve --secure-aggregation` process, SIGKILLed and
started again on the same spool and port three times: after the key phase closed, in the
middle of a masked upload (two others already in the sum), and after every masked upload.
The clients run `SecureFlow` phase by phase in this process, so each kill lands where it
should. The family's task vectors lie on the fixed-point grid, so the secure merge equals
the plain round's bit for bit (as the round without a restart does, `test_secagg_round`).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

from tests.test_federated import assert_identical
from tests.test_secagg_round import (  # noqa: F401
    CLIENTS,
    ENV,
    client_process,
    family,
    fetch_secure,
    finish,
    plain_round,
    secure_config,
    secure_server,
    submit_threads,
)
from tests.test_secagg_round import flows_for as round_flows
from tiesfed.client.connection import Connection, Retry
from tiesfed.client.secure import SecureFlow
from tiesfed.protos.v1 import channel_options
from tiesfed.protos.v1 import secagg_pb2 as spb
from tiesfed.protos.v1 import secagg_pb2_grpc as spb_grpc
from tiesfed.protos.v1 import tiesfed_pb2 as pb
from tiesfed.protos.v1 import tiesfed_pb2_grpc as pb_grpc
from tiesfed.trust.identity import Identity, secure_channel
from tiesfed.trust.secagg import SecAggClient
from tiesfed.trust.secagg.messages import to_bytes

#: Long enough to wait out a coordinator's restart (a fresh Python process).
PATIENT = Retry(attempts=40, backoff_s=0.1, max_backoff_s=1.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Coordinator:
    """`tiesfed coordinator serve --secure-aggregation` on a fixed port and spool, killed and
    started again at will."""

    def __init__(self, tmp_path: Path, family, pki) -> None:
        self.port_file = tmp_path / "port"
        self.target = f"127.0.0.1:{free_port()}"
        self.cmd = [sys.executable, "-m", "tiesfed.cli", "coordinator", "serve", "--tls", str(pki.server), "--spool",
                    str(tmp_path / "spool"), "--base", str(family[0]), "--aggregator", "local", "--listen",
                    self.target, "--round", "r1", "--clients", ",".join(CLIENTS), "--secure-aggregation",
                    "--port-file", str(self.port_file)]
        self.journal = tmp_path / "spool" / "rounds" / "r1" / "secagg"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.port_file.unlink(missing_ok=True)
        self.proc = subprocess.Popen(self.cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        end = time.monotonic() + 60
        while not self.port_file.exists():
            assert self.proc.poll() is None, self.proc.stderr.read()
            assert time.monotonic() < end, "the coordinator did not start"
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, "the coordinator died on its own"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            finish(self.proc, 30)


def flows_for(target: str, pki, family, chunk_bytes: int = 1 << 20) -> tuple[list[Connection], list[SecureFlow]]:
    """One `SecureFlow` per client, with a retry policy that outlasts a restart."""
    return round_flows(target, pki, family, PATIENT, chunk_bytes)


def secure_stub_call(target: str, pki, method: str, request, client: str = "org-a"):
    """One SecureAggregation call, retried while a just-started coordinator is not yet answering."""
    end = time.monotonic() + 20
    while True:
        try:
            with secure_channel(target, Identity.load(pki.client(client)), options=channel_options()) as ch:
                return getattr(spb_grpc.SecureAggregationStub(ch), method)(request, timeout=10)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > end:
                raise
            time.sleep(0.1)


def wait_phase(target: str, pki, phase: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while (st := secure_stub_call(target, pki, "Status", spb.SecureSpecRequest(round_id="r1"))).phase != phase:
        assert time.monotonic() < end, f"still in phase {st.phase!r} ({st.message}), waiting for {phase!r}"
        time.sleep(0.05)


def wait_finalized(target: str, pki, timeout: float = 60.0) -> pb.RoundStatus:
    end = time.monotonic() + timeout
    with secure_channel(target, Identity.load(pki.client("org-a")), options=channel_options()) as ch:
        while True:
            st = pb_grpc.CoordinatorStub(ch).GetRoundStatus(pb.GetRoundStatusRequest(round_id="r1"), timeout=10)
            if st.state in (pb.ROUND_STATE_FINALIZED, pb.ROUND_STATE_FAILED) or time.monotonic() > end:
                return st
            time.sleep(0.1)


def test_a_coordinator_killed_three_times_mid_protocol_completes_the_round(family, tmp_path, pki):  # noqa: F811
    """SIGKILL after the key phase closed, during org-c's masked upload (org-a's and org-b's
    already in the sum; org-c resumes at the prefix the restarted coordinator still holds),
    and after every masked upload: the round completes with all three, equal bit for bit to
    the plain round of the same inputs. An identical key advert sent again after the restart
    is acknowledged, a different one refused; the journal is gone once the merge is out."""
    coord = Coordinator(tmp_path, family, pki)
    conns, flows = flows_for(coord.target, pki, family, chunk_bytes=1024)
    try:
        adverts = [to_bytes(f.client.advertise()) for f in flows]
        for f, advert in zip(flows, adverts):
            f._step("keys", advert)
        wait_phase(coord.target, pki, "shares")
        coord.restart()  # 1: the key list was formed; no client has read it yet

        flows[0]._step("keys", adverts[0])  # a retry of a message already taken: acknowledged
        with pytest.raises(grpc.RpcError) as e:
            stub = spb_grpc.SecureAggregationStub(conns[0].channel)
            stub.Step(spb.SecAggStep(round_id="r1", phase="keys", payload=adverts[1]), metadata=conns[0].metadata,
                      timeout=10)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED  # org-b's advert from org-a
        other = SecAggClient(conns[0].identity, flows[0].round, torch.tensor([0]), torch.tensor([0.01]))
        with pytest.raises(grpc.RpcError) as e:  # org-a's own advert, but another one: refused
            stub.Step(spb.SecAggStep(round_id="r1", phase="keys", payload=to_bytes(other.advertise())),
                      metadata=conns[0].metadata, timeout=10)
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS and "different keys message" in e.value.details()
        for f in flows:
            f.shares()
        flows[0].masked()
        flows[1].masked()

        # 2: org-c's masked upload is cut by the kill once the coordinator holds a prefix of it
        cut, resumed = threading.Event(), threading.Event()

        def held() -> int:
            st = secure_stub_call(coord.target, pki, "MaskedStatus", spb.SecureSpecRequest(round_id="r1"), "org-c")
            return st.committed_offset

        def fault(attempt: int, piece: int) -> bool:
            if (attempt, piece) == (0, 3):
                cut.set()
                resumed.wait(90)
            return False

        flows[2].fault = fault
        errors: list[BaseException] = []

        def upload() -> None:
            try:
                flows[2].masked()
            except BaseException as exc:  # noqa: BLE001 (reported by the assertion below)
                errors.append(exc)

        t = threading.Thread(target=upload)
        t.start()
        assert cut.wait(60)
        end = time.monotonic() + 10
        while held() < 2 * 1024 and time.monotonic() < end:
            time.sleep(0.02)
        before = held()
        assert before > 0
        coord.restart()
        resumed.set()
        t.join(120)
        assert not t.is_alive() and not errors, errors
        assert flows[2].resumed_from and flows[2].resumed_from[0] >= before, (flows[2].resumed_from, before)
        wait_phase(coord.target, pki, "unmask")
        coord.restart()  # 3: every masked vector is in; the unmask request was formed

        for f in flows:
            f.unmask()
        st = wait_finalized(coord.target, pki)
        assert st.state == pb.ROUND_STATE_FINALIZED, st.message
        assert st.message.endswith(", ".join(CLIENTS)), st.message
        got = fetch_secure(coord.target, pki, family, tmp_path)
        end = time.monotonic() + 10  # the journal goes right after the publish
        while coord.journal.exists() and time.monotonic() < end:
            time.sleep(0.02)
    finally:
        for conn in conns:
            conn.close()
        coord.stop()
    assert not coord.journal.exists()
    assert_identical(got, plain_round(family, tmp_path, [0, 1, 2]))


def test_cli_clients_ride_through_a_coordinator_killed_mid_round(family, tmp_path, pki):  # noqa: F811
    """`tiesfed client submit` processes with their default retry policy: org-a and org-b have
    advertised and wait for the key list when the coordinator is SIGKILLed and started again;
    the restarted one holds their adverts from its journal, org-c joins, every
    client exits 0 and the merge equals the plain round's."""
    coord = Coordinator(tmp_path, family, pki)
    procs = [client_process(pki, family, coord.target, i) for i in range(2)]
    try:
        end = time.monotonic() + 60
        while len(secure_stub_call(coord.target, pki, "Status", spb.SecureSpecRequest(round_id="r1")).arrived) < 2:
            assert time.monotonic() < end and all(p.poll() is None for p in procs), "the clients did not advertise"
            time.sleep(0.05)
        coord.restart()
        st = secure_stub_call(coord.target, pki, "Status", spb.SecureSpecRequest(round_id="r1"))
        assert (st.phase, list(st.arrived)) == ("keys", ["org-a", "org-b"])
        procs.append(client_process(pki, family, coord.target, 2))
        for p in procs:
            rc, err = finish(p, 120)
            assert rc == 0, err
        st = wait_finalized(coord.target, pki)
        assert st.state == pb.ROUND_STATE_FINALIZED and st.message.endswith(", ".join(CLIENTS)), st.message
        got = fetch_secure(coord.target, pki, family, tmp_path)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        coord.stop()
    assert_identical(got, plain_round(family, tmp_path, [0, 1, 2]))


def test_a_restart_while_the_merge_is_written_publishes_it_again(family, tmp_path, pki, secure_server,  # noqa: F811
                                                                 monkeypatch):
    """Every phase closed and the round marked finalizing, then the coordinator stops before
    the merge is out (its publish held back here, as a crash in the middle of writing it
    would): the restarted coordinator replays the whole journal, unmasks again and
    publishes; the merge equals the plain round's."""
    import tiesfed.coordinator.secure.session as session

    held = threading.Event()

    def crash_while_writing(r, *a, **kw) -> None:
        with r.lock:
            r.state = "finalizing"
            r._persist()
        held.set()

    monkeypatch.setattr(session, "publish", crash_while_writing)
    srv = secure_server(secure_config())
    results = submit_threads(pki, family, srv.target, [0, 1, 2])
    assert all(not isinstance(x, Exception) for x in results), results
    assert held.wait(30)
    r = srv.manager.get("r1")
    assert r.state == "finalizing" and not r.spool.merged_path.exists()
    srv.stop(grace=0)
    monkeypatch.undo()
    again = secure_server(secure_config())
    r = again.manager.get("r1")
    assert r.wait_closed(60) and r.state == "finalized", r.message
    assert r.message.endswith(", ".join(CLIENTS)), r.message
    assert_identical(fetch_secure(again.target, pki, family, tmp_path), plain_round(family, tmp_path, [0, 1, 2]))


def test_a_damaged_masked_upload_found_on_restart_is_left_out(family, tmp_path, pki, secure_server):  # noqa: F811
    """org-a's masked upload is in the journal when the coordinator stops, and a byte of it flips
    on disk. The restarted coordinator checks it against the sha256 it was received with and
    drops it (the masked phase is still open: MaskedStatus reports nothing held); org-a, which
    had its acknowledgement, does not send again, so it counts as a client that dropped before
    uploading: the round completes with org-b and org-c and equals their plain round. No
    damaged byte reaches the sum."""
    srv = secure_server(secure_config())
    conns, flows = flows_for(srv.target, pki, family)
    try:
        for f in flows:
            f.keys()
        for f in flows:
            f.shares()
        flows[0].masked()
        r = srv.manager.get("r1")
        (done,) = (r.spool.dir / "secagg" / "masked").glob("org-a.*.masked")
        srv.stop(grace=0)
        data = bytearray(done.read_bytes())
        data[len(data) // 2] ^= 0x01
        done.write_bytes(bytes(data))
        again = secure_server(secure_config())
        for f, conn in zip(flows, conns):  # the same clients (their keys in memory), on new connections
            conn.close()
            f.conn = Connection(again.target, tls=pki.client(f.conn.client_id), retry=PATIENT)
        conns = [f.conn for f in flows]
        st = secure_stub_call(again.target, pki, "MaskedStatus", spb.SecureSpecRequest(round_id="r1"))
        assert (st.committed, st.committed_offset) == (False, 0)
        assert not done.exists()
        for f in flows[1:]:
            f.masked()
        for f in flows[1:]:
            f.unmask()
        r = again.manager.get("r1")
        assert r.wait_closed(60) and r.state == "finalized", r.message
        assert r.message.endswith("org-b, org-c"), r.message
        got = fetch_secure(again.target, pki, family, tmp_path)
    finally:
        for conn in conns:
            conn.close()
    assert_identical(got, plain_round(family, tmp_path, [1, 2]))
