"""ICL-MSR (metassl.regularizers.iclmsr, .confounder_dictionary) on tiny networks: the adjustment
and the dictionary on hand cases, ψ's meta-gradient against finite differences (float64), the
components switched on and off, smoke runs on the built-in data, evaluation, bad options."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from metassl.cli import main
from metassl.config import load_config
from metassl.engine.step import encoder_objective, training_step
from metassl.errors import MetasslError
from metassl.meta import frozen_bn_stats
from metassl.methods import METHODS, build_method
from metassl.regularizers import REGULARIZERS, StepContext, build_regularizer
from metassl.regularizers.base import regularizer_hparams
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
from metassl.regularizers.iclmsr import ICLMSR, FrozenIntervention

DT = torch.float64
FEAT = 6
N = 8

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_backbone() -> nn.Module:
    """Conv -> BN -> Tanh -> global pool: (B, 3, 6, 6) -> (B, 6), smooth for finite differences."""
    return nn.Sequential(nn.Conv2d(3, FEAT, 3, padding=1), nn.BatchNorm2d(FEAT), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def tiny_method(method: str) -> nn.Module:
    kw = dict(proj_hidden_dim=8, proj_output_dim=5)
    if method == "moco_v2":
        kw.update(queue_size=16)
    if method in ("byol", "simsiam"):
        kw["pred_hidden_dim"] = 8
    return build_method(method, tiny_backbone(), FEAT, **kw)


def make(method: str = "simclr", dtype=torch.float32, seed: int = 0, **reg_kw):
    torch.manual_seed(seed)
    m = tiny_method(method)
    reg = build_regularizer("iclmsr", m, **{"num_prototypes": 4, "attention_dim": 3, "semantic_hidden_dim": 4, **reg_kw})
    return m.to(dtype), reg.to(dtype)


def batch(dtype=torch.float32, n=N, seed=1):
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(n, 3, 6, 6, generator=g).to(dtype) for _ in range(2)]
    return views, {"clean": torch.randn(n, 3, 6, 6, generator=g).to(dtype)}


def encoder_opt(m, reg, lr=0.2, momentum=0.9, wd=5e-4):
    return torch.optim.SGD(list(m.trainable_parameters()) + reg.encoder_parameters(), lr=lr, momentum=momentum, weight_decay=wd)


def real_backward(m, reg, opt, views, extras) -> StepContext:
    ctx = StepContext(method=m, views=views, extras=dict(extras), encoder_optimizer=opt, lr=opt.param_groups[0]["lr"])
    opt.zero_grad(set_to_none=True)
    loss, _, _ = encoder_objective(m, reg, views, None, ctx)
    loss.backward()
    return ctx


def randomize_semantic(reg, scale=0.3, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in reg.semantic.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


# -- configuration and bad input -----------------------------------------------------------------
def test_registry_preset_and_defaults():
    assert REGULARIZERS["iclmsr"] is ICLMSR and ICLMSR.data_requirements == ("clean",)
    cfg = load_config(["regularizer=iclmsr"])
    assert {k: v for k, v in cfg.regularizer.items() if k != "name"} == regularizer_hparams("iclmsr")
    _, reg = make()
    assert reg.bilevel and reg.weight_base == 1.0 and 0.1 <= reg.weight_do <= 0.5
    assert torch.equal(reg.semantic(torch.randn(3, 3, 6, 6)), torch.ones(3, FEAT))  # w = 1 at init
    meta = {id(p) for p in reg.meta_parameters()}
    assert meta == {id(p) for p in reg.semantic.parameters()}
    assert not meta & {id(p) for p in reg.encoder_parameters()}
    assert {id(p) for p in reg.encoder_parameters()} == {id(p) for p in reg.adjustment.parameters()}


def test_every_preset_key_has_a_comment():
    from pathlib import Path

    import metassl.configs

    lines = (Path(metassl.configs.__file__).parent / "regularizer" / "iclmsr.yaml").read_text().splitlines()
    keys = [ln for ln in lines if ln and not ln.startswith("#") and not ln.startswith("name:")]
    assert len(keys) == len(regularizer_hparams("iclmsr"))
    assert all("#" in ln for ln in keys)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(adjustment=False, semantic_regularizer=False), "regularizer=none"),
        (dict(dictionary="kmeans"), "dictionary must be one of ema, learned"),
        (dict(prior="posterior"), "prior must be one of"),
        (dict(attention="cosine"), "attention must be one of dot, none"),
        (dict(num_prototypes=0), "num_prototypes must be a positive integer"),
        (dict(dictionary_momentum=1.0), "dictionary_momentum"),
        (dict(dead_threshold=1.5), "dead_threshold"),
        (dict(weight_do=-1.0), "weight_do"),
        (dict(dictionary="learned", attention="none"), "prior=uniform"),
        (dict(grad_mode="exact"), "grad_mode must be one of"),
        (dict(meta_objective="semantic"), "meta_objective must be one of auto, plain, weighted"),
        (dict(meta_objective="plain", grad_mode="first_order"), "identically zero"),
        (dict(order="after"), "order must be one of reuse, official"),
        (dict(backbone_tangent="exact"), "backbone_tangent must be one of difference, jvp"),
        (dict(tangent_radius=0.0), "tangent_radius must be positive"),
    ],
)
def test_bad_options_one_line(kw, match):
    with pytest.raises(ValueError, match=match) as err:
        ICLMSR(**kw)
    assert len(str(err.value).splitlines()) == 1


def test_bad_batches_one_line():
    m, reg = make()
    opt = encoder_opt(m, reg)
    views, extras = batch()
    with pytest.raises(MetasslError, match="extras\\['clean'\\]") as err:
        training_step(m, reg, views, None, opt)
    assert len(str(err.value).splitlines()) == 1
    for bad in (extras["clean"][:3], extras["clean"][:, :1], extras["clean"][0]):
        with pytest.raises(ValueError, match="must be a \\(B, 3, H, W\\) tensor") as err:
            training_step(m, reg, views, None, opt, extras={"clean": bad})
        assert len(str(err.value).splitlines()) == 1
    m, reg = make("moco_v2")
    m.shuffle_bn = True
    ctx = StepContext(method=m, views=views, extras=extras, distributed=True)
    with pytest.raises(MetasslError, match="shuffle_bn=false"):
        reg.prepare_views(views, ctx)
    with pytest.raises(ValueError, match="has no parameter"):
        build_regularizer("iclmsr", tiny_method("simclr"), prototypes=3)


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


# -- ψ's meta-gradient against finite differences (float64) -----------------------------------------
def reference_directional(m, reg, opt, views, extras, direction, weighted, h=1e-6, plain_lr=None):
    """Central difference along ``direction`` (ψ's parameters) of L_base at the weights after a real
    torch.optim.SGD step on the encoder objective (taken with ψ's weights), L_base at weights 1
    or (``weighted``) with ψ's weights; deep copies.  ``plain_lr``: a fresh SGD without momentum
    or decay at that lr, i.e. ``virtual_step=sgd``."""
    psi0 = {n: p.detach().clone() for n, p in reg.semantic.named_parameters()}

    def outer(eps: float) -> float:
        mc, rc, oc = copy.deepcopy((m, reg, opt))
        with torch.no_grad():
            for n, p in rc.semantic.named_parameters():
                p.copy_(psi0[n] + eps * direction[n])
        if plain_lr is not None:
            oc = torch.optim.SGD(list(mc.trainable_parameters()) + rc.encoder_parameters(), lr=plain_lr)
        for p in list(mc.parameters()) + list(rc.parameters()):
            p.grad = None
        with frozen_bn_stats([mc, rc]):
            loss, _, _ = encoder_objective(mc, rc, views, None, StepContext(method=mc, views=views, extras=extras))
            loss.backward()
            oc.step()
            with torch.no_grad():
                if weighted:
                    rc.prepare_views(views, StepContext(method=mc, views=views, extras=extras))
                value = float(mc.loss(mc(views, feature_transform=rc.transform_features)))
                rc._weights = None
        return value

    return (outer(h) - outer(-h)) / (2 * h)


CASES = [
    dict(),
    dict(meta_objective="weighted"),
    dict(dictionary="learned"),
    dict(attention="none", prior="uniform", meta_objective="weighted"),
    dict(adjustment=False),
    dict(adjustment=False, meta_objective="weighted"),
    dict(virtual_step="sgd", virtual_lr=0.5),
]


@pytest.mark.parametrize("tangent", ["difference", "jvp"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_meta_gradient_matches_finite_difference_reference(case, tangent):
    """order=reuse from θ_t; backbone_tangent=jvp exact to rounding, difference (the default)
    within its one-sided difference error (relative radius 1e-5: about 1e-5 here)."""
    rel = 1e-5 if tangent == "jvp" else 3e-4
    m, reg = make(dtype=DT, backbone_tangent=tangent, **case)
    randomize_semantic(reg)
    opt = encoder_opt(m, reg, lr=0.3)
    views0, extras0 = batch(DT, seed=7)
    training_step(m, reg, views0, None, opt, None, extras=extras0)  # seeds the dictionary, fills momentum buffers
    views, extras = batch(DT)
    ctx = real_backward(m, reg, opt, views, extras)
    exact = reg.compute_meta_gradient(ctx)
    g = torch.Generator().manual_seed(11)
    for _ in range(2):
        direction = {n: torch.randn(p.shape, generator=g, dtype=DT) for n, p in reg.semantic.named_parameters()}
        ref = reference_directional(m, reg, opt, views, extras, direction, reg.outer_weighted, plain_lr=case.get("virtual_lr"))
        got = sum(float((exact.grads["semantic." + n] * d).sum()) for n, d in direction.items())
        assert got == pytest.approx(ref, rel=rel, abs=1e-10) and abs(ref) > 1e-6
    norm = lambda d: math.sqrt(sum(float(v.pow(2).sum()) for v in d.values()))
    if reg.outer_weighted:
        reg.grad_mode = "first_order"
        first = reg.compute_meta_gradient(ctx).grads
        term = {k: exact.grads[k] - first[k] for k in first}
        assert norm(term) > 1e-3 * norm(first)  # the second-order term matters here
    else:  # the plain objective sees ψ only through the virtual step: no first-order part
        assert norm(exact.first_order) == 0.0
        term = exact.grads
    reg.grad_mode, reg.fd_radius = "finite_difference", 1e-5
    fd = reg.compute_meta_gradient(ctx).grads
    assert norm({k: fd[k] - exact.grads[k] for k in fd}) <= (1e-4 if tangent == "jvp" else 1e-3) * norm(term)


def flat(grads):
    return torch.cat([g.reshape(-1) for g in grads.values()])


@pytest.mark.parametrize("method", ["simclr", "moco_v2", "byol"])
def test_reuse_difference_tangent_equals_the_exact_term(method):
    """The default (difference tangent of the backbone features) against the exact jvp through
    the whole network, at θ_t from the same real step, for in-batch and momentum bases."""
    m, reg = make(method, dtype=DT)
    randomize_semantic(reg)
    opt = encoder_opt(m, reg, lr=0.3)
    training_step(m, reg, *batch(DT, seed=7)[:1], None, opt, None, extras=batch(DT, seed=7)[1])
    ctx = real_backward(m, reg, opt, *batch(DT))
    diff = flat(reg.compute_meta_gradient(ctx).grads)
    reg.backbone_tangent = "jvp"
    exact = flat(reg.compute_meta_gradient(ctx).grads)
    cos = float(diff @ exact / (diff.norm() * exact.norm()))
    assert cos >= 0.9999 and float((diff - exact).norm() / exact.norm()) < 1e-4


@pytest.mark.parametrize("case", [dict(), dict(meta_objective="weighted", virtual_step="sgd", virtual_lr=0.5)],
                         ids=["default", "weighted-sgd"])
def test_order_official_is_the_meta_gradient_after_the_encoder_step(case):
    """order=official: after the real step, at θ_{t+1}, a fresh inner gradient (engine exact
    second order), against the finite-difference reference from θ_{t+1}; training_step assigns it."""
    m, reg = make(dtype=DT, order="official", meta_optimizer="sgd", meta_lr=0.5, meta_momentum=0.0, meta_weight_decay=0.0, **case)
    randomize_semantic(reg)
    opt = encoder_opt(m, reg, lr=0.3)
    views, extras = batch(DT)
    m_ref, reg_ref, opt_ref = copy.deepcopy((m, reg, opt))
    real_backward(m_ref, reg_ref, opt_ref, views, extras)
    opt_ref.step()  # θ_{t+1}
    ctx = StepContext(method=m_ref, views=views, extras=dict(extras), encoder_optimizer=opt_ref, lr=opt_ref.param_groups[0]["lr"])
    expected = reg_ref.compute_meta_gradient(ctx).grads
    g = torch.Generator().manual_seed(2)
    direction = {n: torch.randn(p.shape, generator=g, dtype=DT) for n, p in reg_ref.semantic.named_parameters()}
    ref = reference_directional(m_ref, reg_ref, opt_ref, views, extras, direction, reg_ref.outer_weighted, plain_lr=case.get("virtual_lr"))
    got = sum(float((expected["semantic." + n] * d).sum()) for n, d in direction.items())
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-10) and abs(ref) > 1e-6
    logs = training_step(m, reg, views, None, opt, reg.configure_meta_optimizer(10)[0], extras=extras)
    for n, p in reg.semantic.named_parameters():
        torch.testing.assert_close(p.grad, expected["semantic." + n])
    assert "meta/outer_loss" in logs
    with pytest.raises(RuntimeError, match="before_encoder_step, which did not run"):
        make(dtype=DT)[1].meta_step(ctx)


def test_training_step_assigns_the_meta_gradient_and_leaves_the_encoder_alone():
    m, reg = make(meta_optimizer="sgd", meta_lr=0.5, meta_momentum=0.0, meta_weight_decay=0.0)
    randomize_semantic(reg)
    opt = encoder_opt(m, reg)
    meta_opt, _ = reg.configure_meta_optimizer(10)
    views, extras = batch()
    m_ref, reg_ref, opt_ref = copy.deepcopy((m, reg, opt))
    expected = reg_ref.compute_meta_gradient(real_backward(m_ref, reg_ref, opt_ref, views, extras)).grads
    psi0 = {n: p.detach().clone() for n, p in reg.semantic.named_parameters()}
    logs = training_step(m, reg, views, None, opt, meta_opt, extras=extras)
    for n, p in reg.semantic.named_parameters():
        torch.testing.assert_close(p.grad, expected["semantic." + n])
        torch.testing.assert_close(p.detach(), psi0[n] - 0.5 * expected["semantic." + n])
    assert {"meta/outer_loss", "reg/weight_mean", "reg/effective_strata", "loss_do"} <= set(logs)


def test_dictionary_follows_the_batch_after_each_step():
    m, reg = make(num_prototypes=3, dictionary_momentum=0.5, dead_threshold=0.0)
    opt = encoder_opt(m, reg)
    views, extras = batch()
    ctx = real_backward(m, reg, opt, views, extras)
    seeded = reg.dictionary.prototypes.clone()
    h = torch.cat([x.detach() for x in ctx.out["h"]])
    torch.testing.assert_close(seeded, farthest_point_seeds(h, 3))
    _, sums, counts = kmeans_statistics(h, seeded)
    expected, freqs = ema_kmeans_step(seeded, torch.full((3,), 1 / 3), sums, counts, 0.5)
    reg.after_step(ctx)
    torch.testing.assert_close(reg.dictionary.prototypes, expected)
    torch.testing.assert_close(reg.dictionary.frequencies, freqs)
    # learned: prototypes are encoder parameters (gradient), frequencies the mean attention
    m, reg = make(dictionary="learned", num_prototypes=3, dictionary_momentum=0.5)
    opt = encoder_opt(m, reg)
    assert any(p is reg.dictionary.prototypes for p in reg.encoder_parameters())
    ctx = real_backward(m, reg, opt, views, extras)
    assert reg.dictionary.prototypes.grad.abs().sum() > 0
    alpha = torch.cat(ctx.cache["iclmsr_alpha"])
    reg.after_step(ctx)
    torch.testing.assert_close(reg.dictionary.frequencies, 0.5 / 3 + 0.5 * alpha.mean(0))


# -- training, evaluation, checkpoints ---------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_step_smoke_run_on_builtin_data(method, smoke_overrides, tmp_path):
    args = ["train", *smoke_overrides, f"method={method}", "regularizer=iclmsr", "trainer.max_steps=2",
            "regularizer.attention_dim=16", "regularizer.semantic_hidden_dim=8", "eval.knn_init=false",
            "regularizer.eval_intervention=true"]
    if method in ("byol", "simsiam"):
        args.append("method.pred_hidden_dim=32")
    assert main(args) == 0
    out = tmp_path / "run"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["regularizer"] == "iclmsr" and 0.0 <= summary["knn_top1"] <= 1.0
    saved = torch.load(out / "confounder_dictionary.pt")
    assert saved["prototypes"].shape == (16, 256) and torch.isfinite(saved["prototypes"]).all()
    assert float(saved["prior"].sum()) == pytest.approx(1.0)
    metrics = (out / "metrics.csv").read_text().splitlines()[0]
    assert "train/loss_do" in metrics and "train/meta/grad_norm" in metrics


def test_eval_transform_and_checkpoint_state():
    m, reg = make(dtype=DT)
    assert reg.eval_transform() is None
    reg.eval_intervention = True
    assert reg.eval_transform() is None  # not seeded yet: nothing to intervene with
    views, extras = batch(DT)
    opt = encoder_opt(m, reg)
    training_step(m, reg, views, None, opt, None, extras=extras)
    t = reg.eval_transform()
    assert isinstance(t, FrozenIntervention) and not any(p.requires_grad for p in t.parameters())
    h = torch.randn(5, FEAT, dtype=DT)
    torch.testing.assert_close(t(h), reg.adjust(h).detach())  # weights 1: no clean image at evaluation
    assert t(h).shape == h.shape
    reg.eval_intervention = False
    assert reg.eval_transform() is None  # default: the backbone feature
    state = reg.state_dict()
    assert {"dictionary.prototypes", "dictionary.frequencies", "dictionary.seeded"} <= set(state)
    _, fresh = make(dtype=DT, seed=5)
    fresh.load_state_dict(state)
    assert bool(fresh.dictionary.seeded) and torch.equal(fresh.dictionary.prototypes, reg.dictionary.prototypes)


def test_bf16_autocast_step():
    m, reg = make()
    opt = encoder_opt(m, reg)
    meta_opt, _ = reg.configure_meta_optimizer(10)
    views, extras = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logs = training_step(m, reg, views, None, opt, meta_opt, extras=extras)
    assert torch.isfinite(logs["loss"]) and logs["meta/grad_norm"] > 0
    assert all(p.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in reg.semantic.parameters())
    assert reg.dictionary.prototypes.dtype == torch.float32 and torch.isfinite(reg.dictionary.prototypes).all()


def test_cli_refuses_bad_options_in_one_line(smoke_overrides, capsys):
    code = main(["train", *smoke_overrides, "regularizer=iclmsr", "regularizer.adjustment=false", "regularizer.semantic_regularizer=false"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "regularizer=none" in err and len(err.splitlines()) == 1
