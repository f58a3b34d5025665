"""Value coding: nonzero values split into byte planes, each Huffman-coded or stored raw.

Sign/exponent planes compress well, mantissa planes usually do not; planes
that cannot pay off are stored as is.  Decoding rejects non-finite and zero values.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from .deflate import _huff_compress, _inflate
from .types import _DTYPES, _ITEMSIZE, CodecError, _ctx

_LITTLE = sys.byteorder == "little"
_PLANE_SKIP_ENTROPY = 7.97  # bits/byte above which a plane is stored raw without trying


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
