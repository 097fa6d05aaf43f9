"""The second-order term ``D_u ∇φ L_inner(θ, φ)`` of the meta-gradient (docs/algorithms.md §2.4,
§2.5): exact by forward-over-reverse (``torch.func.jvp`` of ``θ ↦ ∇φ L_inner``), or the DARTS
central / forward finite difference; and ``∇φ L_inner`` at fixed θ."""

from __future__ import annotations

import warnings
from typing import Callable, Mapping

import torch

from metassl.meta.passes import full_precision_context

__all__ = ["LossFn", "global_norm", "grad_or_zero", "inner_meta_grad", "leaf", "mixed_term"]

#: ``loss(params, meta) -> scalar``: ``params`` maps (virtual) parameter names to tensors,
#: ``meta`` maps meta-parameter names to tensors.  Must be a pure function of both.
LossFn = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], torch.Tensor]


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def grad_or_zero(grads: tuple[torch.Tensor | None, ...], like: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, like)]


def global_norm(d: Mapping[str, torch.Tensor]) -> float:
    """Global 2-norm of a tensor dict (per-tensor norms first: no float64 copy of the weights)."""
    if not d:
        return 0.0
    norms = [torch.linalg.vector_norm(t.detach()) for t in d.values()]
    dtype = torch.promote_types(torch.float32, max((n.dtype for n in norms), key=lambda dt: torch.finfo(dt).bits))
    return float(torch.linalg.vector_norm(torch.stack([n.to(dtype) for n in norms])))


def _grad_phi_fn(inner_loss: LossFn, meta: dict[str, torch.Tensor]):
    """``θ ↦ ∇φ L_inner(θ, φ)`` as a ``torch.func`` function (for jvp)."""

    def fn(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return torch.func.grad(lambda phi: inner_loss(params, phi))(meta)

    return fn


def inner_meta_grad(inner_loss: LossFn, theta: Mapping[str, torch.Tensor], meta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``∇φ L_inner(θ, φ)`` (θ constant: no graph through it)."""
    phi = {k: leaf(v) for k, v in meta.items()}
    g = torch.autograd.grad(inner_loss(theta, phi), list(phi.values()), allow_unused=True)
    return dict(zip(phi, grad_or_zero(g, list(phi.values()))))


def mixed_term(
    inner_loss: LossFn,
    theta: dict[str, torch.Tensor],
    meta: dict[str, torch.Tensor],
    u: dict[str, torch.Tensor],
    mode: str,
    radius: float,
    fd_scheme: str = "central",
    at_theta: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """``D_u ∇φ L_inner(θ, φ)``: exact (jvp) or a central / forward finite difference
    (``at_theta``: ``∇φ L_inner(θ, φ)`` if already known, for the forward scheme)."""
    u_norm = global_norm(u)
    if u_norm == 0.0:
        return {k: torch.zeros_like(v) for k, v in meta.items()}, {"u_norm": 0.0}
    if mode == "forward":
        # no_grad: torch.func.grad still differentiates (it is a transform), but nothing is
        # recorded for ordinary autograd (e.g. for captured parameters that require grad)
        # always in full precision: forward-mode AD under CPU autocast fails on bf16
        # convolutions (torch 2.14: input/weight dtype mismatch), so only the outer pass
        # follows ``full_precision=False``
        device = next(iter(theta.values())).device
        with torch.no_grad(), warnings.catch_warnings(), full_precision_context(device):
            # torch registers its jvp decompositions with torch.jit.script on first use and
            # warns that torch.jit.script is deprecated: torch's own business, not the user's
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
            try:
                _, tangent = torch.func.jvp(_grad_phi_fn(inner_loss, meta), (theta,), (u,))
            except RuntimeError as err:
                if "autograd.Function" not in str(err):
                    raise
                raise RuntimeError(
                    "exact second-order meta-gradients run the inner loss under torch.func (jvp of grad); a custom "
                    "autograd.Function in it lacks torch.func support (setup_context + jvp) — under torch.distributed "
                    "this is the loss collectives of metassl.losses.distributed. Use grad_mode=finite_difference or "
                    f"first_order there. ({str(err).splitlines()[0]})"
                ) from err
        return {k: t.detach() for k, t in tangent.items()}, {"u_norm": u_norm}
    # finite difference (DARTS / official MetaMask: central)
    eps = radius / u_norm
    plus = inner_meta_grad(inner_loss, {k: theta[k] + eps * u[k] for k in theta}, meta)
    if fd_scheme == "central":
        minus = inner_meta_grad(inner_loss, {k: theta[k] - eps * u[k] for k in theta}, meta)
        return {k: (plus[k] - minus[k]) / (2 * eps) for k in meta}, {"u_norm": u_norm, "fd_eps": eps}
    here = inner_meta_grad(inner_loss, theta, meta) if at_theta is None else {k: at_theta[k].detach() for k in meta}
    return {k: (plus[k] - here[k].to(plus[k].dtype)) / eps for k in meta}, {"u_norm": u_norm, "fd_eps": eps}
