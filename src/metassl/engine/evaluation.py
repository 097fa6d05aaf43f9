"""Offline evaluation of a trained backbone: kNN at several (k, t) and the linear probe.

Used at the end of ``metassl train`` and by ``metassl eval``.  Works on any backbone plus an
optional feature transform, so exported or foreign checkpoints evaluate the same way.
:func:`label_free_metrics` gives the per-epoch RankMe, alignment and uniformity of the online
kNN's features (docs/analysis.md "Logged during training").
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader

from metassl.analysis.redundancy import alignment, rankme, uniformity
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


#: training images whose two augmentations give the per-epoch alignment (all of a smaller set)
ALIGNMENT_PAIRS = 256
#: samples for RankMe and uniformity (Garrido et al. 2023 use 25,600 for RankMe); a seeded subsample above
LABEL_FREE_SAMPLES = 4096


def training_dataset(trainer: Any) -> Any:
    """The dataset of a Lightning trainer's training loader, or None (e.g. outside ``fit``)."""
    try:
        loader = trainer.train_dataloader
    except Exception:  # noqa: BLE001 - no trainer, or a loop that has not set up its loader
        return None
    dataset = getattr(loader, "dataset", None)
    from metassl.engine.data_order import SeededItems

    return dataset.dataset if isinstance(dataset, SeededItems) else dataset  # plain integer indices


def _positive_pairs(features: Callable[[torch.Tensor], torch.Tensor], dataset: Any, n: int, seed: int, device,
                    batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Features of the first two augmented views of the first ``n`` items of ``dataset`` (an SSL
    training set: items ``(views, label, ...)``), drawn under ``seed`` without touching the
    training run's random stream; None when the items are not multi-view."""
    first, second = [], []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for start in range(0, n, batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, n))]
            if not all(isinstance(it, (tuple, list)) and isinstance(it[0], (list, tuple)) and len(it[0]) >= 2 for it in items):
                return None
            first.append(features(torch.stack([it[0][0] for it in items]).to(device)).float())
            second.append(features(torch.stack([it[0][1] for it in items]).to(device)).float())
    return torch.cat(first), torch.cat(second)


def label_free_metrics(
    feats: torch.Tensor,
    features: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ssl_dataset: Any = None,
    *,
    seed: int = 0,
    pairs: int = ALIGNMENT_PAIRS,
    max_samples: int = LABEL_FREE_SAMPLES,
) -> dict[str, float]:
    """``val/rankme`` and ``val/uniformity`` of the evaluation features ``feats`` (a seeded
    subsample of ``max_samples``) and, given the feature map and the SSL training set,
    ``val/alignment`` of two augmentations of its first ``pairs`` images (docs/analysis.md)."""
    if feats.shape[0] > max_samples:
        keep = torch.randperm(feats.shape[0], generator=torch.Generator().manual_seed(seed))[:max_samples]
        feats = feats[keep.to(feats.device)]
    feats = feats.float()
    out = {"val/rankme": rankme(feats)}
    if feats.shape[0] >= 2:
        out["val/uniformity"] = uniformity(feats)
    if features is not None and ssl_dataset is not None and len(ssl_dataset) > 0:
        views = _positive_pairs(features, ssl_dataset, min(int(pairs), len(ssl_dataset)), seed, feats.device)
        if views is not None:
            out["val/alignment"] = alignment(*views)
    return out
