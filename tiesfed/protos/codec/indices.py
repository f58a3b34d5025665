"""Index coding: sorted flat indices as a bitmap or as delta varints, Huffman-coded.

Encoders are chunked so memory stays bounded for huge tensors; decoders check
counts, order and range while inflating, before building the int64 index array.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from .deflate import _huff_compressobj, _inflate, _max_inflated
from .types import CodecError, _ctx

# Density thresholds between which both index codecs are tried.
_BITMAP_MIN_DENSITY = 0.03
_VARINT_MAX_DENSITY = 0.40

_BITMAP_CHUNK_BITS = 1 << 25  # mask bits materialised at a time
_VARINT_CHUNK = 1 << 22  # indices varint-encoded at a time


def _bitmap_encode(idx: np.ndarray, numel: int) -> bytes:
    """packbits(mask) deflated, materialising at most _BITMAP_CHUNK_BITS mask bits."""
    c = _huff_compressobj()
    parts = []
    step = _BITMAP_CHUNK_BITS  # multiple of 8
    if numel <= step:
        mask = np.zeros(numel, dtype=bool)
        mask[idx] = True
        parts.append(c.compress(np.packbits(mask)))
    else:
        bounds = np.searchsorted(idx, np.arange(0, numel + step, step, dtype=np.int64))
        for k, start in enumerate(range(0, numel, step)):
            m = min(step, numel - start)
            mask = np.zeros(m, dtype=bool)
            mask[idx[bounds[k] : bounds[k + 1]] - start] = True
            parts.append(c.compress(np.packbits(mask)))
    parts.append(c.flush())
    return b"".join(parts)


def _bitmap_decode(comp, numel: int, nnz: int, name: str | None) -> np.ndarray:
    nbytes = (numel + 7) // 8
    if nbytes > _max_inflated(len(comp)):
        raise CodecError(
            f"{_ctx(name)}index bitmap: {len(comp)} compressed bytes cannot hold {nbytes} bytes "
            "(exceeds the Huffman-only expansion bound)"
        )
    parts = []
    got = 0
    count = 0
    for chunk in _inflate(comp, nbytes, "index bitmap", name):
        pos = np.flatnonzero(np.unpackbits(np.frombuffer(chunk, dtype=np.uint8)))
        count += pos.size
        if count > nnz:
            raise CodecError(f"{_ctx(name)}index bitmap has more than nnz={nnz} set bits")
        if pos.size:
            parts.append(pos.astype(np.int64) + got * 8)
        got += len(chunk)
    if got != nbytes:
        raise CodecError(f"{_ctx(name)}index bitmap decompressed to {got} bytes, expected {nbytes}")
    if count != nnz:
        raise CodecError(f"{_ctx(name)}index bitmap has {count} set bits, expected nnz={nnz}")
    idx = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if idx.size and idx[-1] >= numel:
        raise CodecError(f"{_ctx(name)}index bitmap has padding bits set (index out of range)")
    return idx


def _varint_index_encode(idx: np.ndarray) -> bytes:
    """Gaps g0 = i0, gk = ik - i(k-1) - 1 as LEB128, deflated; chunked to bound memory."""
    c = _huff_compressobj()
    parts = []
    prev = -1
    step = _VARINT_CHUNK
    for start in range(0, idx.size, step):
        chunk = idx[start : start + step]
        gaps = np.empty(chunk.size, dtype=np.uint64)
        gaps[0] = chunk[0] - prev - 1
        np.subtract(chunk[1:], chunk[:-1], out=gaps[1:], casting="unsafe")
        gaps[1:] -= np.uint64(1)
        prev = int(chunk[-1])
        parts.append(c.compress(_varint_encode(gaps)))
    parts.append(c.flush())
    return b"".join(parts)


def _varint_encode(v: np.ndarray) -> np.ndarray:
    """Unsigned LEB128 of a uint64 array, vectorised (one pass per byte position)."""
    n = v.size
    if n == 0:
        return np.zeros(0, dtype=np.uint8)
    vmax = int(v.max())
    if vmax < 0x80:  # common case for dense-ish masks: one byte each
        return v.astype(np.uint8)
    nb = np.ones(n, dtype=np.uint8)
    for k in range(1, -(-vmax.bit_length() // 7)):
        nb += v >= np.uint64(1 << (7 * k))
    ends = np.cumsum(nb, dtype=np.int64)
    starts = ends - nb
    out = np.empty(int(ends[-1]), dtype=np.uint8)
    maxb = int(nb.max())
    low = (v & np.uint64(0x7F)).astype(np.uint8)
    low[nb > 1] |= 0x80
    out[starts] = low
    for k in range(1, maxb):
        sel = np.flatnonzero(nb > k)
        piece = ((v[sel] >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
        piece[nb[sel] > k + 1] |= 0x80
        out[starts[sel] + k] = piece
    return out


def _varint_max_len(numel: int) -> int:
    """Every gap is < numel, so it needs at most this many 7-bit groups."""
    return max(1, -(-max(numel - 1, 1).bit_length() // 7))


def _varint_decode(chunks: Iterator[bytes], nnz: int, numel: int, name: str | None) -> np.ndarray:
    """Decode LEB128 gaps arriving in chunks into strictly increasing indices < numel."""
    c = _ctx(name)
    max_len = _varint_max_len(numel)
    parts = []
    count = 0
    last = -1
    carry = np.zeros(0, dtype=np.uint8)
    for chunk in chunks:
        b = np.frombuffer(chunk, dtype=np.uint8)
        if carry.size:
            b = np.concatenate([carry, b])
        ends = np.flatnonzero(b < 0x80)
        if ends.size == 0:
            carry = b.copy()
        else:
            carry = b[ends[-1] + 1 :].copy()
            count += ends.size
            if count > nnz:
                raise CodecError(f"{c}index varints: more than nnz={nnz} values")
            starts = np.empty(ends.size, dtype=np.int64)
            starts[0] = 0
            starts[1:] = ends[:-1] + 1
            lens = ends - starts + 1
            longest = int(lens.max())
            if longest > max_len:
                raise CodecError(f"{c}index varints: a varint of {longest} bytes exceeds the index range")
            if longest > 1 and np.any(b[ends[lens > 1]] == 0):
                raise CodecError(f"{c}index varints: non-canonical varint (redundant zero byte)")
            v = (b[starts] & 0x7F).astype(np.int64)
            for k in range(1, longest):
                sel = np.flatnonzero(lens > k)
                v[sel] |= (b[starts[sel] + k] & 0x7F).astype(np.int64) << (7 * k)
            if int(v.max()) >= numel:
                raise CodecError(f"{c}index out of range (gap >= numel={numel})")
            v += 1
            idx = np.cumsum(v, out=v)
            idx += last
            # Each step is in [1, numel] and last < numel, so the first true value
            # >= numel is computed exactly (no int64 wrap before it): max suffices.
            if int(idx.max()) >= numel:
                raise CodecError(f"{c}index out of range (>= numel={numel})")
            last = int(idx[-1])
            parts.append(idx)
        if carry.size > max_len:
            raise CodecError(f"{c}index varints: a varint longer than {max_len} bytes exceeds the index range")
    if carry.size:
        raise CodecError(f"{c}index varints: trailing unterminated bytes")
    if count != nnz:
        raise CodecError(f"{c}index varints: found {count} values, expected nnz={nnz}")
    return np.concatenate(parts) if len(parts) != 1 else parts[0]
