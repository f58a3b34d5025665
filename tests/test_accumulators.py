"""The accumulator algebra: fold/unfold/combine exactness and hand-computed merges."""

import pytest
import torch

from tiesfed.core.accumulators import (
    FinalizeSpec,
    combine,
    elect,
    finalize,
    fold,
    majority_sign,
    new_accumulator,
    range_balance,
    sign_balance,
    tie_mask,
    unfold,
)


def _contrib(n, seed, density=0.3):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, generator=g) < density
    idx = torch.nonzero(mask).reshape(-1)
    return idx, torch.randn(idx.numel(), generator=g)


SPECS = [
    FinalizeSpec(),
    FinalizeSpec(election="count"),
    FinalizeSpec(disjoint="sum"),
    FinalizeSpec(disjoint="max"),
    FinalizeSpec(weighted=True),
    FinalizeSpec(weighted=True, weight_semantics="peft"),
    FinalizeSpec(combine="sum", weighted=True),
    FinalizeSpec(combine="average"),
]


def _fold_all(spec, contribs, order):
    acc = new_accumulator(500, spec)
    for i in order:
        fold(acc, *contribs[i], weight=[1.0, 2.0, 0.5, 1.0][i])
    return acc


@pytest.mark.parametrize("spec", SPECS)
def test_order_free_and_combine(spec):
    contribs = [_contrib(500, s) for s in range(4)]
    a = _fold_all(spec, contribs, [0, 1, 2, 3])
    b = _fold_all(spec, contribs, [3, 1, 0, 2])
    for name, t in a.tensors().items():
        assert torch.equal(t, getattr(b, name)), name
    left = new_accumulator(500, spec)
    right = new_accumulator(500, spec)
    for i, c in enumerate(contribs):
        fold(left if i < 2 else right, *c, weight=[1.0, 2.0, 0.5, 1.0][i])
    c = combine(left, right)
    assert torch.equal(finalize(c, spec), finalize(a, spec))
    assert c.contributions == 4


@pytest.mark.parametrize("spec", [s for s in SPECS if s.invertible])
def test_unfold_is_exact_inverse(spec):
    contribs = [_contrib(500, s) for s in range(3)]
    acc = new_accumulator(500, spec)
    fold(acc, *contribs[0])
    snapshot = {k: v.clone() for k, v in acc.tensors().items()}
    fold(acc, *contribs[1], weight=2.0)
    fold(acc, *contribs[2])
    unfold(acc, *contribs[2])
    unfold(acc, *contribs[1], weight=2.0)
    for k, v in acc.tensors().items():
        assert torch.equal(v, snapshot[k]), k
    assert acc.contributions == 1


def test_max_refuses_unfold():
    spec = FinalizeSpec(disjoint="max")
    acc = new_accumulator(10, spec)
    fold(acc, torch.tensor([1]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="not invertible"):
        unfold(acc, torch.tensor([1]), torch.tensor([1.0]))


def _acc(spec, rows, weights=None):
    n = len(rows[0])
    acc = new_accumulator(n, spec)
    for i, r in enumerate(rows):
        t = torch.tensor(r, dtype=torch.float32)
        idx = torch.nonzero(t).reshape(-1)
        fold(acc, idx, t[idx], weight=1.0 if weights is None else weights[i])
    return acc


def test_hand_computed_ties_mean():
    # p0: +1,+3,-1 -> mass +3 -> mean(1,3)=2 ; p1: -2,+1 -> mass -1 -> -2 ; p2: nobody -> 0
    acc = _acc(FinalizeSpec(), [[1, -2, 0], [3, 1, 0], [-1, 0, 0]])
    assert finalize(acc, FinalizeSpec()).tolist() == [2.0, -2.0, 0.0]


def test_gamma_zero_majority_rule():
    spec = FinalizeSpec(election="count")
    # p0: +1 vs -4: count tie; p1,p2: positive -> model-wide majority +1 -> p0 takes +1
    acc = _acc(spec, [[1, 1, 2], [-4, 0, 0]])
    gamma = elect(acc, spec)
    assert gamma.tolist() == [0, 1, 1]
    assert tie_mask(acc, gamma).tolist() == [True, False, False]
    maj = majority_sign(sign_balance(gamma))
    assert maj == 1
    assert finalize(acc, spec, maj).tolist() == [1.0, 1.0, 2.0]
    assert finalize(acc, spec, -1).tolist() == [-4.0, 1.0, 2.0]
    pos = FinalizeSpec(election="count", zero_sign="positive")
    assert finalize(acc, pos, -1).tolist() == [1.0, 1.0, 2.0]
    assert finalize(acc, spec, 0).tolist() == [0.0, 1.0, 2.0]  # perfectly balanced model


def test_weights_mergekit_vs_peft():
    rows, w = [[1.0], [2.0], [-2.5]], [1.0, 1.0, 2.0]
    mk = FinalizeSpec(weighted=True)
    # mergekit: weighted mass 1+2-5 = -2 -> negative; mean = -5 / 2 = -2.5
    assert finalize(_acc(mk, rows, w), mk).tolist() == [-2.5]
    peft = FinalizeSpec(weighted=True, weight_semantics="peft")
    # peft: unweighted mass 0.5 -> positive; (1*1 + 1*2) / count 2 = 1.5
    assert finalize(_acc(peft, rows, w), peft).tolist() == [1.5]


def test_disjoint_max_sum_and_min_support():
    rows = [[1.0, -1.0], [3.0, 0.0], [-1.0, 0.0]]
    assert finalize(_acc(FinalizeSpec(disjoint="max"), rows), FinalizeSpec(disjoint="max")).tolist() == [3.0, -1.0]
    assert finalize(_acc(FinalizeSpec(disjoint="sum"), rows), FinalizeSpec(disjoint="sum")).tolist() == [4.0, -1.0]
    ms = FinalizeSpec(min_support=2)
    assert finalize(_acc(ms, rows), ms).tolist() == [2.0, 0.0]


def test_task_arithmetic_and_average():
    rows, w = [[1.0, 0.0], [3.0, -2.0]], [1.0, 3.0]
    assert finalize(_acc(FinalizeSpec(combine="sum", weighted=True), rows, w), FinalizeSpec(combine="sum")).tolist() == [10.0, -6.0]
    avg = FinalizeSpec(combine="average", weighted=True)
    assert finalize(_acc(avg, rows, w), avg).tolist() == [2.5, -1.5]


def test_counts_do_not_overflow_past_65535():
    spec = FinalizeSpec()
    acc = new_accumulator(2, spec)
    idx = torch.tensor([0])
    one = torch.tensor([1.0])
    for _ in range(70_000):
        fold(acc, idx, one)
    assert int(acc.c_pos[0]) == 70_000
    assert finalize(acc, spec).tolist() == [1.0, 0.0]


@pytest.mark.parametrize("zero_sign", ["majority", "positive"])
@pytest.mark.parametrize("majority", [-1, 0, 1])
@pytest.mark.parametrize("sum_dtype", [torch.float64, torch.float32])
def test_fast_finalize_path_gives_the_general_bits(zero_sign, majority, sum_dtype):
    """The common case (mass vote, unweighted mean) skips the int8 sign tensor; with exact
    mass ties (+x and -x), untouched parameters and each zero-sign rule it gives the same
    bits as the general path (taken when `gamma` is passed in)."""
    spec = FinalizeSpec(zero_sign=zero_sign, sum_dtype=sum_dtype)
    contribs = [_contrib(500, s) for s in range(3)]
    tie_idx = torch.arange(0, 500, 9)
    tie_val = torch.linspace(0.5, 2.0, tie_idx.numel())
    contribs += [(tie_idx, tie_val), (tie_idx, -tie_val)]
    acc = new_accumulator(500, spec)
    for idx, val in contribs:
        fold(acc, idx, val)
    gamma = elect(acc, spec)
    assert bool((gamma == 0).any() & tie_mask(acc, gamma).any())  # real ties, decided by the rule
    fast = finalize(acc, spec, majority)
    general = finalize(acc, spec, majority, gamma=gamma)
    assert fast.dtype == torch.float32 and torch.equal(fast, general)


@pytest.mark.parametrize("spec", SPECS)
def test_range_balance_is_the_sign_balance_of_the_vote(spec):
    contribs = [_contrib(500, s) for s in range(4)]
    tie_idx = torch.arange(0, 500, 7)
    contribs += [(tie_idx, torch.ones(tie_idx.numel())), (tie_idx, -torch.ones(tie_idx.numel()))]
    acc = new_accumulator(500, spec)
    for i, (idx, val) in enumerate(contribs):
        fold(acc, idx, val, weight=[1.0, 2.0, 0.5, 1.0, 1.0, 1.0][i] if spec.weighted else 1.0)
    assert range_balance(acc, spec) == sign_balance(elect(acc, spec))
