"""MetaMask (metassl.regularizers.metamask) on tiny networks."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from metassl.config import load_config
from metassl.engine.step import encoder_objective, training_step
from metassl.meta import frozen_bn_stats
from metassl.optimizers import LARS
from metassl.methods import METHODS, build_method
from metassl.regularizers import REGULARIZERS, MetaMask, StepContext, build_regularizer
from metassl.regularizers.base import regularizer_hparams

from regularizer_helpers import assert_training_state_is, training_state

DT = torch.float64
FEAT = 6


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_backbone() -> nn.Module:
    """Conv -> BN -> Tanh -> global pool: (B, 3, 6, 6) -> (B, 6), smooth for finite differences."""
    return nn.Sequential(nn.Conv2d(3, FEAT, 3, padding=1), nn.BatchNorm2d(FEAT), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def tiny_method(method: str):
    kw = dict(proj_hidden_dim=8, proj_output_dim=5)
    if method == "moco_v2":
        kw["queue_size"] = 16
    if method in ("byol", "simsiam"):
        kw["pred_hidden_dim"] = 8
    return build_method(method, tiny_backbone(), FEAT, **kw)


def make(method: str = "simclr", dtype=torch.float32, seed: int = 0, **reg_kw):
    torch.manual_seed(seed)
    m = tiny_method(method)
    # the first implementation's weighting and exact jvp form: the reference computations below
    # were written for it (the rescaled defaults and the feature-difference tangent are tested
    # in test_metamask_pinned.py and test_virtual_step_rules.py)
    kw = dict(weight_base=10.0, drr_normalize=False, backbone_tangent="jvp", meta_optimizer="sgd", meta_lr=1e-3)
    reg = build_regularizer("metamask", m, drr_hidden_dim=8, drr_output_dim=7, **{**kw, **reg_kw})
    m.to(dtype)
    reg.to(dtype)
    return m, reg


def encoder_opt(m, reg, lr=0.2, momentum=0.9, wd=5e-4):
    return torch.optim.SGD(list(m.trainable_parameters()) + reg.encoder_parameters(), lr=lr, momentum=momentum, weight_decay=wd)


def views_for(dtype=torch.float32, n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 6, 6, generator=g).to(dtype) for _ in range(2)]


def real_backward(m, reg, opt, views):
    opt.zero_grad(set_to_none=True)
    loss, _, out = encoder_objective(m, reg, views, None)
    loss.backward()
    return StepContext(method=m, views=views, out=out, labels=None, encoder_optimizer=opt, lr=opt.param_groups[0]["lr"], progress=0.0, global_step=0)


# -- the mask and where it acts ------------------------------------------------------------------
def test_registry_config_and_init():
    assert REGULARIZERS["metamask"] is MetaMask
    m, reg = make()
    assert torch.equal(reg.mask(), torch.full((FEAT,), 0.5))
    assert reg.meta_parameters() == [reg.mask_logits]
    assert all(p is not reg.mask_logits for p in reg.encoder_parameters())
    assert sum(p.numel() for p in reg.encoder_parameters()) == sum(p.numel() for p in reg.drr_projector.parameters())
    # the YAML preset lists exactly the constructor's hyper-parameters, with its defaults
    cfg = load_config(["regularizer=metamask"])
    keys = {k: v for k, v in cfg.regularizer.items() if k != "name"}
    assert keys == regularizer_hparams("metamask")
    assert load_config(["regularizer=none"]).regularizer.name == "none"
    paper = load_config(["paper=metamask_cifar10"])
    assert paper.regularizer.name == "metamask" and paper.method.temperature == 0.07 and paper.batch_size == 512
    assert paper.eval.knn.k == 5 and list(paper.eval.knn_extra[0]) == [200, 0.1] and paper.seed == 1
    with pytest.raises(ValueError, match="grad_mode"):
        MetaMask(grad_mode="exact")


@pytest.mark.parametrize("method", ["simclr", "byol", "moco_v2"])
def test_mask_before_every_projector_and_target_sees_it(method):
    m, reg = make(method)
    with torch.no_grad():
        reg.mask_logits.copy_(torch.linspace(-2, 2, FEAT))
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, mod in list(m.named_children()) + [("drr_projector", reg.drr_projector)]:
        if "projector" in name:
            hooks.append(mod.register_forward_pre_hook(lambda _m, a, name=name: seen.setdefault(name, []).append(a[0].detach())))
    views = views_for()
    out = m(views, feature_transform=reg.transform_features)
    reg.extra_loss(out, StepContext(method=m, views=views, out=out))
    for h in hooks:
        h.remove()
    mask = reg.mask().detach()
    for f, h in zip(out["f"], out["h"]):
        torch.testing.assert_close(f, h * mask)
    torch.testing.assert_close(seen["projector"][0], out["h"][0] * mask)
    torch.testing.assert_close(seen["drr_projector"][0], out["h"][0] * mask)
    if method != "simclr":  # the target network sees the same mask (detached)
        with torch.no_grad():
            h_t = m.target_backbone(views[0]).flatten(1)
        target_inputs = seen["target_projector"]
        assert any(torch.allclose(t, h_t * mask) for t in target_inputs)


def test_mask_gets_no_gradient_from_the_encoder_objective():
    m, reg = make()
    opt = encoder_opt(m, reg)
    real_backward(m, reg, opt, views_for())
    g = reg.mask_logits.grad
    assert g is None or torch.count_nonzero(g) == 0
    assert all(p.grad is not None for p in reg.drr_projector.parameters())
    assert m.backbone[0].weight.grad is not None


def test_eval_transform_log_stats_and_files(tmp_path):
    m, reg = make()
    with torch.no_grad():
        reg.mask_logits.copy_(torch.linspace(-1, 1, FEAT))
    t = reg.eval_transform()
    h = torch.randn(4, FEAT)
    torch.testing.assert_close(t(h), h * torch.sigmoid(torch.linspace(-1, 1, FEAT)))
    assert not any(p.requires_grad for p in t.parameters())
    stats = reg.log_stats()
    assert set(stats) == {"mask_mean", "mask_min", "mask_max", "mask_std", "mask_frac_below_half"}
    assert stats["mask_frac_below_half"] == pytest.approx(0.5)
    reg.on_train_end(tmp_path / "run")
    assert (tmp_path / "run" / "mask.png").read_bytes()[:4] == b"\x89PNG"
    torch.testing.assert_close(torch.load(tmp_path / "run" / "mask.pt"), torch.sigmoid(torch.linspace(-1, 1, FEAT)))
    assert len(json.loads((tmp_path / "run" / "mask.json").read_text())["mask"]) == FEAT


# -- the meta-gradient against an independent finite-difference reference --------------------------
def reference_meta_grad(m, reg, opt, views, *, order: str, virtual: str = "all", implicit: str = "all", h: float = 1e-6):
    """Central differences in the mask logits of L_base after a real torch.optim.SGD step on
    deep copies (``order=reuse``: the step of the encoder objective from the current weights;
    ``official``: from the current weights a fresh step of L_base alone).  ``virtual=heads``:
    only head parameters step; ``implicit=heads``: the backbone's step is taken at the
    unperturbed logits (so only the heads' step depends on the mask)."""
    w0 = reg.mask_logits.detach().clone()

    def stepped(w: torch.Tensor):
        mc, rc, oc = copy.deepcopy((m, reg, opt))
        with torch.no_grad():
            rc.mask_logits.copy_(w)
        for p in list(mc.parameters()) + list(rc.parameters()):
            p.grad = None
        with frozen_bn_stats([mc, rc]):
            if order == "reuse":
                loss, _, _ = encoder_objective(mc, rc, views, None)
            else:
                loss = mc.loss(mc(views, feature_transform=rc.transform_features))
            loss.backward()
            if virtual == "heads":
                for p in mc.backbone.parameters():
                    p.grad = None
            oc.step()
        return mc, rc

    def outer(w: torch.Tensor) -> float:
        mc, rc = stepped(w)
        if implicit == "heads" and virtual == "all":
            m0, _ = stepped(w0)
            mc.backbone.load_state_dict(m0.backbone.state_dict())
        with frozen_bn_stats([mc, rc]), torch.no_grad():
            rc.mask_logits.copy_(w)
            return float(mc.loss(mc(views, feature_transform=rc.transform_features)))

    grad = torch.zeros_like(w0)
    for i in range(w0.numel()):
        e = torch.zeros_like(w0)
        e[i] = h
        grad[i] = (outer(w0 + e) - outer(w0 - e)) / (2 * h)
    return grad


CASES = [
    dict(order="reuse"),
    dict(order="reuse", virtual_params="heads"),
    dict(order="reuse", second_order_params="heads"),
    dict(order="official"),
    dict(order="official", virtual_params="heads"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_meta_gradient_matches_finite_difference_reference(case):
    m, reg = make(dtype=DT, **case)
    with torch.no_grad():
        reg.mask_logits.copy_(0.3 * torch.randn(FEAT, dtype=DT))
    opt = encoder_opt(m, reg, lr=0.3)
    views = views_for(DT)
    # one real step first, so that the optimizer holds momentum buffers
    training_step(m, reg, views_for(DT, seed=7), None, opt, None)
    ctx = real_backward(m, reg, opt, views)
    if case["order"] == "official":
        opt.step()  # the official meta step runs from the updated weights
        for p in opt.param_groups[0]["params"]:
            p.grad = None
    ref = reference_meta_grad(
        m, reg, opt, views, order=case["order"], virtual=case.get("virtual_params", "all"), implicit=case.get("second_order_params", "all")
    )
    exact = reg.compute_meta_gradient(ctx)
    torch.testing.assert_close(exact.grads["logits"], ref, rtol=1e-6, atol=1e-9)

    reg.grad_mode = "first_order"
    first = reg.compute_meta_gradient(ctx).grads["logits"]
    term = exact.grads["logits"] - first
    assert term.norm() > 1e-3 * first.norm()  # the second-order term is not negligible here
    reg.grad_mode, reg.fd_radius = "finite_difference", 1e-5
    fd = reg.compute_meta_gradient(ctx).grads["logits"]
    assert (fd - first - term).norm() <= 1e-4 * term.norm()
    reg.grad_mode = "second_order"
    reg.compute_meta_gradient(ctx)
    if case["order"] == "reuse" and case.get("virtual_params") == "heads":  # no backbone pass at all
        assert reg.last_replay.get("replayed", 0) > 0 and reg.last_replay.get("computed", 0) == 0
    if case.get("second_order_params") == "heads":  # outer pass runs the backbone at θ'; the jvp at θ replays
        assert reg.last_replay == {"replayed": len(views), "computed": 0}


def test_meta_step_leaves_bn_buffers_params_and_optimizer_state_untouched():
    m, reg = make()
    opt = encoder_opt(m, reg)
    training_step(m, reg, views_for(seed=3), None, opt, None)
    ctx = real_backward(m, reg, opt, views_for())
    before = training_state(m, reg, opt)
    for mode in ("second_order", "finite_difference", "first_order"):
        reg.grad_mode = mode
        reg.compute_meta_gradient(ctx)
    assert_training_state_is(before, m, reg, opt)  # batch-norm statistics, a MoCo queue, weights, grads, momentum


def test_training_step_assigns_the_meta_gradient():
    """After training_step the mask's .grad is exactly the meta-gradient (nothing of the
    encoder objective leaks in) and the mask moved by one step of its own SGD."""
    m, reg = make(meta_lr=0.5, meta_weight_decay=0.0, meta_momentum=0.0)
    opt = encoder_opt(m, reg)
    meta_opt, sched = reg.configure_meta_optimizer(10)
    assert isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR)
    views = views_for()
    m_ref, reg_ref, opt_ref = copy.deepcopy((m, reg, opt))
    expected = reg_ref.compute_meta_gradient(real_backward(m_ref, reg_ref, opt_ref, views)).grads["logits"]
    w0 = reg.mask_logits.detach().clone()
    logs = training_step(m, reg, views, None, opt, meta_opt)
    torch.testing.assert_close(reg.mask_logits.grad, expected)
    torch.testing.assert_close(reg.mask_logits.detach(), w0 - 0.5 * expected)
    assert "meta/outer_loss" in logs and "reg/mask_mean" in logs


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("options", [dict(), dict(order="official", grad_mode="finite_difference", virtual_params="heads")], ids=["default", "official-fd-heads"])
def test_one_step_with_every_base_method(method, options):
    m, reg = make(method, meta_lr=1.0, **options)
    opt = torch.optim.SGD(list(m.trainable_parameters()) + reg.encoder_parameters(), lr=0.05, momentum=0.9)
    meta_opt, _ = reg.configure_meta_optimizer(10)
    w0 = reg.mask_logits.detach().clone()
    logs = training_step(m, reg, views_for(), None, opt, meta_opt)
    assert torch.isfinite(logs["loss"]) and torch.isfinite(logs["loss_drr"])
    assert logs["loss"] == pytest.approx(float(10 * logs["loss_base"] + logs["loss_drr"]), rel=1e-5)
    assert not torch.equal(reg.mask_logits.detach(), w0)
    assert torch.isfinite(reg.mask_logits).all()


def test_mirror_rejects_other_optimizers_and_sgd_rule_runs():
    m, reg = make()
    opt = torch.optim.RMSprop(list(m.trainable_parameters()) + reg.encoder_parameters(), lr=1e-3)
    meta_opt, _ = reg.configure_meta_optimizer(10)
    with pytest.raises(NotImplementedError, match="virtual_step=sgd"):
        training_step(m, reg, views_for(), None, opt, meta_opt)
    for name in ("adamw", "lars"):  # mirrored (see test_virtual_step_rules.py)
        m, reg = make()
        params = list(m.trainable_parameters()) + reg.encoder_parameters()
        opt = torch.optim.AdamW(params, lr=1e-3) if name == "adamw" else LARS(params, lr=0.1)
        meta_opt, _ = reg.configure_meta_optimizer(10)
        assert training_step(m, reg, views_for(), None, opt, meta_opt)["meta/grad_norm"] > 0
    m, reg = make(virtual_step="sgd", virtual_lr=0.1)
    opt = torch.optim.RMSprop(list(m.trainable_parameters()) + reg.encoder_parameters(), lr=1e-3)
    meta_opt, _ = reg.configure_meta_optimizer(10)
    logs = training_step(m, reg, views_for(), None, opt, meta_opt)
    assert logs["meta/grad_norm"] > 0


def test_bf16_autocast_step():
    """Under autocast the meta step runs in float32 and the mask stays float32."""
    m, reg = make()
    opt = encoder_opt(m, reg)
    meta_opt, _ = reg.configure_meta_optimizer(10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logs = training_step(m, reg, views_for(), None, opt, meta_opt)
    assert torch.isfinite(logs["loss"]) and reg.mask_logits.dtype == torch.float32
    assert torch.isfinite(reg.mask_logits.grad).all() and reg.mask_logits.grad.abs().sum() > 0


@pytest.mark.parametrize("case", [dict(), dict(virtual_params="heads"), dict(second_order_params="heads")], ids=["all", "virtual-heads", "implicit-heads"])
def test_forward_fd_base_point_from_the_real_forward(case, monkeypatch):
    """fd_scheme=forward with order=reuse takes ∇w L_inner(θ_t) from the real forward's features
    (heads only): the same meta-gradient as a full-precision recomputation by the engine, and
    close to the exact second-order one (first-order accurate in the radius)."""
    m, reg = make(dtype=DT, grad_mode="finite_difference", fd_scheme="forward", fd_radius=1e-5, **case)
    with torch.no_grad():
        reg.mask_logits.copy_(0.3 * torch.randn(FEAT, dtype=DT))
    opt = encoder_opt(m, reg, lr=0.3)
    training_step(m, reg, views_for(DT, seed=7), None, opt, None)
    ctx = real_backward(m, reg, opt, views_for(DT))
    replayed = reg.compute_meta_gradient(ctx).grads["logits"]
    if not case:  # the base point replays the real forward's features; θ' and θ+εu run the backbone
        assert reg.last_replay == {"replayed": 2, "computed": 0}
    monkeypatch.setattr(MetaMask, "_full_precision_features", staticmethod(lambda ctx, ref: False))
    fresh = reg.compute_meta_gradient(ctx).grads["logits"]
    torch.testing.assert_close(replayed, fresh, rtol=1e-7, atol=1e-10)
    reg.grad_mode = "second_order"
    exact = reg.compute_meta_gradient(ctx).grads["logits"]
    reg.grad_mode = "first_order"
    first = reg.compute_meta_gradient(ctx).grads["logits"]
    assert (replayed - exact).norm() <= 1e-3 * (exact - first).norm()


def test_meta_precision_autocast():
    """meta_precision=autocast runs the meta passes under the step's bf16 autocast: float32
    meta-gradients close to the fp32 ones on the first-order part (bf16 rounding), the
    same as fp32 without autocast; finite differences refuse it."""
    m, reg = make(grad_mode="first_order")
    with torch.no_grad():
        reg.mask_logits.copy_(0.3 * torch.randn(FEAT))
    opt = encoder_opt(m, reg, lr=0.3)
    training_step(m, reg, views_for(seed=7), None, opt, None)
    views = views_for(n=32)
    ctx = real_backward(m, reg, opt, views)
    plain = reg.compute_meta_gradient(ctx).grads["logits"]
    reg.meta_precision = "autocast"
    torch.testing.assert_close(reg.compute_meta_gradient(ctx).grads["logits"], plain)  # no autocast active: identical
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ctx = real_backward(m, reg, opt, views)
        low = reg.compute_meta_gradient(ctx).grads["logits"]
        reg.meta_precision = "fp32"
        full = reg.compute_meta_gradient(ctx).grads["logits"]
        reg.grad_mode, reg.meta_precision = "second_order", "autocast"
        assert reg.compute_meta_gradient(ctx).grads["logits"].dtype == torch.float32
    assert low.dtype == torch.float32 and not torch.equal(low, full)
    assert torch.nn.functional.cosine_similarity(low, full, dim=0) > 0.99
    with pytest.raises(ValueError, match="meta_precision"):
        make(grad_mode="finite_difference", meta_precision="autocast")


@pytest.mark.parametrize("method", ["barlow_twins", "moco_v2"])
def test_a_mask_pinned_at_one_leaves_the_real_steps_exactly_the_base_methods(method):
    """The meta step and the mask's plumbing must not touch the encoder's update: with the mask
    pinned at 1 (``sigmoid=False``, ``meta_lr=0``) and no redundancy term, three LARS steps of
    base + MetaMask (second order, virtual step mirrored, every pass run) leave the base method's
    parameters *bit for bit* where the base method's own steps leave them."""
    torch.manual_seed(0)
    base = tiny_method(method).to(DT)
    m, reg = make(method, dtype=DT, sigmoid=False, meta_lr=0.0, weight_base=1.0, weight_drr=0.0)
    m.load_state_dict(base.state_dict())
    opt_base = LARS(list(base.trainable_parameters()), lr=0.3, weight_decay=1e-4)
    opt = LARS(list(m.trainable_parameters()) + reg.encoder_parameters(), lr=0.3, weight_decay=1e-4)
    meta_opt, _ = reg.configure_meta_optimizer(10)
    none = build_regularizer("none", base)
    for step in range(3):
        views = [v.to(DT) for v in views_for(seed=10 + step)]
        training_step(base, none, views, None, opt_base, None)
        logs = training_step(m, reg, views, None, opt, meta_opt)
        assert logs["meta/grad_norm"] > 0  # the meta step did run
    assert torch.equal(reg.mask().detach(), torch.ones_like(reg.mask()))
    for (name, p), q in zip(base.state_dict().items(), m.state_dict().values()):
        assert torch.equal(p, q), name
