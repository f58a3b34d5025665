"""The unmasked sums of a secure round, decoded block by block of the flat parameter space.

`SecAggServer.finish_stream` leaves the sum of the counted clients' contributions, masks
removed, in a `RingFile` over U. `blocks` decodes it a flat block at a time into the
`Accumulator` of that block (`decode_sums` on U's positions inside it), so what the
coordinator holds to finalize is one block's accumulators, one block of the sum and one
block of U's bitmap: bounded by the block, not by the model. `accumulator` decodes the whole
space at once (tests and small rounds).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from tiesfed.core.accumulators import Accumulator, FinalizeSpec
from tiesfed.core.secagg.decode import decode_sums
from tiesfed.core.secagg.ring import RingLayout
from tiesfed.core.secagg.support import SupportReader, unpack_support
from tiesfed.trust.secagg.ringfile import RingFile

#: Flat parameters one decoded block covers (its accumulators: 16-40 bytes a parameter).
DECODE_BLOCK = 1 << 20


class UnmaskedSums:
    """The unmasked ring sum over U (`ring`), U's bitmap and what decoding needs."""

    def __init__(self, ring: RingFile, support: bytes, numel: int, spec: FinalizeSpec, layout: RingLayout,
                 weights_q: Sequence[int]) -> None:
        self.ring, self.support, self.numel = ring, support, numel
        self.spec, self.layout, self.weights_q = spec, layout, list(weights_q)

    def blocks(self, block: int = DECODE_BLOCK) -> Iterator[tuple[int, Accumulator]]:
        """(first flat position, the accumulators of [lo, lo + block)) in flat order. One
        accumulator is decoded into again for every block: a caller keeps what it derives
        from a block, not the block."""
        if block < 1:
            raise ValueError(f"a decode block must be positive, got {block}")
        reader, w, at = SupportReader(self.support, self.numel), self.layout.width, 0
        acc = None
        for lo in range(0, self.numel, block):
            hi = min(self.numel, lo + block)
            u = reader.take(hi)
            total = self.ring.read(at * w, u.size * w)
            at += u.size
            acc = decode_sums(total, torch.from_numpy(u - lo), hi - lo, self.spec, self.layout, self.weights_q, acc)
            yield lo, acc
        reader.close()

    def accumulator(self) -> Accumulator:
        """The accumulators of the whole flat space at once (memory grows with the model)."""
        total = self.ring.read(0, self.ring.count)
        return decode_sums(total, unpack_support(self.support, self.numel), self.numel, self.spec, self.layout,
                           self.weights_q)

    def close(self) -> None:
        self.ring.close()
