"""MetAug (Li, Qiang, Zheng, Su, Xiong, ICML 2022, arXiv 2203.05119; docs/algorithms.md §4).

One feature generator per view (an MLP on the L2-normalised query, L2-normalised output:
official 128 → 2048 → 2048 → 128, BN + ReLU between) produces *generated queries* that face
the same keys as the real ones (score sets per base method: :mod:`metaug_scores`).  Objective,
for the encoder and, through the meta step, for the generators (§4.4)::

    L = w_base · L_base + w_gen · [ Σ_v L_U(G_v) + L_U(G_all) ] + w_MI · L_MI

- ``L_base``: the unified loss ``L_U`` of the real scores for the contrastive bases (SimCLR,
  MoCo v2), which with ``gamma = null`` (``γ = 2/τ``), ``loss_scale = 1`` and no ``delta_margin``
  *is* their InfoNCE; the base method's own loss for BYOL, SimSiam, Barlow Twins, VICReg.
- ``L_U(G_v)``: the unified loss of the rows whose query is view ``v``'s generated feature;
  ``L_U(G_all)``: of all generated rows.  The rows are independent anchors against real keys,
  so ``L_U(G_all) = mean_v L_U(G_v)``; the official substitutions also hold the unchanged real
  blocks, which here would only repeat ``L_base`` at weight ``w_gen`` and are left out.
- ``L_MI``: margin injection over the generated pairs only, margins per sample from its real
  scores (:func:`metassl.losses.unified.margin_injection_loss`).  The official term also takes
  pair blocks that involve no generated feature (a bug, not copied).

Schedule ``v1`` (the official current loop): the encoder step on ``L`` with the generators
frozen (they enter through :func:`metassl.meta.bilevel.blocked`: values used, zero gradient;
the encoder still gets the gradient *through* them), and the generators' meta step on
``d L(θ'(φ), φ) / dφ`` with the plain-SGD virtual step ``θ' = θ − η_in ∇θ L(θ, φ)``
(``virtual_lr`` η_in = 1e-3), exact second order by default (``grad_mode``: second_order |
first_order | finite_difference, as MetaMask).  ``original`` and ``v2`` take a second *encoder*
step per iteration, which the engine does not run: refused.

``order`` says where the meta step sits (§4.5):

- ``official``: as the official loop, after the encoder step, at ``θ_{t+1}``, with a fresh
  ``∇θ L(θ_{t+1}, φ)`` (one more forward + backward) and the exact mixed term through the
  whole network (forward-over-reverse).
- ``reuse`` (default, **our deviation**): before the encoder step, at ``θ_t`` on the same
  batch; the inner gradient is the real step's gradient of ``L`` (already in ``.grad``: no
  fresh forward + backward), so the meta-gradient is taken one encoder step earlier than in
  the official loop.  The generators read only the network's outputs (the queries), so the
  exact mixed term needs the network only through its tangent along the virtual direction
  ``u``: a one-sided difference of the outputs at relative radius ``tangent_radius``
  (one no-grad forward, :mod:`metassl.meta.feature_tangent`; its base point is the real
  forward's outputs in fp32, one more full-precision forward under autocast), with the
  generator-level part an exact jvp.  Keys from a momentum encoder or the queue do not move.
  Passes beyond the real step: outer forward + backward at ``θ'`` and one or two no-grad
  forwards (measured cost: docs/algorithms.md §4.5).

Official weights ``weight_gen = 1e-5``, ``weight_mi = 1e-11`` and generator SGD (0.03, momentum
0.9, wd 1e-4, constant) are the defaults.  At these weights the generated terms are about 1e-5
of the base loss and the generators barely move: numerically the base method (measured, §4.7).
The adaptive "alpha" pair weights of the official loss are dead code (computed, then overwritten
by 1) and not implemented.  Official defects avoided: the margin helper's arity crash, a memory
bank written by every contrast call (fast-weight features included), fresh random layers in the
probe, ``.cuda()``/DataParallel.  Batch-norm statistics are not updated by meta passes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_leaves, tree_map

from metassl.losses.unified import (
    MARGIN_TYPES,
    margin_injection_loss,
    unified_contrastive_loss,
)
from metassl.meta.bilevel import BilevelRegularizer, blocked
from metassl.meta.feature_tangent import feature_tangent_term
from metassl.methods.base import Method
from metassl.models.heads import ProjectionHead
from metassl.regularizers.base import StepContext, register_regularizer
from metassl.regularizers.metaug_scores import (
    VIEWS,
    default_gamma,
    is_contrastive,
    layout_for,
    layout_scores,
    query_dim,
    unsupported_reason,
)

__all__ = ["FeatureGenerator", "MetAug"]

SCHEDULES = ("v1", "original", "v2")
ORDERS = ("reuse", "official")


class FeatureGenerator(nn.Module):
    """MetAug's augmentation generator (docs/algorithms.md §4.1): ``normalize(MLP(normalize(z)))``,
    ``num_layers − 1`` hidden blocks Linear-BN-ReLU of width ``hidden_dim``, then Linear."""

    def __init__(self, dim: int, hidden_dim: int = 2048, num_layers: int = 3) -> None:
        super().__init__()
        self.mlp = ProjectionHead(dim, hidden_dim, dim, num_layers=num_layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(F.normalize(z, dim=-1)), dim=-1)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"metaug: {message}")


@register_regularizer("metaug")
class MetAug(BilevelRegularizer):
    """MetAug: meta-learnt feature generators whose outputs are extra, hard queries of the
    unified contrastive loss (module docstring; docs/algorithms.md §4).

    **[reconstruction]** The official code covers CMC only (colour-space views, a memory bank);
    three details are ours, with their assumptions (§4.4, §4.8):

    1. score sets for the library's bases (:mod:`metaug_scores`): a generated feature is a
       query against exactly the keys its real counterpart faces (in-batch for SimCLR, the queue
       for MoCo v2, an in-batch term against the detached targets for BYOL, SimSiam, Barlow
       Twins, VICReg, whose own losses have no negatives for margin injection to use);
    2. the substitution terms keep only the generated rows: the unchanged real blocks of the
       official substitutions are assumed to carry nothing beyond ``L_base``;
    3. the margins of a sample are taken over the real scores of all its views, as the official
       per-index reduction over all view pairs: its views share one pair of margins.
    """

    def __init__(
        self,
        weight_gen: float = 1e-5,
        weight_mi: float = 1e-11,
        gamma: float | None = None,
        loss_scale: float | None = 1.0,
        delta_margin: float | None = None,
        margin_type: str = "large",
        margin_pos_weight: float = 1e-4,
        generator_hidden_dim: int = 2048,
        generator_num_layers: int = 3,
        schedule: str = "v1",
        order: str = "reuse",
        tangent_radius: float = 1e-5,
        grad_mode: str = "second_order",
        fd_scheme: str = "central",
        fd_radius: float = 1e-2,
        virtual_step: str = "sgd",
        virtual_lr: float | None = 1e-3,
        meta_precision: str = "auto",
        meta_optimizer: str = "sgd",
        meta_lr: float = 0.03,
        meta_momentum: float = 0.9,
        meta_weight_decay: float = 1e-4,
        meta_scheduler: str = "constant",
    ) -> None:
        super().__init__(
            grad_mode=grad_mode, fd_scheme=fd_scheme, fd_radius=fd_radius, virtual_step=virtual_step,
            virtual_lr=virtual_lr, meta_precision=meta_precision, meta_optimizer=meta_optimizer, meta_lr=meta_lr,
            meta_momentum=meta_momentum, meta_weight_decay=meta_weight_decay, meta_scheduler=meta_scheduler,
        )
        _check(weight_gen >= 0 and weight_mi >= 0, f"weight_gen and weight_mi must be >= 0, got {weight_gen} and {weight_mi}")
        _check(weight_gen > 0 or weight_mi > 0, "weight_gen = weight_mi = 0 leaves the generators out of every loss; use regularizer=none")
        _check(gamma is None or gamma > 0, f"gamma must be positive or null (2/temperature of the base method), got {gamma}")
        _check(loss_scale is None or loss_scale > 0, f"loss_scale must be positive or null (the official 16/gamma), got {loss_scale}")
        _check(delta_margin is None or 0 <= delta_margin <= 1, f"delta_margin must be in [0, 1] or null (off), got {delta_margin}")
        _check(margin_type in MARGIN_TYPES, f"margin_type must be one of {', '.join(MARGIN_TYPES)}; got {margin_type!r}")
        _check(margin_pos_weight >= 0, f"margin_pos_weight must be >= 0, got {margin_pos_weight}")
        _check(generator_hidden_dim >= 1 and generator_num_layers >= 1,
               f"generator_hidden_dim and generator_num_layers must be >= 1, got {generator_hidden_dim} and {generator_num_layers}")
        _check(schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
        _check(schedule == "v1", f"schedule={schedule} takes a second encoder optimizer step per iteration (on dL(theta'(theta), phi)/dtheta), "
               "which the engine does not run (metassl.engine.step takes one); use schedule=v1")
        _check(order in ORDERS, f"order must be one of {', '.join(ORDERS)}; got {order!r}")
        _check(tangent_radius > 0, f"tangent_radius must be positive (relative radius of the output difference), got {tangent_radius}")
        self.order, self.tangent_radius = order, float(tangent_radius)
        self.weight_gen, self.weight_mi = float(weight_gen), float(weight_mi)
        self.gamma = None if gamma is None else float(gamma)
        self.loss_scale = None if loss_scale is None else float(loss_scale)
        self.delta_margin = None if delta_margin is None else float(delta_margin)
        self.margin_type, self.margin_pos_weight = margin_type, float(margin_pos_weight)
        self.generator_dims = (int(generator_hidden_dim), int(generator_num_layers))
        self.schedule = schedule
        self.generators: nn.ModuleList | None = None
        #: γ in use (``gamma``, or the base method's ``2/τ`` / the official 16), set by ``setup``
        self.gamma_in_use: float | None = None
        self.contrastive_base = False
        #: detached scores of the last real step (statistics, histogram)
        self.last_scores: dict[str, torch.Tensor | None] | None = None

    @classmethod
    def supports(cls, method_name: str) -> str | None:
        return unsupported_reason(method_name)

    def setup(self, method: Method) -> None:
        hidden, layers = self.generator_dims
        dim = query_dim(method)
        self.generators = nn.ModuleList([FeatureGenerator(dim, hidden, layers) for _ in range(VIEWS)])
        self.contrastive_base = is_contrastive(method.name)
        self.gamma_in_use = self.gamma if self.gamma is not None else default_gamma(method)

    def named_meta_parameters(self) -> dict[str, nn.Parameter]:
        if self.generators is None:
            raise RuntimeError("MetAug.setup(method) has not been called (use build_regularizer)")
        return {f"{v}.{n}": p for v, gen in enumerate(self.generators) for n, p in gen.named_parameters()}

    # -- the objective (a pure function of the method's output and the generator weights) -----
    def generate(self, queries: torch.Tensor, meta: dict[str, torch.Tensor]) -> torch.Tensor:
        """``G_v(q_v)`` for the ``(V, n, D)`` queries with generator weights ``meta`` (by name)."""
        out = []
        for v, gen in enumerate(self.generators):
            prefix = f"{v}."
            own = {n[len(prefix):]: t for n, t in meta.items() if n.startswith(prefix)}
            out.append(functional_call(gen, own, (queries[v],)))
        return torch.stack(out)

    def terms(self, method: Method, out: dict[str, Any], meta: dict[str, torch.Tensor], with_base: bool = True):
        """``({"base", "gen", "mi"}, scores)``: the weighted terms of ``L`` (module docstring) and
        the cosine scores they were computed from (``with_base=False``: ``base`` is 0, e.g. for
        ∇φ, which it does not depend on)."""
        layout = layout_for(method, out)
        real_pos, real_neg = layout_scores(layout)
        generated = self.generate(layout.queries, meta)
        gen_pos, gen_neg = layout_scores(layout, generated)
        kw = dict(gamma=self.gamma_in_use, margin=self.delta_margin, neg_mask=layout.neg_mask, scale=self.loss_scale)
        zero = real_pos.new_zeros(())
        base = zero
        if with_base:
            base = unified_contrastive_loss(real_pos, real_neg, **kw) if self.contrastive_base else method.loss(out)
        gen = zero
        if self.weight_gen:
            rows = unified_contrastive_loss(gen_pos, gen_neg, reduction="none", **kw)  # (V, n)
            gen = self.weight_gen * (rows.mean(dim=1).sum() + rows.mean())  # Σ_v L_U(G_v) + L_U(G_all)
        mi = zero
        if self.weight_mi:
            mi = self.weight_mi * margin_injection_loss(
                gen_pos, gen_neg, real_pos, real_neg, self.margin_type, self.margin_pos_weight, neg_mask=layout.neg_mask
            )
        scores = dict(real_pos=real_pos, real_neg=real_neg, gen_pos=gen_pos, gen_neg=gen_neg, mask=layout.neg_mask,
                      gen_to_real=(F.normalize(generated.float(), dim=-1) * layout.queries).sum(-1))
        return {"base": base, "gen": gen, "mi": mi}, scores

    def objective(self, out: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        """The encoder objective: ``L`` with the generators frozen (values used, no gradient)."""
        meta = {k: blocked(p) for k, p in self.named_meta_parameters().items()}
        terms, scores = self.terms(ctx.method, out, meta)
        self.last_scores = {k: (None if v is None else v.detach()) for k, v in scores.items()}
        return terms

    def loss_function(self, method: Method, views: list[torch.Tensor]):
        """``(θ, φ) ↦ L`` as a pure function of parameter dicts (``functional_call``; parameters
        not passed enter detached at their current values)."""
        fixed = {n: p.detach() for n, p in method.named_parameters()}

        def loss(params: dict[str, torch.Tensor], meta: dict[str, torch.Tensor]) -> torch.Tensor:
            out = functional_call(method, {**fixed, **params}, (views,))
            terms, _ = self.terms(method, out, meta)
            return self.weight_base * terms["base"] + terms["gen"] + terms["mi"]

        return loss

    # -- meta step (schedule v1) --------------------------------------------------------------
    def compute_meta_gradient(self, ctx: StepContext, order: str | None = None):
        """``d L(θ'(φ), φ) / dφ``, ``θ' = θ − η_in ∇θ L(θ, φ)`` (``virtual_step``), the same ``L``
        inside and outside (§4.5), for ``order`` (default ``self.order``; module docstring):
        ``official`` at the current weights with a fresh inner gradient; ``reuse`` at ``θ_t``
        from the real step (``.grad``, ``ctx.out``): must run before the encoder step."""
        order = order or self.order
        _check(order in ORDERS, f"order must be one of {', '.join(ORDERS)}; got {order!r}")
        method, params = ctx.method, self.virtual_parameters(ctx.method)
        if order == "official":
            loss = self.loss_function(method, ctx.views)
            return self.meta_gradient(ctx, params, loss, loss)
        grads = self.real_gradients(params, ctx)
        if not ctx.out or all(g is None for g in grads.values()):
            raise RuntimeError("metaug order='reuse' needs the real step's forward (ctx.out) and gradient (.grad): "
                               "it runs in before_encoder_step; use order=official to call it elsewhere")
        ref = next(iter(params.values()))
        views = [v.to(ref.dtype) if v.is_floating_point() and v.dtype != ref.dtype else v for v in ctx.views]
        loss = self.loss_function(method, views)
        kw: dict[str, Any] = {}
        if self.grad_mode == "second_order":
            kw["second_order_term"] = self._output_tangent_term(method, views, self._full_precision_out(ctx, ref))
        return self.meta_gradient(ctx, params, loss, loss, inner_grads=grads, **kw)

    def _output_tangent_term(self, method: Method, views: list[torch.Tensor], base: dict[str, Any] | None):
        """``D_u ∇φ L`` through the tangent of the method's outputs (the generators read only
        them): :func:`metassl.meta.feature_tangent.feature_tangent_term` with the whole method
        as the network part and ``gen + mi`` as the head (``base`` has no φ in it)."""
        fixed = {n: p.detach() for n, p in method.named_parameters()}

        def features(params):
            return functional_call(method, {**fixed, **params}, (views,))

        def head(_rest, out, meta):
            terms, _ = self.terms(method, out, meta, with_base=False)
            return terms["gen"] + terms["mi"]

        return feature_tangent_term(features, head, lambda _name: True, self.tangent_radius, base)

    @staticmethod
    def _full_precision_out(ctx: StepContext, ref: torch.Tensor) -> dict[str, Any] | None:
        """The real forward's outputs (detached) when it ran without autocast in the parameters'
        dtype (then they are the difference's base point), else ``None`` (one more forward)."""
        autocast = torch.is_autocast_enabled(ref.device.type) or torch.is_autocast_enabled("cpu")
        leaves = [x for x in tree_leaves(ctx.out) if torch.is_tensor(x) and x.is_floating_point()]
        if autocast or any(x.dtype != ref.dtype for x in leaves):
            return None
        return tree_map(lambda x: x.detach() if torch.is_tensor(x) else x, ctx.out)

    # -- reporting ----------------------------------------------------------------------------
    STAT_NAMES = ("sim_real_pos", "sim_gen_pos", "sim_real_neg", "sim_gen_neg", "sim_real_hardest_neg",
                  "sim_gen_hardest_neg", "sim_gen_to_real", "gen_pos_easier_than_real")

    @torch.no_grad()
    def similarity_stats(self) -> dict[str, float]:
        """Cosine statistics of the last real step: mean positive / negative similarity of real
        and generated queries, the mean hardest negative, the generated-to-real cosine, and the
        fraction of generated positives more similar than the sample's hardest real positive."""
        s = self.last_scores
        if s is None:
            return {}
        mask = s["mask"]

        def mean_neg(x):
            return x.mean() if mask is None else x[mask.expand_as(x)].mean()

        def hardest(x):
            return (x if mask is None else x.masked_fill(~mask, -2.0)).amax(-1).mean()

        hardest_real_pos = s["real_pos"].amin(dim=(0, 2))  # per sample
        values = torch.stack([
            s["real_pos"].mean(), s["gen_pos"].mean(), mean_neg(s["real_neg"]), mean_neg(s["gen_neg"]),
            hardest(s["real_neg"]), hardest(s["gen_neg"]), s["gen_to_real"].mean(),
            (s["gen_pos"] > hardest_real_pos[None, :, None]).float().mean(),
        ]).tolist()
        return dict(zip(self.STAT_NAMES, values))

    def log_stats(self) -> dict[str, float]:
        return self.similarity_stats()

    def on_train_end(self, output_dir: Path) -> None:
        """``metaug_similarities.png`` (histograms of real vs generated positive / negative cosine
        similarities of this process's last batch) and ``metaug_similarities.json`` (the counts,
        bin edges and statistics).  Nothing is written before a training step."""
        s = self.last_scores
        if s is None:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        mask = s["mask"]
        values = {
            "real_pos": s["real_pos"].flatten(), "gen_pos": s["gen_pos"].flatten(),
            "real_neg": s["real_neg"].flatten() if mask is None else s["real_neg"][mask.expand_as(s["real_neg"])],
            "gen_neg": s["gen_neg"].flatten() if mask is None else s["gen_neg"][mask.expand_as(s["gen_neg"])],
        }
        values = {k: v.float().cpu() for k, v in values.items()}
        edges = torch.linspace(-1.0, 1.0, 41)
        counts = {k: torch.histc(v.clamp(-1, 1), bins=40, min=-1.0, max=1.0).long().tolist() for k, v in values.items()}
        report = {"bin_edges": edges.tolist(), "counts": counts, "pairs": {k: int(v.numel()) for k, v in values.items()},
                  "gamma": self.gamma_in_use, **self.similarity_stats()}
        (out / "metaug_similarities.json").write_text(json.dumps(report, indent=1))
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(9, 3.4))
        FigureCanvasAgg(fig)  # Agg canvas: no display, no global backend change
        for i, kind in enumerate(("pos", "neg")):
            ax = fig.add_subplot(1, 2, i + 1)
            for source, colour in (("real", "tab:blue"), ("gen", "tab:orange")):
                v = values[f"{source}_{kind}"].numpy()
                label = f"{'generated' if source == 'gen' else 'real'} (mean {v.mean():.3f})"
                ax.hist(v, bins=edges.numpy(), density=True, alpha=0.55, color=colour, label=label)
            ax.set_xlabel("cosine similarity")
            ax.set_title(f"{'positive' if kind == 'pos' else 'negative'} pairs, last batch")
            ax.legend(loc="best", fontsize=8)
        fig.suptitle(f"MetAug: generated vs real queries (gamma {self.gamma_in_use:.3g})")
        fig.tight_layout()
        fig.savefig(out / "metaug_similarities.png", dpi=120)
