"""The regularizer protocol (v2): a plug-in over any base method.

A regularizer may own parameters of two kinds:

- *encoder parameters* (e.g. MetaMask's Barlow-Twins projector, MRCL's decoder) are trained
  together with the method by the encoder optimizer;
- *meta parameters* (e.g. MetaMask's mask logits, MetAug's generators) have their own
  optimizer and scheduler and are trained by ``meta_step`` (bilevel regularizers, built on
  :class:`metassl.meta.bilevel.BilevelRegularizer`).

What the engine runs for one training step (``metassl.engine.step.training_step``), in order::

    ctx   = StepContext(method, views, extras, labels, optimizer, lr, progress, step, ...)
    views = reg.prepare_views(views, ctx)           # e.g. MRCL's input masking; ctx.views = views
    method.return_feature_maps = reg.needs_feature_maps          # set once, at build time
    out   = method(views, feature_transform=reg.transform_features)      # ctx.out = out
    terms = reg.objective(out, ctx)                 # default {"base": method.loss(out), **reg.extra_loss(out, ctx)}
    loss  = reg.weight_base * terms["base"] + sum(other terms)
    backward(loss); clip if trainer.gradient_clip_val   # ctx.clip: the clip and the unclipped norm
    reg.before_encoder_step(ctx)                    # .grad holds the encoder objective's gradient
    encoder_optimizer.step()
    if reg.bilevel:
        meta_optimizer.zero_grad(); logs |= reg.meta_step(ctx); meta_optimizer.step()
    method.update_after_step(out, progress)         # EMA targets, MoCo queue
    reg.after_step(ctx)                             # dictionaries, prototypes, EMA statistics
    logs |= reg.log_stats()

- ``objective`` may replace the whole encoder objective (MetAug's unified loss with
  generated queries): the entry ``"base"`` is whatever the regularizer calls the base term
  (logged as ``loss_base``), every other entry is added as is (logged as ``loss_<name>``).
- ``extras`` are the batch's extra fields by name: ``"clean"`` (the un-augmented image, when
  the regularizer lists it in ``data_requirements``) and ``"mask"`` (the built-in data's
  foreground masks), when the data pipeline provides them.
- ``needs_feature_maps``: the method then also returns ``out["fmap"]``, the backbone's spatial
  maps ``(B, C, H, W)`` of every view (backbone contract ``forward_features``); nobody else
  pays for it.
- ``supports(method_name)``: a regularizer refuses a base method at config time with one line.

A regularizer knows this protocol, the method protocol and the meta engine, never a
concrete method, and never the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from metassl.methods.base import Method
from metassl.signatures import keyword_parameters


@dataclass(frozen=True)
class ClipInfo:
    """The real step clipped the encoder gradient: ``max_norm`` and the global norm of the
    gradient before clipping (so ``.grad`` holds ``g · min(1, max_norm / (norm + 1e-6))``)."""

    max_norm: float
    norm: float

    @property
    def factor(self) -> float:
        return min(1.0, self.max_norm / (self.norm + 1e-6))


@dataclass
class StepContext:
    """What a regularizer may read during one training step (every hook gets it)."""

    method: Method
    views: list[torch.Tensor]
    #: the method's output for ``views`` (empty in ``prepare_views``)
    out: dict[str, Any] = field(default_factory=dict)
    labels: torch.Tensor | None = None
    #: the real (unwrapped) ``torch.optim.Optimizer`` of the encoder
    encoder_optimizer: torch.optim.Optimizer | None = None
    #: the encoder's current learning rate (first param group)
    lr: float = 0.0
    #: fraction of training done, in [0, 1]
    progress: float = 0.0
    global_step: int = 0
    #: torch.distributed is initialised and world size > 1
    distributed: bool = False
    #: extra batch fields by name ("clean": un-augmented images, "mask": foreground masks)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    #: loss scale of 16-mixed training while ``.grad`` still holds scaled gradients, else None
    grad_scale: float | None = None
    #: the gradient clipping the real step applied (None: no clipping)
    clip: ClipInfo | None = None
    #: free-form stash a regularizer may fill in one hook and read in a later one
    cache: dict[str, Any] = field(default_factory=dict)


class Regularizer(nn.Module):
    """Base class; the identity regularizer (``regularizer=none``) is this class as is."""

    name: ClassVar[str] = "none"
    #: True if the regularizer has meta parameters trained by ``meta_step``
    bilevel: ClassVar[bool] = False
    #: the method must return the backbone's spatial maps as ``out["fmap"]``
    needs_feature_maps: ClassVar[bool] = False
    #: extra fields the data pipeline must put in every batch ("clean": un-augmented image)
    data_requirements: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        super().__init__()
        #: weight of the base term ``terms["base"]`` in the encoder objective
        self.weight_base: float = 1.0

    @classmethod
    def supports(cls, method_name: str) -> str | None:
        """``None`` if the regularizer works with this base method, else the reason (one line)."""
        return None

    def setup(self, method: Method) -> None:
        """Called once with the built method (to size own heads from ``method.feat_dim``)."""

    # -- training hooks -----------------------------------------------------------------
    def prepare_views(self, views: list[torch.Tensor], ctx: StepContext) -> list[torch.Tensor]:
        """The views the method will see (before its forward); default: unchanged."""
        return views

    def transform_features(self, h: torch.Tensor) -> torch.Tensor:
        """Applied to backbone features before every projector (training)."""
        return h

    def eval_transform(self) -> nn.Module | None:
        """Feature transform used for evaluation when ``eval.features=transformed``."""
        return None

    def objective(self, out: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        """Named terms of the encoder objective; ``"base"`` is weighted by ``weight_base``,
        the others are added as they are.  Override to replace the base objective."""
        return {"base": ctx.method.loss(out), **self.extra_loss(out, ctx)}

    def extra_loss(self, out: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        """Named terms added to the base method's loss (already weighted)."""
        return {}

    def before_encoder_step(self, ctx: StepContext) -> None:
        """Gradients of the encoder objective are in ``.grad``; the optimizer has not stepped."""

    def meta_step(self, ctx: StepContext) -> dict[str, float]:
        """Fill ``.grad`` of ``meta_parameters()``; the engine then steps the meta optimizer.

        Returns scalar statistics to log."""
        return {}

    def after_step(self, ctx: StepContext) -> None:
        """After every optimizer step of a real training step (never in virtual passes)."""

    # -- parameters and optimizers -------------------------------------------------------
    def encoder_parameters(self) -> list[nn.Parameter]:
        """Own parameters trained with the encoder optimizer."""
        meta = {id(p) for p in self.meta_parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in meta]

    def named_encoder_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``encoder_parameters()`` with their names inside this module."""
        own = {id(p) for p in self.encoder_parameters()}
        return [(n, p) for n, p in self.named_parameters() if id(p) in own]

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


def check_choices(owner: str, **choices: tuple[Any, Sequence[Any]]) -> None:
    """One-line ``ValueError`` for the first option whose value is not among its allowed ones
    (``key=(value, allowed)``), named as ``<owner>: <key> must be one of ...``."""
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"{owner}: {key} must be one of {', '.join(map(str, allowed))}; got {value!r}")


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


def get_regularizer_class(name: str) -> type[Regularizer]:
    if name not in REGULARIZERS:
        raise KeyError(f"unknown regularizer {name!r}; available: {', '.join(sorted(REGULARIZERS))}")
    return REGULARIZERS[name]


def regularizer_hparams(name: str) -> dict[str, Any]:
    return keyword_parameters(get_regularizer_class(name).__init__, skip=("self",))


def check_regularizer(name: str, method_name: str) -> None:
    """Raise one-line ``ValueError`` if regularizer ``name`` refuses base method ``method_name``."""
    reason = get_regularizer_class(name).supports(method_name)
    if reason:
        raise ValueError(f"regularizer {name!r} does not support method {method_name!r}: {reason}")


def build_regularizer(name: str, method: Method, **hparams: Any) -> Regularizer:
    """Build a registered regularizer and ``setup`` it on ``method``."""
    valid = regularizer_hparams(name)
    unknown = sorted(set(hparams) - set(valid))
    if unknown:
        raise ValueError(
            f"regularizer {name!r} has no parameter(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid)) or '(none)'}"
        )
    check_regularizer(name, method.name)
    reg = REGULARIZERS[name](**hparams)
    reg.setup(method)
    if reg.needs_feature_maps:
        method.return_feature_maps = True
    return reg
