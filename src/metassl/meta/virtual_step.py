"""Virtual (look-ahead) optimizer steps ``θ' = step(θ, g)`` as pure tensor functions.

Two rules:

- ``mirror``: replay *exactly* what ``torch.optim.SGD.step`` would do to each parameter,
  with that parameter's own param-group hyper-parameters (lr at its current value,
  momentum, dampening, weight decay, nesterov, maximize) and the momentum buffer currently
  held in the optimizer state.  This is the virtual step of the official MetaMask code
  (``unrolled_backward``, Li et al., NeurIPS 2022), generalised:

  - momentum 0 works (the official code raises ``UnboundLocalError`` there);
  - an empty state (first step) starts the buffer at ``d`` as ``torch.optim.SGD`` does;
  - per-group lr / weight decay (e.g. no decay on biases and norm layers) are honoured;
    the official code reads ``param_groups[0]`` for every parameter.

  The optimizer and its state are only *read*: buffers are never written.
- ``sgd``: plain ``θ' = θ - lr · g`` at a fixed lr (the virtual step of MetAug, Li et al.,
  ICML 2022).

Each rule also reports, per parameter, the scalar ``coef = ∂θ'/∂g`` (``θ'`` is affine in
``g`` for both rules).  The meta engine uses it to turn ``v = ∇θ' L_outer`` into the
tangent ``u = coef ⊙ v`` of the second-order term without differentiating through the
step (``-lr`` for plain SGD; ``-lr · (1 - dampening)`` with a stored buffer;
``-lr · (1 + μ c)`` with nesterov, etc.).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

__all__ = ["VirtualStep", "SGDHyper", "plan_virtual_step", "apply_virtual_step"]


@dataclass(frozen=True)
class VirtualStep:
    """Which virtual step to take.

    ``rule="mirror"`` replays the real ``torch.optim.SGD`` (needs the optimizer);
    ``rule="sgd"`` is ``θ - lr·g`` with the fixed ``lr`` given here.
    """

    rule: str = "mirror"
    lr: float | None = None

    def __post_init__(self) -> None:
        if self.rule not in ("mirror", "sgd"):
            raise ValueError(f"virtual step rule must be 'mirror' or 'sgd', got {self.rule!r}")
        if self.rule == "sgd" and (self.lr is None or self.lr <= 0):
            raise ValueError("virtual step rule 'sgd' needs a positive fixed lr")


@dataclass
class SGDHyper:
    """The SGD update of one parameter: hyper-parameters and the stored momentum buffer."""

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False
    buffer: torch.Tensor | None = None

    def coef(self) -> float:
        """``∂θ'/∂g`` of :func:`apply_virtual_step` for this parameter (a scalar)."""
        sign = -1.0 if self.maximize else 1.0
        if self.momentum == 0:
            c = 1.0
        else:
            c_buf = 1.0 if self.buffer is None else (1.0 - self.dampening)
            c = 1.0 + self.momentum * c_buf if self.nesterov else c_buf
        return -self.lr * c * sign


def _check_mirror_optimizer(optimizer: torch.optim.Optimizer) -> None:
    if optimizer is None:
        raise ValueError("virtual step rule 'mirror' needs the real encoder optimizer")
    if not isinstance(optimizer, torch.optim.SGD) or type(optimizer).step is not torch.optim.SGD.step:
        raise NotImplementedError(
            f"virtual step 'mirror' can only replay torch.optim.SGD, got {type(optimizer).__name__}; "
            "use the fixed-lr rule (virtual_step='sgd') with this optimizer"
        )


def plan_virtual_step(
    named_params: Mapping[str, torch.Tensor],
    step: VirtualStep,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, SGDHyper]:
    """Per-parameter update rule.  For ``mirror`` the values of ``named_params`` must be the
    real ``nn.Parameter`` objects held by ``optimizer`` (they are looked up by identity)."""
    if step.rule == "sgd":
        return {name: SGDHyper(lr=float(step.lr)) for name in named_params}
    _check_mirror_optimizer(optimizer)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    plan: dict[str, SGDHyper] = {}
    for name, p in named_params.items():
        group = group_of.get(id(p))
        if group is None:
            raise ValueError(f"parameter {name!r} is not in the encoder optimizer; it cannot be mirrored")
        state = optimizer.state.get(p, {})
        plan[name] = SGDHyper(
            lr=float(group["lr"]),
            momentum=float(group.get("momentum", 0.0)),
            dampening=float(group.get("dampening", 0.0)),
            weight_decay=float(group.get("weight_decay", 0.0)),
            nesterov=bool(group.get("nesterov", False)),
            maximize=bool(group.get("maximize", False)),
            buffer=state.get("momentum_buffer") if float(group.get("momentum", 0.0)) != 0 else None,
        )
    return plan


def apply_virtual_step(
    values: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor | None],
    plan: Mapping[str, SGDHyper],
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """``θ'`` and ``coef = ∂θ'/∂g`` per parameter.

    Differentiable in ``grads`` (and ``values``) when they carry a graph; buffers are read,
    never written.  A parameter whose gradient is ``None`` is left unchanged (SGD skips it;
    no decay or momentum either) and gets ``coef = 0``.
    """
    new: dict[str, torch.Tensor] = {}
    coefs: dict[str, float] = {}
    for name, theta in values.items():
        g = grads.get(name)
        hp = plan[name]
        if g is None:
            new[name], coefs[name] = theta, 0.0
            continue
        d = -g if hp.maximize else g
        if hp.weight_decay != 0:
            d = d + hp.weight_decay * theta
        if hp.momentum != 0:
            if hp.buffer is None:
                buf = d
            else:
                buf = hp.momentum * hp.buffer.to(d.dtype) + (1.0 - hp.dampening) * d
            d = d + hp.momentum * buf if hp.nesterov else buf
        new[name] = theta - hp.lr * d
        coefs[name] = hp.coef()
    return new, coefs
