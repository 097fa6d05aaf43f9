"""SimCLR (Chen et al., 2020): one encoder, an MLP projector and the NT-Xent loss."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from metassl.losses import nt_xent
from metassl.methods.base import FeatureTransform, Method, check_views, encode_views, register_method
from metassl.models.heads import ProjectionHead


@register_method("simclr")
class SimCLR(Method):
    """SimCLR: ``z = g(f(x))`` with a 2-layer MLP ``g`` (Linear-BN-ReLU-Linear), loss NT-Xent
    (Eq. 1) on the first two views (further views are encoded but not in the loss).

    Defaults: the paper's CIFAR-10 setting, temperature 0.5, projector 2048 -> 128.
    """

    augmentation = "simclr"

    def __init__(
        self,
        backbone: nn.Module,
        feat_dim: int,
        *,
        temperature: float = 0.5,
        proj_hidden_dim: int = 2048,
        proj_output_dim: int = 128,
    ) -> None:
        super().__init__(backbone, feat_dim)
        self.temperature = temperature
        self.projector = ProjectionHead(feat_dim, proj_hidden_dim, proj_output_dim, num_layers=2)

    def forward(self, views: list[torch.Tensor], feature_transform: FeatureTransform | None = None) -> dict[str, Any]:
        check_views(views, self.name)
        return encode_views(self, views, feature_transform, self.projector)

    def loss(self, out: dict[str, Any]) -> torch.Tensor:
        z = out["z"]
        return nt_xent(z[0], z[1], self.temperature)
