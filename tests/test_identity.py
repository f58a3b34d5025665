"""Who may take part in a round, over real mutual TLS on loopback: a real CoordinatorServer
(in-process), certificates from tiesfed.trust.pki (the session CA of tests/conftest.py, plus
certificates made here: expired, revoked, from another CA, for another host name).

Each attack is refused with the status the coordinator documents and leaves the round as it
was (`snapshot`); the honest round still merges exactly the local engine's model.
"""

from __future__ import annotations

import datetime as dt
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

import grpc
import pytest
from click.testing import CliRunner

from tests.test_federated import (  # noqa: F401
    CLIENTS,
    FAST,
    assert_identical,
    assert_same_state,
    contribution_bytes,
    family,
    load_folder,
    local_model,
    open_round,
    snapshot,
)
from tiesfed.cli import main
from tiesfed.client.federated import Connection, FederatedError, fetch, submit
from tiesfed.coordinator.server import CoordinatorConfig, CoordinatorServer, is_loopback
from tiesfed.core.options import MergeOptions
from tiesfed.protos.v1 import ADMIN_TOKEN_KEY, CLIENT_ID_KEY, channel_options
from tiesfed.protos.v1 import tiesfed_pb2 as pb
from tiesfed.protos.v1 import tiesfed_pb2_grpc as pb_grpc
from tiesfed.trust import pki as ca
from tiesfed.trust.identity import Identity, IdentityError, secure_channel

Who = Union[Path, Identity]


# ----------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture
def secure(tmp_path, family, pki):  # noqa: F811
    """Start mutual-TLS coordinators (the session CA's server identity unless told, its CRL);
    all are stopped at teardown."""
    started: list[CoordinatorServer] = []

    def start(tls_dir: Path | None = None, **kw) -> CoordinatorServer:
        cfg = CoordinatorConfig(listen="127.0.0.1:0", spool_dir=tmp_path / f"spool-{len(started)}",
                                base_model=str(family[0]), aggregator="local", tls_dir=tls_dir or pki.server,
                                crl=pki.crl, **kw)
        srv = CoordinatorServer(cfg)
        started.append(srv)
        return srv.start()

    yield start
    for srv in started:
        srv.stop(grace=0)


def _identity(who: Who) -> Identity:
    return who if isinstance(who, Identity) else Identity.load(who, check_time=False)


@contextmanager
def stub_as(srv, who: Who, server_name: str | None = None) -> Iterator[pb_grpc.CoordinatorStub]:
    with secure_channel(srv.target, _identity(who), server_name=server_name, options=channel_options()) as ch:
        yield pb_grpc.CoordinatorStub(ch)


def spec_as(srv, who: Who, metadata=()) -> pb.RoundSpec:
    with stub_as(srv, who) as stub:
        return stub.GetRoundSpec(pb.GetRoundSpecRequest(round_id="r1"), metadata=metadata, timeout=10)


def upload_as(srv, who: Who, data: bytes, metadata=(), chunk: int = 64 << 10) -> pb.UploadReceipt:
    with stub_as(srv, who) as stub:
        reqs = (pb.UploadChunk(round_id="r1", offset=i, data=data[i:i + chunk]) for i in range(0, len(data), chunk))
        return stub.Upload(reqs, metadata=metadata, timeout=30)


def refused(rnd, attempt, code: grpc.StatusCode, *matches: str) -> str:
    """`attempt()` fails with `code` (details naming each of `matches`) and changes nothing."""
    before = snapshot(rnd)
    with pytest.raises(grpc.RpcError) as ei:
        attempt()
    assert ei.value.code() == code, ei.value.details()
    for m in matches:
        assert m in ei.value.details(), ei.value.details()
    assert_same_state(before, snapshot(rnd))
    assert not list(rnd.spool.partial_dir.iterdir())
    return ei.value.details()


def send_as(srv, who: Who, model: int, family, **kw):  # noqa: F811
    return submit(srv.target, "r1", None, family[0], family[1][model], retry=FAST, tls=_identity(who), **kw)


# ----------------------------------------------------------------------------- the handshake


def test_no_client_certificate_is_refused(secure, family, pki):  # noqa: F811
    srv = secure()
    rnd = open_round(srv)
    data = contribution_bytes(family, 0)
    server_only = grpc.ssl_channel_credentials(root_certificates=(pki.ca / "ca.pem").read_bytes())

    def tls_without_cert():
        with grpc.secure_channel(srv.target, server_only, options=channel_options()) as ch:
            pb_grpc.CoordinatorStub(ch).Upload(iter([pb.UploadChunk(round_id="r1", data=data)]),
                                               metadata=((CLIENT_ID_KEY, "org-a"),), timeout=10)

    def plaintext():
        with grpc.insecure_channel(srv.target, options=channel_options()) as ch:
            pb_grpc.CoordinatorStub(ch).GetRoundSpec(pb.GetRoundSpecRequest(round_id="r1"),
                                                     metadata=((CLIENT_ID_KEY, "org-a"),), timeout=10)

    refused(rnd, tls_without_cert, grpc.StatusCode.UNAVAILABLE)
    refused(rnd, plaintext, grpc.StatusCode.UNAVAILABLE)
    with pytest.raises(ValueError, match="--tls.*--insecure"):  # the client cannot forget it either
        Connection(srv.target, "org-a", FAST)


def test_certificate_of_another_ca_is_refused(secure, family, pki, tmp_path):  # noqa: F811
    srv = secure()
    rnd = open_round(srv)
    ca.init_ca(tmp_path / "rogue-ca")
    ca.issue(tmp_path / "rogue-ca", tmp_path / "rogue", client_id="org-a")  # the right name, the wrong CA
    rogue = Identity.load(tmp_path / "rogue")
    # it trusts our CA (so it would accept the server), but our server does not trust its CA
    forged = Identity(rogue.folder, rogue.cert_pem, rogue.key_pem, (pki.ca / "ca.pem").read_bytes())
    refused(rnd, lambda: upload_as(srv, forged, contribution_bytes(family, 0)), grpc.StatusCode.UNAVAILABLE)
    before = snapshot(rnd)
    with pytest.raises(FederatedError) as ei:
        send_as(srv, forged, 0, family)
    assert ei.value.code == "UNAVAILABLE"
    assert_same_state(before, snapshot(rnd))


def test_expired_certificate_is_refused(secure, family, pki, tmp_path):  # noqa: F811
    srv = secure()
    rnd = open_round(srv)
    ca.issue(pki.ca, tmp_path / "old", client_id="org-a",
             not_before=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=10), days=1)
    with pytest.raises(IdentityError, match="expired"):  # the client notices first ...
        submit(srv.target, "r1", None, family[0], family[1][0], retry=FAST, tls=tmp_path / "old")
    old = Identity.load(tmp_path / "old", check_time=False)  # ... and the coordinator refuses it anyway
    refused(rnd, lambda: upload_as(srv, old, contribution_bytes(family, 0)), grpc.StatusCode.UNAVAILABLE)
    refused(rnd, lambda: spec_as(srv, old), grpc.StatusCode.UNAVAILABLE)


def test_server_certificate_must_match_the_target_name(secure, family, pki, tmp_path):  # noqa: F811
    ca.issue(pki.ca, tmp_path / "elsewhere", server_names=["coordinator.example.org"])
    srv = secure(tls_dir=tmp_path / "elsewhere")
    open_round(srv)
    with pytest.raises(FederatedError) as ei:  # dialled 127.0.0.1; the certificate names another host
        with Connection(srv.target, tls=pki.client("org-a"), retry=FAST) as conn:
            conn.round_spec("r1")
    assert ei.value.code == "UNAVAILABLE"
    with Connection(srv.target, tls=pki.client("org-a"), retry=FAST, server_name="coordinator.example.org") as conn:
        assert conn.client_id == "org-a" and conn.round_spec("r1").round_id == "r1"
    with pytest.raises(ValueError, match="server_name"):
        Connection(srv.target, "org-a", insecure=True, server_name="coordinator.example.org")


# ----------------------------------------------------------------------------- after the handshake


def test_revoked_while_the_coordinator_runs(secure, family, pki, tmp_path):  # noqa: F811
    """`tiesfed pki revoke` re-signs crl.pem; the running coordinator refuses the next call
    of that certificate, on the channel it already holds, without a restart."""
    srv = secure()
    rnd = open_round(srv)
    info = ca.issue(pki.ca, tmp_path / "org-c-laptop", client_id="org-c")  # a second org-c certificate
    laptop = Identity.load(tmp_path / "org-c-laptop")
    data = contribution_bytes(family, 2, model_key="2")
    with stub_as(srv, laptop) as stub:
        assert stub.GetRoundSpec(pb.GetRoundSpecRequest(round_id="r1"), timeout=10).round_id == "r1"
        assert [c.serial for c in ca.revoke(pki.ca, info.serial_hex)] == [info.serial]
        details = refused(rnd, lambda: stub.GetRoundSpec(pb.GetRoundSpecRequest(round_id="r1"), timeout=10),
                          grpc.StatusCode.UNAUTHENTICATED, "revoked", info.serial_hex)
    refused(rnd, lambda: upload_as(srv, laptop, data), grpc.StatusCode.UNAUTHENTICATED, "revoked", info.serial_hex)
    assert "org-c" in details
    # only that certificate: org-c's own one still works, and the round merges as before
    send_as(srv, pki.client("org-c"), 2, family)
    for i, c in enumerate(CLIENTS[:2]):
        send_as(srv, pki.client(c), i, family)
    assert rnd.wait_closed(60) and rnd.state == "finalized"
    out = tmp_path / "fetched"
    fetch(srv.target, "r1", None, family[0], out, timeout=60, retry=FAST, tls=pki.client("org-a"))
    assert_identical(load_folder(out), local_model(family, tmp_path, [0, 1, 2]))


def test_client_not_on_the_allowlist(secure, family, pki):  # noqa: F811
    srv = secure()
    rnd = open_round(srv)  # org-a, org-b, org-c; org-d holds a good certificate of the same CA
    refused(rnd, lambda: upload_as(srv, pki.client("org-d"), contribution_bytes(family, 0)),
            grpc.StatusCode.PERMISSION_DENIED, "allowlist", "org-d")
    refused(rnd, lambda: spec_as(srv, pki.client("org-d")), grpc.StatusCode.PERMISSION_DENIED, "org-d")
    before = snapshot(rnd)
    with pytest.raises(FederatedError) as ei:
        send_as(srv, pki.client("org-d"), 3, family)
    assert ei.value.code == "PERMISSION_DENIED" and "allowlist" in str(ei.value)
    assert_same_state(before, snapshot(rnd))


def test_the_id_is_the_certificate_never_the_metadata(secure, family, pki, tmp_path):  # noqa: F811
    srv = secure()
    rnd = open_round(srv)
    data = contribution_bytes(family, 0)
    claim = ((CLIENT_ID_KEY, "org-a"),)
    # org-b's certificate claiming to be org-a: refused, naming both
    refused(rnd, lambda: upload_as(srv, pki.client("org-b"), data, metadata=claim),
            grpc.StatusCode.PERMISSION_DENIED, "'org-a'", "'org-b'")
    refused(rnd, lambda: spec_as(srv, pki.client("org-b"), metadata=claim),
            grpc.StatusCode.PERMISSION_DENIED, "'org-a'", "'org-b'")
    before = snapshot(rnd)
    with pytest.raises(ValueError, match="--client-id 'org-a'.*'org-b'"):  # the client stops it first
        submit(srv.target, "r1", "org-a", family[0], family[1][0], retry=FAST, tls=pki.client("org-b"))
    assert_same_state(before, snapshot(rnd))
    assert not rnd.committed
    # org-b as itself: committed under the certificate's id
    res = send_as(srv, pki.client("org-b"), 1, family)
    assert res.client_id == "org-b" and list(rnd.committed) == ["org-b"]
    # an agreeing metadata id is fine
    assert spec_as(srv, pki.client("org-b"), metadata=((CLIENT_ID_KEY, "org-b"),)).round_id == "r1"
    send_as(srv, pki.client("org-a"), 0, family)
    send_as(srv, pki.client("org-c"), 2, family)
    assert rnd.wait_closed(60) and sorted(rnd.committed) == CLIENTS
    out = tmp_path / "fetched"
    fetch(srv.target, "r1", "org-c", family[0], out, timeout=60, retry=FAST, tls=pki.client("org-c"))
    assert_identical(load_folder(out), local_model(family, tmp_path, [0, 1, 2]))


def test_admin_calls_need_an_admin_certificate(secure, family, pki):  # noqa: F811
    srv = secure()
    rnd = open_round(srv, quorum=1)
    opening = pb.OpenRoundRequest(round_id="r2", participants=[pb.Participant(client_id="org-a")])
    closing = pb.CloseRoundRequest(round_id="r1", abort=True)
    for md in ((), ((ADMIN_TOKEN_KEY, "any-token"),)):  # a token means nothing over TLS
        for method, req in (("OpenRound", opening), ("CloseRound", closing)):
            def call(method=method, req=req, md=md):
                with stub_as(srv, pki.client("org-a")) as stub:
                    getattr(stub, method)(req, metadata=md, timeout=10)

            refused(rnd, call, grpc.StatusCode.PERMISSION_DENIED, "admin certificate", "'org-a'")
    assert set(srv.manager.rounds) == {"r1"}
    # the admin is not a participant either
    refused(rnd, lambda: spec_as(srv, pki.admin), grpc.StatusCode.PERMISSION_DENIED, "client certificate", "'ops'")
    with stub_as(srv, pki.admin) as stub:
        assert stub.OpenRound(opening, timeout=60).round_id == "r2"
        send_as(srv, pki.client("org-a"), 0, family)
        st = stub.CloseRound(pb.CloseRoundRequest(round_id="r1"), timeout=60)
    assert st.state == pb.ROUND_STATE_FINALIZED and list(st.committed_clients) == ["org-a"]
    assert set(srv.manager.rounds) == {"r1", "r2"}


# ----------------------------------------------------------------------------- configuration


def test_serve_refuses_to_start_without_transport_security(tmp_path, family, pki):  # noqa: F811
    spool = tmp_path / "spool"
    serve = ["coordinator", "serve", "--spool", str(spool), "--base", str(family[0]), "--aggregator", "local"]
    cases = [
        ([], ("--tls", "--insecure", "refuses to start")),
        (["--insecure", "--listen", "0.0.0.0:0"], ("--insecure", "loopback", "0.0.0.0:0")),
        (["--insecure", "--listen", "192.0.2.7:50051"], ("--insecure", "loopback")),
        (["--insecure", "--tls", str(pki.server)], ("--tls", "--insecure", "not both")),
        (["--insecure", "--crl", str(pki.crl)], ("--crl", "--tls")),
        (["--tls", str(pki.client("org-a"))], ("--tls", "server identity")),
        (["--tls", str(pki.server), "--admin-token", "s3cret"], ("--admin-token", "--insecure")),
    ]
    for args, words in cases:
        res = CliRunner().invoke(main, [*serve, "--listen", "127.0.0.1:0", *args], env={"TIESFED_ADMIN_TOKEN": None})
        assert res.exit_code != 0, (args, res.output)
        for w in words:
            assert w in res.output, (args, res.output)
        assert not spool.exists(), args  # refused before anything was touched
    with pytest.raises(ValueError, match="--tls"):
        CoordinatorServer(CoordinatorConfig(listen="127.0.0.1:0", spool_dir=spool))
    for client in (["client", "submit", str(family[0]), str(family[1][0])], ["client", "fetch", str(family[0]),
                                                                            "-o", str(tmp_path / "o")]):
        res = CliRunner().invoke(main, [*client, "--target", "127.0.0.1:1", "--round", "r1", "--client-id", "org-a"])
        assert res.exit_code == 2 and "--tls" in res.output and "--insecure" in res.output, res.output


@pytest.mark.parametrize("listen, ok", [("127.0.0.1:0", True), ("127.3.2.1:50051", True), ("[::1]:50051", True),
                                        ("localhost:50051", True), ("0.0.0.0:50051", False), ("[::]:50051", False),
                                        (":50051", False), ("10.0.0.5:50051", False), ("example.org:1", False)])
def test_insecure_means_loopback(listen, ok):
    assert is_loopback(listen) is ok


def test_yaml_transport_paths_are_relative_to_the_yaml(tmp_path, pki):
    from tiesfed.coordinator.server import load_coordinator_config, load_transport

    (tmp_path / "c.yaml").write_text(f"tls_dir: id\ncrl: {pki.crl}\nlisten: 127.0.0.1:0\n")
    ca.issue(pki.ca, tmp_path / "id", server_names=["127.0.0.1"])
    cfg = load_coordinator_config(tmp_path / "c.yaml")
    assert cfg.tls_dir == tmp_path / "id" and cfg.crl == pki.crl and not cfg.insecure
    identity, revocation = load_transport(cfg)
    assert identity is not None and identity.name == "127.0.0.1" and revocation is not None
    (tmp_path / "c.yaml").write_text("insecure: true\nlisten: '[::1]:0'\n")
    assert load_transport(load_coordinator_config(tmp_path / "c.yaml")) == (None, None)


# ----------------------------------------------------------------------------- a whole round


def test_full_round_over_mutual_tls_equals_the_local_merge(secure, family, pki, tmp_path):  # noqa: F811
    """Library and CLI clients with their identities and no --client-id; the coordinator
    knows them by their certificates and the merge is the local engine's, bit for bit."""
    opts = MergeOptions(k=30, lam=1.2)
    srv = secure()
    rnd = open_round(srv, options=opts)
    for i, c in enumerate(CLIENTS[:2]):
        assert send_as(srv, pki.client(c), i, family).client_id == c
    runner = CliRunner()
    res = runner.invoke(main, ["client", "submit", str(family[0]), str(family[1][2]), "--target", srv.target,
                               "--round", "r1", "--tls", str(pki.client("org-c")), "-q"])
    assert res.exit_code == 0 and "committed" in res.output, res.output
    assert rnd.wait_closed(60) and rnd.state == "finalized" and sorted(rnd.committed) == CLIENTS
    want = local_model(family, tmp_path, [0, 1, 2], opts)
    out = tmp_path / "cli-out"
    res = runner.invoke(main, ["client", "fetch", str(family[0]), "-o", str(out), "--target", srv.target,
                               "--round", "r1", "--tls", str(pki.client("org-b")), "-q", "--timeout", "60"])
    assert res.exit_code == 0, res.output
    assert_identical(load_folder(out), want)
    lib = fetch(srv.target, "r1", None, family[0], tmp_path / "lib-out", timeout=60, retry=FAST,
                tls=pki.client("org-a"))
    assert_identical(load_folder(lib.out_dir), want)
    assert srv.identity is not None and srv.identity.role == "server" and srv.admin_token is None


def test_a_certificate_with_a_bad_version_field_is_a_trust_error(pki):  # noqa: F811
    """cryptography raises InvalidVersion (not a ValueError) for a version field out of range: it
    must still be a TrustError, or a key advert carrying such a certificate is an UNKNOWN error
    instead of a refusal (the hostile fuzz found a bit flip there)."""
    import base64
    import re

    from tiesfed.trust.certs import TrustError, fingerprint

    pem = Path(pki.client("org-a"), "cert.pem").read_bytes()
    body = re.search(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", pem, re.S).group(1)
    der = base64.b64decode(b"".join(body.split()))
    at = der.index(bytes([0xA0, 3, 2, 1, 2])) + 4  # [0] EXPLICIT INTEGER 2 (v3)
    bad = der[:at] + bytes([10]) + der[at + 1:]
    with pytest.raises(TrustError, match="not a valid X509 version"):
        fingerprint(b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(bad) + b"-----END CERTIFICATE-----\n")
