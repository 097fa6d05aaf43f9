"""Shared helpers of the MetAug tests (tests/test_metaug*.py): tiny networks, views, contexts."""

from __future__ import annotations

import torch
from torch import nn

from metassl.methods import build_method
from metassl.regularizers import StepContext, build_regularizer

DT = torch.float64
FEAT = 6


def tiny_backbone() -> nn.Module:
    """Conv -> BN -> Tanh -> global pool: (B, 3, 6, 6) -> (B, 6), smooth for finite differences."""
    return nn.Sequential(nn.Conv2d(3, FEAT, 3, padding=1), nn.BatchNorm2d(FEAT), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def make(method: str = "simclr", dtype=torch.float32, seed: int = 0, **reg_kw):
    torch.manual_seed(seed)
    kw = dict(proj_hidden_dim=8, proj_output_dim=5)
    if method == "moco_v2":
        kw["queue_size"] = 16
    if method in ("byol", "simsiam"):
        kw["pred_hidden_dim"] = 8
    m = build_method(method, tiny_backbone(), FEAT, **kw)
    reg = build_regularizer("metaug", m, **{"generator_hidden_dim": 8, **reg_kw})
    return m.to(dtype), reg.to(dtype)


def views_for(dtype=torch.float32, n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    v0 = torch.randn(n, 3, 6, 6, generator=g)
    return [v0.to(dtype), (0.7 * v0 + 0.7 * torch.randn(n, 3, 6, 6, generator=g)).to(dtype)]


def encoder_opt(m, lr=0.1):
    return torch.optim.SGD(m.trainable_parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)


def context(m, opt, views) -> StepContext:
    return StepContext(method=m, views=views, encoder_optimizer=opt, lr=opt.param_groups[0]["lr"])
