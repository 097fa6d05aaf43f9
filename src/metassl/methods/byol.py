"""BYOL (Grill et al., 2020): online network with predictor regresses an EMA target."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from metassl.losses import byol_loss
from metassl.methods.base import FeatureTransform, check_views, encode_views, register_method
from metassl.methods.momentum import MomentumMethod
from metassl.models.heads import PredictionHead, ProjectionHead


@register_method("byol")
class BYOL(MomentumMethod):
    """BYOL: online ``backbone -> projector (Linear-BN-ReLU-Linear, 4096 -> 256) ->
    predictor (4096 -> 256)``; the target is an EMA copy of backbone + projector.

    - Loss (Eq. 2 and its symmetrisation): ``byol_loss(p1, z'2) + byol_loss(p2, z'1)``, the
      *sum* of both directions as in the paper, on the first two views (further views are
      encoded but not in the loss).
    - The target runs under ``no_grad`` on every view and sees the same feature transform
      as the online branch (its output detached).
    - EMA momentum ``tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2`` (Sec. 3.2) from
      ``momentum`` to ``final_momentum``.  Default base 0.99, the common CIFAR choice; the
      paper's ImageNet setting is 0.996.
    """

    augmentation = "byol"

    def __init__(
        self,
        backbone: nn.Module,
        feat_dim: int,
        *,
        proj_hidden_dim: int = 4096,
        proj_output_dim: int = 256,
        pred_hidden_dim: int = 4096,
        momentum: float = 0.99,
        final_momentum: float = 1.0,
    ) -> None:
        super().__init__(backbone, feat_dim)
        self.projector = ProjectionHead(feat_dim, proj_hidden_dim, proj_output_dim, num_layers=2)
        self.predictor = PredictionHead(proj_output_dim, pred_hidden_dim, proj_output_dim)
        self.init_target(momentum, final_momentum)

    def forward(self, views: list[torch.Tensor], feature_transform: FeatureTransform | None = None) -> dict[str, Any]:
        check_views(views, self.name)
        out: dict[str, Any] = encode_views(self, views, feature_transform, self.projector)
        out["p"] = [self.predictor(z) for z in out["z"]]
        out["z_target"] = [self.target_embed(x, feature_transform) for x in views]
        return out

    def loss(self, out: dict[str, Any]) -> torch.Tensor:
        p, zt = out["p"], out["z_target"]
        return byol_loss(p[0], zt[1]) + byol_loss(p[1], zt[0])
