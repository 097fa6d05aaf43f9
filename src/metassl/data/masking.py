"""Input masks for masked-view augmentation (MRCL, docs/algorithms.md §6.2): pure functions on tensors.

A mask is a boolean tensor ``(B, 1, H, W)``, ``True`` where a pixel is hidden; it is drawn per
sample from torch's default generator on the requested device (so ``torch.manual_seed`` and
Lightning's ``seed_everything`` make it reproducible, and every draw has the batch as its
leading dimension: under data parallelism each rank draws the masks of its own samples).

- :func:`random_patch_mask`: a grid of ``p × p`` patches, exactly ``round(r · L)`` of the
  ``L`` patches hidden in every sample (MAE's per-sample random shuffle, He et al., CVPR 2022,
  arXiv:2111.06377, §3 "Masking");
- :func:`block_mask`: one patch-aligned rectangle of about ``r · L`` patches per sample, random
  aspect ratio and position (a one-block simplification of BEiT's blockwise masking, Bao et
  al., ICLR 2022, arXiv:2106.08254, Alg. 1);
- :func:`erase_mask`: one pixel-level rectangle of about ``r · H · W`` pixels (random erasing,
  Zhong et al., AAAI 2020, arXiv:1708.04896, Alg. 1, with a fixed area instead of a random one);
- :func:`apply_mask`: hidden pixels replaced by a constant (0 = the normalisation mean).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "MASK_TYPES",
    "apply_mask",
    "block_mask",
    "check_mask_options",
    "check_patch_grid",
    "draw_mask",
    "erase_mask",
    "mask_ratio",
    "random_patch_mask",
]

MASK_TYPES = ("patch", "block", "erase")
#: smallest aspect ratio (height / width) of block and erase rectangles; the largest is its inverse
ASPECT_MIN = 0.3


def check_mask_options(kind: str, patch_size: int, ratio: float) -> None:
    """One ``ValueError`` line for an unknown mask type, a patch size below 1 or a ratio outside (0, 1)."""
    if kind not in MASK_TYPES:
        raise ValueError(f"mask type must be one of {', '.join(MASK_TYPES)}; got {kind!r}")
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer (e.g. 4 at 32 px); got {patch_size!r}")
    if not 0.0 < float(ratio) < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), e.g. 0.25; got {ratio!r}")


def check_patch_grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """The patch grid ``(H / p, W / p)``; one ``ValueError`` line unless ``p`` divides both sides."""
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"patch_size={patch_size} does not divide the {height}x{width} views; choose a patch_size that divides the image size"
        )
    return height // patch_size, width // patch_size


def _masked_count(ratio: float, total: int, what: str) -> int:
    count = round(float(ratio) * total)
    if not 1 <= count < total:
        raise ValueError(
            f"mask ratio {ratio} of {total} {what} hides {count}; choose a ratio that hides at least one and not all "
            "(or a smaller patch_size)"
        )
    return count


def _upsample(grid: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, gh, gw)`` patch mask -> ``(B, 1, gh·p, gw·p)`` pixel mask."""
    if patch_size == 1:
        return grid.unsqueeze(1)
    return grid.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2).unsqueeze(1)


def random_patch_mask(
    batch: int, height: int, width: int, patch_size: int, ratio: float, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """Per-sample random patch mask ``(B, 1, H, W)``: exactly ``n = round(ratio · L)`` of the
    ``L = (H/p)(W/p)`` patches hidden in every sample (ranks of uniform noise below ``n``)."""
    check_mask_options("patch", patch_size, ratio)
    gh, gw = check_patch_grid(height, width, patch_size)
    count = _masked_count(ratio, gh * gw, "patches")
    noise = torch.rand(batch, gh * gw, device=device)
    ranks = noise.argsort(dim=1).argsort(dim=1)
    return _upsample((ranks < count).view(batch, gh, gw), patch_size)


def _rectangles(batch: int, rows: int, cols: int, count: int, device) -> torch.Tensor:
    """One axis-aligned rectangle of about ``count`` cells per sample on a ``rows × cols`` grid:
    aspect ratio log-uniform in ``[ASPECT_MIN, 1 / ASPECT_MIN]``, sides rounded and clipped to
    the grid (at least one cell), position uniform.  ``(B, rows, cols)`` bool."""
    u = torch.rand(batch, 3, device=device)
    log_aspect = math.log(ASPECT_MIN) * (1.0 - 2.0 * u[:, 0])
    side_h = torch.sqrt(count * torch.exp(log_aspect)).round().clamp(1, rows)
    side_w = (count / side_h).round().clamp(1, cols)
    top = torch.floor(u[:, 1] * (rows - side_h + 1)).clamp(max=rows - side_h)
    left = torch.floor(u[:, 2] * (cols - side_w + 1)).clamp(max=cols - side_w)
    r = torch.arange(rows, device=device, dtype=u.dtype).view(1, rows, 1)
    c = torch.arange(cols, device=device, dtype=u.dtype).view(1, 1, cols)
    in_rows = (r >= top.view(-1, 1, 1)) & (r < (top + side_h).view(-1, 1, 1))
    in_cols = (c >= left.view(-1, 1, 1)) & (c < (left + side_w).view(-1, 1, 1))
    return in_rows & in_cols


def block_mask(
    batch: int, height: int, width: int, patch_size: int, ratio: float, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """One patch-aligned block per sample, about ``ratio · L`` patches (rounding of its sides),
    random aspect ratio and position: ``(B, 1, H, W)``."""
    check_mask_options("block", patch_size, ratio)
    gh, gw = check_patch_grid(height, width, patch_size)
    count = _masked_count(ratio, gh * gw, "patches")
    return _upsample(_rectangles(batch, gh, gw, count, device), patch_size)


def erase_mask(batch: int, height: int, width: int, ratio: float, *, device: torch.device | str | None = None) -> torch.Tensor:
    """Random erasing: one pixel-level rectangle per sample, about ``ratio · H · W`` pixels,
    random aspect ratio and position: ``(B, 1, H, W)``."""
    check_mask_options("erase", 1, ratio)
    count = _masked_count(ratio, height * width, "pixels")
    return _rectangles(batch, height, width, count, device).unsqueeze(1)


def draw_mask(kind: str, images: torch.Tensor, patch_size: int, ratio: float) -> torch.Tensor:
    """A fresh mask of type ``kind`` for a batch ``(B, C, H, W)``, on the images' device."""
    if images.dim() != 4:
        raise ValueError(f"masking needs image batches of shape (B, C, H, W); got shape {tuple(images.shape)}")
    b, _, h, w = images.shape
    if kind == "patch":
        return random_patch_mask(b, h, w, patch_size, ratio, device=images.device)
    if kind == "block":
        return block_mask(b, h, w, patch_size, ratio, device=images.device)
    if kind == "erase":
        return erase_mask(b, h, w, ratio, device=images.device)
    raise ValueError(f"mask type must be one of {', '.join(MASK_TYPES)}; got {kind!r}")


def apply_mask(images: torch.Tensor, mask: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """``images`` with the hidden pixels (``mask`` True, broadcast over channels) set to ``fill``
    (in the normalised space: 0 is the normalisation mean).  A new tensor."""
    if mask.shape[0] != images.shape[0] or mask.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit images of shape {tuple(images.shape)}")
    return images.masked_fill(mask, float(fill))


def mask_ratio(mask: torch.Tensor) -> torch.Tensor:
    """Realised fraction of hidden pixels per sample, ``(B,)``."""
    return mask.flatten(1).float().mean(dim=1)
