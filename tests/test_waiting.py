"""Waiting that works: clients started before their coordinator, and hours-long
waits on one round (compressed here to seconds with a faster ping policy).

Real gRPC on loopback; every coordinator is stopped by its fixture.
"""

from __future__ import annotations

import socket
import threading
import time

import grpc
import pytest

from tests.test_federated import FAST, coordinator, family, open_round, send  # noqa: F401
from tiesfed.client.federated import Connection, FederatedError
from tiesfed.coordinator.server import CoordinatorConfig, CoordinatorServer
from tiesfed.protos.v1 import CLIENT_ID_KEY, channel_options
from tiesfed.protos.v1 import tiesfed_pb2 as pb
from tiesfed.protos.v1 import tiesfed_pb2_grpc as pb_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_client_started_before_the_coordinator_waits_for_it(tmp_path, family):  # noqa: F811
    port = free_port()
    result: dict = {}

    def client() -> None:
        try:
            result["receipt"] = send(_Target(port), "r1", "org-a", family, 0, wait_for_coordinator=60)
        except Exception as e:  # surfaced by the assertion below
            result["error"] = e

    t = threading.Thread(target=client)
    t.start()
    time.sleep(2.0)  # the client is dialling a port nobody listens on
    assert t.is_alive() and not result, "the client gave up instead of waiting"
    cfg = CoordinatorConfig(listen=f"127.0.0.1:{port}", spool_dir=tmp_path / "spool", base_model=str(family[0]),
                            aggregator="local", insecure=True)  # in-process: waiting logic, not identity
    srv = CoordinatorServer(cfg).start()
    try:
        open_round(srv, clients=["org-a", "org-b"])
        t.join(60)
        assert not t.is_alive()
        assert "error" not in result, result.get("error")
        assert result["receipt"].nnz > 0
        assert set(srv.manager.get("r1").committed) == {"org-a"}
    finally:
        srv.stop(grace=0)


class _Target:
    """`send` takes a server; before one exists the client only needs its target."""

    def __init__(self, port: int) -> None:
        self.target = f"127.0.0.1:{port}"


def test_waiting_is_bounded_and_says_so():
    port = free_port()
    started = time.monotonic()
    with pytest.raises(FederatedError, match=r"no coordinator answered at 127\.0\.0\.1:\d+ within 1\.5 s"):
        Connection(f"127.0.0.1:{port}", "org-a", FAST, insecure=True, wait_s=1.5)
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("target", ["127.0.0.1", "localhost:", "host:port", "127.0.0.1:70000", ":50051"])
def test_malformed_target_is_a_clear_error(target):
    with pytest.raises(ValueError, match="must be HOST:PORT"):
        Connection(target, "org-a", FAST, insecure=True)


def _hold_watch(target: str, keepalive_ms: int, seconds: float) -> grpc.StatusCode | None:
    """Watch a round that stays quiet; return the status code if the stream is cut, None if it held."""
    ch = grpc.insecure_channel(target, options=channel_options(keepalive_ms))
    try:
        stub = pb_grpc.CoordinatorStub(ch)
        stream = stub.Watch(pb.WatchRequest(round_id="r1"), metadata=((CLIENT_ID_KEY, "org-a"),), timeout=seconds)
        try:
            for _ in stream:
                pass
        except grpc.RpcError as e:
            return None if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED else e.code()
        return None
    finally:
        ch.close()


def test_a_long_wait_is_not_cut_off_by_keepalive_pings(coordinator):  # noqa: F811
    """Clients ping every keepalive_ms on a quiet stream; the server must accept that
    rate. 200 ms pings for 4 s stand in for 30 s pings over an hours-long wait."""
    srv = coordinator(keepalive_ms=200)
    open_round(srv)
    assert _hold_watch(srv.target, keepalive_ms=200, seconds=4.0) is None


def test_control_a_server_that_refuses_the_ping_rate_cuts_the_wait(coordinator):  # noqa: F811
    """The same wait against a server whose policy is slower than the client's pings is
    cut with GOAWAY (too_many_pings): the failure the test above guards against."""
    srv = coordinator(keepalive_ms=30_000)  # accepts one ping per 15 s without data
    open_round(srv)
    assert _hold_watch(srv.target, keepalive_ms=200, seconds=6.0) == grpc.StatusCode.UNAVAILABLE


def test_a_download_that_stops_short_fails_instead_of_spinning(family, tmp_path, coordinator, monkeypatch):  # noqa: F811
    """A coordinator whose stream ends before the promised size: the client retries with
    backoff, then gives up with a clear error (it used to ask again forever)."""
    from tiesfed.client.federated import fetch
    from tiesfed.coordinator import service

    srv = coordinator()
    open_round(srv, clients=["org-a"])
    send(srv, "r1", "org-a", family, 0)

    def stops_short(merged, offset, context):
        yield pb.DownloadChunk(offset=offset, data=b"", total_bytes=merged.bytes, sha256=merged.sha256)
        return offset

    monkeypatch.setattr(service, "_send_merged", stops_short)
    started = time.monotonic()
    with pytest.raises(FederatedError, match=r"stream stops at byte 0 of [\d,]+"):
        fetch(srv.target, "r1", "org-a", family[0], tmp_path / "out", timeout=30, retry=FAST, insecure=True)
    assert time.monotonic() - started < 30
