"""The regularizer protocol: a plug-in over any base method.

A regularizer may own parameters of two kinds:

- *encoder parameters* (e.g. MetaMask's Barlow-Twins projector) are trained together with
  the method by the encoder optimizer;
- *meta parameters* (e.g. MetaMask's mask logits, MetAug's generators) have their own
  optimizer and scheduler and are trained by ``meta_step`` (bilevel regularizers only).

The engine calls, per training step::

    out   = method(views, feature_transform=reg.transform_features)
    terms = {"base": reg.base_weight * method.loss(out), **reg.extra_loss(out, method, batch)}
    backward(sum(terms))
    reg.before_encoder_step(ctx)       # grads of the encoder objective are in .grad
    encoder_optimizer.step()
    if reg.bilevel:
        meta_optimizer.zero_grad(); reg.meta_step(ctx); meta_optimizer.step()
    method.update_after_step(out, progress)

A regularizer knows this protocol and the meta engine, never a concrete method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from metassl.methods.base import Method, keyword_parameters


@dataclass
class StepContext:
    """What a regularizer may read during one training step."""

    method: Method
    views: list[torch.Tensor]
    out: dict[str, Any]
    labels: torch.Tensor | None
    #: the real (unwrapped) ``torch.optim.Optimizer`` of the encoder
    encoder_optimizer: torch.optim.Optimizer
    #: the encoder's current learning rate (first param group)
    lr: float
    #: fraction of training done, in [0, 1]
    progress: float
    global_step: int
    #: torch.distributed is initialised and world size > 1
    distributed: bool = False
    #: free-form stash a regularizer may fill in ``before_encoder_step`` and read in ``meta_step``
    cache: dict[str, Any] = field(default_factory=dict)


class Regularizer(nn.Module):
    """Base class; the identity regularizer (``regularizer=none``) is this class as is."""

    name: ClassVar[str] = "none"
    #: True if the regularizer has meta parameters trained by ``meta_step``
    bilevel: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.base_weight: float = 1.0

    def setup(self, method: Method) -> None:
        """Called once with the built method (to size own heads from ``method.feat_dim``)."""

    # -- training hooks -----------------------------------------------------------------
    def transform_features(self, h: torch.Tensor) -> torch.Tensor:
        """Applied to backbone features before every projector (training)."""
        return h

    def eval_transform(self) -> nn.Module | None:
        """Feature transform used for evaluation when ``eval.features=transformed``."""
        return None

    def extra_loss(self, out: dict[str, Any], method: Method, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Named terms added to the encoder objective."""
        return {}

    def before_encoder_step(self, ctx: StepContext) -> None:
        """Gradients of the encoder objective are in ``.grad``; the optimizer has not stepped."""

    def meta_step(self, ctx: StepContext) -> dict[str, float]:
        """Fill ``.grad`` of ``meta_parameters()``; the engine then steps the meta optimizer.

        Returns scalar statistics to log."""
        return {}

    # -- parameters and optimizers -------------------------------------------------------
    def encoder_parameters(self) -> list[nn.Parameter]:
        """Own parameters trained with the encoder optimizer."""
        meta = {id(p) for p in self.meta_parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in meta]

    def meta_parameters(self) -> list[nn.Parameter]:
        return []

    def configure_meta_optimizer(self, total_steps: int):
        """``(optimizer, scheduler_or_None)`` for the meta parameters (bilevel only)."""
        return None

    # -- reporting -----------------------------------------------------------------------
    def log_stats(self) -> dict[str, float]:
        """Scalars logged every step (e.g. mask statistics)."""
        return {}

    def on_train_end(self, output_dir: Path) -> None:
        """Write plots or files at the end of training."""


REGULARIZERS: dict[str, type[Regularizer]] = {"none": Regularizer}


def register_regularizer(name: str):
    """Class decorator: make a regularizer available by ``name``."""

    def wrap(cls: type[Regularizer]) -> type[Regularizer]:
        if name in REGULARIZERS:
            raise ValueError(f"regularizer {name!r} registered twice")
        cls.name = name
        REGULARIZERS[name] = cls
        return cls

    return wrap


def regularizer_hparams(name: str) -> dict[str, Any]:
    if name not in REGULARIZERS:
        raise KeyError(f"unknown regularizer {name!r}; available: {', '.join(sorted(REGULARIZERS))}")
    return keyword_parameters(REGULARIZERS[name].__init__, skip=("self",))


def build_regularizer(name: str, method: Method, **hparams: Any) -> Regularizer:
    """Build a registered regularizer and ``setup`` it on ``method``."""
    valid = regularizer_hparams(name)
    unknown = sorted(set(hparams) - set(valid))
    if unknown:
        raise ValueError(
            f"regularizer {name!r} has no parameter(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid)) or '(none)'}"
        )
    reg = REGULARIZERS[name](**hparams)
    reg.setup(method)
    return reg
