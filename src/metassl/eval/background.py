"""Background-confounding evaluation: one frozen backbone scored on full and on foreground-only images.

The observation behind ICL-MSR (docs/algorithms.md §5.1) is read off two *conditions* of the
same labelled data: ``full`` (the images as generated) and ``foreground`` (every background pixel
replaced by a neutral fill, docs/algorithms.md §5.6).  In each condition the kNN bank and the
linear probe's training (and validation) split come from the labelled train split *in that
condition*, and the test split is scored in that condition; the difference ``full − foreground``
is the gap.  Model selection (the probe's epoch) uses the validation part carved from train,
never the test split (docs/algorithms.md §7.2).

Like the rest of :mod:`metassl.eval`, this module takes a backbone and ready datasets and imports
nothing of metassl outside the package; ``metassl eval background`` builds the datasets from a
checkpoint (``metassl.engine.checkpoint``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from metassl.eval.features import extract_features
from metassl.eval.knn import knn_accuracy
from metassl.eval.linear import linear_probe

__all__ = ["CONDITIONS", "background_gap", "condition_scores", "evaluate_background"]

#: the two test conditions, in report order
CONDITIONS = ("full", "foreground")
_LINEAR_KEYS = ("epochs", "lr", "weight_decay", "batch_size")


def condition_scores(
    bank_x: torch.Tensor,
    bank_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    *,
    k: int,
    t: float,
    linear: Mapping[str, Any] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> dict[str, Any]:
    """Scores of one condition from precomputed features: ``knn`` (weighted kNN, docs/algorithms.md
    §7.1, bank = ``bank_x``) and, when ``linear`` holds the probe settings (epochs, lr, weight_decay,
    batch_size), ``linear`` = test top-1 of the best-validation epoch (§7.2), with ``linear_last``
    and ``linear_best_epoch``; ``linear`` is None without a probe.  Fractions in [0, 1]."""
    out: dict[str, Any] = {"knn": knn_accuracy(bank_x, bank_y, test_x, test_y, num_classes, k=int(k), t=float(t)), "linear": None}
    if linear is not None:
        missing = [key for key in _LINEAR_KEYS if key not in linear]
        if missing:
            raise ValueError(f"linear probe settings lack {', '.join(missing)}; pass the eval.linear section")
        probe = linear_probe(
            bank_x, bank_y, test_x, test_y, num_classes, val_fraction=float(val_fraction), epochs=int(linear["epochs"]),
            lr=float(linear["lr"]), weight_decay=float(linear["weight_decay"]), batch_size=int(linear["batch_size"]),
            seed=int(seed), track_test=False,
        )
        out.update(linear=probe.test_acc_best_val, linear_last=probe.test_acc_last, linear_best_epoch=probe.best_epoch)
    return out


def background_gap(full: Mapping[str, Any], foreground: Mapping[str, Any]) -> dict[str, float | None]:
    """``full − foreground`` for ``knn`` and ``linear`` (None where either side is missing)."""
    both = [key for key in ("knn", "linear") if full.get(key) is not None and foreground.get(key) is not None]
    return {key: float(full[key]) - float(foreground[key]) if key in both else None for key in ("knn", "linear")}


def evaluate_background(
    backbone: nn.Module,
    transform: nn.Module | None,
    splits: Mapping[str, tuple[Dataset, Dataset]],
    num_classes: int,
    *,
    k: int,
    t: float,
    linear: Mapping[str, Any] | None = None,
    val_fraction: float = 0.1,
    batch_size: int = 512,
    seed: int = 0,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
) -> dict[str, Any]:
    """``{"full": {knn, linear, ...}, "foreground": {...}, "gap": {knn, linear}}`` for ``splits``,
    which maps each of :data:`CONDITIONS` to its ``(labelled train split, test split)`` of
    ``(image, label)`` items (eval transform attached)."""
    if set(splits) != set(CONDITIONS):
        raise ValueError(f"splits must hold exactly the conditions {', '.join(CONDITIONS)}; got {', '.join(sorted(splits))}")
    report: dict[str, Any] = {}
    for name in CONDITIONS:
        bank, test = splits[name]
        bank_x, bank_y = extract_features(backbone, _loader(bank, batch_size, num_workers), transform, device=device)
        test_x, test_y = extract_features(backbone, _loader(test, batch_size, num_workers), transform, device=device)
        report[name] = condition_scores(
            bank_x, bank_y, test_x, test_y, num_classes, k=k, t=t, linear=linear, val_fraction=val_fraction, seed=seed
        )
    report["gap"] = background_gap(report["full"], report["foreground"])
    return report


def _loader(dataset: Dataset, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
