"""Who we are on the wire and who is calling: identities, gRPC mutual-TLS credentials, peers, revocation.

The coordinator learns a caller's id from the certificate gRPC verified in the
handshake (never from metadata), and checks it against a revocation list that
it reloads when the CA re-signs it, so a revocation needs no restart. gRPC's
TLS does not read CRLs itself, hence `RevocationList`.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tiesfed.trust.certs import TrustError, common_name, fingerprint, load_cert, not_after, role
from tiesfed.trust.signing import SignatureError, verify_chain

CERT, KEY, CA_CERT = "cert.pem", "key.pem", "ca.pem"
TARGET_NAME_OVERRIDE = "grpc.ssl_target_name_override"


class IdentityError(TrustError):
    """An identity folder that cannot be used (a missing or bad file, a key that is not the cert's)."""


class RevocationError(TrustError):
    """A revocation list that cannot be trusted (unreadable, or not signed by the CA)."""


@dataclass(frozen=True)
class Identity:
    """An identity folder: cert.pem, key.pem and ca.pem, as `tiesfed pki issue` writes them."""

    folder: Path
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes

    @classmethod
    def load(cls, folder: Union[str, Path], *, check_time: bool = True) -> "Identity":
        """Read and check the folder: the key is the certificate's, the CA issued it and
        (unless check_time=False) it is valid now. Errors name the file at fault."""
        d = Path(folder)
        if not d.is_dir():
            raise IdentityError(f"identity folder {d} does not exist")
        data = {}
        for name in (CERT, KEY, CA_CERT):
            try:
                data[name] = (d / name).read_bytes()
            except FileNotFoundError:
                raise IdentityError(f"identity {d}: {name} is missing") from None
        try:
            cert = load_cert(data[CERT])
        except TrustError as e:
            raise IdentityError(f"identity {d}: {CERT} is bad: {e}") from None
        try:
            load_cert(data[CA_CERT])
        except TrustError as e:
            raise IdentityError(f"identity {d}: {CA_CERT} is bad: {e}") from None
        try:
            key = serialization.load_pem_private_key(data[KEY], password=None)
        except (ValueError, TypeError) as e:
            raise IdentityError(f"identity {d}: {KEY} is bad: {e}") from None
        pub = serialization.PublicFormat.SubjectPublicKeyInfo
        if (key.public_key().public_bytes(serialization.Encoding.DER, pub)
                != cert.public_key().public_bytes(serialization.Encoding.DER, pub)):
            raise IdentityError(f"identity {d}: {KEY} is not the key of {CERT}")
        try:
            verify_chain(cert, data[CA_CERT], check_time=check_time)
        except SignatureError as e:
            raise IdentityError(f"identity {d}: {CERT}: {e}") from None
        return cls(d, data[CERT], data[KEY], data[CA_CERT])

    @property
    def name(self) -> Optional[str]:
        return common_name(self.cert_pem)

    @property
    def role(self) -> Optional[str]:
        return role(self.cert_pem)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert_pem)


def server_credentials(identity: Identity) -> grpc.ServerCredentials:
    """Mutual TLS: a client must present a certificate from our CA, or the handshake fails."""
    return grpc.ssl_server_credentials([(identity.key_pem, identity.cert_pem)],
                                       root_certificates=identity.ca_pem, require_client_auth=True)


def channel_credentials(identity: Identity) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=identity.ca_pem, private_key=identity.key_pem,
                                        certificate_chain=identity.cert_pem)


def channel_options(server_name: Optional[str] = None,
                    extra: Iterable[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    """Channel options; the target-name override is set only when a caller names the server
    explicitly, so by default the server certificate must match the address dialled."""
    out = list(extra)
    if server_name:
        out.append((TARGET_NAME_OVERRIDE, server_name))
    return out


def secure_channel(target: str, identity: Identity, *, server_name: Optional[str] = None,
                   options: Iterable[tuple[str, Any]] = ()) -> grpc.Channel:
    return grpc.secure_channel(target, channel_credentials(identity), options=channel_options(server_name, options))


@dataclass(frozen=True)
class Peer:
    """The caller, as its verified certificate says: id (CN), role (OU), serial, SHA-256 fingerprint."""

    client_id: Optional[str]
    role: Optional[str]
    serial: int
    fingerprint: str
    not_after: dt.datetime
    cert_pem: bytes

    @classmethod
    def from_pem(cls, pem: bytes) -> "Peer":
        c = load_cert(pem)
        return cls(common_name(c), role(c), c.serial_number, fingerprint(c), not_after(c), pem)


def peer_identity(context: grpc.ServicerContext) -> Optional[Peer]:
    """The caller's certificate from the TLS handshake, or None on a connection without one
    (an insecure port). Only meaningful with server_credentials' require_client_auth=True."""
    auth = context.auth_context() or {}
    pems = auth.get("x509_pem_cert") or auth.get(b"x509_pem_cert")  # type: ignore[call-overload]
    if not pems:
        return None
    pem = pems[0]
    return Peer.from_pem(pem.encode() if isinstance(pem, str) else pem)


class RevocationList:
    """crl.pem, checked against the CA and re-read when the file changes (a stat per lookup).

    A file missing from the start means nothing is revoked; a file that does not parse, is
    not signed by the CA, is older (a lower CRL number) than one already read, or is gone
    after one was read raises RevocationError, on every lookup until it is fixed: deleting
    or rolling back crl.pem must not bring a revoked certificate back."""

    def __init__(self, path: Union[str, Path], ca_pem: bytes) -> None:
        self.path = Path(path)
        self._ca = load_cert(ca_pem)
        self._lock = threading.Lock()
        self._stamp: Optional[tuple[int, int, int]] = None
        self._revoked: frozenset[int] = frozenset()
        self._number: Optional[int] = None  # the CRL number of the list last read (None: none read)
        self._refresh()

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._number is not None:
                raise RevocationError(f"revocation list {self.path} is gone (it listed "
                                      f"{len(self._revoked)} revoked certificate(s))") from None
            self._stamp, self._revoked = None, frozenset()
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        try:
            crl = x509.load_pem_x509_crl(self.path.read_bytes())
        except (ValueError, OSError) as e:
            raise RevocationError(f"revocation list {self.path} is unreadable: {e}") from None
        if crl.issuer != self._ca.subject or not crl.is_signature_valid(self._ca.public_key()):  # type: ignore[arg-type]
            raise RevocationError(f"revocation list {self.path} is not signed by the CA")
        try:
            number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        except x509.ExtensionNotFound:
            number = 0
        except ValueError as e:
            raise RevocationError(f"revocation list {self.path} has a malformed CRL number: {e}") from None
        if self._number is not None and number < self._number:
            raise RevocationError(f"revocation list {self.path} is CRL number {number}, older than number "
                                  f"{self._number} already read: a rolled-back list is refused")
        self._revoked = frozenset(r.serial_number for r in crl)
        self._stamp, self._number = stamp, number

    def is_revoked(self, serial: int) -> bool:
        with self._lock:
            self._refresh()
            return serial in self._revoked

    def revoked(self) -> frozenset[int]:
        with self._lock:
            self._refresh()
            return self._revoked


__all__ = ["Identity", "IdentityError", "Peer", "RevocationError", "RevocationList", "channel_credentials",
           "channel_options", "peer_identity", "secure_channel", "server_credentials"]
