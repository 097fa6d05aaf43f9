"""MetaMask (Li, Qiang, Zhang, Mo, Zheng, Su, Xiong, NeurIPS 2022, arXiv 2209.07902).

A learnable per-dimension mask ``m = sigmoid(w)`` (``w₀ = 0``, so ``m = 0.5``) multiplies
the backbone feature ``h`` before *every* projector (``f = h ⊙ m``).  Two objectives, as in
the official code (``meta-mask.py``) and the paper's Fig. 3 (docs/algorithms.md §3):

- encoder (backbone + all heads): ``weight_base · L_base(f) + weight_drr · L_drr(f)``, where
  ``L_drr`` is the Barlow-Twins redundancy-reduction loss (λ = 5e-3) on its own projector
  (3 × 2048, last BN) and ``L_base`` the base method's loss.  The mask receives *no*
  gradient from this objective (:func:`metassl.meta.bilevel.blocked`).
- mask (meta step): ``L_base`` of the masked representation after one virtual encoder step,
  differentiated through that step (second order), by the shared bilevel base
  (:class:`metassl.meta.bilevel.BilevelRegularizer`).

Defaults vs the official weighting (``paper=metamask_cifar10`` keeps the official one).
The official ``weight_base = 10``, an *un-normalised* ``L_drr`` and a mask SGD at lr 1e-3
were tuned for lr 1e-3 and 800 epochs.  With the library's base presets (lr 0.3 × B/256)
they swamp the base loss (``L_drr`` of 2048 dimensions sits near 1,800) and the mask does
not move (measured: the built-in demo fell from kNN 0.295 to 0.155, mask in 0.4997–0.5006).
So the defaults are ``weight_base = 1``, ``L_drr`` divided by its dimension
(``drr_normalize``), and the mask trained by Adam at 1e-2 (scale-free in the size of the
meta-gradient, which is tiny at these learning rates).  One base method has its own value,
chosen on the validation split: MoCo v2 takes ``weight_drr = 0.1``
(``configs/regularizer_method/metamask_moco_v2.yaml``).  ``benchmarks/metamask_defaults_paired.json``
holds the measured table for every base method with and without MetaMask.

Momentum / target methods (MoCo v2, BYOL): the target network sees the *same* mask
(detached), in the real step and at virtual weights; the target is not part of the virtual
step and no meta-gradient flows through it.  [reconstruction] — the official code only has
SimCLR (docs/algorithms.md §3.4).

Options (defaults in brackets)
------------------------------
``order`` [``reuse``]: the meta step runs in ``before_encoder_step`` from ``θ_t`` and reuses
    the real step: the inner gradient is the real gradient of the encoder objective (in
    ``.grad``) and with ``virtual_step=mirror`` the virtual step *is* the real update
    ``θ_{t+1}`` (optimizer state before it; the real gradient clip included).  ``official``:
    after the real step, from ``θ_{t+1}``, with a fresh gradient of ``L_base`` alone.
``grad_mode`` [``second_order``]: exact; ``finite_difference``: the official DARTS-style
    approximation (``fd_radius``, ``fd_scheme`` central | forward); ``first_order``:
    ``∇_w L_base(θ', m)`` only (the official ``--no-second-order``).
``backbone_tangent`` [``difference``] (exact second order with ``order=reuse``): the mask acts
    on the backbone output, so the mixed term needs the backbone only through its tangent
    ``J_bb u`` along the virtual direction.  ``difference``: a one-sided difference of
    backbone features at relative radius ``tangent_radius`` [1e-5] (one no-grad backbone
    forward; exact heads), at the pass floor of a same-batch second-order step.
    ``jvp``: forward-mode through the whole inner gradient (exact to rounding, one more
    forward-mode backbone pass).  Agreement and cost: ``benchmarks/metamask_overhead.json``.
``virtual_step`` [``mirror``]: replay the real encoder optimizer (SGD, LARS, Adam, AdamW,
    their state, lr and gradient clip); ``sgd``: plain ``θ - lr·g`` at ``virtual_lr``
    (``None`` = the encoder's current lr).
``virtual_params`` [``all``]: backbone + heads (+ the ``L_drr`` projector) take the virtual
    step; ``heads``: the fast option, the backbone stays, its real features are replayed.
``second_order_params`` [``all``]: ``heads`` drops the backbone's share of the
    second-order term (an approximation; the backbone still steps).
``meta_precision`` [``auto``]: the outer pass at ``θ'`` in the training precision (bf16 under
    ``bf16-mixed``, as the real step), the tangent in fp32; ``fp32``: every meta pass without
    autocast; ``autocast``: always under the caller's autocast.  Finite differences always
    run in fp32 (a difference quotient of bf16 gradients is rounding noise).
``meta_optimizer, meta_lr, meta_momentum, meta_weight_decay, meta_scheduler``
    [adam, 1e-2, 0.9, 0, cosine]: the mask optimizer (official: SGD 1e-3, 0.9, 5e-4).
``sigmoid`` [True]: False = the official ``--disable-sigmoid`` (``m = w``, ``w₀ = 1``).

Cost, measured (``benchmarks/metamask_overhead.py``; README table): see there; passes beyond
the real step for the default: forward + backward at ``θ'`` and one no-grad backbone forward.

Differences from the official code kept on purpose: batch-norm running statistics are not
updated by meta passes; ``L_drr`` uses the library's Barlow-Twins loss (biased variance +
1e-5; the official divides by the unbiased std without eps).  Distributed: meta-gradients
are averaged over ranks (:mod:`metassl.meta.engine`).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from metassl.losses import barlow_twins_loss
from metassl.meta import (
    MetaGradient,
    inner_meta_grad,
    meta_pass_context,
    replay_features,
)
from metassl.meta.bilevel import BilevelRegularizer, blocked
from metassl.meta.feature_tangent import feature_tangent_term
from metassl.methods.base import Method
from metassl.models.heads import ProjectionHead
from metassl.regularizers.base import StepContext, check_choices, register_regularizer

__all__ = ["MetaMask", "AppliedMask"]


class AppliedMask(nn.Module):
    """``h ↦ h ⊙ m`` with a fixed (detached) mask: MetaMask's evaluation transform."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.detach().clone())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.mask.to(device=h.device, dtype=h.dtype)


def _is_backbone(name: str) -> bool:
    return name.startswith("backbone.")


@register_regularizer("metamask")
class MetaMask(BilevelRegularizer):
    """MetaMask: dimensional mask meta-learned through a virtual encoder step (module
    docstring: objectives, options; docs/algorithms.md §3)."""

    def __init__(
        self,
        weight_base: float = 1.0,
        weight_drr: float = 1.0,
        drr_lambda: float = 5e-3,
        drr_normalize: bool = True,
        drr_hidden_dim: int = 2048,
        drr_output_dim: int = 2048,
        drr_num_layers: int = 3,
        sigmoid: bool = True,
        grad_mode: str = "second_order",
        backbone_tangent: str = "difference",
        tangent_radius: float = 1e-5,
        fd_scheme: str = "central",
        meta_precision: str = "auto",
        order: str = "reuse",
        virtual_step: str = "mirror",
        virtual_lr: float | None = None,
        virtual_params: str = "all",
        second_order_params: str = "all",
        fd_radius: float = 1e-2,
        meta_optimizer: str = "adam",
        meta_lr: float = 1e-2,
        meta_momentum: float = 0.9,
        meta_weight_decay: float = 0.0,
        meta_scheduler: str = "cosine",
    ) -> None:
        super().__init__(
            grad_mode=grad_mode, fd_scheme=fd_scheme, fd_radius=fd_radius, virtual_step=virtual_step,
            virtual_lr=virtual_lr, meta_precision=meta_precision, meta_optimizer=meta_optimizer, meta_lr=meta_lr,
            meta_momentum=meta_momentum, meta_weight_decay=meta_weight_decay, meta_scheduler=meta_scheduler,
        )
        check_choices(
            "metamask",
            order=(order, ("reuse", "official")),
            virtual_params=(virtual_params, ("all", "heads")),
            second_order_params=(second_order_params, ("all", "heads")),
            backbone_tangent=(backbone_tangent, ("jvp", "difference")),
        )
        if tangent_radius <= 0:
            raise ValueError(f"metamask: tangent_radius must be positive, got {tangent_radius}")
        self.weight_base = float(weight_base)
        self.weight_drr = float(weight_drr)
        self.drr_lambda = float(drr_lambda)
        self.drr_normalize = bool(drr_normalize)
        self.drr_dims = (int(drr_hidden_dim), int(drr_output_dim), int(drr_num_layers))
        self.sigmoid = bool(sigmoid)
        self.order = order
        self.virtual_params = virtual_params
        self.second_order_params = second_order_params
        self.backbone_tangent = backbone_tangent
        self.tangent_radius = float(tangent_radius)
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

    def named_meta_parameters(self) -> dict[str, nn.Parameter]:
        if self.mask_logits is None:
            raise RuntimeError("MetaMask.setup(method) has not been called (use build_regularizer)")
        return {"logits": self.mask_logits}

    # -- the mask ------------------------------------------------------------------------------
    def mask_from(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.sigmoid else logits

    def mask(self) -> torch.Tensor:
        """Current mask ``m`` (with gradient to the logits)."""
        return self.mask_from(self.named_meta_parameters()["logits"])

    def transform_features(self, h: torch.Tensor) -> torch.Tensor:
        """``h ⊙ m`` for the encoder objective: the value of ``m``, none of its gradient."""
        return h * blocked(self.mask()).to(h.dtype)

    def eval_transform(self) -> nn.Module:
        """``h ↦ h ⊙ m`` with the current mask, detached (the official kNN features)."""
        return AppliedMask(self.mask().detach())

    # -- encoder objective ------------------------------------------------------------------
    def drr_loss(self, f: list[torch.Tensor], projector: Any = None) -> torch.Tensor:
        """Barlow-Twins redundancy reduction on the masked features of the first two views,
        divided by its dimension with ``drr_normalize`` (docs/algorithms.md §3.1)."""
        project = projector or self.drr_projector
        z = [project(x) for x in f[:2]]
        loss = barlow_twins_loss(z[0], z[1], lambd=self.drr_lambda)
        return loss / z[0].shape[1] if self.drr_normalize else loss

    def extra_loss(self, out: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        return {"drr": self.weight_drr * self.drr_loss(out["f"])}

    # -- meta step -----------------------------------------------------------------------------
    def virtual_named_parameters(self, method: Method) -> dict[str, nn.Parameter]:
        """The parameters that take the virtual step (``virtual_params``; the ``L_drr``
        projector as ``reg.*`` with ``order=reuse``: it moves in the real step too)."""
        return self.virtual_parameters(method, backbone=self.virtual_params == "all", own=self.order == "reuse")

    def _loss_fns(self, method: Method, views: list[torch.Tensor], replay_h: list[torch.Tensor] | None, with_drr: bool):
        """``L_base(θ, w)`` (outer), the inner loss and the inner loss from given backbone
        features, as pure functions of parameter dicts (``functional_call`` on the method).

        Parameters not passed enter detached at their current values.  A pass whose dict
        holds no backbone parameter replays ``replay_h`` (the real forward's features).  The
        inner loss is ``weight_base·L_base + L_drr`` (``with_drr``, order ``reuse``) or
        ``L_base`` (order ``official``); ``L_drr`` is left out of a pass where nothing it
        depends on moves (its part of the second-order term is exactly zero)."""
        fixed = {n: p.detach() for n, p in method.named_parameters()}
        drr_fixed = {n: p.detach() for n, p in self.drr_projector.named_parameters()}

        def forward(params, meta, features=None):
            own_free, _ = self.split_own(params)
            mask = self.mask_from(meta["logits"])
            transform = lambda h: h * mask.to(h.dtype)  # noqa: E731
            h = features if features is not None else (replay_h if not any(map(_is_backbone, params)) else None)
            with replay_features(method.backbone, views, h) if h is not None else contextlib.nullcontext() as counts:
                out = functional_call(method, {**fixed, **own_free}, (views,), {"feature_transform": transform})
            for k, n in (counts or {}).items():
                self.last_replay[k] = self.last_replay.get(k, 0) + n
            return out

        def objective(params, out, drr: bool):
            if not with_drr:
                return method.loss(out)
            loss = self.weight_base * method.loss(out)
            if drr:
                own = {n[len("drr_projector."):]: t for n, t in self.split_own(params)[1].items() if n.startswith("drr_projector.")}
                project = lambda x: functional_call(self.drr_projector, {**drr_fixed, **own}, (x,))  # noqa: E731
                loss = loss + self.weight_drr * self.drr_loss(out["f"], project)
            return loss

        def moves_drr(params):
            return any(map(_is_backbone, params)) or bool(self.split_own(params)[1])

        def outer(params, meta):
            return method.loss(forward(params, meta))

        def inner(params, meta):
            return objective(params, forward(params, meta), moves_drr(params))

        def inner_at(params, meta, features, drr: bool):
            return objective(params, forward(params, meta, features), drr)

        return outer, inner, inner_at

    def _feature_tangent_term(self, method, views, replay_h, inner_at, exact_base: bool):
        """``D_u ∇w L_inner`` with the backbone's part through its *tangent* only
        (``backbone_tangent=difference``): the mask acts on the backbone output, so
        ``D_u ∇w L_inner = ∂_h ∇w L_inner · J_bb u_bb + ∂_rest ∇w L_inner · u_rest`` and
        ``J_bb u_bb`` is a one-sided difference of backbone features
        ``(h(θ + εu) - h(θ)) / ε``, ``ε = tangent_radius · ‖θ_bb‖ / ‖u_bb‖`` (one no-grad
        backbone forward; its base point is the real forward's features when those are
        full precision, else one more forward).  The head part is an exact jvp
        (:func:`metassl.meta.feature_tangent.feature_tangent_term`)."""
        # used only when the backbone takes part in the second-order term: L_drr moves with it
        def features(bb):
            return [functional_call(method.backbone, {k[len("backbone."):]: v for k, v in bb.items()}, (x,)).flatten(1) for x in views]

        def head(rest, feats, meta):
            return inner_at(rest, meta, list(feats), True)

        base = list(replay_h) if exact_base else None
        return feature_tangent_term(features, head, _is_backbone, self.tangent_radius, base)

    def compute_meta_gradient(self, ctx: StepContext, order: str | None = None) -> MetaGradient:
        """The mask's meta-gradient for ``order`` (default ``self.order``); see module
        docstring.  ``reuse`` must run before the encoder optimizer steps."""
        order = order or self.order
        if order not in ("reuse", "official"):
            raise ValueError(f"metamask: unknown order {order!r}")
        method = ctx.method
        params = self.virtual_named_parameters(method)
        ref = next(iter(params.values()))
        views = [v.to(ref.dtype) if v.is_floating_point() and v.dtype != ref.dtype else v for v in ctx.views]
        kw: dict[str, Any] = {}
        if self.second_order_params == "heads":
            kw["second_order_params"] = [n for n in params if not _is_backbone(n)]
        self.last_replay = {}
        if order == "official":  # fresh gradient of L_base alone (weight 1) at the updated weights
            outer, inner, _ = self._loss_fns(method, views, None, with_drr=False)
            return self.meta_gradient(ctx, params, outer, inner, **kw)
        # reuse: inner gradient = the real step's gradient of the encoder objective at θ_t
        grads = self.real_gradients(params, ctx)
        exact = self._full_precision_features(ctx, ref)
        replay = [h.detach().to(ref.dtype) for h in ctx.out["h"]]
        outer, inner, inner_at = self._loss_fns(method, views, replay, with_drr=True)
        moved = kw.get("second_order_params", list(params))
        if self.grad_mode == "second_order" and self.backbone_tangent == "difference" and any(map(_is_backbone, moved)):
            if not exact:  # the base point must be a full-precision pass of the real batch
                with torch.no_grad(), meta_pass_context(ref.device, [method, self]):
                    replay = [functional_call(method.backbone, {k[9:]: p.detach() for k, p in params.items() if _is_backbone(k)}, (x,)).flatten(1) for x in views]
                outer, inner, inner_at = self._loss_fns(method, views, replay, with_drr=True)
            kw["second_order_term"] = self._feature_tangent_term(method, views, replay, inner_at, exact_base=True)
        if self.grad_mode == "finite_difference" and self.fd_scheme == "forward" and exact:
            # the one-sided difference's base point ∇w L_inner(θ_t) from the real forward's
            # features (heads only, no backbone pass; L_drr iff the shifted passes move it)
            drr = any(map(_is_backbone, moved)) or any(n.startswith("reg.") for n in moved)
            with meta_pass_context(ref.device, [method, self]):
                kw["inner_meta_grads"] = inner_meta_grad(lambda _, meta: inner_at({}, meta, None, drr), {}, self.named_meta_parameters())
        return self.meta_gradient(ctx, params, outer, inner, inner_grads=grads, **kw)

    @staticmethod
    def _full_precision_features(ctx: StepContext, ref: torch.Tensor) -> bool:
        """The real forward ran without autocast and its features are in the parameters' dtype
        (only then may they stand in for the full-precision passes of the meta step)."""
        autocast = torch.is_autocast_enabled(ref.device.type) or torch.is_autocast_enabled("cpu")
        return not autocast and all(x.dtype == ref.dtype for x in ctx.out["h"])

    # -- reporting -------------------------------------------------------------------------------
    @torch.no_grad()
    def mask_stats(self) -> dict[str, float]:
        m = self.mask().detach().float()
        values = torch.stack([m.mean(), m.min(), m.max(), m.std(unbiased=False), (m < 0.5).float().mean()]).tolist()
        return dict(zip(("mask_mean", "mask_min", "mask_max", "mask_std", "mask_frac_below_half"), values))

    def log_stats(self) -> dict[str, float]:
        return self.mask_stats() if self.mask_logits is not None else {}

    def on_train_end(self, output_dir: Path) -> None:
        """Write ``mask.pt`` (tensor), ``mask.json`` (values, statistics and the most
        suppressed dimensions) and ``mask.png`` (mask value per dimension, sorted)."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        m = self.mask().detach().float().cpu()
        torch.save(m, out / "mask.pt")
        order = torch.argsort(m).tolist()
        (out / "mask.json").write_text(json.dumps({"mask": m.tolist(), **self.mask_stats(), "most_suppressed": order[:16]}, indent=1))
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
