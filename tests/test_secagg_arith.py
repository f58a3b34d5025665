"""Secure aggregation's arithmetic (tiesfed.core.secagg), no crypto: the ring sums of fixed-point
lanes decode to exactly the accumulator a plain float64 `fold` of the same quantised values gives,
for every sum-based FinalizeSpec; the plain (unquantised) round within the stated tolerance; the
ring width from the public bounds; Shamir t-of-n."""

from __future__ import annotations

import dataclasses
import itertools
import random

import numpy as np
import pytest
import torch

from tiesfed.core.accumulators import FinalizeSpec, fold, new_accumulator
from tiesfed.core.secagg import (
    FixedPoint,
    RingError,
    RingLayout,
    ShamirError,
    combine,
    decode_sums,
    encode_lanes,
    pack_support,
    quantise,
    quantise_weight,
    release_support,
    ring_add,
    ring_sub,
    secure_finalize,
    split,
    union_support,
    unpack_support,
)
from tiesfed.core.secagg.encode import dequantise, weight_value
from tiesfed.core.secagg.shamir import PRIME, interpolate_at

NUMEL = 4000
SPECS = {
    "ties": FinalizeSpec(),
    "ties-min-support": FinalizeSpec(min_support=2),
    "count-election": FinalizeSpec(election="count"),
    "positive-zero-sign": FinalizeSpec(zero_sign="positive"),
    "mergekit-weighted": FinalizeSpec(weighted=True),
    "peft-weighted": FinalizeSpec(weighted=True, weight_semantics="peft"),
    "disjoint-sum": FinalizeSpec(disjoint="sum"),
    "task-arithmetic": FinalizeSpec(combine="sum"),
    "average": FinalizeSpec(combine="average", weighted=True),
}


def clients(n: int, seed: int = 0, density: float = 0.2, scale: float = 0.05):
    """n sparse contributions (sorted indices, float32 values) with overlapping supports."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.rand(NUMEL, generator=g) < density
        idx = torch.nonzero(mask).reshape(-1)
        val = (torch.randn(idx.numel(), generator=g) * scale).to(torch.float32)
        val[val == 0] = 1e-3
        out.append((idx, val))
    return out


def secure_sum(contribs, weights, spec, fixed):
    """The unmasked ring sum over U (what the protocol's unmasking leaves), decoded."""
    layout = RingLayout.of(spec, fixed)
    q = [quantise(i, v, fixed) for i, v in contribs]
    u = union_support([i for i, _ in q])
    total = np.zeros(layout.width * u.numel(), dtype=np.uint64)
    qws = [quantise_weight(w, layout) for w in weights]
    for (i, qv), qw in zip(q, qws):
        ring_add(total, encode_lanes(i, qv, qw, u, layout), layout)
    return decode_sums(total, u, NUMEL, spec, layout, qws), layout, q, qws


def plain_fold(pairs, weights, spec):
    acc = new_accumulator(NUMEL, spec)
    for (i, v), w in zip(pairs, weights):
        fold(acc, i, v, w)
    return acc


@pytest.mark.parametrize("name,negative", [(k, False) for k in SPECS] + [(k, True) for k, v in SPECS.items() if v.weighted])
def test_secure_sums_equal_fold_of_quantised_values_bit_for_bit(name, negative):
    """Every sum-based spec; weighted ones also with a negative weight (mergekit allows them)."""
    spec = SPECS[name]
    n = 5
    contribs = clients(n, seed=1)
    weights = [0.5, -0.6 if negative else 1.0, 0.75, 0.3, 0.9] if spec.weighted else [1.0] * n
    fixed = FixedPoint(bound=1.0, max_clients=8, frac_bits=20)
    acc, layout, q, qws = secure_sum(contribs, weights, spec, fixed)
    ref = plain_fold([(i, dequantise(qv, fixed)) for i, qv in q], [weight_value(w, layout) for w in qws], spec)
    assert ref.exact and acc.exact
    for field, t in ref.tensors().items():
        assert torch.equal(getattr(acc, field), t), field
    assert acc.contributions == ref.contributions == n
    assert acc.weight_total == ref.weight_total
    merged = secure_finalize(acc, spec)
    assert torch.equal(merged, secure_finalize(ref, spec))
    assert merged.abs().sum() > 0


def test_plain_round_within_stated_tolerance():
    """Each value moves by at most 2^-(f+1); a mean of moved values moves no more. Where the
    election agrees (all but near-ties, |S⁺+S⁻| ≤ n·2^-(f+1)), |secure − plain| ≤ 2^-(f+1)
    (+ float32 rounding of the output)."""
    spec, n = FinalizeSpec(), 5
    fixed = FixedPoint(bound=1.0, max_clients=n, frac_bits=24)
    contribs = clients(n, seed=2)
    acc, *_ = secure_sum(contribs, [1.0] * n, spec, fixed)
    secure = secure_finalize(acc, spec)
    plain_acc = plain_fold(contribs, [1.0] * n, spec)
    plain = secure_finalize(plain_acc, spec)
    same = torch.sign(secure) == torch.sign(plain)
    assert int((~same).sum()) == 0
    tol = 2.0 ** -(fixed.frac_bits + 1) + 2.0 ** -24 * plain.abs()
    assert bool(((secure.double() - plain.double()).abs() <= tol.double()).all())
    assert not torch.equal(secure, plain)  # the quantisation is real: the claim is a tolerance, not equality


def test_ring_width_from_public_bounds():
    # 50 clients × 2^24 (|τ| ≤ 1 at 24 bits) < 2^30, counts need 6 bits, one sign bit: 37 → 40 bits
    lay = RingLayout.of(FinalizeSpec(), FixedPoint(bound=1.0, max_clients=50, frac_bits=24))
    assert (lay.bits, lay.count_bits, lay.width) == (40, 6, 2)
    assert [x.name for x in RingLayout.of(FinalizeSpec(weighted=True), FixedPoint(1.0, 5)).lanes] == \
        ["pos", "neg", "wpos", "wneg"]
    assert RingLayout.of(FinalizeSpec(combine="sum"), FixedPoint(1.0, 5)).count_bits == 0
    with pytest.raises(RingError, match="2\\^53"):
        RingLayout.of(FinalizeSpec(), FixedPoint(bound=1e6, max_clients=1000, frac_bits=40))
    with pytest.raises(RingError, match="not sums"):
        RingLayout.of(FinalizeSpec(disjoint="max"), FixedPoint(1.0, 5))
    with pytest.raises(RingError, match="positive finite"):
        FixedPoint(bound=float("inf"), max_clients=5)


def test_value_beyond_bound_is_an_error_not_a_wrap():
    fixed = FixedPoint(bound=0.5, max_clients=4)
    with pytest.raises(RingError, match="exceed the round's public bound"):
        quantise(torch.tensor([1, 2]), torch.tensor([0.1, -0.7]), fixed)
    with pytest.raises(RingError, match="finite"):
        quantise(torch.tensor([1]), torch.tensor([float("nan")]), fixed)
    with pytest.raises(RingError, match="sorted"):
        quantise(torch.tensor([2, 1]), torch.tensor([0.1, 0.2]), fixed)
    lay = RingLayout.of(FinalizeSpec(weighted=True), fixed)
    with pytest.raises(RingError, match="weight"):
        quantise_weight(3.0, lay)
    with pytest.raises(RingError, match="not weighted"):
        quantise_weight(0.5, RingLayout.of(FinalizeSpec(), fixed))
    # the extreme admissible sums (every client at ±bound) decode without wrapping
    n = fixed.max_clients
    lay = RingLayout.of(FinalizeSpec(), fixed)
    idx = torch.tensor([0, 1])
    total = np.zeros(2 * 2, dtype=np.uint64)
    for _ in range(n):
        i, q = quantise(idx, torch.tensor([0.5, -0.5]), fixed)
        ring_add(total, encode_lanes(i, q, 1, idx, lay), lay)
    acc = decode_sums(total, idx, 2, FinalizeSpec(), lay, [1] * n)
    assert acc.s_pos.tolist() == [0.5 * n, 0.0] and acc.s_neg.tolist() == [0.0, -0.5 * n]
    assert acc.c_pos.tolist() == [n, 0] and acc.c_neg.tolist() == [0, n]


def test_quantised_zeros_drop_out_and_outside_support_is_refused():
    fixed = FixedPoint(bound=1.0, max_clients=3, frac_bits=8)
    i, q = quantise(torch.tensor([3, 5, 9]), torch.tensor([1e-4, 0.5, -0.25]), fixed)
    assert i.tolist() == [5, 9] and q.tolist() == [128, -64]
    lay = RingLayout.of(FinalizeSpec(), fixed)
    with pytest.raises(RingError, match="outside the union support"):
        encode_lanes(i, q, 1, torch.tensor([5, 7]), lay)


def test_ring_masks_cancel_and_bytes_round_trip():
    lay = RingLayout.of(FinalizeSpec(), FixedPoint(1.0, 20, frac_bits=24))
    rng = np.random.default_rng(0)
    x = lay.to_ring(rng.integers(-2**30, 2**30, size=1000))
    mask = lay.reduce(rng.integers(0, 2**63, size=1000, dtype=np.uint64) * np.uint64(2))
    y = ring_add(x.copy(), mask, lay)
    assert not np.array_equal(y, x)
    assert np.array_equal(ring_sub(y, mask, lay), x)
    assert np.array_equal(lay.from_bytes(lay.to_bytes(x), 1000), x)
    assert len(lay.to_bytes(x)) == 1000 * lay.bits // 8
    with pytest.raises(RingError, match="bytes"):
        lay.from_bytes(lay.to_bytes(x)[:-1], 1000)


@pytest.mark.parametrize("bits", [8, 16, 24, 32, 40, 48, 56, 64])
def test_ring_bytes_are_little_endian_low_bytes_at_every_width(bits):
    """Word widths take a one-cast path: the same bytes as slicing each element's low b/8 bytes."""
    lay = dataclasses.replace(RingLayout.of(FinalizeSpec(), FixedPoint(1.0, 20, frac_bits=24)), bits=bits)
    x = lay.reduce(np.random.default_rng(bits).integers(0, 2**64 - 1, size=777, dtype=np.uint64, endpoint=True))
    data = lay.to_bytes(x)
    assert data == x.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :bits // 8].tobytes()
    y = lay.from_bytes(data, x.size)
    assert y.dtype == np.uint64 and np.array_equal(y, x)


@pytest.mark.parametrize("bits", [24, 32, 64])
def test_ring_file_folds_wire_bytes_as_the_ring_does(bits, tmp_path):
    """`RingFile.apply_wire` (in place on the stored words for 32/64-bit rings, through uint64
    arrays otherwise) gives what `ring_add`/`ring_sub` give, from any start."""
    from tiesfed.trust.secagg.ringfile import RingFile

    lay = dataclasses.replace(RingLayout.of(FinalizeSpec(), FixedPoint(1.0, 20, frac_bits=24)), bits=bits)
    rng = np.random.default_rng(bits)
    draw = lambda n: lay.reduce(rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True))  # noqa: E731
    ring, want = RingFile(1000, lay, tmp_path), np.zeros(1000, dtype=np.uint64)
    for start, n, op in ((0, 1000, ring_add), (10, 500, ring_add), (300, 700, ring_sub), (999, 1, ring_sub)):
        x = draw(n)
        ring.apply_wire(start, memoryview(lay.to_bytes(x)), op)
        want[start:start + n] = op(want[start:start + n].copy(), x, lay)
        assert np.array_equal(ring.read(0, 1000), want)
    with pytest.raises(ValueError, match="outside"):
        ring.apply_wire(999, lay.to_bytes(draw(2)), ring_add)
    ring.close()


def test_support_bitmap_round_trip_and_union():
    a, b = torch.tensor([0, 5, 9]), torch.tensor([5, 6, 99])
    assert torch.equal(unpack_support(pack_support(a, 100), 100), a)
    assert union_support([a, b]).tolist() == [0, 5, 6, 9, 99]
    assert release_support([a, b], 2, 100).tolist() == [5]
    assert release_support([a, b, b], 2, 100).tolist() == [5, 6, 99]
    assert torch.equal(release_support([a, b], 1, 100), union_support([a, b]))
    with pytest.raises(RingError):
        unpack_support(pack_support(a, 100), 200)
    with pytest.raises(RingError):
        pack_support(torch.tensor([100]), 100)


SECRET = bytes(range(32))


def test_shamir_any_t_shares_reconstruct():
    shares = split(SECRET, 5, 3)
    for subset in itertools.combinations(shares, 3):
        assert combine(list(subset), 3, 32) == SECRET
    assert combine(shares, 3, 32) == SECRET  # all five, the extra two checked for consistency


def test_shamir_below_threshold_fails_and_reveals_nothing():
    shares = split(SECRET, 5, 3)
    with pytest.raises(ShamirError, match="threshold 3"):
        combine(shares[:2], 3, 32)
    # two shares are consistent with every secret: for any candidate there is a degree-2
    # polynomial through them with that constant term (so each candidate is equally likely)
    for candidate in (b"\x00" * 32, b"\xff" * 32, bytes(random.Random(1).randbytes(32))):
        fake = [(0, int.from_bytes(candidate, "big"))] + shares[:2]
        third = (4, interpolate_at(fake, 4))
        assert combine(shares[:2] + [third], 3, 32) == candidate


def test_shamir_wrong_share_is_caught():
    shares = split(SECRET, 5, 3)
    bad = shares[:4] + [(shares[4][0], (shares[4][1] + 1) % PRIME)]
    with pytest.raises(ShamirError, match="inconsistent"):
        combine(bad, 3, 32)
    with pytest.raises(ShamirError, match="duplicate"):
        combine([shares[0], shares[0], shares[1]], 3, 32)
    with pytest.raises(ShamirError):
        split(SECRET, 3, 4)
