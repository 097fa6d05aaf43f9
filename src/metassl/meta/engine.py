"""The meta-gradient engine: one virtual step, then ``∇φ L_outer(θ', φ)``.

Bilevel regularizers (MetaMask, MetAug, the ICL-MSR reconstruction) share one pattern
(docs/algorithms.md §2): a virtual encoder step ``θ' = step(θ, ∇θ L_inner(θ, φ))`` followed by the
gradient of an outer loss at the virtual weights with respect to meta-parameters ``φ``::

    dL_outer(θ'(φ), φ)/dφ = ∇φ L_outer(θ', φ)  +  D_u ∇φ L_inner(θ, φ),   u = coef ⊙ v,
                            └── first order ──┘   └──── second-order term ────┘
    v = ∇θ' L_outer(θ', φ),    u = (∂θ'/∂g)ᵀ v  (coef ⊙ v for plain SGD, coef = -lr·…;
                                                  through the step itself for LARS, Adam, clipping)

``D_u`` is the directional derivative along ``u`` in θ, i.e. the mixed Hessian-vector
product ``(∂²L_inner/∂φ∂θ) u`` of DARTS (Liu et al., ICLR 2019, Eq. 7-8).

Nothing is copied: loss callables receive parameter dicts and evaluate the model with
``torch.func.functional_call``.  Modes:

``first_order``
    ``∇φ L_outer(θ', φ)`` with ``θ'`` treated as a constant.
``second_order`` (exact)
    ``second_order_method="reverse"``: the inner gradient is taken with ``create_graph``,
    ``θ'`` is a differentiable function of ``φ`` and one backward of ``L_outer`` gives the
    exact total derivative (the MAML/MetAug way).  Needs a fresh inner pass.
    ``"forward"``: forward-over-reverse — ``v`` from one backward of ``L_outer`` at ``θ'``,
    then ``D_u ∇φ L_inner`` as ``torch.func.jvp`` of ``θ ↦ torch.func.grad_φ L_inner``.
    Exact too, and it works with a *precomputed* inner gradient (e.g. the real training
    step's ``.grad``); the reverse part only runs from the loss back to where φ enters.
    ``"auto"`` picks ``forward`` when ``inner_grads`` are given or under torch.distributed,
    else ``reverse``.  Forward-over-reverse needs every custom ``autograd.Function`` in the
    inner loss to support ``torch.func`` (``setup_context`` and ``jvp``).
``finite_difference``
    The official MetaMask / DARTS approximation of the second-order term:
    ``(∇φ L_inner(θ + εu, φ) - ∇φ L_inner(θ - εu, φ)) / (2ε)`` with ``ε = radius/‖u‖``.
    For ``u = -lr·v`` this is exactly the official ``∇φ L(θ',φ) - η (g⁺ - g⁻)/(2R)`` with
    ``θ± = θ ± R v``, ``R = radius/‖v‖`` (``fd_scheme="central"``, error O(ε²)).
    ``fd_scheme="forward"``: the one-sided ``(∇φ L_inner(θ + εu, φ) - ∇φ L_inner(θ, φ)) / ε``
    (error O(ε)); it saves one pass when the caller already has ``∇φ L_inner(θ, φ)`` (e.g.
    from the real step's own forward) and passes it as ``inner_meta_grads``.  That value
    must be computed in the same precision as the shifted pass (full precision): the
    difference of two nearby gradients is lost in bf16 rounding.

Guarantees, whatever the mode:

- batch-norm running statistics never change during virtual passes (every ``_BatchNorm``
  in ``modules`` that is in training mode runs with ``track_running_stats`` off for the
  duration, which gives the same output — batch statistics — without the in-place update;
  unlike passing cloned buffers this needs no copy and is legal inside ``torch.func``
  transforms);
- the optimizer and its state are only read; ``.grad`` of real parameters is not touched;
- the whole computation runs in full precision with autocast disabled (callers cast their
  inputs; parameters are used in their own dtype), unless ``full_precision=False``: then it
  runs the outer pass under the caller's autocast (bf16 / fp16 at the speed of the real
  step; the exact second order's forward-mode pass stays in full precision;
  ``finite_difference`` refuses this, a difference quotient of bf16 gradients is noise);
- modules compiled with ``torch.compile`` run eagerly here (``functional_call`` swaps in new
  parameter tensors every pass, which would only trigger recompilations, and ``torch.func``
  transforms of compiled code are not needed);
- under ``torch.distributed`` with world size > 1 the meta-gradients are averaged over
  ranks once (one flat all-reduce).  For exactness two more averages happen where needed,
  as DDP does for parameter gradients: a *fresh* inner gradient (so every rank takes the
  same virtual step; a precomputed one, e.g. from the DDP backward, is already averaged),
  and ``v`` before it becomes the direction ``u``.  The result then equals the
  one-process meta-gradient of the mean of the per-rank objectives (tested with gloo).

Scope of the second-order term: ``second_order_params`` (a subset of the virtual
parameters) differentiates ``θ'`` with respect to ``φ`` through that subset only; the other
parameters still take the virtual step.  Exact when it is all of them (default).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from metassl.losses.distributed import is_distributed
from metassl.meta.second_order import LossFn, global_norm, grad_or_zero, inner_meta_grad, leaf, mixed_term
from metassl.meta.passes import all_reduce_mean_, frozen_bn_stats, full_precision_context, meta_pass_context
from metassl.meta.virtual_step import VirtualStep, apply_virtual_step, plan_virtual_step, step_vjp

__all__ = [
    "global_norm",
    "GRAD_MODES",
    "LossFn",
    "MetaGradient",
    "meta_gradient",
    "frozen_bn_stats",
    "full_precision_context",
    "inner_meta_grad",
    "meta_pass_context",
    "all_reduce_mean_",
]

GRAD_MODES = ("first_order", "second_order", "finite_difference")

@dataclass
class MetaGradient:
    """Result of :func:`meta_gradient`."""

    #: ``dL_outer/dφ`` per meta-parameter name (averaged over ranks under DDP)
    grads: dict[str, torch.Tensor]
    #: ``L_outer(θ', φ)`` (detached)
    outer_loss: torch.Tensor
    #: the first-order part ``∇φ L_outer(θ', φ)`` (not available for ``reverse``)
    first_order: dict[str, torch.Tensor] | None = None
    #: scalars for logging
    stats: dict[str, float] = field(default_factory=dict)
    #: the meta step was skipped (non-finite inner gradient): ``grads`` are zero
    skipped: bool = False


# -- helpers ---------------------------------------------------------------------------------
def _all_finite(grads: Iterable[torch.Tensor | None], distributed: bool) -> bool:
    """All inner gradients finite, on every rank (so all ranks take the same branch); one
    reduction per tensor (a sum is finite iff every element is, barring overflow)."""
    checks = [torch.isfinite(t.sum()) for t in grads if t is not None]
    if not checks:
        return True
    ok = torch.stack(checks).all().to(torch.float32)
    if distributed:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok > 0)


def _dot(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum((a[k].double() * b[k].double()).sum() for k in a))


# -- the engine ------------------------------------------------------------------------------
def meta_gradient(
    params: Mapping[str, torch.Tensor],
    meta_params: Mapping[str, torch.Tensor],
    outer_loss: LossFn,
    inner_loss: LossFn | None = None,
    *,
    inner_grads: Mapping[str, torch.Tensor | None] | None = None,
    step: VirtualStep | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    mode: str = "second_order",
    second_order_method: str = "auto",
    second_order_params: Iterable[str] | None = None,
    radius: float = 1e-2,
    fd_scheme: str = "central",
    inner_meta_grads: Mapping[str, torch.Tensor] | None = None,
    second_order_term: Callable[[dict, dict, dict], dict] | None = None,
    full_precision: bool = True,
    modules: Iterable[nn.Module] = (),
    distributed: bool | None = None,
    skip_nonfinite: bool = True,
) -> MetaGradient:
    """Meta-gradient of ``L_outer`` after one virtual step (see module docstring).

    Parameters
    ----------
    params
        ``θ``: the parameters that take the virtual step, by name (the names the loss
        callables use with ``functional_call``).  For ``step.rule == "mirror"`` these must be
        the real ``nn.Parameter`` objects of ``optimizer``.  Parameters of the model that are
        not in ``params`` keep their current values in every pass (e.g. a frozen backbone
        for a heads-only virtual step).
    meta_params
        ``φ`` by name; the result has the same keys.
    outer_loss, inner_loss
        ``loss(params_dict, meta_dict) -> scalar``.  A loss may receive only a *subset* of
        ``params`` (see ``second_order_params``); missing names must take their current
        values (what ``functional_call`` does with a partial dict).  ``inner_loss`` may be
        ``None`` only for ``first_order`` with ``inner_grads``.
    inner_grads
        ``∇θ L_inner(θ, φ)`` already computed (e.g. the real step's ``.grad``, unscaled);
        ``None`` entries mean "no gradient" (the parameter does not move).  If ``None``,
        the inner gradient is computed here from ``inner_loss``.
    step, optimizer
        The virtual step rule (default ``mirror``) and the real optimizer to mirror.
    mode, second_order_method, radius
        ``first_order | second_order | finite_difference``; exact second order by
        ``forward`` (jvp) or ``reverse`` (create_graph) or ``auto``; the finite-difference
        radius (official 1e-2).
    full_precision
        ``True``: autocast off (default).  ``False``: keep the caller's autocast (faster under
        bf16; not for ``finite_difference``).  Outputs are float32 either way.
    fd_scheme, inner_meta_grads
        ``central`` (official) or ``forward`` finite difference; for ``forward``,
        ``inner_meta_grads`` = ``∇φ L_inner(θ, φ)`` at the unshifted θ if the caller has it
        (full precision, this rank's value), else it is computed here (one more pass).
    second_order_term
        ``(θ, φ, u) -> D_u ∇φ L_inner(θ, φ)`` supplied by the caller for ``second_order``
        (e.g. MetaMask's feature-tangent form, which knows where φ enters); ``None`` = the
        engine's jvp of ``∇φ L_inner``.
    second_order_params
        Names (a subset of ``params``) through which ``θ'`` is differentiated with respect
        to ``φ``; ``None`` = all of ``params`` (exact).  A strict subset drops the other
        parameters' part of the second-order term (they still take the virtual step), and
        the outer backward then only runs back to where φ and that subset enter.
    modules
        Modules whose batch-norm running statistics must stay untouched.
    distributed
        Average the meta-gradient over ranks; ``None`` = detect from ``torch.distributed``.
    """
    if mode not in GRAD_MODES:
        raise ValueError(f"meta-gradient mode must be one of {', '.join(GRAD_MODES)}; got {mode!r}")
    if mode == "finite_difference" and not full_precision:
        raise ValueError("finite_difference needs full_precision=True (a difference quotient of reduced-precision gradients is rounding noise)")
    if fd_scheme not in ("central", "forward"):
        raise ValueError(f"fd_scheme must be central or forward; got {fd_scheme!r}")
    if inner_meta_grads is not None and set(inner_meta_grads) != set(meta_params):
        raise ValueError(f"inner_meta_grads must have the keys of meta_params ({', '.join(meta_params)})")
    if second_order_method not in ("auto", "forward", "reverse"):
        raise ValueError(f"second_order_method must be auto, forward or reverse; got {second_order_method!r}")
    if inner_loss is None and (mode != "first_order" or inner_grads is None):
        raise ValueError(f"mode {mode!r} needs inner_loss (and first_order without it needs inner_grads)")
    if not params:
        raise ValueError("meta_gradient needs at least one virtual parameter")
    step = step or VirtualStep()
    method = second_order_method
    if distributed is None:
        distributed = is_distributed()
    if mode == "second_order" and method == "auto":
        method = "forward" if inner_grads is not None or distributed else "reverse"
    if mode == "second_order" and method == "reverse" and inner_grads is not None:
        raise ValueError("second_order_method='reverse' differentiates the inner gradient and cannot use inner_grads")
    if mode == "second_order" and method == "reverse" and distributed:
        raise ValueError("second_order_method='reverse' is not supported under torch.distributed (the inner gradient must be averaged over ranks first); use 'forward'")

    names = list(params)
    subset = None if second_order_params is None else set(second_order_params)
    implicit = names if subset is None else [k for k in names if k in subset]
    unknown = sorted((subset or set()) - set(names))
    if unknown:
        raise ValueError(f"second_order_params not among the virtual params: {', '.join(unknown)}")
    plan = plan_virtual_step(params, step, optimizer)
    device = next(iter(params.values())).device
    theta = {k: params[k].detach() for k in names}
    meta_names = list(meta_params)

    with meta_pass_context(device, modules, full_precision):
        if mode == "second_order" and method == "reverse":
            return _reverse(theta, implicit, meta_params, outer_loss, inner_loss, plan, distributed, skip_nonfinite, step.clip)

        # 1. inner gradient at θ (given or fresh, first-order)
        if inner_grads is None:
            leaves = {k: leaf(v) for k, v in theta.items()}
            meta_const = {k: v.detach() for k, v in meta_params.items()}
            loss_in = inner_loss(leaves, meta_const)
            g = torch.autograd.grad(loss_in, list(leaves.values()), allow_unused=True)
            grads = dict(zip(names, g))
            if distributed:  # as DDP would: every rank takes the same virtual step
                present = [k for k in names if grads[k] is not None]
                all_reduce_mean_([grads[k] for k in present])
        else:
            grads = {k: (None if inner_grads.get(k) is None else inner_grads[k].detach()) for k in names}
        if skip_nonfinite and not _all_finite(grads.values(), distributed):
            return _skipped(meta_params, distributed)

        # 2. virtual step (no graph) and the outer pass at θ'; v = ∇θ' L_outer is only needed
        #    for the parameters that carry the second-order term
        with torch.no_grad():
            theta_new, coefs = apply_virtual_step(theta, grads, plan, step.clip)
        need_v = [] if mode == "first_order" else implicit
        theta_out = {k: (leaf(v) if k in need_v else v) for k, v in theta_new.items()}
        phi = {k: leaf(v) for k, v in meta_params.items()}
        loss_out = outer_loss(theta_out, phi)
        wrt = list(phi.values()) + [theta_out[k] for k in need_v]
        all_g = grad_or_zero(torch.autograd.grad(loss_out, wrt, allow_unused=True), wrt)
        first = dict(zip(meta_names, all_g[: len(phi)]))
        stats = {"outer_loss": float(loss_out.detach()), "first_order_norm": global_norm(first)}
        if mode == "first_order":
            result = {k: v.clone() for k, v in first.items()}
        else:
            v = dict(zip(need_v, all_g[len(phi) :]))
            if distributed:  # v = ∇θ' of the global outer loss: average, as DDP does for gradients
                all_reduce_mean_(list(v.values()))
            if coefs is not None:  # affine step (plain SGD family, clip inactive): u = coef ⊙ v
                u = {k: coefs[k] * v[k] for k in need_v}
            else:  # LARS / Adam / active clip: u = (∂θ'/∂g)ᵀ v through the step itself
                cot = step_vjp(theta, grads, plan, v, step.clip)
                u = {k: cot[k] if k in cot else torch.zeros_like(v[k]) for k in need_v}
            if mode == "second_order" and second_order_term is not None:
                meta_const = {k: t.detach() for k, t in meta_params.items()}
                term = second_order_term({k: theta[k] for k in need_v}, meta_const, u)
                term, extra = {k: term[k].detach() for k in meta_names}, {"u_norm": global_norm(u)}
            else:
                term, extra = mixed_term(
                    inner_loss,
                    {k: theta[k] for k in need_v},
                    {k: t.detach() for k, t in meta_params.items()},
                    u,
                    "forward" if mode == "second_order" else "finite_difference",
                    radius,
                    fd_scheme,
                    inner_meta_grads,
                )
            stats.update(extra)
            stats["second_order_norm"] = global_norm(term)
            stats["second_first_cos"] = _dot(term, first) / max(stats["second_order_norm"] * stats["first_order_norm"], 1e-30)
            result = {k: first[k] + term[k] for k in meta_names}
        if distributed:
            all_reduce_mean_(list(result.values()))
        return MetaGradient(grads=result, outer_loss=loss_out.detach(), first_order=first, stats=stats)


def _reverse(theta, implicit, meta_params, outer_loss, inner_loss, plan, distributed, skip_nonfinite, clip=None) -> MetaGradient:
    """Exact second order by differentiating through the virtual step (create_graph); only
    the ``implicit`` parameters' step keeps its graph."""
    leaves = {k: leaf(v) for k, v in theta.items()}
    phi = {k: leaf(v) for k, v in meta_params.items()}
    loss_in = inner_loss(leaves, phi)
    g = torch.autograd.grad(loss_in, list(leaves.values()), create_graph=True, allow_unused=True)
    keep = set(implicit)
    grads = {k: (gk if gk is None or k in keep else gk.detach()) for k, gk in zip(leaves, g)}
    if skip_nonfinite and not _all_finite([None if t is None else t.detach() for t in grads.values()], distributed):
        return _skipped(meta_params, distributed)
    theta_new, _ = apply_virtual_step(leaves, grads, plan, clip)
    loss_out = outer_loss(theta_new, phi)
    total = torch.autograd.grad(loss_out, list(phi.values()), allow_unused=True)
    result = {k: t.detach() for k, t in zip(phi, grad_or_zero(total, list(phi.values())))}
    if distributed:
        all_reduce_mean_(list(result.values()))
    return MetaGradient(grads=result, outer_loss=loss_out.detach(), stats={"outer_loss": float(loss_out.detach())})


def _skipped(meta_params: Mapping[str, torch.Tensor], distributed: bool) -> MetaGradient:
    zeros = {k: torch.zeros_like(v) for k, v in meta_params.items()}
    if distributed:  # keep the collective sequence identical on every rank
        all_reduce_mean_(list(zeros.values()))
    return MetaGradient(grads=zeros, outer_loss=torch.tensor(float("nan")), stats={"skipped": 1.0}, skipped=True)
