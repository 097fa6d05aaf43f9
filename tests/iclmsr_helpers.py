"""Shared helpers of the ICL-MSR tests (tests/test_iclmsr*.py): tiny networks, batches, steps."""

from __future__ import annotations

import torch
from torch import nn

from metassl.engine.step import encoder_objective
from metassl.methods import build_method
from metassl.regularizers import StepContext, build_regularizer

DT = torch.float64
FEAT = 6
N = 8


def tiny_backbone() -> nn.Module:
    """Conv -> BN -> Tanh -> global pool: (B, 3, 6, 6) -> (B, 6), smooth for finite differences."""
    return nn.Sequential(nn.Conv2d(3, FEAT, 3, padding=1), nn.BatchNorm2d(FEAT), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def tiny_method(method: str) -> nn.Module:
    kw = dict(proj_hidden_dim=8, proj_output_dim=5)
    if method == "moco_v2":
        kw.update(queue_size=16)
    if method in ("byol", "simsiam"):
        kw["pred_hidden_dim"] = 8
    return build_method(method, tiny_backbone(), FEAT, **kw)


def make(method: str = "simclr", dtype=torch.float32, seed: int = 0, **reg_kw):
    torch.manual_seed(seed)
    m = tiny_method(method)
    reg = build_regularizer("iclmsr", m, **{"num_prototypes": 4, "attention_dim": 3, "semantic_hidden_dim": 4, **reg_kw})
    return m.to(dtype), reg.to(dtype)


def batch(dtype=torch.float32, n=N, seed=1):
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(n, 3, 6, 6, generator=g).to(dtype) for _ in range(2)]
    return views, {"clean": torch.randn(n, 3, 6, 6, generator=g).to(dtype)}


def encoder_opt(m, reg, lr=0.2, momentum=0.9, wd=5e-4):
    return torch.optim.SGD(list(m.trainable_parameters()) + reg.encoder_parameters(), lr=lr, momentum=momentum, weight_decay=wd)


def real_backward(m, reg, opt, views, extras) -> StepContext:
    ctx = StepContext(method=m, views=views, extras=dict(extras), encoder_optimizer=opt, lr=opt.param_groups[0]["lr"])
    opt.zero_grad(set_to_none=True)
    loss, _, _ = encoder_objective(m, reg, views, None, ctx)
    loss.backward()
    return ctx


def randomize_semantic(reg, scale=0.3, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in reg.semantic.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
