"""A small certificate authority for one federation: the CA, identities, CSRs, revocation.

Files are PEM. A CA folder holds the CA key (ca-key.pem, 0600, it never leaves
the folder), the CA certificate (ca.pem), the signed revocation list (crl.pem)
and index.json, the record of what was issued and revoked from which crl.pem
is re-signed. An identity folder holds cert.pem, key.pem (0600) and ca.pem.
Keys are ECDSA P-256 and signatures SHA-256, which gRPC's BoringSSL supports.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import secrets
from pathlib import Path
from typing import Optional, Sequence, Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tiesfed.trust.certs import (
    ID_PATTERN,
    CertInfo,
    TrustError,
    cert_pem,
    fingerprint,
    load_cert,
    locked,
    not_after,
    now,
    valid_id,
    write_atomic,
    write_private,
)

CA_KEY, CA_CERT, CRL, INDEX = "ca-key.pem", "ca.pem", "crl.pem", "index.json"
CERT, KEY, CSR = "cert.pem", "key.pem", "request.csr"
CA_DAYS, CERT_DAYS = 3650, 365
PathLike = Union[str, Path]


class PkiError(TrustError):
    """A CA operation refused (existing files, a bad id, a CSR that does not verify, ...)."""


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """A CA signs certificates and CRLs only; a leaf signs (TLS handshakes, manifests) only."""
    return x509.KeyUsage(digital_signature=not ca, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                         encipher_only=False, decipher_only=False)


def _check_id(client_id: str, what: str = "client id") -> None:
    if not valid_id(client_id):
        raise PkiError(f"{what} {client_id!r} is not valid (it must match {ID_PATTERN})")


def _read_index(ca_dir: Path) -> dict:
    try:
        return json.loads((ca_dir / INDEX).read_text())
    except FileNotFoundError:
        raise PkiError(f"{ca_dir} is not a CA folder (no {INDEX}); create one with `tiesfed pki init`") from None
    except ValueError as e:
        raise PkiError(f"{ca_dir / INDEX} is damaged: {e}") from None


def _write_index(ca_dir: Path, index: dict) -> None:
    write_atomic(ca_dir / INDEX, (json.dumps(index, indent=1) + "\n").encode(), 0o600)


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = load_cert((ca_dir / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), password=None)
    except FileNotFoundError as e:
        raise PkiError(f"{ca_dir} is not a CA folder: {Path(e.filename).name} is missing") from None
    except (TrustError, ValueError, TypeError) as e:
        raise PkiError(f"{ca_dir}: cannot read the CA: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{ca_dir / CA_KEY} is not an ECDSA key")
    return cert, key


def _sign_crl(ca_dir: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, index: dict) -> None:
    """Re-sign crl.pem from the index (every revoked serial) and swap it in atomically.
    The index is written first, so a crash in between loses no revocation: the next re-sign has it."""
    t = now()
    b = (x509.CertificateRevocationListBuilder().issuer_name(cert.subject)
         .last_update(t).next_update(max(not_after(cert), t + dt.timedelta(days=1)))
         .add_extension(x509.CRLNumber(index["crl_number"]), critical=False))
    for e in index["certs"]:
        if e.get("revoked_at"):
            b = b.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(int(e["serial"], 16))
                .revocation_date(dt.datetime.fromisoformat(e["revoked_at"])).build())
    crl = b.sign(key, hashes.SHA256())
    write_atomic(ca_dir / CRL, crl.public_bytes(serialization.Encoding.PEM))


def init_ca(ca_dir: PathLike, *, name: Optional[str] = None, days: int = CA_DAYS) -> CertInfo:
    """Create a CA in `ca_dir` (made 0700 if new); refuse if one is already there."""
    d = Path(ca_dir)
    if any((d / f).exists() for f in (CA_KEY, CA_CERT, INDEX)):
        raise PkiError(f"{d} already holds a CA; refusing to overwrite it")
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name or f"tiesfed CA {secrets.token_hex(4)}")])
    t = now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(t - dt.timedelta(minutes=5)).not_valid_after(t + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    write_private(d / CA_KEY, _key_pem(key))
    write_atomic(d / CA_CERT, cert_pem(cert))
    index: dict = {"ca_subject": subject.rfc4514_string(), "crl_number": 1, "certs": []}
    _write_index(d, index)
    _sign_crl(d, cert, key, index)
    return CertInfo.of(cert)


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    out: list[x509.GeneralName] = []
    for n in names:
        n = n.strip()
        if not n:
            raise PkiError("an empty server name")
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n.strip("[]"))))
        except ValueError:
            out.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(out)


def _issue_cert(ca_dir: Path, public_key: ec.EllipticCurvePublicKey, cn: str, role: str,
                san: Optional[x509.SubjectAlternativeName], days: int,
                not_before: Optional[dt.datetime]) -> x509.Certificate:
    ca_cert, ca_key = _load_ca(ca_dir)
    start = not_before or (now() - dt.timedelta(minutes=5))
    end = min(start + dt.timedelta(days=days), not_after(ca_cert))
    eku = ExtendedKeyUsageOID.SERVER_AUTH if role == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)])
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject).public_key(public_key)
         .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(_key_usage(ca=False), critical=True)
         .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if san is not None:
        b = b.add_extension(san, critical=False)
    cert = b.sign(ca_key, hashes.SHA256())
    with locked(ca_dir):
        index = _read_index(ca_dir)
        index["certs"].append({"serial": format(cert.serial_number, "x"), "subject": subject.rfc4514_string(),
                           "cn": cn, "role": role, "fingerprint": fingerprint(cert),
                               "not_after": end.isoformat(), "revoked_at": None})
        _write_index(ca_dir, index)
    return cert


def _out_dir(out_dir: PathLike, files: Sequence[str]) -> Path:
    d = Path(out_dir)
    for f in files:
        if (d / f).exists():
            raise PkiError(f"{d / f} already exists; refusing to overwrite an identity")
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


def issue(ca_dir: PathLike, out_dir: PathLike, *, server_names: Optional[Sequence[str]] = None,
          client_id: Optional[str] = None, admin_name: Optional[str] = None, days: int = CERT_DAYS,
          not_before: Optional[dt.datetime] = None) -> CertInfo:
    """Issue one identity (exactly one of server_names, client_id, admin_name) into out_dir:
    cert.pem, key.pem (0600) and ca.pem. `not_before` backdates it (tests of expiry)."""
    given = [x is not None for x in (server_names, client_id, admin_name)]
    if sum(given) != 1:
        raise PkiError("give exactly one of server names, a client id or an admin name")
    if days <= 0:
        raise PkiError(f"days must be positive, got {days}")
    ca = Path(ca_dir)
    _load_ca(ca)
    san = None
    if server_names is not None:
        names = [n.strip() for n in server_names]
        if not names or not all(names):
            raise PkiError("a server certificate needs at least one non-empty name")
        san, cn, role = _san(names), names[0], "server"
    elif client_id is not None:
        _check_id(client_id)
        cn, role = client_id, "client"
    else:
        assert admin_name is not None
        _check_id(admin_name, "admin name")
        cn, role = admin_name, "admin"
    out = _out_dir(out_dir, (CERT, KEY))
    key = _new_key()
    cert = _issue_cert(ca, key.public_key(), cn, role, san, days, not_before)
    write_private(out / KEY, _key_pem(key))
    write_atomic(out / CERT, cert_pem(cert))
    write_atomic(out / CA_CERT, (ca / CA_CERT).read_bytes())
    return CertInfo.of(cert)


def request(out_dir: PathLike, client_id: str) -> Path:
    """Make a key (0600) and a CSR for `client_id` in out_dir; send only request.csr to the CA."""
    _check_id(client_id)
    out = _out_dir(out_dir, (KEY, CSR))
    key = _new_key()
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, client_id)]))
           .sign(key, hashes.SHA256()))
    write_private(out / KEY, _key_pem(key))
    write_atomic(out / CSR, csr.public_bytes(serialization.Encoding.PEM))
    return out / CSR


def sign(ca_dir: PathLike, csr_path: PathLike, out_dir: PathLike, *, days: int = CERT_DAYS) -> CertInfo:
    """Issue a client certificate for a CSR: out_dir gets cert.pem and ca.pem (the key stays with the requester).
    Only the CSR's key and CN are used; the role is always client, whatever the CSR asks."""
    if days <= 0:
        raise PkiError(f"days must be positive, got {days}")
    ca = Path(ca_dir)
    _load_ca(ca)
    try:
        csr = x509.load_pem_x509_csr(Path(csr_path).read_bytes())
    except FileNotFoundError:
        raise PkiError(f"no such CSR: {csr_path}") from None
    except ValueError as e:
        raise PkiError(f"{csr_path} is not a PEM certificate request: {e}") from None
    if not csr.is_signature_valid:
        raise PkiError(f"{csr_path}: the request's signature does not verify")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in ("secp256r1", "secp384r1"):
        raise PkiError(f"{csr_path}: the key must be ECDSA P-256 or P-384")
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        raise PkiError(f"{csr_path}: the request must name exactly one client id (CN)")
    client_id = str(cns[0].value)
    _check_id(client_id)
    out = _out_dir(out_dir, (CERT,))
    cert = _issue_cert(ca, key, client_id, "client", None, days, None)
    write_atomic(out / CERT, cert_pem(cert))
    write_atomic(out / CA_CERT, (ca / CA_CERT).read_bytes())
    return CertInfo.of(cert)


def _serial_of(text: str) -> set[int]:
    t = text.strip().lower().replace(":", "")
    out: set[int] = set()
    for base, s in ((10, t), (16, t.removeprefix("0x"))):
        try:
            out.add(int(s, base))
        except ValueError:
            pass
    return out


def revoke(ca_dir: PathLike, id_or_serial: str) -> list[CertInfo]:
    """Revoke every unrevoked certificate whose CN is `id_or_serial`, or else the one with that
    serial (decimal or hex), and re-sign crl.pem. Returns what was revoked."""
    ca = Path(ca_dir)
    ca_cert, ca_key = _load_ca(ca)
    with locked(ca):
        index = _read_index(ca)
        matches = [e for e in index["certs"] if e["cn"] == id_or_serial]
        if not matches:
            serials = _serial_of(id_or_serial)
            matches = [e for e in index["certs"] if int(e["serial"], 16) in serials]
        if not matches:
            raise PkiError(f"no certificate issued by {ca} has the id or serial {id_or_serial!r}")
        todo = [e for e in matches if not e.get("revoked_at")]
        if not todo:
            raise PkiError(f"every certificate matching {id_or_serial!r} is already revoked")
        t = now().replace(microsecond=0).isoformat()
        for e in todo:
            e["revoked_at"] = t
        index["crl_number"] = int(index.get("crl_number", 0)) + 1
        _write_index(ca, index)
        _sign_crl(ca, ca_cert, ca_key, index)
    return [CertInfo(e["cn"], e["role"], int(e["serial"], 16), e.get("fingerprint", ""),
                     dt.datetime.fromisoformat(e["not_after"])) for e in todo]


def listing(ca_dir: PathLike) -> list[dict]:
    """The index entries (serial hex, subject, cn, role, fingerprint, not_after, revoked_at), oldest first."""
    return list(_read_index(Path(ca_dir))["certs"])
