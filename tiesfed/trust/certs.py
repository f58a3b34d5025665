"""Reading certificates and writing PEM files: the small helpers every trust module shares.

A certificate's subject carries who (CN = client id or name) and which role
(OU = client, admin or server). The CA signs both, so a participant cannot
promote itself; everything here reads them the same way.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

# the same rule as the coordinator's participant and round ids (tiesfed/coordinator/spool.py)
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
ROLES = ("client", "admin", "server")

PemLike = Union[bytes, str, x509.Certificate]


class TrustError(Exception):
    """Base of every error raised by tiesfed.trust (a message fit to show a user as is)."""


def valid_id(text: str) -> bool:
    return isinstance(text, str) and re.fullmatch(ID_PATTERN, text) is not None


def load_cert(pem: PemLike) -> x509.Certificate:
    if isinstance(pem, x509.Certificate):
        return pem
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        return x509.load_pem_x509_certificate(data)
    except (ValueError, x509.InvalidVersion) as e:  # a bit-flipped version field is InvalidVersion
        raise TrustError(f"not a PEM certificate: {e}") from None


def _attr(name: x509.Name, oid: x509.ObjectIdentifier) -> Optional[str]:
    values = name.get_attributes_for_oid(oid)
    return str(values[0].value) if len(values) == 1 else None


def common_name(cert: PemLike) -> Optional[str]:
    return _attr(load_cert(cert).subject, NameOID.COMMON_NAME)


def role(cert: PemLike) -> Optional[str]:
    """The role the CA wrote into the subject's OU (client, admin, server), None if absent."""
    return _attr(load_cert(cert).subject, NameOID.ORGANIZATIONAL_UNIT_NAME)


def fingerprint(cert: PemLike) -> str:
    """SHA-256 of the DER encoding, lowercase hex without separators."""
    return hashlib.sha256(load_cert(cert).public_bytes(serialization.Encoding.DER)).hexdigest()


def _utc(obj: object, name: str) -> dt.datetime:
    # cryptography >= 42 has the *_utc attributes; older ones return naive UTC
    value = getattr(obj, name + "_utc", None)
    return value if value is not None else getattr(obj, name).replace(tzinfo=dt.timezone.utc)


def not_before(cert: PemLike) -> dt.datetime:
    return _utc(load_cert(cert), "not_valid_before")


def not_after(cert: PemLike) -> dt.datetime:
    return _utc(load_cert(cert), "not_valid_after")


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass(frozen=True)
class CertInfo:
    """What a certificate says about its holder, as the CA wrote it."""

    common_name: Optional[str]
    role: Optional[str]
    serial: int
    fingerprint: str
    not_after: dt.datetime

    @property
    def serial_hex(self) -> str:
        return format(self.serial, "x")

    @classmethod
    def of(cls, cert: PemLike) -> "CertInfo":
        c = load_cert(cert)
        return cls(common_name(c), role(c), c.serial_number, fingerprint(c), not_after(c))


def describe(cert: PemLike) -> CertInfo:
    return CertInfo.of(cert)


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a temp file beside `path` and rename it over: a reader sees the old or the new file, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_private(path: Path, data: bytes) -> None:
    """Create a key file readable by its owner only; refuse to replace an existing one."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise TrustError(f"{path} already exists; refusing to overwrite a private key") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on folder/.lock, so two CA commands never interleave an index update."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover  (Windows: one operator, one command at a time)
        yield
        return
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
