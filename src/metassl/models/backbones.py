"""Backbones that map images to flat features ``(B, feat_dim)``.

``build_backbone(name, cifar_stem=None, pretrained=False, **kw)`` accepts:

- ``resnet18``, ``resnet50``: torchvision ResNets (He et al., 2016) with ``fc = Identity``;
  the CIFAR stem replaces ``conv1`` by a 3x3 stride-1 convolution and drops the max-pool
  (the CIFAR variant of SimCLR, Chen et al., 2020, App. B.9).  The module *is* the
  torchvision model (re-classed as a subclass that only adds the feature-map methods), so
  its ``state_dict`` loads strictly into
  ``torchvision.models.resnet18()`` with the same two changes (export relies on this);
- ``convnet_small``: a 4-block CNN for quick CPU work at 32x32 (256 features);
- ``tv:<name>``: any torchvision classification model, classifier replaced by Identity;
- ``timm:<name>``: any timm model (if timm is installed), built with ``num_classes=0``.

Backbones that can also expose their last spatial map, ``forward_features(x) -> (B, C, H, W)``
and ``forward_head(fmap) -> (B, feat_dim)`` with ``backbone(x) == forward_head(forward_features(x))``
(see :mod:`metassl.models.feature_maps`): ``convnet_small``, the ResNets, the ``tv:`` families of
:mod:`metassl.models.tv_feature_maps`, and ``timm:`` models whose ``forward_features`` returns an
NCHW map (convnets; not ViTs).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from metassl.models.feature_maps import FeatureMapForward

__all__ = ["build_backbone", "ConvNetSmall", "apply_cifar_stem", "BACKBONE_NAMES"]

BACKBONE_NAMES = ("convnet_small", "resnet18", "resnet50", "tv:<torchvision model>", "timm:<timm model>")


class ConvNetSmall(FeatureMapForward, nn.Module):
    """A small, fast CNN: four ``conv3x3 -> BN -> ReLU`` blocks, 2x2 max-pool after the first
    three, global average pooling.  At 32x32 with the default widths it costs about 15 MMAC
    per image (ResNet-18 with the CIFAR stem: about 560 MMAC).

    ``cifar_stem=False`` (images larger than 64 px) makes the first convolution stride 2 and
    adds a max-pool after it, so the feature maps are 4x smaller.
    """

    def __init__(self, widths: Sequence[int] = (32, 64, 128, 256), cifar_stem: bool = True, in_channels: int = 3) -> None:
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"convnet_small has 4 blocks; got widths={tuple(widths)}")
        layers: list[nn.Module] = []
        c = in_channels
        for i, w in enumerate(widths):
            stride = 2 if (i == 0 and not cifar_stem) else 1
            layers += [nn.Conv2d(c, w, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i == 0 and not cifar_stem:
                layers.append(nn.MaxPool2d(2))  # ImageNet-like stem: 4x downsampling overall
            if i < 3:
                layers.append(nn.MaxPool2d(2))
            c = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = c
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.pool(fmap).flatten(1)


def apply_cifar_stem(model: nn.Module) -> nn.Module:
    """In place: ``conv1`` -> 3x3 stride 1 padding 1 without bias, ``maxpool`` -> Identity
    (works for torchvision and timm ResNets)."""
    if not supports_cifar_stem(model):
        raise ValueError(f"the CIFAR stem needs a ResNet-like model with conv1 and maxpool; {type(model).__name__} has none")
    old = model.conv1
    model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def supports_cifar_stem(model: nn.Module) -> bool:
    return isinstance(getattr(model, "conv1", None), nn.Conv2d) and hasattr(model, "maxpool")


def _resolve_stem(cifar_stem: bool | None, input_size: int | None, pretrained: bool, default: bool) -> bool:
    """``None``: CIFAR stem for inputs of at most 64 px, unless pretrained weights (whose
    stem would be discarded) are loaded; ``default`` when the input size is unknown."""
    if cifar_stem is not None:
        return bool(cifar_stem)
    if pretrained:
        return False
    if input_size is None:
        return default
    return input_size <= 64


def _offline_error(name: str, err: BaseException, where: str) -> RuntimeError:
    first = (str(err).strip().splitlines() or [""])[0][:200]
    return RuntimeError(
        f"could not download pretrained weights for backbone {name!r} ({type(err).__name__}: {first}); "
        f"without network access put the weights in {where} or use pretrained=false"
    )


def _strip_torchvision_head(model: nn.Module, num_classes: int) -> None:
    """Replace the classifier of a torchvision model by Identity, in place."""
    if isinstance(getattr(model, "fc", None), nn.Linear):
        model.fc = nn.Identity()
        return
    last = None
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last = (mod_name, mod)
    if last is not None and last[1].out_features == num_classes:
        parent_name, _, child = last[0].rpartition(".")
        setattr(model.get_submodule(parent_name), child, nn.Identity())
        return
    if last is None and isinstance(getattr(model, "classifier", None), nn.Sequential):
        model.classifier = nn.AdaptiveAvgPool2d(1)  # SqueezeNet: a conv classifier, then pooling
        return
    raise ValueError(f"cannot find the classification head of torchvision model {type(model).__name__}")


@torch.no_grad()
def _probe_dim(model: nn.Module, size: int | tuple[int, int, int]) -> int:
    shape = (3, size, size) if isinstance(size, int) else tuple(size)
    was_training = model.training
    model.eval()
    try:
        out = model(torch.zeros(1, *shape, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
    return out.flatten(1).shape[1]


def _torchvision(name: str, arch: str, cifar_stem: bool | None, pretrained: bool, input_size: int | None, kw: dict[str, Any]):
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if arch not in available:
        raise ValueError(
            f"unknown torchvision classification model {arch!r} in backbone {name!r}; "
            "see torchvision.models.list_models(module=torchvision.models)"
        )
    if arch in ("googlenet", "inception_v3"):
        kw.setdefault("aux_logits", False)
        if not pretrained:
            kw.setdefault("init_weights", True)
    weights = None
    if pretrained:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        model = torchvision.models.get_model(arch, weights=weights, **kw)
    except OSError as err:  # URLError, socket and SSL errors, ConnectionError
        raise _offline_error(name, err, f"{torch.hub.get_dir()}/checkpoints/") from None
    except RuntimeError as err:
        if "hash" in str(err).lower():
            raise _offline_error(name, err, f"{torch.hub.get_dir()}/checkpoints/") from None
        raise

    num_classes = len(weights.meta["categories"]) if weights is not None else kw.get("num_classes", 1000)
    feat_dim = model.fc.in_features if isinstance(getattr(model, "fc", None), nn.Linear) else None
    _strip_torchvision_head(model, num_classes)
    if _resolve_stem(cifar_stem, input_size, pretrained, default=False):
        apply_cifar_stem(model)
    from metassl.models.tv_feature_maps import add_feature_maps

    add_feature_maps(model)
    if feat_dim is None:
        feat_dim = _probe_dim(model, kw.get("image_size", 224))
    return model, feat_dim


def _timm(name: str, arch: str, cifar_stem: bool | None, pretrained: bool, input_size: int | None, kw: dict[str, Any]):
    try:
        import timm
    except ImportError:
        raise ImportError(f"backbone {name!r} needs timm: pip install 'metassl[timm]'") from None
    if not timm.is_model(arch):
        raise ValueError(f"unknown timm model {arch!r} in backbone {name!r}; see timm.list_models()")
    try:
        model = timm.create_model(arch, pretrained=pretrained, num_classes=0, **kw)
    except OSError as err:  # huggingface_hub / urllib offline errors are OSErrors
        raise _offline_error(name, err, "the Hugging Face cache (HF_HOME) or a local file via pretrained_cfg_overlay") from None
    if _resolve_stem(cifar_stem, input_size, pretrained, default=False):
        apply_cifar_stem(model)
    size = model.pretrained_cfg.get("input_size", (3, 224, 224)) if hasattr(model, "pretrained_cfg") else 224
    feat_dim, nchw = _probe_timm(model, size)
    model.has_feature_maps = nchw  # the feature-map contract; timm's forward is forward_head(forward_features(x))
    return model, feat_dim


@torch.no_grad()
def _probe_timm(model: nn.Module, size: int | tuple[int, int, int]) -> tuple[int, bool]:
    """Feature size, and whether ``forward_features`` gives an NCHW map (convnets) rather than
    tokens (ViTs) or NHWC maps (Swin), from one ``forward_head(forward_features(x))`` pass."""
    shape = (3, size, size) if isinstance(size, int) else tuple(size)
    was_training = model.training
    model.eval()
    try:
        fmap = model.forward_features(torch.zeros(1, *shape, device=next(model.parameters()).device))
        out = model.forward_head(fmap)
    finally:
        model.train(was_training)
    nchw = fmap.dim() == 4 and str(getattr(model, "output_fmt", "NCHW")) == "NCHW"
    return out.flatten(1).shape[1], nchw


def build_backbone(
    name: str,
    cifar_stem: bool | None = None,
    pretrained: bool = False,
    *,
    input_size: int | None = None,
    **kw: Any,
) -> tuple[nn.Module, int]:
    """Build a backbone by name; returns ``(module, feat_dim)``, the module mapping
    ``(B, C, H, W)`` images to ``(B, feat_dim)`` features.

    ``cifar_stem``: True/False, or None to decide from ``input_size`` (CIFAR stem for
    images of at most 64 px; without ``input_size``: on for ``convnet_small``, off for the
    ResNets; never implied when ``pretrained`` weights are loaded).  ``pretrained``
    downloads ImageNet weights (torchvision ``DEFAULT`` weights or timm's); offline it
    fails with one line saying where to put the file.  Extra ``kw`` go to the model
    constructor (e.g. ``zero_init_residual=True``, ``widths=(...)`` for convnet_small).
    """
    kw = dict(kw)
    if name == "convnet_small":
        if pretrained:
            raise ValueError("backbone 'convnet_small' has no pretrained weights; use pretrained=false")
        model = ConvNetSmall(cifar_stem=_resolve_stem(cifar_stem, input_size, False, default=True), **kw)
        built = model, model.out_dim
    elif name in ("resnet18", "resnet50"):
        built = _torchvision(name, name, cifar_stem, pretrained, input_size, kw)
    elif name.startswith("tv:"):
        built = _torchvision(name, name[3:], cifar_stem, pretrained, input_size, kw)
    elif name.startswith("timm:"):
        built = _timm(name, name[5:], cifar_stem, pretrained, input_size, kw)
    else:
        raise ValueError(f"unknown backbone {name!r}; options: {', '.join(BACKBONE_NAMES)}")
    built[0].backbone_name = name  # a plain attribute (not in the state_dict), for error messages
    return built
