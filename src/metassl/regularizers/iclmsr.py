"""ICL-MSR (Qiang, Li, Zheng, Su, Xiong, "Interventional Contrastive Learning with Meta Semantic
Regularizer", ICML 2022, arXiv:2206.14702), docs/algorithms.md §5.

From the paper (abstract): the background is a confounder of the representation; a
backdoor adjustment ``P(Y | do(X)) = Σ_b P(Y | X, b) P(b)`` regularizes any contrastive
method; a *meta semantic regularizer* encodes the original, un-augmented image and
re-weights the representations of the two augmented views.  No code was released and
Algorithm 1 was not available: everything below is **[reconstruction]**, with the
assumptions listed in docs/algorithms.md §5.5.

Encoder objective (weights ``weight_base``, ``β = weight_do``)::

    f = h ⊙ w(x_clean)                       (h: backbone feature of a view; w = 2·sigmoid(ψ(x_clean)))
    f_do = f + Σ_k P(b_k) α_k(f) W d_k       (metassl.regularizers.confounder_dictionary)
    L_enc = weight_base · L_base(heads(f)) + β · L_base(heads(f_do))      terms {"base", "do"}

- ``L_base`` is the base method's own loss; ``heads(f_do)`` re-runs only the heads (the
  backbone features of the real forward are replayed, :func:`metassl.meta.replay_features`;
  batch-norm running statistics are not updated a second time).  Momentum methods: the target
  sees the same transform (detached) and, in the ``do`` pass, runs once more (no grad).
- ``ψ`` (:class:`SemanticWeightNet`, a small convnet on ``ctx.extras["clean"]``) is a meta
  parameter: its weights enter the encoder's forward through :func:`blocked` (used, exactly
  zero gradient), and it is trained by the meta step of
  :class:`metassl.meta.bilevel.BilevelRegularizer`: from ``θ_t``, the virtual step is the real
  one (the real gradient of ``L_enc`` in ``.grad``, mirrored optimizer, clip included) and
  the outer objective is the base loss at ``θ'`` (no ``do`` term): ``meta_objective=plain``
  (what the default ``auto`` gives) at weights 1, the encoder as it is evaluated, so ψ is judged only by the encoder
  its weights train (one-step "learning to re-weight"); ``weighted``: ``L_base(θ', ψ)`` with
  ψ's weights applied, where ψ also lowers the loss directly (measured: the encoder then
  co-adapts to the weights and its plain features lose kNN accuracy, docs/algorithms.md §5.5);
  ``auto``: plain, but weighted for ``grad_mode=first_order`` (whose meta-gradient of the plain
  objective is identically zero).  Exact second order (forward-over-reverse) by default,
  ``first_order`` and ``finite_difference`` as MetaMask.  ``order`` [``reuse``] as
  MetaMask's: ``reuse`` = the step above, before the encoder step, whose exact mixed term
  (``backbone_tangent`` [``difference``]) takes the backbone only through a one-sided
  difference of its features along the virtual direction (relative radius ``tangent_radius``
  [1e-5]; one no-grad backbone forward, :mod:`metassl.regularizers.iclmsr_meta`), the heads
  exact; ``jvp``: forward-mode through the whole network.  ``official``: the loop of the
  authors' MetAug/MetaMask code, after the encoder step at ``θ_{t+1}`` with a fresh gradient.
- the per-sample weights depend on the batch, which ``transform_features(h)`` does not see:
  ``prepare_views`` computes them from ``ctx.extras["clean"]`` and they hold for that step's
  forward (cleared after ``objective``); the meta passes compute them functionally from ψ's
  parameter dict.  Outside a training step (evaluation, ``knn_init``) there is no clean
  image and the weights are 1.
- ``adjustment`` / ``semantic_regularizer`` switch either part off (not both: that is
  ``regularizer=none``).  Without the semantic regularizer there is no meta step
  (``bilevel`` False).

Options (defaults in brackets): ``dictionary`` [``ema``] online k-means of backbone
features (after every real step, all ranks the same) | ``learned`` (a parameter table);
``prior`` [``frequency``] assignment frequencies (ema: hard k-means, learned: the mean
attention) | ``uniform``; ``attention`` [``dot``] | ``none`` (``α_k = 1``);
``num_prototypes`` [16], ``attention_dim`` [64], ``dictionary_momentum`` [0.99],
``dead_threshold`` [0.1] (frequency below ``threshold/K`` → re-seeded onto the batch's
worst-explained feature); ``eval_intervention`` [False]: evaluate ``f_do`` of the backbone
feature (weights 1) instead of the backbone feature.  Meta options as MetaMask's.

Not supported: MoCo's cross-rank shuffle-BN under DDP with the semantic regularizer (the
keys are computed on another rank's images, the per-sample weights cannot follow); set
``method.shuffle_bn=false``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from metassl.errors import MetasslError
from metassl.losses.distributed import gather_no_grad
from metassl.meta import MetaGradient, frozen_bn_stats, replay_features
from metassl.meta.bilevel import BilevelRegularizer, blocked
from metassl.methods.base import Method
from metassl.regularizers.base import StepContext, check_choices, register_regularizer
from metassl.regularizers.confounder_dictionary import (
    ATTENTIONS,
    PRIORS,
    BackdoorAdjustment,
    EMADictionary,
    LearnedDictionary,
)
from metassl.regularizers.iclmsr_meta import (
    META_PREFIX,
    backbone_tangent_term,
    loss_functions,
    weigh,
)

__all__ = ["ICLMSR", "FrozenIntervention", "SemanticWeightNet", "weigh"]

DICTIONARIES = ("ema", "learned")
META_OBJECTIVES = ("auto", "plain", "weighted")
ORDERS = ("reuse", "official")


class SemanticWeightNet(nn.Module):
    """ψ: the un-augmented image ``(B, C, H, W)`` → per-sample, per-dimension weights
    ``w = 2·sigmoid(a) ∈ (0, 2)^D``.  Two stride-2 3×3 convolutions with SiLU (smooth: exact
    and finite-difference second order agree), global pooling, a linear layer initialised to
    zero (``w = 1`` at the start).  No batch norm: each sample's weights depend on its image
    alone (the same under any split of the batch over ranks)."""

    def __init__(self, out_dim: int, hidden_dim: int = 32, in_channels: int = 3) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, hidden_dim, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(hidden_dim, hidden_dim, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.logits = nn.Linear(hidden_dim, out_dim)
        nn.init.zeros_(self.logits.weight)
        nn.init.zeros_(self.logits.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * torch.sigmoid(self.logits(self.features(x)))


class FrozenIntervention(nn.Module):
    """``h ↦ h_do`` with a snapshot of the dictionary and the adjustment (no gradient):
    ICL-MSR's evaluation transform with ``eval_intervention`` (weights 1: no clean image)."""

    def __init__(self, adjustment: BackdoorAdjustment, prototypes: torch.Tensor, prior: torch.Tensor) -> None:
        super().__init__()
        self.adjustment = copy.deepcopy(adjustment).requires_grad_(False)
        self.register_buffer("prototypes", prototypes.detach().clone())
        self.register_buffer("prior", prior.detach().clone())

    @torch.no_grad()
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.adjustment(h, self.prototypes.to(h.dtype), self.prior.to(h.dtype))


def _gather_views(parts: list[torch.Tensor]) -> torch.Tensor:
    """Every view's rows from all ranks, view by view in rank order: the global batch in the
    same order on every rank (and as one process holding the whole batch sees it)."""
    return torch.cat([gather_no_grad(p.detach()) for p in parts])


@register_regularizer("iclmsr")
class ICLMSR(BilevelRegularizer):
    """ICL-MSR: backdoor adjustment over a confounder dictionary plus a meta-learnt semantic
    re-weighting from the clean image [reconstruction] (module docstring; docs/algorithms.md §5)."""

    data_requirements = ("clean",)

    def __init__(
        self,
        weight_base: float = 1.0,
        weight_do: float = 0.3,
        adjustment: bool = True,
        semantic_regularizer: bool = True,
        dictionary: str = "ema",
        num_prototypes: int = 16,
        prior: str = "frequency",
        dictionary_momentum: float = 0.99,
        dead_threshold: float = 0.1,
        attention: str = "dot",
        attention_dim: int = 64,
        semantic_hidden_dim: int = 32,
        eval_intervention: bool = False,
        meta_objective: str = "auto",
        order: str = "reuse",
        backbone_tangent: str = "difference",
        tangent_radius: float = 1e-5,
        grad_mode: str = "second_order",
        fd_scheme: str = "central",
        fd_radius: float = 1e-2,
        virtual_step: str = "mirror",
        virtual_lr: float | None = None,
        meta_precision: str = "auto",
        meta_optimizer: str = "adam",
        meta_lr: float = 1e-3,
        meta_momentum: float = 0.9,
        meta_weight_decay: float = 0.0,
        meta_scheduler: str = "cosine",
    ) -> None:
        super().__init__(
            grad_mode=grad_mode, fd_scheme=fd_scheme, fd_radius=fd_radius, virtual_step=virtual_step,
            virtual_lr=virtual_lr, meta_precision=meta_precision, meta_optimizer=meta_optimizer, meta_lr=meta_lr,
            meta_momentum=meta_momentum, meta_weight_decay=meta_weight_decay, meta_scheduler=meta_scheduler,
        )
        if not adjustment and not semantic_regularizer:
            raise ValueError("iclmsr: adjustment and semantic_regularizer are both false, which is regularizer=none; enable one")
        check_choices(
            "iclmsr", dictionary=(dictionary, DICTIONARIES), prior=(prior, PRIORS), attention=(attention, ATTENTIONS),
            meta_objective=(meta_objective, META_OBJECTIVES), order=(order, ORDERS),
            backbone_tangent=(backbone_tangent, ("difference", "jvp")),
        )
        if tangent_radius <= 0:
            raise ValueError(f"iclmsr: tangent_radius must be positive (relative radius of the feature difference), got {tangent_radius}")
        if meta_objective == "plain" and grad_mode == "first_order":
            raise ValueError("iclmsr: grad_mode=first_order of meta_objective=plain is identically zero (psi reaches the plain "
                             "objective only through the virtual step); use second_order, finite_difference or meta_objective=weighted")
        for key, value in (("num_prototypes", num_prototypes), ("attention_dim", attention_dim), ("semantic_hidden_dim", semantic_hidden_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"iclmsr: {key} must be a positive integer, got {value!r}")
        if not 0.0 <= dictionary_momentum < 1.0:
            raise ValueError(f"iclmsr: dictionary_momentum must be in [0, 1), got {dictionary_momentum}")
        if not 0.0 <= dead_threshold < 1.0:
            raise ValueError(f"iclmsr: dead_threshold must be in [0, 1) (a fraction of the uniform frequency 1/K), got {dead_threshold}")
        if weight_do < 0:
            raise ValueError(f"iclmsr: weight_do must be >= 0, got {weight_do}")
        if dictionary == "learned" and prior == "frequency" and attention == "none":
            raise ValueError("iclmsr: dictionary=learned takes its frequencies from the attention; with attention=none use prior=uniform")
        self.weight_base, self.weight_do = float(weight_base), float(weight_do)
        self.use_adjustment, self.use_semantic = bool(adjustment), bool(semantic_regularizer)
        self.dictionary_kind, self.prior_mode, self.attention = dictionary, prior, attention
        self.num_prototypes, self.attention_dim, self.semantic_hidden_dim = num_prototypes, attention_dim, semantic_hidden_dim
        self.dictionary_momentum, self.dead_threshold = float(dictionary_momentum), float(dead_threshold)
        self.eval_intervention = bool(eval_intervention)
        self.meta_objective = meta_objective
        self.order, self.backbone_tangent, self.tangent_radius = order, backbone_tangent, float(tangent_radius)
        #: a meta step only with the semantic regularizer (instance value shadows the class flag)
        self.bilevel = self.use_semantic
        self.dictionary: EMADictionary | LearnedDictionary | None = None
        self.adjustment: BackdoorAdjustment | None = None
        self.semantic: SemanticWeightNet | None = None
        self._weights: torch.Tensor | None = None  # this step's per-sample weights (blocked)
        self._weight_stats: dict[str, float] = {}

    # -- construction ------------------------------------------------------------------------
    def setup(self, method: Method) -> None:
        dim = int(method.feat_dim)
        if self.use_adjustment:
            kw = dict(prior=self.prior_mode, momentum=self.dictionary_momentum)
            if self.dictionary_kind == "ema":
                self.dictionary = EMADictionary(self.num_prototypes, dim, dead_threshold=self.dead_threshold, **kw)
            else:
                self.dictionary = LearnedDictionary(self.num_prototypes, dim, **kw)
            self.adjustment = BackdoorAdjustment(dim, self.attention_dim, self.attention)
        if self.use_semantic:
            self.semantic = SemanticWeightNet(dim, self.semantic_hidden_dim)

    def named_meta_parameters(self) -> dict[str, nn.Parameter]:
        if self.use_semantic and self.semantic is None:
            raise RuntimeError("ICLMSR.setup(method) has not been called (use build_regularizer)")
        if self.semantic is None:
            return {}
        return {META_PREFIX + n: p for n, p in self.semantic.named_parameters()}

    # -- the semantic weights ------------------------------------------------------------------
    def clean_images(self, ctx: StepContext, views: list[torch.Tensor]) -> torch.Tensor:
        clean = ctx.extras.get("clean")
        if clean is None:
            raise MetasslError(
                "iclmsr: the batch has no extras['clean'] (the un-augmented image of the semantic regularizer); metassl train "
                "supplies it, elsewhere pass training_step(..., extras={'clean': images}), or set regularizer.semantic_regularizer=false"
            )
        c = self.semantic.in_channels
        if not torch.is_tensor(clean) or clean.dim() != 4 or clean.shape[0] != views[0].shape[0] or clean.shape[1] != c:
            shape = tuple(clean.shape) if torch.is_tensor(clean) else type(clean).__name__
            raise ValueError(f"iclmsr: extras['clean'] must be a (B, {c}, H, W) tensor with the views' batch size B={views[0].shape[0]}; got {shape}")
        return clean

    def prepare_views(self, views: list[torch.Tensor], ctx: StepContext) -> list[torch.Tensor]:
        """This step's weights ``w(x_clean)`` for the forward (value only: :func:`blocked`)."""
        self._weights = None
        if self.semantic is not None:
            if ctx.distributed and getattr(ctx.method, "shuffle_bn", False):
                raise MetasslError("iclmsr: per-sample semantic weights cannot follow MoCo's cross-rank shuffle-BN; "
                                   "set method.shuffle_bn=false or regularizer.semantic_regularizer=false")
            dtype = next(self.semantic.parameters()).dtype
            w = self.semantic(self.clean_images(ctx, views).to(dtype))
            self._weights = blocked(w)
            ctx.cache["iclmsr_weights"] = w.detach()
        return views

    def transform_features(self, h: torch.Tensor) -> torch.Tensor:
        """``h ⊙ w`` during a training step's forward, ``h`` otherwise."""
        return weigh(h, self._weights)

    # -- the intervention -----------------------------------------------------------------------
    def _prototypes(self, own: dict[str, torch.Tensor] | None) -> torch.Tensor:
        if own is not None and "dictionary.prototypes" in own:
            return own["dictionary.prototypes"]
        return self.dictionary.prototypes

    def adjust(self, f: torch.Tensor, own: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``f_do`` (docs/algorithms.md §5.3); ``own``: the regularizer's encoder parameters by
        name (functional passes), else the module's own."""
        prototypes, prior = self._prototypes(own), self.dictionary.prior()
        if own is None:
            return self.adjustment(f, prototypes, prior)
        params = {n[len("adjustment."):]: t for n, t in own.items() if n.startswith("adjustment.")}
        return functional_call(self.adjustment, params, (f, prototypes, prior))

    def intervened_output(self, method: Method, call: Callable, views, h, w, own=None) -> dict[str, Any]:
        """The method's output on ``f_do`` of the given backbone features ``h`` (the heads
        only: ``h`` is replayed; batch-norm statistics not updated; compiled code eager)."""
        transform = lambda x: self.adjust(weigh(x, w), own)
        with replay_features(method.backbone, views, list(h)), frozen_bn_stats([method, self]), torch.compiler.set_stance("force_eager"):
            return call(views, transform)

    @torch.no_grad()
    def _seed_dictionary(self, h: list[torch.Tensor]) -> None:
        if not bool(self.dictionary.seeded):
            self.dictionary.seed_(_gather_views(h))

    # -- encoder objective ---------------------------------------------------------------------
    def objective(self, out: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        method = ctx.method
        terms = {"base": method.loss(out)}
        if self.adjustment is not None:
            self._seed_dictionary(out["h"])
            out_do = self.intervened_output(method, lambda vs, ft: method(vs, feature_transform=ft), ctx.views, out["h"], self._weights)
            terms["do"] = self.weight_do * method.loss(out_do)
            if self.dictionary_kind == "learned" and self.prior_mode == "frequency":
                with torch.no_grad():
                    ctx.cache["iclmsr_alpha"] = [self.adjustment.alpha(f.detach(), self.dictionary.prototypes) for f in out["f"]]
        self._weights = None
        return terms

    # -- meta step -------------------------------------------------------------------------------
    @property
    def outer_weighted(self) -> bool:
        """Whether the outer objective applies ψ's weights (``meta_objective``, resolved)."""
        return self.meta_objective == "weighted" or (self.meta_objective == "auto" and self.grad_mode == "first_order")

    def compute_meta_gradient(self, ctx: StepContext, order: str | None = None) -> MetaGradient:
        """ψ's meta-gradient for ``order`` (default ``self.order``; module docstring): ``reuse``
        from ``θ_t`` through the real step (``.grad`` holds the real gradient of ``L_enc``: must
        run before the encoder optimizer steps); ``official`` at the current weights with a
        fresh inner gradient (after the encoder step)."""
        order = order or self.order
        check_choices("iclmsr", order=(order, ORDERS))
        method = ctx.method
        params = self.virtual_parameters(method)
        ref = next(iter(params.values()))
        cast = lambda t: t.to(ref.dtype) if t.is_floating_point() and t.dtype != ref.dtype else t  # noqa: E731
        views = [cast(v) for v in ctx.views]
        clean = cast(self.clean_images(ctx, views))
        outer, inner, inner_at = loss_functions(self, method, views, clean)
        if order == "official":
            return self.meta_gradient(ctx, params, outer, inner)
        kw: dict[str, Any] = {}
        if self.grad_mode == "second_order" and self.backbone_tangent == "difference":
            autocast = torch.is_autocast_enabled(ref.device.type) or torch.is_autocast_enabled("cpu")
            real_h = ctx.out.get("h") if ctx.out else None
            exact = real_h is not None and not autocast and all(h.dtype == ref.dtype for h in real_h)
            base = [h.detach() for h in real_h] if exact else None  # else: one full-precision backbone forward
            kw["second_order_term"] = backbone_tangent_term(method, views, inner_at, base, self.tangent_radius)
        return self.meta_gradient(ctx, params, outer, inner, inner_grads=self.real_gradients(params, ctx), **kw)

    # -- per-step updates, evaluation, reporting ---------------------------------------------------
    def after_step(self, ctx: StepContext) -> None:
        """The dictionary's EMA step on this batch's backbone features (ema) or its attention
        frequencies (learned), from the global batch: every rank holds the same dictionary."""
        self._weights = None
        w = ctx.cache.get("iclmsr_weights")
        if w is not None:
            self._weight_stats = {"weight_mean": float(w.mean()), "weight_std": float(w.std(unbiased=False)),
                                  "weight_min": float(w.min()), "weight_max": float(w.max())}
        if self.dictionary is None or "h" not in ctx.out:
            return
        if self.dictionary_kind == "ema":
            self.dictionary.update_(_gather_views(ctx.out["h"]))
        elif "iclmsr_alpha" in ctx.cache:
            self.dictionary.update_(_gather_views(ctx.cache["iclmsr_alpha"]))

    def eval_transform(self) -> nn.Module | None:
        """``h ↦ h_do`` with ``eval_intervention`` (once the dictionary is seeded), else None:
        the backbone feature (no clean image at evaluation: semantic weights 1)."""
        if not (self.eval_intervention and self.dictionary is not None and bool(self.dictionary.seeded)):
            return None
        return FrozenIntervention(self.adjustment, self.dictionary.prototypes, self.dictionary.prior())

    def log_stats(self) -> dict[str, float]:
        stats = dict(self._weight_stats)
        if self.dictionary is not None:
            stats.update(self.dictionary.stats())
        return stats

    def on_train_end(self, output_dir: Path) -> None:
        """Write ``confounder_dictionary.pt`` (prototypes and prior) when the adjustment is on."""
        if self.dictionary is None:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"prototypes": self.dictionary.prototypes.detach().cpu(), "prior": self.dictionary.prior().detach().cpu(),
                    "kind": self.dictionary_kind}, out / "confounder_dictionary.pt")
