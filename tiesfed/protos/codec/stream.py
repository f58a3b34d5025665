"""Stream framing: header, records and a hashed end marker, written and read incrementally.

Readers hold at most one record in memory; :func:`index_stream` and
:func:`read_record_at` give random access to a seekable stream's tensors. A tensor
sent as span records (see `spans`) is one entry of the index (the byte range of its
records) and one tensor of `read_stream`, joined; `read_stream(spans=True)` yields
the records themselves.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Union

import torch

from .records import _check_prefix_sizes, _decode_body, _encode_parts, _parse_meta, _unpack_record_prefix
from .spans import SpanCover, join_spans
from .types import (
    _END_BODY,
    _REC_PREFIX,
    _STREAM_PREFIX,
    _TAG_LEN,
    DEFAULT_LIMITS,
    END_TAG,
    FORMAT_VERSION,
    MAGIC,
    REC_TAG,
    CodecError,
    Limits,
    SparseTensor,
    _ctx,
    _dump_json,
    _is_int,
    _strict_json,
)


@dataclass(frozen=True)
class Header:
    meta: dict


@dataclass(frozen=True)
class Record:
    tensor: SparseTensor
    offset: int  # relative to the start of the stream
    length: int


@dataclass(frozen=True)
class End:
    count: int
    sha256: str  # hex


Event = Union[Header, Record, End]


def _write_all(f: BinaryIO, data) -> None:
    mv = memoryview(data)
    while len(mv):
        n = f.write(mv)
        if n is None or n >= len(mv):
            return
        mv = mv[n:]


class StreamWriter:
    """Writes ``stream prefix + header``, then records, then the end marker."""

    def __init__(self, fileobj: BinaryIO, header: dict, *, limits: Limits = DEFAULT_LIMITS) -> None:
        if not isinstance(header, dict):
            raise ValueError("stream header must be a dict")
        hbytes = _dump_json(header)
        if len(hbytes) > limits.max_header_bytes:
            raise ValueError(f"stream header of {len(hbytes)} bytes exceeds limits.max_header_bytes")
        self._f = fileobj
        self._limits = limits
        self._sha = hashlib.sha256()
        self.bytes_written = 0
        self.count = 0
        self.closed = False
        self._emit(_STREAM_PREFIX.pack(MAGIC, FORMAT_VERSION, len(hbytes)))
        self._emit(hbytes)

    def _emit(self, data) -> None:
        _write_all(self._f, data)
        self._sha.update(data)
        self.bytes_written += len(data)

    def write(self, t: SparseTensor, value_dtype: torch.dtype | None = None) -> tuple[int, int]:
        """Encode and append one tensor; returns (offset, length) of its record."""
        if self.closed:
            raise ValueError("write on a closed StreamWriter")
        head, chunks = _encode_parts(t, value_dtype, self._limits)
        offset = self.bytes_written
        for part in (head, *chunks):
            if len(part):
                self._emit(part)
        self.count += 1
        return offset, self.bytes_written - offset

    def write_encoded(self, record: bytes | memoryview) -> tuple[int, int]:
        """Append an already encoded record (prefix and meta are validated, payload is not)."""
        if self.closed:
            raise ValueError("write on a closed StreamWriter")
        mv = memoryview(record)
        if len(mv) < _REC_PREFIX.size:
            raise CodecError("record: truncated prefix")
        meta_len, payload_len = _unpack_record_prefix(mv[: _REC_PREFIX.size], self._limits, "record")
        if len(mv) != _REC_PREFIX.size + meta_len + payload_len:
            raise CodecError("record: length does not match its prefix")
        _parse_meta(mv[_REC_PREFIX.size : _REC_PREFIX.size + meta_len], payload_len, self._limits)
        offset = self.bytes_written
        self._emit(mv)
        self.count += 1
        return offset, len(mv)

    def close(self) -> None:
        """Write the end marker (count + sha256). Does not close the file object."""
        if self.closed:
            return
        digest = self._sha.digest()
        end = END_TAG + _END_BODY.pack(self.count, digest)
        _write_all(self._f, end)
        self.bytes_written += len(end)
        self.closed = True

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    def __enter__(self) -> "StreamWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


# parser states
_S_PREFIX, _S_HEADER, _S_TAG, _S_REC_PREFIX, _S_BODY, _S_END, _S_DONE = range(7)


def _check_stream_prefix(prefix: bytes | memoryview, limits: Limits) -> int:
    """Validate the fixed stream prefix; returns the header length."""
    magic, version, hlen = _STREAM_PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise CodecError(f"stream: bad magic {bytes(magic)!r}")
    if version != FORMAT_VERSION:
        raise CodecError(f"stream: unsupported format version {version} (this codec reads {FORMAT_VERSION})")
    if hlen > limits.max_header_bytes:
        raise CodecError(f"stream: header_len={hlen} exceeds limits.max_header_bytes={limits.max_header_bytes}")
    return hlen


class StreamReader:
    """Incremental stream parser: feed bytes in arbitrary chunks, get events.

    Buffers at most the current incomplete unit (one record at most), validates
    record sizes against ``limits`` as soon as a record prefix is complete,
    verifies the end marker (count and sha256) and rejects bytes after it.
    After any CodecError the reader is unusable.
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._state = _S_PREFIX
        self._need = _STREAM_PREFIX.size
        self._buf = bytearray()
        self._sha = hashlib.sha256()
        self._pos = 0  # stream offset of the start of the current unit
        self._rec_start = 0
        self._meta_len = 0
        self._count = 0
        self._failed = False
        self.finished = False
        self.header: dict | None = None

    @property
    def bytes_consumed(self) -> int:
        return self._pos + len(self._buf)

    def wanted(self) -> int:
        """Bytes still needed to complete the current unit (0 when finished)."""
        if self.finished:
            return 0
        return max(self._need - len(self._buf), 0)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        if self._failed:
            raise CodecError("stream reader already failed")
        mv = memoryview(data)
        if mv.ndim != 1 or mv.itemsize != 1:
            mv = mv.cast("B")
        n = len(mv)
        if self.finished:
            if n:
                self._failed = True
                raise CodecError("stream: garbage after the end marker")
            return []
        events: list[Event] = []
        pos = 0
        try:
            while not self.finished:
                need = self._need - len(self._buf)
                if need > n - pos:
                    if pos < n:
                        self._buf += mv[pos:]
                        pos = n
                    break
                if self._buf:
                    self._buf += mv[pos : pos + need]
                    unit = memoryview(self._buf)
                    self._buf = bytearray()
                else:
                    unit = mv[pos : pos + need]
                pos += need
                ev = self._consume(unit)
                self._pos += len(unit)
                if ev is not None:
                    events.append(ev)
            if self.finished and pos < n:
                raise CodecError("stream: garbage after the end marker")
        except CodecError:
            self._failed = True
            raise
        return events

    def _consume(self, unit: memoryview) -> Event | None:
        st = self._state
        lim = self._limits
        if st == _S_PREFIX:
            hlen = _check_stream_prefix(unit, lim)
            self._sha.update(unit)
            self._state, self._need = _S_HEADER, hlen
            return None
        if st == _S_HEADER:
            header = _strict_json(unit, "stream header", None)
            if not isinstance(header, dict):
                raise CodecError("stream header: not a JSON object")
            self._sha.update(unit)
            self.header = header
            self._state, self._need = _S_TAG, _TAG_LEN
            return Header(header)
        if st == _S_TAG:
            tag = bytes(unit)
            if tag == REC_TAG:
                self._sha.update(unit)
                self._rec_start = self._pos
                self._state, self._need = _S_REC_PREFIX, _REC_PREFIX.size - _TAG_LEN
            elif tag == END_TAG:
                self._state, self._need = _S_END, _END_BODY.size
            else:
                raise CodecError(f"stream: bad tag {tag!r} at offset {self._pos} (expected TREC or TEND)")
            return None
        if st == _S_REC_PREFIX:
            meta_len, payload_len = struct.unpack("<IQ", unit)
            _check_prefix_sizes(meta_len, payload_len, lim, f"stream record at offset {self._rec_start}")
            self._sha.update(unit)
            self._meta_len = meta_len
            self._state, self._need = _S_BODY, meta_len + payload_len
            return None
        if st == _S_BODY:
            self._sha.update(unit)
            ml = self._meta_len
            t = _decode_body(unit[:ml], unit[ml:], lim)
            self._count += 1
            self._state, self._need = _S_TAG, _TAG_LEN
            return Record(t, self._rec_start, _REC_PREFIX.size + len(unit))
        if st == _S_END:
            count, digest = _END_BODY.unpack(unit)
            if count != self._count:
                raise CodecError(f"stream end marker: count={count} but {self._count} records were read")
            if digest != self._sha.digest():
                raise CodecError("stream end marker: sha256 mismatch")
            self._state, self._need = _S_DONE, 0
            self.finished = True
            return End(count, digest.hex())
        raise CodecError("stream: internal state error")  # pragma: no cover


def _read_into(fileobj: BinaryIO, reader: StreamReader) -> list[Event]:
    n = reader.wanted()
    data = fileobj.read(n)
    if not data:
        raise CodecError(
            f"stream: truncated at offset {reader.bytes_consumed} ({n} more bytes expected)"
        )
    return reader.feed(data)


def read_stream(
    fileobj: BinaryIO, limits: Limits = DEFAULT_LIMITS, *, spans: bool = False
) -> tuple[dict, Iterator[SparseTensor]]:
    """Read the header now; the iterator yields tensors one at a time.

    When exhausted the iterator has verified the end marker (count, sha256) and
    that nothing follows it; problems raise CodecError from the iterator. A tensor's
    span records are checked to cover it in order and are joined into one tensor,
    or, with `spans`, yielded as they are. Memory: one record at a time (a joined
    tensor: its records' indices and values).
    """
    reader = StreamReader(limits)
    while reader.header is None:
        _read_into(fileobj, reader)
    header = reader.header

    def tensors() -> Iterator[SparseTensor]:
        cover = SpanCover()
        parts: list[SparseTensor] = []
        while not reader.finished:
            for ev in _read_into(fileobj, reader):
                if isinstance(ev, Record):
                    done = cover.add(ev.tensor)
                    if spans:
                        yield ev.tensor
                        continue
                    parts.append(ev.tensor)
                    if done:
                        yield join_spans(parts)
                        parts = []
        cover.finish()
        if fileobj.read(1):
            raise CodecError("stream: garbage after the end marker")

    return header, tensors()


def _read_exact(fileobj: BinaryIO, n: int, what: str) -> bytes:
    parts = []
    left = n
    while left:
        b = fileobj.read(left)
        if not b:
            raise CodecError(f"stream: truncated while reading {what} ({n - left} of {n} bytes)")
        parts.append(b)
        left -= len(b)
    return b"".join(parts) if len(parts) != 1 else parts[0]


def index_stream(
    fileobj: BinaryIO, limits: Limits = DEFAULT_LIMITS, *, verify: bool = False
) -> tuple[dict, dict[str, tuple[int, int]]]:
    """Scan a seekable stream: header and ``{name: (offset, length)}``.

    Reads only prefixes and metas (metas are fully validated) and seeks past
    payloads.  Checks the end marker's record count and that nothing follows
    it.  Offsets are relative to the stream start (the file position on
    entry).  The sha256 and CRCs are only verified with ``verify=True``, which
    reads (but does not decode) every payload.  Duplicate names raise.  A tensor
    sent as span records gets the byte range of all its records (they are back
    to back, checked), which `read_record_at` reads as one tensor.
    """
    base = fileobj.tell()
    size = fileobj.seek(0, io.SEEK_END)
    fileobj.seek(base)
    sha = hashlib.sha256() if verify else None

    def upd(b):
        if sha is not None:
            sha.update(b)

    pre = _read_exact(fileobj, _STREAM_PREFIX.size, "stream prefix")
    hlen = _check_stream_prefix(pre, limits)
    hb = _read_exact(fileobj, hlen, "stream header")
    header = _strict_json(hb, "stream header", None)
    if not isinstance(header, dict):
        raise CodecError("stream header: not a JSON object")
    upd(pre)
    upd(hb)
    pos = _STREAM_PREFIX.size + hlen
    out: dict[str, tuple[int, int]] = {}
    cover = SpanCover()
    records = 0
    first = pos  # where the open tensor's records start
    while True:
        tag = _read_exact(fileobj, _TAG_LEN, "record tag")
        if tag == END_TAG:
            count, digest = _END_BODY.unpack(_read_exact(fileobj, _END_BODY.size, "end marker"))
            cover.finish()
            if count != records:
                raise CodecError(f"stream end marker: count={count} but {records} records were found")
            if sha is not None and digest != sha.digest():
                raise CodecError("stream end marker: sha256 mismatch")
            if fileobj.read(1):
                raise CodecError("stream: garbage after the end marker")
            return header, out
        if tag != REC_TAG:
            raise CodecError(f"stream: bad tag {tag!r} at offset {pos} (expected TREC or TEND)")
        rest = _read_exact(fileobj, _REC_PREFIX.size - _TAG_LEN, "record prefix")
        meta_len, payload_len = struct.unpack("<IQ", rest)
        where = f"stream record at offset {pos}"
        _check_prefix_sizes(meta_len, payload_len, limits, where)
        length = _REC_PREFIX.size + meta_len + payload_len
        if base + pos + length > size:
            raise CodecError(f"{where}: truncated (record of {length} bytes runs past end of file)")
        mb = _read_exact(fileobj, meta_len, "record meta")
        meta = _parse_meta(mb, payload_len, limits)
        name = meta["name"]
        if name in out:
            raise CodecError(f"{_ctx(name)}duplicate tensor name in stream")
        if cover.open is None:
            first = pos
        span = meta.get("span")
        done = cover.add_meta(name, meta["shape"], meta["numel"], *(span if span else (0, None)))
        if sha is not None:
            upd(tag)
            upd(rest)
            upd(mb)
            crc = 0
            left = payload_len
            while left:
                b = _read_exact(fileobj, min(left, 1 << 24), "record payload")
                sha.update(b)
                crc = zlib.crc32(b, crc)
                left -= len(b)
            if crc != meta["crc32"]:
                raise CodecError(f"{_ctx(name)}payload crc32 mismatch")
        else:
            fileobj.seek(payload_len, io.SEEK_CUR)
        records += 1
        pos += length
        if done:
            out[name] = (first, pos - first)


def iter_records_at(
    fileobj: BinaryIO, offset: int, length: int, limits: Limits = DEFAULT_LIMITS, *, base: int = 0
) -> Iterator[SparseTensor]:
    """The records in the byte range [offset, offset + length) one at a time, as they
    are (a whole tensor, or its span records in order, as `index_stream` gives the
    range): a reader that applies a tensor span by span holds one span, not the tensor.
    A range of several records must hold exactly one tensor's spans, in order."""
    if not _is_int(offset) or not _is_int(length) or offset < 0 or length < _REC_PREFIX.size:
        raise CodecError(f"read_record_at: bad offset/length ({offset!r}, {length!r})")
    fileobj.seek(base + offset)
    cover = SpanCover()
    pos, end, count = offset, offset + length, 0
    while pos < end:
        if end - pos < _REC_PREFIX.size:
            raise CodecError(f"record at offset {offset}: length {length} does not end where its records do "
                             f"({end - pos} bytes left)")
        fileobj.seek(base + pos)
        pre = _read_exact(fileobj, _REC_PREFIX.size, "record prefix")
        meta_len, payload_len = _unpack_record_prefix(pre, limits, f"record at offset {pos}")
        size = _REC_PREFIX.size + meta_len + payload_len
        if size > limits.max_record_bytes or pos + size > end:
            raise CodecError(f"record at offset {offset}: length {length} does not match its prefix ({size})")
        body = _read_exact(fileobj, meta_len + payload_len, "record body")
        mv = memoryview(body)
        t = _decode_body(mv[:meta_len], mv[meta_len:], limits)
        pos += size
        count += 1
        if pos == end and count == 1:
            yield t  # one record: whole, or one span as it is
            return
        if cover.add(t) and pos < end:
            raise CodecError(f"record at offset {offset}: length {length} runs past the last record of "
                             f"tensor {t.name!r}")
        if pos == end:
            cover.finish()
        yield t


def read_record_at(
    fileobj: BinaryIO, offset: int, length: int, limits: Limits = DEFAULT_LIMITS, *, base: int = 0
) -> SparseTensor:
    """Decode the record at stream offset ``offset`` (file position ``base + offset``).

    A range holding several records (a tensor's span records, as `index_stream`
    gives them) must hold one whole tensor's records, in order: they are joined."""
    parts = list(iter_records_at(fileobj, offset, length, limits, base=base))
    return parts[0] if len(parts) == 1 else join_spans(parts)
