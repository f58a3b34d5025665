"""TRIM: the streamed global threshold equals torch.kthvalue on the flattened
model; the per-tensor trim keeps exactly int(k·n) with a deterministic tie rule."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiesfed.core import radix
from tiesfed.core.trim import (
    GlobalThreshold,
    keep_count,
    trim_dare,
    trim_tensor_exact,
    trim_threshold,
)


def _pieces(seed: int, sizes: list[int], ties: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in sizes:
        t = torch.randn(s, generator=g) * 10 ** torch.randint(-6, 3, (1,), generator=g).item()
        if ties:  # coarse values: many exact ties and zeros
            t = torch.round(t * 4) / 4
        out.append(t)
    return out


def _streamed(pieces: list[torch.Tensor], fraction: float) -> float:
    sel = GlobalThreshold(sum(p.numel() for p in pieces), fraction)
    if sel.trivial:
        return 0.0
    for p in pieces:
        sel.add_coarse(p)
    sel.close_coarse()
    for p in pieces:
        sel.add_fine(p)
    return sel.value


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    sizes=st.lists(st.integers(1, 400), min_size=1, max_size=6),
    fraction=st.floats(0.001, 1.0),
    ties=st.booleans(),
)
def test_global_threshold_is_paper_kthvalue(seed, sizes, fraction, ties):
    pieces = _pieces(seed, sizes, ties)
    flat = torch.cat(pieces)
    d = flat.numel()
    keep = int(d * fraction)
    got = _streamed(pieces, fraction)
    if keep >= d:
        assert got == 0.0
    else:
        want = flat.abs().kthvalue(d - keep).values.item()
        assert got == want
        kept = int((flat.abs() >= got).sum())
        assert kept >= keep  # ties at the threshold are kept, as in the paper's code


def test_threshold_keeps_ties_hand_case():
    tau = torch.tensor([3.0, -2.0, 2.0, 1.0])
    thr = _streamed([tau[:2], tau[2:]], 0.5)  # keep int(4*0.5)=2 -> threshold = 2nd smallest = 2
    assert thr == 2.0
    idx, val = trim_threshold(tau, thr)
    assert idx.tolist() == [0, 1, 2] and val.tolist() == [3.0, -2.0, 2.0]


def test_tensor_trim_exact_count_lower_index_wins_ties():
    tau = torch.tensor([3.0, -2.0, 2.0, 1.0, -2.0])
    idx, val = trim_tensor_exact(tau, 0.4)  # exactly 2
    assert idx.tolist() == [0, 1] and val.tolist() == [3.0, -2.0]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 2000), fraction=st.floats(0.0005, 1.0), ties=st.booleans())
def test_tensor_trim_matches_stable_sort(seed, n, fraction, ties):
    (tau,) = _pieces(seed, [n], ties)
    idx, val = trim_tensor_exact(tau, fraction)
    keep = keep_count(n, fraction)
    order = torch.sort(tau.abs(), descending=True, stable=True).indices[:keep]
    want = torch.sort(order).values
    want = want[tau[want] != 0]
    assert torch.equal(idx, want)
    assert torch.equal(val, tau[want])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 5000), fraction=st.floats(0.0005, 0.9999), ties=st.booleans())
def test_top_count_sorted_and_histogram_paths_agree(seed, n, fraction, ties):
    """Small tensors take a stable sort, large ones the histogram: the same indices, ties included."""
    (tau,) = _pieces(seed, [n], ties)
    keep = keep_count(n, fraction)
    if not 0 < keep < n:
        return
    bits = radix.abs_bits(tau)
    assert torch.equal(radix.top_count_sorted(bits, keep), radix.top_count_histogram(bits, keep))


def test_zeros_never_survive():
    tau = torch.zeros(10)
    tau[3] = 1.0
    for idx, _ in (trim_threshold(tau, 0.0), trim_tensor_exact(tau, 1.0), trim_tensor_exact(tau, 0.5)):
        assert idx.tolist() == [3]


def test_dare_is_seeded_and_rescaled():
    tau = torch.randn(10_000)
    a = trim_dare(tau, 0.3, seed=7)
    b = trim_dare(tau, 0.3, seed=7)
    c = trim_dare(tau, 0.3, seed=8)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    assert torch.allclose(a[1], tau[a[0]] / 0.3)
    assert 0.27 < a[0].numel() / 10_000 < 0.33
