"""Format constants, errors, limits and the :class:`SparseTensor` value type.

The bottom of the codec package: every other codec module builds on these
names, and this module imports none of them.  It also holds the small shared
helpers (error context, strict JSON) whose behaviour is part of the format.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

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
    """A sparse tensor, or a contiguous span of one: flat (row-major) indices into
    ``shape`` plus values.

    ``indices``: int64, 1-D, strictly increasing, all ``< numel``.
    ``values``: 1-D float32/float16/bfloat16 of the same length, finite and nonzero.
    ``count`` None: the whole tensor (``start`` is 0). Otherwise the record covers the
    flat elements [start, start + count) only, and every index lies in it; indices are
    always of the whole tensor (the wire stores them relative to ``start``), so folding
    a span is folding its indices. A tensor too large to hold at once travels as
    several span records, in order, that cover it exactly once.
    The constructor only normalises ``shape`` to a tuple of ints; call
    :meth:`validate` (``encode_tensor`` does) for the full checks.
    """

    name: str
    shape: tuple[int, ...]
    indices: torch.Tensor
    values: torch.Tensor
    start: int = 0
    count: Optional[int] = None

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
    def stop(self) -> int:
        """One past the last element this record covers."""
        return self.numel if self.count is None else self.start + self.count

    @property
    def is_span(self) -> bool:
        """Covers part of its tensor only (or says so: a span record)."""
        return self.count is not None

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


# --------------------------------------------------------------------------- #
# Small helpers
# --------------------------------------------------------------------------- #


def _ctx(name: str | None) -> str:
    return f"tensor {name!r}: " if name is not None else ""


def _is_int(v) -> bool:
    return type(v) is int


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
    lo, hi = _check_span(t.start, t.count, numel, c, ValueError)
    n = idx.numel()
    if n > hi - lo:
        raise ValueError(f"{c}nnz={n} exceeds the {hi - lo} elements it covers")
    if n:
        ia = idx.detach().cpu().numpy()
        if ia[0] < lo:
            raise ValueError(f"{c}negative index {int(ia[0])}" if ia[0] < 0 else f"{c}index {int(ia[0])} below the record's first element {lo}")
        if n > 1 and not bool(np.all(ia[1:] > ia[:-1])):
            raise ValueError(f"{c}indices must be strictly increasing (sorted, no repeats)")
        if ia[-1] >= hi:
            raise ValueError(f"{c}index {int(ia[-1])} out of range for elements [{lo}, {hi}) of numel={numel}")
        v = val.detach().cpu()
        va = (v.float() if v.dtype == torch.bfloat16 else v).numpy()  # numpy: ~40x torch's CPU isfinite
        if not bool(np.isfinite(va).all()):
            raise ValueError(f"{c}non-finite value")
        if not bool(np.all(va != 0)):
            raise ValueError(f"{c}zero value (store only nonzero entries)")


def _check_span(start, count, numel: int, c: str, error: type[Exception]) -> tuple[int, int]:
    """[lo, hi) of the elements a record covers; `error` names what is wrong with its span."""
    if count is None:
        if start != 0:
            raise error(f"{c}start={start!r} without a count: a whole-tensor record starts at 0")
        return 0, numel
    if not _is_int(start) or not _is_int(count):
        raise error(f"{c}span start and count must be ints, got {start!r} and {count!r}")
    if start < 0 or count < 1:
        raise error(f"{c}span [{start}, {start}+{count}): start must be >= 0 and count >= 1")
    if start + count > numel:
        raise error(f"{c}span [{start}, {start + count}) runs past the tensor's numel={numel}")
    return start, start + count
