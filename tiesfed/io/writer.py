"""Write safetensors models in Hugging Face's sharded layout, streaming.

`ShardedWriter` knows the whole plan up front, so it writes every shard's
header first and then streams tensor bytes into place: memory = one tensor.
`pack_shards` and `shard_name` are the same layout rules for callers that
write shards in parallel; `copy_side_files` carries config and tokenizer
files over to the output folder.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, TypeVar

import numpy as np
import torch

from tiesfed.io.safetensors_format import (
    _INT_VIEW,
    _IO_CHUNK,
    DEFAULT_SHARD_BYTES,
    DTYPE_TO_ST,
    INDEX_FILE,
    SINGLE_FILE,
    ModelError,
    _itemsize,
    _numel,
)

__all__ = ["ShardedWriter", "pack_shards", "shard_name", "copy_side_files", "WEIGHT_SUFFIXES"]

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
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
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
        check_out_dir(self.out_dir, overwrite)
        tag = f"{os.getpid()}-{id(self):x}"
        self._tmp = [self.out_dir / f".{fn}.tmp-{tag}" for fn in self.shard_names]
        self._files: list = []
        self._next = 0
        self._part = 0  # bytes of the next tensor written so far (write_part)
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
        return existing_outputs(self.out_dir)

    @property
    def plan_names(self) -> list[str]:
        return [s.name for s in self._slots]

    def _check_open(self) -> None:
        if self._closed:
            raise ModelError(f"writer for {self.out_dir} is closed")

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next planned tensor (plan order, exact shape and dtype)."""
        s = self._expect(name, tensor.dtype)
        if tuple(tensor.shape) != s.shape:
            raise ModelError(f"tensor {name!r} for {self.out_dir}: shape {list(tensor.shape)}, planned {list(s.shape)}")
        if self._part:
            raise ModelError(f"tensor {name!r} for {self.out_dir}: written in parts already; finish with write_part")
        self._put(s, tensor)

    def write_part(self, name: str, part: torch.Tensor) -> None:
        """The next elements (flat, in order) of the next planned tensor: a tensor too
        large to hold whole is written block by block, and counts as written once
        every element is."""
        s = self._expect(name, part.dtype)
        if self._part + part.numel() * part.element_size() > s.nbytes:
            raise ModelError(f"tensor {name!r} for {self.out_dir}: parts exceed its {_numel(s.shape)} elements")
        self._put(s, part)

    def _expect(self, name: str, dtype: torch.dtype) -> _Slot:
        self._check_open()
        if self._next >= len(self._slots):
            raise ModelError(f"tensor {name!r}: every planned tensor of {self.out_dir} is already written")
        s = self._slots[self._next]
        if name != s.name:
            why = "is not in the plan" if name not in self._by_name else "is out of plan order"
            raise ModelError(f"tensor {name!r} {why} for {self.out_dir}: expected {s.name!r} next")
        if dtype != s.dtype:
            raise ModelError(f"tensor {name!r} for {self.out_dir}: dtype {dtype}, planned {s.dtype}")
        return s

    def _put(self, s: _Slot, tensor: torch.Tensor) -> None:
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()  # the one extra copy
        t = t.contiguous()  # a no-op if it already was (and it is, after .cpu())
        nbytes = t.numel() * t.element_size()
        if nbytes:
            raw = t.reshape(-1).view(torch.uint8).numpy()
            mv = memoryview(raw).cast("B")
            f = self._files[s.shard]
            f.seek(s.offset + self._part)
            for i in range(0, nbytes, _IO_CHUNK):
                f.write(mv[i : i + _IO_CHUNK])
        self._part += nbytes
        if self._part == s.nbytes:
            s.written = True
            self._next += 1
            self._part = 0

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


def existing_outputs(out_dir: str | Path) -> list[Path]:
    """The model files (shards, index) a writer would replace in `out_dir`."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return [p for p in out_dir.iterdir()
            if p.is_file() and (p.name.endswith(".safetensors") or p.name == INDEX_FILE)]


def check_out_dir(out_dir: str | Path, overwrite: bool) -> None:
    """Refuse an `out_dir` that holds model files unless `overwrite` (the CLI's --overwrite)."""
    clash = sorted(p.name for p in existing_outputs(out_dir))
    if clash and not overwrite:
        raise ModelError(
            f"{out_dir} already holds model files ({', '.join(clash[:5])}): choose an empty folder, "
            "or give --overwrite to replace its weights"
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
