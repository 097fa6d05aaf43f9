"""Dense (segmentation) evaluation of a frozen backbone: docs/algorithms.md §7.4.

Protocol:

1. The frozen backbone (eval mode, no gradients) maps every image to its last spatial feature map
   ``forward_features(x) -> (B, C, h, w)`` (the contract of :mod:`metassl.models.feature_maps`);
   the maps are computed once and cached, as the linear probe caches its features (§7.2).
2. A light head, ``linear`` (one 1x1 convolution, the linear probe of a dense feature) or ``conv``
   (3x3 conv - BN - ReLU - 1x1 conv), turns each map into class logits ``(B, K, h, w)``; they are
   upsampled bilinearly to the image size.  The map's channels are first standardised with the
   mean and std of the training part (folded into the head, so it applies to any map).
3. The head is trained with per-pixel cross-entropy (pixels marked 255 ignored), AdamW and a
   per-step cosine schedule from ``lr`` to 0, on shuffled mini-batches of cached maps.
4. A validation part carved from the *training* images (seeded random split) picks the epoch:
   highest validation mIoU, ties to higher pixel accuracy, then to the earlier epoch.  The test
   split is never used for a choice; it is scored with the selected head (``*_best_val``) and
   the last one (``*_last``).
5. Scores come from the confusion matrix (torchmetrics): IoU_c = TP / (TP + FP + FN), mIoU the
   mean over classes present in prediction or target, pixel accuracy = correct / counted pixels.
   The best constant predictor (the majority class of the training pixels everywhere) is scored
   too: the floor any useful feature map must beat.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.functional.classification import multiclass_confusion_matrix

from metassl.models.feature_maps import require_feature_maps

__all__ = [
    "HEADS", "IGNORE_INDEX", "DenseHead", "build_head", "pixel_cross_entropy", "confusion_matrix",
    "segmentation_scores", "extract_feature_maps", "fit_dense_head", "evaluate_segmentation",
    "check_segmentation_options",
]

HEADS = ("linear", "conv")
IGNORE_INDEX = 255


# ----------------------------------------------------------------------------- head and loss


def build_head(kind: str, in_channels: int, num_classes: int, hidden_dim: int = 128) -> nn.Module:
    """``linear``: ``Conv1x1(C, K)``; ``conv``: ``Conv3x3(C, hidden) - BN - ReLU - Conv1x1(hidden, K)``."""
    if kind == "linear":
        return nn.Conv2d(in_channels, num_classes, kernel_size=1)
    if kind == "conv":
        return nn.Sequential(
            nn.Conv2d(in_channels, hidden_dim, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, num_classes, kernel_size=1),
        )
    raise ValueError(f"unknown segmentation head {kind!r}; choose one of: {', '.join(HEADS)}")


class DenseHead(nn.Module):
    """Frozen per-channel standardisation, the trainable ``core`` head, bilinear upsampling:
    ``forward(fmap (B, C, h, w), size (H, W)) -> logits (B, K, H, W)``."""

    def __init__(self, core: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.core = core
        self.register_buffer("mean", mean.detach().reshape(1, -1, 1, 1).clone())
        self.register_buffer("std", std.detach().reshape(1, -1, 1, 1).clone())

    def forward(self, fmap: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        logits = self.core((fmap - self.mean) / self.std)
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def pixel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy over the pixels of ``target (B, H, W)`` that are not ``ignore_index``
    (0 when there is none, so an all-ignored batch adds no gradient instead of NaN)."""
    target = target.long()
    summed = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    return summed / (target != ignore_index).sum().clamp_min(1)


# ----------------------------------------------------------------------------- metrics


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``(K, K)`` long counts, row = true class, column = predicted; ``ignore_index`` pixels skipped."""
    return multiclass_confusion_matrix(
        pred.reshape(-1), target.reshape(-1).long(), num_classes, ignore_index=ignore_index, validate_args=False
    ).long()


def segmentation_scores(confmat: torch.Tensor) -> dict[str, Any]:
    """``miou``, ``pixel_acc`` and per-class ``iou`` (NaN for a class absent from both prediction
    and target, left out of the mean) from a confusion matrix (rows true, columns predicted)."""
    confmat = confmat.double()
    tp = confmat.diagonal()
    union = confmat.sum(0) + confmat.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    present = union > 0
    total = confmat.sum()
    return {
        "miou": float(iou[present].mean()) if present.any() else float("nan"),
        "pixel_acc": float(tp.sum() / total) if total > 0 else float("nan"),
        "iou": iou.tolist(),
    }


def constant_prediction_confusion(train_masks: torch.Tensor, test_masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Confusion matrix on ``test_masks`` of predicting the majority class of ``train_masks`` everywhere."""
    counts = torch.bincount(train_masks[train_masks != IGNORE_INDEX].long().reshape(-1), minlength=num_classes)
    majority = int(counts.argmax())
    return confusion_matrix(torch.full_like(test_masks, majority), test_masks, num_classes)


# ----------------------------------------------------------------------------- feature maps


def _memory_budget() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4  # the split copies part of the cache
    except (ValueError, OSError, AttributeError):
        return None


@torch.no_grad()
def extract_feature_maps(
    backbone: nn.Module, dataset: Dataset, batch_size: int = 256, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``forward_features`` maps ``(N, C, h, w)`` float32 and masks ``(N, H, W)`` uint8 of every
    ``(image, mask)`` item, the backbone in eval mode (training flags restored afterwards)."""
    require_feature_maps(backbone)
    device = torch.device(device)
    flags = [(m, m.training) for m in backbone.modules()]
    maps: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    n, start = len(dataset), 0
    try:
        backbone.eval()
        for images, target in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0):
            fmap = backbone.forward_features(images.to(device)).float()
            if fmap.dim() != 4:
                raise ValueError(f"forward_features gave shape {tuple(fmap.shape)}, expected (B, C, h, w)")
            if maps is None:
                need = n * (fmap[0].numel() * 4 + target[0].numel())
                budget = _memory_budget()
                if budget is not None and need > budget:
                    raise ValueError(
                        f"the feature maps of {n} images take {need / 2**30:.1f} GiB, more than a quarter of the RAM; "
                        "evaluate fewer images (data.subset / data.test_subset) or smaller ones (eval.segment.image_size)"
                    )
                maps = torch.empty((n, *fmap.shape[1:]), dtype=torch.float32, device=device)
                masks = torch.empty((n, *target.shape[1:]), dtype=torch.uint8, device=device)
            maps[start : start + len(fmap)] = fmap
            masks[start : start + len(fmap)] = target.to(device=device, dtype=torch.uint8)
            start += len(fmap)
    finally:
        for module, flag in flags:
            module.training = flag
    if maps is None:
        raise ValueError("extract_feature_maps: the dataset is empty")
    return maps, masks


# ----------------------------------------------------------------------------- training


@dataclass
class DenseHeadFit:
    """``fit_dense_head``'s outcome: the last and the best-validation heads, 0-based ``best_epoch``,
    and per-epoch ``history`` (``epoch, lr, train_loss, val_miou, val_pixel_acc``; NaN without val)."""

    last: DenseHead
    best: DenseHead
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)


@torch.no_grad()
def head_confusion(head: DenseHead, maps: torch.Tensor, masks: torch.Tensor, num_classes: int, batch_size: int = 256) -> torch.Tensor:
    """Confusion matrix of ``head``'s arg-max prediction over ``(maps, masks)``."""
    was = head.training
    head.eval()
    total = torch.zeros((num_classes, num_classes), dtype=torch.long, device=maps.device)
    for s in range(0, len(maps), batch_size):
        target = masks[s : s + batch_size]
        pred = head(maps[s : s + batch_size], target.shape[-2:]).argmax(dim=1)
        total += confusion_matrix(pred, target, num_classes)
    head.train(was)
    return total


def fit_dense_head(
    train_maps: torch.Tensor, train_masks: torch.Tensor, val_maps: torch.Tensor, val_masks: torch.Tensor,
    num_classes: int, *, head: str = "linear", hidden_dim: int = 128, epochs: int = 20, lr: float = 1e-2,
    weight_decay: float = 1e-4, batch_size: int = 64, seed: int = 0,
) -> DenseHeadFit:
    """Train a :class:`DenseHead` on cached maps (steps 2-4 of the module docstring); seeded by
    private generators and a forked RNG, so the global random stream is untouched."""
    mean = train_maps.mean(dim=(0, 2, 3))
    std = train_maps.var(dim=(0, 2, 3), unbiased=False).sqrt().clamp_min(1e-6)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = DenseHead(build_head(head, train_maps.shape[1], num_classes, hidden_dim), mean, std).to(train_maps.device)
    opt = torch.optim.AdamW(model.core.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(int(seed) + 1)
    n = len(train_maps)
    total_steps = epochs * math.ceil(n / batch_size)
    step, history, best, best_key, best_epoch = 0, [], None, None, epochs - 1
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen).to(train_maps.device)
        loss_sum, epoch_lr = 0.0, lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
        for s in range(0, n, batch_size):
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
            idx = perm[s : s + batch_size]
            target = train_masks[idx]
            loss = pixel_cross_entropy(model(train_maps[idx], target.shape[-2:]), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += float(loss.detach()) * len(idx)
        entry = {"epoch": epoch, "lr": epoch_lr, "train_loss": loss_sum / n, "val_miou": float("nan"), "val_pixel_acc": float("nan")}
        if len(val_maps):
            scores = segmentation_scores(head_confusion(model, val_maps, val_masks, num_classes))
            entry.update(val_miou=scores["miou"], val_pixel_acc=scores["pixel_acc"])
            key = (scores["miou"], scores["pixel_acc"])
            if best_key is None or key > best_key:  # strict: ties keep the earlier epoch
                best_key, best_epoch, best = key, epoch, copy.deepcopy(model)
        history.append(entry)
    model.eval()
    best = (best if best is not None else copy.deepcopy(model)).eval()
    return DenseHeadFit(last=model, best=best, best_epoch=best_epoch, history=history)


def random_split(n: int, val_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded ``(train_idx, val_idx)`` of ``range(n)``: ``round(val_fraction * n)`` to validation,
    at least one image kept for training."""
    n_val = min(int(math.floor(val_fraction * n + 0.5)), max(n - 1, 0))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def check_segmentation_options(
    backbone: nn.Module, *, head: str, hidden_dim: int, epochs: int, lr: float, weight_decay: float,
    batch_size: int, val_fraction: float,
) -> None:
    """One ``ValueError`` line for the first bad option or a backbone without feature maps."""
    if head not in HEADS:
        raise ValueError(f"eval.segment.head={head!r} is not valid; choose one of: {', '.join(HEADS)}")
    for name, value in (("epochs", epochs), ("lr", lr), ("batch_size", batch_size), ("hidden_dim", hidden_dim)):
        if not value > 0:
            raise ValueError(f"eval.segment.{name}={value!r} must be > 0")
    if weight_decay < 0:
        raise ValueError(f"eval.segment.weight_decay={weight_decay!r} must be >= 0")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} must be in [0, 1)")
    require_feature_maps(backbone)


def evaluate_segmentation(
    backbone: nn.Module, train_set: Dataset, test_set: Dataset, num_classes: int, *, head: str = "linear",
    hidden_dim: int = 128, epochs: int = 20, lr: float = 1e-2, weight_decay: float = 1e-4, batch_size: int = 64,
    val_fraction: float = 0.1, seed: int = 0, extract_batch_size: int = 256, device: torch.device | str | None = None,
) -> dict[str, Any]:
    """The protocol of the module docstring on ``(image, mask)`` datasets; returns ``segment_*``
    scores (fractions in [0, 1]) with the setting that produced them."""
    check_segmentation_options(
        backbone, head=head, hidden_dim=hidden_dim, epochs=epochs, lr=lr, weight_decay=weight_decay,
        batch_size=batch_size, val_fraction=val_fraction,
    )
    if device is None:
        device = next((p.device for p in backbone.parameters()), torch.device("cpu"))
    started = time.perf_counter()
    maps, masks = extract_feature_maps(backbone, train_set, extract_batch_size, device)
    test_maps, test_masks = extract_feature_maps(backbone, test_set, extract_batch_size, device)
    extract_seconds = time.perf_counter() - started
    train_idx, val_idx = (i.to(maps.device) for i in random_split(len(maps), val_fraction, seed))
    fit = fit_dense_head(
        maps[train_idx], masks[train_idx], maps[val_idx], masks[val_idx], num_classes, head=head,
        hidden_dim=hidden_dim, epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size, seed=seed,
    )
    best = segmentation_scores(head_confusion(fit.best, test_maps, test_masks, num_classes))
    last = segmentation_scores(head_confusion(fit.last, test_maps, test_masks, num_classes))
    constant = segmentation_scores(constant_prediction_confusion(masks[train_idx], test_masks, num_classes))
    return {
        "segment_miou_best_val": best["miou"],
        "segment_pixel_acc_best_val": best["pixel_acc"],
        "segment_iou_per_class_best_val": [None if math.isnan(v) else v for v in best["iou"]],  # None: class absent
        "segment_miou_last": last["miou"],
        "segment_pixel_acc_last": last["pixel_acc"],
        "segment_best_epoch": fit.best_epoch,
        "segment_val_miou_best": fit.history[fit.best_epoch]["val_miou"],
        "segment_constant_miou": constant["miou"],
        "segment_constant_pixel_acc": constant["pixel_acc"],
        "segment_num_classes": int(num_classes),
        "segment_num_train": int(len(train_idx)),
        "segment_num_val": int(len(val_idx)),
        "segment_num_test": int(len(test_maps)),
        "segment_feature_map": list(maps.shape[1:]),
        "segment_image_size": list(masks.shape[1:]),
        "segment_config": {
            "head": head, "hidden_dim": int(hidden_dim) if head == "conv" else None, "epochs": int(epochs),
            "lr": float(lr), "weight_decay": float(weight_decay), "batch_size": int(batch_size),
            "val_fraction": float(val_fraction), "seed": int(seed), "optimizer": "adamw",
            "schedule": "cosine-per-step-to-0", "selection": "best val mIoU (val carved from train)",
        },
        "segment_extract_seconds": round(extract_seconds, 2),
        "segment_seconds": round(time.perf_counter() - started, 2),
    }
