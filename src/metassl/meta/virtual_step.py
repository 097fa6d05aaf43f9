"""Virtual (look-ahead) optimizer steps ``θ' = step(θ, g)`` as pure, differentiable tensor functions.

Two rules (see docs/algorithms.md §2.2):

- ``mirror``: replay *exactly* what the real encoder optimizer would do to each parameter,
  with that parameter's own param-group hyper-parameters (lr at its current value,
  momentum, weight decay, ...) and the state the optimizer holds now (momentum buffer,
  Adam moments and step count).  Replayed optimizers: ``torch.optim.SGD`` (momentum,
  dampening, nesterov, weight decay, maximize), the library's :class:`~metassl.optimizers.LARS`
  (trust ratio per parameter, excluded groups), ``torch.optim.Adam`` / ``AdamW``
  (bias-corrected moments; L2 or decoupled decay).  SGD generalises the official MetaMask
  ``unrolled_backward`` (Li et al., NeurIPS 2022): momentum 0 works, an empty state starts
  the buffer as ``torch.optim.SGD`` does, per-group lr / decay are honoured.
- ``sgd``: plain ``θ' = θ - lr · g`` at a fixed lr (the virtual step of MetAug, Li et al.,
  ICML 2022).

Gradient clipping (``GradClip``): the real step may clip the gradient by its global norm
first (``trainer.gradient_clip_val``); the virtual step then applies the same clip
``g ↦ g · min(1, max_norm / (‖g‖ + 1e-6))`` (the formula of ``torch.nn.utils.clip_grad_norm_``)
to the *unclipped* gradient it is given, so ``θ'`` is the real update and its derivative
includes the clip factor and its dependence on ``g``.

The optimizer and its state are only *read*.  The meta engine needs ``u = (∂θ'/∂g)ᵀ v``
for the second-order term: for SGD without an active clip ``θ'`` is affine in ``g`` with a
scalar slope per parameter (:meth:`ParamRule.coef`), otherwise :func:`step_vjp`
differentiates the step itself (elementwise work and a few norms, no model pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from metassl.optimizers import LARS

__all__ = ["VirtualStep", "GradClip", "ParamRule", "SGDHyper", "plan_virtual_step", "apply_virtual_step", "step_vjp"]

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s epsilon


@dataclass(frozen=True)
class GradClip:
    """Global-norm clipping of the real step: ``max_norm`` (``trainer.gradient_clip_val``).

    ``rest_sq``: squared norm of the clipped gradients that do *not* take the virtual step
    (treated as a constant; the clip's derivative is exact when it is 0 or does not depend
    on the meta parameters)."""

    max_norm: float
    rest_sq: float = 0.0

    def factor(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """``min(1, max_norm / (‖g‖ + 1e-6))`` over ``grads`` and the rest (differentiable)."""
        sq = torch.stack([torch.linalg.vector_norm(g).pow(2) for g in grads]).sum() + self.rest_sq
        return torch.clamp(self.max_norm / (sq.sqrt() + CLIP_EPS), max=1.0)


@dataclass(frozen=True)
class VirtualStep:
    """Which virtual step to take.

    ``rule="mirror"`` replays the real optimizer (needs it); ``rule="sgd"`` is ``θ - lr·g``
    with the fixed ``lr`` given here.  ``clip``: the real step's gradient clipping.
    """

    rule: str = "mirror"
    lr: float | None = None
    clip: GradClip | None = None

    def __post_init__(self) -> None:
        if self.rule not in ("mirror", "sgd"):
            raise ValueError(f"virtual step rule must be 'mirror' or 'sgd', got {self.rule!r}")
        if self.rule == "sgd" and (self.lr is None or self.lr <= 0):
            raise ValueError("virtual step rule 'sgd' needs a positive fixed lr")


@dataclass
class ParamRule:
    """The update of one parameter: optimizer kind, hyper-parameters and current state."""

    lr: float
    kind: str = "sgd"  # sgd | lars | adam
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False
    buffer: torch.Tensor | None = None
    # LARS
    eta: float = 0.0
    lars_exclude: bool = False
    # Adam / AdamW
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    step: int = 0
    exp_avg: torch.Tensor | None = None
    exp_avg_sq: torch.Tensor | None = None
    decoupled: bool = False

    def coef(self) -> float:
        """``∂θ'/∂g`` for plain SGD (a scalar; the step is affine in ``g``)."""
        if self.kind != "sgd":
            raise ValueError(f"a {self.kind} step is not affine in the gradient; use step_vjp")
        sign = -1.0 if self.maximize else 1.0
        if self.momentum == 0:
            c = 1.0
        else:
            c_buf = 1.0 if self.buffer is None else (1.0 - self.dampening)
            c = 1.0 + self.momentum * c_buf if self.nesterov else c_buf
        return -self.lr * c * sign

    def apply(self, theta: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``θ'`` for this parameter (differentiable in ``g`` and ``θ``)."""
        d = -g if self.maximize else g
        if self.kind == "adam":
            return self._adam(theta, d)
        if self.kind == "lars":
            if not self.lars_exclude:
                d = d + self.weight_decay * theta
                w_norm, d_norm = torch.linalg.vector_norm(theta), torch.linalg.vector_norm(d)
                ok = (w_norm > 0) & (d_norm > 0)
                d = d * torch.where(ok, self.eta * w_norm / torch.where(ok, d_norm, torch.ones_like(d_norm)), torch.ones_like(w_norm))
            buf = d if self.buffer is None else self.momentum * self.buffer.to(d.dtype) + d
            return theta - self.lr * buf
        if self.weight_decay != 0:
            d = d + self.weight_decay * theta
        if self.momentum != 0:
            buf = d if self.buffer is None else self.momentum * self.buffer.to(d.dtype) + (1.0 - self.dampening) * d
            d = d + self.momentum * buf if self.nesterov else buf
        return theta - self.lr * d

    def _adam(self, theta: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        b1, b2 = self.betas
        if self.weight_decay != 0 and not self.decoupled:
            d = d + self.weight_decay * theta
        m = (1 - b1) * d if self.exp_avg is None else b1 * self.exp_avg.to(d.dtype) + (1 - b1) * d
        v = (1 - b2) * d * d if self.exp_avg_sq is None else b2 * self.exp_avg_sq.to(d.dtype) + (1 - b2) * d * d
        t = self.step + 1
        base = theta * (1 - self.lr * self.weight_decay) if self.decoupled and self.weight_decay != 0 else theta
        denom = _sqrt_zero_safe(v / (1 - b2**t)) + self.eps
        return base - self.lr * (m / (1 - b1**t)) / denom


def _sqrt_zero_safe(v: torch.Tensor) -> torch.Tensor:
    """``sqrt(v)`` for ``v >= 0`` whose derivative is 0 where ``v == 0`` (not inf): at Adam's first
    step ``v ∝ d²``, so an exactly zero gradient entry would otherwise give ``inf · 0 = nan`` in the
    meta-gradient; the update's true derivative there, ``lr·(1-β1)/((1-β1^t)·eps)``, comes through the
    numerator."""
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


#: kept for callers of the first version (an SGD rule)
SGDHyper = ParamRule


def _kind(optimizer: torch.optim.Optimizer) -> str:
    own = type(optimizer).step
    if isinstance(optimizer, torch.optim.SGD) and own is torch.optim.SGD.step:
        return "sgd"
    if isinstance(optimizer, LARS) and own is LARS.step:
        return "lars"
    if isinstance(optimizer, torch.optim.Adam) and own is torch.optim.Adam.step:
        return "adam"
    if isinstance(optimizer, torch.optim.AdamW) and own is torch.optim.AdamW.step:
        return "adam"
    raise NotImplementedError(
        f"virtual step 'mirror' replays SGD, LARS, Adam and AdamW, got {type(optimizer).__name__}; "
        "use the fixed-lr rule (virtual_step=sgd) with this optimizer"
    )


def _rule(kind: str, group: dict, state: dict, name: str, adamw: bool = False) -> ParamRule:
    if kind == "adam":
        if group.get("amsgrad", False):
            raise NotImplementedError(f"virtual step 'mirror' does not replay amsgrad (parameter {name!r}); use virtual_step=sgd")
        step = state.get("step", 0)
        return ParamRule(
            lr=float(group["lr"]), kind="adam", weight_decay=float(group.get("weight_decay", 0.0)),
            maximize=bool(group.get("maximize", False)), betas=tuple(float(b) for b in group["betas"]),
            eps=float(group["eps"]), step=int(step.item() if torch.is_tensor(step) else step),
            exp_avg=state.get("exp_avg"), exp_avg_sq=state.get("exp_avg_sq"),
            decoupled=adamw or bool(group.get("decoupled_weight_decay", False)),
        )
    momentum = float(group.get("momentum", 0.0))
    return ParamRule(
        lr=float(group["lr"]), kind=kind, momentum=momentum, dampening=float(group.get("dampening", 0.0)),
        weight_decay=float(group.get("weight_decay", 0.0)), nesterov=bool(group.get("nesterov", False)),
        maximize=bool(group.get("maximize", False)),
        buffer=state.get("momentum_buffer") if (momentum != 0 or kind == "lars") else None,
        eta=float(group.get("eta", 0.0)), lars_exclude=bool(group.get("lars_exclude", False)),
    )


def plan_virtual_step(
    named_params: Mapping[str, torch.Tensor],
    step: VirtualStep,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, ParamRule]:
    """Per-parameter update rule.  For ``mirror`` the values of ``named_params`` must be the
    real ``nn.Parameter`` objects held by ``optimizer`` (they are looked up by identity)."""
    if step.rule == "sgd":
        return {name: ParamRule(lr=float(step.lr)) for name in named_params}
    if optimizer is None:
        raise ValueError("virtual step rule 'mirror' needs the real encoder optimizer")
    kind = _kind(optimizer)
    adamw = isinstance(optimizer, torch.optim.AdamW)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    plan: dict[str, ParamRule] = {}
    for name, p in named_params.items():
        group = group_of.get(id(p))
        if group is None:
            raise ValueError(f"parameter {name!r} is not in the encoder optimizer; it cannot be mirrored")
        plan[name] = _rule(kind, group, optimizer.state.get(p, {}), name, adamw)
    return plan


def _clip_factor(grads: Mapping[str, torch.Tensor | None], clip: GradClip | None) -> torch.Tensor | None:
    """The clip's factor over the present gradients (None without a clip or gradients)."""
    present = [g for g in grads.values() if g is not None]
    return clip.factor(present) if clip is not None and present else None


def apply_virtual_step(
    values: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor | None],
    plan: Mapping[str, ParamRule],
    clip: GradClip | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float] | None]:
    """``θ'`` and, when the step is affine in ``g`` with scalar slopes (plain SGD, clip
    inactive), ``coef = ∂θ'/∂g`` per parameter (else ``None``: use :func:`step_vjp`).

    Differentiable in ``grads`` (and ``values``) when they carry a graph.  A parameter whose
    gradient is ``None`` is left unchanged (the optimizers skip it) and gets ``coef = 0``.
    """
    c = _clip_factor(grads, clip)  # one global norm per step
    affine = all(r.kind == "sgd" for r in plan.values()) and (c is None or bool(c.detach() >= 1.0))
    new: dict[str, torch.Tensor] = {}
    coefs: dict[str, float] = {}
    for name, theta in values.items():
        g = grads.get(name)
        if g is not None and c is not None:
            g = g * c.to(g.dtype)
        if g is None:
            new[name], coefs[name] = theta, 0.0
            continue
        new[name] = plan[name].apply(theta, g)
        if affine:
            coefs[name] = plan[name].coef()
    return new, (coefs if affine else None)


def step_vjp(
    values: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor | None],
    plan: Mapping[str, ParamRule],
    v: Mapping[str, torch.Tensor],
    clip: GradClip | None = None,
) -> dict[str, torch.Tensor]:
    """``u = (∂θ'/∂g)ᵀ v`` for every parameter with a gradient (``v`` missing = 0): the
    cotangent of the virtual step, by reverse mode through :func:`apply_virtual_step`."""
    names = [k for k in values if grads.get(k) is not None]
    with torch.enable_grad():
        leaves = {k: grads[k].detach().requires_grad_(True) for k in names}
        new, _ = apply_virtual_step({k: values[k].detach() for k in names}, leaves, plan, clip)
        outs = [new[k] for k in names if k in v]
        if not outs:
            return {k: torch.zeros_like(leaves[k]) for k in names}
        cot = [v[k].to(new[k].dtype) for k in names if k in v]
        u = torch.autograd.grad(outs, [leaves[k] for k in names], cot, allow_unused=True)
    return {k: (torch.zeros_like(leaves[k]) if t is None else t.detach()) for k, t in zip(names, u)}
