"""Huffman-only raw deflate: the one compressor the format uses, and its bounded inflater.

Both index and value coding go through here, so the expansion bound (a
Huffman-only stream never inflates to more than 8x its size) lives in one place.
"""

from __future__ import annotations

import zlib
from typing import Iterator

from .types import CodecError, _ctx

_CHUNK_OUT = 1 << 22  # inflate output chunk (bytes)
_CHUNK_IN = 1 << 22  # inflate input slice (bytes)


def _huff_compressobj():
    # Level is irrelevant for Z_HUFFMAN_ONLY (as long as it is not 0 = stored).
    return zlib.compressobj(1, zlib.DEFLATED, -15, 9, zlib.Z_HUFFMAN_ONLY)


def _huff_compress(data) -> bytes:
    c = _huff_compressobj()
    return c.compress(data) + c.flush()


def _max_inflated(comp_len: int) -> int:
    """Upper bound of what a Huffman-only deflate stream of comp_len bytes yields."""
    return 8 * comp_len + 8


def _inflate(comp, max_out: int, what: str, name: str | None) -> Iterator[bytes]:
    """Inflate a raw-deflate stream in bounded chunks, never producing > max_out bytes.

    Raises CodecError on corrupt data, truncation, output beyond ``max_out`` or
    trailing bytes after the deflate stream.  The caller checks the exact total.
    """
    mv = memoryview(comp)
    n = len(mv)
    d = zlib.decompressobj(-15)
    pos = 0
    pending = b""
    produced = 0
    try:
        while not d.eof:
            if not pending:
                if pos >= n:
                    break
                pending = mv[pos : pos + _CHUNK_IN]
                pos += len(pending)
            room = max_out - produced
            out = d.decompress(pending, min(_CHUNK_OUT, room + 1))
            pending = d.unconsumed_tail
            if out:
                produced += len(out)
                if produced > max_out:
                    raise CodecError(
                        f"{_ctx(name)}{what}: decompresses to more than the expected {max_out} bytes"
                    )
                yield out
    except zlib.error as e:
        raise CodecError(f"{_ctx(name)}{what}: corrupt deflate data ({e})") from None
    if not d.eof:
        raise CodecError(f"{_ctx(name)}{what}: truncated deflate stream")
    if d.unused_data or pending or pos < n:
        raise CodecError(f"{_ctx(name)}{what}: trailing bytes after the deflate stream")
