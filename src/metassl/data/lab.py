"""CIE Lab views (``data.color_space=lab``, ``data.lab_views``), after CMC / MetAug's official data.

Conversion: sRGB in [0, 1] → linear RGB (the sRGB curve: ``c / 12.92`` below 0.04045, else
``((c + 0.055) / 1.055) ** 2.4``) → XYZ (the sRGB matrix, D65) → divided by the reference white,
taken as the matrix's image of RGB white (the D65 white 0.95047, 1, 1.08883 to 7 digits; exact, so
that white is L = 100, a = b = 0) → ``f(t) = t ** (1/3)`` above ``(6/29) ** 3``, else
``t / (3 (6/29)²) + 4/29`` → ``L = 116 f(Y) - 16``, ``a = 500 (f(X) - f(Y))``,
``b = 200 (f(Y) - f(Z))``.  Plain tensor ops on (..., 3, H, W), any device and float dtype.

Normalisation (replaces mean/std): each channel mapped to [-1, 1] by its range over the sRGB gamut,
L in [0, 100], a and b in the extremes :data:`LAB_RANGES` computed once here from a dense grid on
the RGB cube's surface (they fall on corners: a in [-86.18, 98.23], b in [-107.86, 94.48], the
ranges CMC normalises with, to 0.01).  0 is each channel's mid value.

Views (``lab_views``): ``full`` = each view a 3-channel Lab image; ``split`` = ONE augmented crop per
sample (CMC's ``two_crop=False``), view 0 its L channel (a, b set to 0), view 1 its a, b channels
(L set to 0).  Both stay 3-channel so that one backbone serves both: our deviation from CMC, which
feeds L and ab to two encoders of 1 and 2 input channels; CMC's third (full Lab) view is not made,
as metassl's methods take two views.  With ``split`` the eval images are full Lab, a channel
combination the backbone never sees in training (CMC concatenates its L and ab features instead).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from .config import COLOR_SPACES, LAB_VIEWS, check_color_options
from .errors import DataConfigError
from .transforms import MultiViewTransform  # .transforms imports .lab lazily

__all__ = [
    "COLOR_SPACES", "LAB_MEAN", "LAB_RANGES", "LAB_STD", "LAB_VIEWS", "BatchedSplitLabViews", "LabNormalize",
    "SplitLabViews", "check_color_options", "lab_to_unit_range", "rgb_to_lab", "rgb_to_lab_normalized", "split_lab",
]

#: sRGB (linear) → XYZ, D65 (IEC 61966-2-1)
_RGB_TO_XYZ = ((0.4124564, 0.3575761, 0.1804375), (0.2126729, 0.7151522, 0.0721750), (0.0193339, 0.1191920, 0.9503041))
_DELTA = 6.0 / 29.0


def _srgb_to_linear(rgb: torch.Tensor) -> torch.Tensor:
    return torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055).pow(2.4))


def _lab_f(t: torch.Tensor) -> torch.Tensor:
    eps = _DELTA**3
    return torch.where(t > eps, t.clamp(min=eps).pow(1.0 / 3.0), t / (3.0 * _DELTA**2) + 4.0 / 29.0)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """CIE Lab (D65) of sRGB floats in [0, 1], shape (..., 3, H, W): L in [0, 100], a and b unscaled."""
    if not rgb.is_floating_point() or rgb.ndim < 3 or rgb.shape[-3] != 3:
        raise ValueError(f"rgb_to_lab needs float (..., 3, H, W) images in [0, 1], got {rgb.dtype} {tuple(rgb.shape)}")
    matrix = torch.tensor(_RGB_TO_XYZ, dtype=torch.float64)
    matrix = (matrix / matrix.sum(dim=1, keepdim=True)).to(rgb.device, rgb.dtype)  # XYZ / white
    xyz = torch.einsum("ij,...jhw->...ihw", matrix, _srgb_to_linear(rgb))
    fx, fy, fz = _lab_f(xyz).unbind(dim=-3)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=-3)


def _gamut_ranges(steps: int = 33) -> tuple[tuple[float, float], ...]:
    """(min, max) of L, a, b over a ``steps`` x ``steps`` grid on each face of the RGB cube (float64)."""
    g = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    u, v = torch.meshgrid(g, g, indexing="ij")
    faces = []
    for axis in range(3):
        for level in (0.0, 1.0):
            chans = [u, v]
            chans.insert(axis, torch.full_like(u, level))
            faces.append(torch.stack(chans))
    lab = rgb_to_lab(torch.stack(faces)).transpose(0, 1).reshape(3, -1)
    return tuple((float(c.min()), float(c.max())) for c in lab)


#: per-channel (min, max) that :func:`lab_to_unit_range` maps to [-1, 1]; L exactly [0, 100]
LAB_RANGES: tuple[tuple[float, float], ...] = ((0.0, 100.0), *_gamut_ranges()[1:])


#: the same map as Normalize(mean, std) in Lab units (mid value, half range per channel), as CMC writes it
LAB_MEAN: tuple[float, ...] = tuple((lo + hi) / 2 for lo, hi in LAB_RANGES)
LAB_STD: tuple[float, ...] = tuple((hi - lo) / 2 for lo, hi in LAB_RANGES)


def lab_to_unit_range(lab: torch.Tensor) -> torch.Tensor:
    """Lab (..., 3, H, W) mapped channel-wise from :data:`LAB_RANGES` onto [-1, 1]."""
    mean = torch.tensor(LAB_MEAN, dtype=lab.dtype, device=lab.device).view(3, 1, 1)
    std = torch.tensor(LAB_STD, dtype=lab.dtype, device=lab.device).view(3, 1, 1)
    return (lab - mean) / std


def rgb_to_lab_normalized(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB floats in [0, 1] (uint8: scaled by 1/255 first) → Lab normalised to [-1, 1] per channel."""
    if rgb.dtype == torch.uint8:
        rgb = rgb.to(torch.float32).div_(255.0)
    return lab_to_unit_range(rgb_to_lab(rgb))


def split_lab(lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L view, ab view) of normalised Lab (..., 3, H, W): the other channels set to 0, their mid value."""
    zeros = torch.zeros_like(lab)
    luminance = torch.cat([lab[..., :1, :, :], zeros[..., 1:, :, :]], dim=-3)
    chroma = torch.cat([zeros[..., :1, :, :], lab[..., 1:, :, :]], dim=-3)
    return luminance, chroma


class LabNormalize(v2.Transform):
    """Last op of a per-sample pipeline with ``color_space=lab``: RGB → normalised Lab (masks pass)."""

    _transformed_types = (torch.Tensor,)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            return inpt
        return rgb_to_lab_normalized(inpt.as_subclass(torch.Tensor))


def _split_item(out: Any) -> list[Any]:
    """Split one pipeline output: an image, or an (image, mask) pair whose mask goes to both views."""
    if isinstance(out, (tuple, list)):
        image, *rest = out
        return [(view, *rest) for view in split_lab(image)]
    return list(split_lab(out))


class SplitLabViews(MultiViewTransform):
    """``lab_views=split`` per sample: ONE run of ``transform`` (ending in :class:`LabNormalize`),
    split into the L view and the ab view; ``num_views`` cycles them (L, ab, L, ...).  A
    MultiViewTransform, so that masks (``return_mask``) travel with both views."""

    def __init__(self, transform: Callable[[Any], Any], num_views: int = 2):
        if num_views < 1:
            raise DataConfigError(f"lab_views=split needs num_views >= 1, got {num_views}")
        super().__init__([transform])
        self.transform, self.num_views = transform, num_views

    def __call__(self, x: Any) -> list[Any]:
        pair = _split_item(self.transform(x))
        return [pair[i % 2] for i in range(self.num_views)]

    def __len__(self) -> int:
        return self.num_views

    def __repr__(self) -> str:
        return f"SplitLabViews(num_views={self.num_views}, shared crop:\n  {self.transform!r}\n)"


class BatchedSplitLabViews:
    """``lab_views=split`` on a batch: one ``sample`` + ``apply`` of ``view`` (a batched view whose
    output is normalised Lab), split into the L view and the ab view, cycled for ``num_views``."""

    def __init__(self, view: Any, num_views: int = 2):
        if num_views < 1:
            raise DataConfigError(f"lab_views=split needs num_views >= 1, got {num_views}")
        self.view, self.num_views = view, num_views

    def __call__(self, images: torch.Tensor, generator=None) -> list[torch.Tensor]:
        pair = split_lab(self.view(images, generator))
        return [pair[i % 2] for i in range(self.num_views)]

    def __len__(self) -> int:
        return self.num_views

    def __repr__(self) -> str:
        return f"BatchedSplitLabViews(num_views={self.num_views}, shared crop: {self.view!r})"
