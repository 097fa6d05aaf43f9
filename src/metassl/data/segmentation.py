"""Datasets of ``(image, mask)`` pairs for the dense evaluation (docs/algorithms.md §7.4).

Items are ``(image, mask)``: the image a normalised float32 ``(3, S, S)`` tensor (the run's eval
transform), the mask a long ``(S, S)`` tensor of class indices with :data:`IGNORE_INDEX` (255) on
pixels that count for nothing.  Two sources:

- the built-in shapes (``dataset="run"`` with ``data=builtin``): the per-pixel foreground masks of
  :class:`~metassl.data.builtin.BuiltinShapes`, 2 classes (0 background, 1 the object);
- an image/mask folder, for any dataset::

      <root>/train/images/<stem>.png|jpg|jpeg     <root>/train/masks/<stem>.png
      <root>/test/images/<stem>.png|jpg|jpeg      <root>/test/masks/<stem>.png

  every mask a single-channel PNG (mode L, P or I) of the size of its image, holding class indices
  ``0 .. K-1`` per pixel and 255 where the pixel is ignored.  Image and mask go through the same
  geometry: shorter side resized to ``image_size`` (bilinear, antialiased, for the image; nearest
  for the mask), then a centre crop to ``image_size x image_size``.

Problems (a missing folder, an image without a mask or a mask without an image, a mask of another
size than its image, an RGB mask, a class index out of range) raise one line that names the file
and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from .errors import CorruptImageError, DataConfigError, DatasetNotFoundError
from .transforms import model_input_op, resolve_normalization

__all__ = [
    "FOLDER_LAYOUT", "IGNORE_INDEX", "MaskPairs", "SegmentationFolder", "fit_pair", "read_mask", "scan_segmentation_folder",
    "segmentation_splits",
]

IGNORE_INDEX = 255
FOLDER_LAYOUT = "<root>/{train,test}/images/<stem>.png|jpg and <root>/{train,test}/masks/<stem>.png"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_MASK_MODES = ("L", "P", "I", "I;16", "1")


class MaskPairs(Dataset):
    """``(image, mask)`` items from a dataset yielding ``(image, label, mask (1, H, W))`` (the
    built-in shapes with ``return_mask``); the mask becomes a long ``(H, W)`` tensor."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, _, mask = self.dataset[index]
        return image, torch.as_tensor(mask).reshape(mask.shape[-2:]).long()


def _stems(folder: Path, extensions: Sequence[str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in extensions:
            continue
        if path.stem in found:
            raise DataConfigError(f"{found[path.stem].name} and {path.name} in {folder} share the stem {path.stem!r}; keep one")
        found[path.stem] = path
    return found


def _listing(names: Sequence[str]) -> str:
    head = ", ".join(names[:3])
    return head + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size  # (width, height), from the header only
    except Exception as err:
        raise CorruptImageError(f"cannot read {path} ({type(err).__name__}: {str(err)[:150]})") from None


def scan_segmentation_folder(root: str | os.PathLike, split: str) -> list[tuple[Path, Path]]:
    """Sorted ``(image, mask)`` path pairs of ``<root>/<split>``; one clear error for a missing
    folder, unmatched stems or a mask whose size differs from its image's."""
    base = Path(root).expanduser()
    images_dir, masks_dir = base / split / "images", base / split / "masks"
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise DatasetNotFoundError(f"segmentation folder {folder} not found; expected the layout {FOLDER_LAYOUT}")
    images, masks = _stems(images_dir, IMAGE_EXTENSIONS), _stems(masks_dir, (".png",))
    if not images:
        raise DatasetNotFoundError(f"{images_dir} holds no .png/.jpg images; expected the layout {FOLDER_LAYOUT}")
    no_mask = sorted(set(images) - set(masks))
    if no_mask:
        raise DataConfigError(
            f"{len(no_mask)} image(s) in {images_dir} have no mask of the same stem in {masks_dir} "
            f"({_listing([images[s].name for s in no_mask])}); add <stem>.png masks or remove the images"
        )
    no_image = sorted(set(masks) - set(images))
    if no_image:
        raise DataConfigError(
            f"{len(no_image)} mask(s) in {masks_dir} have no image of the same stem in {images_dir} "
            f"({_listing([masks[s].name for s in no_image])}); remove them or add the images"
        )
    pairs = [(images[s], masks[s]) for s in sorted(images)]
    for image_path, mask_path in pairs:
        w, h = _image_size(image_path)
        mw, mh = _image_size(mask_path)
        if (w, h) != (mw, mh):
            raise DataConfigError(f"mask {mask_path} is {mw}x{mh} but its image {image_path.name} is {w}x{h}; a mask must have its image's size")
    return pairs


def read_mask(path: str | os.PathLike) -> torch.Tensor:
    """A mask PNG as a long ``(H, W)`` tensor of class indices (palette indices for mode P)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            mode = im.mode
            values = np.asarray(im) if mode in _MASK_MODES else None
    except Exception as err:
        raise CorruptImageError(f"cannot decode mask {path} ({type(err).__name__}: {str(err)[:150]})") from None
    if values is None:
        raise DataConfigError(
            f"mask {path} is a {mode} image; masks must be single-channel PNGs (mode L or P) of class indices, 255 = ignore"
        )
    return torch.from_numpy(values.astype(np.int64))


def _read_rgb(path: Path) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(path) as im:
            values = np.asarray(im.convert("RGB"))
    except Exception as err:
        raise CorruptImageError(f"cannot decode image {path} ({type(err).__name__}: {str(err)[:150]})") from None
    return torch.from_numpy(values.copy()).permute(2, 0, 1).contiguous()


def fit_pair(image: torch.Tensor, mask: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shorter side to ``size`` (image: bilinear + antialias; mask: nearest), then centre crop."""
    h, w = image.shape[-2:]
    if (h, w) == (size, size):
        return image, mask
    m = tv_tensors.Mask(mask[None])
    if min(h, w) != size:
        image = F.resize(image, size, antialias=True)
        m = F.resize(m, size)
    image, m = F.center_crop(image, [size, size]), F.center_crop(m, [size, size])
    return image, m.as_subclass(torch.Tensor)[0]


class SegmentationFolder(Dataset):
    """``(image, mask)`` pairs of one split of an image/mask folder (layout in the module docstring).

    ``num_classes`` bounds the class indices (a value ``>= num_classes`` other than 255 is an
    error naming the file); ``mean``/``std`` (or ``color_space="lab"``) normalise the image like the
    run's eval transform.
    """

    def __init__(
        self, root: str | os.PathLike, split: str, image_size: int, mean: Sequence[float], std: Sequence[float],
        num_classes: int | None = None, color_space: str = "rgb",
    ) -> None:
        if split not in ("train", "test"):
            raise DataConfigError(f"split must be 'train' or 'test', got {split!r}")
        if int(image_size) < 1:
            raise DataConfigError(f"image_size must be >= 1, got {image_size}")
        self.pairs = scan_segmentation_folder(root, split)
        self.image_size = int(image_size)
        self.num_classes = num_classes
        self.normalize = model_input_op(mean, std, color_space)

    def __len__(self) -> int:
        return len(self.pairs)

    def largest_class_index(self) -> int:
        """The largest class index (255 excluded) over every mask of the split; -1 if none."""
        top = -1
        for _, mask_path in self.pairs:
            mask = read_mask(mask_path)
            valid = mask[mask != IGNORE_INDEX]
            if valid.numel():
                top = max(top, int(valid.max()))
        return top

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.pairs[index]
        image, mask = _read_rgb(image_path), read_mask(mask_path)
        if image.shape[-2:] != mask.shape:  # checked on the headers at scan time; files may change since
            raise DataConfigError(f"mask {mask_path} is {tuple(mask.shape)} but its image is {tuple(image.shape[-2:])}; a mask must have its image's size")
        valid = mask[mask != IGNORE_INDEX]
        if valid.numel() and (int(valid.min()) < 0 or (self.num_classes is not None and int(valid.max()) >= self.num_classes)):
            raise DataConfigError(
                f"mask {mask_path} holds class indices in [{int(valid.min())}, {int(valid.max())}] but there are "
                f"{self.num_classes} classes (0..{(self.num_classes or 0) - 1}, 255 = ignore); raise eval.segment.num_classes or fix the mask"
            )
        image, mask = fit_pair(image, mask, self.image_size)
        return self.normalize(image), mask


def _builtin_splits(data_cfg: Mapping[str, Any]) -> tuple[Dataset, Dataset]:
    from . import build_data  # the package builds the run's splits exactly as the other evaluations see them

    bundle = build_data({**data_cfg, "return_mask": True}, augmentation="none", num_views=1)
    return MaskPairs(bundle.train_eval), MaskPairs(bundle.test)


def segmentation_splits(
    dataset: str, data_cfg: Mapping[str, Any], image_size: int | None = None, num_classes: int | None = None,
) -> tuple[Dataset, Dataset, int]:
    """``(train, test, num_classes)`` for the dense evaluation.

    ``dataset="run"``: the run's own data, which must be the built-in shapes (2 classes,
    background/foreground; ``data.subset`` and ``data.test_subset`` apply).  Otherwise ``dataset``
    is the root of an image/mask folder, read at ``image_size`` (default: the run's
    ``data.image_size``) and normalised with the run's statistics; ``num_classes`` defaults to the
    largest class index of the train masks + 1.
    """
    from .config import validate_data_config

    data = validate_data_config(data_cfg)
    if dataset == "run":
        if data["name"] != "builtin":
            raise DataConfigError(
                f"eval.segment.dataset=run needs per-pixel masks, which only the built-in data has (data=builtin); "
                f"for data={data['name']} set eval.segment.dataset=<root> of an image/mask folder ({FOLDER_LAYOUT})"
            )
        if num_classes not in (None, 2):
            raise DataConfigError(f"the built-in masks have 2 classes (background, object); drop eval.segment.num_classes={num_classes}")
        train, test = _builtin_splits(data)
        return train, test, 2
    if num_classes is not None and not 2 <= int(num_classes) <= IGNORE_INDEX:
        raise DataConfigError(f"eval.segment.num_classes={num_classes} must be in [2, {IGNORE_INDEX}] (index {IGNORE_INDEX} marks ignored pixels)")
    mean, std = resolve_normalization(data["normalization"], data["name"], data["mean"], data["std"])
    size = int(image_size if image_size is not None else data["image_size"])
    train = SegmentationFolder(dataset, "train", size, mean, std, num_classes, data.get("color_space", "rgb"))
    test = SegmentationFolder(dataset, "test", size, mean, std, num_classes, data.get("color_space", "rgb"))
    if num_classes is None:
        num_classes = train.largest_class_index() + 1
        if not 2 <= num_classes <= IGNORE_INDEX:
            raise DataConfigError(
                f"the train masks under {dataset} give {num_classes} classes (largest index + 1); masks need indices "
                f"0..K-1 with 2 <= K <= {IGNORE_INDEX} ({IGNORE_INDEX} = ignore), or set eval.segment.num_classes=K"
            )
        train.num_classes = test.num_classes = num_classes
    return train, test, int(num_classes)
