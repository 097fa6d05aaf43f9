"""One training step of *base method + regularizer*, free of Lightning.

The LightningModule calls :func:`training_step` with Lightning's ``manual_backward`` and
optimizer wrappers; benchmarks and tests call it with plain ``loss.backward()`` and raw
optimizers, so what is timed and tested is exactly what trains.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from metassl.methods.base import Method
from metassl.regularizers.base import Regularizer, StepContext


def encoder_objective(
    method: Method, reg: Regularizer, views: list[torch.Tensor], labels: torch.Tensor | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
    """``base_weight * L_method + sum(regularizer terms)`` at the current weights."""
    out = method(views, feature_transform=reg.transform_features)
    terms = {"base": method.loss(out)}
    terms.update(reg.extra_loss(out, method, labels))
    loss = reg.base_weight * terms["base"]
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
    progress: float = 0.0,
    global_step: int = 0,
    backward: Callable[[torch.Tensor], None] | None = None,
    step_encoder: Callable[[], None] | None = None,
    distributed: bool = False,
    grad_scale: Callable[[], float | None] | None = None,
) -> dict[str, torch.Tensor | float]:
    """Real encoder step, then (bilevel regularizers) the meta step, then per-step updates.

    ``backward`` / ``step_encoder`` default to ``loss.backward()`` / ``encoder_optimizer.step()``;
    the engine passes Lightning's precision-aware versions, and ``grad_scale`` (the loss scale of
    16-mixed training: ``.grad`` holds scaled gradients until the optimizer step) so that
    regularizers reading ``.grad`` in ``before_encoder_step`` can unscale it
    (``ctx.cache["grad_scale"]``).  Returns detached scalars to log.
    """
    backward = backward or (lambda loss: loss.backward())
    step_encoder = step_encoder or encoder_optimizer.step

    encoder_optimizer.zero_grad(set_to_none=True)
    loss, terms, out = encoder_objective(method, reg, views, labels)
    backward(loss)
    ctx = StepContext(
        method=method,
        views=views,
        out=out,
        labels=labels,
        encoder_optimizer=encoder_optimizer,
        lr=current_lr(encoder_optimizer),
        progress=progress,
        global_step=global_step,
        distributed=distributed,
    )
    if grad_scale is not None:
        ctx.cache["grad_scale"] = grad_scale()
    reg.before_encoder_step(ctx)
    step_encoder()

    logs: dict[str, torch.Tensor | float] = {"loss": loss.detach()}
    logs.update({f"loss_{name}": value.detach() for name, value in terms.items()})
    if reg.bilevel and meta_optimizer is not None:
        meta_optimizer.zero_grad(set_to_none=True)
        logs.update({f"meta/{k}": v for k, v in reg.meta_step(ctx).items()})
        meta_optimizer.step()
    method.update_after_step(out, progress)
    logs.update({f"reg/{k}": v for k, v in reg.log_stats().items()})
    return logs
