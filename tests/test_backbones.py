"""Backbones and heads: feature sizes, CIFAR stem, export compatibility, clear errors."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from metassl.models.backbones import build_backbone
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
