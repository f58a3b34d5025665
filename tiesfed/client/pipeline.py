"""A bounded producer on a thread of its own: the client's stages overlap.

`Prefetch(source, depth)` runs the generator `source()` on its own thread, at most
`depth` items ahead of whoever iterates it (and, given `max_bytes` and `weigh`, at
most `max_bytes` of them, though one item always passes). Submit uses it so that
reading and trimming tensor N+1 (torch releases the GIL in its kernels, file reads
release it) overlaps encoding tensor N (zlib releases it) and sending what is already
encoded; memory is bounded by the queue's items or bytes plus the one each side holds.

An exception in `source` is raised in the consumer where the item would have come,
with its own traceback; `close()` (also on leaving a `with` block, or when the
consumer stops early) stops the producer at its next item and joins its thread.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Generic, Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")

_ITEM, _END, _ERROR = 0, 1, 2
_POLL_S = 0.1  # how often a producer blocked on a full queue checks that it should stop


class Prefetch(Generic[T]):
    """Iterate `source()` on a thread named `name`, at most `depth` items (and
    `max_bytes` as `weigh` counts them) ahead."""

    def __init__(self, source: Callable[[], Iterable[T]], depth: int, name: str, *,
                 max_bytes: Optional[int] = None, weigh: Optional[Callable[[T], int]] = None) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._max_bytes = max_bytes if weigh is not None else None
        self._weigh = weigh
        self._queued = 0  # bytes of the items in the queue
        self._room = threading.Condition()
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._run, args=(source,), name=name, daemon=True)
        self._thread.start()

    def _run(self, source: Callable[[], Iterable[T]]) -> None:
        it = None
        try:
            it = iter(source())
            for item in it:
                size = self._weigh(item) if self._max_bytes is not None else 0
                if not self._reserve(size) or not self._put((_ITEM, (item, size))):
                    return
            self._put((_END, None))
        except BaseException as e:  # handed to the consumer, which raises it
            self._put((_ERROR, e))
        finally:
            close = getattr(it, "close", None)
            if callable(close):
                close()  # a generator stopped early runs its cleanup here, on its own thread

    def _reserve(self, size: int) -> bool:
        """Wait until `size` bytes fit beside the queued ones (or the queue is empty)."""
        if self._max_bytes is None:
            return True
        with self._room:
            while self._queued and self._queued + size > self._max_bytes:
                if self._stop.is_set():
                    return False
                self._room.wait(_POLL_S)
            self._queued += size
        return True

    def _put(self, entry: tuple) -> bool:
        """Queue an entry unless told to stop first; whether it was queued."""
        while not self._stop.is_set():
            try:
                self._q.put(entry, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        if self._finished:
            raise StopIteration
        kind, value = self._q.get()
        if kind == _ITEM:
            item, size = value
            if size:
                with self._room:
                    self._queued -= size
                    self._room.notify_all()
            return item
        self._finished = True
        if kind == _END:
            raise StopIteration
        raise value

    def close(self) -> None:
        """Stop the producer (it finishes the item in hand) and wait for its thread."""
        self._stop.set()
        self._finished = True
        self._thread.join()

    def __enter__(self) -> "Prefetch[T]":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
