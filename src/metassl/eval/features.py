"""Frozen-feature extraction for offline evaluation (kNN, linear probe).

A backbone (plus an optional feature transform such as MetaMask's learned mask) is run once
over a labelled loader in eval mode and without gradients; the flattened float32 features and
long labels are returned, so any checkpoint (ours or exported) evaluates the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["extract_features"]


def _split_batch(batch: Any) -> tuple[Any, Any]:
    """``(x, y)`` from a batch ``(x, y)`` or ``(x, y, *rest)`` (e.g. a dataset index)."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(
        "extract_features expects the loader to yield (x, y) or (x, y, *rest) sequences; "
        f"got {type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )


def _training_flags(modules: Iterable[nn.Module]) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for root in modules for m in root.modules()]


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    loader: Iterable[Any],
    feature_transform: nn.Module | Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    normalize: bool = False,
    *,
    out_device: torch.device | str | None = None,
    channels_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``(N, D)`` float32 and labels ``(N,)`` long of every sample in ``loader``.

    Protocol (as in the kNN/linear evaluation of InstDisc, MoCo, solo-learn and Lightly): the
    backbone runs in eval mode (batch-norm uses running statistics, dropout off) under
    ``torch.no_grad``; ``feature_transform`` is applied to the backbone output exactly as it
    comes out (as the training step sees it), then the result is flattened to ``(B, D)``.

    Args:
        backbone: the network; it is *not* moved — put it on ``device`` first.
        loader: yields ``(x, y)`` or ``(x, y, *rest)``; ``x`` is moved to ``device``.
        feature_transform: optional ``nn.Module`` or callable on the backbone output (also put
            on ``device`` by the caller); switched to eval mode too if it is a module.
        device: where the forward passes run.
        autocast_dtype: e.g. ``torch.bfloat16`` to run the forward under ``torch.autocast``;
            features are cast back to float32.
        normalize: L2-normalise each feature row.
        out_device: where the returned tensors live; defaults to ``device``.
        channels_last: pass 4-D inputs in channels-last memory format (pair it with a
            channels-last backbone and bf16 autocast for the fast CPU/GPU kernels).

    The training flag of every submodule of ``backbone`` and ``feature_transform`` is restored
    afterwards (also when an exception is raised), so a deliberately frozen BN stays frozen.
    """
    device = torch.device(device)
    out_device = device if out_device is None else torch.device(out_device)
    roots = [backbone] + ([feature_transform] if isinstance(feature_transform, nn.Module) else [])
    saved = _training_flags(roots)
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    try:
        for root in roots:
            root.eval()
        for batch in loader:
            x, y = _split_batch(batch)
            x = x.to(device, non_blocking=True)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            ctx = (
                torch.autocast(device_type=device.type, dtype=autocast_dtype)
                if autocast_dtype is not None
                else contextlib.nullcontext()
            )
            with ctx:
                h = backbone(x)
                if feature_transform is not None:
                    h = feature_transform(h)
            h = h.float().flatten(1)
            if normalize:
                h = F.normalize(h, dim=1)
            feats.append(h.to(out_device))
            labels.append(torch.as_tensor(y).reshape(-1).long().to(out_device))
            if labels[-1].numel() != feats[-1].shape[0]:
                raise ValueError(f"batch has {feats[-1].shape[0]} samples but {labels[-1].numel()} labels")
    finally:
        for module, flag in saved:  # set the attribute directly: exact, no recursion, no overrides
            module.training = flag
    if not feats:
        raise ValueError("extract_features: the loader yielded no batches")
    return torch.cat(feats), torch.cat(labels)
