"""MetAug (metassl.regularizers.metaug) on tiny networks."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from metassl.config import load_config
from metassl.engine.step import encoder_objective, training_step
from metassl.losses import moco_infonce, nt_xent
from metassl.meta import frozen_bn_stats
from metassl.methods import METHODS, build_method
from metassl.regularizers import REGULARIZERS, MetAug, StepContext, build_regularizer
from metassl.regularizers.base import check_regularizer, regularizer_hparams

DT = torch.float64
FEAT = 6

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_backbone() -> nn.Module:
    """Conv -> BN -> Tanh -> global pool: (B, 3, 6, 6) -> (B, 6), smooth for finite differences."""
    return nn.Sequential(nn.Conv2d(3, FEAT, 3, padding=1), nn.BatchNorm2d(FEAT), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def make(method: str = "simclr", dtype=torch.float32, seed: int = 0, **reg_kw):
    torch.manual_seed(seed)
    kw = dict(proj_hidden_dim=8, proj_output_dim=5)
    if method == "moco_v2":
        kw["queue_size"] = 16
    if method in ("byol", "simsiam"):
        kw["pred_hidden_dim"] = 8
    m = build_method(method, tiny_backbone(), FEAT, **kw)
    reg = build_regularizer("metaug", m, **{"generator_hidden_dim": 8, **reg_kw})
    return m.to(dtype), reg.to(dtype)


def views_for(dtype=torch.float32, n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    v0 = torch.randn(n, 3, 6, 6, generator=g)
    return [v0.to(dtype), (0.7 * v0 + 0.7 * torch.randn(n, 3, 6, 6, generator=g)).to(dtype)]


def encoder_opt(m, lr=0.1):
    return torch.optim.SGD(m.trainable_parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)


def context(m, opt, views) -> StepContext:
    return StepContext(method=m, views=views, encoder_optimizer=opt, lr=opt.param_groups[0]["lr"])


def generated(reg, q):
    """G_v(q_v) with the generators as modules (an independent path from the functional one)."""
    return torch.stack([gen(q[v]) for v, gen in enumerate(reg.generators)])


# -- construction, presets, bad options -------------------------------------------------------------
def test_registry_config_and_paper_preset():
    assert REGULARIZERS["metaug"] is MetAug
    cfg = load_config(["regularizer=metaug"])
    assert {k: v for k, v in cfg.regularizer.items() if k != "name"} == regularizer_hparams("metaug")
    paper = load_config(["paper=metaug_official"])
    assert paper.method.name == "moco_v2" and paper.method.queue_size == 1024 and paper.batch_size == 64
    assert paper.regularizer.gamma == 16.0 and paper.regularizer.loss_scale is None and paper.trainer.max_epochs == 300
    assert paper.optimizer.lr == 0.03 and not paper.optimizer.scale_lr and paper.method.temperature == 2 / paper.regularizer.gamma
    _, reg = make()
    assert len(reg.generators) == 2 and reg.encoder_parameters() == []
    assert set(map(id, reg.meta_parameters())) == {id(p) for g in reg.generators for p in g.parameters()}
    assert reg.gamma_in_use == pytest.approx(2 / 0.5)  # SimCLR's temperature 0.5
    assert make("byol")[1].gamma_in_use == 16.0 and make("moco_v2")[1].gamma_in_use == pytest.approx(10.0)
    assert make("byol")[1].generators[0].mlp[0].in_features == 5  # the predictor's output
    opt, sched = reg.configure_meta_optimizer(10)
    assert isinstance(opt, torch.optim.SGD) and sched is None
    assert opt.param_groups[0]["lr"] == 0.03 and opt.param_groups[0]["weight_decay"] == 1e-4


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(grad_mode="exact"), "grad_mode"),
        (dict(margin_type="huge"), "margin_type"),
        (dict(schedule="fast"), "schedule must be one of"),
        (dict(schedule="original"), "second encoder optimizer step"),
        (dict(schedule="v2"), "use schedule=v1"),
        (dict(order="before"), "order must be one of reuse, official"),
        (dict(tangent_radius=0.0), "tangent_radius must be positive"),
        (dict(gamma=-1.0), "gamma must be positive"),
        (dict(loss_scale=0.0), "loss_scale"),
        (dict(delta_margin=1.5), "delta_margin"),
        (dict(weight_gen=0.0, weight_mi=0.0), "use regularizer=none"),
        (dict(weight_gen=-1.0), "weight_gen"),
        (dict(generator_num_layers=0), "generator_num_layers"),
        (dict(virtual_lr=0.0), "virtual_lr"),
        (dict(meta_scheduler="step"), "meta_scheduler"),
    ],
)
def test_bad_options_one_line(kw, match):
    with pytest.raises(ValueError, match=match) as err:
        MetAug(**kw)
    assert len(str(err.value).splitlines()) == 1


def test_unknown_base_method_refused_in_one_line():
    assert all(MetAug.supports(name) is None for name in METHODS)
    reason = MetAug.supports("dino")
    assert reason and "metaug_scores.py" in reason and len(reason.splitlines()) == 1
    check_regularizer("metaug", "simclr")


# -- the score sets ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["simclr", "moco_v2"])
def test_real_unified_loss_is_the_base_infonce(method):
    """gamma = null (2 / temperature), loss_scale 1, no delta: L_U(real) equals the base loss."""
    m, reg = make(method, DT)
    out = m(views_for(DT))
    meta = reg.named_meta_parameters()
    terms, _ = reg.terms(m, out, meta)
    z = out["z"]
    if method == "simclr":
        expected = nt_xent(z[0], z[1], 0.5)
    else:
        expected = (moco_infonce(z[0], out["z_target"][1], m.queue, 0.2) + moco_infonce(z[1], out["z_target"][0], m.queue, 0.2)) / 2
    torch.testing.assert_close(terms["base"], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms["base"], m.loss(out), rtol=1e-12, atol=1e-12)
    reg.gamma_in_use = 16.0  # any other gamma is no longer the base loss
    assert not torch.allclose(reg.terms(m, out, meta)[0]["base"], expected)


def infonce_rows(q, pos, negs, tau, normalize_negs=True):
    """-log(e^{q.p/t} / (e^{q.p/t} + sum_k e^{q.k/t})) of one row, L2-normalised inputs (the
    MoCo queue is used as stored, as MoCo does)."""
    q, pos = F.normalize(q, dim=0), F.normalize(pos, dim=0)
    negs = F.normalize(negs, dim=1) if normalize_negs else negs
    logits = torch.cat([(q @ pos)[None], negs @ q]) / tau
    return -torch.log_softmax(logits, 0)[0]


def gen_term_by_hand(per_view_rows, weight):
    """w_gen (sum_v L_U(G_v) + L_U(G_all)), rows of view v in per_view_rows[v]."""
    means = [sum(r) / len(r) for r in per_view_rows]
    return weight * (sum(means) + sum(sum(r) for r in per_view_rows) / sum(len(r) for r in per_view_rows))


def test_simclr_generated_queries_face_the_same_keys():
    """G_v(z_v,i) replaces z_v,i as a query: positive z_u,i, negatives both views of the other
    images, its own real embedding no candidate (hand computation); margins from real scores."""
    m, reg = make("simclr", DT, weight_gen=0.3)
    out = m(views_for(DT))
    terms, scores = reg.terms(m, out, reg.named_meta_parameters())
    z = [F.normalize(t, dim=1) for t in out["z"]]
    g = generated(reg, torch.stack(z))
    n = z[0].shape[0]
    rows = []
    for v in range(2):
        u = 1 - v
        rows.append([infonce_rows(g[v, i], z[u][i], torch.cat([z[0][torch.arange(n) != i], z[1][torch.arange(n) != i]]), 0.5)
                     for i in range(n)])
    torch.testing.assert_close(terms["gen"], gen_term_by_hand(rows, 0.3), rtol=1e-10, atol=1e-12)
    # the cosine scores: generated positives against the other view
    torch.testing.assert_close(scores["gen_pos"][0, :, 0], (F.normalize(g[0], dim=1) * z[1]).sum(1))
    assert scores["mask"].shape == (2, n, 2 * n) and int(scores["mask"][0].sum()) == n * (2 * n - 2)


def test_moco_generated_queries_against_the_queue():
    m, reg = make("moco_v2", DT, weight_gen=0.2, weight_mi=0.0)
    out = m(views_for(DT))
    terms, _ = reg.terms(m, out, reg.named_meta_parameters())
    q = torch.stack([F.normalize(t, dim=1) for t in out["z"]])
    g = generated(reg, q)
    rows = [[infonce_rows(g[v, i], out["z_target"][1 - v][i], m.queue, 0.2, False) for i in range(q.shape[1])] for v in range(2)]
    torch.testing.assert_close(terms["gen"], gen_term_by_hand(rows, 0.2), rtol=1e-10, atol=1e-12)
    assert terms["mi"] == 0


@pytest.mark.parametrize("method", ["byol", "simsiam", "barlow_twins"])
def test_non_contrastive_bases_keep_their_loss_and_add_an_in_batch_term(method):
    """Base: the method's own loss.  Generated queries (from the prediction where there is one)
    against the other view's detached targets of the batch, gamma = 16 (tau = 1/8)."""
    m, reg = make(method, DT, weight_gen=0.5)
    out = m(views_for(DT))
    terms, _ = reg.terms(m, out, reg.named_meta_parameters())
    torch.testing.assert_close(terms["base"], m.loss(out))
    queries = out["p"] if "p" in out else out["z"]
    targets = out["z_target"] if "z_target" in out else out["z"]
    g = generated(reg, torch.stack([F.normalize(t, dim=1) for t in queries]))
    n = g.shape[1]
    rows = [[infonce_rows(g[v, i], targets[1 - v][i], targets[1 - v][torch.arange(n) != i], 2 / 16) for i in range(n)] for v in range(2)]
    torch.testing.assert_close(terms["gen"], gen_term_by_hand(rows, 0.5), rtol=1e-10, atol=1e-12)


def test_margin_injection_and_delta_margin_options():
    m, reg = make("simclr", DT, weight_gen=1e-3, weight_mi=2.0, margin_pos_weight=0.5, delta_margin=0.25, margin_type="mean")
    out = m(views_for(DT))
    terms, s = reg.terms(m, out, reg.named_meta_parameters())
    from metassl.losses.unified import margin_injection_loss, unified_contrastive_loss

    mi = margin_injection_loss(s["gen_pos"], s["gen_neg"], s["real_pos"], s["real_neg"], "mean", 0.5, neg_mask=s["mask"])
    torch.testing.assert_close(terms["mi"], 2.0 * mi)
    base = unified_contrastive_loss(s["real_pos"], s["real_neg"], 4.0, 0.25, neg_mask=s["mask"], scale=1.0)
    torch.testing.assert_close(terms["base"], base)
    assert not torch.allclose(terms["base"], m.loss(out))


# -- the encoder objective -------------------------------------------------------------------------------
def test_encoder_step_freezes_the_generators_but_trains_through_them():
    m, reg = make("simclr", weight_gen=0.5)
    views = views_for()
    loss, _, _ = encoder_objective(m, reg, views)
    loss.backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in reg.meta_parameters())
    with_gen = m.projector[0].weight.grad.clone()
    m.zero_grad()
    encoder_objective(m, reg, views)[1]["base"].backward()
    assert not torch.allclose(with_gen, m.projector[0].weight.grad)  # the generated term reached the encoder


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
    bufs = {n: b.clone() for n, b in list(m.named_buffers()) + list(reg.named_buffers())}
    params = {n: p.detach().clone() for n, p in m.named_parameters()}
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    state = {id(p): s["momentum_buffer"].clone() for p, s in opt.state.items()}
    for mode in ("second_order", "first_order", "finite_difference"):
        reg.grad_mode = mode
        reg.compute_meta_gradient(ctx)
    for n, b in list(m.named_buffers()) + list(reg.named_buffers()):
        assert torch.equal(b, bufs[n]), n  # batch-norm statistics and the MoCo queue
    for n, p in m.named_parameters():
        assert torch.equal(p, params[n]), n
        if n in grads:
            assert torch.equal(p.grad, grads[n]), n
    for p, s in opt.state.items():
        assert torch.equal(s["momentum_buffer"], state[id(p)])


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


# -- every base method, logging, artefacts ------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_steps_with_every_base_method(method):
    m, reg = make(method, weight_gen=0.1, weight_mi=0.1)
    opt = encoder_opt(m, lr=0.05)
    meta_opt, _ = reg.configure_meta_optimizer(10)
    phi0 = parameters_to_vector(reg.meta_parameters()).detach().clone()
    for step in range(2):
        logs = training_step(m, reg, views_for(seed=step), None, opt, meta_opt, global_step=step)
        assert all(math.isfinite(float(v)) for v in logs.values()), logs
        assert float(logs["loss"]) == pytest.approx(float(logs["loss_base"] + logs["loss_gen"] + logs["loss_mi"]), rel=1e-5)
        assert logs["loss_gen"] > 0 and logs["loss_mi"] >= 0 and logs["meta/grad_norm"] > 0
    phi = parameters_to_vector(reg.meta_parameters()).detach()
    assert not torch.equal(phi, phi0) and torch.isfinite(phi).all()


@pytest.mark.parametrize("options", [dict(virtual_step="mirror"), dict(grad_mode="finite_difference", fd_scheme="forward"),
                                     dict(meta_optimizer="adam", meta_scheduler="cosine", virtual_lr=None)])
def test_other_step_rules_and_meta_optimizers_run(options):
    m, reg = make("moco_v2", weight_gen=0.5, **options)
    opt = encoder_opt(m)
    meta_opt, _ = reg.configure_meta_optimizer(10)
    phi0 = parameters_to_vector(reg.meta_parameters()).detach().clone()
    logs = training_step(m, reg, views_for(), None, opt, meta_opt)
    assert torch.isfinite(logs["loss"]) and logs["meta/grad_norm"] > 0
    assert not torch.equal(parameters_to_vector(reg.meta_parameters()).detach(), phi0)


def test_paper_preset_builds():
    """paper=metaug_official's method and regularizer sections as written (small backbone)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(load_config(["paper=metaug_official"]), resolve=True)
    m = build_method("moco_v2", tiny_backbone(), FEAT, **{k: v for k, v in cfg["method"].items() if k != "name"})
    reg = build_regularizer("metaug", m, **{k: v for k, v in cfg["regularizer"].items() if k != "name"})
    assert reg.gamma_in_use == 16.0 and reg.loss_scale is None and reg.generators[0].mlp[0].in_features == 128
    out = m(views_for())
    terms, _ = reg.terms(m, out, reg.named_meta_parameters())
    torch.testing.assert_close(terms["base"], m.loss(out))  # tau = 2 / gamma and 16 / gamma = 1


def test_log_stats_and_similarity_artefacts(tmp_path):
    m, reg = make("simclr")
    assert reg.log_stats() == {}
    reg.on_train_end(tmp_path / "none")  # before any step: nothing to plot
    assert not (tmp_path / "none").exists()
    opt = encoder_opt(m)
    training_step(m, reg, views_for(), None, opt, reg.configure_meta_optimizer(10)[0])
    stats = reg.log_stats()
    assert set(stats) == set(MetAug.STAT_NAMES)
    s = reg.last_scores
    assert stats["sim_real_pos"] == pytest.approx(float(s["real_pos"].mean()))
    assert stats["sim_gen_neg"] == pytest.approx(float(s["gen_neg"][s["mask"]].mean()))
    assert -1 <= stats["sim_gen_to_real"] <= 1 and 0 <= stats["gen_pos_easier_than_real"] <= 1
    reg.on_train_end(tmp_path / "run")
    assert (tmp_path / "run" / "metaug_similarities.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((tmp_path / "run" / "metaug_similarities.json").read_text())
    assert report["pairs"] == {"real_pos": 16, "gen_pos": 16, "real_neg": 16 * 14, "gen_neg": 16 * 14}
    assert sum(report["counts"]["gen_neg"]) == 16 * 14 and len(report["bin_edges"]) == 41
    assert report["sim_real_pos"] == pytest.approx(stats["sim_real_pos"])


def test_bf16_autocast_step():
    m, reg = make("simclr", weight_gen=0.5)
    opt = encoder_opt(m)
    meta_opt, _ = reg.configure_meta_optimizer(10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logs = training_step(m, reg, views_for(), None, opt, meta_opt)
    assert torch.isfinite(logs["loss"]) and logs["loss_base"].dtype == torch.float32
    assert all(p.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in reg.meta_parameters())
    assert logs["meta/grad_norm"] > 0


def test_cli_smoke_run_writes_the_similarity_artefacts(tmp_path):
    """`metassl train regularizer=metaug` end to end (2 steps): every term logged, the artefacts written."""
    from metassl.cli import main

    out = tmp_path / "run"
    args = ["train", "protocol=smoke", "regularizer=metaug", f"output_dir={out}", "data.num_train=96", "data.num_test=40",
            "method.proj_hidden_dim=32", "method.proj_output_dim=16", "regularizer.generator_hidden_dim=32",
            "trainer.max_steps=2", "eval.linear_probe=false"]
    assert main(args) == 0
    assert json.loads((out / "summary.json").read_text())["regularizer"] == "metaug"
    header = (out / "metrics.csv").read_text().splitlines()[0]
    for column in ("train/loss_base", "train/loss_gen", "train/loss_mi", "train/meta/grad_norm", "train/reg/sim_gen_pos"):
        assert column in header
    assert (out / "metaug_similarities.png").is_file()
    assert json.loads((out / "metaug_similarities.json").read_text())["pairs"]["gen_pos"] == 2 * 32
