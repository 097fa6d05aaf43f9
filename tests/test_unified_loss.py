"""MetAug's unified contrastive loss and margin injection (metassl.losses.unified)."""

from __future__ import annotations

import math

import pytest
import torch

from metassl.losses.unified import margin_injection_loss, rescaled_scores, unified_contrastive_loss

DT = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")

# cosine similarities of 2 anchors to one positive and three negatives
POS = [[0.8], [0.1]]
NEG = [[0.2, -0.4, 0.5], [0.3, 0.0, -0.9]]


def infonce_by_hand(pos, neg, tau):
    """-log(e^{p/t} / (e^{p/t} + sum_n e^{n/t})) per anchor, averaged: plain Python."""
    total = 0.0
    for p, ns in zip(pos, neg):
        num = math.exp(p[0] / tau)
        total += -math.log(num / (num + sum(math.exp(n / tau) for n in ns)))
    return total / len(pos)


@pytest.mark.parametrize("gamma", [4.0, 10.0, 16.0])
def test_one_positive_is_infonce_at_tau_two_over_gamma(gamma):
    pos, neg = torch.tensor(POS, dtype=DT), torch.tensor(NEG, dtype=DT)
    expected = infonce_by_hand(POS, NEG, 2.0 / gamma)
    assert float(unified_contrastive_loss(pos, neg, gamma, scale=1.0)) == pytest.approx(expected, rel=1e-12)
    # the official normalisation 16 / gamma is the default
    assert float(unified_contrastive_loss(pos, neg, gamma)) == pytest.approx(16.0 / gamma * expected, rel=1e-12)
    per_anchor = unified_contrastive_loss(pos, neg, gamma, scale=1.0, reduction="none")
    assert per_anchor.shape == (2,)
    assert float(per_anchor[0]) == pytest.approx(infonce_by_hand(POS[:1], NEG[:1], 2.0 / gamma), rel=1e-12)


def test_several_positives_by_hand():
    """log(1 + sum_n sum_p exp(gamma (s^_n - s^_p))): every positive and negative in one term."""
    pos, neg = [0.6, 0.9], [0.1, -0.3, 0.7]
    gamma = 6.0
    sh = lambda s: (s + 1) / 2
    expected = math.log(1 + sum(math.exp(gamma * (sh(n) - sh(p))) for n in neg for p in pos))
    got = unified_contrastive_loss(torch.tensor([pos], dtype=DT), torch.tensor([neg], dtype=DT), gamma, scale=1.0)
    assert float(got) == pytest.approx(expected, rel=1e-12)


def test_delta_margin_by_hand():
    """Official delta: positives scored as s^_p - (1 - m), negatives as s^_n - m."""
    gamma, m = 16.0, 0.25
    sh = lambda s: (s + 1) / 2
    expected = 0.0
    for p, ns in zip(POS, NEG):
        expected += math.log(1 + sum(math.exp(gamma * (sh(n) - m) - gamma * (sh(p[0]) - (1 - m))) for n in ns))
    expected /= len(POS)
    got = unified_contrastive_loss(torch.tensor(POS, dtype=DT), torch.tensor(NEG, dtype=DT), gamma, margin=m)
    assert float(got) == pytest.approx(expected, rel=1e-12)  # scale 16/16 = 1
    assert float(got) != pytest.approx(float(unified_contrastive_loss(torch.tensor(POS, dtype=DT), torch.tensor(NEG, dtype=DT), gamma)))


def test_gradient_matches_direct_formula_and_finite_differences():
    """d l / d s_n = sigmoid(A + B) softmax_n(g s^_n) g / 2, d l / d s_p = -sigmoid(A + B) softmax_p(-g s^_p) g / 2,
    A = logsumexp_n g s^_n, B = logsumexp_p -g s^_p (then the mean and the scale)."""
    g = torch.Generator().manual_seed(0)
    pos = (torch.rand(3, 2, generator=g, dtype=DT) * 2 - 1).requires_grad_(True)
    neg = (torch.rand(3, 5, generator=g, dtype=DT) * 2 - 1).requires_grad_(True)
    gamma, scale = 5.0, 1.7
    loss = unified_contrastive_loss(pos, neg, gamma, scale=scale)
    gp, gn = torch.autograd.grad(loss, [pos, neg])
    with torch.no_grad():
        ln, lp = gamma * rescaled_scores(neg), -gamma * rescaled_scores(pos)
        sig = torch.sigmoid(torch.logsumexp(ln, 1) + torch.logsumexp(lp, 1))[:, None]
        direct_n = sig * torch.softmax(ln, 1) * gamma / 2 * scale / 3
        direct_p = -sig * torch.softmax(lp, 1) * gamma / 2 * scale / 3
    torch.testing.assert_close(gn, direct_n, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gp, direct_p, rtol=1e-12, atol=1e-14)
    mask = torch.rand(3, 5, generator=g) > 0.3
    assert torch.autograd.gradcheck(lambda p, n: unified_contrastive_loss(p, n, gamma, 0.3, neg_mask=mask), (pos, neg))


def test_masked_pairs_are_left_out():
    pos, neg = torch.tensor(POS, dtype=DT), torch.tensor(NEG, dtype=DT, requires_grad=True)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    kept = [[0.2, 0.5], NEG[1]]
    expected = (infonce_by_hand(POS[:1], kept[:1], 0.5) + infonce_by_hand(POS[1:], kept[1:], 0.5)) / 2
    loss = unified_contrastive_loss(pos, neg, 4.0, neg_mask=mask, scale=1.0)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-12)
    (grad,) = torch.autograd.grad(loss, neg)
    assert grad[0, 1] == 0 and bool((grad[mask] != 0).all())
    # an anchor with no valid negative contributes 0, without NaN
    empty = torch.tensor([[False] * 3, [True] * 3])
    loss = unified_contrastive_loss(pos, neg, 4.0, neg_mask=empty, scale=1.0, reduction="none")
    assert float(loss[0].detach()) == 0.0 and float(loss[1].detach()) == pytest.approx(infonce_by_hand(POS[1:], NEG[1:], 0.5), rel=1e-12)
    (grad,) = torch.autograd.grad(loss.sum(), neg)
    assert torch.isfinite(grad).all() and bool((grad[0] == 0).all())


def test_leading_dimensions_are_anchors():
    pos, neg = torch.randn(2, 4, 1, dtype=DT).tanh(), torch.randn(2, 4, 7, dtype=DT).tanh()
    flat = unified_contrastive_loss(pos.reshape(8, 1), neg.reshape(8, 7), 3.0)
    torch.testing.assert_close(unified_contrastive_loss(pos, neg, 3.0), flat)


# -- margin injection --------------------------------------------------------------------------
def _to_cos(x):
    return torch.tensor(x, dtype=DT) * 2 - 1  # written as rescaled scores s^, passed as cosines


# 2 blocks (views) x 2 samples; rescaled scores s^ = (s + 1) / 2 as written
REAL_POS = [[[0.9], [0.3]], [[0.8], [0.5]]]  # sample 0: min 0.8; sample 1: min 0.3
REAL_NEG = [[[0.1, 0.3, 0.2], [0.6, 0.2, 0.1]], [[0.4, 0.0, 0.1], [0.0, 0.1, 0.5]]]  # max: 0.4, 0.6
GEN_POS = [[[0.7], [0.5]], [[0.35], [0.2]]]
GEN_NEG = [[[0.5, 0.9, 0.2], [0.7, 0.3, 0.55]], [[0.85, 0.1, 0.6], [0.2, 0.65, 0.4]]]


@pytest.mark.parametrize(
    "margin_type,pos_part,neg_part",
    [
        # large: gamma+ = min(a, b) = (0.4, 0.3), gamma- = max(a, b) = (0.8, 0.6)
        #   pos: relu(0.7-0.4) + relu(0.35-0.4) + relu(0.5-0.3) + relu(0.2-0.3) = 0.5 over 4 pairs
        #   neg: sample 0 (0.8): 0.3+0+0.6 + 0+0.7+0.2 = 1.8; sample 1 (0.6): 0+0.3+0.05 + 0.4+0+0.2 = 0.95; over 12
        ("large", 0.5 / 4, 2.75 / 12),
        # small: gamma+ = (0.8, 0.6): no generated positive above; gamma- = (0.4, 0.3):
        #   sample 0: 0+0+0.2 + 0+0.3+0 = 0.5; sample 1: 0+0+0 + 0.1+0+0 = 0.1
        ("small", 0.0, 0.6 / 12),
        # mean: gamma = (0.6, 0.45): pos 0.1 + 0.05; neg sample 0: 0.1+0+0.4 + 0+0.5+0 = 1.0,
        #   sample 1: 0+0.15+0 + 0.25+0+0.05 = 0.45
        ("mean", 0.15 / 4, 1.45 / 12),
    ],
)
def test_margin_injection_by_hand(margin_type, pos_part, neg_part):
    args = [_to_cos(x) for x in (GEN_POS, GEN_NEG, REAL_POS, REAL_NEG)]
    for weight in (1.0, 1e-4):
        got = margin_injection_loss(*args, margin_type, pos_weight=weight)
        assert float(got) == pytest.approx(weight * pos_part + neg_part, rel=1e-9, abs=1e-12)


def test_margin_injection_masks_and_gradient():
    args = [_to_cos(x) for x in (GEN_POS, GEN_NEG, REAL_POS, REAL_NEG)]
    mask = torch.ones(2, 2, 3, dtype=torch.bool)
    mask[1, 0, 1] = False  # real 0.0 / generated 0.1 of block 1, sample 0: margins unchanged, its term (0.7) gone
    got = margin_injection_loss(*args, "large", pos_weight=1.0, neg_mask=mask)
    assert float(got) == pytest.approx(0.5 / 4 + 2.05 / 11, rel=1e-9)
    mask[0, 1, 0] = False  # the hardest real negative of sample 1 (0.6): its max becomes 0.5
    got = margin_injection_loss(*args, "large", pos_weight=1.0, neg_mask=mask)
    # sample 1: gamma+ = min(0.3, 0.5) = 0.3, gamma- = 0.5: neg 0.2 + 0.3 + 0.1 = 0.6 (its 0.7 masked)
    assert float(got) == pytest.approx(0.5 / 4 + (1.8 - 0.7 + 0.6) / 10, rel=1e-9)
    g = torch.Generator().manual_seed(3)
    leaves = [torch.rand(s, generator=g, dtype=DT).mul(2).sub(1).requires_grad_(True) for s in ((2, 3, 1), (2, 3, 4), (2, 3, 1), (2, 3, 4))]
    for kind in ("large", "small", "mean"):
        assert torch.autograd.gradcheck(lambda *a, kind=kind: margin_injection_loss(*a, kind, pos_weight=0.5), leaves)


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: unified_contrastive_loss(torch.zeros(2, 1), torch.zeros(3, 4), 4.0), "same anchors"),
        (lambda: unified_contrastive_loss(torch.zeros(2, 1), torch.zeros(2, 4), 0.0), "gamma must be positive"),
        (lambda: unified_contrastive_loss(torch.zeros(2, 1), torch.zeros(2, 4), 4.0, margin=2.0), "margin must be in"),
        (lambda: unified_contrastive_loss(torch.zeros(2, 1), torch.zeros(2, 4), 4.0, reduction="sum"), "reduction"),
        (lambda: unified_contrastive_loss(torch.zeros(2, 1), torch.zeros(2, 4), 4.0, neg_mask=torch.ones(2, 4)), "bool"),
        (lambda: unified_contrastive_loss(torch.zeros(2, 1), torch.zeros(2, 4), 4.0, neg_mask=torch.ones(3, 4, dtype=torch.bool)), "broadcast"),
        (lambda: margin_injection_loss(*[torch.zeros(1, 2, 1)] * 2, torch.zeros(1, 2, 1), torch.zeros(1, 2, 1), "huge"), "margin_type"),
        (lambda: margin_injection_loss(torch.zeros(2, 1), torch.zeros(2, 3), torch.zeros(2, 1), torch.zeros(2, 3)), "blocks, samples, pairs"),
        (lambda: margin_injection_loss(torch.zeros(1, 2, 1), torch.zeros(1, 2, 3), torch.zeros(1, 2, 1), torch.zeros(1, 2, 4)), "one layout"),
    ],
)
def test_bad_input_one_line_errors(call, match):
    with pytest.raises(ValueError, match=match) as err:
        call()
    assert len(str(err.value).splitlines()) == 1
