"""MetAug's unified contrastive loss and its margin-injection term (docs/algorithms.md §4.2, §4.3).

Li, Qiang, Zheng, Su, Xiong, *MetAug: Contrastive Learning via Meta Feature Augmentation*,
ICML 2022.  Both functions take *cosine similarities* ``s ∈ [-1, 1]`` and work on the rescaled
scores ``ŝ = (s + 1) / 2 ∈ [0, 1]``, as the official code does.  They are pure (tensors in, a
scalar or per-anchor tensor out) and need no collective: under DDP the caller computes each
local anchor's scores against the global batch (or a global queue), and a mean over local
anchors whose count is the same on every rank averages to the one-process value over ranks
(docs/algorithms.md §1.8).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metassl.losses.distributed import full_precision

__all__ = ["MARGIN_TYPES", "margin_injection_loss", "rescaled_scores", "unified_contrastive_loss"]

#: how margin injection places its two margins (docs/algorithms.md §4.3)
MARGIN_TYPES = ("large", "small", "mean")


def rescaled_scores(s: torch.Tensor) -> torch.Tensor:
    """``ŝ = (s + 1) / 2``: cosine similarities mapped to ``[0, 1]``."""
    return (s + 1) / 2


def _fill(dtype: torch.dtype) -> float:
    """A large finite negative logit for masked entries: ``exp`` underflows to exactly 0, a row
    with nothing valid gives a finite ``logsumexp`` (no inf - inf, no NaN gradient)."""
    return torch.finfo(dtype).min / 4


def _check_mask(name: str, mask: torch.Tensor | None, shape: torch.Size) -> None:
    if mask is None:
        return
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor (True = a valid pair), got {mask.dtype}")
    try:
        if torch.broadcast_shapes(mask.shape, shape) != shape:
            raise RuntimeError
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(mask.shape)} does not broadcast to the scores' shape {tuple(shape)}") from None


def _masked_logsumexp(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is not None:
        logits = torch.where(mask, logits, torch.full((), _fill(logits.dtype), dtype=logits.dtype, device=logits.device))
    return torch.logsumexp(logits, dim=-1)


@full_precision
def unified_contrastive_loss(
    pos_scores: torch.Tensor,
    neg_scores: torch.Tensor,
    gamma: float,
    margin: float | None = None,
    *,
    pos_mask: torch.Tensor | None = None,
    neg_mask: torch.Tensor | None = None,
    scale: float | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """MetAug's unified ("circle") contrastive loss (docs/algorithms.md §4.2)::

        ℓ_i = softplus( logsumexp_{n ∈ N_i} γ (ŝ_n − Δ_n) + logsumexp_{p ∈ P_i} −γ (ŝ_p − Δ_p) )
        L_U = scale · mean_i ℓ_i                          scale = 16 / γ when None (official)

    ``pos_scores`` ``(..., P)`` and ``neg_scores`` ``(..., M)`` are the cosine similarities of
    each anchor (the leading dimensions) to its positives and negatives; ``pos_mask`` /
    ``neg_mask`` (bool, broadcastable to the scores, True = a valid pair) leave pairs out.  An
    anchor without any valid positive or negative contributes 0.  ``margin`` (the official
    ``delta``, ``m = 0.25``; None = off, the official default) shifts the scores by
    ``Δ_p = 1 − m`` and ``Δ_n = m``; without it ``Δ = 0``.

    With one positive and no margin, ``ℓ_i = −log(e^{s_p/τ} / (e^{s_p/τ} + Σ_n e^{s_n/τ}))`` at
    ``τ = 2/γ``: InfoNCE with the positive in the denominator (the constant ``γ/2`` of the
    rescaling cancels).  ``reduction="none"`` returns ``scale · ℓ`` per anchor.
    """
    if gamma <= 0:
        raise ValueError(f"unified_contrastive_loss: gamma must be positive, got {gamma}")
    if margin is not None and not 0.0 <= margin <= 1.0:
        raise ValueError(f"unified_contrastive_loss: margin must be in [0, 1] or None (off), got {margin}")
    if scale is not None and scale <= 0:
        raise ValueError(f"unified_contrastive_loss: scale must be positive or None (16/gamma), got {scale}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"unified_contrastive_loss: reduction must be 'mean' or 'none', got {reduction!r}")
    if pos_scores.dim() < 1 or pos_scores.shape[:-1] != neg_scores.shape[:-1]:
        raise ValueError(
            "unified_contrastive_loss expects pos_scores (..., P) and neg_scores (..., M) with the same anchors, got "
            f"{tuple(pos_scores.shape)} and {tuple(neg_scores.shape)}"
        )
    _check_mask("pos_mask", pos_mask, pos_scores.shape)
    _check_mask("neg_mask", neg_mask, neg_scores.shape)
    delta_p, delta_n = (0.0, 0.0) if margin is None else (1.0 - margin, margin)
    logit_p = -gamma * (rescaled_scores(pos_scores) - delta_p)
    logit_n = gamma * (rescaled_scores(neg_scores) - delta_n)
    per_anchor = F.softplus(_masked_logsumexp(logit_n, neg_mask) + _masked_logsumexp(logit_p, pos_mask))
    factor = 16.0 / gamma if scale is None else float(scale)
    return factor * (per_anchor.mean() if reduction == "mean" else per_anchor)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.mean()
    mask = mask.expand_as(x)
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum() / mask.sum().clamp(min=1)


def _per_sample(x: torch.Tensor, mask: torch.Tensor | None, largest: bool) -> torch.Tensor:
    """Max (``largest``) or min of ``x`` ``(B, n, K)`` over the valid entries of each sample ``n``."""
    if mask is not None:
        fill = torch.finfo(x.dtype).min if largest else torch.finfo(x.dtype).max
        x = torch.where(mask, x, torch.full((), fill, dtype=x.dtype, device=x.device))
    return x.amax(dim=(0, 2)) if largest else x.amin(dim=(0, 2))


@full_precision
def margin_injection_loss(
    gen_pos: torch.Tensor,
    gen_neg: torch.Tensor,
    real_pos: torch.Tensor,
    real_neg: torch.Tensor,
    margin_type: str = "large",
    pos_weight: float = 1e-4,
    *,
    pos_mask: torch.Tensor | None = None,
    neg_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """MetAug's margin injection (docs/algorithms.md §4.3): generated features are pushed to be
    *hard*, i.e. no more similar to their positives than the hardest real positive and at least
    as similar to their negatives as the hardest real negative::

        a_i = min real positive ŝ of sample i,   b_i = max real negative ŝ of sample i
        large: γ⁺ = min(a, b), γ⁻ = max(a, b);   small: swapped;   mean: γ⁺ = γ⁻ = (a + b) / 2
        L_MI = pos_weight · mean relu(ŝ⁺_gen − γ⁺) + mean relu(γ⁻ − ŝ⁻_gen)

    Shapes ``(B, n, P)`` (positives) and ``(B, n, M)`` (negatives): ``B`` score blocks (e.g. one
    per view) of ``n`` samples; the margins of sample ``i`` are taken over all its blocks.  The
    generated scores must be those of generated *queries* against the same keys as the real
    ones, so one ``pos_mask`` / ``neg_mask`` (bool, broadcastable, True = valid) serves both;
    means run over the valid generated pairs.  Every sample needs at least one valid real
    positive and negative.  ``pos_weight`` is the official constant ``1e-4``.  The margins are
    not detached (official): the term also pulls the hardest real scores.
    """
    if margin_type not in MARGIN_TYPES:
        raise ValueError(f"margin_injection_loss: margin_type must be one of {', '.join(MARGIN_TYPES)}; got {margin_type!r}")
    if pos_weight < 0:
        raise ValueError(f"margin_injection_loss: pos_weight must be >= 0, got {pos_weight}")
    for name, t in (("gen_pos", gen_pos), ("gen_neg", gen_neg), ("real_pos", real_pos), ("real_neg", real_neg)):
        if t.dim() != 3:
            raise ValueError(f"margin_injection_loss expects (blocks, samples, pairs) scores; {name} has shape {tuple(t.shape)}")
    if gen_pos.shape != real_pos.shape or gen_neg.shape != real_neg.shape or gen_pos.shape[:2] != gen_neg.shape[:2]:
        raise ValueError(
            "margin_injection_loss: generated and real scores must share one layout (B, n, P) / (B, n, M); got "
            f"{tuple(gen_pos.shape)}, {tuple(gen_neg.shape)}, {tuple(real_pos.shape)}, {tuple(real_neg.shape)}"
        )
    _check_mask("pos_mask", pos_mask, gen_pos.shape)
    _check_mask("neg_mask", neg_mask, gen_neg.shape)
    a = _per_sample(rescaled_scores(real_pos), pos_mask, largest=False)
    b = _per_sample(rescaled_scores(real_neg), neg_mask, largest=True)
    if margin_type == "large":
        m_pos, m_neg = torch.minimum(a, b), torch.maximum(a, b)
    elif margin_type == "small":
        m_pos, m_neg = torch.maximum(a, b), torch.minimum(a, b)
    else:
        m_pos = m_neg = (a + b) / 2
    pos_term = _masked_mean(F.relu(rescaled_scores(gen_pos) - m_pos[None, :, None]), pos_mask)
    neg_term = _masked_mean(F.relu(m_neg[None, :, None] - rescaled_scores(gen_neg)), neg_mask)
    return pos_weight * pos_term + neg_term
