"""Drawing primitives of the built-in dataset (:mod:`metassl.data.builtin`): the ten shape
classes as anti-aliasable coverage functions and the ten background texture families as
fields in [0, 1], vectorised over a chunk of images.  Pure functions of their arguments."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as tF

SHAPES = ("disc", "square", "triangle", "cross", "star", "ring", "bar", "diamond", "hexagon", "crescent")
BACKGROUNDS = (
    "stripes", "checkerboard", "noise", "gradient", "dots",
    "concentric", "grid", "waves", "plaid", "sunburst",
)
_NOISE_GRID = 5  # coarse grid of the smooth-noise background


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV → RGB, all in [0, 1]; returns (..., 3)."""
    t = np.mod(np.array([5.0, 3.0, 1.0]) + h[..., None] * 6.0, 6.0)
    f = np.clip(np.minimum(t, 4.0 - t), 0.0, 1.0)
    return v[..., None] - v[..., None] * s[..., None] * f


def _rot(x: np.ndarray, y: np.ndarray, ang: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(ang), np.sin(ang)
    return x * c + y * s, -x * s + y * c


def _col(a: np.ndarray) -> np.ndarray:
    """(n,) → (n, 1, 1) for broadcasting against (1, H, W) grids."""
    return a[:, None, None].astype(np.float32)


# ----------------------------------------------------------------------------- shapes


def _shape_coverage(cls: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean inside-test of shape ``cls`` in local coordinates (unit ≈ shape radius)."""
    au, av = np.abs(u), np.abs(v)
    name = SHAPES[cls]
    if name == "disc":
        return u * u + v * v < 1.0
    if name == "square":
        return np.maximum(au, av) < 0.8
    if name == "triangle":
        return (v > -0.55) & (v < 1.0 - math.sqrt(3.0) * au)
    if name == "cross":
        return ((au < 0.3) & (av < 0.95)) | ((av < 0.3) & (au < 0.95))
    if name == "star":
        r = np.sqrt(u * u + v * v)
        frac = np.mod(np.arctan2(v, u) * (5.0 / (2.0 * math.pi)), 1.0)
        d = np.abs(frac - 0.5) * 2.0  # 1 at the tips, 0 between them
        return r < 0.42 + 0.63 * d
    if name == "ring":
        r2 = u * u + v * v
        return (r2 < 1.0) & (r2 > 0.55**2)
    if name == "bar":
        return (au < 1.0) & (av < 0.3)
    if name == "diamond":
        return au + av / 0.55 < 1.0
    if name == "hexagon":
        return np.maximum(av, 0.866 * au + 0.5 * av) < 0.85
    if name == "crescent":
        return (u * u + v * v < 1.0) & ((u - 0.5) ** 2 + v * v > 0.8**2)
    raise ValueError(cls)


# ----------------------------------------------------------------------------- backgrounds


def _background_field(fam: int, X: np.ndarray, Y: np.ndarray, P: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Texture value t in [0, 1] of family ``fam`` for images with parameter rows ``P``.

    X, Y are (1, H, W) coordinates in [0, 1]; ``grid`` (n, g*g) feeds the smooth noise.
    Returns (n, H, W).
    """
    n = P.shape[0]
    ang = _col(P[:, 0] * math.pi)
    freq = _col(2.0 + P[:, 1] * 5.0)  # cycles per image
    phase = _col(P[:, 2] * 2.0 * math.pi)
    a, b = _rot(X - 0.5, Y - 0.5, ang)
    name = BACKGROUNDS[fam]
    if name == "stripes":
        sharp = _col(1.0 + P[:, 3] * 5.0)
        return np.clip(0.5 + 0.5 * sharp * np.sin(2 * math.pi * freq * a + phase), 0.0, 1.0)
    if name == "checkerboard":
        f = freq * 0.8
        return np.mod(np.floor(a * f + P[:, 3, None, None]) + np.floor(b * f + P[:, 4, None, None]), 2.0)
    if name == "noise":
        coarse = torch.from_numpy(grid.astype(np.float32).reshape(n, 1, _NOISE_GRID, _NOISE_GRID))
        fine = tF.interpolate(coarse, size=X.shape[-2:], mode="bicubic", align_corners=False)[:, 0].numpy()
        lo = fine.min(axis=(1, 2), keepdims=True)
        hi = fine.max(axis=(1, 2), keepdims=True)
        return (fine - lo) / np.maximum(hi - lo, 1e-6)
    if name == "gradient":
        steep = _col(0.8 + P[:, 3] * 1.2)
        return np.clip(0.5 + steep * a, 0.0, 1.0)
    if name == "dots":
        f = freq * 0.9
        da = np.mod(a * f + P[:, 3, None, None], 1.0) - 0.5
        db = np.mod(b * f + P[:, 4, None, None], 1.0) - 0.5
        rad = _col(0.18 + P[:, 5] * 0.17)
        return (da * da + db * db < rad * rad).astype(np.float32)
    if name == "concentric":
        cx, cy = _col(P[:, 3]), _col(P[:, 4])
        dist = np.sqrt((X - cx) ** 2 + (Y - cy) ** 2)
        return 0.5 + 0.5 * np.sin(2 * math.pi * freq * dist + phase)
    if name == "grid":
        f = freq * 0.8
        w = _col(0.08 + P[:, 5] * 0.12)
        fa = np.abs(np.mod(a * f + P[:, 3, None, None], 1.0) - 0.5)
        fb = np.abs(np.mod(b * f + P[:, 4, None, None], 1.0) - 0.5)
        return ((fa > 0.5 - w) | (fb > 0.5 - w)).astype(np.float32)
    if name == "waves":
        amp = _col(0.3 + P[:, 3] * 1.2)
        f2 = _col(1.0 + P[:, 4] * 2.0)
        return 0.5 + 0.5 * np.sin(2 * math.pi * freq * a + amp * np.sin(2 * math.pi * f2 * b) * math.pi + phase)
    if name == "plaid":
        f2 = _col(2.0 + P[:, 3] * 5.0)
        return 0.5 + 0.25 * np.sin(2 * math.pi * freq * a + phase) + 0.25 * np.sin(2 * math.pi * f2 * b)
    if name == "sunburst":
        cx, cy = _col(0.2 + 0.6 * P[:, 3]), _col(0.2 + 0.6 * P[:, 4])
        rays = _col(np.floor(4 + P[:, 5] * 9))
        theta = np.arctan2(Y - cy, X - cx)
        return np.clip(0.5 + 1.5 * np.sin(rays * theta + phase), 0.0, 1.0)
    raise ValueError(fam)


# ----------------------------------------------------------------------------- generation
