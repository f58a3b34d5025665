"""A client's memory budget (`client submit --max-memory`): how many elements of a
tensor it reads, trims and sends as one record, and how many bytes of trimmed
records may wait for the encoder.

What one block of n elements costs at its peak, per element: the base's and the
fine-tuned model's blocks, τ, |τ|'s bit patterns and a mask (`DENSE_BYTES`, 24 with
fp32 models); and per survivor (the fraction `kept`): its index and value as trimmed
(12 bytes), the copies the trim and the cast make, the encoder's index and value
planes, and the records waiting in the pipeline (`SPARSE_BYTES`). A tensor larger
than the block travels as span records of one block each, so the peak does not grow
with the tensor, only with the block.
"""

from __future__ import annotations

import os
from typing import Optional

from tiesfed.core.trim import TrimSpec

#: interpreter, torch, gRPC, the codec's thread pool and buffers: what a budget must leave room for
FIXED_BYTES = 512 << 20
#: per element of a block, dense (see the module's docstring)
DENSE_BYTES = 24
#: per survivor of a block: trimmed (12), trim and cast copies (24), encoding (24), and
#: the records queued between the trim and encode threads (see `queue_bytes`)
SPARSE_BYTES = 60
#: the smallest block worth streaming (smaller budgets are refused)
MIN_BLOCK = 1 << 20


def default_max_memory() -> int:
    """Half the machine's physical memory (the local engine's default too)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def kept_fraction(trim: TrimSpec) -> float:
    """The share of a block's elements that may survive its trim, at most."""
    if trim.kind == "none" or trim.fraction >= 1.0:
        return 1.0
    if trim.kind == "topk" and trim.scope == "tensor":
        return trim.fraction
    return 1.0 if trim.kind == "topk" else min(1.0, 2 * trim.fraction)  # global: one tensor may keep it all


def client_block(max_memory: Optional[int], trim: TrimSpec) -> int:
    """Elements of one tensor held at once (and sent as one record) under `max_memory`
    bytes (None: `default_max_memory`); ValueError when the budget cannot hold a block
    of `MIN_BLOCK`."""
    budget = default_max_memory() if max_memory is None else int(max_memory)
    per_element = DENSE_BYTES + SPARSE_BYTES * kept_fraction(trim)
    room = budget - FIXED_BYTES
    if room < per_element * MIN_BLOCK:
        need = (FIXED_BYTES + per_element * MIN_BLOCK) / 2**30
        raise ValueError(f"--max-memory {budget / 2**30:.2f} GiB is too small for a client: give at least "
                         f"{need:.2f} GiB")
    return int(room // per_element)


def apply_block(max_memory: Optional[int]) -> int:
    """Elements of the base read, applied and written at once by `client fetch` under
    `max_memory` bytes: the base's block, θ and the apply's temporaries (32 bytes per
    element at most), beside the merged tensor's survivors."""
    budget = default_max_memory() if max_memory is None else int(max_memory)
    room = budget - FIXED_BYTES
    if room < 32 * MIN_BLOCK:
        raise ValueError(f"--max-memory {budget / 2**30:.2f} GiB is too small to apply the merge: give at least "
                         f"{(FIXED_BYTES + 32 * MIN_BLOCK) / 2**30:.2f} GiB")
    return int(room // 32)


def queue_bytes(block: int, trim: TrimSpec) -> int:
    """Bytes of trimmed records (indices and values) that may wait for the encoder:
    two blocks' survivors, part of `SPARSE_BYTES`."""
    return int(2 * 12 * block * kept_fraction(trim)) + (1 << 20)
