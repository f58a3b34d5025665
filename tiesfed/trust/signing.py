"""Signed manifests: who contributed what to a round, and what the coordinator merged from it.

A manifest is a small dict; its canonical JSON (sorted keys, compact, UTF-8) is
what gets signed, with the signer's certificate key (ECDSA P-256, SHA-256).
Each manifest names its kind, so a contribution signature can never pass as a
merge signature. `verify_chain` ties a signer's certificate to the CA.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any, Mapping, Optional, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tiesfed.trust.certs import PemLike, TrustError, common_name, load_cert, not_after, not_before, now

CONTRIBUTION_KIND = "tiesfed.contribution.v1"
MERGED_KIND = "tiesfed.merged.v1"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTRIBUTION_KEYS = ("client_id", "sha256", "signature_hex", "cert_fingerprint")


class SignatureError(TrustError):
    """A signature or certificate that does not check out (the message says which and why)."""


def canonical_json(manifest: Mapping[str, Any]) -> bytes:
    """The bytes that are signed: one encoding per manifest, whoever serialises it."""
    try:
        return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise SignatureError(f"manifest is not plain JSON: {e}") from None


def sign(key_pem: bytes, manifest: Mapping[str, Any]) -> bytes:
    """A DER-encoded ECDSA/SHA-256 signature of the manifest's canonical JSON."""
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise SignatureError(f"cannot read the signing key: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SignatureError("the signing key must be an ECDSA key")
    return key.sign(canonical_json(manifest), ec.ECDSA(hashes.SHA256()))


def verify(cert_pem: PemLike, manifest: Mapping[str, Any], signature: bytes) -> None:
    """Raise SignatureError unless `signature` is the certificate key's over this manifest."""
    try:
        cert = load_cert(cert_pem)
    except TrustError as e:
        raise SignatureError(str(e)) from None
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise SignatureError("the signer's certificate does not hold an ECDSA key")
    try:
        key.verify(bytes(signature), canonical_json(manifest), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SignatureError(f"signature by {common_name(cert)!r} does not match the manifest") from None


def verify_chain(cert_pem: PemLike, ca_pem: PemLike, *, at: Optional[dt.datetime] = None,
                 check_time: bool = True) -> None:
    """Raise SignatureError unless the CA signed this certificate and (with check_time) both
    are valid at `at` (default: now). Revocation is RevocationList's job."""
    try:
        cert, ca = load_cert(cert_pem), load_cert(ca_pem)
    except TrustError as e:
        raise SignatureError(str(e)) from None
    who = common_name(cert)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise SignatureError(f"certificate of {who!r} was not issued by CA {common_name(ca)!r}") from None
    if not check_time:
        return
    t = at or now()
    for c, what in ((cert, f"certificate of {who!r}"), (ca, f"CA {common_name(ca)!r}")):
        if t < not_before(c):
            raise SignatureError(f"{what} is not valid before {not_before(c).isoformat()}")
        if t > not_after(c):
            raise SignatureError(f"{what} expired on {not_after(c).isoformat()}")


def _check_sha256(value: str, what: str) -> None:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise SignatureError(f"{what} must be 64 lowercase hex digits (SHA-256), got {value!r}")


def contribution_manifest(round_id: str, client_id: str, base_fingerprint: str, options_json: str,
                          stream_sha256: str) -> dict[str, str]:
    """What a client signs for an upload: the round, who, onto which base, with which options, which bytes."""
    _check_sha256(stream_sha256, "stream_sha256")
    return {"kind": CONTRIBUTION_KIND, "round_id": round_id, "client_id": client_id,
            "base_fingerprint": base_fingerprint, "options": options_json, "stream_sha256": stream_sha256}


def merged_manifest(round_id: str, merged_sha256: str, contributions: Sequence[Mapping[str, str]]) -> dict[str, Any]:
    """What the coordinator signs for a merge: its digest and every contribution folded into it
    (client_id, sha256, signature_hex, cert_fingerprint), sorted by client id."""
    _check_sha256(merged_sha256, "merged_sha256")
    rows = []
    for c in contributions:
        if set(c) != set(_CONTRIBUTION_KEYS):
            raise SignatureError(f"a contribution entry needs exactly {list(_CONTRIBUTION_KEYS)}, got {sorted(c)}")
        _check_sha256(c["sha256"], f"sha256 of {c['client_id']!r}")
        rows.append({k: str(c[k]) for k in _CONTRIBUTION_KEYS})
    ids = [r["client_id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise SignatureError(f"a client appears twice among the contributions: {sorted(ids)}")
    return {"kind": MERGED_KIND, "round_id": round_id, "merged_sha256": merged_sha256,
            "contributions": sorted(rows, key=lambda r: r["client_id"])}
