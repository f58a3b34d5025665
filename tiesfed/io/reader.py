"""Read Hugging Face style safetensors models a tensor at a time, and judge them.

Nothing here ever holds a whole model. `ModelReader` parses only the headers at
open and hands out one tensor at a time (read straight from its byte range,
or memory-mapped through `safetensors.safe_open` on request; a PyTorch
checkpoint's tensors are memory-mapped by `torch_bin`); `fingerprint` hashes
raw bytes in bounded chunks. Whether two models fit together is `compat`'s job.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors import safe_open

from tiesfed.io.safetensors_format import (
    _IO_CHUNK,
    DTYPE_TO_ST,
    INDEX_FILE,
    SINGLE_FILE,
    ST_TO_DTYPE,
    ModelError,
    TensorInfo,
    _read_header,
)
from tiesfed.io.torch_bin import BIN_FILE, BIN_INDEX_FILE, load_bin, read_bin_index

__all__ = ["ModelReader", "fingerprint"]

_pread_lock = threading.Lock()


def _pread_into(fd: int, buf: memoryview, offset: int) -> int:
    """Read into `buf` from absolute `offset` without moving a shared file position."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [buf], offset)
    with _pread_lock:  # no preadv (Windows): seek + readinto under a lock
        os.lseek(fd, offset, os.SEEK_SET)
        with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
            return f.readinto(buf)



class ModelReader:
    """Read-only view of one model, a tensor at a time.

    `path` may be: a folder with ``model.safetensors``; a folder with sharded
    files and ``model.safetensors.index.json``; a folder holding exactly one
    ``*.safetensors``; or a single ``.safetensors`` file. Only headers are read
    at open. Without safetensors, a PyTorch checkpoint: ``pytorch_model.bin``,
    sharded with ``pytorch_model.bin.index.json``, or a single ``.bin`` file,
    memory-mapped and weights-only (`torch_bin`). Use as a context manager (or call `close`).
    """

    def __new__(cls, path: str | Path | None = None, *args, **kwargs) -> "ModelReader":
        if cls is ModelReader and path is not None:  # a peft adapter folder reads as its model (tiesfed.io.lora)
            from tiesfed.io.lora import LoraReader, is_adapter

            if is_adapter(path):
                return super().__new__(LoraReader)
        return super().__new__(cls)

    def __init__(self, path: str | Path):
        self.path = Path(path)
        p = self.path
        files: list[Path] = []
        bins: list[Path] = []
        weight_map: Optional[dict[str, str]] = None
        if p.is_file():
            if p.suffix == ".bin":
                bins = [p]
            elif p.suffix != ".safetensors":
                raise ModelError(f"{p}: not a .safetensors or PyTorch .bin file")
            self.folder = p.parent
            files = [p]
        elif p.is_dir():
            self.folder = p
            if (p / SINGLE_FILE).is_file():
                files = [p / SINGLE_FILE]
            elif (p / INDEX_FILE).is_file():
                files, weight_map = self._read_index(p / INDEX_FILE)
            elif (p / BIN_FILE).is_file():
                files = bins = [p / BIN_FILE]
            elif (p / BIN_INDEX_FILE).is_file():
                weight_map = read_bin_index(p / BIN_INDEX_FILE)
                files = bins = [p / n for n in sorted(set(weight_map.values()))]
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
                        found = (f"no .safetensors file or {BIN_FILE}, only {', '.join(others[:5])} (convert the "
                                 "model to safetensors)")
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
        #: a PyTorch checkpoint's tensors, memory-mapped (None for safetensors)
        self._bin: Optional[dict[str, torch.Tensor]] = None
        order: list[tuple[int, int, str]] = []
        if bins:
            self._bin = {}
            for fi, f in enumerate(bins):
                for pos, (name, t) in enumerate(load_bin(f).items()):
                    if weight_map is not None and weight_map.get(name) != f.name:
                        continue
                    if name in self._infos:
                        raise ModelError(f"{p}: tensor {name!r} appears in both {self._infos[name].file.name} and "
                                         f"{f.name}")
                    self._bin[name] = t
                    self._infos[name] = TensorInfo(name, tuple(t.shape), t.dtype, f)
                    order.append((fi, pos, name))
        for fi, f in enumerate(files if not bins else []):
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
                    f"{p}: {BIN_INDEX_FILE if bins else INDEX_FILE} lists {len(missing)} tensor(s) absent from their shard, e.g. "
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

    def alias(self, name: str, target: str) -> None:
        """Make `name` read as `target` (a tied tensor the checkpoint stores once)."""
        t = self.info(target)
        self._infos[name] = TensorInfo(name, t.shape, t.dtype, t.file)
        if target in self._ranges:
            self._ranges[name] = self._ranges[target]
        if self._bin is not None:
            self._bin[name] = self._bin[target]
        if name not in self.names:
            self.names.append(name)

    def hide(self, name: str) -> None:
        """Leave out `name` (a tied duplicate the checkpoint stores twice)."""
        info = self._infos.pop(name)
        self._ranges.pop(name, None)
        if self._bin is not None:
            self._bin.pop(name, None)
        self.names.remove(name)
        self.total_float_params -= info.numel if info.is_float else 0
        self.total_bytes -= info.nbytes

    def keep_rows(self, name: str, rows: int) -> None:
        """Make `name` read as its first `rows` rows: a flat prefix of its bytes (a resized
        vocabulary read at the base's rows, `tiesfed.io.vocab_rows`); nothing else is read."""
        info = self.info(name)
        if not info.shape or not 0 < rows <= info.shape[0]:
            raise ModelError(f"tensor {name!r} in model {self.path}: cannot keep {rows} of shape {list(info.shape)}")
        cut = TensorInfo(name, (rows, *info.shape[1:]), info.dtype, info.file)
        self._infos[name] = cut
        if name in self._ranges:
            b, _ = self._ranges[name]
            self._ranges[name] = (b, b + cut.nbytes)
        if self._bin is not None:
            self._bin[name] = self._bin[name][:rows]
        self.total_float_params -= (info.numel - cut.numel) if info.is_float else 0
        self.total_bytes -= info.nbytes - cut.nbytes

    def byte_range(self, name: str) -> tuple[Path, int, int]:
        """(file, absolute start, absolute end) of the tensor's raw little-endian bytes (safetensors only)."""
        i = self.info(name)
        if name not in self._ranges:
            raise ModelError(f"tensor {name!r} in model {self.path}: a PyTorch checkpoint has no raw byte range")
        b, e = self._ranges[name]
        return i.file, b, e

    def iter_raw(self, name: str, chunk_bytes: int = _IO_CHUNK) -> Iterator[memoryview]:
        """The tensor's raw bytes in chunks of at most `chunk_bytes` (one reused buffer:
        consume each chunk before asking for the next)."""
        if self._bin is not None:
            raw = memoryview(self._bin_tensor(name).reshape(-1).view(torch.uint8).numpy()).cast("B")
            for at in range(0, len(raw), max(1, chunk_bytes)):
                yield raw[at : at + chunk_bytes]
            return
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
        if self._bin is not None:
            t = self._bin_tensor(name)
            return t if mmap else t.clone()
        if mmap:
            return self._get_mmap(info)
        out = torch.empty(info.shape, dtype=info.dtype)
        _, b, _ = self.byte_range(name)
        self._read_into(info, out.reshape(-1), b)
        return out

    def get_range(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """Elements [lo, hi) of the flattened tensor, read straight from their byte
        range: a block of a tensor too large to hold whole."""
        info = self.info(name)
        if not 0 <= lo <= hi <= info.numel:
            raise ModelError(f"tensor {name!r} in model {self.path}: range [{lo}, {hi}) outside [0, {info.numel})")
        if self._bin is not None:
            return self._bin_tensor(name).reshape(-1)[lo:hi].clone()
        out = torch.empty(hi - lo, dtype=info.dtype)
        _, b, _ = self.byte_range(name)
        self._read_into(info, out, b + lo * out.element_size())
        return out

    def _bin_tensor(self, name: str) -> torch.Tensor:
        """A checkpoint's tensor, contiguous (a strided view is copied), still memory-mapped."""
        assert self._bin is not None
        try:
            return self._bin[name].contiguous()
        except RuntimeError as e:  # a mapped page that cannot be read: the file changed or was cut
            raise ModelError(f"tensor {name!r} in model {self.path}: cannot read: {e}") from e

    def _read_into(self, info: TensorInfo, out: torch.Tensor, start: int) -> None:
        nbytes = out.numel() * out.element_size()
        if nbytes == 0:
            return
        buf = memoryview(out.view(torch.uint8).numpy()).cast("B")
        fd = self._fd(info.file)
        pos = 0
        try:
            while pos < nbytes:
                want = min(nbytes - pos, 1 << 30)
                got = _pread_into(fd, buf[pos : pos + want], start + pos)
                if got <= 0:
                    raise ModelError(f"tensor {info.name!r} in model {self.path}: file {info.file} ends early")
                pos += got
        except OSError as e:
            raise ModelError(f"tensor {info.name!r} in model {self.path}: cannot read {info.file}: {e}") from e

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


