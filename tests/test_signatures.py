"""Signed contributions, a signed merge and the offline audit, over real mutual TLS on loopback.

Certificates come from the session's `pki` fixture (tests/conftest.py) plus a second CA
made here. A coordinator-side edit of the merge's signature record must stop `fetch`
before it writes anything; an upload whose signature is garbage, missing or by another
key must be refused with the round unchanged; `tiesfed coordinator audit` must pass a
clean spool and name each file edited after commit.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import grpc
import pytest
import torch
from click.testing import CliRunner

from tests.helpers import write_family
from tests.test_federated import contribution_bytes
from tiesfed.cli import main
from tiesfed.client.federated import FederatedError, Retry, fetch, submit
from tiesfed.coordinator.audit import AuditError, audit_round
from tiesfed.coordinator.rounds import ParticipantConfig, RoundConfig
from tiesfed.coordinator.server import CoordinatorConfig, CoordinatorServer
from tiesfed.io.files import read_json, write_json_atomic
from tiesfed.io.model_io import ModelReader, fingerprint
from tiesfed.protos.v1 import CLIENT_ID_KEY, channel_options
from tiesfed.protos.v1 import tiesfed_pb2 as pb
from tiesfed.protos.v1 import tiesfed_pb2_grpc as pb_grpc
from tiesfed.trust import Identity, signing
from tiesfed.trust import pki as ca

CLIENTS = ["org-a", "org-b", "org-c"]
FAST = Retry(attempts=4, backoff_s=0.05, max_backoff_s=0.3)


# ----------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    _, _, base_dir, paths = write_family(tmp_path_factory.mktemp("sigfamily"), 3, seed=11)
    with ModelReader(base_dir) as r:
        fp = fingerprint(r)
    return base_dir, paths, fp


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory) -> Path:
    """Another federation's CA with a server and an org-a of its own."""
    root = tmp_path_factory.mktemp("other-pki")
    ca.init_ca(root / "ca")
    ca.issue(root / "ca", root / "server", server_names=["127.0.0.1"])
    ca.issue(root / "ca", root / "org-a", client_id="org-a")
    return root


def ident(pki, who: str) -> Identity:
    return Identity.load(pki.client(who))


def start(pki, family, spool: Path) -> CoordinatorServer:
    cfg = CoordinatorConfig(listen="127.0.0.1:0", spool_dir=spool, base_model=str(family[0]), aggregator="local",
                            tls_dir=pki.server)
    return CoordinatorServer(cfg).start()


def open_round(srv, clients=CLIENTS, round_id="r1"):
    return srv.manager.open_round(RoundConfig(round_id=round_id,
                                              participants=[ParticipantConfig(client_id=c) for c in clients]))


def send(srv, pki, family, who: str, model: int):
    return submit(srv.target, "r1", None, family[0], family[1][model], retry=FAST, tls=ident(pki, who))


def get(srv, pki, family, out: Path, who: str = "org-a"):
    return fetch(srv.target, "r1", None, family[0], out, timeout=60, retry=FAST, tls=ident(pki, who))


def manifest_for(rnd, client: str, data: bytes) -> dict:
    import hashlib

    return signing.contribution_manifest(rnd.id, client, rnd.config.base_fingerprint,
                                         rnd.config.options.model_dump_json(by_alias=True),
                                         hashlib.sha256(data).hexdigest())


def raw_upload(srv, identity: Identity, round_id: str, data: bytes, signature: bytes, chunk: int = 32 << 10):
    """Upload over mTLS with a plain stub, the given signature on the chunk with the last bytes."""
    with grpc.secure_channel(srv.target, grpc.ssl_channel_credentials(
            root_certificates=identity.ca_pem, private_key=identity.key_pem, certificate_chain=identity.cert_pem),
            options=channel_options()) as ch:
        stub = pb_grpc.CoordinatorStub(ch)

        def reqs():
            for i in range(0, len(data), chunk):
                last = i + chunk >= len(data)
                yield pb.UploadChunk(round_id=round_id, offset=i, data=data[i:i + chunk],
                                     signature=signature if last else b"")

        return stub.Upload(reqs(), metadata=((CLIENT_ID_KEY, identity.name),), timeout=30)


def snapshot(rnd) -> dict:
    with rnd.lock:
        acc = {name: {k: v.clone() for k, v in a.tensors().items()}
               for name, a in (rnd.agg._acc.items() if rnd.agg is not None else ())}
        return {"acc": acc, "committed": {c: x.sha256 for c, x in rnd.committed.items()},
                "sessions": sorted(rnd.sessions), "state": rnd.state,
                "files": sorted(p.name for p in rnd.spool.contrib_dir.iterdir())}


def assert_unchanged(before: dict, after: dict) -> None:
    assert {k: v for k, v in before.items() if k != "acc"} == {k: v for k, v in after.items() if k != "acc"}
    assert before["acc"].keys() == after["acc"].keys()
    for name, tensors in before["acc"].items():
        for k, t in tensors.items():
            assert torch.equal(t, after["acc"][name][k]), f"{name}.{k} changed"


# ----------------------------------------------------------------------------- a signed round


@pytest.fixture(scope="module")
def signed_round(pki, family, tmp_path_factory):
    """One signed round of three, finished and fetched; the coordinator is stopped after it,
    so the spool is what an auditor would find."""
    root = tmp_path_factory.mktemp("signed")
    srv = start(pki, family, root / "spool")
    try:
        rnd = open_round(srv)
        subs = {c: send(srv, pki, family, c, i) for i, c in enumerate(CLIENTS)}
        res = get(srv, pki, family, root / "out")
    finally:
        srv.stop(grace=0)
    return root / "spool", rnd, subs, res


def test_signed_round_is_verified_on_fetch(pki, signed_round):
    spool, rnd, subs, res = signed_round
    assert all(s.signed for s in subs.values())
    prov = res.provenance
    assert prov is not None and prov["round_id"] == "r1" and prov["merged_sha256"] == res.sha256
    rows = {r["client_id"]: r for r in prov["contributions"]}
    assert sorted(rows) == CLIENTS
    for c in CLIENTS:
        assert rows[c]["sha256"] == subs[c].sha256
        assert rows[c]["cert_fingerprint"] == ident(pki, c).fingerprint
        rec = read_json(rnd.committed[c].sig_path, "sig")
        assert rec["signature_hex"] == rows[c]["signature_hex"] and rec["manifest"]["stream_sha256"] == subs[c].sha256
        assert read_json(rnd.spool.contrib_dir / f"{c}.json", "pointer")["signed"] is True
    merged = read_json(rnd.spool.merged_sig_path, "merged sig")
    assert merged["manifest"] == prov and Identity.load(pki.server).cert_pem.decode() == merged["cert_pem"]
    assert (res.out_dir / "config.json").exists()


def test_a_resumed_upload_is_signed_too(pki, family, tmp_path):
    """The signature rides on the chunk with the last bytes, in whichever attempt sends it."""
    srv = start(pki, family, tmp_path / "spool")
    try:
        rnd = open_round(srv, ["org-a"])

        def fault(attempt: int, i: int) -> bool:  # break the first attempt once 3 chunks arrived
            if attempt > 0 or i != 3:
                return False
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                s = rnd.sessions.get("org-a")
                if s is not None and s.offset == 3 * 512:
                    return True
                time.sleep(0.005)
            raise AssertionError("the coordinator never received the first chunks")

        res = submit(srv.target, "r1", None, family[0], family[1][0], retry=FAST, tls=ident(pki, "org-a"),
                     chunk_bytes=512, fault=fault)
        assert res.signed and res.resumed_from and res.attempts == 2
        assert rnd.committed["org-a"].signed and rnd.wait_closed(30)
    finally:
        srv.stop(grace=0)


@pytest.mark.parametrize("case", ["garbage", "missing", "another-key", "another-stream"])
def test_a_bad_signature_is_refused_and_the_round_unchanged(pki, family, tmp_path, case):
    srv = start(pki, family, tmp_path / "spool")
    try:
        rnd = open_round(srv)
        org_a = ident(pki, "org-a")
        data = contribution_bytes(family, 0, model_key="0")
        sig = {
            "garbage": b"\x30\x06garbage",
            "missing": b"",
            "another-key": signing.sign(ident(pki, "org-b").key_pem, manifest_for(rnd, "org-a", data)),
            "another-stream": signing.sign(org_a.key_pem, manifest_for(rnd, "org-a", data + b"x")),
        }[case]
        before = snapshot(rnd)
        with pytest.raises(grpc.RpcError) as ei:
            raw_upload(srv, org_a, "r1", data, sig)
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED, ei.value.details()
        assert ("is not signed" if case == "missing" else "signature does not verify") in ei.value.details()
        assert_unchanged(before, snapshot(rnd))
        assert not list(rnd.spool.partial_dir.iterdir())
        assert rnd.events[-1].kind == "UPLOAD_REJECTED"
        # the same bytes, signed by org-a over their digest, are taken
        receipt = raw_upload(srv, org_a, "r1", data, signing.sign(org_a.key_pem, manifest_for(rnd, "org-a", data)))
        assert receipt.committed and sorted(rnd.committed) == ["org-a"]
    finally:
        srv.stop(grace=0)


def _tamper_merged(path: Path, how: str, pki, other_ca: Path) -> None:
    rec = read_json(path, "merged sig")
    m = rec["manifest"]
    if how == "signature":
        rec["signature_hex"] = signing.sign(ident(pki, "org-b").key_pem, m).hex()
    elif how == "manifest":
        m["contributions"][0]["sha256"] = "0" * 64
    elif how == "client-signed":  # a participant's certificate and key, not the coordinator's
        rec["cert_pem"] = ident(pki, "org-b").cert_pem.decode()
        rec["signature_hex"] = signing.sign(ident(pki, "org-b").key_pem, m).hex()
    elif how == "other-ca":
        other = Identity.load(other_ca / "server")
        rec["cert_pem"], rec["signature_hex"] = other.cert_pem.decode(), signing.sign(other.key_pem, m).hex()
    elif how == "wrong-digest":  # even the coordinator's own key cannot vouch for another stream
        m["merged_sha256"] = "f" * 64
        rec["signature_hex"] = signing.sign(Identity.load(pki.server).key_pem, m).hex()
    write_json_atomic(path, rec)


def test_a_tampered_merge_signature_stops_fetch_before_writing(pki, family, tmp_path, other_ca):
    srv = start(pki, family, tmp_path / "spool")
    try:
        rnd = open_round(srv, ["org-a", "org-b"])
        send(srv, pki, family, "org-a", 0)
        send(srv, pki, family, "org-b", 1)
        assert rnd.wait_closed(30) and rnd.state == "finalized"
        clean = rnd.spool.merged_sig_path.read_bytes()
        want = {"signature": ("UNAUTHENTICATED", "does not verify"), "manifest": ("UNAUTHENTICATED", "does not verify"),
                "client-signed": ("UNAUTHENTICATED", "client certificate"),
                "other-ca": ("UNAUTHENTICATED", "does not check against our CA"),
                "wrong-digest": ("DATA_LOSS", "names the merged sha256")}
        for how, (code, match) in want.items():
            _tamper_merged(rnd.spool.merged_sig_path, how, pki, other_ca)
            out = tmp_path / f"out-{how}"
            with pytest.raises(FederatedError) as ei:
                get(srv, pki, family, out)
            assert ei.value.code == code and match in str(ei.value), (how, str(ei.value))
            assert not out.exists(), how
            rnd.spool.merged_sig_path.write_bytes(clean)
        assert get(srv, pki, family, tmp_path / "out-clean").provenance["merged_sha256"] == rnd.merged.sha256
        # a partial file that is whole already needs no data, but the signature is still checked
        whole = tmp_path / "out-whole"
        whole.mkdir()
        part = whole / ".tiesfed-merged-r1.tfs.part"
        part.write_bytes(rnd.merged.path.read_bytes())
        _tamper_merged(rnd.spool.merged_sig_path, "manifest", pki, other_ca)
        with pytest.raises(FederatedError, match="does not verify"):
            get(srv, pki, family, whole)
        assert whole.is_dir() and not any(whole.iterdir())  # not ours to remove; our partial file is gone
        rnd.spool.merged_sig_path.write_bytes(clean)
        part.write_bytes(rnd.merged.path.read_bytes())
        res = get(srv, pki, family, whole)
        assert res.bytes_downloaded == 0 and res.provenance["merged_sha256"] == rnd.merged.sha256
    finally:
        srv.stop(grace=0)


def test_restart_keeps_signed_contributions_and_drops_a_forged_signature(pki, family, tmp_path):
    srv = start(pki, family, tmp_path / "spool")
    try:
        rnd = open_round(srv)
        send(srv, pki, family, "org-a", 0)
        send(srv, pki, family, "org-b", 1)
    finally:
        srv.stop(grace=0)
    srv = start(pki, family, tmp_path / "spool")
    try:
        assert sorted(srv.manager.get("r1").committed) == ["org-a", "org-b"]
    finally:
        srv.stop(grace=0)
    sig = rnd.committed["org-b"].sig_path
    rec = read_json(sig, "sig")
    rec["manifest"]["base_fingerprint"] = "sha256:" + "0" * 64  # re-labelled, the signature left as it was
    write_json_atomic(sig, rec)
    srv = start(pki, family, tmp_path / "spool")
    try:
        r2 = srv.manager.get("r1")
        assert sorted(r2.committed) == ["org-a"] and "org-b" in r2.lost
        assert "signature" in r2.message
        send(srv, pki, family, "org-b", 1)  # asked to upload again, it can
        send(srv, pki, family, "org-c", 2)
        assert r2.wait_closed(30) and r2.state == "finalized"
    finally:
        srv.stop(grace=0)


# ----------------------------------------------------------------------------- the audit


def audit_cli(spool: Path, *extra: str):
    return CliRunner().invoke(main, ["coordinator", "audit", "--spool", str(spool), "--round", "r1", *extra])


def test_audit_of_a_clean_spool(pki, signed_round, other_ca):
    spool = signed_round[0]
    report = audit_round(spool, "r1", ca_pem=(pki.ca / "ca.pem").read_bytes())
    assert report.ok and report.state == "finalized", report.all_problems()
    assert [c.client_id for c in report.contributions] == CLIENTS
    for c in report.contributions:
        assert c.signature_valid and c.chain_valid and c.pointer_sha256 == c.file_sha256
        assert c.cert_fingerprint == ident(pki, c.client_id).fingerprint
    m = report.merged
    assert m.signature_valid and m.lists_committed and m.stored_sha256 == m.file_sha256 == m.signed_sha256
    res = audit_cli(spool, "--ca", str(pki.ca / "ca.pem"))
    assert res.exit_code == 0, res.output
    assert "OK: every digest and signature checks out" in res.output and "org-c" in res.output
    res = audit_cli(spool, "--json")
    assert res.exit_code == 0 and json.loads(res.output)["ok"] is True
    res = audit_cli(spool, "--ca", str(other_ca / "ca" / "ca.pem"))  # the wrong CA: nothing is its
    assert res.exit_code == 1 and "not issued by the given CA" in res.output
    res = CliRunner().invoke(main, ["coordinator", "audit", "--spool", str(spool), "--round", "nope"])
    assert res.exit_code == 2 and "no round 'nope'" in res.output
    with pytest.raises(AuditError):
        audit_round(spool, "../r1")


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_sig(path: Path) -> None:
    rec = read_json(path, "sig")
    rec["signature_hex"] = rec["signature_hex"][:-2] + ("00" if rec["signature_hex"][-2:] != "00" else "01")
    write_json_atomic(path, rec)


def _drop_signed(path: Path) -> None:
    d = read_json(path, "pointer")
    del d["signed"]
    write_json_atomic(path, d)


@pytest.mark.parametrize("case, flagged, match", [
    ("contribution", "org-b", "edited after commit"),
    ("sig.json", "org-b", "signature does not verify"),
    ("pointer", "org-b", "its pointer was edited"),
    ("merged.tfs", "merged", "edited after finalization"),
    ("merged.sig.json", "merged", "signed manifest gives 'org-a' the sha256"),
])
def test_audit_flags_each_file_edited_after_commit(signed_round, tmp_path, case, flagged, match):
    spool = tmp_path / "spool"
    shutil.copytree(signed_round[0], spool)
    d = spool / "rounds" / "r1"
    contrib = d / "contributions"
    b_file = next(contrib.glob("org-b-*.tfs"))
    if case == "contribution":
        _flip(b_file, b_file.stat().st_size // 2)
    elif case == "sig.json":
        _edit_sig(b_file.with_name(b_file.name.replace(".tfs", ".sig.json")))
    elif case == "pointer":
        _drop_signed(contrib / "org-b.json")
    elif case == "merged.tfs":
        _flip(d / "merged.tfs", (d / "merged.tfs").stat().st_size - 40)
    else:  # the coordinator's manifest edited, its signature left as it was
        rec = read_json(d / "merged.sig.json", "merged sig")
        rec["manifest"]["contributions"][0]["sha256"] = "0" * 64
        write_json_atomic(d / "merged.sig.json", rec)
    report = audit_round(spool, "r1")
    assert not report.ok
    problems = report.all_problems()
    assert any(p.startswith(f"{flagged}: ") and match in p for p in problems), problems
    others = [c.client_id for c in report.contributions if not c.ok]
    assert others == ([flagged] if flagged != "merged" else []), problems
    if case == "contribution":  # the signature no longer covers the file either
        b = next(c for c in report.contributions if c.client_id == "org-b")
        assert not b.signature_valid and b.file_sha256 != b.pointer_sha256
    res = audit_cli(spool)
    assert res.exit_code == 1 and "FAILED" in res.output, res.output
    assert json.loads(audit_cli(spool, "--json").output)["ok"] is False


def test_audit_of_an_unsigned_round_says_so(family, tmp_path):
    """An insecure round (the in-process fast path) has no signatures: the audit says so, and fails."""
    cfg = CoordinatorConfig(listen="127.0.0.1:0", spool_dir=tmp_path / "spool", base_model=str(family[0]),
                            aggregator="local", insecure=True)
    with CoordinatorServer(cfg) as srv:
        rnd = open_round(srv, ["org-a"])
        submit(srv.target, "r1", "org-a", family[0], family[1][0], retry=FAST, insecure=True)
        assert rnd.wait_closed(30)
        deadline = time.monotonic() + 10
        while rnd.state != "finalized" and time.monotonic() < deadline:
            time.sleep(0.05)
    report = audit_round(tmp_path / "spool", "r1")
    assert not report.ok and not report.contributions[0].signed and not report.merged.signed
    assert any("unsigned" in p for p in report.all_problems())
    assert report.merged.stored_sha256 == report.merged.file_sha256
