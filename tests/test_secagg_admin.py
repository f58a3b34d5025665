"""Secure rounds opened by the admin RPC (issue 13): `OpenRoundRequest.secure_aggregation` and
`secagg_json`, and `tiesfed coordinator open --secure-aggregation --secagg KEY=VALUE`, over real
gRPC with mutual TLS (the admin's certificate); the round then runs to completion."""

from __future__ import annotations

import json

import grpc
import pytest
from click.testing import CliRunner

from tests.test_federated import assert_identical
from tests.test_secagg_round import CLIENTS, family, fetch_secure, plain_round, submit_threads  # noqa: F401
from tiesfed.cli import main
from tiesfed.coordinator.server import CoordinatorConfig, CoordinatorServer
from tiesfed.protos.v1 import channel_options
from tiesfed.protos.v1 import tiesfed_pb2 as pb
from tiesfed.protos.v1 import tiesfed_pb2_grpc as pb_grpc
from tiesfed.trust.identity import Identity, secure_channel


@pytest.fixture
def bare_server(tmp_path, family, pki):  # noqa: F811
    """A coordinator over mutual TLS with no round yet."""
    cfg = CoordinatorConfig(listen="127.0.0.1:0", spool_dir=tmp_path / "spool", base_model=str(family[0]),
                            tls_dir=pki.server, aggregator="local")
    srv = CoordinatorServer(cfg).start()
    yield srv
    srv.stop(grace=0)


def open_round(srv, pki, req: pb.OpenRoundRequest) -> pb.RoundSpec:
    with secure_channel(srv.target, Identity.load(pki.admin), options=channel_options()) as ch:
        return pb_grpc.CoordinatorStub(ch).OpenRound(req, timeout=60)


def test_a_secure_round_opened_by_coordinator_open_runs_to_completion(family, tmp_path, pki, bare_server):  # noqa: F811
    """`coordinator open --secure-aggregation --secagg ...` with the admin identity: the round is
    secure with the settings given (the rest defaulted), three clients complete it and the
    merge equals the plain round's bit for bit."""
    res = CliRunner().invoke(main, [
        "coordinator", "open", "--target", bare_server.target, "--tls", str(pki.admin), "--round", "r1",
        "--clients", ",".join(CLIENTS), "--secure-aggregation", "--secagg", "threshold=2", "--secagg", "bound=0.125",
        "--secagg", "phase-s=20"])
    assert res.exit_code == 0, res.output
    r = bare_server.manager.get("r1")
    assert r.config.secure_aggregation and r.config.secagg is not None
    s = r.config.secagg
    assert (s.threshold, s.bound, s.phase_s, s.frac_bits, s.min_release) == (2, 0.125, 20.0, 24, 1)
    results = submit_threads(pki, family, bare_server.target, [0, 1, 2])
    assert all(not isinstance(x, Exception) for x in results), results
    assert r.wait_closed(60) and r.state == "finalized", r.message
    assert r.message.startswith("secure aggregation: the sums of 3 client(s)"), r.message
    assert_identical(fetch_secure(bare_server.target, pki, family, tmp_path), plain_round(family, tmp_path, [0, 1, 2]))


def test_open_round_secure_fields_are_checked_and_optional(pki, bare_server):
    """secagg_json without secure_aggregation, a malformed one, or settings the participants
    cannot meet: INVALID_ARGUMENT naming why, and no round is made. A request without the new
    fields (an older admin client) opens a plain round, as before."""
    who = [pb.Participant(client_id=c) for c in CLIENTS]
    cases = [
        (pb.OpenRoundRequest(round_id="s1", participants=who, secagg_json=json.dumps({"threshold": 2})),
         "secagg settings need secure_aggregation: true"),
        (pb.OpenRoundRequest(round_id="s2", participants=who, secure_aggregation=True, secagg_json="{threshold"),
         "secagg_json is not JSON"),
        (pb.OpenRoundRequest(round_id="s3", participants=who, secure_aggregation=True,
                             secagg_json=json.dumps({"threshold": 4})), "threshold 4"),
        (pb.OpenRoundRequest(round_id="s4", participants=who, secure_aggregation=True,
                             secagg_json=json.dumps({"tresh": 2})), "tresh"),
    ]
    for req, match in cases:
        with pytest.raises(grpc.RpcError) as e:
            open_round(bare_server, pki, req)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and match in e.value.details(), e.value.details()
        assert req.round_id not in bare_server.manager.rounds
    open_round(bare_server, pki, pb.OpenRoundRequest(round_id="p1", participants=who))
    assert not bare_server.manager.get("p1").config.secure_aggregation
    spec = open_round(bare_server, pki, pb.OpenRoundRequest(round_id="s5", participants=who, secure_aggregation=True))
    assert spec.round_id == "s5" and bare_server.manager.get("s5").config.secure_aggregation
