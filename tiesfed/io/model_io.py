"""Model I/O: read and write Hugging Face style safetensors models a tensor at a time.

Nothing here ever holds a whole model. `ModelReader` parses only the headers at
open and hands out one tensor at a time (read straight from its byte range,
or memory-mapped through `safetensors.safe_open` on request); `fingerprint` hashes raw bytes in bounded chunks;
`ShardedWriter` knows the whole plan up front, so it writes every shard's
header first and then streams tensor bytes into place, memory = one tensor.

Safetensors layout (https://github.com/huggingface/safetensors): 8-byte
little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the data; offsets are relative to the end of the header and must tile the
data region without gaps.

bf16 (and fp8) have no numpy dtype: raw bytes always go through
``tensor.view(torch.uint8)`` and patches through a same-width integer view.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, TypeVar

import numpy as np
import torch
from safetensors import safe_open

__all__ = [
    "ModelError",
    "TensorInfo",
    "ModelReader",
    "check_compatible",
    "fingerprint",
    "ShardedWriter",
    "copy_side_files",
    "SINGLE_FILE",
    "INDEX_FILE",
    "shard_name",
    "DTYPE_TO_ST",
    "ST_TO_DTYPE",
    "FLOAT_DTYPES",
    "mergeable",
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


T = TypeVar("T")


def pack_shards(items: Sequence[T], max_bytes: int) -> list[list[T]]:
    """Greedy packing in order into groups of at most `max_bytes` (by `.nbytes`);
    an item bigger than that gets a group of its own."""
    groups: list[list[T]] = [[]]
    size = 0
    for item in items:
        if groups[-1] and size + item.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += item.nbytes
    return groups


def shard_name(i: int, n: int) -> str:
    """Hugging Face shard file name, 1-based: model-00001-of-00003.safetensors."""
    return f"model-{i:05d}-of-{n:05d}.safetensors"


# ----------------------------------------------------------------------------- reading

_pread_lock = threading.Lock()


def _pread_into(fd: int, buf: memoryview, offset: int) -> int:
    """Read into `buf` from absolute `offset` without moving a shared file position."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [buf], offset)
    with _pread_lock:  # no preadv (Windows): seek + readinto under a lock
        os.lseek(fd, offset, os.SEEK_SET)
        with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
            return f.readinto(buf)


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


class ModelReader:
    """Read-only view of one model, a tensor at a time.

    `path` may be: a folder with ``model.safetensors``; a folder with sharded
    files and ``model.safetensors.index.json``; a folder holding exactly one
    ``*.safetensors``; or a single ``.safetensors`` file. Only headers are read
    at open. Use as a context manager (or call `close`).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        p = self.path
        files: list[Path]
        weight_map: Optional[dict[str, str]] = None
        if p.is_file():
            if p.suffix != ".safetensors":
                raise ModelError(f"{p}: not a .safetensors file (only safetensors models are supported)")
            self.folder = p.parent
            files = [p]
        elif p.is_dir():
            self.folder = p
            if (p / SINGLE_FILE).is_file():
                files = [p / SINGLE_FILE]
            elif (p / INDEX_FILE).is_file():
                files, weight_map = self._read_index(p / INDEX_FILE)
            else:
                st = sorted(q.name for q in p.glob("*.safetensors") if q.is_file())
                if len(st) == 1:
                    files = [p / st[0]]
                else:
                    others = sorted(
                        q.name for q in p.iterdir()
                        if q.is_file() and q.suffix in {".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf"}
                    )
                    if st:
                        found = f"{len(st)} .safetensors files ({', '.join(st[:5])}{', ...' if len(st) > 5 else ''}) but no {INDEX_FILE}"
                    elif others:
                        found = f"no .safetensors file, only {', '.join(others[:5])} (convert the model to safetensors)"
                    else:
                        found = "no .safetensors file"
                    raise ModelError(f"{p}: not a model folder: found {found}")
        elif p.exists():
            raise ModelError(f"{p}: neither a file nor a folder")
        else:
            raise ModelError(f"{p}: no such file or folder")

        self._infos: dict[str, TensorInfo] = {}
        self._ranges: dict[str, tuple[int, int]] = {}  # absolute byte range in its file
        self.metadata: dict[str, str] = {}
        order: list[tuple[int, int, str]] = []
        for fi, f in enumerate(files):
            entries, meta, start = _read_header(f)
            if fi == 0:
                self.metadata = dict(meta)
            for name, e in entries.items():
                if weight_map is not None and weight_map.get(name) != f.name:
                    continue  # the index is authoritative (as for transformers)
                if name in self._infos:
                    raise ModelError(f"{p}: tensor {name!r} appears in both {self._infos[name].file.name} and {f.name}")
                b, en = (int(x) for x in e["data_offsets"])
                self._infos[name] = TensorInfo(name, tuple(int(s) for s in e["shape"]), ST_TO_DTYPE[e["dtype"]], f)
                self._ranges[name] = (start + b, start + en)
                order.append((fi, b, name))
        if weight_map is not None:
            missing = [n for n in weight_map if n not in self._infos]
            if missing:
                raise ModelError(
                    f"{p}: {INDEX_FILE} lists {len(missing)} tensor(s) absent from their shard, e.g. "
                    + ", ".join(f"{n!r} (in {weight_map[n]})" for n in missing[:5])
                )
        order.sort()
        self.names: list[str] = [n for _, _, n in order]
        self.files: list[Path] = files
        self.total_float_params: int = sum(i.numel for i in self._infos.values() if i.is_float)
        self.total_bytes: int = sum(i.nbytes for i in self._infos.values())
        self._handles: dict[Path, object] = {}
        self._fds: dict[Path, int] = {}

    @staticmethod
    def _read_index(index: Path) -> tuple[list[Path], dict[str, str]]:
        try:
            data = json.loads(index.read_text())
            wm = data["weight_map"]
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise TypeError("weight_map is not a {tensor: file} object")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelError(f"{index}: malformed index: {e!r}") from e
        folder = index.parent
        names = sorted(set(wm.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ModelError(f"{index}: shard file(s) missing: {', '.join(missing)}")
        return [folder / n for n in names], dict(wm)

    # -- queries
    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self.names)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise ModelError(f"tensor {name!r} not found in model {self.path}") from None

    def manifest(self) -> list[TensorInfo]:
        return [self._infos[n] for n in self.names]

    def byte_range(self, name: str) -> tuple[Path, int, int]:
        """(file, absolute start, absolute end) of the tensor's raw little-endian bytes."""
        i = self.info(name)
        b, e = self._ranges[name]
        return i.file, b, e

    def iter_raw(self, name: str, chunk_bytes: int = _IO_CHUNK) -> Iterator[memoryview]:
        """The tensor's raw bytes in chunks of at most `chunk_bytes` (one reused buffer:
        consume each chunk before asking for the next)."""
        file, b, e = self.byte_range(name)
        buf = bytearray(max(1, min(chunk_bytes, e - b)))
        mv = memoryview(buf)
        with open(file, "rb") as f:
            f.seek(b)
            left = e - b
            while left > 0:
                want = min(left, len(buf))
                got = f.readinto(mv[:want])
                if not got:
                    raise ModelError(f"tensor {name!r} in model {self.path}: file {file} ends early")
                left -= got
                yield mv[:got]

    def get(self, name: str, mmap: bool = False) -> torch.Tensor:
        """One CPU tensor; no other tensor is touched.

        Default: its bytes are read (pread) into a fresh tensor, so memory is
        exactly this tensor and is given back when the caller drops it.
        `mmap=True`: a zero-copy view through ``safe_open(framework="pt")``;
        the mapping stays alive while the reader is open, so over a pass the
        process's (file-backed, reclaimable) RSS grows to the model's size.
        """
        info = self.info(name)
        if mmap:
            return self._get_mmap(info)
        out = torch.empty(info.shape, dtype=info.dtype)
        if info.nbytes == 0:
            return out
        buf = memoryview(out.reshape(-1).view(torch.uint8).numpy()).cast("B")
        _, b, _ = self.byte_range(name)
        fd = self._fd(info.file)
        pos = 0
        try:
            while pos < info.nbytes:
                want = min(info.nbytes - pos, 1 << 30)
                got = _pread_into(fd, buf[pos : pos + want], b + pos)
                if got <= 0:
                    raise ModelError(f"tensor {name!r} in model {self.path}: file {info.file} ends early")
                pos += got
        except OSError as e:
            raise ModelError(f"tensor {name!r} in model {self.path}: cannot read {info.file}: {e}") from e
        return out

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            try:
                fd = os.open(file, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            except OSError as e:
                raise ModelError(f"{file}: cannot open: {e}") from e
            self._fds[file] = fd
        return fd

    def _get_mmap(self, info: TensorInfo) -> torch.Tensor:
        h = self._handles.get(info.file)
        if h is None:
            try:
                h = safe_open(str(info.file), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise ModelError(f"{info.file}: cannot open: {e}") from e
            self._handles[info.file] = h
        try:
            return h.get_tensor(info.name)
        except Exception as e:
            raise ModelError(f"tensor {info.name!r} in model {self.path}: cannot read: {e}") from e

    def close(self) -> None:
        for h in self._handles.values():
            ex = getattr(h, "__exit__", None)
            if ex is not None:
                try:
                    ex(None, None, None)
                except Exception:
                    pass
        self._handles.clear()
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> "ModelReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ModelReader({str(self.path)!r}, {len(self.names)} tensors, {len(self.files)} file(s))"


# ----------------------------------------------------------------------------- compatibility

_MAX_PROBLEMS = 20


def check_compatible(base: ModelReader, other: ModelReader, keep_base: Sequence[str] = ()) -> None:
    """Raise ModelError listing every way `other` does not fit `base`.

    Problems: a base tensor missing in `other`, a different shape, a tensor
    `other` has that base lacks, a float tensor that became non-float (or the
    reverse). fp32 vs bf16 is fine (task vectors are computed in fp32). A
    tensor whose name matches a glob in `keep_base` is exempt: the merge keeps
    it at the base value.
    """

    def kept(n: str) -> bool:
        return any(fnmatch.fnmatch(n, g) for g in keep_base)

    problems: list[str] = []
    for n in base.names:
        if kept(n):
            continue
        b = base.info(n)
        if n not in other:
            problems.append(f"{n!r}: missing")
            continue
        o = other.info(n)
        if o.shape != b.shape:
            problems.append(f"{n!r}: shape {list(o.shape)}, base has {list(b.shape)}")
        if o.is_float != b.is_float:
            problems.append(f"{n!r}: dtype {DTYPE_TO_ST[o.dtype]}, base has {DTYPE_TO_ST[b.dtype]}")
    for n in other.names:
        if n not in base and not kept(n):
            problems.append(f"{n!r}: not in the base model")
    if problems:
        more = len(problems) - _MAX_PROBLEMS
        lines = problems[:_MAX_PROBLEMS] + ([f"... and {more} more"] if more > 0 else [])
        raise ModelError(
            f"model {other.path} does not match base {base.path} ({len(problems)} problem(s)):\n  "
            + "\n  ".join(lines)
        )


# ----------------------------------------------------------------------------- fingerprint


def fingerprint(reader: ModelReader, chunk_bytes: int = _IO_CHUNK) -> str:
    """Content hash of a model, independent of sharding, file order and metadata.

    For every tensor in sorted-name order: one JSON line
    ``[name, safetensors dtype, shape, nbytes]`` then exactly nbytes of raw data.
    Streamed: memory is one `chunk_bytes` buffer.
    """
    h = hashlib.sha256()
    for n in sorted(reader.names):
        i = reader.info(n)
        h.update(json.dumps([n, DTYPE_TO_ST[i.dtype], list(i.shape), i.nbytes]).encode() + b"\n")
        for chunk in reader.iter_raw(n, chunk_bytes):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


# ----------------------------------------------------------------------------- writing


@dataclass
class _Slot:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    shard: int = 0
    offset: int = 0  # absolute, in its shard file
    written: bool = False


class ShardedWriter:
    """Streaming safetensors writer; memory = one tensor, never a whole shard.

    The plan ``[(name, shape, dtype), ...]`` is known up front: tensors are
    packed greedily in plan order into shards of at most `max_shard_bytes`
    (a bigger tensor gets a shard of its own); each shard file is created at
    its final size with its header, and tensor bytes are written into place.
    Within a shard the data is laid out by descending element size (stable in
    plan order), as safetensors' own serializer does, so every tensor is
    aligned to its element size.

    Files are written under hidden temporary names and renamed on `close`
    (shards first, the index last), so a crash never leaves a loadable half
    model. One shard -> ``model.safetensors``; several ->
    ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``.

    `overwrite`: if False (default) an out_dir already holding
    ``*.safetensors`` or the index is refused at construction; if True those
    files are removed at close, just before the new ones are renamed in.
    """

    def __init__(
        self,
        out_dir: str | Path,
        plan: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
        max_shard_bytes: int = 5 * 2**30,
        metadata: Optional[dict[str, str]] = None,
        overwrite: bool = False,
    ):
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.out_dir = Path(out_dir)
        self.overwrite = overwrite
        meta = {"format": "pt"}
        for k, v in (metadata or {}).items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ModelError(f"safetensors metadata must map str to str, got {k!r}: {v!r}")
            meta[k] = v
        self.metadata = meta

        self._slots: list[_Slot] = []
        self._by_name: dict[str, _Slot] = {}
        for name, shape, dtype in plan:
            if name in self._by_name:
                raise ModelError(f"tensor {name!r} appears twice in the write plan for {self.out_dir}")
            if dtype not in DTYPE_TO_ST:
                raise ModelError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
            shape = tuple(int(s) for s in shape)
            s = _Slot(name, shape, dtype, _numel(shape) * _itemsize(dtype))
            self._slots.append(s)
            self._by_name[name] = s

        shards = pack_shards(self._slots, max_shard_bytes)
        n = len(shards)
        self.shard_names = [SINGLE_FILE] if n == 1 else [shard_name(i + 1, n) for i in range(n)]

        self.out_dir.mkdir(parents=True, exist_ok=True)
        if not overwrite:
            clash = sorted(p.name for p in self._existing_outputs())
            if clash:
                raise ModelError(
                    f"{self.out_dir} already holds model files ({', '.join(clash[:5])}); "
                    "choose an empty folder or pass overwrite=True"
                )
        tag = f"{os.getpid()}-{id(self):x}"
        self._tmp = [self.out_dir / f".{fn}.tmp-{tag}" for fn in self.shard_names]
        self._files: list = []
        self._next = 0
        self._closed = False
        try:
            for si, (members, tmp) in enumerate(zip(shards, self._tmp)):
                layout = sorted(members, key=lambda s: -_itemsize(s.dtype))  # stable
                header: dict = {"__metadata__": meta}
                off = 0
                for s in layout:
                    s.shard = si
                    header[s.name] = {
                        "dtype": DTYPE_TO_ST[s.dtype],
                        "shape": list(s.shape),
                        "data_offsets": [off, off + s.nbytes],
                    }
                    s.offset = off
                    off += s.nbytes
                hb = json.dumps(header, separators=(",", ":")).encode()
                hb += b" " * (-(8 + len(hb)) % 8)  # data starts 8-byte aligned
                start = 8 + len(hb)
                for s in layout:
                    s.offset += start
                f = open(tmp, "w+b")
                self._files.append(f)
                f.write(struct.pack("<Q", len(hb)))
                f.write(hb)
                f.truncate(start + off)  # final size; data filled in as it comes
        except BaseException:
            self.abort()
            raise

    def _existing_outputs(self) -> list[Path]:
        return [
            p for p in self.out_dir.iterdir()
            if p.is_file() and (p.name.endswith(".safetensors") or p.name == INDEX_FILE)
        ]

    @property
    def plan_names(self) -> list[str]:
        return [s.name for s in self._slots]

    def _check_open(self) -> None:
        if self._closed:
            raise ModelError(f"writer for {self.out_dir} is closed")

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next planned tensor (plan order, exact shape and dtype)."""
        self._check_open()
        if self._next >= len(self._slots):
            raise ModelError(f"tensor {name!r}: every planned tensor of {self.out_dir} is already written")
        s = self._slots[self._next]
        if name != s.name:
            why = "is not in the plan" if name not in self._by_name else "is out of plan order"
            raise ModelError(f"tensor {name!r} {why} for {self.out_dir}: expected {s.name!r} next")
        if tuple(tensor.shape) != s.shape:
            raise ModelError(f"tensor {name!r} for {self.out_dir}: shape {list(tensor.shape)}, planned {list(s.shape)}")
        if tensor.dtype != s.dtype:
            raise ModelError(f"tensor {name!r} for {self.out_dir}: dtype {tensor.dtype}, planned {s.dtype}")
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()  # the one extra copy
        t = t.contiguous()  # a no-op if it already was (and it is, after .cpu())
        f = self._files[s.shard]
        if s.nbytes:
            raw = t.reshape(-1).view(torch.uint8).numpy()
            mv = memoryview(raw).cast("B")
            f.seek(s.offset)
            for i in range(0, s.nbytes, _IO_CHUNK):
                f.write(mv[i : i + _IO_CHUNK])
        s.written = True
        self._next += 1

    def patch(self, name: str, flat_indices: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite elements (by flat index) of an already written tensor in place.

        `values` are cast to the tensor's dtype; one value broadcasts to all indices.
        """
        self._check_open()
        s = self._by_name.get(name)
        if s is None:
            raise ModelError(f"tensor {name!r} is not in the plan for {self.out_dir}")
        if not s.written:
            raise ModelError(f"tensor {name!r} for {self.out_dir}: patch before write")
        idx = flat_indices.detach().reshape(-1).to("cpu", torch.int64)
        if idx.numel() == 0:
            return
        n = _numel(s.shape)
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= n:
            raise ModelError(f"tensor {name!r} for {self.out_dir}: patch index out of range [0, {n}): {lo}..{hi}")
        vals = values.detach().reshape(-1).to("cpu").to(s.dtype)
        if vals.numel() == 1 and idx.numel() != 1:
            vals = vals.expand(idx.numel())
        if vals.numel() != idx.numel():
            raise ModelError(
                f"tensor {name!r} for {self.out_dir}: patch has {idx.numel()} indices but {vals.numel()} values"
            )
        isz = _itemsize(s.dtype)
        iv = _INT_VIEW[isz]
        raw = vals.contiguous().view(iv).numpy()
        f = self._files[s.shard]
        f.flush()
        # map only the pages the patched range touches
        start = s.offset + lo * isz
        mm = np.memmap(f, dtype=raw.dtype, mode="r+", offset=start, shape=(hi - lo + 1,))
        try:
            mm[(idx - lo).numpy()] = raw
            mm.flush()
        finally:
            del mm

    def abort(self) -> None:
        """Close and delete the temporary files; the out_dir is left as it was."""
        for f in self._files:
            try:
                f.close()
            except Exception:
                pass
        self._files = []
        for t in self._tmp if hasattr(self, "_tmp") else []:
            try:
                t.unlink()
            except FileNotFoundError:
                pass
        self._closed = True

    def close(self) -> list[Path]:
        """Finish: rename shards into place, then write the index. Returns the shard
        paths in order, followed by the index path when there is one."""
        self._check_open()
        missing = [s.name for s in self._slots if not s.written]
        if missing:
            raise ModelError(
                f"writer for {self.out_dir}: {len(missing)} planned tensor(s) never written, e.g. "
                + ", ".join(repr(m) for m in missing[:5])
            )
        for f in self._files:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        self._files = []
        if self.overwrite:
            for p in self._existing_outputs():
                if p not in self._tmp:
                    p.unlink()
        out = []
        for tmp, fn in zip(self._tmp, self.shard_names):
            dst = self.out_dir / fn
            os.replace(tmp, dst)
            out.append(dst)
        if len(self.shard_names) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self._slots)},
                "weight_map": {s.name: self.shard_names[s.shard] for s in self._slots},
            }
            dst = self.out_dir / INDEX_FILE
            tmp = self.out_dir / f".{INDEX_FILE}.tmp-{os.getpid()}-{id(self):x}"
            tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, dst)
            out.append(dst)
        self._closed = True
        return out

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._closed:
            return
        if exc_type is not None:
            self.abort()
            return
        try:
            self.close()
        except BaseException:
            self.abort()
            raise


# ----------------------------------------------------------------------------- side files

WEIGHT_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".ot",
)


def _is_weight_file(name: str) -> bool:
    low = name.lower()
    if low.endswith(WEIGHT_SUFFIXES):
        return True
    if low.endswith(".index.json"):  # model.safetensors.index.json, pytorch_model.bin.index.json, ...
        return low[: -len(".index.json")].endswith(WEIGHT_SUFFIXES)
    return False


def copy_side_files(src_folder: str | Path, out_dir: str | Path) -> list[str]:
    """Copy every regular top-level file of `src_folder` except weights and their
    index files (config, generation config, tokenizer files, README, ...).
    Symlinks (as in the Hugging Face cache) are followed. Returns sorted names copied."""
    src, dst = Path(src_folder), Path(out_dir)
    if not src.is_dir():
        raise ModelError(f"{src}: not a folder")
    dst.mkdir(parents=True, exist_ok=True)
    if src.resolve() == dst.resolve():
        return []
    copied = []
    for p in sorted(src.iterdir()):
        if not p.is_file() or _is_weight_file(p.name):
            continue
        shutil.copyfile(p, dst / p.name)
        copied.append(p.name)
    return copied


def mergeable(infos: Sequence[TensorInfo], keep_base: Sequence[str] = ()) -> list[TensorInfo]:
    """The tensors a merge touches: float tensors not pinned to the base by a glob."""
    return [t for t in infos if t.is_float and not any(fnmatch.fnmatch(t.name, g) for g in keep_base)]
