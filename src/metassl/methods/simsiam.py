"""SimSiam (Chen & He, 2021): a siamese network with a predictor and stop-gradient."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from metassl.losses import simsiam_loss
from metassl.methods.base import FeatureTransform, Method, check_views, encode_views, register_method
from metassl.models.heads import PredictionHead, ProjectionHead


@register_method("simsiam")
class SimSiam(Method):
    """SimSiam: projector of ``proj_num_layers`` layers of width 2048 with BN on every layer
    (the last BN without affine parameters, as the official code), a bottleneck predictor
    2048 -> 512 -> 2048, and ``(D(p1, sg(z2)) + D(p2, sg(z1))) / 2`` with ``D = -cos``
    (Eq. 4) on the first two views (further views are encoded but not in the loss).
    """

    augmentation = "simclr"

    def __init__(
        self,
        backbone: nn.Module,
        feat_dim: int,
        *,
        proj_hidden_dim: int = 2048,
        proj_output_dim: int = 2048,
        proj_num_layers: int = 3,
        pred_hidden_dim: int = 512,
    ) -> None:
        super().__init__(backbone, feat_dim)
        self.projector = ProjectionHead(
            feat_dim, proj_hidden_dim, proj_output_dim, num_layers=proj_num_layers, last_bn=True, last_bn_affine=False
        )
        self.predictor = PredictionHead(proj_output_dim, pred_hidden_dim, proj_output_dim)

    def forward(self, views: list[torch.Tensor], feature_transform: FeatureTransform | None = None) -> dict[str, Any]:
        check_views(views, self.name)
        out: dict[str, Any] = encode_views(self, views, feature_transform, self.projector)
        out["p"] = [self.predictor(z) for z in out["z"]]
        return out

    def loss(self, out: dict[str, Any]) -> torch.Tensor:
        p, z = out["p"], out["z"]
        return (simsiam_loss(p[0], z[1]) + simsiam_loss(p[1], z[0])) / 2
