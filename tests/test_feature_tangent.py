"""metassl.meta.feature_tangent: the second-order term through a network's output tangent,
against the exact forward-over-reverse term (float64, tiny networks)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from metassl.meta import frozen_bn_stats
from metassl.meta.feature_tangent import (
    difference_step,
    feature_tangent_term,
    output_tangent,
)
from metassl.meta.second_order import mixed_term

DT = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """Network part (conv, BN in training mode, tanh, pool) and a linear head after it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.body(x)
        return {"h": h, "z": [self.head(h), self.head(h * 0.5)], "n": 2}


def setup(seed=0):
    torch.manual_seed(seed)
    net = Net().to(DT)
    x = torch.randn(6, 3, 5, 5, dtype=DT)
    theta = {n: p.detach().clone() for n, p in net.named_parameters()}
    meta = {"scale": torch.randn(3, dtype=DT), "w": torch.randn(3, 3, dtype=DT)}
    u = {n: torch.randn_like(p) for n, p in theta.items()}
    return net, x, theta, meta, u


def phi_head(out, meta, detach_second=False):
    """φ acts after the network: a per-dimension scale and a small map of the outputs."""
    z0, z1 = out["z"]
    z1 = z1.detach() if detach_second else z1
    y = torch.tanh((z0 * meta["scale"]) @ meta["w"])
    return (y * z1).sum() / out["n"] + (y**2).mean() + (out["h"] ** 2).mean()


def inner_loss(net, x, detach_second=False):
    def loss(params, meta):
        return phi_head(functional_call(net, params, (x,)), meta, detach_second)

    return loss


def exact_term(net, x, theta, meta, u, detach_second=False):
    with frozen_bn_stats([net]):
        term, _ = mixed_term(inner_loss(net, x, detach_second), theta, meta, u, "forward", 0.0)
    return term


def tangent_term(net, x, theta, meta, u, radius, is_net, detach_second=False, base=None):
    body = {n for n in theta if is_net(n)}

    def features(params):  # the network part only: body parameters given, head fixed
        return functional_call(net, {**theta, **params}, (x,))

    def head(rest, out, meta_):  # the head parameters act on the *replayed* features' h
        if rest:
            h = out["h"]
            out = {**out, "z": [functional_call(net.head, {k[5:]: v for k, v in rest.items()}, (h,)),
                                functional_call(net.head, {k[5:]: v for k, v in rest.items()}, (h * 0.5,))]}
        return phi_head(out, meta_, detach_second)

    with frozen_bn_stats([net]):
        fn = feature_tangent_term(features, head, lambda n: n in body, radius, base)
        return fn(theta, meta, u)


def rel(a, b):
    num = sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5
    return num / sum(float(b[k].norm() ** 2) for k in b) ** 0.5


def float_leaves(out):
    return out["h"], out["z"][0], out["z"][1]


def test_output_tangent_is_the_jvp_of_the_outputs():
    net, x, theta, _, u = setup()

    def f(params):
        return functional_call(net, params, (x,))

    with frozen_bn_stats([net]):
        base, tangent, _ = output_tangent(f, theta, u, 1e-7)
        _, exact = torch.func.jvp(lambda p: float_leaves(f(p)), (theta,), (u,))
    assert len(base) == len(tangent) == 3  # the int leaf "n" gets no tangent
    for t, e in zip(tangent, exact):
        assert float((t - e).norm() / e.norm()) < 1e-5
    eps = difference_step(theta, u, 1e-7)
    norm = lambda d: sum(float(v.norm() ** 2) for v in d.values()) ** 0.5
    assert eps == pytest.approx(1e-7 * norm(theta) / norm(u))


@pytest.mark.parametrize("split", ["all", "body"])
def test_term_matches_the_exact_mixed_term_and_converges_linearly(split):
    """Whole network as the network part, or the body only (the head's part exact)."""
    net, x, theta, meta, u = setup()
    is_net = (lambda n: True) if split == "all" else (lambda n: n.startswith("body."))
    exact = exact_term(net, x, theta, meta, u)
    err = [rel(tangent_term(net, x, theta, meta, u, r, is_net), exact) for r in (1e-4, 1e-6)]
    assert err[1] < 1e-5
    assert 30 < err[0] / err[1] < 300  # one-sided difference: error linear in the radius


def test_head_only_direction_is_exact_and_zero_direction_is_zero():
    net, x, theta, meta, u = setup()
    is_net = lambda n: n.startswith("body.")
    u_head = {k: (torch.zeros_like(v) if is_net(k) else v) for k, v in u.items()}
    exact = exact_term(net, x, theta, meta, u_head)
    assert rel(tangent_term(net, x, theta, meta, u_head, 1e-5, is_net), exact) < 1e-12
    zero = tangent_term(net, x, theta, meta, {k: torch.zeros_like(v) for k, v in u.items()}, 1e-5, is_net)
    assert all(torch.count_nonzero(v) == 0 for v in zero.values())


def test_detached_outputs_carry_no_tangent_and_a_given_base_point_is_used():
    net, x, theta, meta, u = setup()
    exact = exact_term(net, x, theta, meta, u, detach_second=True)
    assert rel(exact, exact_term(net, x, theta, meta, u)) > 1e-3  # the detach matters here
    with torch.no_grad(), frozen_bn_stats([net]):
        base = functional_call(net, theta, (x,))
    got = tangent_term(net, x, theta, meta, u, 1e-6, lambda n: True, detach_second=True, base=base)
    assert rel(got, exact) < 1e-5
    wrong = {**base, "z": [base["z"][0] + 1e-3, base["z"][1]]}  # a base point that is not the network's: visibly wrong
    assert rel(tangent_term(net, x, theta, meta, u, 1e-6, lambda n: True, base=wrong), exact_term(net, x, theta, meta, u)) > 1.0


def test_bad_radius_and_structure_refused():
    net, x, theta, _, u = setup()
    with pytest.raises(ValueError, match="radius must be positive"):
        difference_step(theta, u, 0.0)
    calls = []

    def changing(params):
        calls.append(1)
        out = functional_call(net, params, (x,))
        return out if len(calls) == 1 else {**out, "extra": out["h"]}

    with pytest.raises(ValueError, match="different output structure"), frozen_bn_stats([net]):
        output_tangent(changing, theta, u, 1e-6)
