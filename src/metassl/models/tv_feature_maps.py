"""Feature maps for torchvision models: ``forward_features`` / ``forward_head`` (see
:mod:`metassl.models.feature_maps`) split each family's own ``forward`` at its global pool.

:func:`add_feature_maps` re-classes a model in place as a subclass of its torchvision class
that only adds methods: parameter names, the ``state_dict`` and ``isinstance`` checks are
those of torchvision (export loads strictly into the plain model), and the new ``forward``
runs the same operations in the same order as the torchvision one.

Families whose ``forward`` is one global pool after a convolutional trunk: ResNet (also
ResNeXt and Wide ResNet), RegNet, MobileNet v2 and v3, EfficientNet (v1, v2), ConvNeXt.  Others
(ViT, Swin, MaxViT: tokens or NHWC maps; VGG, AlexNet: a 7x7/6x6 pool before a dense
classifier; DenseNet, GoogLeNet, ...) are left as they are and refused by
:func:`~metassl.models.feature_maps.require_feature_maps`.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision import models as tvm

from metassl.models.feature_maps import FeatureMapForward

__all__ = ["add_feature_maps"]


class ResNetMaps(FeatureMapForward, tvm.ResNet):
    """torchvision ``ResNet._forward_impl``, split after ``layer4``."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(fmap), 1))


class RegNetMaps(FeatureMapForward, tvm.RegNet):
    """torchvision ``RegNet.forward``, split after ``trunk_output``."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk_output(self.stem(x))

    def forward_head(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.fc(self.avgpool(fmap).flatten(start_dim=1))


class MobileNetV2Maps(FeatureMapForward, tvm.MobileNetV2):
    """torchvision ``MobileNetV2._forward_impl``, split after ``features``."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(fmap, (1, 1)), 1))


class _PooledFeatures(FeatureMapForward):
    """``features -> avgpool -> flatten -> classifier`` (MobileNet v3, EfficientNet)."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(fmap), 1))


class MobileNetV3Maps(_PooledFeatures, tvm.MobileNetV3):
    """torchvision ``MobileNetV3._forward_impl``, split after ``features``."""


class EfficientNetMaps(_PooledFeatures, tvm.EfficientNet):
    """torchvision ``EfficientNet._forward_impl``, split after ``features``."""


class ConvNeXtMaps(FeatureMapForward, tvm.ConvNeXt):
    """torchvision ``ConvNeXt._forward_impl`` (its classifier flattens), split after ``features``."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(fmap))


_ADAPTERS: dict[type, type] = {
    tvm.ResNet: ResNetMaps,
    tvm.RegNet: RegNetMaps,
    tvm.MobileNetV2: MobileNetV2Maps,
    tvm.MobileNetV3: MobileNetV3Maps,
    tvm.EfficientNet: EfficientNetMaps,
    tvm.ConvNeXt: ConvNeXtMaps,
}


def add_feature_maps(model: nn.Module) -> bool:
    """In place: give a torchvision model of a supported family (exact class, not a user
    subclass whose ``forward`` may differ) ``forward_features`` / ``forward_head``.  Returns
    whether it did."""
    adapter = _ADAPTERS.get(type(model))
    if adapter is None:
        return False
    model.__class__ = adapter
    return True
