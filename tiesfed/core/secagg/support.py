"""The support phase: each client's survivor positions as a bitmap, and their union U.

The bitmap is what a client reveals in the clear (its top-k positions, not values or
signs); packed 8 positions a byte and deflated, about the binary entropy of the density.
"""

from __future__ import annotations

import zlib

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


def unpack_support(data: bytes, numel: int) -> torch.Tensor:
    """The sorted int64 positions of a `pack_support` bitmap; a malformed one is an error."""
    want = (numel + 7) // 8
    try:
        d = zlib.decompressobj()
        raw = d.decompress(data, want + 1)
    except zlib.error as e:
        raise RingError(f"support bitmap does not inflate: {e}") from None
    if len(raw) != want or d.unconsumed_tail or not d.eof:
        raise RingError(f"support bitmap is not {want} bytes for {numel} parameters")
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
