"""Offline evaluation of a trained backbone: kNN at several (k, t) and the linear probe.

Used at the end of ``metassl train`` and by ``metassl eval``.  Works on any backbone plus an
optional feature transform, so exported or foreign checkpoints evaluate the same way.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader

from metassl.data import DataBundle
from metassl.eval.features import extract_features
from metassl.eval.knn import knn_accuracy
from metassl.eval.linear import linear_probe


def _loader(dataset, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def knn_key(k: int, t: float) -> str:
    return f"knn_top1_k{k}_t{t:g}"


def evaluate_backbone(
    backbone: nn.Module,
    transform: nn.Module | None,
    bundle: DataBundle,
    *,
    knn_pairs: Iterable[tuple[int, float]],
    linear: Mapping[str, Any] | None = None,
    val_fraction: float = 0.1,
    batch_size: int = 512,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """kNN test top-1 (bank = labelled train split) for each ``(k, t)``; linear probe if asked.

    Returns fractions in [0, 1] under ``knn_top1_k{k}_t{t}`` and, for the probe,
    ``linear_top1_last`` / ``linear_top1_best_val`` (selected on a validation split carved
    from train; the test set is never used for selection).
    """
    train_x, train_y = extract_features(backbone, _loader(bundle.train_eval, batch_size, num_workers), transform, device=device)
    test_x, test_y = extract_features(backbone, _loader(bundle.test, batch_size, num_workers), transform, device=device)
    results: dict[str, Any] = {"feature_dim": int(train_x.shape[1])}
    for k, t in knn_pairs:
        results[knn_key(int(k), float(t))] = knn_accuracy(train_x, train_y, test_x, test_y, bundle.num_classes, k=int(k), t=float(t))
    if linear is not None:
        probe = linear_probe(
            train_x,
            train_y,
            test_x,
            test_y,
            bundle.num_classes,
            val_fraction=val_fraction,
            epochs=int(linear["epochs"]),
            lr=float(linear["lr"]),
            weight_decay=float(linear["weight_decay"]),
            batch_size=int(linear["batch_size"]),
            seed=seed,
        )
        results.update(
            linear_top1_last=probe.test_acc_last,
            linear_top1_best_val=probe.test_acc_best_val,
            linear_best_epoch=probe.best_epoch,
            linear_val_top1_best=probe.val_acc_best,
        )
    return results
