"""tiesfed.trust over real certificates and a real gRPC TLS server on loopback: who may connect,
who the server sees, revocation without restart, signed manifests, and the `tiesfed pki` CLI."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization

from tiesfed.cli.app import main
from tiesfed.trust import pki, signing
from tiesfed.trust.certs import TrustError
from tiesfed.trust.identity import (
    TARGET_NAME_OVERRIDE,
    Identity,
    IdentityError,
    RevocationError,
    RevocationList,
    channel_options,
    peer_identity,
    secure_channel,
    server_credentials,
)

METHOD = "/tiesfed.test.Echo/WhoAmI"


# ---- a tiny mutual-TLS server that answers with the caller's verified identity ---------------

def _whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
    peer = peer_identity(context)
    if peer is None:
        return b"null"
    return json.dumps({"client_id": peer.client_id, "role": peer.role, "serial": peer.serial,
                       "fingerprint": peer.fingerprint}).encode()


@contextmanager
def serving(identity: Identity):
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.unary_unary_rpc_method_handler(_whoami)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("tiesfed.test.Echo", {"WhoAmI": handler}),))
    port = server.add_secure_port("127.0.0.1:0", server_credentials(identity))
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def _call(channel: grpc.Channel) -> dict:
    with channel:
        reply = channel.unary_unary(METHOD)(b"", timeout=10)
    return json.loads(reply)


def _refused(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as e:
        _call(channel)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One CA with a server on 127.0.0.1/localhost, a client, an admin; another CA with a client."""
    root = tmp_path_factory.mktemp("pki")
    pki.init_ca(root / "ca")
    pki.issue(root / "ca", root / "server", server_names=["localhost", "127.0.0.1", "::1"])
    pki.issue(root / "ca", root / "acme", client_id="acme")
    pki.issue(root / "ca", root / "ops", admin_name="ops")
    pki.init_ca(root / "other-ca")
    pki.issue(root / "other-ca", root / "intruder", client_id="acme")
    return root


def _ident(world: Path, name: str, **kw) -> Identity:
    return Identity.load(world / name, **kw)


# ---- mutual TLS ------------------------------------------------------------------------------

def test_mutual_tls_names_client_and_admin(world):
    with serving(_ident(world, "server")) as target:
        acme = _call(secure_channel(target, _ident(world, "acme")))
        ops = _call(secure_channel(target, _ident(world, "ops")))
    assert (acme["client_id"], acme["role"]) == ("acme", "client")
    assert (ops["client_id"], ops["role"]) == ("ops", "admin")
    assert acme["fingerprint"] == _ident(world, "acme").fingerprint


def test_handshake_refuses_client_without_certificate(world):
    ca = (world / "ca" / "ca.pem").read_bytes()
    with serving(_ident(world, "server")) as target:
        _refused(grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca)))


def test_handshake_refuses_certificate_of_another_ca(world):
    intruder = _ident(world, "intruder")
    creds = grpc.ssl_channel_credentials(root_certificates=(world / "ca" / "ca.pem").read_bytes(),
                                         private_key=intruder.key_pem, certificate_chain=intruder.cert_pem)
    with serving(_ident(world, "server")) as target:
        _refused(grpc.secure_channel(target, creds))


def test_handshake_refuses_expired_client(world, tmp_path):
    pki.issue(world / "ca", tmp_path / "old", client_id="old",
              not_before=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=10), days=1)
    with pytest.raises(IdentityError, match="expired"):
        Identity.load(tmp_path / "old")
    old = Identity.load(tmp_path / "old", check_time=False)
    with serving(_ident(world, "server")) as target:
        _refused(secure_channel(target, old))


def test_handshake_refuses_a_server_certificate_as_client(world):
    """The EKU is enforced by BoringSSL: a coordinator's identity cannot pass for a participant."""
    with serving(_ident(world, "server")) as target:
        _refused(secure_channel(target, _ident(world, "server")))


def test_server_name_must_match_target(world, tmp_path):
    assert TARGET_NAME_OVERRIDE not in dict(channel_options())
    pki.issue(world / "ca", tmp_path / "elsewhere", server_names=["coordinator.example.org"])
    acme = _ident(world, "acme")
    with serving(Identity.load(tmp_path / "elsewhere")) as target:
        _refused(secure_channel(target, acme))  # dialled 127.0.0.1, the cert names another host
        # the check is real: naming the server explicitly (never the default) lets the same call through
        assert _call(secure_channel(target, acme, server_name="coordinator.example.org"))["client_id"] == "acme"


# ---- the CA's files, CSRs, revocation --------------------------------------------------------

def test_ca_and_identity_files(world):
    assert stat.S_IMODE(os.stat(world / "ca" / "ca-key.pem").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(world / "acme" / "key.pem").st_mode) == 0o600
    assert sorted(p.name for p in (world / "acme").iterdir()) == ["ca.pem", "cert.pem", "key.pem"]
    roles = {(e["cn"], e["role"]) for e in pki.listing(world / "ca")}
    assert {("localhost", "server"), ("acme", "client"), ("ops", "admin")} <= roles
    with pytest.raises(pki.PkiError, match="already holds a CA"):
        pki.init_ca(world / "ca")
    with pytest.raises(pki.PkiError, match="not valid"):
        pki.issue(world / "ca", world / "bad", client_id="../evil")
    with pytest.raises(IdentityError, match="cert.pem is missing"):
        Identity.load(world / "ca")
    (world / "half").mkdir()
    (world / "half" / "cert.pem").write_bytes((world / "acme" / "cert.pem").read_bytes())
    (world / "half" / "ca.pem").write_bytes(b"garbage")
    with pytest.raises(IdentityError, match="key.pem is missing"):
        Identity.load(world / "half")
    (world / "half" / "key.pem").write_bytes((world / "ops" / "key.pem").read_bytes())
    with pytest.raises(IdentityError, match="ca.pem is bad"):
        Identity.load(world / "half")
    (world / "half" / "ca.pem").write_bytes((world / "ca" / "ca.pem").read_bytes())
    with pytest.raises(IdentityError, match="key.pem is not the key of cert.pem"):
        Identity.load(world / "half")


def test_csr_flow_keeps_the_key_with_the_requester(world, tmp_path):
    csr = pki.request(tmp_path / "globex", "globex")
    info = pki.sign(world / "ca", csr, tmp_path / "signed")
    assert (info.common_name, info.role) == ("globex", "client")
    assert sorted(p.name for p in (tmp_path / "signed").iterdir()) == ["ca.pem", "cert.pem"]
    assert stat.S_IMODE(os.stat(tmp_path / "globex" / "key.pem").st_mode) == 0o600
    for f in ("cert.pem", "ca.pem"):
        (tmp_path / "globex" / f).write_bytes((tmp_path / "signed" / f).read_bytes())
    with serving(_ident(world, "server")) as target:
        assert _call(secure_channel(target, Identity.load(tmp_path / "globex")))["client_id"] == "globex"
    with pytest.raises(pki.PkiError, match="already exists"):
        pki.request(tmp_path / "globex", "globex")


def test_a_csr_cannot_claim_admin(world, tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mallory"),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "admin")])
    (tmp_path / "m.csr").write_bytes(x509.CertificateSigningRequestBuilder().subject_name(name)
                                     .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    assert pki.sign(world / "ca", tmp_path / "m.csr", tmp_path / "m").role == "client"
    bad = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "../etc")])
    (tmp_path / "b.csr").write_bytes(x509.CertificateSigningRequestBuilder().subject_name(bad)
                                     .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    with pytest.raises(pki.PkiError, match="not valid"):
        pki.sign(world / "ca", tmp_path / "b.csr", tmp_path / "b")


def test_no_peer_on_an_insecure_port(world):
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    handler = grpc.unary_unary_rpc_method_handler(_whoami)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("tiesfed.test.Echo", {"WhoAmI": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            assert ch.unary_unary(METHOD)(b"", timeout=10) == b"null"
    finally:
        server.stop(None)


def test_revocation_reaches_a_loaded_list(tmp_path):
    pki.init_ca(tmp_path / "ca")
    a = pki.issue(tmp_path / "ca", tmp_path / "a", client_id="a")
    b1 = pki.issue(tmp_path / "ca", tmp_path / "b1", client_id="b")
    b2 = pki.issue(tmp_path / "ca", tmp_path / "b2", client_id="b")
    c = pki.issue(tmp_path / "ca", tmp_path / "c", client_id="c")
    crl = RevocationList(tmp_path / "ca" / "crl.pem", (tmp_path / "ca" / "ca.pem").read_bytes())
    assert not any(crl.is_revoked(x.serial) for x in (a, b1, b2, c))
    assert {x.serial for x in pki.revoke(tmp_path / "ca", "b")} == {b1.serial, b2.serial}
    assert crl.is_revoked(b1.serial) and crl.is_revoked(b2.serial) and not crl.is_revoked(a.serial)
    assert [x.serial for x in pki.revoke(tmp_path / "ca", str(a.serial))] == [a.serial]  # decimal
    assert [x.serial for x in pki.revoke(tmp_path / "ca", "0x" + c.serial_hex)] == [c.serial]  # hex
    assert crl.revoked() == {a.serial, b1.serial, b2.serial, c.serial}
    with pytest.raises(pki.PkiError, match="already revoked"):
        pki.revoke(tmp_path / "ca", "b")
    with pytest.raises(pki.PkiError, match="no certificate"):
        pki.revoke(tmp_path / "ca", "nobody")


def test_revocation_list_trusts_only_its_ca(world, tmp_path):
    ca_pem = (world / "ca" / "ca.pem").read_bytes()
    assert RevocationList(tmp_path / "absent.pem", ca_pem).revoked() == frozenset()
    with pytest.raises(RevocationError, match="not signed by the CA"):
        RevocationList(world / "other-ca" / "crl.pem", ca_pem)
    path = tmp_path / "crl.pem"
    path.write_bytes((world / "ca" / "crl.pem").read_bytes())
    crl = RevocationList(path, ca_pem)
    path.write_bytes((world / "other-ca" / "crl.pem").read_bytes())  # swapped under a running server
    with pytest.raises(RevocationError):
        crl.is_revoked(1)


# ---- signed manifests ------------------------------------------------------------------------

def test_sign_verify_and_tampering(world):
    acme = _ident(world, "acme")
    m = signing.contribution_manifest("r1", "acme", "base-fp", '{"k":20}', "ab" * 32)
    sig = signing.sign(acme.key_pem, m)
    signing.verify(acme.cert_pem, dict(reversed(list(m.items()))), sig)  # key order does not matter
    with pytest.raises(signing.SignatureError, match="does not match"):
        signing.verify(acme.cert_pem, {**m, "stream_sha256": "cd" * 32}, sig)
    with pytest.raises(signing.SignatureError, match="does not match"):
        signing.verify(acme.cert_pem, m, sig[:-1] + bytes([sig[-1] ^ 1]))
    with pytest.raises(signing.SignatureError, match="does not match"):
        signing.verify(_ident(world, "ops").cert_pem, m, sig)  # someone else's certificate
    merged = signing.merged_manifest("r1", "ef" * 32, [
        {"client_id": "acme", "sha256": "ab" * 32, "signature_hex": sig.hex(), "cert_fingerprint": acme.fingerprint}])
    signing.verify(_ident(world, "server").cert_pem, merged, signing.sign(_ident(world, "server").key_pem, merged))
    assert signing.canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'.encode()
    with pytest.raises(TrustError, match="SHA-256"):
        signing.contribution_manifest("r1", "acme", "fp", "{}", "not-a-digest")


def test_verify_chain(world):
    ca = (world / "ca" / "ca.pem").read_bytes()
    signing.verify_chain(_ident(world, "acme").cert_pem, ca)
    with pytest.raises(signing.SignatureError, match="not issued by"):
        signing.verify_chain(_ident(world, "intruder").cert_pem, ca)
    with pytest.raises(signing.SignatureError, match="expired"):
        signing.verify_chain(_ident(world, "acme").cert_pem, ca, at=dt.datetime.now(dt.timezone.utc)
                             + dt.timedelta(days=400))


# ---- the CLI ---------------------------------------------------------------------------------

def _cli(*args: str, ok: bool = True) -> str:
    res = CliRunner().invoke(main, ["pki", *args])
    assert (res.exit_code == 0) == ok, res.output
    return res.output


def test_cli(tmp_path):
    ca = str(tmp_path / "ca")
    assert "created CA" in _cli("init", ca)
    assert "already holds a CA" in _cli("init", ca, ok=False)
    assert "server 'localhost'" in _cli("issue", ca, "--server", "localhost,127.0.0.1", "-o", str(tmp_path / "s"))
    assert "client 'acme'" in _cli("issue", ca, "--client", "acme", "-o", str(tmp_path / "c"), "--days", "30")
    assert "admin 'ops'" in _cli("issue", ca, "--admin", "ops", "-o", str(tmp_path / "a"))
    assert "exactly one of --server, --client or --admin" in _cli("issue", ca, "-o", str(tmp_path / "x"), ok=False)
    assert "exactly one of" in _cli("issue", ca, "--client", "x", "--admin", "y", "-o", str(tmp_path / "x"), ok=False)
    assert "already exists" in _cli("issue", ca, "--client", "acme", "-o", str(tmp_path / "c"), ok=False)
    assert "request.csr" in _cli("request", "--client", "globex", "-o", str(tmp_path / "g"))
    out = _cli("sign", ca, str(tmp_path / "g" / "request.csr"), "-o", str(tmp_path / "g-signed"))
    assert "client 'globex'" in out
    assert "no such CSR" in _cli("sign", ca, str(tmp_path / "nope.csr"), "-o", str(tmp_path / "n"), ok=False)
    assert "revoked client 'acme'" in _cli("revoke", ca, "acme")
    assert "no certificate" in _cli("revoke", ca, "nobody", ok=False)
    assert "not a CA folder" in _cli("revoke", str(tmp_path / "c"), "acme", ok=False)
    Identity.load(tmp_path / "s")
    Identity.load(tmp_path / "a")
