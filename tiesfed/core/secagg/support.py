"""The support phase: each client's survivor positions as a bitmap, and their union U.

The bitmap is what a client reveals in the clear (its top-k positions, not values or
signs); packed 8 positions a byte and deflated, about the binary entropy of the density.

A bitmap is read from a bytes-like object or from anything whose `pieces()` yields its bytes
in order (a message field kept in its file, `tiesfed.trust.secagg.blob.FileBlob`), and
`SupportWriter` can hand its output to a sink as it goes: the streamed readers and writers
never hold a whole deflated bitmap, so the coordinator's bitmaps can stay on disk.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from tiesfed.core.secagg.ring import RingError


def pack_support(indices: torch.Tensor, numel: int) -> bytes:
    """Deflated packbits (MSB first) of the numel-long mask of `indices`."""
    idx = indices.to(torch.int64).numpy()
    if idx.size and (idx.min() < 0 or idx.max() >= numel):
        raise RingError(f"support positions outside 0..{numel - 1}")
    mask = np.zeros(numel, dtype=bool)
    mask[idx] = True
    return zlib.compress(np.packbits(mask).tobytes(), 9)


def unpack_support(data: Any, numel: int) -> torch.Tensor:
    """The sorted int64 positions of a `pack_support` bitmap; a malformed one is an error."""
    want = (numel + 7) // 8
    if not isinstance(data, (bytes, bytearray, memoryview)):
        data = bytes(data)  # a file-backed field read whole (tests and small rounds)
    try:
        d = zlib.decompressobj()
        raw = d.decompress(data, want + 1)
    except zlib.error as e:
        raise RingError(f"support bitmap does not inflate: {e}") from None
    if len(raw) != want or d.unconsumed_tail or not d.eof:
        raise RingError(f"support bitmap is not {want} bytes for {numel} parameters")
    if d.unused_data:
        raise RingError(f"support bitmap: {len(d.unused_data)} bytes follow its deflate stream")
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8))
    if bits[numel:].any():
        raise RingError("support bitmap sets padding bits")
    return torch.from_numpy(np.flatnonzero(bits[:numel]).astype(np.int64))


def union_support(supports: list[torch.Tensor]) -> torch.Tensor:
    """U: the sorted union of the clients' positions."""
    if not supports:
        return torch.zeros(0, dtype=torch.int64)
    return torch.unique(torch.cat([s.to(torch.int64) for s in supports]), sorted=True)


def release_support(supports: list[torch.Tensor], min_release: int, numel: int) -> torch.Tensor:
    """U under the release rule: the positions at least `min_release` supports cover
    (`union_support` for 1)."""
    if min_release <= 1:
        return union_support(supports)
    counts = torch.zeros(numel, dtype=torch.int32)
    for s in supports:
        counts.index_add_(0, s.to(torch.int64), torch.ones(s.numel(), dtype=torch.int32))
    return torch.nonzero(counts >= min_release).reshape(-1)


#: Flat positions one streamed step of a bitmap covers at most (a bool mask of this many bytes).
BITMAP_BLOCK = 1 << 22
#: Deflated bytes a `SupportReader` feeds its inflater at a time (what it copies of its input).
INPUT_PIECE = 1 << 20
#: The least a `SupportReader` inflates at a time (short ranges are not inflated byte by byte).
INFLATE_MIN = 1 << 16


def _pieces(data: Any) -> Iterator[Any]:
    """A bitmap's deflated bytes in non-empty pieces: `data.pieces()` when it has them (a
    file-backed field), else zero-copy slices of the bytes-like `data`."""
    if hasattr(data, "pieces"):
        yield from (p for p in data.pieces() if len(p))
        return
    view = memoryview(data)
    for at in range(0, len(view), INPUT_PIECE):
        yield view[at:at + INPUT_PIECE]


class SupportWriter:
    """`pack_support`'s bytes built range by range in flat order: memory is one range's mask
    and the deflated output (the same bytes as `pack_support` of all the positions). With a
    `sink`, each piece of output goes there as it is made and `finish` returns b"" (memory:
    one range's mask)."""

    def __init__(self, numel: int, sink: Optional[Callable[[bytes], Any]] = None) -> None:
        self.numel, self.at, self.count = numel, 0, 0
        self._z = zlib.compressobj(9)
        self._out: list[bytes] = []
        self._sink = sink if sink is not None else self._out.append
        self._carry = np.zeros(0, dtype=bool)

    def _emit(self, data: bytes) -> None:
        if data:
            self._sink(data)

    def _bits(self, mask: np.ndarray) -> None:
        buf = np.concatenate([self._carry, mask]) if self._carry.size else mask
        whole = buf.size // 8 * 8
        self._emit(self._z.compress(np.packbits(buf[:whole]).tobytes()))
        self._carry = buf[whole:].copy()

    def _zeros_to(self, lo: int) -> None:
        while self.at < lo:
            n = min(lo - self.at, BITMAP_BLOCK)
            self._bits(np.zeros(n, dtype=bool))
            self.at += n

    def add(self, lo: int, hi: int, positions: np.ndarray) -> None:
        """The positions (sorted, absolute) of the range [lo, hi); ranges come in increasing order."""
        if not self.at <= lo <= hi <= self.numel:
            raise RingError(f"support range {lo}..{hi} out of order or outside 0..{self.numel}")
        pos = np.asarray(positions, dtype=np.int64)
        if pos.size and (pos[0] < lo or pos[-1] >= hi):
            raise RingError(f"support positions outside their range {lo}..{hi}")
        self._zeros_to(lo)
        for a in range(lo, hi, BITMAP_BLOCK):
            b = min(hi, a + BITMAP_BLOCK)
            mask = np.zeros(b - a, dtype=bool)
            i, j = np.searchsorted(pos, [a, b])
            mask[pos[i:j] - a] = True
            self._bits(mask)
        self.count += int(pos.size)
        self.at = hi

    def finish(self) -> bytes:
        self._zeros_to(self.numel)
        if self._carry.size:
            self._emit(self._z.compress(np.packbits(self._carry).tobytes()))
            self._carry = np.zeros(0, dtype=bool)
        self._emit(self._z.flush())
        out = b"".join(self._out)
        self._out.clear()
        return out


class SupportReader:
    """The positions of a `pack_support` bitmap, range by range in flat order, inflated as they
    are read: memory is one range's bits and one `INPUT_PIECE` of the input. `data`: bytes-like,
    or an object whose `pieces()` yields the bytes (a field kept in its file). `close` checks
    what `unpack_support` checks (length, end of stream, padding bits), so a malformed bitmap
    is an error at the latest there."""

    def __init__(self, data: Any, numel: int) -> None:
        self.numel, self.at = numel, 0
        self._d = zlib.decompressobj()
        self._src = _pieces(data)
        self._tail: Any = b""  # input the inflater has not consumed yet (at most one piece)
        self._raw = b""  # inflated bytes from byte `self._byte0` on
        self._byte0 = 0

    def _short(self) -> RingError:
        return RingError(f"support bitmap is not {(self.numel + 7) // 8} bytes for {self.numel} parameters")

    def _inflate(self, need: int) -> None:
        while len(self._raw) < need:
            inp = self._tail if len(self._tail) else next(self._src, b"")
            try:
                got = self._d.decompress(inp, max(need - len(self._raw), INFLATE_MIN))
            except zlib.error as e:
                raise RingError(f"support bitmap does not inflate: {e}") from None
            self._tail = self._d.unconsumed_tail
            if got:
                self._raw += got
            elif self._d.eof or not len(inp):  # the stream ended, or the input did
                raise self._short()

    def take(self, hi: int) -> np.ndarray:
        """The sorted int64 positions in [at, hi), then at = hi."""
        if not self.at <= hi <= self.numel:
            raise RingError(f"support read to {hi}: out of order or beyond {self.numel}")
        out = []
        while self.at < hi:
            b = min(hi, self.at + BITMAP_BLOCK)
            need = (b + 7) // 8 - self._byte0
            self._inflate(need)
            bits = np.unpackbits(np.frombuffer(self._raw[:need], dtype=np.uint8))
            first = self.at - 8 * self._byte0
            out.append(np.flatnonzero(bits[first:first + b - self.at]).astype(np.int64) + self.at)
            keep = b // 8 - self._byte0
            self._raw, self._byte0, self.at = self._raw[keep:], b // 8, b
        return np.concatenate(out) if len(out) > 1 else (out[0] if out else np.zeros(0, dtype=np.int64))

    def close(self) -> None:
        """Read to the end and check the bitmap is exactly `numel` bits, zero-padded."""
        self.take(self.numel)
        want = (self.numel + 7) // 8 - self._byte0
        self._inflate(want)
        while not self._d.eof:  # nothing more may inflate, and the stream must end
            inp = self._tail if len(self._tail) else next(self._src, None)
            if inp is None:
                break
            try:
                extra = self._d.decompress(inp, 1)
            except zlib.error as e:
                raise RingError(f"support bitmap does not inflate: {e}") from None
            self._tail = self._d.unconsumed_tail
            if extra:
                raise self._short()
        if len(self._raw) != want or not self._d.eof:
            raise self._short()
        trailing = len(self._d.unused_data) + len(self._tail) + sum(len(p) for p in self._src)
        if trailing:
            raise RingError(f"support bitmap: {trailing} bytes follow its deflate stream")
        if want and np.unpackbits(np.frombuffer(self._raw, dtype=np.uint8))[self.numel % 8:].any():
            raise RingError("support bitmap sets padding bits")


def count_support(data: Any, numel: int) -> int:
    """The number of positions of a bitmap, checked as `unpack_support` checks it, streamed."""
    r, n = SupportReader(data, numel), 0
    for lo in range(0, numel, BITMAP_BLOCK):
        n += r.take(min(numel, lo + BITMAP_BLOCK)).size
    r.close()
    return n


def coverage(bitmaps: list[Any], numel: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """(lo, hi, counts): how many of the `bitmaps` cover each position of [lo, hi), block by
    block (memory: a block's counts); the bitmaps are checked whole once the last block is out."""
    readers = [SupportReader(b, numel) for b in bitmaps]
    for lo in range(0, numel, BITMAP_BLOCK):
        hi = min(numel, lo + BITMAP_BLOCK)
        counts = np.zeros(hi - lo, dtype=np.int32)
        for r in readers:
            counts[r.take(hi) - lo] += 1
        yield lo, hi, counts
    for r in readers:
        r.close()


def merge_supports(bitmaps: list[Any], min_release: int, numel: int,
                   sink: Optional[Callable[[bytes], Any]] = None) -> tuple[bytes, int]:
    """(the bitmap of U, |U|): `release_support` over the clients' bitmaps, block by block
    (memory: a block's counts, never the positions of the whole model). With a `sink`, U's
    bitmap goes there piece by piece and the bytes returned are empty."""
    w = SupportWriter(numel, sink)
    need = max(1, min_release)
    for lo, hi, counts in coverage(bitmaps, numel):
        w.add(lo, hi, np.flatnonzero(counts >= need) + lo)
    return w.finish(), w.count
