"""VICReg (Bardes et al., 2022): variance-invariance-covariance regularisation."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from metassl.losses import vicreg_loss
from metassl.methods.base import FeatureTransform, Method, check_views, encode_views, register_method
from metassl.models.heads import ProjectionHead


@register_method("vicreg")
class VICReg(Method):
    """VICReg: a 3-layer expander (Linear-BN-ReLU x2, Linear) and the weighted sum of
    invariance, variance and covariance terms (weights 25/25/1) on the first two views
    (further views are encoded but not in the loss).

    Expander width 2048 is the common CIFAR choice; the paper uses 8192 on ImageNet.
    """

    augmentation = "byol"

    def __init__(
        self,
        backbone: nn.Module,
        feat_dim: int,
        *,
        sim_weight: float = 25.0,
        var_weight: float = 25.0,
        cov_weight: float = 1.0,
        proj_hidden_dim: int = 2048,
        proj_output_dim: int = 2048,
    ) -> None:
        super().__init__(backbone, feat_dim)
        self.sim_weight, self.var_weight, self.cov_weight = sim_weight, var_weight, cov_weight
        self.projector = ProjectionHead(feat_dim, proj_hidden_dim, proj_output_dim, num_layers=3)

    def forward(self, views: list[torch.Tensor], feature_transform: FeatureTransform | None = None) -> dict[str, Any]:
        check_views(views, self.name)
        return encode_views(self, views, feature_transform, self.projector)

    def loss(self, out: dict[str, Any]) -> torch.Tensor:
        z = out["z"]
        return vicreg_loss(z[0], z[1], self.sim_weight, self.var_weight, self.cov_weight)
