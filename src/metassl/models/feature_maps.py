"""The spatial feature-map contract of backbones.

A backbone *has feature maps* when it declares ``has_feature_maps = True`` and exposes

- ``forward_features(x) -> (B, C, H, W)``: everything up to the last spatial map;
- ``forward_head(fmap) -> (B, feat_dim)``: global pooling, flattening and whatever the
  backbone applies after them (its classifier is Identity here),

such that ``backbone(x)`` equals ``backbone.forward_head(backbone.forward_features(x))``.
The same two names as timm's models (``forward_head`` there also takes ``pre_logits``).
Regularizers that work on the map (e.g. MRCL's pixel reconstruction) call
:func:`require_feature_maps` once at setup and get one clear line otherwise.

The declaration is explicit because ``forward_features`` alone proves nothing: timm's ViTs
have one that returns tokens ``(B, N, D)``, and its Swin returns ``(B, H, W, C)``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FeatureMapForward", "supports_feature_maps", "require_feature_maps", "FEATURE_MAP_BACKBONES"]

#: the backbones that have feature maps, as the error message lists them
FEATURE_MAP_BACKBONES = (
    "convnet_small, resnet18/50, a tv: ResNet, RegNet, MobileNet v2/v3, EfficientNet or ConvNeXt, or a timm convnet"
)


class FeatureMapForward:
    """Mixin (before the model class in the bases): declares the contract and defines
    ``forward(x) = forward_head(forward_features(x))``, so the equality holds by construction."""

    has_feature_maps = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def supports_feature_maps(backbone: nn.Module) -> bool:
    """Whether ``backbone`` honours the contract (see module docstring)."""
    return (
        getattr(backbone, "has_feature_maps", False) is True
        and callable(getattr(backbone, "forward_features", None))
        and callable(getattr(backbone, "forward_head", None))
    )


def require_feature_maps(backbone: nn.Module, name: str | None = None) -> None:
    """Raise one clear ``ValueError`` line unless ``backbone`` has feature maps; ``name`` is the
    backbone's config name (default: the ``backbone_name`` that ``build_backbone`` records, else
    the class name)."""
    if not supports_feature_maps(backbone):
        if name is None:
            name = getattr(backbone, "backbone_name", None) or type(backbone).__name__
        raise ValueError(
            f"backbone {name!r} has no spatial feature map (forward_features -> (B, C, H, W)); use {FEATURE_MAP_BACKBONES}"
        )
