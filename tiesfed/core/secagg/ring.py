"""The integer ring Z_{2^b} a secure round sums in, and how its width b is chosen.

Every client's contribution becomes a few *lanes* of integers over the union support U
(stored position-major, the lanes of one position adjacent, so a range of U is a range of
the vector: a chunk of the upload, a shard's part of the sum):
"pos"/"neg" carry the fixed-point per-sign sums S⁺, S⁻ (weighted where the spec weights),
with the per-sign counts C⁺, C⁻ packed into their low `count_bits` bits (x = S·2^cb + C,
0 ≤ C ≤ n < 2^cb, so one ring element carries both); "wpos"/"wneg" the quantised weight
sums (mergekit's weighted mean); "raw" the unweighted sum (peft's election).

b is chosen from public per-round numbers only: the bound on |τ|, the bound on |weight|,
the fraction bits and the most clients a round admits, so that no sum of admitted values
can wrap. It is rounded up to whole bytes, so that a masked element is b uniform bits on
the wire (no always-zero top bits to tell a masked upload from noise). The value part of
every sum also stays below 2^53, so it converts to float64 exactly and the decoded
accumulator equals a float64 `fold` of the quantised values bit for bit.

Ring vectors are numpy uint64 arrays: numpy's unsigned arithmetic wraps modulo 2^64,
and reducing modulo 2^b is a mask (b ≤ 64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from tiesfed.core.accumulators import FinalizeSpec

#: the largest |integer| whose float64 conversion is exact
FLOAT64_EXACT = 1 << 53


class RingError(ValueError):
    """A value or parameter outside what the round's ring can carry (never a silent wrap)."""


@dataclass(frozen=True)
class FixedPoint:
    """The public fixed-point contract of one secure round.

    bound: every |τ| a client contributes is at most this (a larger one is refused).
    max_clients: the most clients whose sums may meet in one ring element.
    frac_bits: values are rounded to multiples of 2^-frac_bits.
    weight_bound, weight_frac_bits: the same for client weights (weighted specs only).
    """

    bound: float
    max_clients: int
    frac_bits: int = 24
    weight_bound: float = 1.0
    weight_frac_bits: int = 16

    def __post_init__(self) -> None:
        if not (math.isfinite(self.bound) and self.bound > 0):
            raise RingError(f"the bound on |τ| must be a positive finite number, got {self.bound!r}")
        if not (isinstance(self.max_clients, int) and self.max_clients >= 1):
            raise RingError(f"max_clients must be a positive integer, got {self.max_clients!r}")
        for name in ("frac_bits", "weight_frac_bits"):
            v = getattr(self, name)
            if not (isinstance(v, int) and 0 <= v <= 52):
                raise RingError(f"{name} must be an integer in 0..52, got {v!r}")
        if not (math.isfinite(self.weight_bound) and self.weight_bound > 0):
            raise RingError(f"weight_bound must be a positive finite number, got {self.weight_bound!r}")

    @property
    def max_q(self) -> int:
        """The largest |round(τ·2^f)| a value within the bound can give."""
        return math.ceil(self.bound * 2.0 ** self.frac_bits)

    @property
    def max_qw(self) -> int:
        return math.ceil(self.weight_bound * 2.0 ** self.weight_frac_bits)


@dataclass(frozen=True)
class Lane:
    """One integer vector over U: its name, the power of two its values are scaled by,
    and whether a per-sign count sits in its low bits."""

    name: str
    scale_bits: int
    per_client_max: int
    counted: bool


@dataclass(frozen=True)
class RingLayout:
    """The lanes a FinalizeSpec needs and the ring width b that holds their sums."""

    lanes: tuple[Lane, ...]
    count_bits: int
    bits: int
    value_bits: int
    weighted: bool
    fixed: FixedPoint

    @classmethod
    def of(cls, spec: FinalizeSpec, fixed: FixedPoint) -> "RingLayout":
        """The layout for `spec`; a spec whose state is not a sum (disjoint max) is refused."""
        if spec.needs_extrema:
            raise RingError("disjoint 'max' needs per-parameter maxima, which are not sums: "
                            "secure aggregation supports the mean and sum variants only")
        f, g = fixed.frac_bits, fixed.weight_frac_bits
        w = spec.weighted
        qv = fixed.max_q * (fixed.max_qw if w else 1)
        sb = f + (g if w else 0)
        cb = fixed.max_clients.bit_length() if spec.needs_counts else 0
        lanes = [Lane("pos", sb, qv, cb > 0), Lane("neg", sb, qv, cb > 0)]
        if spec.needs_weight_sums:
            lanes += [Lane("wpos", g, fixed.max_qw, False), Lane("wneg", g, fixed.max_qw, False)]
        if spec.needs_unweighted_sum:
            lanes.append(Lane("raw", f, fixed.max_q, False))
        n = fixed.max_clients
        value_max = max(n * lane.per_client_max for lane in lanes)
        if value_max >= FLOAT64_EXACT:
            raise RingError(
                f"{n} clients × |τ| ≤ {fixed.bound} at {f} fraction bits"
                + (f" × |weight| ≤ {fixed.weight_bound} at {g} bits" if w else "")
                + f" can sum to {value_max} ≥ 2^53, beyond exact float64: lower frac_bits or the bounds")
        packed_max = max(n * lane.per_client_max * (1 << cb) + (n if cb else 0) for lane in lanes)
        need = packed_max.bit_length() + 1  # one sign bit: S⁻ and negative weights are negative
        bits = 8 * math.ceil(need / 8)
        if bits > 64:
            raise RingError(f"the sums need {need} ring bits, more than 64: lower frac_bits or the bounds")
        return cls(tuple(lanes), cb, bits, value_max.bit_length() + 1, w, fixed)

    @property
    def width(self) -> int:
        """Lanes per parameter of U."""
        return len(self.lanes)

    @property
    def bytes_per_element(self) -> int:
        return self.bits // 8

    @property
    def word(self) -> Optional[np.dtype]:
        """The little-endian machine word an element is stored in when the ring's modulus is the
        word's (8, 16, 32 or 64 bits): one cast converts it, and its overflow is the ring's own."""
        return _WORD.get(self.bytes_per_element) if self.bits == 8 * self.bytes_per_element else None

    @property
    def modulus_mask(self) -> np.uint64:
        return np.uint64((1 << self.bits) - 1)

    def reduce(self, x: np.ndarray) -> np.ndarray:
        """Reduce uint64 values modulo 2^b in place and return them."""
        if self.bits < 64:
            np.bitwise_and(x, self.modulus_mask, out=x)
        return x

    def to_ring(self, signed: np.ndarray) -> np.ndarray:
        """Signed int64 → elements of Z_{2^b} (two's complement, as uint64)."""
        return self.reduce(np.asarray(signed, dtype=np.int64).view(np.uint64).copy())

    def to_signed(self, ring: np.ndarray) -> np.ndarray:
        """Elements of Z_{2^b} → the signed integers in [-2^(b-1), 2^(b-1)) they stand for."""
        x = np.asarray(ring, dtype=np.uint64).copy()
        if self.bits == 64:
            return x.view(np.int64)
        half = np.uint64(1 << (self.bits - 1))
        out = x.view(np.int64)
        neg = x >= half
        out[neg] -= np.int64(1 << (self.bits - 1)) * 2
        return out

    def to_bytes(self, ring: np.ndarray) -> bytes:
        """The wire form: b/8 little-endian bytes per element."""
        k, word = self.bytes_per_element, self.word
        if word is not None:  # one cast (the elements are already reduced mod 2^b)
            return np.asarray(ring, dtype=np.uint64).astype(word).tobytes()
        a = np.ascontiguousarray(ring, dtype="<u8").view(np.uint8).reshape(-1, 8)
        return a[:, :k].tobytes()

    def from_bytes(self, data: bytes, count: int) -> np.ndarray:
        """Read `count` elements written by `to_bytes`; a wrong length is an error."""
        k = self.bytes_per_element
        if len(data) != count * k:
            raise RingError(f"a ring vector of {count} elements is {count * k} bytes, got {len(data)}")
        if self.word is not None:
            return np.frombuffer(data, dtype=self.word, count=count).astype(np.uint64)
        out = np.zeros((count, 8), dtype=np.uint8)
        out[:, :k] = np.frombuffer(data, dtype=np.uint8).reshape(count, k)
        return out.view("<u8").reshape(count).astype(np.uint64)


#: Element widths that are a little-endian machine word, read and written with one cast.
_WORD = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}


def ring_add(acc: np.ndarray, x: np.ndarray, layout: RingLayout) -> np.ndarray:
    """acc += x in Z_{2^b}, in place (shapes must agree)."""
    if acc.shape != x.shape:
        raise RingError(f"ring vectors differ in length: {acc.shape} and {x.shape}")
    np.add(acc, x, out=acc)
    return layout.reduce(acc)


def ring_sub(acc: np.ndarray, x: np.ndarray, layout: RingLayout) -> np.ndarray:
    """acc -= x in Z_{2^b}, in place."""
    if acc.shape != x.shape:
        raise RingError(f"ring vectors differ in length: {acc.shape} and {x.shape}")
    np.subtract(acc, x, out=acc)
    return layout.reduce(acc)
