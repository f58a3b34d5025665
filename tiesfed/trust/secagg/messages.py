"""The secure round's messages: plain dataclasses, each serialisable to bytes and back.

Wire form: b"TSAG" u8 version, u32 header length, a canonical JSON header naming the
message type and its fields, then the byte fields back to back (the JSON refers to them by
offset and length, so a large masked vector is not base64-inflated). `from_bytes` checks
the framing, the type and every field's type: a malformed message is a SecAggError.
`from_file` reads a message from its file, checked the same way, leaving each large byte
field on disk as a `FileBlob` (a support bitmap is not copied into memory); `to_parts` lays
a message out as pieces (its header, then each field, a `FileBlob` one left as it is), which
`to_bytes` joins and the coordinator's outbox streams.

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
import os
import struct
from dataclasses import dataclass
from typing import Any, Callable, Union

from tiesfed.trust.secagg.blob import FileBlob, Part
from tiesfed.trust.secagg.keys import SecAggError

MAGIC, VERSION = b"TSAG", 2  # 2: KeyAdvert carries the seed commitment
_PREFIX = struct.Struct("<4sBI")
#: `from_file` leaves a byte field of at least this many bytes on disk (a `FileBlob`); smaller
#: ones (keys, boxes, shares) are read into `bytes`. A file this size or smaller is read whole.
FILE_FIELD_BYTES = 64 << 10
#: The largest header `from_file` parses (a message with a thousand clients' boxes needs ~50 KiB):
#: what a file-backed message costs in memory is bounded whatever its declared size.
FILE_HEADER_BYTES = 4 << 20


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


def _enc(value: Any, blobs: list[Part], offset: list[int]) -> Any:
    if isinstance(value, (bytes, FileBlob)):
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


def to_parts(msg: Message) -> list[Part]:
    """The message's bytes as pieces: framing and header, then each byte field in order (a
    `FileBlob` field stays one, unread). Joined, they are `to_bytes(msg)`."""
    blobs: list[Part] = []
    header = json.dumps(_enc(msg, blobs, [0]), sort_keys=True, separators=(",", ":")).encode()
    return [_PREFIX.pack(MAGIC, VERSION, len(header)) + header, *blobs]


def to_bytes(msg: Message) -> bytes:
    return b"".join(p if isinstance(p, bytes) else bytes(p) for p in to_parts(msg))


def _check(value: Any, hint: str, what: str) -> Any:
    """Check a decoded value against the few field types messages use, converting lists to tuples."""
    ok: bool
    if hint == "bytes":
        ok = isinstance(value, (bytes, FileBlob))
    elif hint in ("str", "int"):
        ok = type(value).__name__ == hint
    elif hint.startswith("tuple["):
        inner = hint[6:-6]  # tuple[X, ...]
        if not isinstance(value, list):
            raise SecAggError(f"{what} must be a list")
        return tuple(_check(v, inner, what) for v in value)
    elif hint == "dict[str, bytes]":
        ok = isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, (bytes, FileBlob))
                                             for k, v in value.items())
    else:
        ok = type(value).__name__ == hint
    if not ok:
        raise SecAggError(f"{what} must be {hint}")
    return value


def _dec(node: Any, blob: Any) -> Any:
    """A header node decoded; `blob` is the fields' bytes (a memoryview, or a `FileBlob` whose
    large fields stay on disk)."""
    if isinstance(node, dict) and set(node) == {"$b"}:
        ref = node["$b"]
        if not (isinstance(ref, list) and len(ref) == 2 and all(type(v) is int and v >= 0 for v in ref)):
            raise SecAggError("a byte field's reference is not [offset, length]")
        start, length = ref
        if start + length > len(blob):
            raise SecAggError("a byte field points outside the message")
        if isinstance(blob, FileBlob):
            return blob.slice(start, length) if length >= FILE_FIELD_BYTES else blob.read(start, length)
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
    return _parse(len(data), lambda a, b: data[a:b], lambda start: memoryview(data)[start:])


def from_file(path: Union[str, os.PathLike]) -> Message:
    """The message `to_bytes` wrote, from its file, checked as `from_bytes` checks it; byte
    fields of `FILE_FIELD_BYTES` or more stay in the file (`FileBlob`: it keeps its own
    descriptor, so the file may be renamed or unlinked afterwards). A small file is read whole."""
    return from_blob(FileBlob.open(path))


def from_blob(whole: FileBlob) -> Message:
    """`from_file` of a message that is the whole of a file-backed field (e.g. an answer received
    into a temporary file); one of at most `FILE_FIELD_BYTES` is read whole."""
    if whole.length <= FILE_FIELD_BYTES:
        return from_bytes(bytes(whole))
    return _parse(len(whole), lambda a, b: whole.read(a, b - a), lambda start: whole.slice(start, len(whole) - start),
                  FILE_HEADER_BYTES)


def _parse(size: int, read: Callable[[int, int], bytes], fields: Callable[[int], Any],
           max_header: int = -1) -> Message:
    """A message of `size` bytes: `read(a, b)` its bytes [a, b), `fields(start)` its fields' bytes;
    a header over `max_header` bytes (when ≥ 0) is refused before it is read."""
    if size < _PREFIX.size:
        raise SecAggError("a secure-aggregation message is truncated")
    magic, version, hlen = _PREFIX.unpack(read(0, _PREFIX.size))
    if magic != MAGIC or version != VERSION:
        raise SecAggError("not a secure-aggregation message (bad magic or version)")
    start = _PREFIX.size + hlen
    if start > size:
        raise SecAggError("a secure-aggregation message is truncated")
    if 0 <= max_header < hlen:
        raise SecAggError(f"a secure-aggregation message's header of {hlen} bytes is over {max_header}")
    try:
        header = json.loads(read(_PREFIX.size, start))
    except ValueError as e:
        raise SecAggError(f"message header is not JSON: {e}") from None
    except RecursionError:
        raise SecAggError("message header is nested too deeply") from None
    if not (isinstance(header, dict) and "$t" in header):
        raise SecAggError("message header names no type")
    try:
        return _dec(header, fields(start))
    except RecursionError:
        raise SecAggError("message header is nested too deeply") from None
