"""Accumulators that never sit in memory whole: `SpillAggregator`.

The resident aggregators keep `FinalizeSpec.bytes_per_param` (16-40) bytes a
parameter for the whole round: 17 GiB for a 0.73B model, 1.6 TB for 70B. Here a
fold does no arithmetic: it cuts the record's flat indices (manifest order, one
flat space) at fixed coordinator blocks and appends each piece to its block's
spill file, as a chunk (direction, weight, count, local int32 indices, values
as sent). The chunks of a block are in arrival order, so replaying them through
the same pure `core.accumulators.fold` gives, element by element, the same sums
in the same order as the resident `Aggregator`: the same bits, un-folds included.

A pass folds one block at a time: `exact()` and `sign_balance()` share one pass
(cached until the next fold), `finalize_records` a second, which yields the
merged model as codec records block by block: a tensor up to one block whole
(as the resident path writes it), a larger one as span records. Memory is one
block's accumulators, one chunk and the write buffers, whatever the model size;
disk is about 8 bytes per folded nonzero.

Every aggregator has a fresh directory of its own, so one rebuilt from the spool
(recovery, a replaced contribution) starts from empty files; `close` removes it,
and `SpillAggregatorFactory` removes what a killed process left behind.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Optional

import torch

from tiesfed.core.accumulators import (
    Accumulator,
    FinalizeSpec,
    finalize,
    fold,
    majority_sign,
    new_accumulator,
    range_balance,
)
from tiesfed.core.apply import dense_to_sparse
from tiesfed.protos.codec import SparseTensor

#: direction (int8), value dtype code (uint8), weight (float64), count (uint64)
_CHUNK = struct.Struct("<bB6xdQ")
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
_CODE = {d: i for i, d in enumerate(_DTYPES)}
#: bytes a block costs beyond its accumulators: a chunk (int32 index, value) and fold temporaries
_WORK_BYTES_PER_ELEM = 48
MIN_BLOCK = 1 << 10
MAX_BLOCK = 1 << 24
DEFAULT_MEMORY = 1 << 30
DEFAULT_BUFFER_BYTES = 64 << 20
DIR_PREFIX = "tiesfed-spill-"


def block_elems_for(spec: FinalizeSpec, memory_bytes: int) -> int:
    """The largest power-of-two block whose accumulators and work fit `memory_bytes`."""
    per = spec.bytes_per_param() + _WORK_BYTES_PER_ELEM
    n = max(1, memory_bytes // per)
    return max(MIN_BLOCK, min(MAX_BLOCK, 1 << (n.bit_length() - 1)))


class SpillAggregator:
    """`AggregatorLike` over spill files, one per block of `block_elems` parameters."""

    def __init__(
        self,
        manifest: Iterable[tuple[str, int]],
        spec: FinalizeSpec,
        *,
        spill_root: Optional[Path] = None,
        block_elems: Optional[int] = None,
        memory_bytes: int = DEFAULT_MEMORY,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    ) -> None:
        self.spec = spec
        self.block = int(block_elems or block_elems_for(spec, memory_bytes))
        if not 0 < self.block < 1 << 31:
            raise ValueError(f"block_elems must be in [1, 2**31), not {self.block}")
        self.names: list[str] = []
        self.offsets: list[int] = []  # flat start of each tensor, manifest order
        self.sizes: list[int] = []
        total = 0
        for name, numel in manifest:
            self.names.append(name)
            self.offsets.append(total)
            self.sizes.append(int(numel))
            total += int(numel)
        self._where = {n: i for i, n in enumerate(self.names)}
        if len(self._where) != len(self.names):
            raise ValueError("the manifest names a tensor twice")
        self.total = total
        self.n_blocks = -(-total // self.block)
        #: per tensor, what `Accumulator.weight_total` would be (average divides by it)
        self._weight_total = [0.0] * len(self.names)
        self._buffers: dict[int, bytearray] = {}
        self._buffered = 0
        self._buffer_bytes = buffer_bytes
        self._cache: Optional[tuple[bool, int]] = None  # (exact, balance) of the last pass
        self._scratch: Optional[Accumulator] = None  # a block's accumulators, reused during passes
        self._io = [bytearray(), bytearray()]  # read buffers of a chunk's indices and values, reused
        if spill_root is not None:
            Path(spill_root).mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-", dir=spill_root))

    # -- folding: append only ---------------------------------------------------------------

    def fold(self, name: str, indices: torch.Tensor, values: torch.Tensor, weight: float = 1.0,
             direction: int = 1) -> None:
        try:
            i = self._where[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in the round's manifest") from None
        if direction not in (1, -1):
            raise ValueError("direction must be +1 or -1")
        if direction == -1 and self.spec.needs_extrema:
            raise ValueError("disjoint max is not invertible: rebuild the accumulator instead")
        if values.dtype not in _CODE:
            raise ValueError(f"tensor {name!r}: values of dtype {values.dtype} cannot be folded")
        n = indices.numel()
        if n != values.numel():
            raise ValueError(f"tensor {name!r}: {n} indices but {values.numel()} values")
        idx = indices.reshape(-1).to(torch.int64)
        if n and (int(idx[0]) < 0 or int(idx[-1]) >= self.sizes[i]):
            raise IndexError(f"tensor {name!r}: index out of range [0, {self.sizes[i]})")
        self._cache = None
        self._weight_total[i] += direction * weight
        if not n:
            return
        flat = idx + self.offsets[i]
        vals = values.reshape(-1).contiguous()
        first, last = int(flat[0]) // self.block, int(flat[-1]) // self.block
        if first == last:
            self._append(first, direction, weight, flat, vals)
            return
        bounds = torch.arange(first + 1, last + 1, dtype=torch.int64) * self.block
        cuts = [0, *torch.searchsorted(flat, bounds).tolist(), n]
        for k, b in enumerate(range(first, last + 1)):
            a, z = cuts[k], cuts[k + 1]
            if z > a:
                self._append(b, direction, weight, flat[a:z], vals[a:z])

    def _append(self, b: int, direction: int, weight: float, flat: torch.Tensor, vals: torch.Tensor) -> None:
        local = (flat - b * self.block).to(torch.int32)
        buf = self._buffers.setdefault(b, bytearray())
        before = len(buf)
        buf += _CHUNK.pack(direction, _CODE[vals.dtype], float(weight), local.numel())
        buf += memoryview(local.numpy()).cast("B")
        buf += memoryview(vals.view(torch.uint8).numpy()).cast("B")
        self._buffered += len(buf) - before
        if self._buffered >= self._buffer_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the buffered chunks to their block files (appends, in order)."""
        for b, buf in self._buffers.items():
            with open(self._path(b), "ab") as f:
                f.write(buf)
        self._buffers.clear()
        self._buffered = 0

    def _path(self, b: int) -> Path:
        return self.dir / f"{b:08d}.spill"

    # -- passes: one block at a time -------------------------------------------------------

    def _block_acc(self, b: int) -> Accumulator:
        """Block `b`'s accumulators: its chunks replayed in arrival order. One set of
        tensors, zeroed for each block, serves every block of a pass (allocating and
        faulting in fresh pages for each block costs more system time than the folds)."""
        n = min(self.block, self.total - b * self.block)
        if self._scratch is None:
            self._scratch = new_accumulator(min(self.block, self.total), self.spec)
        fields = {k: v[:n].zero_() for k, v in self._scratch.tensors().items()}
        acc = Accumulator(**fields)
        path = self._path(b)
        if path.exists():
            with open(path, "rb") as f:
                for direction, weight, idx, vals in _chunks(f, self._io):
                    fold(acc, idx, vals, weight, direction=direction)
        return acc

    def _pass(self) -> tuple[bool, int]:
        if self._cache is None:
            self.flush()
            exact, balance = True, 0
            for b in range(self.n_blocks):
                acc = self._block_acc(b)
                exact &= acc.exact
                if self.spec.combine == "disjoint":
                    balance += range_balance(acc, self.spec)
                del acc
            self._scratch = None  # nothing resident between passes
            self._cache = (exact, balance)
        return self._cache

    def exact(self) -> bool:
        return self._pass()[0]

    def sign_balance(self) -> int:
        if self.spec.combine != "disjoint":
            return 0
        return self._pass()[1]

    def _pieces(self, majority: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(tensor number, first element, merged float32 values) in flat order, per block."""
        self.flush()
        t = 0  # the first tensor not yet yielded to its end
        for b in range(max(1, self.n_blocks)):
            lo = b * self.block
            acc = self._block_acc(b) if self.n_blocks else new_accumulator(0, self.spec)
            hi = lo + acc.numel
            while t < len(self.names) and (self.offsets[t] < hi or self.offsets[t] + self.sizes[t] <= hi):
                a = max(lo, self.offsets[t])
                end = self.offsets[t] + self.sizes[t]
                z = min(hi, end)
                part = _slice(acc, a - lo, z - lo, self._weight_total[t])
                yield t, a - self.offsets[t], finalize(part, self.spec, majority)
                if end > hi:
                    break  # it goes on in the next block
                t += 1
            del acc
        self._scratch = None

    def finalize_records(self, majority: int, shapes: dict[str, tuple[int, ...]],
                         span_elems: Optional[int] = None) -> Iterator[SparseTensor]:
        """The merged task vector as codec records in manifest order, cut as the resident
        path cuts them (`rounds.finalize.merged_records`): a tensor of at most `span_elems`
        (default: a block) whole, a larger one as span records of `span_elems` from its
        element 0; so the same records, the same stream bytes. Memory: a block's
        accumulators and one record's dense values."""
        return cut_records(self._pieces(majority), self.names, self.sizes, shapes, span_elems or self.block)

    def finalize(self, majority: int) -> Iterator[tuple[str, torch.Tensor]]:
        """`AggregatorLike`'s dense tensors (each assembled whole: memory grows with the largest;
        the coordinator writes `finalize_records` instead)."""
        return join_tensors(self._pieces(majority), self.names, self.sizes)

    def merged(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self.finalize(majority_sign(self.sign_balance()))

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.dir.glob("*.spill")) + self._buffered

    def close(self) -> None:
        """Remove the spill files (the round's spool keeps what was folded)."""
        self._buffers.clear()
        self._buffered = 0
        self._scratch = None
        self._io = [bytearray(), bytearray()]
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "SpillAggregator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def cut_records(pieces: Iterable[tuple[int, int, torch.Tensor]], names: list[str], sizes: list[int],
                shapes: dict[str, tuple[int, ...]], span: int) -> Iterator[SparseTensor]:
    """Merged pieces (tensor number, first element, float32 values; in flat order, covering
    every tensor) as the codec records `rounds.finalize.merged_records` cuts: a tensor of at
    most `span` elements whole, a larger one as span records of `span` from its element 0.
    Memory: one record's dense values."""
    buf: Optional[torch.Tensor] = None  # a record's values, gathered from pieces
    for t, start, vals in pieces:
        name, numel = names[t], sizes[t]
        if numel == 0:
            idx, v = dense_to_sparse(vals)
            yield SparseTensor(name, shapes[name], idx, v)
            continue
        rec = min(numel, span)
        pos, n = 0, vals.numel()
        while pos < n:
            e = start + pos  # element of the tensor
            lo = e // rec * rec
            hi = min(numel, lo + rec)
            take = min(n - pos, hi - e)
            part = vals[pos:pos + take]
            full: Optional[torch.Tensor] = None
            if e == lo and take == hi - lo:
                full = part
            else:
                if e == lo:
                    buf = torch.empty(hi - lo, dtype=torch.float32)
                buf[e - lo:e - lo + take] = part
                if e + take == hi:
                    full, buf = buf, None
            if full is not None:
                idx, v = dense_to_sparse(full)
                if numel <= span:
                    yield SparseTensor(name, shapes[name], idx, v)
                else:
                    yield SparseTensor(name, shapes[name], idx + lo, v, start=lo, count=hi - lo)
            pos += take


def join_tensors(pieces: Iterable[tuple[int, int, torch.Tensor]], names: list[str],
                 sizes: list[int]) -> Iterator[tuple[str, torch.Tensor]]:
    """Merged pieces joined into whole dense tensors (memory: the largest tensor)."""
    out: Optional[torch.Tensor] = None
    for t, start, vals in pieces:
        if start == 0:
            out = vals if vals.numel() == sizes[t] else torch.empty(sizes[t], dtype=torch.float32)
        if out is not vals:
            out[start:start + vals.numel()] = vals
        if start + vals.numel() == sizes[t]:
            yield names[t], out
            out = None


def _slice(acc: Accumulator, a: int, z: int, weight_total: float) -> Accumulator:
    """Views of elements [a, z) of a block's accumulators, with the tensor's weight total."""
    fields = {k: v[a:z] for k, v in acc.tensors().items()}
    return Accumulator(**fields, contributions=acc.contributions, weight_total=weight_total, exact=acc.exact)


def _chunks(f: BinaryIO, io: list[bytearray]) -> Iterator[tuple[int, float, torch.Tensor, torch.Tensor]]:
    """A block file's chunks, in order: (direction, weight, local int32 indices, values), read
    into the two buffers of `io` (each chunk's tensors are views of them: use one before the next)."""
    while True:
        head = f.read(_CHUNK.size)
        if not head:
            return
        if len(head) != _CHUNK.size:
            raise OSError(f"{f.name}: truncated spill chunk")
        direction, code, weight, count = _CHUNK.unpack(head)
        dtype = _DTYPES[code]
        idx = _read(f, io, 0, count * 4, torch.int32)
        vals = _read(f, io, 1, count * torch.empty((), dtype=dtype).element_size(), dtype)
        yield direction, weight, idx, vals


def _read(f: BinaryIO, io: list[bytearray], k: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
    if not nbytes:
        return torch.empty(0, dtype=dtype)
    if len(io[k]) < nbytes:
        io[k] = bytearray(nbytes)
    view = memoryview(io[k])[:nbytes]
    if f.readinto(view) != nbytes:
        raise OSError(f"{f.name}: truncated spill chunk")
    return torch.frombuffer(view, dtype=dtype)


class SpillAggregatorFactory:
    """Callable `(manifest, spec) -> SpillAggregator`, each under `root` (default: the temp
    dir). At construction it removes spill directories of processes no longer alive
    (a coordinator killed mid-round), never a live one's."""

    what = "spill"

    def __init__(self, root: Optional[Path] = None, memory_bytes: int = DEFAULT_MEMORY,
                 block_elems: Optional[int] = None) -> None:
        self.root = Path(root) if root is not None else Path(tempfile.gettempdir())
        self.memory_bytes = memory_bytes
        self.block_elems = block_elems
        remove_stale(self.root)

    def __call__(self, manifest: list[tuple[str, int]], spec: FinalizeSpec) -> SpillAggregator:
        return SpillAggregator(manifest, spec, spill_root=self.root, memory_bytes=self.memory_bytes,
                               block_elems=self.block_elems)


def remove_stale(root: Path) -> None:
    """Spill directories under `root` whose process is gone."""
    if not root.is_dir():
        return
    for d in root.glob(f"{DIR_PREFIX}*"):
        try:
            pid = int(d.name[len(DIR_PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
