"""Generic datasets over uint8 image sources (in-memory tensors, memory maps, lazy files)."""

from __future__ import annotations

import bisect
import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from .transforms import MultiViewTransform


class ConcatSource:
    """Index several image sources as one."""

    def __init__(self, sources: Sequence[Any]):
        self.sources = list(sources)
        self._ends = np.cumsum([len(s) for s in self.sources]).tolist()

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, i: int) -> torch.Tensor:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = bisect.bisect_right(self._ends, i)
        start = self._ends[k - 1] if k else 0
        return self.sources[k][i - start]


class IndexedSource:
    """A view of ``source`` restricted to ``indices``."""

    def __init__(self, source: Any, indices: Sequence[int]):
        self.source = source
        self.indices = [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.source[self.indices[i]]


def take(source: Any, indices: Sequence[int] | slice) -> Any:
    """Restrict an image source (tensor, array or indexable object) to ``indices``."""
    if isinstance(indices, slice):
        if isinstance(source, (torch.Tensor, np.ndarray)):
            return source[indices]
        indices = range(*indices.indices(len(source)))
    if isinstance(source, torch.Tensor):
        return source[torch.as_tensor(list(indices), dtype=torch.long)]
    if hasattr(source, "take"):
        return source.take(list(indices))
    return IndexedSource(source, list(indices))


def fill_background(images: torch.Tensor, masks: torch.Tensor, fill: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """``images`` with every pixel outside the foreground mask set to ``fill`` (docs/algorithms.md §5.6).

    images (N, 3, H, W) uint8, masks (N, H, W) or (N, 1, H, W) with 1 on the object, fill three
    integers in 0..255 (r, g, b).  Returns a new uint8 tensor; pixels on the mask are unchanged.
    """
    if images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
        raise ValueError(f"fill_background needs uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    n, _, h, w = images.shape
    if tuple(masks.shape) not in ((n, h, w), (n, 1, h, w)):
        raise ValueError(f"masks {tuple(masks.shape)} do not match images {tuple(images.shape)}; pass (N, H, W) masks")
    colour = torch.as_tensor(fill)
    if colour.shape != (3,) or colour.is_floating_point() or bool(((colour < 0) | (colour > 255)).any()):
        raise ValueError(f"fill must be three integers in [0, 255] (r, g, b), got {fill!r}")
    keep = masks.reshape(n, 1, h, w).bool()
    return torch.where(keep, images, colour.to(torch.uint8).view(1, 3, 1, 1))


class ImageDataset(Dataset):
    """(image, label) pairs from a source of uint8 CHW tensors, with an optional transform.

    ``images`` is a uint8 tensor (N, C, H, W) or any indexable object returning uint8 CHW
    tensors (memory maps, lazily decoded files).  With a :class:`MultiViewTransform` the
    first element is the list of views.  With ``return_mask`` (needs ``masks`` of shape
    (N, H, W)) the mask travels through the same geometric ops and a third element is
    returned: the mask (1, H, W) uint8, or a list of them for multi-view transforms.
    """

    def __init__(
        self,
        images: Any,
        labels: torch.Tensor | Sequence[int],
        transform: Callable[[Any], Any] | None = None,
        masks: torch.Tensor | None = None,
        return_mask: bool = False,
        image_size: int | None = None,
    ):
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        if len(self.labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(self.labels)} labels")
        if masks is not None and len(masks) != len(images):
            raise ValueError(f"{len(images)} images but {len(masks)} masks")
        if return_mask and masks is None:
            raise ValueError("return_mask=True needs masks")
        self.masks = masks
        self.return_mask = return_mask
        self.transform = transform
        if image_size is None and isinstance(images, torch.Tensor) and images.ndim == 4:
            image_size = int(images.shape[-1])
        self.image_size = image_size  # stored side length (None if unknown / varying)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_labelled(self) -> int:
        """Number of samples with a label (label >= 0)."""
        return int((self.labels >= 0).sum())

    def __getitem__(self, index: int):
        img = self.images[index]
        label = int(self.labels[index])
        if not self.return_mask:
            return (self.transform(img) if self.transform is not None else img), label
        mask = self.masks[index]
        mask = mask.unsqueeze(0) if mask.ndim == 2 else mask
        if self.transform is None:
            return img, label, mask
        out = self.transform((tv_tensors.Image(img), tv_tensors.Mask(mask)))
        if isinstance(self.transform, MultiViewTransform):
            views = [_plain(o[0]) for o in out]
            view_masks = [_plain(o[1]) for o in out]
            return views, label, view_masks
        return _plain(out[0]), label, _plain(out[1])

    def with_transform(self, transform: Callable[[Any], Any] | None, return_mask: bool | None = None) -> "ImageDataset":
        """Shallow copy sharing the images, with another transform."""
        new = copy.copy(self)
        new.transform = transform
        if return_mask is not None:
            if return_mask and self.masks is None:
                raise ValueError("return_mask=True needs masks")
            new.return_mask = return_mask
        return new

    def with_background_filled(self, fill: torch.Tensor | Sequence[int]) -> "ImageDataset":
        """Shallow copy whose images have every background pixel set to ``fill`` (:func:`fill_background`);
        needs in-memory uint8 images and per-pixel masks (the built-in data)."""
        if self.masks is None or not isinstance(self.images, torch.Tensor):
            raise ValueError(
                f"foreground-only images need in-memory images with per-pixel foreground masks, which "
                f"{type(self).__name__} has not; use data=builtin"
            )
        new = copy.copy(self)
        new.images = fill_background(self.images, self.masks, fill)
        return new

    def subset(self, indices: Sequence[int] | slice | int) -> "ImageDataset":
        """Copy restricted to ``indices`` (an int ``n`` means the first n samples)."""
        if isinstance(indices, int):
            indices = slice(0, min(indices, len(self)))
        new = copy.copy(self)
        new.images = take(self.images, indices)
        idx = indices if isinstance(indices, slice) else torch.as_tensor(list(indices), dtype=torch.long)
        new.labels = self.labels[idx]
        if self.masks is not None:
            new.masks = self.masks[idx]
        for name in getattr(self, "_per_sample_attrs", ()):
            setattr(new, name, getattr(self, name)[idx])
        return new


def _plain(x: Any) -> Any:
    return x.as_subclass(torch.Tensor) if isinstance(x, torch.Tensor) else x


class WithCleanView(Dataset):
    """An SSL dataset whose items also carry the un-augmented image: ``(views, label, extras)``
    with ``extras["clean"]`` the same sample under the deterministic eval transform (and
    ``extras["mask"]`` the views' foreground masks when the dataset returns them).  For
    regularizers that list ``"clean"`` in their ``data_requirements`` (docs/algorithms.md §5)."""

    def __init__(self, ssl: Dataset, clean: Dataset) -> None:
        if len(ssl) != len(clean):
            raise ValueError(f"clean view dataset has {len(clean)} items, the SSL dataset {len(ssl)}")
        self.ssl, self.clean = ssl, clean

    def __len__(self) -> int:
        return len(self.ssl)

    def __getattr__(self, name: str):
        if name in ("ssl", "clean"):  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.ssl, name)

    def __getitem__(self, index: int):
        item = self.ssl[index]
        extras = {"clean": self.clean[index][0]}
        if len(item) > 2:
            extras["mask"] = item[2]
        return item[0], item[1], extras

