"""One tensor as one self-delimiting record: encode, parse and validate meta, decode.

Ties index and value coding together, chooses the smallest index codec, runs
the compression jobs (in threads for big tensors), and validates every
declared length against :class:`Limits` before anything is allocated.
"""

from __future__ import annotations

import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .deflate import _inflate, _max_inflated
from .indices import (
    _BITMAP_MIN_DENSITY,
    _VARINT_MAX_DENSITY,
    _bitmap_decode,
    _bitmap_encode,
    _varint_decode,
    _varint_index_encode,
    _varint_max_len,
)
from .types import (
    _DTYPE_NAMES,
    _DTYPES,
    _ITEMSIZE,
    _REC_PREFIX,
    DEFAULT_LIMITS,
    REC_TAG,
    CodecError,
    Limits,
    SparseTensor,
    _check_span,
    _ctx,
    _dump_json,
    _is_int,
    _strict_json,
    _validate_input,
)
from .values import _values_decode, _values_finish, _values_jobs

_META_KEYS = frozenset({"name", "shape", "numel", "nnz", "index", "values", "crc32"})
#: optional: [start, count], the record covers flat elements [start, start + count) of
#: its tensor and its indices are relative to start (absent: the whole tensor)
_SPAN_KEY = "span"
_INDEX_KEYS = frozenset({"codec", "bytes"})
_VALUE_KEYS = frozenset({"codec", "dtype", "bytes", "planes"})
_INDEX_CODECS = ("empty", "full", "bitmap", "varint")
_VALUE_CODECS = ("raw", "planes")

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


def encoded_size_bits_per_param(records_bytes: int, numel: int) -> float:
    """Bits per (dense) parameter: ``8 * records_bytes / numel``."""
    if numel <= 0:
        raise ValueError("numel must be positive")
    return 8.0 * records_bytes / numel


# --------------------------------------------------------------------------- #
# Encoding
# --------------------------------------------------------------------------- #


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
    domain = numel  # the elements the index codecs address: the span's, relative to its start
    if t.count is not None:
        domain = t.count
        if t.start:
            idx = idx - t.start

    # ---- build the compression jobs (indices candidates + value planes)
    jobs = []
    icands = []
    if nnz == 0:
        icodec, ibytes = "empty", b""
    elif nnz == domain:
        icodec, ibytes = "full", b""
    else:
        density = nnz / domain
        if density <= _VARINT_MAX_DENSITY:
            icands.append("varint")
            jobs.append(lambda: _varint_index_encode(idx))
        if density >= _BITMAP_MIN_DENSITY:
            icands.append("bitmap")
            jobs.append(lambda: _bitmap_encode(idx, domain))
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
    if t.count is not None:
        meta[_SPAN_KEY] = [t.start, t.count]
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
    keys = set(meta) - {_SPAN_KEY}
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
    span = meta.get(_SPAN_KEY)
    if _SPAN_KEY in meta:
        if not isinstance(span, list) or len(span) != 2:
            raise CodecError(f"{c}record meta: 'span' must be [start, count]")
        lo, hi = _check_span(span[0], span[1], numel, c, CodecError)
    else:
        lo, hi = 0, numel
    domain = hi - lo
    nnz = meta["nnz"]
    if not _is_int(nnz) or nnz < 0:
        raise CodecError(f"{c}record meta: 'nnz' must be a non-negative int")
    if nnz > domain:
        raise CodecError(f"{c}nnz={nnz} exceeds the {domain} elements the record covers")
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
    if icodec == "full" and (nnz != domain or nnz == 0 or ibytes != 0):
        raise CodecError(f"{c}index codec 'full' requires 0 < nnz == the elements covered, and no bytes")
    if icodec in ("bitmap", "varint"):
        if nnz == 0 or ibytes == 0:
            raise CodecError(f"{c}index codec {icodec!r} requires nnz > 0 and a non-empty stream")
        if icodec == "bitmap" and (domain + 7) // 8 > _max_inflated(ibytes):
            raise CodecError(
                f"{c}index bitmap of {(domain + 7) // 8} bytes cannot come from {ibytes} compressed bytes"
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
    nnz = meta["nnz"]
    span = meta.get(_SPAN_KEY)
    start, count = (0, None) if span is None else span
    numel = meta["numel"] if span is None else count  # the elements the indices address
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
    if start:
        if not idx.flags.writeable:
            idx = idx.copy()
        idx += start
    return SparseTensor(name, tuple(meta["shape"]), torch.from_numpy(idx), vals, start, count)


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
