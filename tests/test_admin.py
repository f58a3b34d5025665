"""The admin surface: no unauthenticated admin, requests validated before anything
is allocated or written, ids that cannot smuggle a newline.

Real gRPC on loopback against in-process coordinators (and one `tiesfed
coordinator serve` subprocess); every refused request leaves the round as it
was (`snapshot`), and every merge equals the local engine's bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from tests.test_federated import (  # noqa: F401
    CLIENTS,
    assert_identical,
    assert_same_state,
    coordinator,
    family,
    fetch_model,
    local_model,
    open_round,
    send,
    snapshot,
)
from tiesfed.cli import main
from tiesfed.coordinator.admin import TOKEN_FILE
from tiesfed.coordinator.rounds import ParticipantConfig, RoundConfig, TensorEntry
from tiesfed.coordinator.rounds.aggregation import default_aggregator_factory
from tiesfed.coordinator.rounds.config import MAX_PARTICIPANTS
from tiesfed.coordinator.server import CoordinatorConfig, load_coordinator_config
from tiesfed.coordinator.service import CoordinatorService
from tiesfed.coordinator.spool import check_id
from tiesfed.protos.v1 import ADMIN_TOKEN_KEY, CLIENT_ID_KEY, channel_options
from tiesfed.protos.v1 import tiesfed_pb2 as pb
from tiesfed.protos.v1 import tiesfed_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]


def admin_call(srv, method: str, request, token: str | None):
    md = ((ADMIN_TOKEN_KEY, token),) if token is not None else ()
    with grpc.insecure_channel(srv.target, options=channel_options()) as ch:
        return getattr(pb_grpc.CoordinatorStub(ch), method)(request, metadata=md, timeout=60)


def refused(srv, method: str, request, token: str | None, code: grpc.StatusCode, match: str) -> str:
    with pytest.raises(grpc.RpcError) as ei:
        admin_call(srv, method, request, token)
    assert ei.value.code() == code, ei.value.details()
    assert match in ei.value.details(), ei.value.details()
    return ei.value.details()


def round_dirs(srv) -> list[str]:
    root = Path(srv.config.spool_dir) / "rounds"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


# ----------------------------------------------------------------------------- the token


def test_without_a_token_one_is_generated_and_guards_admin_calls(family, tmp_path, coordinator):
    """Before: no token (the default) meant anyone could open and close rounds. Now the
    coordinator generates one, writes it to <spool>/admin-token (0600), and admin calls
    without it get PERMISSION_DENIED; the CLI reads it with --admin-token-file."""
    srv = coordinator()
    token_file = Path(srv.config.spool_dir) / TOKEN_FILE
    assert srv.admin_token_generated and len(srv.admin_token) >= 32
    assert token_file.read_text().strip() == srv.admin_token
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600

    rnd = open_round(srv, quorum=2)  # in-process: no token needed
    before, dirs = snapshot(rnd), round_dirs(srv)
    opening = pb.OpenRoundRequest(round_id="r2", participants=[pb.Participant(client_id="org-a")])
    for token in (None, "", "guess", srv.admin_token + "x"):
        refused(srv, "OpenRound", opening, token, grpc.StatusCode.PERMISSION_DENIED, ADMIN_TOKEN_KEY)
        refused(srv, "CloseRound", pb.CloseRoundRequest(round_id="r1", abort=True), token,
                grpc.StatusCode.PERMISSION_DENIED, ADMIN_TOKEN_KEY)
    assert round_dirs(srv) == dirs and set(srv.manager.rounds) == {"r1"}
    assert_same_state(before, snapshot(rnd))

    runner = CliRunner()
    res = runner.invoke(main, ["coordinator", "open", "--target", srv.target, "--round", "r2", "--insecure",
                               "--clients", "org-a,org-b"], env={"TIESFED_ADMIN_TOKEN": None})
    assert res.exit_code == 2 and "--admin-token-file" in res.output
    res = runner.invoke(main, ["coordinator", "open", "--target", srv.target, "--insecure", "--admin-token-file",
                               str(tmp_path / "missing"), "--round", "r2", "--clients", "org-a,org-b"])
    assert res.exit_code == 2 and "--admin-token-file" in res.output
    res = runner.invoke(main, ["coordinator", "open", "--target", srv.target, "--admin-token-file", str(token_file),
                               "--round", "r2", "--clients", "org-a,org-b", "--insecure"])
    assert res.exit_code == 0, res.output
    assert "round r2 open" in res.output and "r2" in srv.manager.rounds
    bound = tmp_path / "r3.yaml"  # a round YAML's explicit max_abs_value reaches the coordinator
    bound.write_text("round_id: r3\nparticipants: [{client_id: org-a}, {client_id: org-b}]\nmax_abs_value: 0.5\n")
    res = runner.invoke(main, ["coordinator", "open", "--target", srv.target, "--admin-token-file", str(token_file),
                               "--round-config", str(bound), "--insecure"])
    assert res.exit_code == 0, res.output
    assert srv.manager.get("r3").config.max_abs_value == 0.5
    assert srv.manager.get("r2").config.max_abs_value != 0.5  # derived, as before

    send(srv, "r1", "org-a", family, 0)
    send(srv, "r1", "org-b", family, 1)
    res = runner.invoke(main, ["coordinator", "close", "--target", srv.target, "--round", "r1", "--insecure",
                               "--admin-token-file", str(token_file)])
    assert res.exit_code == 0, res.output
    assert rnd.state == "finalized" and "finalized" in res.output
    assert_identical(fetch_model(srv, family, tmp_path), local_model(family, tmp_path, [0, 1]))


def test_an_empty_token_is_refused_at_start(tmp_path):
    """Before: `--admin-token ''` meant no authentication. Now it is an error, everywhere."""
    for empty in ("", "   "):
        with pytest.raises(ValidationError, match="admin_token") as ei:
            CoordinatorConfig(admin_token=empty, spool_dir=tmp_path / "spool")
        assert "--admin-token" in str(ei.value)
    with pytest.raises(ValueError, match="empty"):
        CoordinatorService(None, "", None)  # type: ignore[arg-type]
    res = CliRunner().invoke(main, ["coordinator", "serve", "--spool", str(tmp_path / "spool"), "--admin-token", "",
                                    "--listen", "127.0.0.1:0", "--aggregator", "local", "--insecure"])
    assert res.exit_code == 2 and "--admin-token" in res.output and "empty" in res.output
    assert not (tmp_path / "spool" / "rounds").exists()
    res = CliRunner().invoke(main, ["coordinator", "close", "--target", "127.0.0.1:1", "--round", "r1",
                                    "--insecure", "--admin-token", ""])
    assert res.exit_code == 2 and "--admin-token" in res.output


def test_a_given_token_replaces_a_stale_token_file(family, tmp_path, coordinator):
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / TOKEN_FILE).write_text("from-an-earlier-start\n")
    srv = coordinator(spool=spool, admin_token="s3cret-given")
    assert not srv.admin_token_generated and not (spool / TOKEN_FILE).exists()
    refused(srv, "OpenRound", pb.OpenRoundRequest(round_id="r2"), "from-an-earlier-start",
            grpc.StatusCode.PERMISSION_DENIED, ADMIN_TOKEN_KEY)
    spec = admin_call(srv, "OpenRound", pb.OpenRoundRequest(
        round_id="r1", participants=[pb.Participant(client_id=c) for c in CLIENTS]), "s3cret-given")
    assert spec.round_id == "r1" and len(spec.manifest) > 0
    for i, c in enumerate(CLIENTS):
        send(srv, "r1", c, family, i)
    assert srv.manager.get("r1").wait_closed(60)
    assert_identical(fetch_model(srv, family, tmp_path), local_model(family, tmp_path, [0, 1, 2]))


def _serve(family, spool: Path, port_file: Path, *transport: str) -> tuple[subprocess.Popen, list[str], threading.Thread]:
    """`tiesfed coordinator serve` in a subprocess, its output collected line by line."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("TIESFED_ADMIN_TOKEN", None)
    p = subprocess.Popen(
        [sys.executable, "-m", "tiesfed.cli", "coordinator", "serve", "--spool", str(spool), "--base",
         str(family[0]), "--listen", "127.0.0.1:0", "--port-file", str(port_file), "--aggregator", "local",
         *transport],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(p.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    return p, lines, reader


def _stop(p: subprocess.Popen, reader: threading.Thread) -> None:
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(10)
    reader.join(10)


def _wait_for(p: subprocess.Popen, lines: list[str], ready) -> None:
    end = time.monotonic() + 120
    while not ready():
        assert p.poll() is None, "".join(lines)
        assert time.monotonic() < end, "".join(lines)
        time.sleep(0.1)


def test_serve_over_mutual_tls_takes_admin_calls_by_certificate(family, tmp_path, pki):
    """`serve --tls`: no token is made, printed or written; `coordinator open|close --tls`
    with the admin identity works, a client identity is turned away before it dials."""
    spool, port_file = tmp_path / "spool", tmp_path / "port"
    spool.mkdir()
    (spool / TOKEN_FILE).write_text("from-an-earlier-insecure-start\n")
    p, lines, reader = _serve(family, spool, port_file, "--tls", str(pki.server))
    try:
        _wait_for(p, lines, port_file.exists)
        target = f"127.0.0.1:{int(port_file.read_text())}"
        assert not (spool / TOKEN_FILE).exists()  # a stale token would mislead
        res = CliRunner().invoke(main, ["coordinator", "open", "--target", target, "--tls", str(pki.client("org-a")),
                                        "--round", "r9", "--clients", "org-a"])
        assert res.exit_code == 2 and "admin" in res.output and "--tls" in res.output
        res = CliRunner().invoke(main, ["coordinator", "open", "--target", target, "--tls", str(pki.admin),
                                        "--admin-token", "s3cret", "--round", "r9", "--clients", "org-a"])
        assert res.exit_code == 2 and "--admin-token" in res.output
        res = CliRunner().invoke(main, ["coordinator", "open", "--target", target, "--tls", str(pki.admin),
                                        "--round", "r9", "--clients", "org-a"])
        assert res.exit_code == 0, res.output
        assert json.loads((spool / "rounds" / "r9" / "round.json").read_text())["round_id"] == "r9"
        res = CliRunner().invoke(main, ["coordinator", "close", "--target", target, "--tls", str(pki.admin),
                                        "--round", "r9", "--abort"])
        assert res.exit_code == 0 and "failed" in res.output, res.output
    finally:
        _stop(p, reader)
    assert not any(line.startswith("admin token") for line in lines)
    assert any("mutual TLS" in line for line in lines), "".join(lines)


def test_serve_insecure_prints_the_generated_token_once(family, tmp_path):
    """Insecure mode's own behaviour, so this one subprocess runs --insecure: without
    --admin-token it prints the token it made, which is the one in <spool>/admin-token
    (mode 0600), under a loud warning."""
    spool, port_file = tmp_path / "spool", tmp_path / "port"
    p, lines, reader = _serve(family, spool, port_file, "--insecure")
    try:
        _wait_for(p, lines, lambda: any(line.startswith("admin token") for line in lines))
        token_file = spool / TOKEN_FILE
        token = token_file.read_text().strip()
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        printed = [line for line in lines if line.startswith("admin token")]
        assert len(printed) == 1 and printed[0].rstrip().endswith(": " + token)
        res = CliRunner().invoke(main, [
            "coordinator", "open", "--target", f"127.0.0.1:{int(port_file.read_text())}", "--insecure",
            "--admin-token-file", str(token_file), "--round", "r9", "--clients", "org-a"])
        assert res.exit_code == 0, res.output
        assert json.loads((spool / "rounds" / "r9" / "round.json").read_text())["round_id"] == "r9"
    finally:
        _stop(p, reader)
    assert sum(line.startswith("admin token") for line in lines) == 1
    assert any("WARNING: --insecure" in line for line in lines) and any("PLAINTEXT" in line for line in lines)


# ----------------------------------------------------------------------------- OpenRound validated first


def _spec(name: str, shape: list[int], dtype: str = "F32") -> pb.TensorSpec:
    return pb.TensorSpec(name=name, shape=shape, dtype=dtype)


BAD_ROUNDS = {
    "negative shape": (dict(manifest=[_spec("w", [-1, 16])]), "manifest.0.shape"),
    "zero-size shape": (dict(manifest=[_spec("w", [16, 0])]), "manifest.0.shape"),
    "huge manifest": (dict(manifest=[_spec("w", [1 << 20, 1 << 20])]), "max_round_params"),
    "duplicate tensors": (dict(manifest=[_spec("w", [4]), _spec("w", [4])]), "manifest"),
    "integer dtype": (dict(manifest=[_spec("w", [4], "I64")]), "manifest.0.dtype"),
    "nameless tensor": (dict(manifest=[_spec("", [4])]), "manifest.0.name"),
    "too many participants": (dict(participants=[pb.Participant(client_id=f"c{i}")
                                                 for i in range(MAX_PARTICIPANTS + 1)]), "participants"),
    "newline in a client id": (dict(participants=[pb.Participant(client_id="org-a\n")]),
                               "participants.0.client_id"),
    "newline in the round id": (dict(round_id="r2\n"), "round_id"),
}


@pytest.mark.parametrize("case", list(BAD_ROUNDS))
def test_bad_open_round_is_refused_before_anything_is_written(family, tmp_path, coordinator, case):
    """Before: OpenRound allocated the accumulators (~96 MiB) and wrote the round file
    first; a negative shape left a file that stopped every later start. Now each bad
    request is INVALID_ARGUMENT naming the field, with no file written and no
    accumulator allocated; the round already open is untouched and merges as before."""
    allocated: list[int] = []

    def spy(manifest, spec):
        allocated.append(sum(n for _, n in manifest))
        return default_aggregator_factory(manifest, spec)

    srv = coordinator(aggregator_factory=spy, admin_token="s3cret-admin")
    rnd = open_round(srv)
    assert len(allocated) == 1
    before, dirs = snapshot(rnd), round_dirs(srv)
    fields, match = BAD_ROUNDS[case]
    req = pb.OpenRoundRequest(**{"round_id": "r2", "participants": [pb.Participant(client_id="org-a")],
                                 "base_fingerprint": "0" * 64, **fields})
    refused(srv, "OpenRound", req, "s3cret-admin", grpc.StatusCode.INVALID_ARGUMENT, match)
    assert len(allocated) == 1 and round_dirs(srv) == dirs and set(srv.manager.rounds) == {"r1"}
    assert_same_state(before, snapshot(rnd))
    for i, c in enumerate(CLIENTS):
        send(srv, "r1", c, family, i)
    assert rnd.wait_closed(60) and rnd.state == "finalized"
    assert_identical(fetch_model(srv, family, tmp_path), local_model(family, tmp_path, [0, 1, 2]))


def test_round_size_is_bounded_by_the_coordinator_setting(family, tmp_path, coordinator):
    """max_round_params applies to a manifest given and to one taken from the base."""
    srv = coordinator(max_round_params=1000, admin_token="s3cret-admin")
    for req in (pb.OpenRoundRequest(round_id="r2", participants=[pb.Participant(client_id="org-a")]),
                pb.OpenRoundRequest(round_id="r3", participants=[pb.Participant(client_id="org-a")],
                                    base_fingerprint="0" * 64, manifest=[_spec("w", [32, 32])])):
        details = refused(srv, "OpenRound", req, "s3cret-admin", grpc.StatusCode.INVALID_ARGUMENT,
                          "max_round_params")
        assert "manifest" in details
    assert round_dirs(srv) == [] and not srv.manager.rounds


def test_every_path_validates_the_round(tmp_path):
    """Python, YAML and gRPC share RoundConfig's validators."""
    with pytest.raises(ValidationError, match="dimensions must be positive"):
        TensorEntry(name="w", shape=(-3, 4))
    with pytest.raises(ValidationError, match="dimensions must be positive"):
        RoundConfig(round_id="r1", participants=["org-a"], manifest=[{"name": "w", "shape": [0]}])
    with pytest.raises(ValidationError, match="max_round_params"):
        RoundConfig(round_id="r1", participants=["org-a"], manifest=[{"name": "w", "shape": [1 << 40]}])
    cfg = tmp_path / "coordinator.yaml"
    cfg.write_text(json.dumps({"rounds": [{"round_id": "r1", "participants": ["org-a"],
                                           "manifest": [{"name": "w", "shape": [4, -4]}]}]}))
    with pytest.raises(ValidationError) as ei:
        load_coordinator_config(cfg)
    assert "rounds.0.manifest.0.shape" in str(ei.value).replace("\n", ".").replace(" ", "")


# ----------------------------------------------------------------------------- ids


@pytest.mark.parametrize("bad", ["org-a\n", "org-a\r\n", "\norg-a", "org a", "", "-org", "a" * 129])
def test_ids_with_a_trailing_newline_are_refused(bad):
    """Before: the id regex ended in `$`, which also matches before a final newline."""
    with pytest.raises(ValueError, match="is not valid"):
        check_id("client id", bad)
    with pytest.raises(ValidationError, match="client_id"):
        ParticipantConfig(client_id=bad)
    assert check_id("client id", "org-a") == "org-a"


def test_a_round_id_with_a_newline_does_not_name_a_round(family, coordinator):
    srv = coordinator()
    open_round(srv)
    with grpc.insecure_channel(srv.target, options=channel_options()) as ch:
        stub = pb_grpc.CoordinatorStub(ch)
        with pytest.raises(grpc.RpcError) as ei:
            stub.GetRoundSpec(pb.GetRoundSpecRequest(round_id="r1\n"), metadata=((CLIENT_ID_KEY, "org-a"),),
                              timeout=10)
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND
        assert stub.GetRoundSpec(pb.GetRoundSpecRequest(round_id="r1"), metadata=((CLIENT_ID_KEY, "org-a"),),
                                 timeout=10).round_id == "r1"
