"""A ring vector on disk: the coordinator's running sum of masked uploads, read and written a
range at a time, so its memory is one range whatever the size of U.

Elements are stored in their wire form (b/8 little-endian bytes each, `RingLayout.to_bytes`);
a fresh file is sparse zeros. Explicit reads and writes (not a memory map) keep the pages out
of the process's resident set.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from tiesfed.core.secagg.ring import RingLayout, ring_add, ring_sub

#: Ring elements one step of a whole-vector pass (unmasking, decoding) holds at most.
RING_BLOCK = 1 << 20


class RingFile:
    """`count` elements of Z_{2^b} in a file under `workdir` (a fresh temporary one when None)."""

    def __init__(self, count: int, layout: RingLayout, workdir: Optional[Path] = None, name: str = "sum") -> None:
        if workdir is not None:
            Path(workdir).mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=f"secagg-{name}-", suffix=".ring", dir=workdir)
        self.path, self.count, self.layout = Path(path), count, layout
        self._k = layout.bytes_per_element
        self._fd: Optional[int] = fd
        self._buf = bytearray()  # `apply_wire`'s range, reused
        self._gone = weakref.finalize(self, _remove, fd, self.path)  # dropped without close: no file left
        os.ftruncate(fd, count * self._k)

    def _io(self) -> int:
        if self._fd is None:
            raise ValueError(f"ring file {self.path} is closed")
        return self._fd

    def _check(self, start: int, n: int) -> None:
        if not 0 <= start <= start + n <= self.count:
            raise ValueError(f"ring range {start}..{start + n} outside 0..{self.count}")

    def read(self, start: int, n: int) -> np.ndarray:
        self._check(start, n)
        data = os.pread(self._io(), n * self._k, start * self._k)
        return self.layout.from_bytes(data, n)

    def write(self, start: int, x: np.ndarray) -> None:
        self._check(start, x.size)
        data = self.layout.to_bytes(x)
        if os.pwrite(self._io(), data, start * self._k) != len(data):
            raise OSError(f"short write to {self.path}")

    def apply(self, start: int, x: np.ndarray, op: Callable[..., np.ndarray]) -> None:
        """vector[start:start + x.size] = op(that range, x) (ring_add or ring_sub)."""
        y = self.read(start, x.size)
        op(y, x, self.layout)
        self.write(start, y)

    def apply_wire(self, start: int, data: bytes | memoryview, op: Callable[..., np.ndarray]) -> None:
        """`apply` with x in its wire form. A ring of 8, 16, 32 or 64 bits is a machine word
        whose overflow is the ring's own arithmetic: the range is added in place in its stored
        form, into a buffer kept between calls (fresh arrays of megabytes each, page-faulted in
        and given back, were most of a coordinator's folding time)."""
        word = self.layout.word
        native = {ring_add: np.add, ring_sub: np.subtract}.get(op)
        if word is None or native is None:
            self.apply(start, self.layout.from_bytes(data, len(data) // self._k), op)
            return
        n = len(data) // self._k
        self._check(start, n)
        if len(data) != n * self._k:
            raise ValueError(f"{len(data)} bytes are not whole ring elements of {self._k} bytes")
        if len(self._buf) < len(data):
            self._buf = bytearray(len(data))
        view = memoryview(self._buf)[:len(data)]
        if os.preadv(self._io(), [view], start * self._k) != len(data):
            raise OSError(f"short read from {self.path}")
        y = np.frombuffer(view, dtype=word)
        x = np.frombuffer(data, dtype=word)
        native(y, x, out=y)  # wraps modulo 2^b
        if os.pwrite(self._io(), view, start * self._k) != len(data):
            raise OSError(f"short write to {self.path}")

    def close(self) -> None:
        """Delete the file (idempotent)."""
        self._fd = None
        self._gone()


def _remove(fd: int, path: Path) -> None:
    os.close(fd)
    path.unlink(missing_ok=True)
