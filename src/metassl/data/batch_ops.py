"""Batch-wide augmentation ops on (B, 3, H, W) tensors, one parameter per sample: the stages that
:class:`metassl.data.batched_aug.BatchedViewAugment` chains (crop boxes as torchvision's
RandomResizedCrop samples them, crop + resize by ``roi_align``, flip, colour jitter with a per-sample
op order, grayscale, blur, solarize, normalisation).  The measured differences to torchvision are in
the docstring of :mod:`metassl.data.batched_aug`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as TF

from .lab import rgb_to_lab_normalized
from .transforms import adjust_contrast_fast, adjust_hue_fast, adjust_saturation_fast

__all__ = [
    "BRIGHTNESS", "CONTRAST", "CROP_RATIO", "CROP_TRIES", "HUE", "JITTER_KEYS", "SATURATION",
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


def uniform_draws(shape: tuple[int, ...], lo: float, hi: float, generator, dtype=torch.float64) -> torch.Tensor:
    device = generator.device if generator is not None else "cpu"
    return torch.rand(shape, generator=generator, device=device, dtype=dtype).mul_(hi - lo).add_(lo)


def bernoulli_draws(n: int, p: float, generator) -> torch.Tensor:
    """Bits that are True with probability ``p`` (``rand < p``, as RandomApply)."""
    return uniform_draws((n,), 0.0, 1.0, generator) < p


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
    area = uniform_draws(shape, scale[0], scale[1], generator) * (height * width)
    aspect = torch.exp(uniform_draws(shape, math.log(ratio[0]), math.log(ratio[1]), generator))
    w = torch.round(torch.sqrt(area * aspect)).long()
    h = torch.round(torch.sqrt(area / aspect)).long()
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = valid.long().argmax(dim=1, keepdim=True)  # index of the first True (0 if none)
    h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
    top = (uniform_draws((batch_size,), 0.0, 1.0, generator) * (height - h + 1)).long()
    left = (uniform_draws((batch_size,), 0.0, 1.0, generator) * (width - w + 1)).long()
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


def blur_where(img: torch.Tensor, blur: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
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


def check_normalization(mean, std) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {len(mean)} and {len(std)}")
    if min(float(s) for s in std) <= 0:
        raise ValueError(f"std values must be > 0, got {tuple(std)}")
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def to_model_input(img: torch.Tensor, mean, std, color_space: str = "rgb") -> torch.Tensor:
    """A float batch in [0, 1] normalised with mean/std (``rgb``) or as Lab in [-1, 1] (``lab``)."""
    return rgb_to_lab_normalized(img) if color_space == "lab" else normalize_batch(img, mean, std)


def check_image_size(image_size: Any) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    return image_size
