"""Exact order statistics of |τ| by radix select over float32 bit patterns.

Non-negative float32 values order like their int32 bit patterns, so the k-th
smallest |τ| is found with two histograms instead of a sort: a coarse one over
the high 19 bits (sign, exponent, 11 mantissa bits: 2**19 bins, a bucket is
1/2048 of an octave), then a fine one over the low 12 bits of the few values
that fall in the one coarse bucket holding the k-th value. Histograms add, so
the select runs over a whole model one tensor at a time, and the bucket's
members can be collected during a later pass instead of in a pass of their own.

NaN and inf have the largest patterns (exponent all ones): one look at the
coarse histogram's top bins replaces a separate finiteness check.
"""

from __future__ import annotations

import torch

from tiesfed.core.compact import flat_nonzero, select

FINE_BITS = 12
COARSE_BINS = 1 << (31 - FINE_BITS)
FINE_BINS = 1 << FINE_BITS
#: |x| bit patterns at or above this are inf or NaN
NONFINITE_BITS = 0x7F800000


def abs_bits(tau: torch.Tensor) -> torch.Tensor:
    """Flat int32 bit patterns of |τ| as float32 (-0.0 becomes 0)."""
    return tau.reshape(-1).to(torch.float32).abs().view(torch.int32)


def finite(bits: torch.Tensor) -> bool:
    """No NaN or inf among these |τ| patterns (one max, not an isfinite pass)."""
    return bits.numel() == 0 or int(bits.max()) < NONFINITE_BITS


def pattern(value: float) -> int:
    """The int32 pattern of |value| as float32."""
    return int(abs_bits(torch.tensor([value], dtype=torch.float32)).item())


def as_float(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32).item())


def coarse_histogram(bits: torch.Tensor) -> torch.Tensor:
    """Counts of `bits` by their high 19 bits (int64, on the CPU)."""
    return torch.bincount(bits >> FINE_BITS, minlength=COARSE_BINS).cpu()


def fine_histogram(bits: torch.Tensor, bucket: int) -> torch.Tensor:
    """Counts by the low 12 bits of those `bits` inside coarse `bucket` (others ignored)."""
    return low_histogram(select(bits, (bits >> FINE_BITS) == bucket))


def low_histogram(members: torch.Tensor) -> torch.Tensor:
    """Counts by the low 12 bits of patterns already known to share one coarse bucket."""
    return torch.bincount(members & (FINE_BINS - 1), minlength=FINE_BINS).cpu()


def nonfinite(coarse: torch.Tensor) -> int:
    """How many of the histogrammed values were inf or NaN."""
    return int(coarse[NONFINITE_BITS >> FINE_BITS :].sum())


def locate(hist: torch.Tensor, rank: int) -> tuple[int, int]:
    """Bin holding the rank-th smallest item (1-based) and its rank inside that bin."""
    cum = torch.cumsum(hist.to(torch.int64), 0)
    b = int(torch.searchsorted(cum, torch.tensor([rank], dtype=torch.int64)).item())
    before = int(cum[b - 1].item()) if b > 0 else 0
    return b, rank - before


def join(bucket: int, low: int) -> int:
    """The bit pattern of coarse `bucket` and fine bin `low`."""
    return (bucket << FINE_BITS) | low


def bucket_start(bucket: int) -> int:
    return bucket << FINE_BITS


def at_least(bits: torch.Tensor, lowest: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (ascending) of the nonzero `bits` >= `lowest`, and their bits.

    Zeros never qualify: in TIES they neither vote nor count."""
    idx = flat_nonzero(bits >= max(lowest, 1))
    return idx, bits.index_select(0, idx)


def split_at_bucket(bits: torch.Tensor, bucket: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Around a threshold known only to lie in coarse `bucket`: flat indices of the
    nonzero `bits` above the bucket (they survive), of the bucket's members (they
    wait for the exact threshold) and the members' bits, and how many zeros the
    bucket holds too (bucket 0 only: zeros rank there but never survive)."""
    idx, got = at_least(bits, bucket_start(bucket))
    member = got < bucket_start(bucket + 1)
    zeros = bits.numel() - idx.numel() if bucket == 0 else 0
    return select(idx, ~member), select(idx, member), select(got, member), zeros


#: Up to this many elements a stable sort is faster than the 64K-bucket histogram (whose
#: fixed cost, a few ms, dominates a LayerNorm's or a bias's top-k).
SORT_BELOW = 16384


def top_count(bits: torch.Tensor, keep: int) -> torch.Tensor:
    """Flat indices (ascending) of the `keep` largest of `bits`, minus any zeros;
    among equal values at the boundary the lower index wins (0 < keep < n)."""
    return top_count_sorted(bits, keep) if bits.numel() < SORT_BELOW else top_count_histogram(bits, keep)


def top_count_sorted(bits: torch.Tensor, keep: int) -> torch.Tensor:
    """`top_count` by a stable descending sort (equal values keep index order)."""
    values, order = torch.sort(bits.reshape(-1), descending=True, stable=True)
    return torch.sort(order[:keep][values[:keep] != 0]).values


def top_count_histogram(bits: torch.Tensor, keep: int) -> torch.Tensor:
    """`top_count` without sorting the tensor: one histogram finds the bucket of the
    keep-th largest; the survivors are then taken from that bucket's lower edge up, so
    the bucket's few members settle the exact boundary without a second pass."""
    n = bits.numel()
    bucket, inner = locate(coarse_histogram(bits), n - keep + 1)
    if bucket == 0:  # the boundary is among zeros and subnormals: rare, take the plain way
        kth = join(0, locate(fine_histogram(bits, 0), inner)[0])
        idx, got = at_least(bits, 0)
    else:
        idx, got = at_least(bits, bucket_start(bucket))
        members = select(got, got < bucket_start(bucket + 1))
        kth = int(torch.sort(members).values[inner - 1])
    over = got > kth
    need = keep - int(torch.count_nonzero(over))
    at = got == kth
    if int(torch.count_nonzero(at)) <= need:  # no tie is cut: the usual case
        return select(idx, got >= kth)
    over[flat_nonzero(at)[:need]] = True
    return select(idx, over)
