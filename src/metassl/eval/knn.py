"""Weighted k-nearest-neighbour classifier on frozen features.

Protocol of InstDisc (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination", Sec. 3.5), as re-implemented in the MoCo CIFAR-10 colab and used by the MetaMask
official code and Lightly's benchmarks (``lightly.utils.benchmarking.knn_predict``): the bank is the
labelled training set, features are L2-normalised, each test sample takes its ``k`` most
cosine-similar bank samples, neighbour ``i`` votes for its label with weight ``exp(s_i / t)``, and
the class with the largest summed weight is predicted.

solo-learn's ``WeightedKNNClassifier`` additionally offers (and defaults to) a euclidean variant:
raw (un-normalised) features, the ``k`` nearest by euclidean distance ``d_i``, weight
``1 / (d_i + 1e-5)`` and no temperature; ``distance="euclidean"`` reproduces it.

``KNN_PRESETS`` names the (k, t) pairs used by common benchmarks (cosine distance), see
docs/algorithms.md §7.1; numbers measured with different presets are not comparable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["KNN_PRESETS", "knn_scores", "knn_predict", "knn_accuracy"]

#: Named (k, t) presets, all with cosine similarity and exp(sim / t) weights.
KNN_PRESETS: dict[str, tuple[int, float]] = {
    # Lightly CIFAR-10 benchmark (knn_k=200, knn_t=0.1), after the MoCo colab of InstDisc's kNN.
    "k200_t0.1": (200, 0.1),
    # k=20 as in solo-learn's WeightedKNNClassifier (k=20, T=0.07; its cosine option) and DINO's
    # eval_knn (k=20, T=0.07).  solo-learn's *default* distance is euclidean (temperature unused):
    # call knn_accuracy(..., k=20, distance="euclidean") for that variant.
    "k20_t0.07": (20, 0.07),
    # MetaMask official code: --knn_k 5 --knn_t 1.0.
    "k5_t1.0": (5, 1.0),
}

_EUCLIDEAN_EPS = 1e-5  # solo-learn's epsilon in 1 / (d + eps)
_CHUNK_ELEMENTS = 1 << 24  # similarity block of at most 16M floats (64 MiB) by default


def _check(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    k: int,
    t: float,
    distance: str,
) -> None:
    if train_feats.dim() != 2 or test_feats.dim() != 2:
        raise ValueError(f"features must be (N, D); got {tuple(train_feats.shape)} and {tuple(test_feats.shape)}")
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"feature dims differ: bank {train_feats.shape[1]} vs query {test_feats.shape[1]}")
    if train_labels.reshape(-1).numel() != train_feats.shape[0]:
        raise ValueError(f"{train_feats.shape[0]} bank features but {train_labels.numel()} labels")
    if train_feats.shape[0] == 0:
        raise ValueError("the kNN bank is empty")
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if distance not in ("cosine", "euclidean"):
        raise ValueError(f"distance must be 'cosine' or 'euclidean', got {distance!r}")
    if distance == "cosine" and not float(t) > 0:
        raise ValueError(f"temperature t must be > 0, got {t}")
    lo, hi = int(train_labels.min()), int(train_labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"bank labels must lie in [0, {num_classes}); found [{lo}, {hi}]")


def _chunks(train_feats, train_labels, test_feats, num_classes, k, t, chunk_size, distance):
    """Yield ``(start, scores)`` per block of test rows; scores are (rows, C), each row sums to 1."""
    _check(train_feats, train_labels, test_feats, num_classes, k, t, distance)
    bank = train_feats.float()
    labels = train_labels.reshape(-1).long().to(bank.device)
    if distance == "cosine":
        bank = F.normalize(bank, dim=1)
    n_bank, n_test = bank.shape[0], test_feats.shape[0]
    k = min(int(k), n_bank)  # a bank smaller than k: every bank sample votes
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // n_bank)
    chunk_size = int(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    for start in range(0, n_test, chunk_size):
        query = test_feats[start : start + chunk_size].to(bank.device).float()
        if distance == "cosine":
            sim = F.normalize(query, dim=1) @ bank.T
            top_sim, top_idx = sim.topk(k, dim=1)
            # exp(s / t) up to a per-row factor exp(-max_s / t): identical vote, no overflow at small t.
            weights = torch.exp((top_sim - top_sim[:, :1]) / t)
        else:
            dist = torch.cdist(query, bank)
            top_dist, top_idx = dist.topk(k, dim=1, largest=False)
            weights = 1.0 / (top_dist + _EUCLIDEAN_EPS)
        scores = torch.zeros(query.shape[0], num_classes, dtype=weights.dtype, device=bank.device)
        scores.scatter_add_(1, labels[top_idx], weights)
        yield start, scores / scores.sum(dim=1, keepdim=True)


@torch.no_grad()
def knn_scores(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    chunk_size: int | None = None,
    distance: str = "cosine",
) -> torch.Tensor:
    """Per-class vote ``(M, num_classes)``: summed neighbour weights, normalised to sum 1 per row.

    With ``distance="cosine"`` the weights are ``exp(sim / t)``; with ``"euclidean"``
    ``1 / (dist + 1e-5)`` (``t`` unused).  Computed on the bank's device in blocks of
    ``chunk_size`` query rows (default: a block of at most 2**24 similarities), so a 50k bank
    against 10k queries needs about 64 MiB of scratch memory.  ``k`` larger than the bank is clamped to the
    bank size.
    """
    out = torch.empty(test_feats.shape[0], num_classes, device=train_feats.device)
    for start, scores in _chunks(train_feats, train_labels, test_feats, num_classes, k, t, chunk_size, distance):
        out[start : start + scores.shape[0]] = scores
    return out


@torch.no_grad()
def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    chunk_size: int | None = None,
    distance: str = "cosine",
) -> torch.Tensor:
    """Predicted labels ``(M,)`` long: the arg-max of the weighted vote (see ``knn_scores``).

    Exact ties between classes go to the lowest class index (``torch.argmax``).
    """
    preds = torch.empty(test_feats.shape[0], dtype=torch.long, device=train_feats.device)
    for start, scores in _chunks(train_feats, train_labels, test_feats, num_classes, k, t, chunk_size, distance):
        preds[start : start + scores.shape[0]] = scores.argmax(dim=1)
    return preds


@torch.no_grad()
def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    chunk_size: int | None = None,
    distance: str = "cosine",
) -> float:
    """Top-1 accuracy of ``knn_predict`` on ``(test_feats, test_labels)`` as a fraction in [0, 1]."""
    test_labels = test_labels.reshape(-1)
    if test_labels.numel() != test_feats.shape[0]:
        raise ValueError(f"{test_feats.shape[0]} query features but {test_labels.numel()} labels")
    if test_labels.numel() == 0:
        raise ValueError("knn_accuracy: no query samples")
    preds = knn_predict(train_feats, train_labels, test_feats, num_classes, k, t, chunk_size, distance)
    return (preds == test_labels.to(preds.device).long()).float().mean().item()
