"""MRCL (Liu, Li, Han, Guo, Nie, arXiv 2211.09013): masked views and pixel reconstruction.

Masking is a stronger augmentation of the contrastive task and reconstruction regularises it
(docs/algorithms.md §6).  The paper's code was not released; everything beyond that sentence
is a **reconstruction** (its assumptions: docs/algorithms.md §6.5):

- ``prepare_views`` masks view 1 (``masked_views=first``) or views 1 and 2 (``both``) with
  :mod:`metassl.data.masking` (``mask_type`` patch | block | erase, ``patch_size``,
  ``mask_ratio``; hidden pixels set to ``fill_value``, 0 = the normalisation mean); with
  ``rec_fraction < 1`` only the first ``ceil(rec_fraction · B)`` samples of a masked view (a
  random subset: the loader shuffles) are masked and reconstructed, which cuts the extra
  backbone pass of ``contrastive_input=clean`` to that share; the clean samples and the masks
  wait in ``ctx.cache["mrcl"]``;
- the base method sees the clean views (``contrastive_input=clean``, default: one more
  backbone pass per masked view gives the decoder its map) or the masked ones (``masked``, the
  paper's "masking as a stronger augmentation"; on the built-in data's small objects it cost
  15 kNN points after 5 epochs, docs/algorithms.md §6.4);
- a light decoder (:mod:`metassl.models.decoders`, an encoder-side head trained by the encoder
  optimizer) maps the backbone's spatial map of each masked view to pixels, and
  ``extra_loss`` returns ``{"rec": rec_weight · L_rec}`` with ``L_rec`` the MSE over the
  hidden pixels (MAE style) against the clean view, raw or per-patch normalised
  (``target_norm``), :func:`masked_reconstruction_loss` (§6.3, Eq. 6.2).

Momentum methods (MoCo v2, BYOL): the target encoder sees the views the method is given, so
with ``contrastive_input=masked`` it encodes the masked view too (its key / target of view 1
comes from the masked image); its parameters get no gradient, and the decoder only reads the
online map.  Data parallelism: every mask is drawn per sample (leading dimension the local
batch) and ``L_rec`` is a mean of per-sample means, so the mean over ranks of the per-rank
losses is the loss of the global batch (§1.8); with ``rec_fraction < 1`` each rank reconstructs
the first ``ceil(rec_fraction · B_local)`` of its own batch, a random subset of the same law but
not the same samples as one process with the global batch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metassl.data.masking import (
    apply_mask,
    check_mask_options,
    check_patch_grid,
    draw_mask,
)
from metassl.data.masking import mask_ratio as realised_mask_ratio
from metassl.methods.base import Method
from metassl.models.decoders import DECODERS, build_decoder, feature_map_geometry
from metassl.models.feature_maps import require_feature_maps
from metassl.regularizers.base import Regularizer, StepContext, check_choices, register_regularizer

__all__ = ["MRCL", "masked_reconstruction_loss", "patch_denormalize", "patch_normalize"]

TARGET_NORMS = ("none", "patch")
MASKED_VIEWS = ("first", "both")
CONTRASTIVE_INPUTS = ("masked", "clean")
#: samples of the last training batch kept for ``reconstruction.png``
NUM_DISPLAY = 8
PATCH_EPS = 1e-6


# -- pure functions: targets and the loss (docs/algorithms.md §6.3) -----------------------------------
def _patch_stats(x: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance of every ``p × p × C`` patch, broadcast back to ``x``'s shape."""
    b, c, h, w = x.shape
    gh, gw = check_patch_grid(h, w, patch_size)
    patches = x.reshape(b, c, gh, patch_size, gw, patch_size)
    mean = patches.mean(dim=(1, 3, 5), keepdim=True)
    var = patches.var(dim=(1, 3, 5), keepdim=True)
    expand = lambda t: t.expand_as(patches).reshape(b, c, h, w)
    return expand(mean), expand(var)


def patch_normalize(x: torch.Tensor, patch_size: int, eps: float = PATCH_EPS) -> torch.Tensor:
    """MAE's normalised pixel target (He et al. 2022, §3 "Reconstruction target"): every
    ``p × p`` patch (all channels together) minus its mean, over ``sqrt(var + eps)``."""
    mean, var = _patch_stats(x, patch_size)
    return (x - mean) / (var + eps).sqrt()


def patch_denormalize(y: torch.Tensor, reference: torch.Tensor, patch_size: int, eps: float = PATCH_EPS) -> torch.Tensor:
    """Inverse of :func:`patch_normalize` with the patch statistics of ``reference`` (for display)."""
    mean, var = _patch_stats(reference, patch_size)
    return y * (var + eps).sqrt() + mean


def masked_reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``L_rec = mean_b [ Σ_{c,u} M_bu (pred - target)²_bcu / (C · Σ_u M_bu) ]`` (§6.3): the
    per-pixel MSE over each sample's hidden pixels, averaged over samples.  ``pred`` and
    ``target`` ``(B, C, H, W)``, ``mask`` ``(B, 1, H, W)`` bool (True = hidden)."""
    if pred.shape != target.shape or mask.shape != (pred.shape[0], 1, *pred.shape[-2:]):
        raise ValueError(f"reconstruction shapes differ: pred {tuple(pred.shape)}, target {tuple(target.shape)}, mask {tuple(mask.shape)}")
    err = (pred - target).pow(2).mean(dim=1, keepdim=True)
    m = mask.to(err.dtype)
    return ((err * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp(min=1.0)).mean()


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 when it is in a lower precision (bf16 / fp16 autocast outputs), else as is
    (float64 stays float64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _display_stats(normalization, dataset, mean, std, color_space: str = "rgb") -> tuple[torch.Tensor, torch.Tensor] | None:
    """The data's normalisation (mean, std) for un-normalising the PNG; None: not known (or Lab input)."""
    if color_space == "lab":
        return None
    if mean is not None or std is not None:
        if mean is None or std is None or len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mrcl: display_mean and display_std must both be [r, g, b] lists; got {mean!r}, {std!r}")
        stats = (tuple(mean), tuple(std))
    elif normalization is not None:
        from metassl.data.transforms import resolve_normalization

        stats = resolve_normalization(str(normalization), str(dataset or ""))
    else:
        return None
    return tuple(torch.tensor([float(v) for v in s]).view(1, 3, 1, 1) for s in stats)


@register_regularizer("mrcl")
class MRCL(Regularizer):
    """MRCL: masked view(s) for the base loss plus ``rec_weight · L_rec`` from a light decoder
    on the backbone's spatial map (module docstring; docs/algorithms.md §6).  A reconstruction:
    the paper released no code, its assumptions are listed in docs/algorithms.md §6.5."""

    needs_feature_maps = True

    def __init__(
        self,
        mask_type: str = "patch",
        patch_size: int = 4,
        mask_ratio: float = 0.25,
        masked_views: str = "first",
        fill_value: float = 0.0,
        contrastive_input: str = "clean",
        decoder: str = "conv",
        decoder_width: int = 64,
        decoder_depth: int = 1,
        target_norm: str = "none",
        rec_weight: float = 0.1,
        rec_fraction: float = 0.25,
        display_normalization: str | None = None,
        display_dataset: str | None = None,
        display_mean: Sequence[float] | None = None,
        display_std: Sequence[float] | None = None,
        display_color_space: str = "rgb",
    ) -> None:
        super().__init__()
        try:
            check_mask_options(mask_type, patch_size, mask_ratio)
        except ValueError as err:
            raise ValueError(f"mrcl: {err}") from None
        self.mask_type = mask_type
        self.patch_size = int(patch_size)
        self.mask_ratio = float(mask_ratio)
        check_choices(
            "mrcl", masked_views=(masked_views, MASKED_VIEWS), contrastive_input=(contrastive_input, CONTRASTIVE_INPUTS),
            decoder=(decoder, DECODERS),
        )
        self.masked_views = masked_views
        self.fill_value = float(fill_value)
        self.contrastive_input = contrastive_input
        self.decoder_kind = decoder
        for key, value in (("decoder_width", decoder_width), ("decoder_depth", decoder_depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"mrcl: {key} must be a positive integer; got {value!r}")
        self.decoder_width, self.decoder_depth = int(decoder_width), int(decoder_depth)
        check_choices("mrcl", target_norm=(target_norm, TARGET_NORMS))
        self.target_norm = target_norm
        if not float(rec_weight) >= 0.0:
            raise ValueError(f"mrcl: rec_weight must be a number >= 0 (e.g. 0.1); got {rec_weight!r}")
        self.rec_weight = float(rec_weight)
        if isinstance(rec_fraction, bool) or not isinstance(rec_fraction, (int, float)) or not 0.0 < rec_fraction <= 1.0:
            raise ValueError(f"mrcl: rec_fraction must be in (0, 1] (the share of each masked view's samples that are "
                             f"masked and reconstructed, e.g. 0.25); got {rec_fraction!r}")
        self.rec_fraction = float(rec_fraction)
        self.display = _display_stats(display_normalization, display_dataset, display_mean, display_std, display_color_space)
        self.decoder: nn.Module | None = None
        self._stats: dict[str, torch.Tensor] = {}
        #: the last training step's first masked view, NUM_DISPLAY samples on the CPU
        self.samples: dict[str, torch.Tensor] | None = None

    # -- construction --------------------------------------------------------------------------
    def setup(self, method: Method) -> None:
        """The decoder, sized from one probe of the backbone's map (channels and stride)."""
        require_feature_maps(method.backbone)
        channels, stride = feature_map_geometry(method.backbone)
        self.decoder = build_decoder(self.decoder_kind, channels, stride, self.decoder_width, self.decoder_depth)

    def view_indices(self, num_views: int) -> tuple[int, ...]:
        return (0,) if self.masked_views == "first" else tuple(range(min(2, num_views)))

    # -- training hooks -------------------------------------------------------------------------
    def num_masked(self, batch: int) -> int:
        """Samples of a masked view that are masked and reconstructed: the first
        ``ceil(rec_fraction · batch)`` (at least one; the loader shuffles, so a random subset)."""
        return max(1, min(batch, math.ceil(self.rec_fraction * batch - 1e-9)))

    def prepare_views(self, views: list[torch.Tensor], ctx: StepContext) -> list[torch.Tensor]:
        """Mask the chosen views (fresh per-sample masks; with ``rec_fraction < 1`` only their
        first samples); keep the clean samples and masks in the cache."""
        views = list(views)
        indices = self.view_indices(len(views))
        clean, masks, masked = [], [], []
        for i in indices:
            x = views[i]
            if x.dim() != 4 or x.shape[1] != 3:
                raise ValueError(f"mrcl reconstructs 3-channel images (B, 3, H, W); view {i} has shape {tuple(x.shape)}")
            if self.target_norm == "patch":  # (patch and block masks check their own grid)
                check_patch_grid(x.shape[-2], x.shape[-1], self.patch_size)
            n = self.num_masked(x.shape[0])
            x = x if n == x.shape[0] else x[:n]
            mask = draw_mask(self.mask_type, x, self.patch_size, self.mask_ratio)
            clean.append(x)
            masks.append(mask)
            masked.append(apply_mask(x, mask, self.fill_value))
        ctx.cache["mrcl"] = {"indices": indices, "clean": clean, "mask": masks, "masked": masked}
        if self.contrastive_input == "masked":
            for i, x in zip(indices, masked):
                views[i] = x if x.shape[0] == views[i].shape[0] else torch.cat([x, views[i][x.shape[0]:]])
        return views

    def target(self, clean: torch.Tensor) -> torch.Tensor:
        """The pixels to reconstruct: the clean view, per-patch normalised with ``target_norm=patch``."""
        x = at_least_fp32(clean)
        return patch_normalize(x, self.patch_size) if self.target_norm == "patch" else x

    def extra_loss(self, out: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        cache = ctx.cache.get("mrcl")
        if cache is None or self.decoder is None:
            raise RuntimeError("mrcl: extra_loss needs setup(method) and prepare_views of the same step (use build_regularizer and training_step)")
        if self.contrastive_input == "masked":
            if "fmap" not in out:
                raise RuntimeError("mrcl: the method returned no 'fmap'; set method.return_feature_maps = True (build_regularizer does)")
            fmaps = [out["fmap"][i][: m.shape[0]] for i, m in zip(cache["indices"], cache["mask"])]
        else:  # the base loss saw clean views: one more backbone pass over each masked view
            fmaps = [ctx.method.backbone.forward_features(x) for x in cache["masked"]]
        preds, losses = [], []
        for fmap, clean, mask in zip(fmaps, cache["clean"], cache["mask"]):
            pred = at_least_fp32(self.decoder(fmap, clean.shape[-2:]))
            preds.append(pred)
            losses.append(masked_reconstruction_loss(pred, self.target(clean), mask))
        rec = torch.stack(losses).mean()
        cache["pred"] = preds
        self._stats = {
            "rec_loss": rec.detach(),
            "mask_ratio": torch.cat([realised_mask_ratio(m) for m in cache["mask"]]).mean(),
        }
        return {"rec": self.rec_weight * rec}

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        """Keep ``NUM_DISPLAY`` samples of the first masked view (input, mask, reconstruction), detached on the CPU."""
        cache = ctx.cache.get("mrcl")
        if not cache or "pred" not in cache:
            return
        k = NUM_DISPLAY
        clean, mask, pred = cache["clean"][0][:k].float(), cache["mask"][0][:k], cache["pred"][0][:k].float()
        if self.target_norm == "patch":
            pred = patch_denormalize(pred, clean, self.patch_size)
        self.samples = {
            "input": clean.cpu().clone(),
            "masked": cache["masked"][0][:k].float().cpu().clone(),
            "mask": mask.cpu().clone(),
            "reconstruction": pred.cpu().clone(),
        }

    # -- reporting ----------------------------------------------------------------------------------
    def log_stats(self) -> dict[str, float]:
        """``rec_loss`` (``L_rec`` before ``rec_weight``) and the realised ``mask_ratio`` of the last step."""
        return {k: float(v) for k, v in self._stats.items()}

    def _to_display(self, images: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Un-normalise with the data's mean/std (``display_*``), else stretch each sample's input to [0, 1]
        (the same affine map for its three images); clamped to [0, 1]."""
        if self.display is not None:
            mean, std = self.display
            return {k: (v * std + mean).clamp(0, 1) for k, v in images.items()}
        ref = images["input"]
        lo = ref.amin(dim=(1, 2, 3), keepdim=True)
        span = (ref.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp(min=1e-6)
        return {k: ((v - lo) / span).clamp(0, 1) for k, v in images.items()}

    def on_train_end(self, output_dir: Path) -> None:
        """Write ``reconstruction.png``: rows input, masked input, reconstruction (hidden pixels
        predicted, visible ones from the input) of the last training batch's first masked view."""
        if self.samples is None:
            warnings.warn("mrcl: no training step ran in this process; reconstruction.png not written", stacklevel=2)
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        s = self.samples
        composite = torch.where(s["mask"], s["reconstruction"], s["input"])
        rows = self._to_display({"input": s["input"], "masked": s["masked"], "reconstruction": composite})
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        n = s["input"].shape[0]
        fig = Figure(figsize=(1.3 * n + 1.2, 4.3))
        FigureCanvasAgg(fig)  # Agg canvas: no display, no global backend change
        axes = fig.subplots(3, n, squeeze=False)
        titles = ("input", f"masked ({self.mask_type}, {self.mask_ratio:g})", "reconstruction")
        for r, (key, title) in enumerate(zip(("input", "masked", "reconstruction"), titles)):
            for c in range(n):
                ax = axes[r][c]
                ax.imshow(rows[key][c].permute(1, 2, 0).numpy(), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if c == 0:
                    ax.set_ylabel(title, fontsize=8)
        rec = self._stats.get("rec_loss")
        fig.suptitle("MRCL, last training batch" + (f" (L_rec {float(rec):.3f})" if rec is not None else ""), fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "reconstruction.png", dpi=100)
