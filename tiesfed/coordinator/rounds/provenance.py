"""Signatures in a round, so a merged model can be traced back to signed inputs.

Under mutual TLS each upload carries its client's signature over a manifest
(round, client, base fingerprint, options, the stream's sha256); the
coordinator checks it with the certificate of the stream that delivered it
before committing, and keeps it beside the contribution
(``<client>-<sha>.sig.json``). At finalization the coordinator signs the list of
what it folded (client, digest, signature, certificate fingerprint) with its
own key (``merged.sig.json``), which a fetching client checks against its CA.
The same checks run again on recovery and in the offline audit, so a spool file
edited after commit shows.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from tiesfed.coordinator.rounds.config import RoundConfig
from tiesfed.coordinator.rounds.events import Merged, RoundError
from tiesfed.coordinator.spool import Committed
from tiesfed.io.files import DamagedFileError, read_json, write_json_atomic
from tiesfed.trust import Peer, SignatureError, TrustError, describe, signing

if TYPE_CHECKING:
    from tiesfed.coordinator.rounds.state import RoundState

CONTRIBUTION_FIELDS = ("manifest", "signature_hex", "cert_pem", "cert_serial", "cert_fingerprint")
MERGED_FIELDS = ("manifest", "signature_hex", "cert_pem")
#: a DER ECDSA P-256 signature is at most 72 bytes; anything much longer is not one
MAX_SIGNATURE_BYTES = 512


def options_json(config: RoundConfig) -> str:
    """The options string clients sign: exactly the round spec's `options_json` (service.spec_message)."""
    return config.options.model_dump_json(by_alias=True)


def expected_manifest(config: RoundConfig, client_id: str, sha256: str) -> dict[str, str]:
    """What `client_id` must have signed for a stream with this digest in this round."""
    return signing.contribution_manifest(config.round_id, client_id, config.base_fingerprint or "",
                                         options_json(config), sha256)


def check_upload(config: RoundConfig, client_id: str, peer: Peer, signature: bytes, sha256: str) -> dict[str, Any]:
    """The signature record of a complete upload, or RoundError: the stream's certificate must
    be the client's and its key must have signed the manifest of exactly these bytes."""
    who = f"upload of {client_id!r} to round {config.round_id!r}"
    if peer.client_id != client_id:
        raise RoundError("UNAUTHENTICATED", f"{who}: the stream's certificate names {peer.client_id!r}")
    if not signature:
        raise RoundError("UNAUTHENTICATED", f"{who} is not signed: send the signature of its manifest with "
                         "the chunk that carries the stream's last bytes")
    manifest = expected_manifest(config, client_id, sha256)
    try:
        signing.verify(peer.cert_pem, manifest, signature)
    except SignatureError as e:
        raise RoundError("UNAUTHENTICATED", f"{who}: the signature does not verify with the certificate of "
                         f"{client_id!r} (serial {peer.serial:x}) over round, client, base, options and the "
                         f"stream's sha256 {sha256[:16]}…: {e}") from None
    return {"manifest": manifest, "signature_hex": signature.hex(), "cert_pem": peer.cert_pem.decode(),
            "cert_serial": format(peer.serial, "x"), "cert_fingerprint": peer.fingerprint}


def read_record(path: Path, what: str, fields: Sequence[str]) -> dict[str, Any]:
    """A signature file, its shape checked (DamagedFileError naming it otherwise)."""
    d = read_json(path, what)
    missing = [f for f in fields if f not in d]
    if missing:
        raise DamagedFileError(path, what, f"lacks {', '.join(missing)}")
    if not isinstance(d["manifest"], dict) or not all(isinstance(d[f], str) for f in fields if f != "manifest"):
        raise DamagedFileError(path, what, "has fields of the wrong type")
    try:
        bytes.fromhex(d["signature_hex"])
    except ValueError:
        raise DamagedFileError(path, what, "has a signature_hex that is not hex") from None
    return d


def record_problem(rec: dict[str, Any], manifest: dict[str, Any], ca_pem: Optional[bytes] = None) -> Optional[str]:
    """What is wrong with a contribution's signature record, given the manifest it must hold:
    the manifest, the certificate's fingerprint, serial and name, the signature, and (with
    `ca_pem`) the certificate's issuer. None if it all checks out."""
    got = rec["manifest"]
    if got != manifest:
        keys = sorted(k for k in set(got) | set(manifest) if got.get(k) != manifest.get(k))
        return (f"its signed manifest differs in {', '.join(keys)} ({keys[0]}: signed {got.get(keys[0])!r}, "
                f"expected {manifest.get(keys[0])!r})")
    try:
        info = describe(rec["cert_pem"])
    except TrustError as e:
        return f"its certificate is unreadable: {e}"
    if info.fingerprint != rec["cert_fingerprint"] or info.serial_hex != rec["cert_serial"]:
        return "its certificate is not the one its fingerprint and serial name"
    if info.common_name != manifest["client_id"]:
        return f"its certificate names {info.common_name!r}, not {manifest['client_id']!r}"
    try:
        signing.verify(rec["cert_pem"], manifest, bytes.fromhex(rec["signature_hex"]))
        if ca_pem is not None:
            signing.verify_chain(rec["cert_pem"], ca_pem, check_time=False)
    except SignatureError as e:
        return f"its signature does not verify: {e}"
    return None


def contribution_signature_problem(config: RoundConfig, c: Committed) -> Optional[str]:
    """Recovery's check of a committed contribution's signature file (None: fine, or unsigned)."""
    if not c.signed:
        return None
    try:
        rec = read_record(c.sig_path, f"signature of {c.client_id!r}", CONTRIBUTION_FIELDS)
    except DamagedFileError as e:
        return str(e)
    problem = record_problem(rec, expected_manifest(config, c.client_id, c.sha256))
    return f"its signature file {c.sig_path.name}: {problem}" if problem else None


def merged_rows(committed: dict[str, Committed], contributors: Sequence[str]) -> list[dict[str, str]]:
    """What the merged manifest lists for each folded contribution (unsigned ones with empty fields)."""
    rows = []
    for cid in contributors:
        c = committed[cid]
        rec = read_record(c.sig_path, f"signature of {cid!r}", CONTRIBUTION_FIELDS) if c.signed else None
        rows.append({"client_id": cid, "sha256": c.sha256, "signature_hex": rec["signature_hex"] if rec else "",
                     "cert_fingerprint": rec["cert_fingerprint"] if rec else ""})
    return rows


def sign_merged(r: "RoundState", merged: Merged, contributors: Sequence[str]) -> None:
    """With a coordinator identity: sign the merge over what was folded into it and write
    ``merged.sig.json`` (atomically), before the round records itself finalized."""
    if r.signer is None:
        return
    manifest = signing.merged_manifest(r.id, merged.sha256, merged_rows(r.committed, contributors))
    signature = signing.sign(r.signer.key_pem, manifest)
    write_json_atomic(r.spool.merged_sig_path, {"manifest": manifest, "signature_hex": signature.hex(),
                                                "cert_pem": r.signer.cert_pem.decode()})


def merged_record(r: "RoundState") -> Optional[dict[str, Any]]:
    """The merge's signature record to send with a Download (None: the round has none).
    Served as it is on disk, so tampering with it shows at the client, never repaired here."""
    path = r.spool.merged_sig_path
    if not path.exists():
        return None
    try:
        return read_record(path, "merged signature", MERGED_FIELDS)
    except DamagedFileError as e:
        raise RoundError("DATA_LOSS", f"round {r.id!r}: {e}") from None
