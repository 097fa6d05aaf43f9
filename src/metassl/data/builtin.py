"""Built-in offline dataset: procedurally generated coloured shapes on textured backgrounds.

Ten shape classes (disc, square, triangle, cross, star, ring, bar, diamond, hexagon,
crescent) with random colour, size, position and rotation are drawn, anti-aliased, on one
of ten background texture families (stripes, checkerboard, smooth noise, gradient, dots,
concentric rings, grid, waves, plaid, sunburst) in random colours.  Everything is a
deterministic function of ``seed`` and the split; the first ``n`` images of a split do not
depend on how many images are generated.  The per-pixel foreground masks and the
background family of each image are kept for analysis of background confounding:
``background_class_correlation`` is the probability that an image's background family is
tied to its class (family = class) instead of drawn uniformly.  ``foreground_only`` replaces
every background pixel by a neutral fill before any augmentation (docs/algorithms.md §5.6).
The shapes and textures themselves are drawn by :mod:`metassl.data.builtin_drawing`; this module
samples their parameters, renders, caches and serves the splits.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as tF

from .builtin_drawing import (
    _NOISE_GRID,
    BACKGROUNDS,
    SHAPES,
    _background_field,
    _col,
    _hsv_to_rgb,
    _rot,
    _shape_coverage,
)
from .datasets import ImageDataset, fill_background
from .utils import atomic_torch_save, cache_key, try_load_cache

SPLITS = {"train": 0, "test": 1}

_GENERATOR_VERSION = 2
_CHUNK = 512  # images rendered per vectorised chunk; fixed so results never depend on N
_SUPERSAMPLE = 2  # anti-aliasing factor
_NUM_PARAMS = 32 + _NOISE_GRID * _NOISE_GRID  # uniform numbers drawn per image
#: train images (at background-class correlation 0) whose mean colour is the ``"mean"`` fill
FILL_REFERENCE_IMAGES = 1000


@dataclass
class BuiltinArrays:
    """Generated split: images (N,3,H,W) uint8, labels (N,), masks (N,H,W) uint8 0/1, backgrounds (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    backgrounds: torch.Tensor


# ----------------------------------------------------------------------------- helpers


def _draw_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Labels in shuffled blocks of ``num_classes``: balanced and prefix-stable."""
    blocks = -(-n // num_classes)
    return np.concatenate([rng.permutation(num_classes) for _ in range(blocks)])[:n]


def _render_chunk(
    labels: np.ndarray,
    fams: np.ndarray,
    U: np.ndarray,
    size: int,
    rng: np.random.Generator,
    background_contrast: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one chunk; returns images (n, 3, S, S) uint8 and masks (n, S, S) uint8.

    ``rng`` only draws the per-pixel sensor noise, in one call, so a prefix of a chunk
    renders identically.
    """
    n = len(labels)
    ss = _SUPERSAMPLE
    hs = size * ss
    coords = (np.arange(hs, dtype=np.float32) + 0.5) / ss  # pixel units
    Xp = coords[None, None, :]
    Yp = coords[None, :, None]
    X, Y = Xp / size, Yp / size

    # --- colours: background pair c1, c2 and foreground, all (n, 3)
    c1 = _hsv_to_rgb(U[:, 0], 0.15 + 0.75 * U[:, 1], 0.25 + 0.75 * U[:, 2])
    c2 = _hsv_to_rgb(np.mod(U[:, 0] + 0.15 + 0.7 * U[:, 3], 1.0), 0.1 + 0.8 * U[:, 4], 0.2 + 0.8 * U[:, 5])
    contrast = (0.35 + 0.65 * U[:, 6]) * background_contrast  # how far c2 is mixed in
    c2 = c1 + (c2 - c1) * contrast[:, None]
    fg = _hsv_to_rgb(U[:, 7], 0.45 + 0.55 * U[:, 8], 0.5 + 0.5 * U[:, 9])
    # keep the object visible: if it is close to either background colour, move it away
    dist = np.minimum(np.linalg.norm(fg - c1, axis=1), np.linalg.norm(fg - c2, axis=1))
    close = dist < 0.45
    bg_bright = (c1 + c2).mean(axis=1) / 2.0
    dark = bg_bright > 0.5
    alt = _hsv_to_rgb(
        np.mod(U[:, 7] + 0.5, 1.0),
        0.6 + 0.4 * U[:, 8],
        np.where(dark, 0.08 + 0.2 * U[:, 9], 0.85 + 0.15 * U[:, 9]),
    )
    fg = np.where(close[:, None], alt, fg)
    c1, c2, fg = (c.astype(np.float32) for c in (c1, c2, fg))

    # --- background texture
    t = np.empty((n, hs, hs), dtype=np.float32)
    for fam in np.unique(fams):
        idx = np.nonzero(fams == fam)[0]
        t[idx] = _background_field(int(fam), X, Y, U[idx, 10:16], U[idx, 32:])
    img = c1[:, :, None, None] + (c2 - c1)[:, :, None, None] * t[:, None]

    # --- shape geometry (pixel units)
    radius = size * (0.26 + 0.14 * U[:, 16])
    margin = 0.75 * radius
    cx = margin + U[:, 17] * (size - 2 * margin)
    cy = margin + U[:, 18] * (size - 2 * margin)
    rot = U[:, 19] * 2.0 * math.pi
    du, dv = _rot(Xp - _col(cx), Yp - _col(cy), _col(rot))
    du /= _col(radius)
    dv /= _col(radius)
    inside = np.zeros((n, hs, hs), dtype=bool)
    for cls in np.unique(labels):
        idx = np.nonzero(labels == cls)[0]
        inside[idx] = _shape_coverage(int(cls), du[idx], dv[idx])

    # --- shaded foreground, composited at the supersampled resolution
    light = _col(U[:, 20] * 2.0 * math.pi)
    gx, gy = (Xp - _col(cx)) / _col(radius), (Yp - _col(cy)) / _col(radius)
    shade = 1.0 + 0.18 * (gx * np.cos(light) + gy * np.sin(light))
    fgimg = np.clip(fg[:, :, None, None] * shade[:, None], 0.0, 1.0, dtype=np.float32)
    img = np.where(inside[:, None], fgimg, img)

    # --- downsample (box filter) and add mild sensor noise
    img_t = tF.avg_pool2d(torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)), ss)
    cov = tF.avg_pool2d(torch.from_numpy(inside.astype(np.float32))[:, None], ss)[:, 0]
    noise_std = 0.01 + 0.03 * U[:, 21]
    noise = rng.standard_normal((n, 3, size, size), dtype=np.float32) * noise_std[:, None, None, None].astype(np.float32)
    out = np.clip(img_t.numpy() + noise, 0.0, 1.0)
    images = np.round(out * 255.0).astype(np.uint8)
    masks = (cov.numpy() >= 0.5).astype(np.uint8)
    return images, masks


def generate_builtin(
    num_images: int,
    split: str = "train",
    image_size: int = 32,
    num_classes: int = 10,
    seed: int = 0,
    background_class_correlation: float = 0.0,
    background_contrast: float = 1.0,
) -> BuiltinArrays:
    """Generate one split (no caching; see :func:`load_builtin`).

    ``background_contrast`` scales the amplitude of the background texture (0 = flat colour,
    1 = full-contrast textures): a strong texture shared by two crops of one image is a shortcut
    that contrastive learning picks up instead of the shape (the background confounder)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if not 2 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be in [2, {len(SHAPES)}], got {num_classes}")
    if not 0.0 <= background_class_correlation <= 1.0:
        raise ValueError(f"background_class_correlation must be in [0, 1], got {background_class_correlation}")
    if not 0.0 <= background_contrast <= 1.0:
        raise ValueError(f"background_contrast must be in [0, 1], got {background_contrast}")
    sid = SPLITS[split]
    labels = _draw_labels(num_images, num_classes, np.random.default_rng([seed, sid, 0]))
    U = np.random.default_rng([seed, sid, 1]).random((num_images, _NUM_PARAMS))
    random_fam = np.minimum((U[:, 30] * len(BACKGROUNDS)).astype(np.int64), len(BACKGROUNDS) - 1)
    tied = U[:, 31] < background_class_correlation
    fams = np.where(tied, labels % len(BACKGROUNDS), random_fam)

    images = np.empty((num_images, 3, image_size, image_size), dtype=np.uint8)
    masks = np.empty((num_images, image_size, image_size), dtype=np.uint8)
    for k, start in enumerate(range(0, num_images, _CHUNK)):
        sl = slice(start, min(start + _CHUNK, num_images))
        rng = np.random.default_rng([seed, sid, 2, k])
        images[sl], masks[sl] = _render_chunk(labels[sl], fams[sl], U[sl], image_size, rng, background_contrast)
    return BuiltinArrays(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels.astype(np.int64)),
        masks=torch.from_numpy(masks),
        backgrounds=torch.from_numpy(fams.astype(np.int64)),
    )


_MEMORY_CACHE: dict[str, BuiltinArrays] = {}


def load_builtin(
    num_images: int,
    split: str = "train",
    image_size: int = 32,
    num_classes: int = 10,
    seed: int = 0,
    background_class_correlation: float = 0.0,
    root: str | os.PathLike | None = None,
    background_contrast: float = 1.0,
) -> BuiltinArrays:
    """Generate a split once per process (memory cache) and optionally cache it under ``root``."""
    params = {
        "v": _GENERATOR_VERSION, "n": int(num_images), "split": split, "size": int(image_size),
        "classes": int(num_classes), "seed": int(seed), "corr": float(background_class_correlation),
        "contrast": float(background_contrast),
    }
    key = cache_key(params)
    if key in _MEMORY_CACHE:
        return _MEMORY_CACHE[key]
    path = Path(root).expanduser() / "builtin" / f"shapes_{split}_{key}.pt" if root is not None else None
    arrays = None
    if path is not None:
        blob = try_load_cache(path)
        if isinstance(blob, dict) and blob.get("params") == params:
            arrays = BuiltinArrays(blob["images"], blob["labels"], blob["masks"], blob["backgrounds"])
    if arrays is None:
        arrays = generate_builtin(
            num_images, split, image_size, num_classes, seed, background_class_correlation, background_contrast
        )
        if path is not None:
            atomic_torch_save({"params": params, **arrays.__dict__}, path)
    _MEMORY_CACHE[key] = arrays
    return arrays


# ----------------------------------------------------------------------------- foreground only (§5.6)


def resolve_fill(fill: str | Sequence[int], *, image_size: int = 32, num_classes: int = 10, seed: int = 0,
                 background_contrast: float = 1.0, root: str | os.PathLike | None = None) -> torch.Tensor:
    """The neutral fill as (3,) uint8: ``"mean"`` = the mean colour of the first
    :data:`FILL_REFERENCE_IMAGES` train images of this generator (its seed, size, classes and
    contrast) at background-class correlation 0, so every split and every correlation gets the
    same colour; or an explicit ``[r, g, b]`` in 0..255."""
    if isinstance(fill, str):
        if fill != "mean":
            raise ValueError(f"foreground_fill must be 'mean' or [r, g, b] in 0..255, got {fill!r}")
        ref = load_builtin(FILL_REFERENCE_IMAGES, "train", image_size, num_classes, seed, 0.0, root, background_contrast)
        return ref.images.double().mean(dim=(0, 2, 3)).round().to(torch.uint8)
    values = list(fill) if isinstance(fill, Sequence) else []
    if len(values) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in values):
        raise ValueError(f"foreground_fill must be 'mean' or [r, g, b] in 0..255, got {fill!r}")
    return torch.tensor(values, dtype=torch.uint8)


class BuiltinShapes(ImageDataset):
    """The built-in shapes dataset as an :class:`ImageDataset`.

    Attributes: ``images`` (N,3,H,W) uint8, ``labels`` (N,), ``masks`` (N,H,W) uint8 with 1 on
    the object, ``backgrounds`` (N,) background family index into :data:`BACKGROUNDS`.
    ``return_mask=True`` makes items ``(image_or_views, label, mask_or_masks)``.
    ``foreground_only=True`` stores the images with their background replaced by the neutral
    ``foreground_fill`` (:func:`resolve_fill`), so every augmentation sees the fill; ``fill`` then
    holds the (3,) uint8 colour (None otherwise).
    """

    _per_sample_attrs = ("backgrounds",)
    classes = SHAPES
    background_names = BACKGROUNDS

    def __init__(
        self,
        split: str = "train",
        num_images: int | None = None,
        image_size: int = 32,
        num_classes: int = 10,
        seed: int = 0,
        background_class_correlation: float = 0.0,
        root: str | os.PathLike | None = None,
        transform: Callable[[Any], Any] | None = None,
        return_mask: bool = False,
        background_contrast: float = 1.0,
        foreground_only: bool = False,
        foreground_fill: str | Sequence[int] = "mean",
    ):
        if num_images is None:
            num_images = 5000 if split == "train" else 1000
        arrays = load_builtin(
            num_images, split, image_size, num_classes, seed, background_class_correlation, root, background_contrast
        )
        images, self.fill = arrays.images, None
        if foreground_only:
            self.fill = resolve_fill(foreground_fill, image_size=image_size, num_classes=num_classes, seed=seed,
                                     background_contrast=background_contrast, root=root)
            images = fill_background(images, arrays.masks, self.fill)
        super().__init__(images, arrays.labels, transform, arrays.masks, return_mask)
        self.foreground_only = bool(foreground_only)
        self.backgrounds = arrays.backgrounds
        self.split = split
        self.num_classes = num_classes
        self.classes = SHAPES[:num_classes]
