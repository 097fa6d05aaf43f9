"""Projection and prediction heads (MLPs) of the base methods.

A ``Linear`` that is followed by batch norm has no bias (the norm's shift makes it
redundant), as in the official SimSiam and Barlow Twins code.
"""

from __future__ import annotations

from torch import nn


def _block(in_dim: int, out_dim: int, *, bn: bool, relu: bool, bn_affine: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=bn_affine))
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return layers


class ProjectionHead(nn.Sequential):
    """MLP projector ``g`` of SimCLR (Chen et al., 2020, Sec. 2.1) and its descendants.

    ``num_layers - 1`` hidden blocks ``Linear -> [BN] -> ReLU`` of width ``hidden_dim``, then a
    final ``Linear -> out_dim`` with an optional batch norm (``last_bn``; ``last_bn_affine``
    False gives the parameter-free BN of SimSiam's projector).  ``hidden_bn=False`` gives the
    BN-free MLP of MoCo v2.  ``num_layers=1`` is a single linear map.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        num_layers: int = 2,
        last_bn: bool = False,
        *,
        hidden_bn: bool = True,
        last_bn_affine: bool = True,
    ) -> None:
        if num_layers < 1:
            raise ValueError(f"ProjectionHead needs num_layers >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers += _block(dim, hidden_dim, bn=hidden_bn, relu=True)
            dim = hidden_dim
        layers += _block(dim, out_dim, bn=last_bn, relu=False, bn_affine=last_bn_affine)
        super().__init__(*layers)
        self.in_dim, self.hidden_dim, self.out_dim, self.num_layers = in_dim, hidden_dim, out_dim, num_layers


class PredictionHead(ProjectionHead):
    """Predictor ``q`` of BYOL (Grill et al., 2020, Sec. 3.1) and SimSiam's ``h`` (Chen & He,
    2021, Sec. 4): ``Linear -> BN -> ReLU -> Linear`` (a bottleneck when ``hidden_dim`` is
    smaller than ``in_dim``, as SimSiam's 2048 -> 512 -> 2048)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__(in_dim, hidden_dim, out_dim, num_layers=2, last_bn=False)
