"""Large message fields kept in their file, and outgoing messages made of pieces, so that a
secure round's support phase (each client's bitmap, U's bitmap in every mask request: about
0.1 byte a parameter each) never sits whole in the coordinator's memory.

`FileBlob` is a byte field as (open file, offset, length): it reads with `os.pread` on a file
descriptor of its own, so the file may be renamed or unlinked after the message is parsed
(the journal renames an incoming message into place; U's file is unlinked from the start).
Explicit reads, not a memory map, keep the pages out of the process's resident set (as
`RingFile` does). `Outgoing` is a message as the pieces `messages.to_parts` lays out (small
bytes and file-backed fields), with its size and sha256, streamed chunk by chunk.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from typing import Any, BinaryIO, Iterator, Optional, Sequence, Union

#: Bytes read from a file-backed field at a time.
PIECE_BYTES = 1 << 20


class _Fd:
    """A read-only file descriptor, closed when the last field using it goes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._close = weakref.finalize(self, os.close, fd)


class FileBlob:
    """`length` bytes at `offset` of an open file: a message's byte field left on disk."""

    def __init__(self, fd: _Fd, offset: int, length: int) -> None:
        self._fd, self.offset, self.length = fd, offset, length

    @classmethod
    def open(cls, path: Union[str, os.PathLike], offset: int = 0, length: int = -1) -> "FileBlob":
        """A field of the file at `path` (the whole file from `offset` when `length` < 0)."""
        fd = _Fd(os.open(path, os.O_RDONLY))
        if length < 0:
            length = os.fstat(fd.fd).st_size - offset
        return cls(fd, offset, length)

    @classmethod
    def of(cls, f: BinaryIO) -> "FileBlob":
        """The whole of an open file (e.g. a `tempfile.TemporaryFile` written and flushed): its
        own descriptor, so `f` may be closed."""
        f.flush()
        fd = _Fd(os.dup(f.fileno()))
        return cls(fd, 0, os.fstat(fd.fd).st_size)

    def slice(self, start: int, length: int) -> "FileBlob":
        """`length` bytes from `start` within this field (the same descriptor)."""
        if start < 0 or length < 0 or start + length > self.length:
            raise ValueError(f"a slice {start}+{length} outside a field of {self.length} bytes")
        return FileBlob(self._fd, self.offset + start, length)

    def __len__(self) -> int:
        return self.length

    def read(self, start: int, n: int) -> bytes:
        """`n` bytes from `start` within the field (fewer at its end)."""
        n = max(0, min(n, self.length - start))
        out = os.pread(self._fd.fd, n, self.offset + start)
        if len(out) != n:
            raise OSError(f"a message field's file ended {n - len(out)} bytes early")
        return out

    def pieces(self, size: Optional[int] = None) -> Iterator[bytes]:
        """The field's bytes in order, `size` (`PIECE_BYTES`) at a time."""
        size = size or PIECE_BYTES
        for at in range(0, self.length, size):
            yield self.read(at, size)

    def __bytes__(self) -> bytes:
        """The whole field (tests and small rounds: memory grows with it)."""
        return self.read(0, self.length)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (FileBlob, bytes, bytearray, memoryview)):
            return len(self) == len(other) and all(a == b for a, b in zip(_iter(self), _iter(other)))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"FileBlob({self.length} bytes at {self.offset})"


def _iter(data: Any) -> Iterator[bytes]:
    """Bytes in `PIECE_BYTES` pieces, from a field or a bytes-like object."""
    if isinstance(data, FileBlob):
        yield from data.pieces()
        return
    view = memoryview(data)
    for at in range(0, len(view), PIECE_BYTES):
        yield bytes(view[at:at + PIECE_BYTES])
    if not len(view):
        yield b""


Part = Union[bytes, FileBlob]


class Outgoing:
    """A message the coordinator serves, as its pieces in order (`to_parts`): its size and
    sha256 are computed once, when it is made; it is read piece by piece for every poll."""

    def __init__(self, parts: Sequence[Part]) -> None:
        self.parts = tuple(p for p in parts if len(p))
        self.size = sum(len(p) for p in self.parts)
        sha = hashlib.sha256()
        for piece in self.pieces():
            sha.update(piece)
        self.sha256 = sha.hexdigest()

    def pieces(self) -> Iterator[bytes]:
        for p in self.parts:
            yield from (_iter(p) if isinstance(p, FileBlob) else [p])

    def chunks(self, size: int) -> Iterator[bytes]:
        """The message in chunks of exactly `size` bytes (the last one shorter)."""
        buf = bytearray()
        for piece in self.pieces():
            view = memoryview(piece)
            while len(view):
                take = min(size - len(buf), len(view))
                buf += view[:take]
                view = view[take:]
                if len(buf) == size:
                    yield bytes(buf)
                    buf.clear()
        if buf:
            yield bytes(buf)

    def whole(self) -> bytes:
        """The whole message (the unary Poll: small rounds)."""
        return b"".join(self.pieces())
