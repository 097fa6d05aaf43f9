"""Background dependence of a representation (the observation behind ICL-MSR, docs/algorithms.md §5.1).

Where the data has per-pixel foreground masks (the built-in shapes), the test images are scored
twice by the run's kNN (docs/algorithms.md §7.1) against the same bank (the labelled train split
as it is): as they are (``full``) and with every background pixel replaced by the neutral fill of
docs/algorithms.md §5.6 (``foreground``).  A representation that leans on backgrounds loses
accuracy when they are taken away: the ``gap = full − foreground``.  Two more views of the same
question, from the same cached features:

- ``background_knn``: the kNN predicts the image's *background family* instead of its class
  (bank: the train split's families); far above chance means the features encode the background;
- :func:`background_sensitivity`: per dimension, the mean absolute change of the feature when the
  background is removed, in units of that dimension's standard deviation over the test images.

The fill is the one of ``metassl eval background`` (:func:`metassl.data.builtin.resolve_fill` and
``ImageDataset.with_background_filled``), reused, not re-implemented.  Unlike that protocol
(whose bank is in the test's condition), the bank here stays on full images: the question is how
the same classifier reacts when only the test background goes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from metassl.eval.knn import knn_predict

__all__ = ["foreground_test_split", "background_dependence", "background_sensitivity"]


def foreground_test_split(bundle, data_cfg: dict[str, Any]):
    """``(test split with backgrounds filled, fill as [r, g, b])``, or ``(None, None)`` when the
    data has no foreground masks (only the built-in data has them)."""
    test = bundle.test
    if data_cfg.get("name") != "builtin" or getattr(test, "masks", None) is None:
        return None, None
    from metassl.data.builtin import resolve_fill

    fill = resolve_fill(data_cfg.get("foreground_fill", "mean"), image_size=data_cfg["image_size"],
                        num_classes=data_cfg["num_classes"], seed=data_cfg["seed"],
                        background_contrast=data_cfg.get("background_contrast", 1.0), root=data_cfg.get("root"))
    return test.with_background_filled(fill), [int(v) for v in fill]


def background_sensitivity(full: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
    """``mean_i |x_full,id − x_fg,id| / std_d(x_full)`` per dimension ``d`` (0 for a constant one)."""
    if full.shape != foreground.shape or full.dim() != 2:
        raise ValueError(f"full and foreground features must be two (N, D) tensors of one shape; got "
                         f"{tuple(full.shape)} and {tuple(foreground.shape)}")
    full, foreground = full.double(), foreground.double()
    std = full.std(0, unbiased=False)
    change = (full - foreground).abs().mean(0)
    return torch.where(std > 1e-12, change / torch.where(std > 1e-12, std, torch.ones_like(std)), torch.zeros_like(std))


@torch.no_grad()
def _votes(bank: torch.Tensor, label_sets, query: torch.Tensor, k: int, t: float, chunk_elements: int = 1 << 24):
    """The weighted-kNN prediction (docs/algorithms.md §7.1, as :func:`metassl.eval.knn.knn_predict`)
    for each ``(bank labels, number of labels)`` of ``label_sets``, from one neighbour search."""
    bank_u = F.normalize(bank.float(), dim=1)
    k = min(int(k), bank_u.shape[0])
    preds = [torch.empty(query.shape[0], dtype=torch.long) for _ in label_sets]
    step = max(1, chunk_elements // bank_u.shape[0])
    for start in range(0, query.shape[0], step):
        top_sim, top_idx = (F.normalize(query[start : start + step].float(), dim=1) @ bank_u.T).topk(k, dim=1)
        weights = torch.exp((top_sim - top_sim[:, :1]) / t)
        for pred, (labels, count) in zip(preds, label_sets):
            scores = torch.zeros(top_sim.shape[0], count, dtype=weights.dtype)
            scores.scatter_add_(1, labels.reshape(-1).long()[top_idx], weights)
            pred[start : start + top_sim.shape[0]] = (scores / scores.sum(1, keepdim=True)).argmax(1)
    return preds


def _per_class(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> list[float | None]:
    out = []
    for c in range(num_classes):
        sel = y == c
        out.append(float((pred[sel] == c).double().mean()) if bool(sel.any()) else None)
    return out


def background_dependence(
    bank: torch.Tensor,
    bank_y: torch.Tensor,
    test: torch.Tensor,
    test_y: torch.Tensor,
    test_foreground: torch.Tensor,
    num_classes: int,
    *,
    k: int,
    t: float,
    bank_backgrounds: torch.Tensor | None = None,
    test_backgrounds: torch.Tensor | None = None,
) -> dict[str, Any]:
    """``full``/``foreground`` kNN accuracy, their ``gap``, both per class, the background-family
    kNN (with its chance level) and the mean background sensitivity of the dimensions."""
    if test.shape != test_foreground.shape:
        raise ValueError(f"full and foreground test features differ in shape: {tuple(test.shape)} vs {tuple(test_foreground.shape)}")
    families = None
    if bank_backgrounds is not None and test_backgrounds is not None:
        families = int(max(bank_backgrounds.max(), test_backgrounds.max())) + 1
        # one neighbour search votes for the class and for the background family
        pred_full, pred_bg = _votes(bank, [(bank_y, num_classes), (bank_backgrounds, families)], test, k, t)
    else:
        (pred_full,) = _votes(bank, [(bank_y, num_classes)], test, k, t)
    pred_fg = knn_predict(bank, bank_y, test_foreground, num_classes, k=k, t=t)
    y = test_y.reshape(-1).long()
    full, fg = float((pred_full == y).double().mean()), float((pred_fg == y).double().mean())
    sensitivity = background_sensitivity(test, test_foreground)
    report: dict[str, Any] = {
        "knn_full": full, "knn_foreground": fg, "gap": full - fg,
        "per_class_full": _per_class(pred_full, y, num_classes), "per_class_foreground": _per_class(pred_fg, y, num_classes),
        "sensitivity_mean": float(sensitivity.mean()), "k": int(k), "t": float(t),
    }
    if families is not None:
        counts = torch.bincount(test_backgrounds.long(), minlength=families).double()
        report.update(background_knn=float((pred_bg == test_backgrounds.long()).double().mean()),
                      background_chance=float(counts.max() / counts.sum()), background_families=families)
    return report
