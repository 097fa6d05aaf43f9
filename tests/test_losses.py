"""Losses against hand computations (explicit loops over Python floats) and gradchecks."""

from __future__ import annotations

import math

import pytest
import torch

from metassl.losses import barlow_twins_loss, byol_loss, moco_infonce, nt_xent, simsiam_loss, vicreg_loss
from metassl.losses import distributed as D


# -- tiny helpers on lists of floats (deliberately not torch) ------------------------------
def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def unit(a):
    n = math.sqrt(dot(a, a))
    return [x / n for x in a]


def rows(t: torch.Tensor):
    return [[float(v) for v in r] for r in t]


def mean(xs):
    return sum(xs) / len(xs)


def randn(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


# -- references ----------------------------------------------------------------------------
def ref_nt_xent(z1, z2, t):
    n = len(z1)
    zs = [unit(v) for v in z1] + [unit(v) for v in z2]
    total = 0.0
    for i in range(2 * n):
        pos = i + n if i < n else i - n
        denom = sum(math.exp(dot(zs[i], zs[k]) / t) for k in range(2 * n) if k != i)
        total += -(dot(zs[i], zs[pos]) / t - math.log(denom))
    return total / (2 * n)


def ref_moco(q, k, queue, t):
    total = 0.0
    for qi, ki in zip(q, k):
        qi, ki = unit(qi), unit(ki)
        pos = math.exp(dot(qi, ki) / t)
        neg = sum(math.exp(dot(qi, kj) / t) for kj in queue)
        total += -math.log(pos / (pos + neg))
    return total / len(q)


def ref_cos(a, b):
    return dot(a, b) / math.sqrt(dot(a, a) * dot(b, b))


def standardise(z, eps):
    n, d = len(z), len(z[0])
    out = [[0.0] * d for _ in range(n)]
    for j in range(d):
        col = [z[i][j] for i in range(n)]
        m = mean(col)
        var = sum((c - m) ** 2 for c in col) / n  # biased, as batch norm
        for i in range(n):
            out[i][j] = (z[i][j] - m) / math.sqrt(var + eps)
    return out


def ref_barlow(z1, z2, lambd, eps=1e-5):
    a, b = standardise(z1, eps), standardise(z2, eps)
    n, d = len(a), len(a[0])
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[k][i] * b[k][j] for k in range(n)) / n
            loss += (1 - c) ** 2 if i == j else lambd * c**2
    return loss


def ref_vicreg(z1, z2, sw, vw, cw, eps):
    n, d = len(z1), len(z1[0])
    inv = sum((z1[i][j] - z2[i][j]) ** 2 for i in range(n) for j in range(d)) / (n * d)

    def var_term(z):
        s = 0.0
        for j in range(d):
            col = [z[i][j] for i in range(n)]
            m = mean(col)
            var = sum((c - m) ** 2 for c in col) / (n - 1)
            s += max(0.0, 1 - math.sqrt(var + eps))
        return s / d

    def cov_term(z):
        means = [mean([z[i][j] for i in range(n)]) for j in range(d)]
        s = 0.0
        for j in range(d):
            for k in range(d):
                if j != k:
                    c = sum((z[i][j] - means[j]) * (z[i][k] - means[k]) for i in range(n)) / (n - 1)
                    s += c**2
        return s / d

    return sw * inv + vw * (var_term(z1) + var_term(z2)) / 2 + cw * (cov_term(z1) + cov_term(z2))


# -- NT-Xent -------------------------------------------------------------------------------
def test_nt_xent_closed_form():
    # orthogonal unit vectors, identical views, t = 1: every anchor sees its positive at
    # similarity 1 and two negatives at similarity 0 -> loss = log(1 + 2/e)
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert nt_xent(z, z.clone(), 1.0).item() == pytest.approx(math.log(1 + 2 / math.e), rel=1e-12)


def test_nt_xent_matches_loops_and_is_scale_invariant():
    z1, z2 = randn(5, 3, seed=1), randn(5, 3, seed=2)
    ref = ref_nt_xent(rows(z1), rows(z2), 0.3)
    assert nt_xent(z1, z2, 0.3).item() == pytest.approx(ref, rel=1e-10)
    assert nt_xent(3 * z1, 0.5 * z2, 0.3).item() == pytest.approx(ref, rel=1e-10)  # normalised inside
    # symmetric in the two views
    assert nt_xent(z2, z1, 0.3).item() == pytest.approx(ref, rel=1e-10)


def test_nt_xent_gradcheck():
    z1, z2 = randn(4, 3, seed=3).requires_grad_(), randn(4, 3, seed=4).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: nt_xent(a, b, 0.5), (z1, z2))


# -- MoCo InfoNCE ----------------------------------------------------------------------------
def test_moco_closed_form():
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    # logits [1, 0, -1] with the positive first
    expected = -math.log(math.e / (math.e + 1 + math.exp(-1)))
    assert moco_infonce(q, q.clone(), queue, 1.0).item() == pytest.approx(expected, rel=1e-12)


def test_moco_matches_loops_and_detaches_keys():
    q, k = randn(4, 3, seed=5), randn(4, 3, seed=6)
    queue = torch.nn.functional.normalize(randn(7, 3, seed=7), dim=1)
    ref = ref_moco(rows(q), rows(k), rows(queue), 0.2)
    assert moco_infonce(q, k, queue, 0.2).item() == pytest.approx(ref, rel=1e-10)
    k.requires_grad_()
    queue.requires_grad_()
    moco_infonce(q.requires_grad_(), k, queue, 0.2).backward()
    assert k.grad is None and queue.grad is None and q.grad is not None


def test_moco_gradcheck():
    q = randn(3, 4, seed=8).requires_grad_()
    k = randn(3, 4, seed=9)
    queue = torch.nn.functional.normalize(randn(5, 4, seed=10), dim=1)
    assert torch.autograd.gradcheck(lambda a: moco_infonce(a, k, queue, 0.2), (q,))


# -- BYOL / SimSiam ------------------------------------------------------------------------
def test_cosine_losses_closed_form():
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    z = torch.tensor([[0.0, 2.0], [3.0, 3.0]], dtype=torch.float64)
    # cosines 0 and 1: BYOL (2-0 + 2-2)/2 = 1; SimSiam -(0 + 1)/2 = -0.5
    assert byol_loss(p, z).item() == pytest.approx(1.0, abs=1e-12)
    assert simsiam_loss(p, z).item() == pytest.approx(-0.5, abs=1e-12)


def test_cosine_losses_match_loops_and_stop_gradient():
    p, z = randn(5, 4, seed=11), randn(5, 4, seed=12)
    cos = [ref_cos(a, b) for a, b in zip(rows(p), rows(z))]
    assert byol_loss(p, z).item() == pytest.approx(mean([2 - 2 * c for c in cos]), rel=1e-10)
    assert simsiam_loss(p, z).item() == pytest.approx(-mean(cos), rel=1e-10)
    for fn in (byol_loss, simsiam_loss):
        pp, zz = p.clone().requires_grad_(), z.clone().requires_grad_()
        fn(pp, zz).backward()
        assert zz.grad is None and pp.grad is not None


def test_cosine_losses_gradcheck():
    p, z = randn(3, 4, seed=13).requires_grad_(), randn(3, 4, seed=14)
    assert torch.autograd.gradcheck(lambda a: byol_loss(a, z), (p,))
    assert torch.autograd.gradcheck(lambda a: simsiam_loss(a, z), (p,))


# -- Barlow Twins ----------------------------------------------------------------------------
def test_barlow_twins_closed_form():
    # identical views with two perfectly decorrelated standardised dimensions: C = I -> 0
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    assert barlow_twins_loss(z, z.clone(), eps=0.0).item() == pytest.approx(0.0, abs=1e-12)
    # two identical dimensions: C = [[1, 1], [1, 1]] -> lambda * 2
    z2 = torch.tensor([[1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    assert barlow_twins_loss(z2, z2.clone(), lambd=0.25, eps=0.0).item() == pytest.approx(0.5, abs=1e-12)


def test_barlow_twins_matches_loops():
    z1, z2 = randn(6, 4, seed=15), randn(6, 4, seed=16) + 2.0
    ref = ref_barlow(rows(z1), rows(z2), 5e-3)
    assert barlow_twins_loss(z1, z2).item() == pytest.approx(ref, rel=1e-10)
    assert barlow_twins_loss(z1, z2, lambd=0.3).item() == pytest.approx(ref_barlow(rows(z1), rows(z2), 0.3), rel=1e-10)


def test_barlow_twins_gradcheck():
    z1, z2 = randn(5, 3, seed=17).requires_grad_(), randn(5, 3, seed=18).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: barlow_twins_loss(a, b, lambd=0.1), (z1, z2))


# -- VICReg ------------------------------------------------------------------------------------
def test_vicreg_closed_form():
    # identical views, both dims with unbiased std sqrt(4/3) > 1 and zero covariance: loss = 0
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    assert vicreg_loss(z, z.clone(), eps=0.0).item() == pytest.approx(0.0, abs=1e-12)
    # collapsed views: std 0 -> variance hinge 1 per branch; invariance mean((1-0)^2) = 1
    ones, zeros = torch.ones(3, 2, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64)
    assert vicreg_loss(ones, zeros, 2.0, 3.0, 1.0, eps=0.0).item() == pytest.approx(2.0 * 1 + 3.0 * 1, abs=1e-12)


def test_vicreg_matches_loops():
    z1, z2 = randn(6, 4, seed=19, scale=0.7), randn(6, 4, seed=20, scale=1.5)
    for w in [(25.0, 25.0, 1.0), (1.0, 2.0, 3.0)]:
        ref = ref_vicreg(rows(z1), rows(z2), *w, 1e-4)
        assert vicreg_loss(z1, z2, *w).item() == pytest.approx(ref, rel=1e-10)


def test_vicreg_gradcheck():
    # small scale keeps every std below 1, away from the hinge's kink
    z1, z2 = randn(5, 3, seed=21, scale=0.3).requires_grad_(), randn(5, 3, seed=22, scale=0.3).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: vicreg_loss(a, b), (z1, z2))


# -- shared behaviour ------------------------------------------------------------------------
ALL = {
    "nt_xent": lambda a, b: nt_xent(a, b, 0.5),
    "moco": lambda a, b: moco_infonce(a, b, torch.nn.functional.normalize(torch.ones(3, a.shape[1]), dim=1), 0.2),
    "byol": byol_loss,
    "simsiam": simsiam_loss,
    "barlow_twins": barlow_twins_loss,
    "vicreg": vicreg_loss,
}


@pytest.mark.parametrize("name", sorted(ALL))
def test_half_precision_inputs_are_computed_in_float32(name):
    a, b = torch.randn(8, 6), torch.randn(8, 6)
    full = ALL[name](a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = ALL[name](a.bfloat16(), b.bfloat16())
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(full.item(), rel=0.05, abs=0.05)


@pytest.mark.parametrize("name", sorted(ALL))
def test_shape_mismatch_is_one_clear_error(name):
    with pytest.raises(ValueError):
        ALL[name](torch.randn(4, 3), torch.randn(5, 3))


def test_collectives_are_identity_without_process_group():
    x = torch.randn(3, 2, requires_grad=True)
    assert D.world_size() == 1 and D.rank() == 0 and not D.is_distributed()
    for fn in (D.gather_with_grad, D.all_reduce_sum, D.all_reduce_mean):
        assert fn(x) is x
    assert torch.equal(D.gather_no_grad(x), x) and not D.gather_no_grad(x).requires_grad
