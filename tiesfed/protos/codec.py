"""Sparse tensor wire codec and self-delimiting stream format (format version 1).

This module is the contract shared by the client (which encodes its trimmed task
vector) and the coordinator (which decodes contributions and streams the merged
result back).  Everything is vectorised with numpy/torch: there is no Python
loop per element, only per tensor, per byte plane or per fixed-size chunk.

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
    payload := index_bytes (index.bytes) value_bytes (values.bytes)
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

import hashlib
import io
import json
import math
import os
import struct
import sys
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Union

import numpy as np
import torch

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "CodecError",
    "Limits",
    "DEFAULT_LIMITS",
    "SparseTensor",
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
    "encoded_size_bits_per_param",
    "record_prefix_size",
]

FORMAT_VERSION = 1
MAGIC = b"TIESFED\x00"
REC_TAG = b"TREC"
END_TAG = b"TEND"

_STREAM_PREFIX = struct.Struct("<8sHI")  # magic, version, header_len -> 14 bytes
_REC_PREFIX = struct.Struct("<4sIQ")  # tag, meta_len, payload_len -> 16 bytes
_END_BODY = struct.Struct("<Q32s")  # count, sha256 -> 40 bytes (after the 4-byte tag)
_TAG_LEN = 4

record_prefix_size = _REC_PREFIX.size

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in _DTYPES.items()}
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}

_META_KEYS = frozenset({"name", "shape", "numel", "nnz", "index", "values", "crc32"})
_INDEX_KEYS = frozenset({"codec", "bytes"})
_VALUE_KEYS = frozenset({"codec", "dtype", "bytes", "planes"})
_INDEX_CODECS = ("empty", "full", "bitmap", "varint")
_VALUE_CODECS = ("raw", "planes")

# Density thresholds between which both index codecs are tried.
_BITMAP_MIN_DENSITY = 0.03
_VARINT_MAX_DENSITY = 0.40

_CHUNK_OUT = 1 << 22  # inflate output chunk (bytes)
_CHUNK_IN = 1 << 22  # inflate input slice (bytes)
_BITMAP_CHUNK_BITS = 1 << 25  # mask bits materialised at a time
_VARINT_CHUNK = 1 << 22  # indices varint-encoded at a time
_LITTLE = sys.byteorder == "little"
_PLANE_SKIP_ENTROPY = 7.97  # bits/byte above which a plane is stored raw without trying
_PARALLEL_MIN_NNZ = 1 << 20  # compress candidates/planes in threads above this nnz
_POOL: tuple[int, ThreadPoolExecutor] | None = None
_POOL_LOCK = threading.Lock()


def _run_jobs(jobs, parallel: bool) -> list:
    """Run callables, in a small thread pool when worthwhile (zlib releases the GIL)."""
    global _POOL
    workers = min(4, os.cpu_count() or 1)
    if not parallel or len(jobs) < 2 or workers < 2:
        return [j() for j in jobs]
    with _POOL_LOCK:
        # (re)create after a fork: the parent's worker threads do not exist in the child
        if _POOL is None or _POOL[0] != os.getpid():
            _POOL = (os.getpid(), ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tiesfed-codec"))
        pool = _POOL[1]
    futs = [pool.submit(j) for j in jobs]
    return [f.result() for f in futs]


# --------------------------------------------------------------------------- #
# Errors, limits, data types
# --------------------------------------------------------------------------- #


class CodecError(ValueError):
    """Raised for every malformed or out-of-limits input seen while decoding."""


@dataclass(frozen=True)
class Limits:
    """Upper bounds the decoder checks *before* allocating anything.

    Defaults are sane for a 70B-parameter model (the largest single tensor of
    such a model is well below 2**36 elements).
    """

    max_numel: int = 1 << 36
    max_meta_bytes: int = 1 << 16
    max_payload_bytes: int = 1 << 34
    max_header_bytes: int = 1 << 24

    @property
    def max_record_bytes(self) -> int:
        return _REC_PREFIX.size + self.max_meta_bytes + self.max_payload_bytes


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True, eq=False)
class SparseTensor:
    """A sparse tensor: flat (row-major) indices into ``shape`` plus values.

    ``indices``: int64, 1-D, strictly increasing, all ``< numel``.
    ``values``: 1-D float32/float16/bfloat16 of the same length, finite and nonzero.
    The constructor only normalises ``shape`` to a tuple of ints; call
    :meth:`validate` (``encode_tensor`` does) for the full checks.
    """

    name: str
    shape: tuple[int, ...]
    indices: torch.Tensor
    values: torch.Tensor

    def __post_init__(self) -> None:
        try:
            shape = tuple(int(s) for s in self.shape)
        except TypeError as e:
            raise ValueError(f"tensor {self.name!r}: shape must be a sequence of ints") from e
        object.__setattr__(self, "shape", shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())

    def validate(self) -> None:
        """Raise ValueError naming the problem unless the invariants hold."""
        _validate_input(self)

    @classmethod
    def from_dense(cls, name: str, dense: torch.Tensor) -> "SparseTensor":
        """Keep the nonzero entries of ``dense`` (NaN/inf are rejected by encode)."""
        flat = dense.detach().reshape(-1)
        idx = torch.nonzero(flat, as_tuple=False).reshape(-1).to(torch.int64)
        return cls(name, tuple(dense.shape), idx, flat[idx].contiguous())

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        out = torch.zeros(self.numel, dtype=dtype or self.values.dtype)
        if self.nnz:
            out[self.indices] = self.values.to(out.dtype)
        return out.reshape(self.shape)


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


def encoded_size_bits_per_param(records_bytes: int, numel: int) -> float:
    """Bits per (dense) parameter: ``8 * records_bytes / numel``."""
    if numel <= 0:
        raise ValueError("numel must be positive")
    return 8.0 * records_bytes / numel


# --------------------------------------------------------------------------- #
# Small helpers
# --------------------------------------------------------------------------- #


def _ctx(name: str | None) -> str:
    return f"tensor {name!r}: " if name is not None else ""


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


def _strict_json(data, what: str, name: str | None):
    def no_dupes(pairs):
        d = {}
        for k, v in pairs:
            if k in d:
                raise CodecError(f"{_ctx(name)}{what}: duplicate key {k!r}")
            d[k] = v
        return d

    def bad_constant(c):
        raise CodecError(f"{_ctx(name)}{what}: non-standard JSON constant {c}")

    try:
        text = bytes(data).decode("utf-8")
        return json.loads(text, object_pairs_hook=no_dupes, parse_constant=bad_constant)
    except CodecError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CodecError(f"{_ctx(name)}{what}: not valid UTF-8 JSON ({e})") from None


def _dump_json(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def _is_int(v) -> bool:
    return type(v) is int


# --------------------------------------------------------------------------- #
# Index codecs
# --------------------------------------------------------------------------- #


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


# --------------------------------------------------------------------------- #
# Value codecs
# --------------------------------------------------------------------------- #


def _plane_col(k: int, isz: int) -> int:
    """Column of the byte-view holding plane k (0 = most significant byte)."""
    return isz - 1 - k if _LITTLE else k


def _plane_job(plane: np.ndarray):
    """Compress one byte plane unless Huffman coding cannot pay off."""
    n = plane.size

    def job() -> tuple[str, bytes]:
        if n >= 4096:
            # Huffman output >= empirical entropy: skip planes that are ~uniform.
            p = np.bincount(plane, minlength=256)
            p = p[p > 0] / n
            if -(p * np.log2(p)).sum() >= _PLANE_SKIP_ENTROPY:
                return "raw", plane.tobytes()
        z = _huff_compress(plane)
        if len(z) < n:
            return "z", z
        return "raw", plane.tobytes()

    return job


def _values_jobs(values: torch.Tensor, dname: str):
    """Returns (raw byte view (nnz, isz) or None, list of per-plane jobs)."""
    nnz = values.numel()
    isz = _ITEMSIZE[dname]
    if nnz == 0:
        return None, []
    raw = values.contiguous().view(torch.uint8).numpy().reshape(nnz, isz)
    jobs = [_plane_job(np.ascontiguousarray(raw[:, _plane_col(k, isz)])) for k in range(isz)]
    return raw, jobs


def _values_finish(raw, results, dname: str) -> tuple[dict, list[bytes]]:
    if raw is None:
        return {"codec": "raw", "dtype": dname, "bytes": 0, "planes": []}, []
    if all(mode == "raw" for mode, _ in results):
        data = raw.tobytes() if _LITTLE else raw[:, ::-1].tobytes()
        return {"codec": "raw", "dtype": dname, "bytes": len(data), "planes": []}, [data]
    planes_meta = [[mode, len(data)] for mode, data in results]
    chunks = [data for _, data in results]
    total = sum(len(c) for c in chunks)
    return {"codec": "planes", "dtype": dname, "bytes": total, "planes": planes_meta}, chunks


def _values_decode(data: memoryview, vm: dict, nnz: int, name: str | None) -> torch.Tensor:
    dname = vm["dtype"]
    isz = _ITEMSIZE[dname]
    dtype = _DTYPES[dname]
    if nnz == 0:
        return torch.zeros(0, dtype=dtype)
    if vm["codec"] == "raw":
        arr = np.frombuffer(data, dtype=np.uint8).copy()
        if not _LITTLE:
            arr = arr.reshape(nnz, isz)[:, ::-1].copy()
    else:
        out = np.empty((nnz, isz), dtype=np.uint8)
        pos = 0
        for k, (mode, n) in enumerate(vm["planes"]):
            seg = data[pos : pos + n]
            pos += n
            col = _plane_col(k, isz)
            if mode == "raw":
                out[:, col] = np.frombuffer(seg, dtype=np.uint8)
            else:
                got = 0
                for chunk in _inflate(seg, nnz, f"value plane {k}", name):
                    c = np.frombuffer(chunk, dtype=np.uint8)
                    out[got : got + c.size, col] = c
                    got += c.size
                if got != nnz:
                    raise CodecError(
                        f"{_ctx(name)}value plane {k} decompressed to {got} bytes, expected {nnz}"
                    )
        arr = out.reshape(-1)
    vals = torch.from_numpy(arr).view(dtype)
    if not bool(torch.isfinite(vals).all()):
        raise CodecError(f"{_ctx(name)}non-finite value in payload")
    if not bool((vals != 0).all()):
        raise CodecError(f"{_ctx(name)}zero value in payload (zeros must not be stored)")
    return vals


# --------------------------------------------------------------------------- #
# Encoding
# --------------------------------------------------------------------------- #


def _validate_input(t: SparseTensor) -> None:
    name = t.name
    if not isinstance(name, str):
        raise ValueError(f"tensor name must be a str, got {type(name).__name__}")
    c = _ctx(name)
    if any(s < 0 for s in t.shape):
        raise ValueError(f"{c}negative dimension in shape {t.shape}")
    idx, val = t.indices, t.values
    if not isinstance(idx, torch.Tensor) or not isinstance(val, torch.Tensor):
        raise ValueError(f"{c}indices and values must be torch tensors")
    if idx.dtype != torch.int64:
        raise ValueError(f"{c}indices must be int64, got {idx.dtype}")
    if idx.dim() != 1 or val.dim() != 1:
        raise ValueError(f"{c}indices and values must be 1-D")
    if val.dtype not in _DTYPE_NAMES:
        raise ValueError(f"{c}unsupported value dtype {val.dtype} (use float32, float16 or bfloat16)")
    if idx.numel() != val.numel():
        raise ValueError(f"{c}{idx.numel()} indices but {val.numel()} values")
    numel = t.numel
    n = idx.numel()
    if n > numel:
        raise ValueError(f"{c}nnz={n} exceeds numel={numel}")
    if n:
        ia = idx.detach().cpu().numpy()
        if ia[0] < 0:
            raise ValueError(f"{c}negative index {int(ia[0])}")
        if n > 1 and not bool(np.all(ia[1:] > ia[:-1])):
            raise ValueError(f"{c}indices must be strictly increasing (sorted, no repeats)")
        if ia[-1] >= numel:
            raise ValueError(f"{c}index {int(ia[-1])} out of range for numel={numel}")
        v = val.detach().cpu()
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{c}non-finite value")
        if not bool((v != 0).all()):
            raise ValueError(f"{c}zero value (store only nonzero entries)")


def _encode_parts(
    t: SparseTensor, value_dtype: torch.dtype | None, limits: Limits
) -> tuple[bytes, list]:
    _validate_input(t)
    name = t.name
    c = _ctx(name)
    numel = t.numel
    if numel > limits.max_numel:
        raise ValueError(f"{c}numel={numel} exceeds limits.max_numel={limits.max_numel}")
    idx_t = t.indices.detach().cpu()
    vals = t.values.detach().cpu()
    if value_dtype is not None and value_dtype != vals.dtype:
        if value_dtype not in _DTYPE_NAMES:
            raise ValueError(f"{c}unsupported value_dtype {value_dtype}")
        cast = vals.to(value_dtype)
        if not bool(torch.isfinite(cast).all()):
            raise ValueError(f"{c}casting values to {value_dtype} overflows to inf")
        keep = cast != 0
        if not bool(keep.all()):
            idx_t = idx_t[keep]
            cast = cast[keep]
        vals = cast
    dname = _DTYPE_NAMES[vals.dtype]
    idx = idx_t.contiguous().numpy()
    nnz = idx.size

    # ---- build the compression jobs (indices candidates + value planes)
    jobs = []
    icands = []
    if nnz == 0:
        icodec, ibytes = "empty", b""
    elif nnz == numel:
        icodec, ibytes = "full", b""
    else:
        density = nnz / numel
        if density <= _VARINT_MAX_DENSITY:
            icands.append("varint")
            jobs.append(lambda: _varint_index_encode(idx))
        if density >= _BITMAP_MIN_DENSITY:
            icands.append("bitmap")
            jobs.append(lambda: _bitmap_encode(idx, numel))
    raw, vjobs = _values_jobs(vals, dname)
    jobs.extend(vjobs)
    results = _run_jobs(jobs, parallel=nnz >= _PARALLEL_MIN_NNZ)
    if icands:
        icodec, ibytes = min(zip(icands, results[: len(icands)], strict=True), key=lambda cb: len(cb[1]))
    vmeta, vchunks = _values_finish(raw, results[len(icands) :], dname)

    payload_len = len(ibytes) + vmeta["bytes"]
    if payload_len > limits.max_payload_bytes:
        raise ValueError(f"{c}payload of {payload_len} bytes exceeds limits.max_payload_bytes")
    crc = zlib.crc32(ibytes)
    for ch in vchunks:
        crc = zlib.crc32(ch, crc)
    meta = {
        "name": name,
        "shape": list(t.shape),
        "numel": numel,
        "nnz": nnz,
        "index": {"codec": icodec, "bytes": len(ibytes)},
        "values": vmeta,
        "crc32": crc,
    }
    try:
        mbytes = _dump_json(meta)
    except UnicodeEncodeError as e:
        raise ValueError(f"tensor name {name!r} is not encodable as UTF-8") from e
    if len(mbytes) > limits.max_meta_bytes:
        raise ValueError(f"{c}record meta of {len(mbytes)} bytes exceeds limits.max_meta_bytes")
    prefix = _REC_PREFIX.pack(REC_TAG, len(mbytes), payload_len)
    return prefix + mbytes, [ibytes, *vchunks]


def encode_tensor(
    t: SparseTensor, value_dtype: torch.dtype | None = None, *, limits: Limits = DEFAULT_LIMITS
) -> bytes:
    """Encode one tensor as a complete, self-delimiting record.

    ``value_dtype``: ``None`` keeps ``t.values.dtype``; otherwise values are cast
    to it (float32/float16/bfloat16).  Entries whose value rounds to zero in the
    target dtype are DROPPED (together with their index), so a record never
    stores zeros and the decoded nnz can be smaller than ``t.nnz``.  A cast that
    overflows to +-inf raises ValueError.

    The input is validated (int64 1-D indices, strictly increasing, in range;
    1-D finite nonzero values; sizes within ``limits``): ValueError names the
    problem.
    """
    head, chunks = _encode_parts(t, value_dtype, limits)
    return b"".join([head, *chunks])


# --------------------------------------------------------------------------- #
# Decoding
# --------------------------------------------------------------------------- #


def _check_prefix_sizes(meta_len: int, payload_len: int, limits: Limits, where: str) -> None:
    if meta_len > limits.max_meta_bytes:
        raise CodecError(f"{where}: meta_len={meta_len} exceeds limits.max_meta_bytes={limits.max_meta_bytes}")
    if payload_len > limits.max_payload_bytes:
        raise CodecError(
            f"{where}: payload_len={payload_len} exceeds limits.max_payload_bytes={limits.max_payload_bytes}"
        )


def _parse_meta(mbytes, payload_len: int, limits: Limits) -> dict:
    """Parse and fully validate a record meta (no payload access)."""
    meta = _strict_json(mbytes, "record meta", None)
    if not isinstance(meta, dict):
        raise CodecError("record meta: not a JSON object")
    name = meta.get("name")
    if not isinstance(name, str):
        raise CodecError("record meta: missing or non-string 'name'")
    c = _ctx(name)
    keys = set(meta)
    if keys != _META_KEYS:
        missing = sorted(_META_KEYS - keys)
        extra = sorted(keys - _META_KEYS)
        raise CodecError(f"{c}record meta: missing keys {missing}, unknown keys {extra}")
    shape = meta["shape"]
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise CodecError(f"{c}record meta: 'shape' must be a list of non-negative ints")
    numel = meta["numel"]
    if not _is_int(numel) or numel < 0:
        raise CodecError(f"{c}record meta: 'numel' must be a non-negative int")
    if numel > limits.max_numel:
        raise CodecError(f"{c}numel={numel} exceeds limits.max_numel={limits.max_numel}")
    if 0 in shape:
        prod = 0
    else:
        prod = 1
        for s in shape:
            prod *= s
            if prod > numel:
                break
    if prod != numel:
        raise CodecError(f"{c}shape {shape} does not have numel={numel} elements")
    nnz = meta["nnz"]
    if not _is_int(nnz) or nnz < 0:
        raise CodecError(f"{c}record meta: 'nnz' must be a non-negative int")
    if nnz > numel:
        raise CodecError(f"{c}nnz={nnz} exceeds numel={numel}")
    crc = meta["crc32"]
    if not _is_int(crc) or not 0 <= crc < (1 << 32):
        raise CodecError(f"{c}record meta: 'crc32' must be an int in [0, 2**32)")

    im = meta["index"]
    if not isinstance(im, dict) or set(im) != _INDEX_KEYS:
        raise CodecError(f"{c}record meta: 'index' must be an object with keys {sorted(_INDEX_KEYS)}")
    icodec, ibytes = im["codec"], im["bytes"]
    if not isinstance(icodec, str) or icodec not in _INDEX_CODECS:
        raise CodecError(f"{c}unknown index codec {icodec!r}")
    if not _is_int(ibytes) or ibytes < 0:
        raise CodecError(f"{c}record meta: index 'bytes' must be a non-negative int")
    if icodec == "empty" and (nnz != 0 or ibytes != 0):
        raise CodecError(f"{c}index codec 'empty' requires nnz=0 and no bytes")
    if icodec == "full" and (nnz != numel or nnz == 0 or ibytes != 0):
        raise CodecError(f"{c}index codec 'full' requires 0 < nnz == numel and no bytes")
    if icodec in ("bitmap", "varint"):
        if nnz == 0 or ibytes == 0:
            raise CodecError(f"{c}index codec {icodec!r} requires nnz > 0 and a non-empty stream")
        if icodec == "bitmap" and (numel + 7) // 8 > _max_inflated(ibytes):
            raise CodecError(
                f"{c}index bitmap of {(numel + 7) // 8} bytes cannot come from {ibytes} compressed bytes"
            )

    vm = meta["values"]
    if not isinstance(vm, dict) or set(vm) != _VALUE_KEYS:
        raise CodecError(f"{c}record meta: 'values' must be an object with keys {sorted(_VALUE_KEYS)}")
    vcodec, dname, vbytes, planes = vm["codec"], vm["dtype"], vm["bytes"], vm["planes"]
    if not isinstance(dname, str) or dname not in _DTYPES:
        raise CodecError(f"{c}unknown value dtype {dname!r}")
    if not isinstance(vcodec, str) or vcodec not in _VALUE_CODECS:
        raise CodecError(f"{c}unknown value codec {vcodec!r}")
    if not _is_int(vbytes) or vbytes < 0:
        raise CodecError(f"{c}record meta: values 'bytes' must be a non-negative int")
    if not isinstance(planes, list):
        raise CodecError(f"{c}record meta: values 'planes' must be a list")
    isz = _ITEMSIZE[dname]
    if vcodec == "raw":
        if planes:
            raise CodecError(f"{c}value codec 'raw' must have no planes")
        if vbytes != nnz * isz:
            raise CodecError(f"{c}raw values: {vbytes} bytes declared, expected nnz*{isz}={nnz * isz}")
    else:
        if nnz == 0:
            raise CodecError(f"{c}value codec 'planes' requires nnz > 0")
        if len(planes) != isz:
            raise CodecError(f"{c}value planes: {len(planes)} planes for {dname}, expected {isz}")
        total = 0
        for k, p in enumerate(planes):
            if (
                not isinstance(p, list)
                or len(p) != 2
                or p[0] not in ("raw", "z")
                or not _is_int(p[1])
                or p[1] < 0
            ):
                raise CodecError(f"{c}value plane {k}: malformed entry {p!r} (want ['raw'|'z', int])")
            mode, n = p
            if mode == "raw" and n != nnz:
                raise CodecError(f"{c}value plane {k}: raw plane of {n} bytes, expected nnz={nnz}")
            if mode == "z" and (n == 0 or nnz > _max_inflated(n)):
                raise CodecError(
                    f"{c}value plane {k}: {n} compressed bytes cannot hold nnz={nnz} bytes"
                )
            total += n
        if total != vbytes:
            raise CodecError(f"{c}value planes sum to {total} bytes but values 'bytes'={vbytes}")
    if ibytes + vbytes != payload_len:
        raise CodecError(
            f"{c}declared lengths inconsistent: index {ibytes} + values {vbytes} != payload_len {payload_len}"
        )
    return meta


def _decode_body(mbytes, payload, limits: Limits) -> SparseTensor:
    payload = memoryview(payload)
    meta = _parse_meta(mbytes, len(payload), limits)
    name = meta["name"]
    c = _ctx(name)
    if zlib.crc32(payload) != meta["crc32"]:
        raise CodecError(f"{c}payload crc32 mismatch")
    numel, nnz = meta["numel"], meta["nnz"]
    im, vm = meta["index"], meta["values"]
    ib = im["bytes"]
    ipart, vpart = payload[:ib], payload[ib:]
    # values first: their size bound is the tighter one, so a forged record
    # fails before the (possibly larger) int64 index array is built
    vals = _values_decode(vpart, vm, nnz, name)
    icodec = im["codec"]
    if icodec == "empty":
        idx = np.zeros(0, dtype=np.int64)
    elif icodec == "full":
        idx = np.arange(numel, dtype=np.int64)
    elif icodec == "bitmap":
        idx = _bitmap_decode(ipart, numel, nnz, name)
    else:
        cap = min(nnz * _varint_max_len(numel), _max_inflated(ib))
        if nnz > cap:
            raise CodecError(f"{c}index varints: {ib} compressed bytes cannot hold nnz={nnz} varints")
        idx = _varint_decode(_inflate(ipart, cap, "index varints", name), nnz, numel, name)
    return SparseTensor(name, tuple(meta["shape"]), torch.from_numpy(idx), vals)


def _unpack_record_prefix(prefix, limits: Limits, where: str) -> tuple[int, int]:
    tag, meta_len, payload_len = _REC_PREFIX.unpack(prefix)
    if tag != REC_TAG:
        raise CodecError(f"{where}: bad record tag {bytes(tag)!r} (expected {REC_TAG!r})")
    _check_prefix_sizes(meta_len, payload_len, limits, where)
    return meta_len, payload_len


def decode_tensor(record: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> SparseTensor:
    """Decode one complete record (exactly; trailing bytes are an error).

    Values come back in the stored dtype, indices as int64.  Raises CodecError.
    """
    mv = memoryview(record)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    if len(mv) < _REC_PREFIX.size:
        raise CodecError(f"record: truncated prefix ({len(mv)} of {_REC_PREFIX.size} bytes)")
    meta_len, payload_len = _unpack_record_prefix(mv[: _REC_PREFIX.size], limits, "record")
    want = _REC_PREFIX.size + meta_len + payload_len
    if len(mv) < want:
        raise CodecError(f"record: truncated ({len(mv)} of {want} bytes)")
    if len(mv) > want:
        raise CodecError(f"record: {len(mv) - want} trailing bytes after the payload")
    m0 = _REC_PREFIX.size
    return _decode_body(mv[m0 : m0 + meta_len], mv[m0 + meta_len :], limits)


# --------------------------------------------------------------------------- #
# Streams
# --------------------------------------------------------------------------- #


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


def read_stream(fileobj: BinaryIO, limits: Limits = DEFAULT_LIMITS) -> tuple[dict, Iterator[SparseTensor]]:
    """Read the header now; the iterator yields tensors one at a time.

    When exhausted the iterator has verified the end marker (count, sha256) and
    that nothing follows it; problems raise CodecError from the iterator.
    Memory: one record at a time.
    """
    reader = StreamReader(limits)
    while reader.header is None:
        _read_into(fileobj, reader)
    header = reader.header

    def tensors() -> Iterator[SparseTensor]:
        while not reader.finished:
            for ev in _read_into(fileobj, reader):
                if isinstance(ev, Record):
                    yield ev.tensor
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
    reads (but does not decode) every payload.  Duplicate names raise.
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
    while True:
        tag = _read_exact(fileobj, _TAG_LEN, "record tag")
        if tag == END_TAG:
            count, digest = _END_BODY.unpack(_read_exact(fileobj, _END_BODY.size, "end marker"))
            if count != len(out):
                raise CodecError(f"stream end marker: count={count} but {len(out)} records were found")
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
        out[name] = (pos, length)
        pos += length


def read_record_at(
    fileobj: BinaryIO, offset: int, length: int, limits: Limits = DEFAULT_LIMITS, *, base: int = 0
) -> SparseTensor:
    """Decode the record at stream offset ``offset`` (file position ``base + offset``)."""
    if not _is_int(offset) or not _is_int(length) or offset < 0 or length < _REC_PREFIX.size:
        raise CodecError(f"read_record_at: bad offset/length ({offset!r}, {length!r})")
    if length > limits.max_record_bytes:
        raise CodecError(f"read_record_at: length={length} exceeds the limits")
    fileobj.seek(base + offset)
    pre = _read_exact(fileobj, _REC_PREFIX.size, "record prefix")
    meta_len, payload_len = _unpack_record_prefix(pre, limits, f"record at offset {offset}")
    if _REC_PREFIX.size + meta_len + payload_len != length:
        raise CodecError(
            f"record at offset {offset}: length {length} does not match its prefix "
            f"({_REC_PREFIX.size + meta_len + payload_len})"
        )
    body = _read_exact(fileobj, meta_len + payload_len, "record body")
    mv = memoryview(body)
    return _decode_body(mv[:meta_len], mv[meta_len:], limits)
