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

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as TF

from .config import check_color_options
from .errors import DataConfigError
from .lab import BatchedSplitLabViews, rgb_to_lab_normalized
from .transforms import (
    _per_view,
    adjust_contrast_fast,
    adjust_hue_fast,
    adjust_saturation_fast,
    blur_kernel_size,
    resolve_augmentation,
)

__all__ = [
    "BatchedEvalView", "BatchedMultiView", "BatchedViewAugment", "build_batched_ssl_transform",
    "check_images", "color_jitter_batch", "crop_resize", "flip_where", "gaussian_blur_batch",
    "gaussian_kernels_1d", "grayscale_where", "normalize_batch", "sample_crop_boxes", "solarize_where",
    "to_model_input",
]

#: RandomResizedCrop's aspect-ratio range and number of tries
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_TRIES = 10
#: colour-jitter op ids, as ColorJitterFast numbers them
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
JITTER_KEYS = ("brightness", "contrast", "saturation", "hue")


# ----------------------------------------------------------------------------- input checks


def check_images(images: Any) -> None:
    """Raise one ValueError unless ``images`` is a uint8 (B, 3, H, W) tensor."""
    if not isinstance(images, torch.Tensor):
        # ValueError, not TypeError: every bad input gets the one error type callers catch
        raise ValueError(f"images must be a torch.Tensor of shape (B, 3, H, W), got {type(images).__name__}")  # noqa: TRY004
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (0..255), got {images.dtype}; pass the undecoded uint8 batch "
                         "(e.g. (x * 255).round().to(torch.uint8) for floats in [0, 1])")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}; "
                         "stack CHW RGB images along a new first dimension")


def _uniform(shape: tuple[int, ...], lo: float, hi: float, generator, dtype=torch.float64) -> torch.Tensor:
    device = generator.device if generator is not None else "cpu"
    return torch.rand(shape, generator=generator, device=device, dtype=dtype).mul_(hi - lo).add_(lo)


def _bernoulli(n: int, p: float, generator) -> torch.Tensor:
    """Bits that are True with probability ``p`` (``rand < p``, as RandomApply)."""
    return _uniform((n,), 0.0, 1.0, generator) < p


# ----------------------------------------------------------------------------- crop + flip


def sample_crop_boxes(
    batch_size: int, height: int, width: int, scale: tuple[float, float], generator=None,
    ratio: tuple[float, float] = CROP_RATIO,
) -> dict[str, torch.Tensor]:
    """RandomResizedCrop boxes for a batch: ``top``, ``left``, ``height``, ``width`` (int64, (B,)).

    All 10 tries of every sample are drawn at once; each sample keeps its first valid one
    (torchvision's rule), else the same central-crop fallback.
    """
    shape = (batch_size, CROP_TRIES)
    area = _uniform(shape, scale[0], scale[1], generator) * (height * width)
    aspect = torch.exp(_uniform(shape, math.log(ratio[0]), math.log(ratio[1]), generator))
    w = torch.round(torch.sqrt(area * aspect)).long()
    h = torch.round(torch.sqrt(area / aspect)).long()
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = valid.long().argmax(dim=1, keepdim=True)  # index of the first True (0 if none)
    h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
    top = (_uniform((batch_size,), 0.0, 1.0, generator) * (height - h + 1)).long()
    left = (_uniform((batch_size,), 0.0, 1.0, generator) * (width - w + 1)).long()
    fb_h, fb_w = _central_fallback(height, width, ratio)
    found = valid.any(dim=1)
    h, w = torch.where(found, h, fb_h), torch.where(found, w, fb_w)
    top = torch.where(found, top, torch.full_like(top, (height - fb_h) // 2))
    left = torch.where(found, left, torch.full_like(left, (width - fb_w) // 2))
    return {"top": top, "left": left, "height": h, "width": w}


def _central_fallback(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """torchvision's crop size when no try is valid: the whole image clipped to the ratio range."""
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        return round(width / min(ratio)), width
    if in_ratio > max(ratio):
        return height, round(height * max(ratio))
    return height, width


def crop_resize(images: torch.Tensor, top, left, height, width, size: int) -> torch.Tensor:
    """Crop box ``i`` of image ``i`` and resize it to ``size`` x ``size`` (float32, same scale as input).

    ``roi_align(aligned=True, sampling_ratio=0)``: pixel-edge boxes, ``ceil(crop/size)`` samples per
    bin and axis (see the module docstring for the difference to torchvision's antialiased resize).
    """
    idx = torch.arange(images.shape[0], device=images.device)
    boxes = torch.stack([idx, left, top, left + width, top + height], dim=1).to(images.device, torch.float32)
    return roi_align(images.float(), boxes, output_size=(size, size), spatial_scale=1.0,
                     sampling_ratio=0, aligned=True)


def flip_where(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Horizontally flip the samples whose ``flip`` bit is set."""
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


# ----------------------------------------------------------------------------- photometric


def _brightness(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return img.mul(factor.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def _contrast(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return adjust_contrast_fast(img, factor.view(-1, 1, 1, 1))


def _saturation(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return adjust_saturation_fast(img, factor.view(-1, 1, 1, 1))


def _hue(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return adjust_hue_fast(img, factor.view(-1, 1, 1))


_JITTER_OPS = {BRIGHTNESS: _brightness, CONTRAST: _contrast, SATURATION: _saturation, HUE: _hue}


def color_jitter_batch(
    img: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, applied: torch.Tensor,
    enabled: Sequence[int] = (BRIGHTNESS, CONTRAST, SATURATION, HUE),
) -> torch.Tensor:
    """ColorJitterFast on a float batch in [0, 1] with per-sample factors and op order.

    ``factors`` (B, 4) in op-id order, ``order`` (B, 4) a permutation per sample (position k
    applies op ``order[:, k]``), ``applied`` (B,) bool; ops not in ``enabled`` are skipped.
    At each position, each op runs once on the samples that have it there.
    """
    out = img.clone()
    for position in range(4):
        for op in enabled:
            sel = (applied & (order[:, position] == op)).nonzero().squeeze(1)
            if sel.numel():
                out[sel] = _JITTER_OPS[op](out[sel], factors[sel, op])
    return out


def grayscale_where(img: torch.Tensor, gray: torch.Tensor) -> torch.Tensor:
    """torchvision's 3-channel grayscale (luma weights) for the samples whose bit is set."""
    return torch.where(gray.view(-1, 1, 1, 1), TF.rgb_to_grayscale(img, num_output_channels=3), img)


def gaussian_kernels_1d(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(n, kernel_size) normalised Gaussian taps, one row per sigma, as torchvision computes them."""
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    x = torch.linspace(-lim, lim, steps=kernel_size, dtype=sigma.dtype, device=sigma.device)
    return torch.softmax(x.div(sigma.view(-1, 1)).pow(2).neg(), dim=1)


def gaussian_blur_batch(img: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Gaussian blur with one sigma per sample: separable depthwise conv, reflect padding."""
    n, c, h, w = img.shape
    if n == 0:
        return img
    taps = gaussian_kernels_1d(sigma.to(img.dtype), kernel_size).repeat_interleave(c, dim=0)  # (n*c, k)
    pad = kernel_size // 2
    x = F.pad(img, [pad, pad, pad, pad], mode="reflect").reshape(1, n * c, h + 2 * pad, w + 2 * pad)
    x = F.conv2d(x, taps.view(n * c, 1, 1, kernel_size), groups=n * c)
    x = F.conv2d(x, taps.view(n * c, 1, kernel_size, 1), groups=n * c)
    return x.view(n, c, h, w)


def _blur_where(img: torch.Tensor, blur: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    sel = blur.nonzero().squeeze(1)
    if not sel.numel():
        return img
    out = img.clone()
    out[sel] = gaussian_blur_batch(img[sel], sigma[sel], kernel_size)
    return out


def solarize_where(img: torch.Tensor, solarize: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Invert the pixels >= ``threshold`` of the samples whose bit is set (floats in [0, 1])."""
    return torch.where(solarize.view(-1, 1, 1, 1) & (img >= threshold), 1.0 - img, img)


def _norm_constants(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    m = torch.tensor([float(v) for v in mean]).view(3, 1, 1)
    s = torch.tensor([float(v) for v in std]).view(3, 1, 1)
    return -m / s, 1.0 / s


def normalize_batch(img: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(img - mean) / std per channel, computed as ScaleNormalize does (shift + scale)."""
    shift, scale = _norm_constants(mean, std)
    return torch.addcmul(shift.to(img.device), img, scale.to(img.device))


def _check_norm(mean, std) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {len(mean)} and {len(std)}")
    if min(float(s) for s in std) <= 0:
        raise ValueError(f"std values must be > 0, got {tuple(std)}")
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def to_model_input(img: torch.Tensor, mean, std, color_space: str = "rgb") -> torch.Tensor:
    """A float batch in [0, 1] normalised with mean/std (``rgb``) or as Lab in [-1, 1] (``lab``)."""
    return rgb_to_lab_normalized(img) if color_space == "lab" else normalize_batch(img, mean, std)


def _check_size(image_size: Any) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    return image_size


# ----------------------------------------------------------------------------- views


class BatchedViewAugment:
    """One augmented view for a whole uint8 batch, from the strengths ``build_view_transform`` takes."""

    def __init__(self, params: Mapping[str, Any], view: int, image_size: int, mean, std, color_space: str = "rgb"):
        self.image_size = _check_size(image_size)
        self.mean, self.std = _check_norm(mean, std)
        check_color_options(color_space, "full")
        self.color_space = color_space
        p = {k: _per_view(v, view) for k, v in params.items()}
        self.p = p
        if not 0 < p["crop_scale_min"] <= p["crop_scale_max"] <= 1:
            raise DataConfigError(f"crop scale must satisfy 0 < min <= max <= 1, got ({p['crop_scale_min']}, {p['crop_scale_max']})")
        for key in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            if not 0 <= p[key] <= 1:
                raise DataConfigError(f"{key} is a probability in [0, 1], got {p[key]}")
        if not 0.0 <= p["hue"] <= 0.5:
            raise DataConfigError(f"hue must be in [0, 0.5], got {p['hue']}")
        if min(p[k] for k in JITTER_KEYS) < 0:
            raise DataConfigError(f"jitter strengths must be >= 0, got {[p[k] for k in JITTER_KEYS]}")
        if p["blur_p"] > 0 and not 0 < p["blur_sigma_min"] <= p["blur_sigma_max"]:
            raise DataConfigError(f"blur sigma must satisfy 0 < min <= max, got ({p['blur_sigma_min']}, {p['blur_sigma_max']})")
        self.enabled = tuple(i for i, k in enumerate(JITTER_KEYS) if p[k] > 0) if p["jitter_p"] > 0 else ()
        self.kernel_size = blur_kernel_size(self.image_size)

    def _factors(self, n: int, generator) -> torch.Tensor:
        """(n, 4) factors with ColorJitterFast's distributions (1 / 0 for a disabled op)."""
        u = _uniform((n, 4), 0.0, 1.0, generator)
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
        params["flip"] = _bernoulli(n, p["flip_p"], generator)
        params["jitter"] = _bernoulli(n, p["jitter_p"], generator) & bool(self.enabled)
        params["factors"] = self._factors(n, generator)
        params["order"] = _uniform((n, 4), 0.0, 1.0, generator).argsort(dim=1)
        params["gray"] = _bernoulli(n, p["grayscale_p"], generator)
        params["blur"] = _bernoulli(n, p["blur_p"], generator)
        params["sigma"] = _uniform((n,), p["blur_sigma_min"], p["blur_sigma_max"], generator).float()
        params["solarize"] = _bernoulli(n, p["solarize_p"], generator)
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
            x = _blur_where(x, params["blur"], params["sigma"], self.kernel_size)
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
        self.image_size = _check_size(image_size)
        self.mean, self.std = _check_norm(mean, std)
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
