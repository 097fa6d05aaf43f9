"""The virtual step follows the real optimizer (SGD, LARS, Adam, AdamW) and its gradient clip,
and the meta-gradient is exact through the clip (against finite differences of the real step)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from metassl.engine.step import clip_info, encoder_objective
from metassl.meta import GradClip, VirtualStep, apply_virtual_step, plan_virtual_step, step_vjp
from metassl.methods import build_method
from metassl.optimizers import LARS
from metassl.regularizers import StepContext, build_regularizer

DT = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(4, 3, generator=g, dtype=DT)), nn.Parameter(torch.randn(5, generator=g, dtype=DT))]


def _optimizers(params):
    return {
        "sgd": torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True),
        "lars": LARS(params, lr=0.3, momentum=0.9, weight_decay=1e-2, eta=0.02),
        "adam": torch.optim.Adam(params, lr=1e-2, weight_decay=1e-2),
        "adamw": torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-1),
    }


@pytest.mark.parametrize("kind", ["sgd", "lars", "adam", "adamw"])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_virtual_step_equals_the_real_step(kind, clip):
    params = _params()
    opt = _optimizers(params)[kind]
    g = torch.Generator().manual_seed(3)
    for step in range(3):  # state after two real steps, then compare the third
        grads = [torch.randn(p.shape, generator=g, dtype=DT) for p in params]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        named = {f"p{i}": p for i, p in enumerate(params)}
        theta = {k: p.detach().clone() for k, p in named.items()}
        plan = plan_virtual_step(named, VirtualStep("mirror"), opt)
        new, _ = apply_virtual_step(theta, {f"p{i}": gr for i, gr in enumerate(grads)}, plan, GradClip(clip) if clip else None)
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        for k, p in named.items():
            torch.testing.assert_close(new[k], p.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["sgd", "lars", "adamw"])
def test_step_vjp_against_finite_differences(kind):
    params = _params()
    opt = _optimizers(params)[kind]
    for p in params:  # build optimizer state
        p.grad = torch.ones_like(p)
    opt.step()
    named = {f"p{i}": p for i, p in enumerate(params)}
    theta = {k: p.detach().clone() for k, p in named.items()}
    g = torch.Generator().manual_seed(5)
    grads = {k: torch.randn(t.shape, generator=g, dtype=DT) for k, t in theta.items()}
    v = {k: torch.randn(t.shape, generator=g, dtype=DT) for k, t in theta.items()}
    clip = GradClip(0.3)
    plan = plan_virtual_step(named, VirtualStep("mirror"), opt)
    u = step_vjp(theta, grads, plan, v, clip)

    def f(gs):
        new, _ = apply_virtual_step(theta, gs, plan, clip)
        return sum((new[k] * v[k]).sum() for k in new)

    h = 1e-6
    for k in grads:
        for idx in range(grads[k].numel()):
            e = torch.zeros_like(grads[k]).view(-1)
            e[idx] = h
            plus = {**grads, k: grads[k] + e.view_as(grads[k])}
            minus = {**grads, k: grads[k] - e.view_as(grads[k])}
            fd = (f(plus) - f(minus)) / (2 * h)
            assert abs(float(fd) - float(u[k].view(-1)[idx])) < 1e-6 * max(1.0, abs(float(fd)))


def _tiny():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    m = build_method("simclr", backbone, 6, proj_hidden_dim=8, proj_output_dim=5)
    reg = build_regularizer("metamask", m, drr_hidden_dim=8, drr_output_dim=7, backbone_tangent="jvp")
    m.double()
    reg.double()
    with torch.no_grad():
        reg.mask_logits.copy_(torch.linspace(-1, 1, 6, dtype=DT))
    return m, reg


def _real_step_outer_loss(m, reg, opt_state, views, logits, max_norm):
    """L_base(θ_{t+1}(w), w) where θ_{t+1} is the *real* clipped SGD step with mask logits w."""
    m, reg = copy.deepcopy(m), copy.deepcopy(reg)
    with torch.no_grad():
        reg.mask_logits.copy_(logits)
    opt = torch.optim.SGD(list(m.trainable_parameters()) + reg.encoder_parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    opt.load_state_dict(copy.deepcopy(opt_state))  # load_state_dict keeps the tensors: copy
    opt.zero_grad()
    loss, _, _ = encoder_objective(m, reg, views)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], max_norm)
    opt.step()
    with torch.no_grad():
        mask = reg.mask()
        return float(m.loss(m(views, feature_transform=lambda h: h * mask)))


@pytest.mark.parametrize("backbone_tangent", ["jvp", "difference"])
def test_meta_gradient_exact_under_active_clip(backbone_tangent):
    m, reg = _tiny()
    reg.backbone_tangent = backbone_tangent
    reg.tangent_radius = 1e-6
    opt = torch.optim.SGD(list(m.trainable_parameters()) + reg.encoder_parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(8, 3, 6, 6, generator=g, dtype=DT) for _ in range(2)]
    loss, _, out = encoder_objective(m, reg, views)  # one real step for a momentum buffer
    loss.backward()
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    max_norm = 0.05
    opt.zero_grad(set_to_none=True)
    ctx = StepContext(method=m, views=views, encoder_optimizer=opt, lr=0.5)
    loss, _, out = encoder_objective(m, reg, views, ctx=ctx)
    loss.backward()
    ctx.clip = clip_info(opt, max_norm)
    assert ctx.clip.factor < 0.2  # the clip is active
    torch.nn.utils.clip_grad_norm_([p for gr in opt.param_groups for p in gr["params"]], max_norm)
    got = reg.compute_meta_gradient(ctx).grads["logits"]
    w0 = reg.mask_logits.detach().clone()
    fd = torch.zeros_like(w0)
    h = 1e-5
    for i in range(w0.numel()):
        e = torch.zeros_like(w0)
        e[i] = h
        fd[i] = (_real_step_outer_loss(m, reg, state, views, w0 + e, max_norm) - _real_step_outer_loss(m, reg, state, views, w0 - e, max_norm)) / (2 * h)
    cos = torch.nn.functional.cosine_similarity(got, fd, dim=0)
    assert cos > 0.9999, (cos, got, fd)
    torch.testing.assert_close(got, fd, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_adam_first_step_vjp_is_finite_where_a_gradient_entry_is_zero(kind):
    """At Adam's first step v ∝ g², so sqrt(v) has an infinite derivative at an exactly zero entry
    (a dead ReLU's weights): the VJP must stay finite and equal the update's true derivative
    dθ'/dg = -lr/eps there (and -lr·eps/(|d|+eps)² elsewhere, d the gradient Adam sees)."""
    params = _params()
    opt = _optimizers(params)[kind]
    named = {f"p{i}": p for i, p in enumerate(params)}
    theta = {k: p.detach().clone() for k, p in named.items()}
    g = torch.Generator().manual_seed(7)
    grads = {k: torch.randn(t.shape, generator=g, dtype=DT) for k, t in theta.items()}
    coupled_wd = 1e-2 if kind == "adam" else 0.0  # Adam adds wd·θ to the gradient, AdamW decays θ apart
    grads["p0"][0] = -coupled_wd * theta["p0"][0]  # a whole row where the step's input d = g + wd·θ is exactly 0
    v = {k: torch.ones_like(t) for k, t in theta.items()}
    plan = plan_virtual_step(named, VirtualStep("mirror"), opt)
    u = step_vjp(theta, grads, plan, v, None)
    lr, eps = 1e-2, 1e-8
    for k, gk in grads.items():
        assert torch.isfinite(u[k]).all()
        # first Adam step: θ' = base - lr·d/(|d| + eps) (bias corrections cancel); dθ'/dg = -lr·eps/(|d|+eps)²
        d = gk + coupled_wd * theta[k]
        assert k != "p0" or (d[0] == 0).all()
        expected = -lr * eps / (d.abs() + eps) ** 2
        torch.testing.assert_close(u[k], expected, rtol=1e-6, atol=0)
