"""ICL-MSR's ψ meta-gradient against finite differences (float64), order=reuse/official, the dictionary update."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from metassl.engine.step import encoder_objective, training_step
from metassl.meta import frozen_bn_stats
from metassl.regularizers import StepContext
from metassl.regularizers.confounder_dictionary import (
    ema_kmeans_step,
    farthest_point_seeds,
    kmeans_statistics,
)

from iclmsr_helpers import DT, batch, encoder_opt, make, randomize_semantic, real_backward

pytestmark = pytest.mark.usefixtures("one_thread")


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
