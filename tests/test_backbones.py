"""Backbones and heads: feature sizes, CIFAR stem, spatial feature maps, export compatibility,
clear errors."""

from __future__ import annotations

import copy
import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from metassl.models.backbones import build_backbone
from metassl.models.feature_maps import require_feature_maps, supports_feature_maps
from metassl.models.heads import PredictionHead, ProjectionHead


def x(size=32, b=2):
    return torch.randn(b, 3, size, size)


# -- feature sizes ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,kw,size,dim",
    [
        ("convnet_small", {}, 32, 256),
        ("convnet_small", {"cifar_stem": False}, 96, 256),
        ("convnet_small", {"widths": (8, 8, 16, 32)}, 32, 32),
        ("resnet18", {"cifar_stem": True}, 32, 512),
        ("resnet18", {}, 64, 512),
        ("resnet50", {"cifar_stem": True}, 16, 2048),
        ("tv:resnet18", {}, 64, 512),
        ("tv:squeezenet1_1", {}, 64, 512),
        ("tv:mobilenet_v3_small", {}, 64, 1024),
    ],
)
def test_feature_dims(name, kw, size, dim):
    model, feat_dim = build_backbone(name, **kw)
    assert feat_dim == dim
    with torch.no_grad():
        assert model(x(size)).shape == (2, dim)


def test_convnet_small_is_small():
    model, _ = build_backbone("convnet_small")
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < 500_000
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 4
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 4


def test_timm_backbone():
    pytest.importorskip("timm")
    model, feat_dim = build_backbone("timm:resnet18", cifar_stem=True)
    assert feat_dim == 512
    with torch.no_grad():
        assert model(x(32)).shape == (2, 512)
    assert model.conv1.kernel_size == (3, 3) and isinstance(model.maxpool, nn.Identity)


# -- spatial feature maps: backbone(x) == forward_head(forward_features(x)) ----------------------
def _torchvision_class(model: nn.Module) -> type | None:
    return next((c for c in type(model).__mro__ if c.__module__.startswith("torchvision.")), None)


@pytest.mark.parametrize(
    "name,kw,size,fmap_shape",
    [
        ("convnet_small", {}, 32, (256, 4, 4)),
        ("convnet_small", {"cifar_stem": False}, 64, (256, 2, 2)),
        ("resnet18", {"cifar_stem": True}, 32, (512, 4, 4)),
        ("resnet18", {"cifar_stem": False}, 64, (512, 2, 2)),
        ("resnet50", {"cifar_stem": True}, 16, (2048, 2, 2)),
        ("tv:resnet18", {}, 64, (512, 2, 2)),
        ("tv:regnet_x_400mf", {}, 64, (400, 2, 2)),
        ("tv:mobilenet_v2", {}, 64, (1280, 2, 2)),
        ("tv:mobilenet_v3_small", {}, 64, (576, 2, 2)),
        ("tv:efficientnet_b0", {}, 64, (1280, 2, 2)),
        ("tv:convnext_tiny", {}, 64, (768, 2, 2)),
    ],
)
def test_feature_maps(name, kw, size, fmap_shape):
    model, feat_dim = build_backbone(name, **kw)
    assert supports_feature_maps(model)
    require_feature_maps(model, name)
    model.eval()  # no dropout / stochastic depth, so every pass is the same function
    inp = x(size)
    with torch.no_grad():
        fmap = model.forward_features(inp)
        assert fmap.shape == (2, *fmap_shape)
        flat = model(inp)
        assert flat.shape == (2, feat_dim)
        assert torch.equal(flat, model.forward_head(fmap))
        tv_class = _torchvision_class(model)
        if tv_class is not None:  # the split runs torchvision's own forward, operation for operation
            assert torch.equal(flat, tv_class.forward(model, inp))


def test_resnet_feature_maps_keep_the_torchvision_model():
    model, _ = build_backbone("resnet18", cifar_stem=True)
    assert isinstance(model, torchvision.models.ResNet)
    ref = torchvision.models.resnet18()
    ref.fc = nn.Identity()
    assert list(model.state_dict()) == list(ref.state_dict())  # same names, same order
    twin = copy.deepcopy(model)  # as the momentum methods copy their target
    assert type(twin) is type(model) and supports_feature_maps(twin)


def test_timm_feature_maps():
    pytest.importorskip("timm")
    model, feat_dim = build_backbone("timm:resnet18", cifar_stem=True)
    assert supports_feature_maps(model)
    model.eval()
    inp = x(32)
    with torch.no_grad():
        fmap = model.forward_features(inp)
        assert fmap.shape == (2, 512, 4, 4)
        assert torch.equal(model(inp), model.forward_head(fmap))
    vit, _ = build_backbone("timm:vit_tiny_patch16_224")  # tokens, not a spatial map
    assert not supports_feature_maps(vit)
    with pytest.raises(ValueError, match="'timm:vit_tiny_patch16_224' has no spatial feature map"):
        require_feature_maps(vit, "timm:vit_tiny_patch16_224")


def test_no_feature_maps_is_one_clear_line():
    squeeze, _ = build_backbone("tv:squeezenet1_1")  # a conv classifier, no split point kept
    assert not supports_feature_maps(squeeze)
    assert squeeze.backbone_name == "tv:squeezenet1_1"  # recorded by build_backbone for the message
    with pytest.raises(ValueError) as info:
        require_feature_maps(squeeze)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("backbone 'tv:squeezenet1_1' has no spatial feature map (forward_features -> (B, C, H, W)); use ")
    for option in ("convnet_small", "resnet18/50", "tv: ResNet", "timm convnet"):
        assert option in msg

    class Undeclared(nn.Module):  # forward_features alone does not promise a (B, C, H, W) map
        def forward_features(self, inp):
            return inp

        def forward_head(self, fmap):
            return fmap.flatten(1)

    assert not supports_feature_maps(Undeclared())
    with pytest.raises(ValueError, match="backbone 'Undeclared' has no spatial feature map"):
        require_feature_maps(Undeclared())


# -- CIFAR stem -----------------------------------------------------------------------------
def test_cifar_stem():
    model, _ = build_backbone("resnet18", cifar_stem=True)
    c = model.conv1
    assert (c.kernel_size, c.stride, c.padding, c.bias) == ((3, 3), (1, 1), (1, 1), None)
    assert isinstance(model.maxpool, nn.Identity) and isinstance(model.fc, nn.Identity)
    # spatial size is kept by the stem: 32 -> layer4 at 4x4 (vs 1x1 with the ImageNet stem)
    feats = {}

    def hook(module, inputs, output):
        feats["l4"] = output.shape

    model.layer4.register_forward_hook(hook)
    with torch.no_grad():
        model(x(32))
    assert feats["l4"][-2:] == (4, 4)


@pytest.mark.parametrize(
    "cifar_stem,input_size,expected",
    [(None, 32, True), (None, 64, True), (None, 96, False), (None, None, False), (True, 224, True), (False, 32, False)],
)
def test_cifar_stem_resolution(cifar_stem, input_size, expected):
    model, _ = build_backbone("resnet18", cifar_stem=cifar_stem, input_size=input_size)
    assert (model.conv1.kernel_size == (3, 3)) is expected
    small, _ = build_backbone("convnet_small", cifar_stem=cifar_stem, input_size=input_size)
    assert (small.features[0].stride == (1, 1)) is (expected or (cifar_stem is None and input_size is None))


def test_cifar_stem_on_a_model_without_one_is_an_error():
    with pytest.raises(ValueError, match="CIFAR stem"):
        build_backbone("tv:mobilenet_v3_small", cifar_stem=True)


# -- export: the state_dict loads into the matching torchvision model ---------------------------
@pytest.mark.parametrize("name,cifar_stem", [("resnet18", True), ("resnet18", False), ("resnet50", True)])
def test_state_dict_loads_into_torchvision(name, cifar_stem):
    model, _ = build_backbone(name, cifar_stem=cifar_stem)
    ref = getattr(torchvision.models, name)()
    ref.fc = nn.Identity()
    if cifar_stem:
        ref.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        ref.maxpool = nn.Identity()
    ref.load_state_dict(model.state_dict(), strict=True)
    model.eval()
    ref.eval()
    inp = x(32)
    with torch.no_grad():
        torch.testing.assert_close(ref(inp), model(inp))


# -- errors ---------------------------------------------------------------------------------
def test_offline_pretrained_is_one_clear_line(monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_network)
    with pytest.raises(RuntimeError) as info:
        build_backbone("resnet18", pretrained=True)
    msg = str(info.value)
    assert "\n" not in msg
    assert "could not download pretrained weights" in msg and "'resnet18'" in msg and "pretrained=false" in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_offline_pretrained_timm(monkeypatch):
    timm = pytest.importorskip("timm")

    def no_network(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", no_network)
    with pytest.raises(RuntimeError, match="could not download pretrained weights") as info:
        build_backbone("timm:resnet18", pretrained=True)
    assert "\n" not in str(info.value)


def test_unknown_names():
    with pytest.raises(ValueError) as info:
        build_backbone("resnet19")
    assert "\n" not in str(info.value)
    for option in ("convnet_small", "resnet18", "resnet50", "tv:", "timm:"):
        assert option in str(info.value)
    with pytest.raises(ValueError, match="unknown torchvision"):
        build_backbone("tv:not_a_model")
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_backbone("convnet_small", pretrained=True)


# -- heads ----------------------------------------------------------------------------------
def test_projection_head_layout():
    head = ProjectionHead(8, 16, 4, num_layers=3, last_bn=True)
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert all(m.bias is None for m in head if isinstance(m, nn.Linear))  # every Linear is followed by BN
    assert head(torch.randn(5, 8)).shape == (5, 4)

    mlp = ProjectionHead(8, 16, 4, hidden_bn=False)  # MoCo v2 head
    assert [type(m).__name__ for m in mlp] == ["Linear", "ReLU", "Linear"]
    assert mlp[0].bias is not None and mlp[2].bias is not None

    simsiam = ProjectionHead(8, 16, 4, num_layers=3, last_bn=True, last_bn_affine=False)
    assert simsiam[-1].weight is None
    assert [type(m).__name__ for m in ProjectionHead(8, 16, 4, num_layers=1)] == ["Linear"]
    with pytest.raises(ValueError):
        ProjectionHead(8, 16, 4, num_layers=0)


def test_prediction_head():
    head = PredictionHead(8, 3, 8)
    assert [type(m).__name__ for m in head] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert head[0].out_features == 3 and head[3].bias is not None
    assert head(torch.randn(4, 8)).shape == (4, 8)
