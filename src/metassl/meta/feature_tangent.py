"""The second-order term ``D_u ∇φ L_inner(θ, φ)`` when the meta parameters ``φ`` act only *after*
a network part: through that part's tangent along ``u`` (docs/algorithms.md §2.4).

Write ``L_inner(θ, φ) = H(θ_rest, N(θ_net), φ)``: ``N`` is the network part (e.g. the backbone,
or the whole method when φ reads only its outputs), ``H`` the rest (heads, losses, where φ
enters).  Then, exactly,

    D_u ∇φ L_inner = ∂_feats ∇φ H · J_N u_net + ∂_rest ∇φ H · u_rest

so the network is needed only through its tangent ``J_N u_net``, taken here as a one-sided
difference of its outputs ``(N(θ_net + εu_net) − N(θ_net)) / ε`` with ``ε = radius · ‖θ_net‖ /
‖u_net‖`` (one no-grad forward; the relative perturbation is ``radius``), and the head level is
an exact forward-over-reverse jvp (``torch.func``).  Outputs are any pytree (dicts, lists);
only its floating-point tensors get a tangent, the rest passes through.  A tensor the head
detaches (a stop-gradient target) contributes nothing, as in the exact term.

The difference and the jvp run in full precision; the base point ``N(θ_net)`` must be a
full-precision pass of the same batch (the real forward's outputs when it ran without
autocast in the parameters' dtype, else computed here: one more no-grad forward).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from metassl.meta.passes import full_precision_context
from metassl.meta.second_order import global_norm

__all__ = ["difference_step", "feature_tangent_term", "output_tangent"]

#: ``features(net_params) -> pytree``: the network part at the given parameters
Features = Callable[[dict[str, torch.Tensor]], Any]
#: ``head_loss(rest_params, features_pytree, meta) -> scalar``: the inner loss from features
HeadLoss = Callable[[dict[str, torch.Tensor], Any, dict[str, torch.Tensor]], torch.Tensor]


def _is_float(x: Any) -> bool:
    return torch.is_tensor(x) and x.is_floating_point()


def difference_step(theta: Mapping[str, torch.Tensor], u: Mapping[str, torch.Tensor], radius: float) -> float:
    """``ε = radius · ‖θ‖ / ‖u‖`` (0 when ``u`` is zero): a relative perturbation of ``radius``."""
    if radius <= 0:
        raise ValueError(f"tangent radius must be positive, got {radius}")
    u_norm = global_norm(u)
    if u_norm == 0.0:
        return 0.0
    return radius * max(global_norm(theta), 1e-12) / u_norm


@torch.no_grad()
def output_tangent(features: Features, theta: dict[str, torch.Tensor], u: dict[str, torch.Tensor], radius: float,
                   base: Any | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor], Any]:
    """``(base leaves, tangent leaves, spec)``: the floating-point tensors of ``features(θ)`` and
    their one-sided-difference tangent along ``u`` (module docstring), in full precision.

    ``base``: ``features(θ)`` if already known (full precision, same batch), else computed.
    ``spec`` rebuilds the pytree from the leaves (:func:`_rebuild`)."""
    device = next(iter(theta.values())).device
    with full_precision_context(device):
        if base is None:
            base = features(theta)
        leaves, spec = tree_flatten(base)
        slots = [i for i, x in enumerate(leaves) if _is_float(x)]
        ref = theta[next(iter(theta))].dtype
        base_leaves = [leaves[i].detach().to(ref) for i in slots]
        eps = difference_step(theta, u, radius)
        if eps == 0.0:
            return base_leaves, [torch.zeros_like(b) for b in base_leaves], (spec, leaves, slots)
        plus, plus_spec = tree_flatten(features({k: theta[k] + eps * u[k] for k in theta}))
        if plus_spec != spec:
            raise ValueError("feature tangent: the shifted forward returned a different output structure than the base point")
        tangent = [(plus[i].detach().to(ref) - b) / eps for i, b in zip(slots, base_leaves)]
    return base_leaves, tangent, (spec, leaves, slots)


def _rebuild(spec_info, floats: list[torch.Tensor]) -> Any:
    spec, leaves, slots = spec_info
    full = list(leaves)
    for i, x in zip(slots, floats):
        full[i] = x
    return tree_unflatten(full, spec)


def feature_tangent_term(
    features: Features,
    head_loss: HeadLoss,
    is_net: Callable[[str], bool],
    radius: float,
    base: Any | None = None,
) -> Callable[[dict, dict, dict], dict[str, torch.Tensor]]:
    """The ``second_order_term`` of :func:`metassl.meta.meta_gradient`: ``(θ, φ, u) ↦ D_u ∇φ
    L_inner(θ, φ)`` with the network part (names where ``is_net``) through the difference
    tangent of ``features`` and the rest exact (module docstring).

    ``features`` receives the network parameters (full names), ``head_loss`` the rest of the
    parameters, the features pytree and φ.  ``base``: ``features(θ)`` in full precision when
    the caller has it (e.g. the real forward's outputs), else one more forward."""

    def term(theta: dict, meta: dict, u: dict) -> dict[str, torch.Tensor]:
        net = {k: v for k, v in theta.items() if is_net(k)}
        rest = {k: v for k, v in theta.items() if not is_net(k)}
        device = next(iter(theta.values())).device
        if net:
            base_leaves, tangent, spec = output_tangent(features, net, {k: u[k] for k in net}, radius, base)
        else:  # nothing before the head moves: the features are constants
            with torch.no_grad(), full_precision_context(device):
                leaves, tree = tree_flatten(base if base is not None else features({}))
            slots = [i for i, x in enumerate(leaves) if _is_float(x)]
            base_leaves, spec = [leaves[i].detach() for i in slots], (tree, leaves, slots)
            tangent = [torch.zeros_like(b) for b in base_leaves]

        def grad_phi(rest_params, feats):
            out = _rebuild(spec, list(feats))
            return torch.func.grad(lambda phi: head_loss(rest_params, out, phi))(meta)

        with torch.no_grad(), warnings.catch_warnings(), full_precision_context(device):
            # torch's jvp decompositions warn once about torch.jit.script: torch's business
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
            _, out = torch.func.jvp(grad_phi, (rest, tuple(base_leaves)), ({k: u[k] for k in rest}, tuple(tangent)))
        return {k: t.detach() for k, t in out.items()}

    return term
