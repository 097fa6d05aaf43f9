"""MetAug's meta-gradient against finite differences (float64), order=reuse/official, state and queue safety."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from metassl.engine.step import encoder_objective, training_step
from metassl.meta import frozen_bn_stats

from metaug_helpers import DT, context, encoder_opt, make, views_for
from regularizer_helpers import assert_training_state_is, training_state

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the meta-gradient against finite differences of L(θ'(φ), φ) ---------------------------------------------
def stepped_objective(m, reg, views, phi: torch.Tensor, lr: float, theta_prime: dict | None = None) -> float:
    """L(θ', φ) on deep copies, θ' = θ − lr ∇θ L(θ, φ) by autograd and a manual SGD step (or a
    given θ'), batch-norm statistics frozen: independent of the regularizer's functional path."""
    mc, rc = copy.deepcopy((m, reg))
    vector_to_parameters(phi, rc.meta_parameters())
    params = mc.trainable_parameters()
    with frozen_bn_stats([mc, rc]):
        if theta_prime is None:
            loss, _, _ = encoder_objective(mc, rc, views)
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p -= lr * g
        else:
            with torch.no_grad():
                for p, t in zip(params, theta_prime):
                    p.copy_(t)
        with torch.no_grad():
            return float(encoder_objective(mc, rc, views)[0])


def theta_prime_of(m, reg, views, lr):
    mc, rc = copy.deepcopy((m, reg))
    params = mc.trainable_parameters()
    with frozen_bn_stats([mc, rc]):
        grads = torch.autograd.grad(encoder_objective(mc, rc, views)[0], params)
    return [(p - lr * g).detach() for p, g in zip(params, grads)]


@pytest.mark.parametrize("method", ["simclr", "moco_v2", "byol"])
def test_meta_gradient_matches_finite_differences(method):
    lr = 0.3
    m, reg = make(method, DT, weight_gen=0.5, weight_mi=0.5, margin_pos_weight=1.0, virtual_lr=lr, order="official")
    opt = encoder_opt(m)
    training_step(m, reg, views_for(DT, seed=7), None, opt, None)  # real optimizer state, moved weights
    views = views_for(DT)
    ctx = context(m, opt, views)
    exact = parameters_to_vector(list(reg.compute_meta_gradient(ctx).grads.values()))
    phi0 = parameters_to_vector(reg.meta_parameters()).detach()
    g = torch.Generator().manual_seed(5)
    h = 1e-5
    for _ in range(3):  # directional derivatives over all generator weights
        d = torch.randn(phi0.shape, generator=g, dtype=DT)
        d /= d.norm()
        fd = (stepped_objective(m, reg, views, phi0 + h * d, lr) - stepped_objective(m, reg, views, phi0 - h * d, lr)) / (2 * h)
        assert float(exact @ d) == pytest.approx(fd, rel=1e-6, abs=1e-9)
    # full central differences on the last bias of each generator
    names = list(reg.named_meta_parameters())
    offsets, start = {}, 0
    for name, p in reg.named_meta_parameters().items():
        offsets[name] = (start, p.numel())
        start += p.numel()
    for name in [k for k in names if k.endswith("mlp.6.bias")]:  # Linear-BN-ReLU x 2, then Linear (index 6)
        a, size = offsets[name]
        for j in range(size):
            e = torch.zeros_like(phi0)
            e[a + j] = h
            fd = (stepped_objective(m, reg, views, phi0 + e, lr) - stepped_objective(m, reg, views, phi0 - e, lr)) / (2 * h)
            assert float(exact[a + j]) == pytest.approx(fd, rel=1e-6, abs=1e-9), (name, j)

    # first order: ∇φ L(θ', φ) at a fixed θ'; its difference to the exact value is not negligible
    reg.grad_mode = "first_order"
    first = parameters_to_vector(list(reg.compute_meta_gradient(ctx).grads.values()))
    tp = theta_prime_of(m, reg, views, lr)
    d = torch.randn(phi0.shape, generator=g, dtype=DT)
    d /= d.norm()
    fd = (stepped_objective(m, reg, views, phi0 + h * d, lr, tp) - stepped_objective(m, reg, views, phi0 - h * d, lr, tp)) / (2 * h)
    assert float(first @ d) == pytest.approx(fd, rel=1e-6, abs=1e-9)
    assert (exact - first).norm() > 1e-3 * first.norm()
    # finite differences (DARTS) at a small radius approach the exact second order
    reg.grad_mode, reg.fd_radius = "finite_difference", 1e-5
    approx = parameters_to_vector(list(reg.compute_meta_gradient(ctx).grads.values()))
    assert (approx - exact).norm() <= 1e-4 * (exact - first).norm()


@pytest.mark.parametrize("method", ["simclr", "moco_v2", "vicreg"])
def test_forward_over_reverse_equals_reverse(method):
    """The exact second order the engine takes under DDP (jvp of the generators' gradient)
    equals the create_graph one: the objective is torch.func-safe."""
    m, reg = make(method, DT, weight_gen=0.5, weight_mi=0.5, virtual_lr=0.3)
    opt = encoder_opt(m)
    ctx = context(m, opt, views_for(DT))
    loss = reg.loss_function(m, ctx.views)
    params = reg.virtual_parameters(m)
    rev = reg.meta_gradient(ctx, params, loss, loss, second_order_method="reverse").grads
    fwd = reg.meta_gradient(ctx, params, loss, loss, second_order_method="forward").grads
    for k in rev:
        torch.testing.assert_close(fwd[k], rev[k], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("order", ["reuse", "official"])
def test_meta_step_leaves_state_untouched(order):
    m, reg = make("moco_v2", weight_gen=0.5, order=order)
    opt = encoder_opt(m)
    training_step(m, reg, views_for(seed=3), None, opt, None)
    ctx = context(m, opt, views_for())
    loss, _, _ = encoder_objective(m, reg, ctx.views, ctx=ctx)
    loss.backward()
    before = training_state(m, reg, opt)
    for mode in ("second_order", "first_order", "finite_difference"):
        reg.grad_mode = mode
        reg.compute_meta_gradient(ctx)
    assert_training_state_is(before, m, reg, opt)  # batch-norm statistics, a MoCo queue, weights, grads, momentum


def test_training_step_runs_v1_official_and_assigns_the_meta_gradient():
    """Encoder step first, then the meta-gradient at the *updated* weights, assigned to .grad
    (nothing of the encoder objective leaks in), then one generator SGD step."""
    m, reg = make("simclr", weight_gen=0.5, weight_mi=0.5, meta_momentum=0.0, meta_weight_decay=0.0, meta_lr=0.7, order="official")
    opt = encoder_opt(m)
    meta_opt, _ = reg.configure_meta_optimizer(10)
    views = views_for()
    m_ref, reg_ref, opt_ref = copy.deepcopy((m, reg, opt))
    opt_ref.zero_grad()
    encoder_objective(m_ref, reg_ref, views)[0].backward()
    opt_ref.step()
    expected = reg_ref.compute_meta_gradient(context(m_ref, opt_ref, views)).grads
    phi0 = {k: p.detach().clone() for k, p in reg.named_meta_parameters().items()}
    logs = training_step(m, reg, views, None, opt, meta_opt)
    for k, p in reg.named_meta_parameters().items():
        torch.testing.assert_close(p.grad, expected[k])
        torch.testing.assert_close(p.detach(), phi0[k] - 0.7 * expected[k])
    for k in ("loss_base", "loss_gen", "loss_mi", "meta/outer_loss", "meta/grad_norm", "reg/sim_gen_pos"):
        assert k in logs


# -- order=reuse: the meta step at θ_t from the real step ------------------------------------------------------
def real_step_context(m, reg, opt, views):
    """The context of a real step up to ``before_encoder_step``: forward, backward, no optimizer step."""
    ctx = context(m, opt, views)
    opt.zero_grad(set_to_none=True)
    encoder_objective(m, reg, views, ctx=ctx)[0].backward()
    return ctx


def full_fd_gradient(m, reg, views, lr, h=1e-5):
    """Central differences over every generator weight of L(θ_t − lr ∇θ L(θ_t, φ), φ)."""
    phi0 = parameters_to_vector(reg.meta_parameters()).detach()
    fd = torch.zeros_like(phi0)
    for j in range(phi0.numel()):
        e = torch.zeros_like(phi0)
        e[j] = h
        fd[j] = (stepped_objective(m, reg, views, phi0 + e, lr) - stepped_objective(m, reg, views, phi0 - e, lr)) / (2 * h)
    return fd


def cosine(a, b):
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("method", ["simclr", "moco_v2"])
def test_reuse_meta_gradient_is_the_exact_bilevel_gradient_at_theta_t(method):
    """order=reuse (real gradient, output-difference tangent) equals central differences over all
    of φ of L(θ_t − η_in ∇θ L(θ_t, φ), φ), computed on deep copies by autograd and a manual step."""
    lr = 0.3
    m, reg = make(method, DT, weight_gen=0.5, weight_mi=0.5, margin_pos_weight=1.0, virtual_lr=lr, generator_hidden_dim=4)
    opt = encoder_opt(m)
    training_step(m, reg, views_for(DT, seed=7), None, opt, reg.configure_meta_optimizer(10)[0])  # moved weights, state
    views = views_for(DT)
    ctx = real_step_context(m, reg, opt, views)
    result = reg.compute_meta_gradient(ctx)
    reuse = parameters_to_vector(list(result.grads.values()))
    fd = full_fd_gradient(m, reg, views, lr)
    first = parameters_to_vector(list(result.first_order.values()))
    assert cosine(reuse, fd) >= 0.9999 and float((reuse - fd).norm() / fd.norm()) < 1e-3
    assert float((first - fd).norm() / fd.norm()) > 0.05  # the second-order term is not negligible here
    # the same at θ_t by the engine's exact forward-over-reverse (fresh gradient): the tangent error
    exact = parameters_to_vector(list(reg.compute_meta_gradient(ctx, "official").grads.values()))
    assert float((exact - fd).norm() / fd.norm()) < 1e-5
    err = float((reuse - exact).norm() / exact.norm())
    reg.tangent_radius = 1e-7
    finer = parameters_to_vector(list(reg.compute_meta_gradient(ctx).grads.values()))
    assert float((finer - exact).norm() / exact.norm()) < err / 20  # one-sided difference: linear in the radius


@pytest.mark.parametrize("method", ["byol", "vicreg"])
def test_reuse_matches_the_exact_term_for_target_bases(method):
    lr = 0.3
    m, reg = make(method, DT, weight_gen=0.5, weight_mi=0.5, virtual_lr=lr)
    ctx = real_step_context(m, reg, encoder_opt(m), views_for(DT))
    reuse = parameters_to_vector(list(reg.compute_meta_gradient(ctx).grads.values()))
    exact = parameters_to_vector(list(reg.compute_meta_gradient(ctx, "official").grads.values()))
    assert cosine(reuse, exact) >= 0.9999 and float((reuse - exact).norm() / exact.norm()) < 1e-3


def test_training_step_reuse_takes_the_meta_gradient_before_the_encoder_step():
    m, reg = make("moco_v2", weight_gen=0.5, weight_mi=0.5, meta_momentum=0.0, meta_weight_decay=0.0, meta_lr=0.7)
    assert reg.order == "reuse"
    opt = encoder_opt(m)
    meta_opt, _ = reg.configure_meta_optimizer(10)
    views = views_for()
    m_ref, reg_ref, opt_ref = copy.deepcopy((m, reg, opt))
    expected = reg_ref.compute_meta_gradient(real_step_context(m_ref, reg_ref, opt_ref, views)).grads
    phi0 = {k: p.detach().clone() for k, p in reg.named_meta_parameters().items()}
    theta0 = parameters_to_vector(m.trainable_parameters()).detach().clone()
    logs = training_step(m, reg, views, None, opt, meta_opt)
    for k, p in reg.named_meta_parameters().items():
        torch.testing.assert_close(p.grad, expected[k])
        torch.testing.assert_close(p.detach(), phi0[k] - 0.7 * expected[k])
    assert not torch.equal(parameters_to_vector(m.trainable_parameters()).detach(), theta0)
    assert logs["meta/grad_norm"] > 0 and "meta/second_order_norm" in logs


def test_reuse_needs_the_real_step():
    m, reg = make("simclr")
    opt = encoder_opt(m)
    with pytest.raises(RuntimeError, match="use order=official"):
        reg.compute_meta_gradient(context(m, opt, views_for()))
    with pytest.raises(RuntimeError, match="before_encoder_step, which did not run"):
        reg.meta_step(context(m, opt, views_for()))


@pytest.mark.parametrize("mode", ["first_order", "finite_difference"])
def test_reuse_other_grad_modes_agree_with_official_at_theta_t(mode):
    m, reg = make("simclr", DT, weight_gen=0.5, weight_mi=0.5, virtual_lr=0.3, grad_mode=mode, fd_radius=1e-5)
    ctx = real_step_context(m, reg, encoder_opt(m), views_for(DT))
    reuse = parameters_to_vector(list(reg.compute_meta_gradient(ctx).grads.values()))
    official = parameters_to_vector(list(reg.compute_meta_gradient(ctx, "official").grads.values()))
    torch.testing.assert_close(reuse, official, rtol=1e-7, atol=1e-10)


def test_reuse_under_bf16_uses_a_full_precision_base_point():
    """Under autocast the real outputs are bf16: the difference's base point is a fresh fp32
    forward (with the bf16 outputs as base point the tangent is rounding noise: cosine 0.3 to
    the fp32 result, measured).  The result agrees with the exact term at θ_t under the same
    autocast (the bf16 inner gradient is what separates both from fp32 here)."""
    m, reg = make("simclr", weight_gen=0.5, weight_mi=0.5, virtual_lr=0.3)
    opt = encoder_opt(m)
    views = views_for()
    ctx32 = real_step_context(m, reg, opt, views)
    fp32 = parameters_to_vector(list(reg.compute_meta_gradient(ctx32).grads.values()))
    fp32_exact = parameters_to_vector(list(reg.compute_meta_gradient(ctx32, "official").grads.values()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ctx = real_step_context(m, reg, opt, views)
        assert ctx.out["z"][0].dtype == torch.bfloat16
        assert reg._full_precision_out(ctx, next(m.parameters())) is None
        bf16 = parameters_to_vector(list(reg.compute_meta_gradient(ctx).grads.values()))
        bf16_exact = parameters_to_vector(list(reg.compute_meta_gradient(ctx, "official").grads.values()))
    assert bf16.dtype == torch.float32 and cosine(bf16, bf16_exact) > 0.995
    assert abs(cosine(bf16, fp32) - cosine(bf16_exact, fp32_exact)) < 0.02


def test_moco_queue_only_ever_holds_real_keys(monkeypatch):
    """One enqueue per training step, of the real keys of view 0 (the target network's, before
    its EMA step); the meta step and the generated queries never write to the queue."""
    m, reg = make("moco_v2", weight_gen=0.5, weight_mi=0.5)
    opt = encoder_opt(m)
    meta_opt, _ = reg.configure_meta_optimizer(10)
    calls = []
    original = m.enqueue
    monkeypatch.setattr(m, "enqueue", lambda keys: (calls.append(keys.clone()), original(keys))[1])
    for step in range(3):
        views = views_for(seed=10 + step)
        with torch.no_grad():
            expected = copy.deepcopy(m).target_embed(views[0])
        queue_before, ptr = m.queue.clone(), int(m.queue_ptr)
        training_step(m, reg, views, None, opt, meta_opt, global_step=step)
        assert len(calls) == step + 1
        torch.testing.assert_close(calls[-1], expected)
        idx = (ptr + torch.arange(8)) % 16
        torch.testing.assert_close(m.queue[idx], F.normalize(expected, dim=1))
        rest = torch.ones(16, dtype=torch.bool)
        rest[idx] = False
        assert torch.equal(m.queue[rest], queue_before[rest])
