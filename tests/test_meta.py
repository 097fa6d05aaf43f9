"""The meta-gradient engine (metassl.meta): virtual steps, gradient modes, side effects."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.func import functional_call

from metassl.meta import VirtualStep, apply_virtual_step, frozen_bn_stats, meta_gradient, plan_virtual_step

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


class Tiny(nn.Module):
    """body -> mask -> head, smooth (tanh) so that finite differences are accurate."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh())
        self.head = nn.Sequential(nn.Linear(7, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x) * mask)


def make_problem(seed: int = 0, n: int = 6):
    torch.manual_seed(seed)
    model = Tiny().to(DT)
    w = nn.Parameter(0.5 * torch.randn(7, dtype=DT))
    x_in, y_in = torch.randn(n, 5, dtype=DT), torch.randn(n, 3, dtype=DT)
    x_out, y_out = torch.randn(n, 5, dtype=DT), torch.randn(n, 3, dtype=DT)

    def loss_on(x, y):
        def fn(p, phi):
            return (functional_call(model, p, (x, torch.sigmoid(phi["w"]))) - y).pow(2).mean()

        return fn

    return model, w, loss_on(x_in, y_in), loss_on(x_out, y_out)


def sgd_with_state(model: nn.Module, steps: int, **kw) -> torch.optim.SGD:
    """An SGD optimizer whose state holds ``steps`` real steps (random gradients)."""
    opt = torch.optim.SGD(model.parameters(), **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def named(model: nn.Module, prefix: str = "") -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.startswith(prefix)}


def stepped_copy(model: nn.Module, opt: torch.optim.Optimizer) -> nn.Module:
    """``torch.optim.SGD.step`` on deep copies of model and optimizer (same gradients)."""
    model_c, opt_c = copy.deepcopy((model, opt))  # one memo: the copied state is keyed by the copied params
    for p, p_c in zip(model.parameters(), model_c.parameters()):
        p_c.grad = None if p.grad is None else p.grad.clone()
    opt_c.step()
    return model_c


def snapshot(model: nn.Module, opt: torch.optim.Optimizer | None = None):
    bufs = {n: b.clone() for n, b in model.named_buffers()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {}
    if opt is not None:
        for p, s in opt.state.items():
            state[id(p)] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
    return bufs, params, state


def assert_same_snapshot(a, b) -> None:
    for da, db in zip(a[:2], b[:2]):
        assert da.keys() == db.keys()
        for k in da:
            assert torch.equal(da[k], db[k]), k
    assert a[2].keys() == b[2].keys()
    for k in a[2]:
        for key in a[2][k]:
            va, vb = a[2][k][key], b[2][k][key]
            assert (torch.equal(va, vb) if torch.is_tensor(va) else va == vb), key


# -- virtual step == torch.optim.SGD.step ---------------------------------------------------
SGD_CASES = {
    "momentum0.9+wd": (dict(lr=0.1, momentum=0.9, weight_decay=5e-4), 2),
    "momentum0": (dict(lr=0.1, momentum=0.0, weight_decay=5e-4), 2),
    "first_step_empty_state": (dict(lr=0.1, momentum=0.9, weight_decay=5e-4), 0),
    "nesterov": (dict(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True), 2),
    "nesterov_first_step": (dict(lr=0.05, momentum=0.9, nesterov=True), 0),
    "dampening": (dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=5e-4), 2),
    "maximize": (dict(lr=0.1, momentum=0.5, weight_decay=5e-4, maximize=True), 1),
}


@pytest.mark.parametrize("case", list(SGD_CASES))
def test_mirror_step_equals_torch_sgd(case):
    kw, steps = SGD_CASES[case]
    torch.manual_seed(0)
    model = Tiny().to(DT)
    opt = sgd_with_state(model, steps, **kw)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = snapshot(model, opt)

    params = named(model)
    plan = plan_virtual_step(params, VirtualStep("mirror"), opt)
    new, coefs = apply_virtual_step({k: p.detach() for k, p in params.items()}, {k: p.grad for k, p in params.items()}, plan)
    assert_same_snapshot(before, snapshot(model, opt))  # the virtual step reads, never writes

    model_c = stepped_copy(model, opt)
    for name, p_c in model_c.named_parameters():
        torch.testing.assert_close(new[name], p_c.detach(), rtol=0, atol=1e-15)
    # coef = ∂θ'/∂g: perturbing g by δ moves θ' by coef·δ (θ' is affine in g)
    delta = {k: torch.randn_like(p) for k, p in params.items()}
    new2, _ = apply_virtual_step({k: p.detach() for k, p in params.items()}, {k: p.grad + delta[k] for k, p in params.items()}, plan)
    for k in params:
        torch.testing.assert_close(new2[k] - new[k], coefs[k] * delta[k], rtol=1e-10, atol=1e-12)


def test_mirror_uses_each_param_group():
    torch.manual_seed(0)
    model = Tiny().to(DT)
    opt = torch.optim.SGD(
        [{"params": model.body.parameters(), "lr": 0.2, "weight_decay": 1e-2}, {"params": model.head.parameters(), "weight_decay": 0.0}],
        lr=0.05, momentum=0.9,
    )
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    params = named(model)
    new, _ = apply_virtual_step(
        {k: p.detach() for k, p in params.items()}, {k: p.grad for k, p in params.items()}, plan_virtual_step(params, VirtualStep(), opt)
    )
    model_c = stepped_copy(model, opt)
    for name, p_c in model_c.named_parameters():
        torch.testing.assert_close(new[name], p_c.detach(), rtol=0, atol=1e-15)


def test_mirror_rejects_other_optimizers():
    model = Tiny()
    with pytest.raises(NotImplementedError, match="virtual_step=sgd"):
        plan_virtual_step(named(model), VirtualStep("mirror"), torch.optim.RMSprop(model.parameters()))
    with pytest.raises(NotImplementedError, match="amsgrad"):
        plan_virtual_step(named(model), VirtualStep("mirror"), torch.optim.Adam(model.parameters(), amsgrad=True))
    with pytest.raises(ValueError, match="not in the encoder optimizer"):
        plan_virtual_step(named(model), VirtualStep("mirror"), torch.optim.SGD(model.head.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="positive fixed lr"):
        VirtualStep("sgd")


# -- gradient modes ---------------------------------------------------------------------------
def total_outer(model, params, w_value, inner, outer, plan):
    """Reference: L_outer(θ'(φ), φ) with θ'(φ) = step(θ, ∇θ L_inner(θ, φ)), all explicit."""
    theta = {k: p.detach().requires_grad_(True) for k, p in params.items()}
    phi = {"w": w_value}
    g = torch.autograd.grad(inner(theta, phi), list(theta.values()), allow_unused=True)
    new, _ = apply_virtual_step({k: t.detach() for k, t in theta.items()}, dict(zip(theta, g)), plan)
    with torch.no_grad():
        return outer(new, phi)


def central_fd_meta_grad(model, params, w, inner, outer, plan, h=1e-6):
    out = torch.zeros_like(w)
    with frozen_bn_stats([model]):
        for i in range(w.numel()):
            e = torch.zeros_like(w)
            e[i] = h
            out[i] = (total_outer(model, params, w.detach() + e, inner, outer, plan) - total_outer(model, params, w.detach() - e, inner, outer, plan)) / (2 * h)
    return out


@pytest.mark.parametrize("subset", ["", "head."])
@pytest.mark.parametrize("opt_kw,steps", [(dict(lr=0.3, momentum=0.9, weight_decay=5e-4), 2), (dict(lr=0.3), 0), (dict(lr=0.3, momentum=0.9, nesterov=True), 0)])
def test_modes_against_finite_difference_reference(subset, opt_kw, steps):
    """second_order (both exact methods) == central FD of L_outer w.r.t. φ (float64, rtol 1e-6, atol 1e-9: FD rounding);
    finite_difference (the DARTS/official approximation) agrees with the exact second-order
    term within 1e-3 relative at the default radius 1e-2 and within 1e-6 at radius 1e-4."""
    model, w, inner, outer = make_problem()
    opt = sgd_with_state(model, steps, **opt_kw)
    params = named(model, subset)
    plan = plan_virtual_step(params, VirtualStep(), opt)
    ref = central_fd_meta_grad(model, params, w, inner, outer, plan)
    before = snapshot(model, opt)

    common = dict(step=VirtualStep(), optimizer=opt, modules=[model])
    rev = meta_gradient(params, {"w": w}, outer, inner, mode="second_order", second_order_method="reverse", **common)
    fwd = meta_gradient(params, {"w": w}, outer, inner, mode="second_order", second_order_method="forward", **common)
    torch.testing.assert_close(rev.grads["w"], ref, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(fwd.grads["w"], ref, rtol=1e-6, atol=1e-9)

    first = meta_gradient(params, {"w": w}, outer, inner, mode="first_order", **common)
    exact_term = fwd.grads["w"] - first.grads["w"]
    assert exact_term.norm() > 1e-4 * first.grads["w"].norm()  # the second-order term matters here
    for radius, rtol in [(1e-2, 1e-3), (1e-4, 1e-6)]:
        fd = meta_gradient(params, {"w": w}, outer, inner, mode="finite_difference", radius=radius, **common)
        fd_term = fd.grads["w"] - first.grads["w"]
        assert (fd_term - exact_term).norm() <= rtol * exact_term.norm(), (radius, fd_term, exact_term)
    assert_same_snapshot(before, snapshot(model, opt))  # BN buffers, parameters, optimizer state
    assert w.grad is None and all(p.grad is None for p in model.parameters())


def test_first_order_differs_by_the_second_order_term():
    """second_order - first_order == coef ⊙ v contracted with the mixed Hessian ∂²L_in/∂φ∂θ,
    built here row by row with double backward (independent of the engine's jvp)."""
    model, w, inner, outer = make_problem(seed=3)
    opt = sgd_with_state(model, 1, lr=0.2, momentum=0.9, dampening=0.1, weight_decay=1e-3)
    params = named(model)
    plan = plan_virtual_step(params, VirtualStep(), opt)
    common = dict(step=VirtualStep(), optimizer=opt, modules=[model])
    first = meta_gradient(params, {"w": w}, outer, inner, mode="first_order", **common)
    second = meta_gradient(params, {"w": w}, outer, inner, mode="second_order", **common)

    with frozen_bn_stats([model]):
        theta = {k: p.detach().requires_grad_(True) for k, p in params.items()}
        phi = {"w": w.detach().requires_grad_(True)}
        g = torch.autograd.grad(inner(theta, phi), list(theta.values()))
        new, coefs = apply_virtual_step({k: t.detach() for k, t in theta.items()}, dict(zip(theta, [t.detach() for t in g])), plan)
        new = {k: t.requires_grad_(True) for k, t in new.items()}
        phi0 = {"w": w.detach().requires_grad_(True)}
        v = torch.autograd.grad(outer(new, phi0), list(new.values()))
        u = torch.cat([coefs[k] * vk.flatten() for k, vk in zip(new, v)])
        theta = {k: p.detach().requires_grad_(True) for k, p in params.items()}
        phi = {"w": w.detach().requires_grad_(True)}
        gphi = torch.autograd.grad(inner(theta, phi), phi["w"], create_graph=True)[0]
        rows = [torch.cat([r.flatten() for r in torch.autograd.grad(gphi[j], list(theta.values()), retain_graph=True)]) for j in range(w.numel())]
        hessian = torch.stack(rows)  # (dim φ, dim θ)
    torch.testing.assert_close(second.grads["w"] - first.grads["w"], hessian @ u, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(first.first_order["w"], first.grads["w"])


def test_second_order_params_subset():
    """With second_order_params=S every parameter takes the virtual step, but θ' depends on
    φ only through S: reference = central FD where the other parameters' step uses the
    inner gradient at the unperturbed φ."""
    model, w, inner, outer = make_problem(seed=4)
    opt = sgd_with_state(model, 1, lr=0.3, momentum=0.9, weight_decay=5e-4)
    params = named(model)
    subset = [k for k in params if k.startswith("head.")]
    plan = plan_virtual_step(params, VirtualStep(), opt)

    def inner_grad(w_value):
        theta = {k: p.detach().requires_grad_(True) for k, p in params.items()}
        g = torch.autograd.grad(inner(theta, {"w": w_value}), list(theta.values()))
        return dict(zip(theta, g))

    def total(w_value):
        g, g0 = inner_grad(w_value), inner_grad(w.detach())
        mixed = {k: (g[k] if k in subset else g0[k]) for k in params}
        new, _ = apply_virtual_step({k: p.detach() for k, p in params.items()}, mixed, plan)
        with torch.no_grad():
            return outer(new, {"w": w_value})

    ref = torch.zeros_like(w)
    with frozen_bn_stats([model]):
        for i in range(w.numel()):
            e = torch.zeros_like(w)
            e[i] = 1e-6
            ref[i] = (total(w.detach() + e) - total(w.detach() - e)) / 2e-6
    common = dict(step=VirtualStep(), optimizer=opt, modules=[model], second_order_params=subset)
    for method in ("forward", "reverse"):
        got = meta_gradient(params, {"w": w}, outer, inner, second_order_method=method, **common)
        torch.testing.assert_close(got.grads["w"], ref, rtol=1e-6, atol=1e-9)
    full = meta_gradient(params, {"w": w}, outer, inner, step=VirtualStep(), optimizer=opt, modules=[model])
    assert (full.grads["w"] - ref).norm() > 1e-3 * ref.norm()  # the backbone part is really dropped
    with pytest.raises(ValueError, match="not among"):
        meta_gradient(params, {"w": w}, outer, inner, step=VirtualStep(), optimizer=opt, second_order_params=["nope"])


def test_precomputed_inner_grads_and_momentum_zero():
    """The real step's .grad can be passed as the inner gradient (forward-over-reverse);
    same result as a fresh inner pass.  Momentum 0 (crashes the official code) works."""
    model, w, inner, outer = make_problem(seed=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.0, weight_decay=5e-4)
    params = named(model)
    with frozen_bn_stats([model]):
        inner({k: p for k, p in params.items()}, {"w": w.detach()}).backward()
    grads = {k: p.grad.clone() for k, p in params.items()}
    common = dict(step=VirtualStep(), optimizer=opt, modules=[model])
    reused = meta_gradient(params, {"w": w}, outer, inner, inner_grads=grads, **common)
    fresh = meta_gradient(params, {"w": w}, outer, inner, second_order_method="reverse", **common)
    torch.testing.assert_close(reused.grads["w"], fresh.grads["w"], rtol=1e-10, atol=1e-13)
    fo = meta_gradient(params, {"w": w}, outer, None, inner_grads=grads, mode="first_order", **common)
    torch.testing.assert_close(fo.grads["w"], reused.first_order["w"], rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="reverse"):
        meta_gradient(params, {"w": w}, outer, inner, inner_grads=grads, second_order_method="reverse", **common)


def test_fixed_sgd_rule():
    model, w, inner, outer = make_problem(seed=2)
    params = named(model)
    step = VirtualStep("sgd", lr=0.1)
    plan = plan_virtual_step(params, step)
    ref = central_fd_meta_grad(model, params, w, inner, outer, plan)
    got = meta_gradient(params, {"w": w}, outer, inner, step=step, modules=[model])
    torch.testing.assert_close(got.grads["w"], ref, rtol=1e-6, atol=1e-9)


def test_bn_stats_untouched_without_freezing_list_is_detected():
    """Sanity check of the test itself: a plain forward in train mode does move BN stats."""
    model, w, inner, _ = make_problem()
    before = snapshot(model)
    inner(named(model), {"w": w.detach()})
    assert not torch.equal(before[0]["body.1.running_mean"], model.body[1].running_mean)


def test_nonfinite_inner_gradient_is_skipped():
    model, w, inner, outer = make_problem()
    params = named(model)
    grads = {k: torch.full_like(p, float("inf")) for k, p in params.items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    res = meta_gradient(params, {"w": w}, outer, inner, inner_grads=grads, optimizer=opt, modules=[model])
    assert res.skipped and torch.equal(res.grads["w"], torch.zeros_like(w))


class _OldStyle(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g


def test_functorch_incompatible_loss_gives_a_clear_error():
    model, w, inner, outer = make_problem()

    def bad(p, phi):
        return _OldStyle.apply(inner(p, phi))

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="finite_difference or first_order"):
        meta_gradient(named(model), {"w": w}, outer, bad, second_order_method="forward", optimizer=opt, modules=[model])
    fd = meta_gradient(named(model), {"w": w}, outer, bad, mode="finite_difference", optimizer=opt, modules=[model])
    assert torch.isfinite(fd.grads["w"]).all()


def test_autocast_runs_in_full_precision():
    torch.manual_seed(0)
    model = Tiny()
    w = nn.Parameter(0.5 * torch.randn(7))
    x, y = torch.randn(8, 5), torch.randn(8, 3)
    seen = []

    def loss(p, phi):
        out = functional_call(model, p, (x, torch.sigmoid(phi["w"])))
        seen.append(out.dtype)
        return (out - y).pow(2).mean()

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kw = dict(step=VirtualStep(), optimizer=opt, modules=[model])
    plain = meta_gradient(named(model), {"w": w}, loss, loss, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = meta_gradient(named(model), {"w": w}, loss, loss, **kw)
    assert set(seen) == {torch.float32}
    torch.testing.assert_close(auto.grads["w"], plain.grads["w"], rtol=1e-5, atol=1e-7)


# -- DDP: meta-gradients are averaged over ranks ------------------------------------------------
DDP_MODES = ("first_order", "second_order", "finite_difference")


def _rank_loss(model: nn.Module, rank: int):
    torch.manual_seed(100 + rank)  # different data per rank
    x, y = torch.randn(6, 5, dtype=DT), torch.randn(6, 3, dtype=DT)

    def loss(p, phi):
        return (functional_call(model, p, (x, torch.sigmoid(phi["w"]))) - y).pow(2).mean()

    return loss


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, w, _, _ = make_problem(seed=0)  # same weights on every rank
        loss = _rank_loss(model, rank)
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        got = {mode: meta_gradient(named(model), {"w": w}, loss, loss, optimizer=opt, modules=[model], mode=mode).grads["w"] for mode in DDP_MODES}
        torch.save(got, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_equals_one_process_on_the_mean_objective(tmp_path):
    """2 gloo processes, each with its own batch (fresh inner gradient per rank): every rank
    gets the meta-gradient of the *mean* objective over ranks computed in one process (the
    inner gradient and v are averaged as DDP averages gradients, then the meta-gradient)."""
    model, w, _, _ = make_problem(seed=0)
    losses = [_rank_loss(model, r) for r in range(2)]

    def mean_loss(p, phi):
        return (losses[0](p, phi) + losses[1](p, phi)) / 2

    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    expected = {
        mode: meta_gradient(named(model), {"w": w}, mean_loss, mean_loss, optimizer=opt, modules=[model], mode=mode, distributed=False).grads["w"]
        for mode in DDP_MODES
    }
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for mode in DDP_MODES:
            torch.testing.assert_close(got[mode], expected[mode], rtol=1e-9, atol=1e-12)


def test_forward_fd_scheme():
    """fd_scheme=forward is the one-sided difference (g(θ+εu) - g(θ))/ε: first-order accurate
    (error ∝ radius, larger than the central scheme's), and a given ∇φ L_inner(θ) (e.g. from
    the real step) is used as its base point, giving the same result as computing it."""
    model, w, inner, outer = make_problem(seed=6)
    opt = sgd_with_state(model, 1, lr=0.3, momentum=0.9, weight_decay=5e-4)
    params = named(model)
    common = dict(step=VirtualStep(), optimizer=opt, modules=[model])
    first = meta_gradient(params, {"w": w}, outer, inner, mode="first_order", **common)
    exact = meta_gradient(params, {"w": w}, outer, inner, mode="second_order", **common).grads["w"] - first.grads["w"]
    errors = {}
    for radius in (1e-2, 1e-3):
        for scheme in ("central", "forward"):
            fd = meta_gradient(params, {"w": w}, outer, inner, mode="finite_difference", radius=radius, fd_scheme=scheme, **common)
            errors[scheme, radius] = float((fd.grads["w"] - first.grads["w"] - exact).norm() / exact.norm())
    assert errors["forward", 1e-3] < 1e-2
    assert 5 < errors["forward", 1e-2] / errors["forward", 1e-3] < 20  # O(radius)
    assert errors["central", 1e-2] < 0.1 * errors["forward", 1e-2]

    with frozen_bn_stats([model]):
        phi = {"w": w.detach().requires_grad_(True)}
        (here,) = torch.autograd.grad(inner({k: p.detach() for k, p in params.items()}, phi), [phi["w"]])
    kw = dict(mode="finite_difference", radius=1e-3, fd_scheme="forward", **common)
    computed = meta_gradient(params, {"w": w}, outer, inner, **kw)
    given = meta_gradient(params, {"w": w}, outer, inner, inner_meta_grads={"w": here}, **kw)
    torch.testing.assert_close(given.grads["w"], computed.grads["w"], rtol=1e-12, atol=1e-14)
    shifted = meta_gradient(params, {"w": w}, outer, inner, inner_meta_grads={"w": here + 1.0}, **kw)
    eps = given.stats["fd_eps"]
    torch.testing.assert_close(shifted.grads["w"] - given.grads["w"], torch.full_like(here, -1.0 / eps), rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="fd_scheme"):
        meta_gradient(params, {"w": w}, outer, inner, mode="finite_difference", fd_scheme="backward", **common)
    with pytest.raises(ValueError, match="inner_meta_grads"):
        meta_gradient(params, {"w": w}, outer, inner, inner_meta_grads={"x": here}, **kw)
