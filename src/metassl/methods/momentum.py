"""Momentum (EMA) target networks, shared by MoCo v2 and BYOL."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def make_target(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters do not require gradient."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


def cosine_momentum(base: float, final: float, progress: float) -> float:
    """BYOL's schedule (Grill et al., 2020, Sec. 3.2):
    ``final - (final - base) * (cos(pi * progress) + 1) / 2``; ``base`` at progress 0,
    ``final`` at progress 1, constant when ``base == final``."""
    progress = min(max(float(progress), 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """In place, for every parameter: ``target = momentum * target + (1 - momentum) * online``.
    Buffers (batch-norm running statistics) are not averaged: the target keeps its own."""
    t_params = list(target.parameters())
    o_params = list(online.parameters())
    if len(t_params) != len(o_params):
        raise ValueError("target and online networks have different parameters")
    torch._foreach_lerp_(t_params, [p.detach() for p in o_params], 1.0 - momentum)
