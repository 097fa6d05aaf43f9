"""What one timed configuration is (:class:`Variant`, :class:`Case`) and what every configuration
shares, metassl's and lightly's alike: the backbone, the batch of views, the precision context,
the optimizer settings and the step wrapper that makes a training step into ``step(i) -> loss``."""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

NUM_VIEWS = 2
#: SGD for every method on both sides (like for like; the mirrored MetaMask step needs SGD).  The
#: lr does not change the cost; it is small so that no configuration diverges in the timed steps
#: (VICReg with plain SGD at lr 0.06 does, and a skipped meta step on NaN would flatter the time).
DEFAULT_OPTIMIZER = {"name": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4, "exclude_bias_and_norm": True, "lars_eta": 0.02}


@dataclass
class Variant:
    precision: str  # fp32 | bf16
    channels_last: bool
    #: the backbone compiled in place with ``torch.compile`` (as ``trainer.compile=true``)
    compile: bool = False

    @property
    def label(self) -> str:
        return self.precision + (" + channels_last" if self.channels_last else "") + (" + compile" if self.compile else "")


@dataclass
class Case:
    impl: str  # metassl | lightly
    method: str
    regularizer: str
    variant: Variant
    step: Callable[[int], float] | None = None
    param_bytes: int = 0
    round_times: list[float] = field(default_factory=list)
    warmup_times: list[float] = field(default_factory=list)
    others_cores: list[float] = field(default_factory=list)
    disturbed_times: list[float] = field(default_factory=list)
    #: rounds (index) that ended with a non-finite loss: the step may take shortcuts then
    nonfinite_rounds: list[int] = field(default_factory=list)
    nonfinite_warmup: bool = False
    steps_per_round: int = 1
    mem_mb: float | None = None
    last_loss: float | None = None
    error: str | None = None

    @property
    def key(self) -> str:
        return f"{self.impl}:{self.method}+{self.regularizer}@{self.variant.label}"


def error_text(err: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` (at most ``limit`` characters of it), for tables."""
    return f"{type(err).__name__}: {str(err).splitlines()[0][:limit] if str(err) else ''}"


def preset(group: str, name: str) -> dict[str, Any]:
    """Hyper-parameters of a method/regularizer preset (without ``name``); {} if none."""
    try:
        from omegaconf import OmegaConf

        from metassl.config import load_config

        cfg = load_config([f"{group}={name}"])
        section = OmegaConf.to_container(cfg[group], resolve=True)
        return {k: v for k, v in section.items() if k != "name"}
    except Exception:  # noqa: BLE001 - no preset: the class defaults
        return {}


def method_hparams(name: str) -> dict[str, Any]:
    """The method's constructor defaults overridden by its preset."""
    from metassl.methods import method_hparams as defaults

    values = dict(defaults(name))
    values.update(preset("method", name))
    return values


def seeded_backbone(args: argparse.Namespace) -> tuple[nn.Module, int]:
    """A fresh ``args.backbone`` (seeded with ``args.seed``: every configuration starts alike)."""
    from metassl.models.backbones import build_backbone

    torch.manual_seed(args.seed)
    return build_backbone(args.backbone, cifar_stem=None, input_size=args.image_size)


def scaled_lr(args: argparse.Namespace) -> float:
    return DEFAULT_OPTIMIZER["lr"] * args.batch / 256


def param_bytes(*modules: nn.Module) -> int:
    seen, total = set(), 0
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def make_views(args: argparse.Namespace, variant: Variant) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The batch every step of every configuration sees: ``NUM_VIEWS`` random views + labels."""
    g = torch.Generator().manual_seed(args.seed + 1)
    views = [torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g) for _ in range(NUM_VIEWS)]
    labels = torch.randint(0, 10, (args.batch,), generator=g)
    views = [v.to(args.device) for v in views]
    if variant.channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    return views, labels.to(args.device)


def _autocast(device: str, variant: Variant):
    if variant.precision == "bf16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def timed_step(args: argparse.Namespace, variant: Variant, body: Callable[[int], Any]) -> Callable[[int], float]:
    """``step(i) -> loss``: ``body(i)`` (one training step returning its loss) under the variant's
    precision, then a device synchronisation so that the step's time is all spent when it returns."""

    def step(i: int) -> float:
        with _autocast(args.device, variant):
            loss = body(i)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return float(loss)

    return step
