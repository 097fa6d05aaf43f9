"""ICL-MSR's backdoor adjustment and confounder dictionary on hand cases, the terms and where ψ acts."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from metassl.engine.step import encoder_objective, training_step
from metassl.meta import frozen_bn_stats
from metassl.regularizers import StepContext
from metassl.regularizers.confounder_dictionary import (
    BackdoorAdjustment,
    EMADictionary,
    LearnedDictionary,
    attention_weights,
    backdoor_adjust,
    ema_kmeans_step,
    farthest_point_seeds,
    kmeans_statistics,
    reseed_dead,
)

from iclmsr_helpers import DT, batch, encoder_opt, make, randomize_semantic, real_backward

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the adjustment and the dictionary on hand cases ----------------------------------------------
def hand_adjustment(attention="dot"):
    """D = 2, K = 2, d_a = 1: d = e1, e2; P = (3/4, 1/4); q = 2 and key logits (ln3 / 2, 0), so
    α(f) = (3/4, 1/4) at f = (2, 0); W = [[1, 2], [3, 4]]."""
    adj = BackdoorAdjustment(2, 1, attention).double()
    with torch.no_grad():
        adj.value.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        if attention == "dot":
            adj.query.weight.copy_(torch.tensor([[1.0, 0.0]]))
            adj.key.weight.copy_(torch.tensor([[math.log(3) / 2, 0.0]]))
    return adj, torch.eye(2, dtype=DT), torch.tensor([0.75, 0.25], dtype=DT), torch.tensor([[2.0, 0.0]], dtype=DT)


def test_adjustment_hand_case():
    adj, d, prior, f = hand_adjustment()
    alpha = attention_weights(f, d, adj.query.weight, adj.key.weight)
    torch.testing.assert_close(alpha, torch.tensor([[0.75, 0.25]], dtype=DT))
    # P·α = (9/16, 1/16); W d_1 = (1, 3), W d_2 = (2, 4): context = (11/16, 31/16)
    expected = torch.tensor([[2 + 11 / 16, 31 / 16]], dtype=DT)
    torch.testing.assert_close(backdoor_adjust(f, d, prior, adj.value.weight, alpha), expected)
    torch.testing.assert_close(adj(f, d, prior), expected)
    adj_none, *_ = hand_adjustment("none")
    # α = 1: context = 3/4 (1, 3) + 1/4 (2, 4) = (5/4, 13/4), the same for every f
    torch.testing.assert_close(adj_none(f, d, prior), torch.tensor([[2 + 1.25, 3.25]], dtype=DT))
    torch.testing.assert_close(adj_none(torch.zeros(1, 2, dtype=DT), d, prior), torch.tensor([[1.25, 3.25]], dtype=DT))


def test_adjustment_gradients_match_finite_differences():
    torch.manual_seed(0)
    adj = BackdoorAdjustment(4, 3).double()
    f, d, prior = torch.randn(5, 4, dtype=DT, requires_grad=True), torch.randn(6, 4, dtype=DT, requires_grad=True), torch.softmax(torch.randn(6, dtype=DT), 0)
    assert torch.autograd.gradcheck(lambda f, d, *w: backdoor_adjust(f, d, prior, w[2], attention_weights(f, d, w[0], w[1])),
                                    (f, d, *[p.detach().requires_grad_() for p in (adj.query.weight, adj.key.weight, adj.value.weight)]))


def test_farthest_point_seeds():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0], [0.0, 3.0]])
    torch.testing.assert_close(farthest_point_seeds(x, 3), x[[0, 2, 3]])
    torch.testing.assert_close(farthest_point_seeds(x[:2], 4), x[[0, 1, 0, 1]])  # wraps around
    torch.testing.assert_close(farthest_point_seeds(torch.ones(3, 2), 2), torch.ones(2, 2))  # one distinct row


def test_ema_dictionary_hand_case():
    d = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=DT)
    freq = torch.tensor([0.5, 0.3, 0.2], dtype=DT)
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [9.0, 1.0]], dtype=DT)
    assign, sums, counts = kmeans_statistics(x, d)
    assert assign.tolist() == [0, 0, 1]
    torch.testing.assert_close(sums, torch.tensor([[4.0, 0.0], [9.0, 1.0], [0.0, 0.0]], dtype=DT))
    torch.testing.assert_close(counts, torch.tensor([2.0, 1.0, 0.0], dtype=DT))
    protos, freqs = ema_kmeans_step(d, freq, sums, counts, 0.5)
    # means (2, 0), (9, 1); the third prototype got nothing and stays
    torch.testing.assert_close(protos, torch.tensor([[1.0, 0.0], [9.5, 0.5], [0.0, 10.0]], dtype=DT))
    torch.testing.assert_close(freqs, torch.tensor([7 / 12, 19 / 60, 0.1], dtype=DT))
    # threshold 0.4: 0.1 < 0.4 / 3, the third is dead; live prototypes explain (3, 0) worst (d² = 4)
    p2, f2, n = reseed_dead(protos, freqs, x, 0.4)
    assert n == 1
    torch.testing.assert_close(p2, torch.tensor([[1.0, 0.0], [9.5, 0.5], [3.0, 0.0]], dtype=DT))
    raw = torch.tensor([7 / 12, 19 / 60, 1 / 3], dtype=DT)
    torch.testing.assert_close(f2, raw / raw.sum())
    assert reseed_dead(protos, freqs, x, 0.2)[2] == 0  # 0.1 >= 0.2 / 3: alive
    # the module does the same
    dic = EMADictionary(3, 2, momentum=0.5, dead_threshold=0.4).double()
    with torch.no_grad():
        dic.prototypes.copy_(d)
        dic.frequencies.copy_(freq)
    dic.update_(x)
    torch.testing.assert_close(dic.prototypes, p2)
    torch.testing.assert_close(dic.frequencies, f2)
    assert dic.stats()["reseeded"] == 1.0
    uniform = EMADictionary(3, 2, prior="uniform")
    torch.testing.assert_close(uniform.prior(), torch.full((3,), 1 / 3))


def test_learned_dictionary_frequencies():
    dic = LearnedDictionary(2, 3, momentum=0.75).double()
    assert isinstance(dic.prototypes, nn.Parameter)
    dic.update_(torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=DT))  # mean (3/4, 1/4)
    torch.testing.assert_close(dic.frequencies, 0.75 * torch.tensor([0.5, 0.5], dtype=DT) + 0.25 * torch.tensor([0.75, 0.25], dtype=DT))


# -- the terms, the components, where ψ acts -------------------------------------------------------
def plain_loss(m, views, transform=None):
    with frozen_bn_stats([m]):
        return m.loss(m(views, feature_transform=transform))


@pytest.mark.parametrize("method", ["simclr", "byol", "moco_v2"])
def test_terms_are_the_base_loss_on_weighted_and_intervened_features(method):
    m, reg = make(method, dtype=DT)
    randomize_semantic(reg)
    views, extras = batch(DT)
    ctx = StepContext(method=m, views=views, extras=extras)
    loss, terms, out = encoder_objective(m, reg, views, None, ctx)
    assert set(terms) == {"base", "do"} and bool(reg.dictionary.seeded)
    w = reg.semantic(extras["clean"]).detach()
    assert not torch.allclose(w, torch.ones_like(w))
    for h, f in zip(out["h"], out["f"]):
        torch.testing.assert_close(f, h * w)
    torch.testing.assert_close(terms["base"], plain_loss(m, views, lambda h: h * w))
    do = plain_loss(m, views, lambda h: reg.adjust(h * w))  # a full forward (backbone again) gives the same
    torch.testing.assert_close(terms["do"], reg.weight_do * do)
    torch.testing.assert_close(loss, terms["base"] + terms["do"])
    with torch.no_grad():
        reg.adjustment.value.weight.zero_()  # W = 0: f_do = f
    _, terms, _ = encoder_objective(m, reg, views, None, StepContext(method=m, views=views, extras=extras))
    torch.testing.assert_close(terms["do"], reg.weight_do * terms["base"])
    assert torch.equal(reg.transform_features(out["h"][0]), out["h"][0])  # outside a step: weights 1


def test_components_switch_exactly_their_terms():
    views, extras = batch(DT)
    # adjustment alone: no ψ, no meta step, no clean image needed, base term = the plain base loss
    m, reg = make(dtype=DT, semantic_regularizer=False)
    assert not reg.bilevel and reg.semantic is None and reg.meta_parameters() == []
    _, terms, _ = encoder_objective(m, reg, views, None, StepContext(method=m, views=views))
    assert set(terms) == {"base", "do"}
    torch.testing.assert_close(terms["base"], plain_loss(m, views))
    torch.testing.assert_close(terms["do"], reg.weight_do * plain_loss(m, views, reg.adjust))
    opt = encoder_opt(m, reg)
    logs = training_step(m, reg, views, None, opt, None)
    assert "meta/grad_norm" not in logs and "reg/effective_strata" in logs
    # semantic regularizer alone: one term, no dictionary, no own encoder parameters
    m, reg = make(dtype=DT, adjustment=False)
    randomize_semantic(reg)
    assert reg.bilevel and reg.dictionary is None and reg.encoder_parameters() == []
    _, terms, _ = encoder_objective(m, reg, views, None, StepContext(method=m, views=views, extras=extras))
    assert set(terms) == {"base"}
    w = reg.semantic(extras["clean"]).detach()
    torch.testing.assert_close(terms["base"], plain_loss(m, views, lambda h: h * w))
    opt = encoder_opt(m, reg)
    meta_opt, _ = reg.configure_meta_optimizer(10)
    logs = training_step(m, reg, views, None, opt, meta_opt, extras=extras)
    assert "loss_do" not in logs and logs["meta/grad_norm"] > 0


def test_psi_in_the_forward_without_gradient_and_bn_updated_once():
    m, reg = make()
    randomize_semantic(reg)
    views, extras = batch()
    before = m.projector[1].num_batches_tracked.clone()
    ctx = real_backward(m, reg, encoder_opt(m, reg), views, extras)
    for p in reg.semantic.parameters():  # used in the forward (DDP), exactly no gradient
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0
    for p in list(reg.adjustment.parameters()) + [m.backbone[0].weight]:
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert int(m.projector[1].num_batches_tracked - before) == 2  # two views; the do pass did not count
    assert reg._weights is None and "iclmsr_weights" in ctx.cache
