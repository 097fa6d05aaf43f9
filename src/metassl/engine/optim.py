"""Encoder optimizers (SGD, LARS, AdamW) and the per-step learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from metassl.optimizers import LARS


def _is_excluded(name: str, param: nn.Parameter) -> bool:
    return param.ndim <= 1 or name.endswith(".bias")


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float, exclude_bias_and_norm: bool) -> list[dict[str, Any]]:
    """Two groups: decayed weights, and biases/norm parameters (no decay) when excluded."""
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        (no_decay if exclude_bias_and_norm and _is_excluded(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lars_exclude": True})
    return groups


def fused_supported(groups: list[dict[str, Any]]) -> bool:
    """Whether torch's fused (single-kernel) SGD/AdamW step can run on these parameters:
    every one floating point and on a device with fused kernels (CPU and CUDA here)."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    devices = set(_get_fused_kernels_supported_devices())
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.is_floating_point() and p.device.type in devices for p in params)


def build_optimizer(cfg: Mapping[str, Any], named_params: Iterable[tuple[str, nn.Parameter]], lr: float) -> torch.optim.Optimizer:
    """Encoder optimizer from the ``optimizer`` config section at learning rate ``lr``.

    SGD and AdamW use torch's fused step where the device has it (one kernel instead of a loop
    over parameters and operations; the same update up to rounding).  The state (SGD's
    ``momentum_buffer``, Adam's moments) is the usual one, so the bilevel regularizers'
    mirrored virtual step (:mod:`metassl.meta.virtual_step`) reads it as is.
    """
    groups = param_groups(named_params, cfg["weight_decay"], cfg["exclude_bias_and_norm"])
    name = cfg["name"]
    if name == "lars":
        return LARS(groups, lr=lr, momentum=cfg["momentum"], weight_decay=cfg["weight_decay"], eta=cfg["lars_eta"])
    for g in groups:
        g.pop("lars_exclude", None)
    fused = {"fused": True} if fused_supported(groups) else {}
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg["momentum"], weight_decay=cfg["weight_decay"], **fused)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg["weight_decay"], **fused)
    raise ValueError(f"unknown optimizer {name!r}; choose sgd, lars or adamw")


def lr_lambda(
    name: str, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0, milestones: Iterable[int] = (), decay: float = 0.1
):
    """Multiplier of the base lr at optimizer step ``s`` (linear warm-up, then cosine, constant,
    or ``multistep``: ``decay`` to the power of the number of ``milestones`` (optimizer steps) passed)."""
    total_steps = max(1, total_steps)
    milestones = sorted(int(m) for m in milestones)

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if name == "constant":
            return 1.0
        if name == "multistep":
            return decay ** sum(step >= m for m in milestones)
        start = warmup_steps if name == "warmup_cosine" else 0
        progress = min(1.0, (step - start) / max(1, total_steps - start))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
