"""The shared base of bilevel regularizers (MetaMask, MetAug, ICL-MSR): meta parameters
trained through one virtual encoder step (docs/algorithms.md §2).

What every bilevel regularizer needs and none should write again:

- the *virtual parameters*: the encoder parameters that take the virtual step, by name — the
  method's trainable parameters (``backbone.*``, heads) and the regularizer's own encoder
  parameters under ``reg.<name>`` (so the loss callables can place them with
  ``functional_call``, and a global-norm clip sees every gradient the real clip sees);
- the *step rule*: ``mirror`` follows the real encoder optimizer (SGD, LARS, Adam, AdamW at
  their current state and lr) including the real step's gradient clipping; ``sgd`` is a plain
  step at ``virtual_lr``;
- the *real gradients* as the virtual step needs them: ``.grad`` unscaled under 16-mixed and
  un-clipped (the clip is re-applied inside the differentiable step, so the meta-gradient is
  exact through it);
- blocking: meta parameters enter the encoder's forward through :func:`blocked` — the
  value is used, the gradient is exactly zero — so the encoder objective never trains them
  while DDP (without ``find_unused_parameters``) still sees them used in the forward;
- the meta-gradient call with the library's conditions (batch-norm statistics frozen,
  precision, ranks averaged) and its *assignment* to ``.grad`` (never accumulated);
- where the meta step runs (``order``): ``reuse`` computes it in ``before_encoder_step`` at
  ``θ_t``, ``official`` in ``meta_step`` after the encoder step, through the subclass's
  ``compute_meta_gradient(ctx, order)``;
- the meta optimizer and its schedule.

A subclass provides ``named_meta_parameters()`` and the two losses as pure functions of
parameter dicts, then calls :meth:`BilevelRegularizer.meta_gradient`.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from metassl.meta.engine import GRAD_MODES, LossFn, MetaGradient, meta_gradient
from metassl.meta.virtual_step import GradClip, VirtualStep
from metassl.methods.base import Method
from metassl.regularizers.base import Regularizer, StepContext, check_choices

__all__ = ["BilevelRegularizer", "blocked", "OWN_PREFIX"]

#: prefix of the regularizer's own encoder parameters among the virtual parameters
OWN_PREFIX = "reg."


class _BlockGrad(torch.autograd.Function):
    """Identity whose backward returns zeros (and supports ``torch.func``)."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(grad)

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(tangent)


def blocked(x: torch.Tensor) -> torch.Tensor:
    """``x`` with an exactly-zero gradient: a meta parameter used in the encoder's forward."""
    return _BlockGrad.apply(x)


class BilevelRegularizer(Regularizer):
    """Base of regularizers whose meta parameters follow a virtual encoder step."""

    bilevel = True

    def __init__(
        self,
        *,
        grad_mode: str = "second_order",
        fd_scheme: str = "central",
        fd_radius: float = 1e-2,
        virtual_step: str = "mirror",
        virtual_lr: float | None = None,
        meta_precision: str = "auto",
        meta_optimizer: str = "sgd",
        meta_lr: float = 1e-3,
        meta_momentum: float = 0.9,
        meta_weight_decay: float = 5e-4,
        meta_scheduler: str = "cosine",
    ) -> None:
        super().__init__()
        check_choices(
            self.name,
            grad_mode=(grad_mode, GRAD_MODES),
            fd_scheme=(fd_scheme, ("central", "forward")),
            virtual_step=(virtual_step, ("mirror", "sgd")),
            meta_precision=(meta_precision, ("auto", "fp32", "autocast")),
            meta_optimizer=(meta_optimizer, ("sgd", "adam")),
            meta_scheduler=(meta_scheduler, ("cosine", "constant")),
        )
        if virtual_lr is not None and virtual_lr <= 0:
            raise ValueError(f"{self.name}: virtual_lr must be positive or null, got {virtual_lr}")
        if meta_precision == "autocast" and grad_mode == "finite_difference":
            raise ValueError(f"{self.name}: meta_precision=autocast needs grad_mode second_order or first_order "
                             "(finite differences of bf16 gradients are rounding noise); use meta_precision=fp32")
        self.grad_mode, self.fd_scheme, self.fd_radius = grad_mode, fd_scheme, float(fd_radius)
        self.virtual_step, self.virtual_lr = virtual_step, virtual_lr
        self.meta_precision = meta_precision
        self.meta_optimizer = meta_optimizer
        self.meta_lr, self.meta_momentum, self.meta_weight_decay = float(meta_lr), float(meta_momentum), float(meta_weight_decay)
        self.meta_scheduler = meta_scheduler

    # -- meta parameters -----------------------------------------------------------------
    def named_meta_parameters(self) -> dict[str, nn.Parameter]:
        """The meta parameters ``φ`` by the names the loss callables use."""
        raise NotImplementedError

    def meta_parameters(self) -> list[nn.Parameter]:
        try:
            return list(self.named_meta_parameters().values())
        except (RuntimeError, AttributeError):  # before setup
            return []

    # -- the virtual step ----------------------------------------------------------------
    def virtual_parameters(self, method: Method, backbone: bool = True, own: bool = True) -> dict[str, nn.Parameter]:
        """Parameters that take the virtual step: the method's trainable ones (without
        ``backbone.*`` when ``backbone=False``) and, with ``own``, this regularizer's encoder
        parameters as ``reg.<name>``."""
        named = {n: p for n, p in method.named_trainable_parameters() if backbone or not n.startswith("backbone.")}
        if own:
            named.update({OWN_PREFIX + n: p for n, p in self.named_encoder_parameters()})
        if not named:
            raise ValueError(f"{self.name}: no parameter takes the virtual step")
        return named

    @staticmethod
    def split_own(params: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(method params, own params)`` of a virtual parameter dict (own without the prefix)."""
        method = {n: t for n, t in params.items() if not n.startswith(OWN_PREFIX)}
        own = {n[len(OWN_PREFIX):]: t for n, t in params.items() if n.startswith(OWN_PREFIX)}
        return method, own

    def step_rule(self, ctx: StepContext) -> VirtualStep:
        """``mirror`` (the real optimizer, and its clip) or plain SGD at ``virtual_lr``
        (``None`` = the encoder's current lr)."""
        clip = None
        if ctx.clip is not None:
            clip = GradClip(ctx.clip.max_norm, self._rest_sq(ctx))
        if self.virtual_step == "mirror":
            return VirtualStep("mirror", clip=clip)
        return VirtualStep("sgd", lr=float(self.virtual_lr if self.virtual_lr is not None else ctx.lr), clip=clip)

    @staticmethod
    def real_gradients(params: Mapping[str, nn.Parameter], ctx: StepContext) -> dict[str, torch.Tensor | None]:
        """The encoder objective's gradient at ``θ_t`` as the virtual step needs it: ``.grad``
        unscaled (16-mixed) and, if the real step clipped it, un-clipped (the virtual step
        re-applies the clip differentiably)."""
        inv = 1.0 / float(ctx.grad_scale) if ctx.grad_scale else 1.0
        if ctx.clip is not None:
            inv /= ctx.clip.factor
        if inv == 1.0:
            return {n: (None if p.grad is None else p.grad.detach()) for n, p in params.items()}
        return {n: (None if p.grad is None else p.grad.detach() * inv) for n, p in params.items()}

    def meta_gradient(
        self,
        ctx: StepContext,
        params: Mapping[str, nn.Parameter],
        outer: LossFn,
        inner: LossFn,
        **kw: Any,
    ) -> MetaGradient:
        """:func:`metassl.meta.meta_gradient` with this regularizer's mode, step rule,
        precision, the modules whose batch-norm statistics stay frozen and the ranks."""
        ctx.cache["virtual_ids"] = {id(p) for p in params.values()}
        args = dict(
            step=self.step_rule(ctx),
            optimizer=ctx.encoder_optimizer,
            mode=self.grad_mode,
            radius=self.fd_radius,
            fd_scheme=self.fd_scheme,
            full_precision=self.full_precision_meta(ctx),
            modules=[ctx.method, self],
            distributed=ctx.distributed,
        )
        args.update(kw)
        return meta_gradient(params, self.named_meta_parameters(), outer, inner, **args)

    def full_precision_meta(self, ctx: StepContext) -> bool:
        """Meta passes without autocast: ``fp32`` always, ``autocast`` never, ``auto`` unless
        the real step runs under autocast (then the outer pass follows the training
        precision, as the real step does; finite differences always run in full precision)."""
        if self.meta_precision == "fp32" or self.grad_mode == "finite_difference":
            return True
        if self.meta_precision == "autocast":
            return False
        device = next(iter(ctx.method.parameters())).device.type
        return not (torch.is_autocast_enabled(device) or torch.is_autocast_enabled("cpu"))

    @staticmethod
    def _rest_sq(ctx: StepContext) -> float:
        """Squared unclipped norm of the clipped gradients outside the virtual step (e.g. the
        backbone with ``virtual_params=heads``): a constant of the clip (docs/algorithms.md §2.3)."""
        inside = ctx.cache.get("virtual_ids", set())
        opt = ctx.encoder_optimizer
        if opt is None or ctx.clip is None:
            return 0.0
        inv = (1.0 / float(ctx.grad_scale) if ctx.grad_scale else 1.0) / ctx.clip.factor
        rest = [p.grad.detach().double() for g in opt.param_groups for p in g["params"] if p.grad is not None and id(p) not in inside]
        return float(sum(r.pow(2).sum() for r in rest)) * inv * inv

    # -- where the meta step runs: ``order`` (MetaMask §3.2, MetAug §4.5, ICL-MSR §5.4) ----------
    #: ``reuse``: the meta-gradient at θ_t in ``before_encoder_step`` (from the real step's
    #: gradient); ``official``: in ``meta_step``, after the encoder step.  Subclasses set it and
    #: implement ``compute_meta_gradient(ctx, order)``.
    order: str = "official"

    def compute_meta_gradient(self, ctx: StepContext, order: str | None = None) -> MetaGradient:
        raise NotImplementedError

    def before_encoder_step(self, ctx: StepContext) -> None:
        if self.bilevel and self.order == "reuse":
            ctx.cache[self.name] = self.compute_meta_gradient(ctx, "reuse")

    def meta_step(self, ctx: StepContext) -> dict[str, float]:
        result = ctx.cache.pop(self.name, None)
        if result is None:
            if self.order == "reuse":
                raise RuntimeError(f"{self.name} order='reuse' computes the meta-gradient in before_encoder_step, which did not run")
            result = self.compute_meta_gradient(ctx, "official")
        return self.assign_meta_grads(result)

    def assign_meta_grads(self, result: MetaGradient) -> dict[str, float]:
        """Write the meta-gradient into ``.grad`` (assigned, never accumulated); return stats."""
        named = self.named_meta_parameters()
        norm = 0.0
        for name, p in named.items():
            g = result.grads[name]
            p.grad = g.to(p.dtype).clone()
            norm += float(g.double().pow(2).sum())
        stats = {k: float(v) for k, v in result.stats.items()}
        stats["grad_norm"] = norm**0.5
        return stats

    def configure_meta_optimizer(self, total_steps: int):
        """SGD (``meta_momentum``, ``meta_weight_decay``) or Adam (``meta_weight_decay`` as
        L2) at ``meta_lr``; cosine to 0 over training (per step) or constant."""
        params = self.meta_parameters()
        if not params:
            raise RuntimeError(f"{self.name}.setup(method) has not been called (use build_regularizer)")
        if self.meta_optimizer == "adam":
            opt = torch.optim.Adam(params, lr=self.meta_lr, weight_decay=self.meta_weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=self.meta_lr, momentum=self.meta_momentum, weight_decay=self.meta_weight_decay)
        sched = None
        if self.meta_scheduler == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, int(total_steps)))
        return opt, sched
