"""An exported metassl ResNet inside torchvision's segmentation and detection models (docs/dense_transfer.md).

``metassl export`` writes the backbone's plain ``state_dict``; for ``resnet18``/``resnet50``/``tv:resnet*``
it is torchvision's ResNet with ``fc = Identity`` (and, with the CIFAR stem, a 3x3 stride-1 ``conv1``
and no max-pool).  These builders assemble the same models as torchvision's own builders called
with ``weights=None, weights_backbone=None`` (e.g. ``fcn_resnet50``, ``deeplabv3_resnet50``,
``fasterrcnn_resnet50_fpn``; for depths torchvision has no builder for, the same assembly) and load
our weights into the backbone, strictly:

- :func:`segmentation_model`: ``IntermediateLayerGetter`` over the ResNet (``layer4`` -> ``out``,
  ``layer3`` -> ``aux``), an ``FCNHead`` or ``DeepLabHead``; Bottleneck ResNets get torchvision's
  dilated ``layer3``/``layer4`` (output stride 8), BasicBlock ones (18, 34) keep stride 32,
  since torchvision's BasicBlock has no dilation;
- :func:`detection_model`: ``resnet_fpn_backbone(weights=None)`` (FPN over ``layer1..4``) and
  ``FasterRCNN``; by default with frozen batch norm and the last 3 stages trainable, torchvision's
  setting for a pretrained backbone.

Nothing is downloaded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metassl.models.backbones import apply_cifar_stem

__all__ = ["read_exported_backbone", "resnet_arch", "exported_resnet", "segmentation_model", "detection_model"]

_STANDARD_RESNETS = {
    ((2, 2, 2, 2), False): "resnet18",
    ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50",
    ((3, 4, 23, 3), True): "resnet101",
    ((3, 8, 36, 3), True): "resnet152",
}
_SEG_HEADS = ("deeplabv3", "fcn")


def read_exported_backbone(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``state_dict`` written by ``metassl export`` (a path), or ``source`` itself (a mapping)."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise ValueError(f"exported backbone {str(path)!r} not found; write it with `metassl export --ckpt <run>/checkpoints/last.ckpt --out {path}`")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state_dict of tensors; write it with `metassl export`")
    return dict(state)


def _is_bottleneck(state: Mapping[str, torch.Tensor]) -> bool:
    return "layer1.0.conv3.weight" in state


def resnet_arch(state: Mapping[str, torch.Tensor]) -> str:
    """The torchvision name (``resnet18`` ... ``resnet152``) of an exported ResNet, from its block counts."""
    if not all(f"layer{i}.0.conv1.weight" in state for i in range(1, 5)) or "conv1.weight" not in state:
        raise ValueError(
            "the exported backbone is not a ResNet (no conv1 and layer1..layer4); torchvision's segmentation and "
            "detection models take ResNets: train with backbone=resnet18, resnet50 or tv:resnet34/101/152"
        )
    counts = tuple(len({m.group(1) for k in state if (m := re.match(rf"layer{i}\.(\d+)\.", k))}) for i in range(1, 5))
    width = state["layer1.0.conv1.weight"].shape[0]
    arch = _STANDARD_RESNETS.get((counts, _is_bottleneck(state)))
    if arch is None or width != 64:
        raise ValueError(f"blocks {counts} with layer1 width {width} are no standard ResNet; pass arch=<torchvision name> (e.g. wide_resnet50_2)")
    return arch


def _load(module: nn.Module, state: Mapping[str, torch.Tensor], arch: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise ValueError(f"the exported backbone does not fit torchvision's {arch} ({first[:200]}); pass the right arch=") from None


def exported_resnet(source: Any, arch: str | None = None, **resnet_kwargs: Any) -> nn.Module:
    """torchvision's ResNet ``arch`` (inferred when None) with ``fc = Identity``, the CIFAR stem
    where the export has one (3x3 ``conv1``), and the exported weights; ``resnet_kwargs`` go to
    the torchvision builder (``norm_layer``, ``replace_stride_with_dilation``)."""
    import torchvision

    state = read_exported_backbone(source)
    arch = arch or resnet_arch(state)
    model = torchvision.models.get_model(arch, weights=None, **resnet_kwargs)
    model.fc = nn.Identity()
    if state["conv1.weight"].shape[-1] == 3:
        apply_cifar_stem(model)
    _load(model, state, arch)
    return model


def _out_channels(layer: nn.Sequential) -> int:
    block = layer[-1]
    return (block.bn3 if hasattr(block, "bn3") else block.bn2).num_features


def segmentation_model(
    source: Any, num_classes: int, head: str = "deeplabv3", aux_loss: bool = False, arch: str | None = None
) -> nn.Module:
    """torchvision ``DeepLabV3`` or ``FCN`` on the exported ResNet; ``model(x)["out"]`` is
    ``(B, num_classes, H, W)`` (the input's size).  Inputs are normalised like the run's data."""
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3
    from torchvision.models.segmentation.fcn import FCN, FCNHead

    if head not in _SEG_HEADS:
        raise ValueError(f"unknown segmentation head {head!r}; choose one of: {', '.join(_SEG_HEADS)}")
    state = read_exported_backbone(source)
    arch = arch or resnet_arch(state)
    dilation = {"replace_stride_with_dilation": [False, True, True]} if _is_bottleneck(state) else {}
    resnet = exported_resnet(state, arch, **dilation)
    c3, c4 = _out_channels(resnet.layer3), _out_channels(resnet.layer4)
    return_layers = {"layer4": "out", **({"layer3": "aux"} if aux_loss else {})}
    body = IntermediateLayerGetter(resnet, return_layers=return_layers)
    aux = FCNHead(c3, num_classes) if aux_loss else None
    if head == "fcn":
        return FCN(body, FCNHead(c4, num_classes), aux)
    return DeepLabV3(body, DeepLabHead(c4, num_classes), aux)


def detection_model(
    source: Any, num_classes: int, arch: str | None = None, trainable_layers: int = 3, frozen_bn: bool = True,
    **faster_rcnn_kwargs: Any,
) -> nn.Module:
    """torchvision ``FasterRCNN`` with a ResNet-FPN backbone holding the exported weights.

    ``num_classes`` counts the background (torchvision's convention); ``trainable_layers`` (0-5)
    and ``frozen_bn`` as in torchvision's ``resnet_fpn_backbone``; ``faster_rcnn_kwargs`` go to
    ``FasterRCNN`` (``min_size``, ``max_size``, ``image_mean``, ``image_std``: pass the run's
    normalisation statistics and an image size near the training one).
    """
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    if not 0 <= int(trainable_layers) <= 5:
        raise ValueError(f"trainable_layers must be in [0, 5], got {trainable_layers}")
    state = read_exported_backbone(source)
    arch = arch or resnet_arch(state)
    backbone = resnet_fpn_backbone(
        backbone_name=arch, weights=None, norm_layer=FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d,
        trainable_layers=int(trainable_layers),
    )
    if state["conv1.weight"].shape[-1] == 3:
        apply_cifar_stem(backbone.body)  # the body keeps the ResNet's child names: conv1, maxpool
        backbone.body.conv1.requires_grad_(int(trainable_layers) == 5)
    _load(backbone.body, state, arch)
    return FasterRCNN(backbone, num_classes=num_classes, **faster_rcnn_kwargs)
