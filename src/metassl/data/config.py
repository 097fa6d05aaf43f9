"""Data config schema: defaults per dataset, key validation, value checks.

A data config is a flat mapping (plain dict, or anything ``Mapping``-like such as an
OmegaConf ``DictConfig``) with a nested ``aug`` mapping of augmentation strengths.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import DataConfigError

DATASET_NAMES = ("builtin", "cifar10", "cifar100", "stl10", "imagefolder")

AUGMENT_ON = ("loader", "device")

COLOR_SPACES = ("rgb", "lab")

LAB_VIEWS = ("full", "split")

NORMALIZATIONS = ("imagenet", "dataset", "cifar", "cifar10", "cifar100", "stl10", "none")

#: Augmentation strength keys; ``None`` means "the family's default".  Every value may be
#: a number or a list of numbers (one per view, cycled when there are more views).
AUG_DEFAULTS: dict[str, Any] = {
    "crop_scale_min": None,
    "crop_scale_max": None,
    "flip_p": None,
    "jitter_p": None,
    "brightness": None,
    "contrast": None,
    "saturation": None,
    "hue": None,
    "grayscale_p": None,
    "blur_p": None,
    "blur_sigma_min": None,
    "blur_sigma_max": None,
    "solarize_p": None,
}

_COMMON: dict[str, Any] = {
    "name": None,
    "root": None,
    "image_size": 32,
    "normalization": "imagenet",
    "mean": None,
    "std": None,
    "subset": None,
    "test_subset": None,
    # where the training views are made: `loader` = per sample in the DataLoader (torchvision v2),
    # `device` = the whole uint8 batch at once on the training device (metassl.data.batched_aug:
    # same parameter distributions; on a GPU the augmentation runs on the GPU)
    "augment_on": "loader",
    # `lab`: views and eval images converted to CIE Lab, each channel scaled to [-1, 1] by its range
    # (metassl.data.lab; replaces normalization/mean/std)
    "color_space": "rgb",
    # with lab: `full` = two augmented Lab views; `split` = one crop per sample, split into an L view
    # and an ab view (CMC / MetAug's official views)
    "lab_views": "full",
    "aug": {},
}

_SPECIFIC: dict[str, dict[str, Any]] = {
    "builtin": {
        "num_train": 5000,
        "num_test": 1000,
        "num_classes": 10,
        "seed": 0,
        "background_class_correlation": 0.0,
        "test_background_class_correlation": 0.0,
        "background_contrast": 0.3,
        "return_mask": False,
        "foreground_only": False,
        "test_foreground_only": False,
        "foreground_fill": "mean",
    },
    "cifar10": {"download": False},
    "cifar100": {"download": False},
    "stl10": {"download": False, "image_size": 96, "in_memory": True, "use_unlabeled": True},
    "imagefolder": {
        "train_dir": None,
        "eval_train_dir": None,
        "test_dir": None,
        "labelled": True,
        "in_memory": True,
        "load_size": None,
        "cache_dir": None,
        "decode_workers": None,
    },
}


#: keys that need per-pixel foreground masks (only the built-in data has them)
MASK_KEYS = ("foreground_only", "test_foreground_only", "foreground_fill")


def default_data_config(name: str) -> dict[str, Any]:
    """Full default config for dataset ``name`` (a fresh copy)."""
    if name not in _SPECIFIC:
        raise DataConfigError(f"unknown dataset name {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    cfg = copy.deepcopy(_COMMON)
    cfg.update(copy.deepcopy(_SPECIFIC[name]))
    cfg["name"] = name
    cfg["aug"] = dict(AUG_DEFAULTS)
    return cfg


def data_config_keys(name: str) -> set[str]:
    """Valid top-level keys of a data config for dataset ``name``."""
    return set(default_data_config(name))


def aug_config_keys() -> set[str]:
    """Valid keys of the nested ``aug`` mapping."""
    return set(AUG_DEFAULTS)


def to_plain(obj: Any) -> Any:
    """Recursively convert Mapping / non-string Sequence containers to dict / list."""
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        return [to_plain(v) for v in obj]
    return obj


def _unknown(where: str, bad: set[str], valid: set[str]) -> DataConfigError:
    return DataConfigError(
        f"unknown {where} key(s) {', '.join(sorted(bad))}; valid keys: {', '.join(sorted(valid))}"
    )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise DataConfigError(msg)


def validate_data_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``cfg`` and return it merged over the dataset's defaults.

    Raises :class:`DataConfigError` (one line) on unknown keys or invalid values.
    """
    if not isinstance(cfg, Mapping):
        raise DataConfigError(f"data config must be a mapping, got {type(cfg).__name__}")
    user = to_plain(cfg)
    name = user.get("name")
    if name is None:
        raise DataConfigError(f"data config needs a 'name'; valid names: {', '.join(DATASET_NAMES)}")
    out = default_data_config(str(name))
    bad = set(user) - set(out)
    needs_masks = sorted(bad & set(MASK_KEYS))
    if needs_masks:
        raise DataConfigError(
            f"data.{needs_masks[0]} needs per-pixel foreground masks, which only data=builtin has ({name} has none); "
            f"remove it or train on data=builtin"
        )
    if bad:
        raise _unknown(f"data config ({name})", bad, set(out))
    aug_user = user.pop("aug", None) or {}
    _check(isinstance(aug_user, dict), f"data.aug must be a mapping, got {type(aug_user).__name__}")
    bad = set(aug_user) - set(AUG_DEFAULTS)
    if bad:
        raise _unknown("data.aug", bad, set(AUG_DEFAULTS))
    out.update(user)
    out["aug"].update(aug_user)
    _check_values(out)
    return out


def check_color_options(color_space: Any, lab_views: Any) -> None:
    """One DataConfigError for an unknown ``color_space`` / ``lab_views`` or ``split`` with RGB."""
    _check(color_space in COLOR_SPACES, f"data.color_space must be one of {', '.join(COLOR_SPACES)}; got {color_space!r}")
    _check(lab_views in LAB_VIEWS, f"data.lab_views must be one of {', '.join(LAB_VIEWS)}; got {lab_views!r}")
    _check(lab_views != "split" or color_space == "lab",
           "data.lab_views=split splits the Lab channels: set data.color_space=lab too (or data.lab_views=full)")


def _check_values(c: dict[str, Any]) -> None:
    name = c["name"]
    _check(_is_int(c["image_size"]) and c["image_size"] >= 8, f"data.image_size must be an int >= 8, got {c['image_size']!r}")
    norm = c["normalization"]
    _check(norm in NORMALIZATIONS, f"data.normalization must be one of {', '.join(NORMALIZATIONS)}; got {norm!r}")
    for key in ("mean", "std"):
        v = c[key]
        _check(
            v is None or (isinstance(v, list) and len(v) == 3 and all(_is_num(x) for x in v)),
            f"data.{key} must be null or a list of 3 numbers, got {v!r}",
        )
    _check((c["mean"] is None) == (c["std"] is None), "data.mean and data.std must be given together")
    if c["std"] is not None:
        _check(all(x > 0 for x in c["std"]), f"data.std must be positive, got {c['std']!r}")
    check_color_options(c["color_space"], c["lab_views"])
    _check(c["color_space"] != "lab" or c["mean"] is None,
           "data.mean/data.std normalise RGB, data.color_space=lab scales L, a, b by their ranges instead: "
           "drop data.mean and data.std (or use data.color_space=rgb)")
    _check(c["augment_on"] in AUGMENT_ON, f"data.augment_on must be one of {', '.join(AUGMENT_ON)}; got {c['augment_on']!r}")
    if c["augment_on"] == "device" and c.get("return_mask"):
        raise DataConfigError("data.return_mask=true needs data.augment_on=loader: the foreground masks travel through the "
                              "per-sample crops and flips, which data.augment_on=device does not carry them through")
    for key in ("subset", "test_subset"):
        v = c[key]
        _check(v is None or (_is_int(v) and v > 0), f"data.{key} must be null or a positive int, got {v!r}")
    for key in ("root", "train_dir", "eval_train_dir", "test_dir", "cache_dir"):
        if key in c:
            v = c[key]
            _check(v is None or isinstance(v, (str, os.PathLike)), f"data.{key} must be null or a path, got {v!r}")
            c[key] = None if v is None else os.fspath(v)
    for key in ("download", "in_memory", "use_unlabeled", "labelled", "return_mask", "foreground_only", "test_foreground_only"):
        if key in c:
            _check(isinstance(c[key], bool), f"data.{key} must be true or false, got {c[key]!r}")
    if name == "builtin":
        for key in ("num_train", "num_test"):
            _check(_is_int(c[key]) and c[key] > 0, f"data.{key} must be a positive int, got {c[key]!r}")
        _check(_is_int(c["seed"]) and c["seed"] >= 0, f"data.seed must be a non-negative int, got {c['seed']!r}")
        _check(
            _is_int(c["num_classes"]) and 2 <= c["num_classes"] <= 10,
            f"data.num_classes must be an int in [2, 10] for builtin, got {c['num_classes']!r}",
        )
        for key in ("background_class_correlation", "test_background_class_correlation", "background_contrast"):
            v = c[key]
            _check(_is_num(v) and 0.0 <= v <= 1.0, f"data.{key} must be in [0, 1], got {v!r}")
        v = c["foreground_fill"]
        _check(
            v == "mean" or (isinstance(v, list) and len(v) == 3 and all(_is_int(x) and 0 <= x <= 255 for x in v)),
            f"data.foreground_fill must be 'mean' or [r, g, b] with integers in 0..255, got {v!r}",
        )
    if name == "imagefolder":
        v = c["load_size"]
        _check(v is None or (_is_int(v) and v >= 8), f"data.load_size must be null or an int >= 8, got {v!r}")
        v = c["decode_workers"]
        _check(v is None or (_is_int(v) and v >= 1), f"data.decode_workers must be null or an int >= 1, got {v!r}")
    for key, v in c["aug"].items():
        if v is None:
            continue
        vals = v if isinstance(v, list) else [v]
        _check(
            len(vals) > 0 and all(_is_num(x) and x >= 0 for x in vals),
            f"data.aug.{key} must be a non-negative number or a list of them, got {v!r}",
        )
        if key.endswith("_p") or key.startswith("crop_scale"):
            _check(all(x <= 1 for x in vals), f"data.aug.{key} must be <= 1, got {v!r}")
        if key == "hue":
            _check(all(x <= 0.5 for x in vals), f"data.aug.hue must be <= 0.5, got {v!r}")
