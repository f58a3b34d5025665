"""The safetensors format itself: dtype tables, limits, header parsing, TensorInfo.

Kept apart from reading and writing so both sides share one definition of the
format and one error type, with no torch-heavy I/O code in between.

Safetensors layout (https://github.com/huggingface/safetensors): 8-byte
little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the data; offsets are relative to the end of the header and must tile the
data region without gaps.

bf16 (and fp8) have no numpy dtype: raw bytes always go through
``tensor.view(torch.uint8)`` and patches through a same-width integer view.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

__all__ = [
    "ModelError",
    "TensorInfo",
    "SINGLE_FILE",
    "INDEX_FILE",
    "DTYPE_TO_ST",
    "ST_TO_DTYPE",
    "FLOAT_DTYPES",
    "DEFAULT_SHARD_BYTES",
]


class ModelError(ValueError):
    """A model folder/file is unusable or two models do not fit together."""


SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors reference limit
_IO_CHUNK = 64 << 20
#: Largest output shard, as Hugging Face writes them.
DEFAULT_SHARD_BYTES = 5 * 2**30

ST_TO_DTYPE: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _st, _attr in (
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
):
    if hasattr(torch, _attr):
        ST_TO_DTYPE[_st] = getattr(torch, _attr)
DTYPE_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_TO_DTYPE.items()}

#: dtypes that take part in merging; everything else (ints, bool, fp8) is left at the base value.
FLOAT_DTYPES = frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16})

# Same-width integer views for byte-level patching (numpy has no bf16 / fp8).
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


@dataclass(frozen=True)
class TensorInfo:
    """What the header says about one tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def numel(self) -> int:
        return _numel(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def _read_header(file: Path) -> tuple[dict, dict, int]:
    """(tensor entries, __metadata__, absolute data start) of one safetensors file."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ModelError(f"{file}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise ModelError(f"{file}: not a safetensors file (header length {n}, file size {size})")
            header = json.loads(f.read(n))
    except OSError as e:
        raise ModelError(f"{file}: cannot read: {e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{file}: not a safetensors file (header is not JSON: {e})") from e
    if not isinstance(header, dict):
        raise ModelError(f"{file}: not a safetensors file (header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    start = 8 + n
    data_len = size - start
    for name, e in header.items():
        try:
            dt = e["dtype"]
            shape = tuple(int(s) for s in e["shape"])
            b, en = (int(x) for x in e["data_offsets"])
        except (KeyError, TypeError, ValueError) as ex:
            raise ModelError(f"{file}: tensor {name!r}: malformed header entry {e!r}") from ex
        if dt not in ST_TO_DTYPE:
            raise ModelError(f"{file}: tensor {name!r}: unsupported dtype {dt!r}")
        if any(s < 0 for s in shape):
            raise ModelError(f"{file}: tensor {name!r}: negative dimension in shape {shape}")
        want = _numel(shape) * _itemsize(ST_TO_DTYPE[dt])
        if en - b != want or b < 0 or en > data_len:
            raise ModelError(
                f"{file}: tensor {name!r}: data_offsets {[b, en]} do not fit shape {list(shape)} "
                f"{dt} ({want} bytes) in a data region of {data_len} bytes (truncated file?)"
            )
    return header, meta, start

