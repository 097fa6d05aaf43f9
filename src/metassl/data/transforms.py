"""Multi-view augmentations (torchvision transforms v2) working on uint8 CHW tensors.

Pipelines crop and flip in uint8, then switch to float32 in [0, 1] for the photometric
ops (a faster exact colour jitter than torchvision's generic one) and normalise last.
Images may travel with a ``tv_tensors.Mask``: geometric ops move it along, photometric
ops leave it untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from .config import check_color_options
from .errors import DataConfigError

# ----------------------------------------------------------------------------- normalisation

NORMALIZATION_STATS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


def resolve_normalization(
    normalization: str,
    dataset: str,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std for a ``normalization`` name; explicit ``mean``/``std`` win.

    ``dataset`` (alias ``cifar``) picks the statistics of ``dataset`` when known
    (cifar10, cifar100, stl10), otherwise CIFAR-10's.
    """
    if mean is not None and std is not None:
        return tuple(float(m) for m in mean), tuple(float(s) for s in std)
    key = normalization
    if key in ("dataset", "cifar"):
        key = dataset if dataset in ("cifar10", "cifar100", "stl10") else "cifar10"
    if key not in NORMALIZATION_STATS:
        raise DataConfigError(
            f"unknown normalization {normalization!r}; valid: imagenet, dataset, cifar, cifar10, cifar100, stl10, none"
        )
    return NORMALIZATION_STATS[key]


# ----------------------------------------------------------------------------- custom ops


_HUE_OFFSETS = torch.tensor([5.0, 3.0, 1.0]).view(3, 1, 1)
_GRAY_WEIGHTS = torch.tensor([0.2989, 0.587, 0.114]).view(3, 1, 1)  # torchvision's luma weights


def adjust_hue_fast(img: torch.Tensor, hue_factor: float | torch.Tensor) -> torch.Tensor:
    """Exact HSV hue rotation of a float image in [0, 1], shape (..., 3, H, W).

    Same result as torchvision's ``F.adjust_hue`` (up to float rounding) with fewer ops.
    ``hue_factor`` may be a tensor broadcastable to (..., H, W), e.g. (B, 1, 1): one per sample.
    """
    if not isinstance(hue_factor, torch.Tensor) and hue_factor == 0.0:
        return img
    # amin/amax, not aminmax: same values, but aminmax stalls (ms instead of µs) when the cores are oversubscribed
    mn, mx = img.amin(dim=-3), img.amax(dim=-3)
    chroma = mx - mn
    rc = (mx.unsqueeze(-3) - img).div_(chroma.clamp(min=1e-12).unsqueeze(-3))
    r, g, _ = img.unbind(dim=-3)
    rr, gg, bb = rc.unbind(dim=-3)
    h = torch.where(mx == r, bb - gg, torch.where(mx == g, 2.0 + rr - bb, 4.0 + gg - rr))
    offs = _HUE_OFFSETS.to(img.dtype)
    t = torch.remainder(h.add_(6.0 * hue_factor).unsqueeze(-3) + offs, 6.0)
    k = torch.minimum(t, 4.0 - t).clamp_(0.0, 1.0)
    return torch.addcmul(mx.unsqueeze(-3), chroma.unsqueeze(-3), k, value=-1.0)


def adjust_contrast_fast(img: torch.Tensor, factor: float) -> torch.Tensor:
    """torchvision's contrast adjustment for float images, fewer ops."""
    w = _GRAY_WEIGHTS.to(img.dtype)
    mean = (img.mean(dim=(-2, -1), keepdim=True) * w).sum(dim=-3, keepdim=True)
    return torch.lerp(mean, img, factor).clamp_(0.0, 1.0)


def adjust_saturation_fast(img: torch.Tensor, factor: float) -> torch.Tensor:
    """torchvision's saturation adjustment for float images, fewer ops."""
    gray = (img * _GRAY_WEIGHTS.to(img.dtype)).sum(dim=-3, keepdim=True)
    return torch.lerp(gray, img, factor).clamp_(0.0, 1.0)


def _is_mask(x: Any) -> bool:
    return isinstance(x, tv_tensors.Mask)


class ColorJitterFast(v2.Transform):
    """ColorJitter (brightness, contrast, saturation, hue in random order, as torchvision).

    Works on float images in [0, 1] (uint8 input is converted and converted back); masks
    pass through unchanged.
    """

    _transformed_types = (torch.Tensor,)

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0, hue: float = 0.0):
        super().__init__()
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue}")
        self.brightness = float(brightness)
        self.contrast = float(contrast)
        self.saturation = float(saturation)
        self.hue = float(hue)

    @staticmethod
    def _factor(strength: float, u: float) -> float | None:
        if strength <= 0:
            return None
        lo = max(0.0, 1.0 - strength)
        return lo + u * (1.0 + strength - lo)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        u = torch.rand(4).tolist()
        return {
            "order": torch.randperm(4).tolist(),
            "b": self._factor(self.brightness, u[0]),
            "c": self._factor(self.contrast, u[1]),
            "s": self._factor(self.saturation, u[2]),
            "h": (2.0 * u[3] - 1.0) * self.hue if self.hue > 0 else None,
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if _is_mask(inpt):
            return inpt
        is_uint8 = inpt.dtype == torch.uint8
        img = inpt.as_subclass(torch.Tensor)
        img = img.float().div_(255.0) if is_uint8 else img
        for op in params["order"]:
            if op == 0 and params["b"] is not None:
                img = img.mul(params["b"]).clamp_(0.0, 1.0)
            elif op == 1 and params["c"] is not None:
                img = adjust_contrast_fast(img, params["c"])
            elif op == 2 and params["s"] is not None:
                img = adjust_saturation_fast(img, params["s"])
            elif op == 3 and params["h"] is not None:
                img = adjust_hue_fast(img, params["h"])
        if is_uint8:
            img = img.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
        return img


class ScaleNormalize(v2.Transform):
    """uint8 → float32 scaled to [0, 1] then normalised, in one fused op (float input: normalise only)."""

    _transformed_types = (torch.Tensor,)

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        m = torch.tensor(self.mean).view(3, 1, 1)
        s = torch.tensor(self.std).view(3, 1, 1)
        self._shift = -m / s
        self._scale_float = 1.0 / s
        self._scale_uint8 = 1.0 / (255.0 * s)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if _is_mask(inpt):
            return inpt
        img = inpt.as_subclass(torch.Tensor)
        if img.dtype == torch.uint8:
            return torch.addcmul(self._shift, img.to(torch.float32), self._scale_uint8)
        if not img.is_floating_point():
            raise TypeError(f"ScaleNormalize expects uint8 or float images, got {img.dtype}")
        return torch.addcmul(self._shift.to(img.dtype), img, self._scale_float.to(img.dtype))


class MultiViewTransform:
    """Apply each transform to the same input and return the list of views."""

    def __init__(self, transforms: Sequence[Callable[[Any], Any]]):
        if len(transforms) == 0:
            raise ValueError("MultiViewTransform needs at least one transform")
        self.transforms = list(transforms)

    def __call__(self, x: Any) -> list[Any]:
        return [t(x) for t in self.transforms]

    def __len__(self) -> int:
        return len(self.transforms)

    def __repr__(self) -> str:
        inner = ",\n  ".join(repr(t) for t in self.transforms)
        return f"MultiViewTransform([\n  {inner}\n])"


# ----------------------------------------------------------------------------- families

#: Family defaults; a list holds one value per view (cycled).  ``blur_p`` of ``None``
#: means the SimCLR rule: blur only for images larger than 32 px.
FAMILIES: dict[str, dict[str, Any]] = {
    "simclr": {
        "crop_scale_min": 0.08, "crop_scale_max": 1.0, "flip_p": 0.5,
        "jitter_p": 0.8, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1,
        "grayscale_p": 0.2, "blur_p": [0.5], "blur_sigma_min": 0.1, "blur_sigma_max": 2.0,
        "solarize_p": 0.0,
    },
    "byol": {
        "crop_scale_min": 0.08, "crop_scale_max": 1.0, "flip_p": 0.5,
        "jitter_p": 0.8, "brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1,
        "grayscale_p": 0.2, "blur_p": [1.0, 0.1], "blur_sigma_min": 0.1, "blur_sigma_max": 2.0,
        "solarize_p": [0.0, 0.2],
    },
}

#: Method names accepted as augmentation names, mapped to (family, overrides).
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "simclr": ("simclr", {}),
    "moco_v2": ("simclr", {"crop_scale_min": 0.2}),
    "simsiam": ("simclr", {"crop_scale_min": 0.2}),
    "byol": ("byol", {}),
    "barlow_twins": ("byol", {}),
    "vicreg": ("byol", {}),
    "none": ("none", {}),
}

#: Images at or below this size get no blur unless ``blur_p`` is set explicitly.
BLUR_MIN_SIZE = 32


def augmentation_names() -> list[str]:
    """Accepted values of ``augmentation``."""
    return sorted(ALIASES)


def augmentation_for(method_name: str) -> str:
    """The augmentation of a method: its own recipe where :data:`ALIASES` has one, else the
    family its class declares (``Method.augmentation``, e.g. ``simclr`` or ``byol``)."""
    if method_name in ALIASES:
        return method_name
    from metassl.methods.base import get_method_class  # lazy: the data layer does not need the methods

    return get_method_class(method_name).augmentation


def per_view_value(value: Any, i: int) -> float:
    if isinstance(value, (list, tuple)):
        return float(value[i % len(value)])
    return float(value)


def resolve_augmentation(
    augmentation: str, image_size: int, overrides: Mapping[str, Any] | None = None
) -> tuple[str, dict[str, Any]]:
    """Family name and the merged strengths (family defaults < alias < user overrides)."""
    if augmentation not in ALIASES:
        raise DataConfigError(f"unknown augmentation {augmentation!r}; valid: {', '.join(augmentation_names())}")
    family, alias_over = ALIASES[augmentation]
    if family == "none":
        return family, {}
    params = dict(FAMILIES[family])
    if image_size <= BLUR_MIN_SIZE:
        params["blur_p"] = 0.0
    params.update(alias_over)
    for k, v in (overrides or {}).items():
        if k not in params:
            raise DataConfigError(f"unknown augmentation key {k!r}; valid: {', '.join(sorted(params))}")
        if v is not None:
            params[k] = v
    return family, params


def blur_kernel_size(image_size: int) -> int:
    """Odd Gaussian kernel of about 10% of the image side (SimCLR)."""
    k = max(3, int(0.1 * image_size))
    return k if k % 2 == 1 else k + 1


def model_input_op(mean, std, color_space: str = "rgb") -> v2.Transform:
    """A pipeline's last op: ScaleNormalize (``rgb``) or LabNormalize (``lab``: RGB → Lab in [-1, 1]
    per channel, :mod:`.lab`; ``mean``/``std`` unused)."""
    if color_space == "lab":
        from .lab import LabNormalize  # lazy: .lab imports this module

        return LabNormalize()
    return ScaleNormalize(mean, std)


def check_view_strengths(p: Mapping[str, float]) -> None:
    """One DataConfigError for resolved strengths no view pipeline can apply: a probability outside
    [0, 1], a negative jitter strength, a hue beyond 0.5, a crop-scale range or (with blur on) a
    sigma range out of order.  Both the per-sample and the batched pipelines call it, so a bad
    value fails the same way whichever ``data.augment_on`` is chosen."""
    for key in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
        if not 0 <= p[key] <= 1:
            raise DataConfigError(f"data.aug.{key} is a probability in [0, 1], got {p[key]}")
    strengths = {k: p[k] for k in ("brightness", "contrast", "saturation", "hue")}
    if min(strengths.values()) < 0:
        raise DataConfigError(f"jitter strengths must be >= 0, got {strengths}")
    if p["hue"] > 0.5:
        raise DataConfigError(f"data.aug.hue must be in [0, 0.5], got {p['hue']}")
    lo, hi = p["crop_scale_min"], p["crop_scale_max"]
    if not 0 < lo <= hi <= 1:
        raise DataConfigError(f"crop scale must satisfy 0 < min <= max <= 1, got ({lo}, {hi})")
    smin, smax = p["blur_sigma_min"], p["blur_sigma_max"]
    if p["blur_p"] > 0 and not 0 < smin <= smax:
        raise DataConfigError(f"blur sigma must satisfy 0 < min <= max, got ({smin}, {smax})")


def build_view_transform(
    params: Mapping[str, Any], view: int, image_size: int, mean, std, color_space: str = "rgb"
) -> v2.Compose:
    """The augmentation pipeline of view number ``view`` from resolved strengths."""
    p = {k: per_view_value(v, view) for k, v in params.items()}
    check_view_strengths(p)
    lo, hi = p["crop_scale_min"], p["crop_scale_max"]
    ops: list[Any] = [v2.RandomResizedCrop(image_size, scale=(lo, hi), antialias=True)]
    if p["flip_p"] > 0:
        ops.append(v2.RandomHorizontalFlip(p["flip_p"]))
    ops.append(v2.ToDtype(torch.float32, scale=True))
    if p["jitter_p"] > 0 and max(p["brightness"], p["contrast"], p["saturation"], p["hue"]) > 0:
        cj = ColorJitterFast(p["brightness"], p["contrast"], p["saturation"], p["hue"])
        ops.append(cj if p["jitter_p"] >= 1 else v2.RandomApply([cj], p=p["jitter_p"]))
    if p["grayscale_p"] > 0:
        ops.append(v2.RandomGrayscale(p["grayscale_p"]))
    if p["blur_p"] > 0:
        blur = v2.GaussianBlur(blur_kernel_size(image_size), sigma=(p["blur_sigma_min"], p["blur_sigma_max"]))
        ops.append(blur if p["blur_p"] >= 1 else v2.RandomApply([blur], p=p["blur_p"]))
    if p["solarize_p"] > 0:
        ops.append(v2.RandomSolarize(threshold=0.5, p=p["solarize_p"]))
    ops.append(model_input_op(mean, std, color_space))
    return v2.Compose(ops)


def build_eval_transform(
    image_size: int, mean, std, stored_size: int | None = None, color_space: str = "rgb"
) -> v2.Compose:
    """Deterministic test transform: (resize + centre crop if sizes differ) then normalise (or Lab)."""
    ops: list[Any] = []
    if stored_size is not None and stored_size != image_size:
        ops += [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    ops.append(model_input_op(mean, std, color_space))
    return v2.Compose(ops)


def build_ssl_transform(
    augmentation: str,
    image_size: int,
    mean,
    std,
    num_views: int = 2,
    overrides: Mapping[str, Any] | None = None,
    stored_size: int | None = None,
    color_space: str = "rgb",
    lab_views: str = "full",
) -> MultiViewTransform:
    """MultiViewTransform of ``num_views`` augmented views for an augmentation family.

    ``augmentation='none'`` gives ``num_views`` copies of the eval transform.  ``color_space=lab``
    ends every pipeline in Lab; ``lab_views=split`` makes ONE crop (view 0's pipeline) per sample
    and splits it into the L and ab views (:class:`.lab.SplitLabViews`).
    """
    from .lab import SplitLabViews  # lazy: .lab imports this module

    check_color_options(color_space, lab_views)
    if num_views < 1:
        raise DataConfigError(f"num_views must be >= 1, got {num_views}")
    family, params = resolve_augmentation(augmentation, image_size, overrides)
    if family == "none":
        t = build_eval_transform(image_size, mean, std, stored_size, color_space)
        return SplitLabViews(t, num_views) if lab_views == "split" else MultiViewTransform([t] * num_views)
    if lab_views == "split":
        return SplitLabViews(build_view_transform(params, 0, image_size, mean, std, "lab"), num_views)
    return MultiViewTransform(
        [build_view_transform(params, i, image_size, mean, std, color_space) for i in range(num_views)]
    )
