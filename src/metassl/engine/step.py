"""One training step of *base method + regularizer*, free of Lightning.

The LightningModule calls :func:`training_step` with Lightning's ``manual_backward`` and
optimizer wrappers; benchmarks and tests call it with plain ``loss.backward()`` and raw
optimizers, so what is timed and tested is exactly what trains.  The order of the hooks is
the protocol of :mod:`metassl.regularizers.base`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from metassl.engine.faults import NonFinitePolicy, agree_across_ranks, first_nonfinite
from metassl.methods.base import Method
from metassl.regularizers.base import ClipInfo, Regularizer, StepContext


def encoder_objective(
    method: Method,
    reg: Regularizer,
    views: list[torch.Tensor],
    labels: torch.Tensor | None = None,
    ctx: StepContext | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
    """``weight_base · terms["base"] + other terms`` at the current weights, the terms and the
    method's output.  ``ctx`` is the step context (a bare one is made when not given); its
    ``views`` and ``out`` are set here."""
    if ctx is None:
        ctx = StepContext(method=method, views=views, labels=labels)
    views = reg.prepare_views(views, ctx)
    ctx.views = views
    out = method(views, feature_transform=reg.transform_features)
    ctx.out = out
    terms = reg.objective(out, ctx)
    if "base" not in terms:
        raise KeyError(f"regularizer {reg.name!r}: objective() must return a 'base' term")
    loss = reg.weight_base * terms["base"]
    for name, value in terms.items():
        if name != "base":
            loss = loss + value
    return loss, terms, out


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def training_step(
    method: Method,
    reg: Regularizer,
    views: list[torch.Tensor],
    labels: torch.Tensor | None,
    encoder_optimizer: torch.optim.Optimizer,
    meta_optimizer: torch.optim.Optimizer | None = None,
    *,
    extras: dict[str, torch.Tensor] | None = None,
    progress: float = 0.0,
    global_step: int = 0,
    backward: Callable[[torch.Tensor], ClipInfo | None] | None = None,
    step_encoder: Callable[[], None] | None = None,
    distributed: bool = False,
    grad_scale: Callable[[], float | None] | None = None,
    nonfinite: NonFinitePolicy | None = None,
) -> dict[str, torch.Tensor | float]:
    """Real encoder step, then (bilevel regularizers) the meta step, then per-step updates.

    ``backward`` / ``step_encoder`` default to ``loss.backward()`` / ``encoder_optimizer.step()``;
    the engine passes Lightning's precision-aware versions (its ``backward`` clips and returns
    the :class:`ClipInfo` when ``trainer.gradient_clip_val`` is set), and ``grad_scale`` (the
    loss scale of 16-mixed training: ``.grad`` holds scaled gradients until the optimizer
    step) so that regularizers reading ``.grad`` can unscale it (``ctx.grad_scale``).
    ``nonfinite`` (:mod:`metassl.engine.faults`) checks every loss term before the backward pass
    and the meta objective and meta-gradient before the meta step: a non-finite one stops
    training (:class:`~metassl.errors.DivergenceError` naming the step and the term) or, within
    the policy's budget, skips the update (``{"skipped_nonfinite": 1.0}`` is returned then).
    Returns detached scalars to log.
    """
    backward = backward or (lambda loss: loss.backward())
    step_encoder = step_encoder or encoder_optimizer.step
    ctx = StepContext(
        method=method,
        views=views,
        labels=labels,
        encoder_optimizer=encoder_optimizer,
        lr=current_lr(encoder_optimizer),
        progress=progress,
        global_step=global_step,
        distributed=distributed,
        extras=dict(extras or {}),
    )

    encoder_optimizer.zero_grad(set_to_none=True)
    loss, terms, out = encoder_objective(method, reg, views, labels, ctx)
    if nonfinite is not None:
        values = {**terms, "total": loss}
        bad = agree_across_ranks(first_nonfinite(values), loss.device, distributed)
        if bad is not None:
            nonfinite.handle(bad, global_step, float(values[bad].detach()) if bad in values else float("nan"))
            encoder_optimizer.zero_grad(set_to_none=True)
            return {"skipped_nonfinite": 1.0}
    clip = backward(loss)
    ctx.clip = clip if isinstance(clip, ClipInfo) else None
    if grad_scale is not None:
        ctx.grad_scale = grad_scale()
    reg.before_encoder_step(ctx)
    step_encoder()

    logs: dict[str, torch.Tensor | float] = {"loss": loss.detach()}
    logs.update({f"loss_{name}": value.detach() for name, value in terms.items()})
    if reg.bilevel and meta_optimizer is not None:
        meta_optimizer.zero_grad(set_to_none=True)
        meta_logs = {f"meta/{k}": v for k, v in reg.meta_step(ctx).items()}
        logs.update(meta_logs)
        bad = None
        if nonfinite is not None:
            grads = {"meta/gradient": g for g in [_meta_grads_finite(meta_optimizer)] if g is not None}
            bad = agree_across_ranks(first_nonfinite({**meta_logs, **grads}), loss.device, distributed)
            if bad is not None:
                nonfinite.handle(bad, global_step, float({**meta_logs, **grads}[bad]) if bad in meta_logs else float("nan"))
                meta_optimizer.zero_grad(set_to_none=True)
                logs["skipped_nonfinite"] = 1.0
        if bad is None:
            meta_optimizer.step()
    method.update_after_step(out, progress)
    reg.after_step(ctx)
    logs.update({f"reg/{k}": v for k, v in reg.log_stats().items()})
    return logs


def _meta_grads_finite(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """A 0-dim tensor, ``nan`` when any meta-gradient is non-finite and ``0`` otherwise (None: no gradients)."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        return None
    finite = torch.stack([torch.isfinite(g.detach()).all() for g in grads]).all()
    return torch.where(finite, torch.zeros((), device=finite.device), torch.full((), float("nan"), device=finite.device))


def clip_info(optimizer: torch.optim.Optimizer, max_norm: float, scale: float | None = None) -> ClipInfo:
    """The global gradient norm over ``optimizer``'s parameters before clipping (``scale``:
    the 16-mixed loss scale still in ``.grad``), as ``torch.nn.utils.clip_grad_norm_`` sees it."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        return ClipInfo(float(max_norm), 0.0)
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads])))
    return ClipInfo(float(max_norm), norm / float(scale) if scale else norm)
