"""Momentum (EMA) target networks, shared by MoCo v2 and BYOL."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from metassl.methods.base import FeatureTransform, Method


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


class MomentumMethod(Method):
    """A method with a target encoder: an EMA copy of ``backbone + projector`` (MoCo's key
    encoder, He et al., 2020, Sec. 3.2; BYOL's target network, Grill et al., 2020, Sec. 3.1).

    A subclass builds ``self.projector``, then calls :meth:`init_target`.  The target runs
    under ``no_grad`` with the online branch's feature transform (:meth:`target_embed`), takes
    one EMA step per real optimizer step with momentum :func:`cosine_momentum` from
    ``momentum`` to ``final_momentum`` (:meth:`update_after_step`), and is not trainable.
    """

    #: the target submodules, excluded from :meth:`named_trainable_parameters`
    target_modules = ("target_backbone", "target_projector")

    def init_target(self, momentum: float, final_momentum: float) -> None:
        """Copy ``backbone`` and ``projector`` into the frozen ``target_backbone`` and
        ``target_projector``; set the momentum schedule."""
        self.momentum = momentum
        self.final_momentum = final_momentum
        self.target_backbone = make_target(self.backbone)
        self.target_projector = make_target(self.projector)

    @torch.no_grad()
    def target_embed(self, x: torch.Tensor, feature_transform: FeatureTransform | None = None) -> torch.Tensor:
        """Target projection of one view (no gradient, feature transform applied, detached)."""
        h = self.target_backbone(x).flatten(1)
        f = feature_transform(h).detach() if feature_transform is not None else h
        return self.target_projector(f)

    def current_momentum(self, progress: float) -> float:
        return cosine_momentum(self.momentum, self.final_momentum, progress)

    @torch.no_grad()
    def update_after_step(self, out: dict[str, Any], progress: float) -> None:
        """EMA of the target encoder with the scheduled momentum."""
        m = self.current_momentum(progress)
        ema_update_(self.target_backbone, self.backbone, m)
        ema_update_(self.target_projector, self.projector, m)

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in super().named_trainable_parameters() if n.partition(".")[0] not in self.target_modules]
