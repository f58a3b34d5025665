"""A bounded producer on a thread of its own: the client's stages overlap.

`Prefetch(source, depth)` runs the generator `source()` on its own thread, at most
`depth` items ahead of whoever iterates it. Submit uses it so that reading and
trimming tensor N+1 (torch releases the GIL in its kernels, file reads release it)
overlaps encoding tensor N (zlib releases it) and sending what is already encoded;
memory is bounded by `depth` items in the queue plus the one each side holds.

An exception in `source` is raised in the consumer where the item would have come,
with its own traceback; `close()` (also on leaving a `with` block, or when the
consumer stops early) stops the producer at its next item and joins its thread.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Generic, Iterable, Iterator, TypeVar

T = TypeVar("T")

_ITEM, _END, _ERROR = 0, 1, 2
_POLL_S = 0.1  # how often a producer blocked on a full queue checks that it should stop


class Prefetch(Generic[T]):
    """Iterate `source()` on a thread named `name`, at most `depth` items ahead."""

    def __init__(self, source: Callable[[], Iterable[T]], depth: int, name: str) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._run, args=(source,), name=name, daemon=True)
        self._thread.start()

    def _run(self, source: Callable[[], Iterable[T]]) -> None:
        it = None
        try:
            it = iter(source())
            for item in it:
                if not self._put((_ITEM, item)):
                    return
            self._put((_END, None))
        except BaseException as e:  # handed to the consumer, which raises it
            self._put((_ERROR, e))
        finally:
            close = getattr(it, "close", None)
            if callable(close):
                close()  # a generator stopped early runs its cleanup here, on its own thread

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
            return value
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
