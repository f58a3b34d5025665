"""Sparse tensor wire codec and self-delimiting stream format (format version 1).

This package is the contract shared by the client (which encodes its trimmed task
vector) and the coordinator (which decodes contributions and streams the merged
result back).  Everything is vectorised with numpy/torch: there is no Python
loop per element, only per tensor, per byte plane or per fixed-size chunk.

Modules: ``types`` (constants, errors, limits, :class:`SparseTensor`),
``deflate`` (Huffman-only zlib), ``indices`` and ``values`` (the two halves of
a payload), ``records`` (one tensor or one span of it), ``spans`` (a tensor's span records:
order, coverage, joining), ``stream`` (framing).  Import from the
package, not from the modules.

Binary layout (all integers little endian)
==========================================

Stream::

    stream  := stream_prefix header_json record* end_marker
    stream_prefix := b"TIESFED\\x00"  (8 bytes, magic)
                     u16 version   (= 1)
                     u32 header_len
    header_json   := header_len bytes, UTF-8 JSON object (free-form metadata)

Record (one tensor; also the unit produced by :func:`encode_tensor`)::

    record  := b"TREC" u32 meta_len u64 payload_len meta_json payload
    meta_json := meta_len bytes, UTF-8 JSON object with exactly these keys:
        "name":   str
        "shape":  [int, ...]          (non-negative; [] for a scalar)
        "numel":  int                 (== product of shape, 1 for [])
        "nnz":    int                 (number of stored entries, <= numel)
        "index":  {"codec": str, "bytes": int}
        "values": {"codec": str, "dtype": str, "bytes": int, "planes": [[str, int], ...]}
        "crc32":  int                 (zlib.crc32 of the whole payload)
      and optionally
        "span":   [start, count]      (the record covers flat elements [start, start + count)
                                       of its tensor: 0 <= start, 1 <= count, start + count <= numel,
                                       nnz <= count; its indices, and "full" and "bitmap", are
                                       relative to start and address count elements)
    payload := index_bytes (index.bytes) value_bytes (values.bytes)

A record without "span" holds its whole tensor. A tensor larger than what its
writer holds at once travels as span records: back to back in the stream, in
order, covering the tensor exactly once (decoders check this; see ``spans``).
Readers hand back indices of the whole tensor (relative index + start).
Streams without span records are byte for byte what format 1 always was; a
reader predating spans refuses a span record by its unknown meta key.
    payload_len == index.bytes + values.bytes

End marker::

    end_marker := b"TEND" u64 record_count  sha256[32]

where ``sha256`` is the digest of every stream byte before the ``TEND`` tag
(stream prefix, header and all records).

Index codecs (flat row-major indices, strictly increasing):

* ``"empty"``  -- nnz == 0, no bytes.
* ``"full"``   -- nnz == numel > 0 (indices are 0..numel-1), no bytes.
* ``"bitmap"`` -- ``np.packbits`` (MSB first) of the numel-long mask, padding
  bits zero, compressed with raw deflate (wbits=-15), strategy Z_HUFFMAN_ONLY.
* ``"varint"`` -- gaps ``g0 = i0``, ``gk = ik - i(k-1) - 1`` as unsigned LEB128
  varints (canonical: no redundant zero high byte), then raw deflate with
  Z_HUFFMAN_ONLY.

The encoder tries the plausible candidates (bitmap for density >= 3%, varint
for density <= 40%) and keeps the smallest.

Value codecs (dtype is one of ``float32``, ``float16``, ``bfloat16``):

* ``"raw"``    -- nnz little-endian values back to back; ``planes`` is ``[]``.
* ``"planes"`` -- the values split into byte planes, most significant byte
  first (all sign/exponent bytes, then the next, ...).  ``planes`` lists, per
  plane, ``["z", n]`` (raw deflate, Z_HUFFMAN_ONLY, n compressed bytes) or
  ``["raw", nnz]`` (the plane stored as is).  Every plane decodes to nnz bytes.

All deflate streams in the format are Huffman-only (no LZ77 matches), so a
conforming stream never decompresses to more than 8x its compressed size; the
decoder enforces that bound *before* inflating, in addition to inflating with
a ``max_length`` so a zip bomb cannot make it allocate more than declared.

Decoding validates everything (sizes against :class:`Limits` before any
allocation, structure, CRC, index order/range, value finiteness and
non-zeroness) and raises :class:`CodecError` naming the problem.
"""

from __future__ import annotations

from .indices import _varint_encode as _varint_encode
from .records import decode_tensor, encode_tensor, encoded_size_bits_per_param
from .spans import SpanCover, join_spans
from .stream import (
    End,
    Event,
    Header,
    Record,
    StreamReader,
    StreamWriter,
    index_stream,
    iter_records_at,
    read_record_at,
    read_stream,
)
from .types import DEFAULT_LIMITS, FORMAT_VERSION, MAGIC, CodecError, Limits, SparseTensor, record_prefix_size

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "CodecError",
    "Limits",
    "DEFAULT_LIMITS",
    "SparseTensor",
    "SpanCover",
    "join_spans",
    "encode_tensor",
    "decode_tensor",
    "StreamWriter",
    "StreamReader",
    "Header",
    "Record",
    "End",
    "Event",
    "read_stream",
    "index_stream",
    "read_record_at",
    "iter_records_at",
    "encoded_size_bits_per_param",
    "record_prefix_size",
]
