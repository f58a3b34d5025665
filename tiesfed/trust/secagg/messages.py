"""The secure round's messages: plain dataclasses, each serialisable to bytes and back.

Wire form: b"TSAG" u8 version, u32 header length, a canonical JSON header naming the
message type and its fields, then the byte fields back to back (the JSON refers to them by
offset and length, so a large masked vector is not base64-inflated). `from_bytes` checks
the framing, the type and every field's type: a malformed message is a SecAggError.

Flow (client → coordinator ↑, coordinator → client ↓):
  ↑ KeyAdvert    both X25519 public keys and a seed commitment, signed with the client's certificate key
  ↓ KeyList      every advertisement (the clients check each signature)
  ↑ ShareUpload  the support bitmap + one sealed box of Shamir shares per other client
  ↓ MaskRequest  who shared (U1), the union support U, the boxes addressed to this client
  ↑ MaskedUpload the masked ring vector over U
  ↓ UnmaskRequest who uploaded (U2)
  ↑ UnmaskReply  shares of b_v for v in U2, of s_v's private key for v in U1 \\ U2
"""

from __future__ import annotations

import dataclasses
import json
import struct
from dataclasses import dataclass
from typing import Any, Union

from tiesfed.trust.secagg.keys import SecAggError

MAGIC, VERSION = b"TSAG", 2  # 2: KeyAdvert carries the seed commitment
_PREFIX = struct.Struct("<4sBI")


@dataclass(frozen=True)
class KeyAdvert:
    client_id: str
    c_pk: bytes
    s_pk: bytes
    seed_commit: bytes  # `keys.seed_commitment` of the client's self-mask seed
    cert_pem: bytes
    signature: bytes


@dataclass(frozen=True)
class KeyList:
    round_id: str
    adverts: tuple[KeyAdvert, ...]


@dataclass(frozen=True)
class ShareUpload:
    client_id: str
    support: bytes
    boxes: dict[str, bytes]  # recipient → sealed shares


@dataclass(frozen=True)
class MaskRequest:
    round_id: str
    sharers: tuple[str, ...]
    support: bytes
    boxes: dict[str, bytes]  # sender → sealed shares


@dataclass(frozen=True)
class MaskedUpload:
    client_id: str
    masked: bytes


@dataclass(frozen=True)
class UnmaskRequest:
    round_id: str
    survivors: tuple[str, ...]


@dataclass(frozen=True)
class UnmaskReply:
    client_id: str
    seed_shares: dict[str, bytes]  # survivor → share of its self-mask seed
    key_shares: dict[str, bytes]  # dropped client → share of its mask key


Message = Union[KeyAdvert, KeyList, ShareUpload, MaskRequest, MaskedUpload, UnmaskRequest, UnmaskReply]
TYPES: dict[str, type] = {c.__name__: c for c in
                          (KeyAdvert, KeyList, ShareUpload, MaskRequest, MaskedUpload, UnmaskRequest, UnmaskReply)}


def _enc(value: Any, blobs: list[bytes], offset: list[int]) -> Any:
    if isinstance(value, bytes):
        blobs.append(value)
        ref = {"$b": [offset[0], len(value)]}
        offset[0] += len(value)
        return ref
    if dataclasses.is_dataclass(value):
        return {"$t": type(value).__name__,
                **{f.name: _enc(getattr(value, f.name), blobs, offset) for f in dataclasses.fields(value)}}
    if isinstance(value, (list, tuple)):
        return [_enc(v, blobs, offset) for v in value]
    if isinstance(value, dict):
        return {k: _enc(v, blobs, offset) for k, v in sorted(value.items())}
    return value


def to_bytes(msg: Message) -> bytes:
    blobs: list[bytes] = []
    header = json.dumps(_enc(msg, blobs, [0]), sort_keys=True, separators=(",", ":")).encode()
    return _PREFIX.pack(MAGIC, VERSION, len(header)) + header + b"".join(blobs)


def _check(value: Any, hint: str, what: str) -> Any:
    """Check a decoded value against the few field types messages use, converting lists to tuples."""
    ok: bool
    if hint in ("str", "bytes", "int"):
        ok = type(value).__name__ == hint
    elif hint.startswith("tuple["):
        inner = hint[6:-6]  # tuple[X, ...]
        if not isinstance(value, list):
            raise SecAggError(f"{what} must be a list")
        return tuple(_check(v, inner, what) for v in value)
    elif hint == "dict[str, bytes]":
        ok = isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, bytes) for k, v in value.items())
    else:
        ok = type(value).__name__ == hint
    if not ok:
        raise SecAggError(f"{what} must be {hint}")
    return value


def _dec(node: Any, blob: memoryview) -> Any:
    if isinstance(node, dict) and set(node) == {"$b"}:
        ref = node["$b"]
        if not (isinstance(ref, list) and len(ref) == 2 and all(type(v) is int and v >= 0 for v in ref)):
            raise SecAggError("a byte field's reference is not [offset, length]")
        start, length = ref
        if start + length > len(blob):
            raise SecAggError("a byte field points outside the message")
        return bytes(blob[start:start + length])
    if isinstance(node, dict) and "$t" in node:
        cls = TYPES.get(node["$t"]) if isinstance(node["$t"], str) else None
        if cls is None:
            raise SecAggError(f"unknown message type {node['$t']!r}")
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        if set(node) - {"$t"} != set(fields):
            raise SecAggError(f"{cls.__name__} needs fields {sorted(fields)}, got {sorted(set(node) - {'$t'})}")
        return cls(**{k: _check(_dec(node[k], blob), str(t), f"{cls.__name__}.{k}") for k, t in fields.items()})
    if isinstance(node, list):
        return [_dec(v, blob) for v in node]
    if isinstance(node, dict):
        return {k: _dec(v, blob) for k, v in node.items()}
    return node


def from_bytes(data: bytes) -> Message:
    """The message `to_bytes` wrote; anything else is a SecAggError naming what is wrong."""
    if len(data) < _PREFIX.size:
        raise SecAggError("a secure-aggregation message is truncated")
    magic, version, hlen = _PREFIX.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise SecAggError("not a secure-aggregation message (bad magic or version)")
    start = _PREFIX.size + hlen
    if start > len(data):
        raise SecAggError("a secure-aggregation message is truncated")
    try:
        header = json.loads(data[_PREFIX.size:start])
    except ValueError as e:
        raise SecAggError(f"message header is not JSON: {e}") from None
    except RecursionError:
        raise SecAggError("message header is nested too deeply") from None
    if not (isinstance(header, dict) and "$t" in header):
        raise SecAggError("message header names no type")
    try:
        return _dec(header, memoryview(data)[start:])
    except RecursionError:
        raise SecAggError("message header is nested too deeply") from None
