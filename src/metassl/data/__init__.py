"""Data layer: datasets (built-in shapes, CIFAR-10/100, STL-10, image folders) and multi-view augmentations.

Entry point::

    bundle = build_data({"name": "cifar10", "root": "~/data"}, augmentation="simclr", num_views=2)
    views, label = bundle.train_ssl[0]      # list of normalised float CxHxW tensors; label -1 if unlabelled
    image, label = bundle.test[0]

Knows nothing of Lightning; everything is a plain ``torch.utils.data.Dataset``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .batched_aug import BatchedEvalView, BatchedMultiView, build_batched_ssl_transform
from .builtin import BACKGROUNDS, SHAPES, BuiltinShapes, generate_builtin
from .config import (
    AUG_DEFAULTS,
    DATASET_NAMES,
    aug_config_keys,
    data_config_keys,
    default_data_config,
    validate_data_config,
)
from .datasets import ConcatSource, ImageDataset, WithCleanView
from .errors import CorruptImageError, DataConfigError, DataError, DatasetNotFoundError
from .folder import ImageFileSource, load_folder_tensor, scan_labelled, scan_unlabelled, spread_indices
from .lab import LAB_MEAN, LAB_STD, BatchedSplitLabViews
from .standard import load_cifar, load_stl10
from .transforms import (
    ColorJitterFast,
    MultiViewTransform,
    ScaleNormalize,
    augmentation_for,
    augmentation_names,
    build_eval_transform,
    build_ssl_transform,
    resolve_augmentation,
    resolve_normalization,
)

__all__ = [
    "DataBundle", "build_data", "data_config_keys", "aug_config_keys", "default_data_config",
    "validate_data_config", "DATASET_NAMES", "AUG_DEFAULTS", "augmentation_names", "augmentation_for",
    "ImageDataset", "BuiltinShapes", "generate_builtin", "SHAPES", "BACKGROUNDS",
    "MultiViewTransform", "ColorJitterFast", "ScaleNormalize",
    "build_ssl_transform", "build_eval_transform", "resolve_normalization",
    "DataError", "DataConfigError", "DatasetNotFoundError", "CorruptImageError",
]


@dataclass
class DataBundle:
    """Everything a training run needs from the data layer.

    ``train_ssl`` yields ``(views, label)`` (label -1 when unlabelled); ``train_eval`` and
    ``test`` yield ``(image, label)`` with the deterministic test transform.  For an
    unlabelled image folder without eval folders, ``train_eval``/``test`` are None and
    ``num_classes`` is 0.  With ``return_mask`` (builtin) every item gets a third element.
    """

    train_ssl: Dataset
    train_eval: Dataset | None
    test: Dataset | None
    num_classes: int
    image_size: int
    mean: tuple
    std: tuple
    name: str
    classes: tuple = ()
    config: dict = field(default_factory=dict)  # the validated config, defaults filled in
    # data.augment_on=device: train_ssl yields the uint8 image and the trainer makes the views of
    # the whole batch with batch_views (and the un-augmented extras["clean"] with batch_clean)
    batch_views: BatchedMultiView | BatchedSplitLabViews | None = None
    batch_clean: BatchedEvalView | None = None


@dataclass
class _Splits:
    ssl: ImageDataset
    eval_train: ImageDataset | None
    test: ImageDataset | None
    classes: list
    stored_size: int


def _first(ds: ImageDataset | None, n: int | None) -> ImageDataset | None:
    return ds if ds is None or n is None else ds.subset(n)


def _build_builtin(c: dict[str, Any]) -> _Splits:
    common = dict(
        image_size=c["image_size"], num_classes=c["num_classes"], seed=c["seed"], root=c["root"],
        return_mask=c["return_mask"], background_contrast=c["background_contrast"], foreground_fill=c["foreground_fill"],
    )
    train = BuiltinShapes(
        "train", c["num_train"], background_class_correlation=c["background_class_correlation"],
        foreground_only=c["foreground_only"], **common
    )
    test = BuiltinShapes(
        "test", c["num_test"], background_class_correlation=c["test_background_class_correlation"],
        foreground_only=c["test_foreground_only"], **common
    )
    train = _first(train, c["subset"])
    return _Splits(train, train, _first(test, c["test_subset"]), list(train.classes), c["image_size"])


def _build_cifar(c: dict[str, Any]) -> _Splits:
    data = load_cifar(c["name"], c["root"], c["download"])
    train = ImageDataset(*data["train"])
    test = ImageDataset(*data["test"])
    train = _first(train, c["subset"])
    return _Splits(train, train, _first(test, c["test_subset"]), data["classes"], 32)


def _build_stl10(c: dict[str, Any]) -> _Splits:
    splits = ("train", "test", "unlabeled") if c["use_unlabeled"] else ("train", "test")
    data = load_stl10(c["root"], c["download"], c["in_memory"], splits)
    train = ImageDataset(*data["train"], image_size=96)
    test = _first(ImageDataset(*data["test"], image_size=96), c["test_subset"])
    eval_train = _first(train, c["subset"])
    if c["use_unlabeled"]:
        unl_x, unl_y = data["unlabeled"]
        ssl = ImageDataset(ConcatSource([unl_x, data["train"][0]]), torch.cat([unl_y, data["train"][1]]), image_size=96)
        ssl = _first(ssl, c["subset"])
    else:
        ssl = eval_train
    return _Splits(ssl, eval_train, test, data["classes"], 96)


def _resolve_dir(c: dict[str, Any], key: str, default: str | None) -> Path | None:
    value = c[key] if c[key] is not None else default
    if value is None:
        return None
    p = Path(value).expanduser()
    if not p.is_absolute() and c["root"] is not None:
        p = Path(c["root"]).expanduser() / p
    return p


def _build_imagefolder(c: dict[str, Any]) -> _Splits:
    if c["root"] is None and c["train_dir"] is None:
        raise DataConfigError("imagefolder needs data.root (with train/ and test/ inside) or an explicit data.train_dir")
    if c["root"] is not None:  # absolute, so that derived folders are not joined to it twice
        c = {**c, "root": str(Path(c["root"]).expanduser().resolve())}
    size = c["load_size"] or c["image_size"]
    labelled = c["labelled"]
    train_dir = _resolve_dir(c, "train_dir", "train")
    eval_dir = _resolve_dir(c, "eval_train_dir", str(train_dir) if labelled else None)
    test_dir = _resolve_dir(c, "test_dir", "test" if labelled else None)
    decoded: dict[tuple, Any] = {}  # the same files are decoded once and shared

    def make(paths: list[str], labels: list[int], n: int | None) -> ImageDataset:
        if n is not None and n < len(paths):
            keep = spread_indices(len(paths), n)
            paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
        key = tuple(paths)
        if key not in decoded:
            if c["in_memory"]:
                decoded[key] = load_folder_tensor(paths, size, c["cache_dir"], c["decode_workers"])
            else:
                decoded[key] = ImageFileSource(paths, size)
        return ImageDataset(decoded[key], labels, image_size=size)

    classes: list[str] = []
    eval_train = test = None
    if eval_dir is not None:
        paths, labels, classes = scan_labelled(eval_dir)
        eval_train = make(paths, labels, c["subset"])
    if test_dir is not None:
        paths, labels, classes_t = scan_labelled(test_dir, classes or None)
        classes = classes or classes_t
        test = make(paths, labels, c["test_subset"])
    if labelled:
        paths, labels, _ = scan_labelled(train_dir, classes or None)
    else:
        paths = scan_unlabelled(train_dir)
        labels = [-1] * len(paths)
    ssl = make(paths, labels, c["subset"])
    return _Splits(ssl, eval_train, test, classes, size)


_BUILDERS = {
    "builtin": _build_builtin,
    "cifar10": _build_cifar,
    "cifar100": _build_cifar,
    "stl10": _build_stl10,
    "imagefolder": _build_imagefolder,
}


def build_data(cfg: Mapping[str, Any], augmentation: str = "simclr", num_views: int = 2, clean_view: bool = False) -> DataBundle:
    """Validate ``cfg``, load the dataset and attach the SSL and eval transforms.

    ``augmentation`` is a family (``simclr``, ``byol``, ``none``) or a method alias
    (``moco_v2``, ``simsiam``, ``barlow_twins``, ``vicreg``); strengths come from ``cfg['aug']``.
    ``color_space=lab`` (``cfg['lab_views']``: full | split) ignores ``normalization``; the bundle's
    mean/std are then the Lab mid values and half ranges the images were scaled by.
    """
    c = validate_data_config(cfg)
    mean, std = resolve_normalization(c["normalization"], c["name"], c["mean"], c["std"])
    color = {"color_space": c["color_space"], "lab_views": c["lab_views"]}
    resolve_augmentation(augmentation, c["image_size"], c["aug"])  # fail before any loading
    if num_views < 1:
        raise DataConfigError(f"num_views must be >= 1, got {num_views}")
    s = _BUILDERS[c["name"]](c)
    eval_t = build_eval_transform(c["image_size"], mean, std, s.stored_size, c["color_space"])
    batch_views = batch_clean = None
    if c["augment_on"] == "device":  # items are (uint8 image, label); the views are made per batch
        train_ssl = s.ssl.with_transform(None, return_mask=False)
        batch_views = build_batched_ssl_transform(augmentation, c["image_size"], mean, std, num_views, c["aug"], **color)
        batch_clean = BatchedEvalView(c["image_size"], mean, std, c["color_space"]) if clean_view else None
    else:
        ssl_t = build_ssl_transform(augmentation, c["image_size"], mean, std, num_views, c["aug"], s.stored_size, **color)
        train_ssl = s.ssl.with_transform(ssl_t)
        if clean_view:  # items become (views, label, {"clean": un-augmented image[, "mask": masks]})
            train_ssl = WithCleanView(train_ssl, s.ssl.with_transform(eval_t, return_mask=False))
    return DataBundle(
        train_ssl=train_ssl,
        train_eval=s.eval_train.with_transform(eval_t) if s.eval_train is not None else None,
        test=s.test.with_transform(eval_t) if s.test is not None else None,
        num_classes=len(s.classes),
        image_size=c["image_size"],
        mean=LAB_MEAN if c["color_space"] == "lab" else tuple(mean),
        std=LAB_STD if c["color_space"] == "lab" else tuple(std),
        name=c["name"],
        classes=tuple(str(x) for x in s.classes),
        config=c,
        batch_views=batch_views,
        batch_clean=batch_clean,
    )
