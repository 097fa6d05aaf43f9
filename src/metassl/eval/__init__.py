"""Offline evaluation on frozen features: extraction, weighted kNN and the linear probe.

Everything here takes a backbone (plus an optional feature transform) or precomputed features,
so any checkpoint, ours or exported, is evaluated the same way.  This package imports nothing of
Lightning and, of ``metassl``, only the torch-only model helpers (the feature-map contract, the
CIFAR stem) used by ``segment`` and ``transfer``.
"""

from metassl.eval.features import extract_features
from metassl.eval.knn import KNN_PRESETS, knn_accuracy, knn_predict, knn_scores
from metassl.eval.linear import LinearProbeResult, linear_probe, stratified_split

__all__ = [
    "KNN_PRESETS",
    "LinearProbeResult",
    "extract_features",
    "knn_accuracy",
    "knn_predict",
    "knn_scores",
    "linear_probe",
    "stratified_split",
]
