"""Barlow Twins (Zbontar et al., 2021): redundancy reduction on the cross-correlation."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from metassl.losses import barlow_twins_loss
from metassl.methods.base import FeatureTransform, Method, check_views, encode_views, register_method
from metassl.models.heads import ProjectionHead


@register_method("barlow_twins")
class BarlowTwins(Method):
    """Barlow Twins: a 3-layer projector (Linear-BN-ReLU x2, Linear) and the loss of Eq. 1
    with ``lambd = 0.0051`` (official code; 5e-3 in the paper) on the first two views
    (further views are encoded but not in the loss).

    Projector width 2048 is the common CIFAR choice; the paper uses 8192 on ImageNet.
    """

    augmentation = "byol"

    def __init__(
        self,
        backbone: nn.Module,
        feat_dim: int,
        *,
        lambd: float = 0.0051,
        proj_hidden_dim: int = 2048,
        proj_output_dim: int = 2048,
    ) -> None:
        super().__init__(backbone, feat_dim)
        self.lambd = lambd
        self.projector = ProjectionHead(feat_dim, proj_hidden_dim, proj_output_dim, num_layers=3)

    def forward(self, views: list[torch.Tensor], feature_transform: FeatureTransform | None = None) -> dict[str, Any]:
        check_views(views, self.name)
        return encode_views(self, views, feature_transform, self.projector)

    def loss(self, out: dict[str, Any]) -> torch.Tensor:
        z = out["z"]
        return barlow_twins_loss(z[0], z[1], lambd=self.lambd)
