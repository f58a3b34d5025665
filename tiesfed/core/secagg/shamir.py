"""Shamir secret sharing, t of n, over the prime field of p = 2^521 − 1.

A secret (a 32-byte mask seed or X25519 private key) is the constant term of a random
polynomial of degree t − 1; share x is its value at x = 1..n. Any t shares give it back by
Lagrange interpolation at 0; any t − 1 shares are consistent with every secret (each
candidate secret has exactly one polynomial through them), so they reveal nothing.
p is a Mersenne prime larger than any 64-byte secret, so every secret is a field element.
"""

from __future__ import annotations

import secrets
from typing import Callable, Sequence

PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # ceil(521 / 8)

Share = tuple[int, int]  # (x, y)


class ShamirError(ValueError):
    """Too few, duplicate or inconsistent shares, or bad parameters."""


def _rand_below(p: int) -> int:
    return secrets.randbelow(p)


def split(secret: bytes, n: int, t: int, rand: Callable[[int], int] = _rand_below) -> list[Share]:
    """n shares (x = 1..n) of `secret`, any t of which reconstruct it."""
    if not (isinstance(t, int) and isinstance(n, int) and 1 <= t <= n):
        raise ShamirError(f"need 1 ≤ t ≤ n, got t={t}, n={n}")
    if len(secret) > 64:
        raise ShamirError(f"a secret of {len(secret)} bytes is too long (64 at most)")
    coeffs = [int.from_bytes(secret, "big")] + [rand(PRIME) for _ in range(t - 1)]
    out = []
    for x in range(1, n + 1):
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        out.append((x, y))
    return out


def interpolate_at(shares: Sequence[Share], x0: int) -> int:
    """The value at x0 of the polynomial of degree < len(shares) through `shares`."""
    xs = [x for x, _ in shares]
    if len(set(xs)) != len(xs):
        raise ShamirError(f"duplicate share positions: {sorted(xs)}")
    total = 0
    for i, (xi, yi) in enumerate(shares):
        num, den = 1, 1
        for j, (xj, _) in enumerate(shares):
            if i != j:
                num = num * (x0 - xj) % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    return total


def combine(shares: Sequence[Share], t: int, length: int) -> bytes:
    """The `length`-byte secret from at least t shares.

    Fewer than t is an error (they determine nothing). Shares beyond the first t must lie
    on the same polynomial, else an error: a wrong share is caught, not silently used.
    """
    if len(shares) < t:
        raise ShamirError(f"{len(shares)} share(s) cannot reconstruct a secret shared with threshold {t}")
    for x, y in shares:
        if not (0 < x < PRIME and 0 <= y < PRIME):
            raise ShamirError(f"share ({x}, …) is not a field element")
    base = list(shares[:t])
    for x, y in shares[t:]:
        if interpolate_at(base, x) != y:
            raise ShamirError(f"share at x={x} is inconsistent with the others")
    secret = interpolate_at(base, 0)
    if secret >= 1 << (8 * length):
        raise ShamirError(f"the shares reconstruct no {length}-byte secret (wrong or mixed shares)")
    return secret.to_bytes(length, "big")


def share_bytes(y: int) -> bytes:
    return y.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(data: bytes) -> int:
    if len(data) != SHARE_BYTES:
        raise ShamirError(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
    y = int.from_bytes(data, "big")
    if y >= PRIME:
        raise ShamirError("a share is not a field element")
    return y
