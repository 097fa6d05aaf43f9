"""ICL-MSR's meta step as pure functions of parameter dicts (docs/algorithms.md §5.4): the outer
and inner losses of ψ, and the second-order term through the backbone's tangent.

ψ (the semantic weights) acts on the backbone features ``h`` only (``f = h ⊙ w(x_clean)``), so
``D_u ∇ψ L_enc = ∂_h ∇ψ L_enc · J_bb u_bb + ∂_rest ∇ψ L_enc · u_rest``: the backbone enters only
through its tangent along the virtual direction, a one-sided difference of its features
(:mod:`metassl.meta.feature_tangent`), while the heads, the adjustment and ψ are exact (jvp).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.func import functional_call

from metassl.meta import replay_features
from metassl.meta.feature_tangent import feature_tangent_term
from metassl.methods.base import Method

__all__ = ["META_PREFIX", "backbone_features", "backbone_tangent_term", "is_backbone", "loss_functions", "weigh"]

#: prefix of ψ's parameters among the meta parameters
META_PREFIX = "semantic."


def weigh(h: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """``h ⊙ w`` (``w`` None: ``h``); one clear error when the batch does not line up."""
    if w is None:
        return h
    if w.shape != h.shape:
        raise ValueError(
            f"iclmsr: semantic weights {tuple(w.shape)} do not match the features {tuple(h.shape)}: the clean images "
            "must be the batch's samples in the views' order"
        )
    return h * w.to(h.dtype)


def is_backbone(name: str) -> bool:
    return name.startswith("backbone.")


def loss_functions(reg: Any, method: Method, views: list[torch.Tensor], clean: torch.Tensor):
    """``(outer, inner, inner_at)`` of ICL-MSR ``reg``: the outer ``L_base(θ)``
    (``reg.outer_weighted``: ``L_base(θ, ψ)``), the inner ``L_enc(θ, ψ)``, and the inner loss
    from given backbone features ``inner_at(params, meta, h)`` (the backbone is not run: ``h``
    stands in for it, :func:`metassl.meta.replay_features`).  Parameters not passed enter
    detached at their current values; the weighting helpers are ``reg``'s."""
    fixed = {n: p.detach() for n, p in method.named_parameters()}
    own_fixed = {n: p.detach() for n, p in reg.named_encoder_parameters()}
    weighted = reg.outer_weighted

    def loss(params, meta, inner: bool, features=None):
        method_params, own_params = reg.split_own(params)
        mp, own = {**fixed, **method_params}, {**own_fixed, **own_params}
        w = None
        if inner or weighted:
            w = functional_call(reg.semantic, {n[len(META_PREFIX):]: t for n, t in meta.items()}, (clean,))
        call = lambda vs, ft: functional_call(method, mp, (vs,), {"feature_transform": ft})
        replay = replay_features(method.backbone, views, list(features)) if features is not None else contextlib.nullcontext()
        with replay:
            out = call(views, lambda h: weigh(h, w))
        if not inner:
            return method.loss(out)
        total = reg.weight_base * method.loss(out)
        if reg.adjustment is not None:
            total = total + reg.weight_do * method.loss(reg.intervened_output(method, call, views, out["h"], w, own))
        return total

    def outer(params, meta):
        return loss(params, meta, False)

    def inner(params, meta):
        return loss(params, meta, True)

    def inner_at(params, meta, features):
        return loss(params, meta, True, features)

    return outer, inner, inner_at


def backbone_features(method: Method, views: list[torch.Tensor], params: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Flat backbone features of every view at the backbone parameters ``params`` (full names;
    the others at their current values), as :meth:`Method.backbone_features` computes them."""
    bb = {k[len("backbone."):]: v for k, v in params.items() if is_backbone(k)}
    return [functional_call(method.backbone, bb, (x,)).flatten(1) for x in views]


def backbone_tangent_term(method: Method, views: list[torch.Tensor], inner_at, base: list[torch.Tensor] | None, radius: float):
    """``second_order_term`` for :func:`metassl.meta.meta_gradient`: ``D_u ∇ψ L_enc`` with the
    backbone through the difference tangent of its features (relative radius ``radius``; base
    point ``base``, the real forward's features when they are full precision, else computed)
    and the rest (heads, the regularizer's own parameters) exact (module docstring)."""
    return feature_tangent_term(
        lambda params: backbone_features(method, views, params),
        lambda rest, feats, meta: inner_at(rest, meta, feats),
        is_backbone,
        radius,
        base,
    )
