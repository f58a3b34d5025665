"""Unmasked ring sums back into an `Accumulator`, finalized by the same `finalize` as every path.

Integer sums are exact; their value parts are below 2^53 (`RingLayout.of` checks), so
`S·2^-scale` in float64 is exact too, and the accumulator equals, bit for bit, the one a
float64 `fold` of the same quantised values builds (`exact` stays True).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from tiesfed.core.accumulators import (
    Accumulator,
    FinalizeSpec,
    elect,
    finalize,
    majority_sign,
    new_accumulator,
    sign_balance,
)
from tiesfed.core.secagg.encode import weight_value
from tiesfed.core.secagg.ring import RingError, RingLayout


def decode_sums(total: np.ndarray, support: torch.Tensor, numel: int, spec: FinalizeSpec,
                layout: RingLayout, weights_q: Sequence[int], out: Optional[Accumulator] = None) -> Accumulator:
    """The accumulator of `numel` parameters from the unmasked sum over U of every counted client.

    `weights_q`: the quantised (public) weights of the clients in the sum, in a fixed order
    (client id order): their count is `contributions`, their float sum `weight_total`. `out`:
    an accumulator of `numel` parameters to zero and decode into (a block decoder reuses one
    rather than page in fresh megabytes for every block).
    """
    u = support.to(torch.int64)
    m = u.numel()
    if total.shape != (layout.width * m,):
        raise RingError(f"the sum has {total.shape} elements, the layout needs {layout.width * m}")
    if m and (int(u[0]) < 0 or int(u[-1]) >= numel):
        raise RingError(f"support positions outside 0..{numel - 1}")
    if out is not None and out.numel == numel:
        acc = out
        for t in acc.tensors().values():
            t.zero_()
    else:
        acc = new_accumulator(numel, spec)
    signed = torch.from_numpy(layout.to_signed(total))  # a fresh array
    cb = layout.count_bits
    n = len(weights_q)
    lanes = signed.reshape(m, layout.width)  # position-major, as `encode_range` writes it
    for i, lane in enumerate(layout.lanes):
        x = lanes[:, i]
        if lane.counted:
            count = x & ((1 << cb) - 1)
            x = x >> cb  # floor division: x = S·2^cb + C with 0 ≤ C < 2^cb
            if m and int(count.max()) > n:
                raise RingError(f"a count of {int(count.max())} from {n} clients: the sum is not a valid one")
            target = acc.c_pos if lane.name == "pos" else acc.c_neg
            target[u] = count.to(torch.int32)
        value = x.to(torch.float64).mul_(2.0 ** -lane.scale_bits)  # a power of two: exact
        name = {"pos": "s_pos", "neg": "s_neg", "wpos": "w_pos", "wneg": "w_neg", "raw": "e_sum"}[lane.name]
        getattr(acc, name)[u] = value.to(acc.s_pos.dtype)
    acc.contributions = n
    total_w = 0.0
    for qw in weights_q:
        total_w += weight_value(qw, layout)  # fold's order: one client after another
    acc.weight_total = total_w
    return acc


def secure_finalize(acc: Accumulator, spec: FinalizeSpec) -> torch.Tensor:
    """The merged task vector, the zero-sign majority taken from the sums themselves.

    The majority rule's scalar Σ_p γ_p is a function of the aggregated sums, so a secure
    round needs no per-client scalar for it: the coordinator computes it as every path does.
    """
    majority = majority_sign(sign_balance(elect(acc, spec)))
    return finalize(acc, spec, majority)
