"""MetaMask (Li, Qiang, Zhang, Mo, Zheng, Su, Xiong, NeurIPS 2022, arXiv 2209.07902).

A learnable per-dimension mask ``m = sigmoid(w)`` (``w`` initialised to 0, so ``m = 0.5``)
multiplies the backbone feature ``h`` before *every* projector (``f = h ⊙ m``).  Two
objectives, as in the official code (jiangmengli/MetaMask, ``meta-mask.py``) and the
paper's Fig. 3:

- encoder (backbone + all heads): ``weight_base · L_base(f) + L_drr(f)`` where ``L_drr`` is
  the Barlow-Twins redundancy-reduction loss (λ = 5e-3) on its own projector (3 × 2048,
  last BN) and ``L_base`` the base method's loss (SimCLR's NT-Xent in the official code,
  ``--weight-cl 10``).  The mask receives *no* gradient from this objective.
- mask (meta step): ``L_base`` of the masked representation after one virtual encoder
  step, differentiated through that step (second order).

The mask is trained only by :meth:`meta_step`: the encoder objective reaches it through an
identity with zero gradient (:class:`_ZeroGrad`), so it contributes exactly nothing, yet the
parameter counts as used (DDP without ``find_unused_parameters`` does not stall), and
:meth:`meta_step` *assigns* (never accumulates) the mask's ``.grad``.

Momentum / target methods (MoCo v2, BYOL): the target network sees the *same* mask
``m`` (the method protocol passes the feature transform to the target branch and detaches
its output), both in the real step and at virtual weights.  The target's weights are not
part of the virtual step (they are not trained by the encoder optimizer; their EMA update
happens after the step), and no meta-gradient flows through the target branch: the mask's
meta-gradient comes from the online branch only.  [recon] — the official code only has
SimCLR; methods.md §1.11 names this the natural choice.

Options (every shortcut is explicit; defaults in brackets)
----------------------------------------------------------
``order`` [``reuse``]
    ``reuse``: the meta step runs in ``before_encoder_step`` from ``θ_t`` *before* the real
    update and reuses the real step: the inner gradient is the real step's gradient of the
    encoder objective ``weight_base·L_base + L_drr`` at ``θ_t`` (already in ``.grad``), and
    with ``virtual_step=mirror`` the virtual step ``θ'`` is exactly the real SGD update
    ``θ_{t+1}`` (momentum buffer before its update).  The outer loss is ``L_base(θ', m)``.
    No fresh inner pass, no model copy.
    ``official``: as the official code — the meta step runs after the real step, from the
    *updated* ``θ_{t+1}``, with a *fresh* gradient of ``L_base`` alone (weight 1, no
    ``L_drr``) at ``θ_{t+1}``, the momentum buffer after the real step, and the outer loss
    at ``θ'' = step(θ_{t+1})``.
    Differences of ``reuse`` from ``official``: (i) the virtual step starts at ``θ_t``, not
    ``θ_{t+1}``; (ii) its gradient is that of the full encoder objective (base loss ×
    ``weight_base`` + ``L_drr``), so the look-ahead is the actual training step (roughly
    10× longer than the official look-ahead on ``L_base`` alone when the base term
    dominates); (iii) one forward/backward less.
``grad_mode`` [``second_order``]
    ``second_order``: exact.  With ``order=reuse`` by forward-over-reverse (``torch.func``
    jvp of ``∇_w L_inner`` along ``coef ⊙ ∇θ' L_outer``); with ``order=official`` by
    differentiating the fresh inner gradient (create_graph; forward-over-reverse under
    torch.distributed).
    ``finite_difference``: the official DARTS-style approximation of the second-order term
    (``θ± = θ ± R v``, ``R = fd_radius / ‖v‖``), central difference.
    ``first_order``: ``∇_w L_base(θ', m)`` only (the official ``--no-second-order``).
``virtual_step`` [``mirror``]
    ``mirror``: replay the real ``torch.optim.SGD`` (momentum, dampening, nesterov, weight
    decay, per-group current lr); other optimizers raise.  ``sgd``: plain ``θ - lr·g`` at
    ``virtual_lr`` (``None`` = the encoder's current lr).
``virtual_params`` [``all``]
    ``all``: every trainable parameter of the method (backbone + heads; the ``L_drr``
    projector does not enter ``L_base`` and is left out, which changes nothing).
    ``heads``: the fast option — only the method's heads take the virtual step, the
    backbone stays at its current weights.  Effect: the look-ahead ignores how the
    encoder step changes the backbone, and the mask is meta-learned through the heads
    only.  With ``order=reuse`` the backbone features of the real forward (``out["h"]``)
    are replayed, so the meta step costs only head passes (plus the no-grad target
    network of momentum methods, which the method protocol recomputes).
``second_order_params`` [``all``]
    ``all``: the second-order term runs through every virtual parameter (exact).
    ``heads``: it runs through the heads only; the backbone still takes its virtual step
    (``L_outer`` is evaluated at the full look-ahead), but ``∂θ'_backbone/∂w`` is dropped.
    Effect: an approximation of the exact meta-gradient (the backbone's share of the
    second-order term is lost); cost: the outer backward stops at the heads and the
    second-order pass runs on replayed features, so the step costs about one no-grad
    backbone forward more than the real step.
``meta_precision`` [``fp32``]: the meta step's passes in full precision whatever the
    training precision (autocast off), or ``autocast``: the outer pass (forward + backward
    at θ') under the real step's autocast (bf16-mixed: at bf16 speed, ~3× faster on CPU);
    the exact second order's forward-mode pass stays fp32 (forward-mode AD fails on bf16
    CPU convolutions in torch 2.14).  The meta-gradient then carries bf16 rounding (see
    ``benchmarks/metamask_overhead.json``); not with ``finite_difference``.  Same as
    ``fp32`` when training in fp32.
``fd_radius`` [1e-2]: the official finite-difference radius ``r``.
``fd_scheme`` [``central``]: ``central`` is the official ``(g⁺ - g⁻)/2R`` (error O(r²)).
    ``forward`` is one-sided, ``(g⁺ - g⁰)/R`` (error O(r)), where ``g⁰ = ∇_w L_inner(θ_t)``
    comes from the real forward's features (heads-only pass) with ``order=reuse`` when the
    real step ran in full precision, saving one backbone forward; otherwise (``official``,
    or a bf16 real step whose features are too coarse for a difference quotient) ``g⁰`` is
    computed by a full-precision pass and nothing is saved.
``meta_lr, meta_momentum, meta_weight_decay, meta_scheduler`` [1e-3, 0.9, 5e-4, cosine]:
    the mask optimizer, SGD with the official values; ``cosine`` anneals to 0 over
    training per step (the official anneals per epoch), ``constant`` is the paper's
    appendix "fixed learning rate" variant.
``sigmoid`` [True]: ``m = sigmoid(w)``, ``w₀ = 0``; False = the official
    ``--disable-sigmoid`` (``m = w``, ``w₀ = 1``).

Cost (passes beyond the real step; F = forward, B = backward of the encoder):
``reuse``/``all``/``second_order``: outer F+B at θ' + one jvp at θ (primal + tangent,
about one more F+B); ``finite_difference``: F+B + 2 no-grad F (``fd_scheme=forward``:
F+B + 1 no-grad F); ``first_order``: one
no-grad F at θ' + heads; ``second_order_params=heads``: first order + a heads-only jvp;
``virtual_params=heads``: heads only.  ``official`` adds a fresh F+B at θ_{t+1}.
Measured (``benchmarks/metamask_overhead.py``, ResNet-18 CIFAR, batch 64×2, fp32, one CPU
thread), step time / base SimCLR step: encoder step alone 1.06, ``first_order`` 1.41,
default 3.35, ``finite_difference`` 2.78 (``fd_scheme=forward`` 2.46), ``official`` + FD
3.74, ``second_order_params=heads`` 1.38, ``virtual_params=heads`` 1.03.  Floor of any
same-batch second-order step: encoder step + forward/backward at θ' + one no-grad
backbone forward = 2.37 (README).  At the official radius the finite-difference
meta-gradient of a ReLU network is far from the exact one (cosine 0.17 in that run): the
difference quotient crosses ReLU kinks.

Distributed: meta-gradients are averaged over ranks (see :mod:`metassl.meta.engine`).
The exact second order runs the loss under ``torch.func``; with DDP this needs the loss
collectives to support it (``setup_context`` + ``jvp``), otherwise a clear error names
``finite_difference`` / ``first_order`` as the alternatives.

Differences from the official code kept on purpose: batch-norm running statistics are
not updated by meta passes (the official extra forward at θ updates them once more);
``L_drr`` uses the library's Barlow-Twins loss (biased variance + 1e-5, the official
divides by the unbiased std without eps: the cross-correlation differs by a factor
``N/(N-1)``).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.func import functional_call

from metassl.losses import barlow_twins_loss
from metassl.meta import GRAD_MODES, MetaGradient, VirtualStep, inner_meta_grad, meta_gradient, meta_pass_context
from metassl.methods.base import Method
from metassl.models.heads import ProjectionHead
from metassl.regularizers.base import Regularizer, StepContext, register_regularizer

__all__ = ["MetaMask", "AppliedMask"]


class _ZeroGrad(torch.autograd.Function):
    """Identity whose backward returns zeros: used so that the encoder objective sees the
    mask's value but gives it exactly no gradient."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(grad)


class AppliedMask(nn.Module):
    """``h ↦ h ⊙ m`` with a fixed (detached) mask: MetaMask's evaluation transform."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.detach().clone())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.mask.to(device=h.device, dtype=h.dtype)


@contextlib.contextmanager
def _replay_backbone(backbone: nn.Module, views: list[torch.Tensor], features: list[torch.Tensor]) -> Iterator[dict[str, int]]:
    """Inside the block, ``backbone(view)`` returns the cached features of that view (looked
    up by tensor identity) instead of running; any other call runs the backbone."""
    table = {id(v): h for v, h in zip(views, features)}
    counts = {"replayed": 0, "computed": 0}
    had_own = "forward" in backbone.__dict__
    own = backbone.__dict__.get("forward")
    original = backbone.forward

    def forward(x, *args, **kwargs):
        h = table.get(id(x))
        if h is None or args or kwargs:
            counts["computed"] += 1
            return original(x, *args, **kwargs)
        counts["replayed"] += 1
        return h

    backbone.forward = forward
    try:
        yield counts
    finally:
        if had_own:
            backbone.forward = own
        else:
            del backbone.forward


@register_regularizer("metamask")
class MetaMask(Regularizer):
    """MetaMask: dimensional mask meta-learned through a virtual encoder step (see module
    docstring for the objectives and every option)."""

    bilevel = True

    def __init__(
        self,
        weight_base: float = 10.0,
        weight_drr: float = 1.0,
        drr_lambda: float = 5e-3,
        drr_hidden_dim: int = 2048,
        drr_output_dim: int = 2048,
        drr_num_layers: int = 3,
        sigmoid: bool = True,
        grad_mode: str = "second_order",
        fd_scheme: str = "central",
        meta_precision: str = "fp32",
        order: str = "reuse",
        virtual_step: str = "mirror",
        virtual_lr: float | None = None,
        virtual_params: str = "all",
        second_order_params: str = "all",
        fd_radius: float = 1e-2,
        meta_lr: float = 1e-3,
        meta_momentum: float = 0.9,
        meta_weight_decay: float = 5e-4,
        meta_scheduler: str = "cosine",
    ) -> None:
        super().__init__()
        choices = {
            "grad_mode": (grad_mode, GRAD_MODES),
            "fd_scheme": (fd_scheme, ("central", "forward")),
            "meta_precision": (meta_precision, ("fp32", "autocast")),
            "order": (order, ("reuse", "official")),
            "virtual_step": (virtual_step, ("mirror", "sgd")),
            "virtual_params": (virtual_params, ("all", "heads")),
            "second_order_params": (second_order_params, ("all", "heads")),
            "meta_scheduler": (meta_scheduler, ("cosine", "constant")),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"metamask: {key} must be one of {', '.join(allowed)}; got {value!r}")
        if virtual_lr is not None and virtual_lr <= 0:
            raise ValueError(f"metamask: virtual_lr must be positive or null, got {virtual_lr}")
        self.base_weight = float(weight_base)
        self.weight_drr = float(weight_drr)
        self.drr_lambda = float(drr_lambda)
        self.drr_dims = (int(drr_hidden_dim), int(drr_output_dim), int(drr_num_layers))
        self.sigmoid = bool(sigmoid)
        self.grad_mode = grad_mode
        self.order = order
        self.virtual_step = virtual_step
        self.virtual_lr = virtual_lr
        self.virtual_params = virtual_params
        self.second_order_params = second_order_params
        self.fd_radius = float(fd_radius)
        self.fd_scheme = fd_scheme
        if meta_precision == "autocast" and grad_mode == "finite_difference":
            raise ValueError("metamask: meta_precision=autocast needs grad_mode second_order or first_order "
                             "(finite differences of bf16 gradients are rounding noise); use meta_precision=fp32")
        self.meta_precision = meta_precision
        self.meta_lr, self.meta_momentum, self.meta_weight_decay = float(meta_lr), float(meta_momentum), float(meta_weight_decay)
        self.meta_scheduler = meta_scheduler
        self.mask_logits: nn.Parameter | None = None
        self.drr_projector: nn.Module | None = None
        #: how the last meta step obtained backbone features (heads option: replayed)
        self.last_replay: dict[str, int] = {}

    # -- construction ------------------------------------------------------------------------
    def setup(self, method: Method) -> None:
        dim = int(method.feat_dim)
        self.mask_logits = nn.Parameter(torch.full((dim,), 0.0 if self.sigmoid else 1.0))
        hidden, out, layers = self.drr_dims
        self.drr_projector = ProjectionHead(dim, hidden, out, num_layers=layers, last_bn=True)

    def _check_setup(self) -> None:
        if self.mask_logits is None:
            raise RuntimeError("MetaMask.setup(method) has not been called (use build_regularizer)")

    # -- the mask ------------------------------------------------------------------------------
    def mask_from(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.sigmoid else logits

    def mask(self) -> torch.Tensor:
        """Current mask ``m`` (with gradient to the logits)."""
        self._check_setup()
        return self.mask_from(self.mask_logits)

    def transform_features(self, h: torch.Tensor) -> torch.Tensor:
        """``h ⊙ m`` for the encoder objective: the value of ``m``, none of its gradient."""
        return h * _ZeroGrad.apply(self.mask()).to(h.dtype)

    def eval_transform(self) -> nn.Module:
        """``h ↦ h ⊙ m`` with the current mask, detached (the official kNN features)."""
        return AppliedMask(self.mask().detach())

    # -- encoder objective ------------------------------------------------------------------
    def drr_loss(self, f: list[torch.Tensor]) -> torch.Tensor:
        """Barlow-Twins redundancy reduction on the masked features of the first two views."""
        z = [self.drr_projector(x) for x in f[:2]]
        return barlow_twins_loss(z[0], z[1], lambd=self.drr_lambda)

    def extra_loss(self, out: dict[str, Any], method: Method, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {"drr": self.weight_drr * self.drr_loss(out["f"])}

    # -- meta step -----------------------------------------------------------------------------
    def meta_parameters(self) -> list[nn.Parameter]:
        return [] if self.mask_logits is None else [self.mask_logits]

    def virtual_named_parameters(self, method: Method) -> dict[str, nn.Parameter]:
        """The parameters that take the virtual step (``virtual_params``)."""
        trainable = {id(p) for p in method.trainable_parameters()}
        named = {n: p for n, p in method.named_parameters() if id(p) in trainable}
        if self.virtual_params == "heads":
            named = {n: p for n, p in named.items() if not n.startswith("backbone.")}
        if not named:
            raise ValueError(f"metamask: no parameters for virtual_params={self.virtual_params!r}")
        return named

    def _loss_fns(self, method: Method, views: list[torch.Tensor], replay_h: list[torch.Tensor] | None, with_drr: bool):
        """``L_base(θ, w)`` (outer) and the inner loss as pure functions of parameter dicts
        (``functional_call`` on the method).

        - Parameters that are not passed enter detached (at their current values), so meta
          passes record no graph for them.
        - ``replay_h``: the real forward's backbone features at the current weights
          (``order=reuse``).  A pass whose parameter dict holds no backbone parameter runs
          the backbone at the current weights, so it replays them instead of recomputing.
        - The inner loss is the encoder objective ``weight_base·L_base + L_drr``
          (``with_drr``, order ``reuse``) or ``L_base`` (order ``official``); in a pass
          without backbone parameters ``L_drr`` depends on nothing that moves (``h`` fixed,
          its projector not virtual), so it is left out: its part of the second-order term
          is exactly zero.
        """
        fixed = {n: p.detach() for n, p in method.named_parameters()}
        drr_fixed = {n: p.detach() for n, p in self.drr_projector.named_parameters()}

        def moves_backbone(params: dict[str, torch.Tensor]) -> bool:
            return any(n.startswith("backbone.") for n in params)

        def forward(params: dict[str, torch.Tensor], meta: dict[str, torch.Tensor]) -> dict[str, Any]:
            mask = self.mask_from(meta["logits"])
            transform = lambda h: h * mask.to(h.dtype)  # noqa: E731
            replay = replay_h is not None and not moves_backbone(params)
            with _replay_backbone(method.backbone, views, replay_h) if replay else contextlib.nullcontext() as counts:
                out = functional_call(method, {**fixed, **params}, (views,), {"feature_transform": transform})
            if counts:
                for k, n in counts.items():
                    self.last_replay[k] = self.last_replay.get(k, 0) + n
            return out

        def outer(params, meta):
            return method.loss(forward(params, meta))

        def objective(out, drr: bool):
            if not with_drr:
                return method.loss(out)
            loss = self.base_weight * method.loss(out)
            if drr:
                z = [functional_call(self.drr_projector, drr_fixed, (x,)) for x in out["f"][:2]]
                loss = loss + self.weight_drr * barlow_twins_loss(z[0], z[1], lambd=self.drr_lambda)
            return loss

        def inner(params, meta):
            return objective(forward(params, meta), moves_backbone(params))

        def inner_here(meta, drr: bool):
            """The inner loss at the current weights from the replayed features (heads only);
            ``drr`` as in the passes it is compared with."""
            return objective(forward({}, meta), drr)

        return outer, inner, inner_here

    def _step_rule(self, lr: float) -> VirtualStep:
        if self.virtual_step == "mirror":
            return VirtualStep("mirror")
        return VirtualStep("sgd", lr=float(self.virtual_lr if self.virtual_lr is not None else lr))

    def compute_meta_gradient(self, ctx: StepContext, order: str | None = None) -> MetaGradient:
        """The mask's meta-gradient for ``order`` (default ``self.order``); see module
        docstring.  ``reuse`` must run before the encoder optimizer steps."""
        self._check_setup()
        order = order or self.order
        if order not in ("reuse", "official"):
            raise ValueError(f"metamask: unknown order {order!r}")
        method = ctx.method
        params = self.virtual_named_parameters(method)
        ref = next(iter(params.values()))
        views = [v.to(ref.dtype) if v.is_floating_point() and v.dtype != ref.dtype else v for v in ctx.views]
        implicit = None
        if self.second_order_params == "heads":
            implicit = [n for n in params if not n.startswith("backbone.")]
        self.last_replay = {}
        kw = dict(
            step=self._step_rule(ctx.lr),
            optimizer=ctx.encoder_optimizer,
            mode=self.grad_mode,
            second_order_params=implicit,
            radius=self.fd_radius,
            fd_scheme=self.fd_scheme,
            full_precision=self.meta_precision == "fp32",
            modules=[method, self],
            distributed=ctx.distributed,
        )
        phi = {"logits": self.mask_logits}
        if order == "reuse":
            # inner gradient = the real step's gradient of the encoder objective at θ_t
            scale = getattr(ctx, "grad_scale", None) or ctx.cache.get("grad_scale")
            inv = 1.0 / float(scale) if scale else 1.0
            grads = {n: (None if p.grad is None else p.grad.detach() * inv) for n, p in params.items()}
            outer, inner, inner_here = self._loss_fns(method, views, [h.detach().to(ref.dtype) for h in ctx.out["h"]], with_drr=True)
            if self.grad_mode == "finite_difference" and self.fd_scheme == "forward" and self._full_precision_features(ctx, ref):
                # the one-sided difference's base point ∇w L_inner(θ_t) from the real forward's
                # features: heads only, no backbone pass (L_drr included iff the shifted passes
                # move the backbone, so that both points are the same function)
                moved = implicit if implicit is not None else list(params)
                drr = any(n.startswith("backbone.") for n in moved)
                with meta_pass_context(ref.device, [method, self]):
                    kw["inner_meta_grads"] = inner_meta_grad(lambda _, meta: inner_here(meta, drr), {}, phi)
            return meta_gradient(params, phi, outer, inner, inner_grads=grads, **kw)
        # official: fresh gradient of L_base alone (weight 1) at the updated weights
        outer, inner, _ = self._loss_fns(method, views, None, with_drr=False)
        return meta_gradient(params, phi, outer, inner, **kw)

    @staticmethod
    def _full_precision_features(ctx: StepContext, ref: torch.Tensor) -> bool:
        """The real forward ran without autocast and its features are in the parameters' dtype
        (only then may they stand in for the full-precision passes of the meta step)."""
        h = ctx.out["h"]
        autocast = torch.is_autocast_enabled(ref.device.type) or torch.is_autocast_enabled("cpu")
        return not autocast and all(x.dtype == ref.dtype for x in h)

    def before_encoder_step(self, ctx: StepContext) -> None:
        if self.order == "reuse":
            ctx.cache["metamask"] = self.compute_meta_gradient(ctx, "reuse")

    def meta_step(self, ctx: StepContext) -> dict[str, float]:
        result = ctx.cache.pop("metamask", None)
        if result is None:
            if self.order == "reuse":
                raise RuntimeError("metamask order='reuse' computes the meta-gradient in before_encoder_step, which did not run")
            result = self.compute_meta_gradient(ctx, "official")
        g = result.grads["logits"]
        self.mask_logits.grad = g.to(self.mask_logits.dtype).clone()  # assigned, never accumulated
        stats = {k: float(v) for k, v in result.stats.items()}
        stats["grad_norm"] = float(g.norm())
        return stats

    def configure_meta_optimizer(self, total_steps: int):
        """Official mask optimizer: SGD(lr 1e-3, momentum 0.9, wd 5e-4), cosine to 0."""
        self._check_setup()
        opt = torch.optim.SGD([self.mask_logits], lr=self.meta_lr, momentum=self.meta_momentum, weight_decay=self.meta_weight_decay)
        sched = None
        if self.meta_scheduler == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, int(total_steps)))
        return opt, sched

    # -- reporting -------------------------------------------------------------------------------
    @torch.no_grad()
    def mask_stats(self) -> dict[str, float]:
        m = self.mask().detach().float()
        values = torch.stack([m.mean(), m.min(), m.max(), m.std(unbiased=False), (m < 0.5).float().mean()]).tolist()
        return dict(zip(("mask_mean", "mask_min", "mask_max", "mask_std", "mask_frac_below_half"), values))

    def log_stats(self) -> dict[str, float]:
        return self.mask_stats() if self.mask_logits is not None else {}

    def on_train_end(self, output_dir: Path) -> None:
        """Write ``mask.pt`` (tensor), ``mask.json`` (values + statistics) and ``mask.png``
        (mask value per dimension, sorted)."""
        self._check_setup()
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        m = self.mask().detach().float().cpu()
        torch.save(m, out / "mask.pt")
        (out / "mask.json").write_text(json.dumps({"mask": m.tolist(), **self.mask_stats()}, indent=1))
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6, 3.2))
        FigureCanvasAgg(fig)  # Agg canvas: no display, no global backend change
        ax = fig.add_subplot()
        values = torch.sort(m, descending=True).values.numpy()
        ax.plot(range(len(values)), values, lw=1.5)
        if self.sigmoid:
            ax.axhline(0.5, color="grey", ls="--", lw=0.8, label="initial value 0.5")
            ax.legend(loc="best", fontsize=8)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_xlabel("dimension (sorted by mask value)")
        ax.set_ylabel("mask value")
        ax.set_title(f"MetaMask: {len(values)} dims, mean {values.mean():.3f}, {(values < 0.5).mean():.0%} < 0.5")
        fig.tight_layout()
        fig.savefig(out / "mask.png", dpi=120)
