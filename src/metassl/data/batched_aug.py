"""Batched multi-view augmentation: the per-sample pipelines of :mod:`.transforms` applied to a
whole uint8 batch at once, as tensor ops on the batch's device (a GPU batch augments on the GPU).

:func:`build_batched_ssl_transform` mirrors :func:`.transforms.build_ssl_transform`: same
resolved strengths, same per-view cycling, same order (crop, flip, colour jitter, grayscale,
blur, solarize, normalise) and the same parameter distributions.  Each view is a
:class:`BatchedViewAugment` with ``sample`` (random per-sample parameters) and ``apply``
(deterministic given them), so that every stage can be checked against torchvision.

Crop + resize uses ``torchvision.ops.roi_align`` (``aligned=True``, ``sampling_ratio=0``: each
output pixel averages ``ceil(crop / output)`` x ``ceil(crop / output)`` bilinear samples of its
bin, i.e. one exact bilinear sample when upscaling, a box-averaged one when downscaling).
Measured against ``v2.functional.resized_crop(float image, antialias=True)`` per sample
(256 crops, values in [0, 1]; uint8 noise is the worst case, "smooth" is noise blurred with sigma 2):

* upscale or same size (32 px input -> 64 or 32 px views, scale (0.08, 1)): interior pixels
  max 1.2e-7 (float rounding).  Only the rim differs: the output rows/columns whose sample point
  lies within half a crop pixel of the crop's edge, where roi_align interpolates with the image
  pixel just outside the crop and torchvision clamps to the crop's edge pixel (noise: mean over
  all pixels 6e-3, max 0.62; smooth: mean 2e-4, max 0.02).  Crops touching the image border agree
  exactly there (both clamp).
* downscale (96 px input -> 64 px views, scale (0.7, 1)): noise mean 0.014, max 0.13; smooth mean
  6e-4, max 0.015.  roi_align's box average of bilinear samples is a slightly different low-pass
  than torchvision's triangle antialias filter.

Unlike the per-sample pipeline, the crop is not rounded to uint8 before the photometric ops
(a difference of at most 0.5/255 per pixel).  Random parameters are drawn on the generator's
device (a CPU generator for a CUDA batch: drawn on the CPU, then moved; deterministic for a
seed on any device).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torchvision.transforms.v2 import functional as TF

from .batch_ops import (  # the stages, also re-exported from here
    JITTER_KEYS,
    bernoulli_draws,
    blur_where,
    check_image_size,
    check_images,
    check_normalization,
    color_jitter_batch,
    crop_resize,
    flip_where,
    gaussian_blur_batch,
    gaussian_kernels_1d,
    grayscale_where,
    normalize_batch,
    sample_crop_boxes,
    solarize_where,
    to_model_input,
    uniform_draws,
)
from .config import check_color_options
from .errors import DataConfigError
from .lab import BatchedSplitLabViews
from .transforms import (
    per_view_value,
    blur_kernel_size,
    check_view_strengths,
    resolve_augmentation,
)

__all__ = [
    "BatchedEvalView", "BatchedMultiView", "BatchedViewAugment", "build_batched_ssl_transform",
    "check_images", "color_jitter_batch", "crop_resize", "flip_where", "gaussian_blur_batch",
    "gaussian_kernels_1d", "grayscale_where", "normalize_batch", "sample_crop_boxes", "solarize_where",
    "to_model_input",
]


# ----------------------------------------------------------------------------- views


class BatchedViewAugment:
    """One augmented view for a whole uint8 batch, from the strengths ``build_view_transform`` takes."""

    def __init__(self, params: Mapping[str, Any], view: int, image_size: int, mean, std, color_space: str = "rgb"):
        self.image_size = check_image_size(image_size)
        self.mean, self.std = check_normalization(mean, std)
        check_color_options(color_space, "full")
        self.color_space = color_space
        p = {k: per_view_value(v, view) for k, v in params.items()}
        self.p = p
        check_view_strengths(p)
        self.enabled = tuple(i for i, k in enumerate(JITTER_KEYS) if p[k] > 0) if p["jitter_p"] > 0 else ()
        self.kernel_size = blur_kernel_size(self.image_size)

    def _factors(self, n: int, generator) -> torch.Tensor:
        """(n, 4) factors with ColorJitterFast's distributions (1 / 0 for a disabled op)."""
        u = uniform_draws((n, 4), 0.0, 1.0, generator)
        cols = []
        for i, key in enumerate(JITTER_KEYS[:3]):
            s = self.p[key]
            lo = max(0.0, 1.0 - s)
            cols.append(lo + u[:, i] * (1.0 + s - lo) if s > 0 else torch.ones_like(u[:, i]))
        cols.append((2.0 * u[:, 3] - 1.0) * self.p["hue"])
        return torch.stack(cols, dim=1).float()

    def sample(self, batch_size: int, height: int, width: int, generator=None, device=None) -> dict[str, torch.Tensor]:
        """Per-sample parameters (drawn on the generator's device, moved to ``device``): crop ``top``,
        ``left``, ``height``, ``width``; bits ``flip``, ``jitter``, ``gray``, ``blur``, ``solarize``;
        jitter ``factors`` (B, 4) and ``order`` (B, 4); blur ``sigma``."""
        p, n = self.p, batch_size
        params = sample_crop_boxes(n, height, width, (p["crop_scale_min"], p["crop_scale_max"]), generator)
        params["flip"] = bernoulli_draws(n, p["flip_p"], generator)
        params["jitter"] = bernoulli_draws(n, p["jitter_p"], generator) & bool(self.enabled)
        params["factors"] = self._factors(n, generator)
        params["order"] = uniform_draws((n, 4), 0.0, 1.0, generator).argsort(dim=1)
        params["gray"] = bernoulli_draws(n, p["grayscale_p"], generator)
        params["blur"] = bernoulli_draws(n, p["blur_p"], generator)
        params["sigma"] = uniform_draws((n,), p["blur_sigma_min"], p["blur_sigma_max"], generator).float()
        params["solarize"] = bernoulli_draws(n, p["solarize_p"], generator)
        return {k: v.to(device) for k, v in params.items()} if device is not None else params

    def apply(self, images: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The normalised float32 (B, 3, S, S) view; deterministic given ``params``."""
        check_images(images)
        x = crop_resize(images, params["top"], params["left"], params["height"], params["width"], self.image_size)
        x = flip_where(x.div_(255.0), params["flip"])
        if self.enabled:
            x = color_jitter_batch(x, params["factors"], params["order"], params["jitter"], self.enabled)
        if self.p["grayscale_p"] > 0:
            x = grayscale_where(x, params["gray"])
        if self.p["blur_p"] > 0:
            x = blur_where(x, params["blur"], params["sigma"], self.kernel_size)
        if self.p["solarize_p"] > 0:
            x = solarize_where(x, params["solarize"])
        return to_model_input(x, self.mean, self.std, self.color_space)

    def __call__(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        check_images(images)
        b, _, h, w = images.shape
        return self.apply(images, self.sample(b, h, w, generator, images.device))

    def __repr__(self) -> str:
        return f"BatchedViewAugment(image_size={self.image_size}, {self.p})"


class BatchedEvalView:
    """The eval transform for a batch: (resize + centre crop if sizes differ), scale, normalise."""

    def __init__(self, image_size: int, mean, std, color_space: str = "rgb"):
        self.image_size = check_image_size(image_size)
        self.mean, self.std = check_normalization(mean, std)
        check_color_options(color_space, "full")
        self.color_space = color_space

    def sample(self, batch_size: int, height: int, width: int, generator=None, device=None) -> dict[str, torch.Tensor]:
        return {}

    def apply(self, images: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        check_images(images)
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = TF.resize(images, [self.image_size], antialias=True)
            images = TF.center_crop(images, [self.image_size, self.image_size])
        return to_model_input(images.float().div_(255.0), self.mean, self.std, self.color_space)

    def __call__(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        return self.apply(images)

    def __repr__(self) -> str:
        return f"BatchedEvalView(image_size={self.image_size})"


class BatchedMultiView:
    """Each view transform applied to the same batch, in order, sharing one generator."""

    def __init__(self, transforms: Sequence[Any]):
        if len(transforms) == 0:
            raise ValueError("BatchedMultiView needs at least one view transform")
        self.transforms = list(transforms)

    def __call__(self, images: torch.Tensor, generator=None) -> list[torch.Tensor]:
        return [t(images, generator) for t in self.transforms]

    def __len__(self) -> int:
        return len(self.transforms)

    def __repr__(self) -> str:
        inner = ",\n  ".join(repr(t) for t in self.transforms)
        return f"BatchedMultiView([\n  {inner}\n])"


def build_batched_ssl_transform(
    augmentation: str, image_size: int, mean, std, num_views: int = 2,
    overrides: Mapping[str, Any] | None = None, color_space: str = "rgb", lab_views: str = "full",
) -> BatchedMultiView | BatchedSplitLabViews:
    """Batched counterpart of ``build_ssl_transform`` (``'none'``: eval views; ``lab_views=split``:
    one crop per sample, view 0's strengths, split into the L and ab views)."""
    check_color_options(color_space, lab_views)
    if isinstance(num_views, bool) or not isinstance(num_views, int) or num_views < 1:
        raise DataConfigError(f"num_views must be an int >= 1, got {num_views!r}")
    family, params = resolve_augmentation(augmentation, image_size, overrides)
    if family == "none":
        view = BatchedEvalView(image_size, mean, std, color_space)
        return BatchedSplitLabViews(view, num_views) if lab_views == "split" else BatchedMultiView([view] * num_views)
    if lab_views == "split":
        return BatchedSplitLabViews(BatchedViewAugment(params, 0, image_size, mean, std, "lab"), num_views)
    return BatchedMultiView(
        [BatchedViewAugment(params, i, image_size, mean, std, color_space) for i in range(num_views)]
    )
