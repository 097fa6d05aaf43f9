"""The base-method protocol and the registry of methods by name.

A *method* is a backbone plus its own heads plus a pure loss.  It knows nothing of
regularizers, the engine, Lightning or the CLI, so that the meta engine can re-run it at
virtual weights with ``torch.func.functional_call``.

Contract
--------
``forward(views, feature_transform=None) -> dict``
    ``views`` is a list of image batches (one per augmented view).  Returns lists with one
    entry per view:

    - ``"h"``: raw backbone features, shape ``(B, feat_dim)``;
    - ``"f"``: ``feature_transform(h)`` (or ``h``), what every head sees;
    - ``"z"``: projections; ``"p"``: predictions (BYOL, SimSiam);
    - momentum methods add ``"z_target"`` (computed under ``no_grad`` by the target network,
      which sees the *same* feature transform, detached).

``loss(out) -> Tensor``
    A scalar that depends only on ``out`` and on read-only buffers (e.g. the MoCo queue).
    It never mutates state, so it can be evaluated again at other weights.

``update_after_step(out, progress)``
    State changes that must happen once per *real* optimizer step and never during virtual
    passes: the EMA of target networks, the MoCo queue.  ``progress`` is in ``[0, 1]``.

``trainable_parameters()``
    What the encoder optimizer updates (target networks excluded).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, ClassVar

import torch
from torch import nn

FeatureTransform = Callable[[torch.Tensor], torch.Tensor]


class Method(nn.Module):
    """Base class of every self-supervised method (see module docstring for the contract)."""

    name: ClassVar[str] = ""
    #: which multi-view augmentation family the method's paper uses ("simclr" or "byol")
    augmentation: ClassVar[str] = "simclr"

    def __init__(self, backbone: nn.Module, feat_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.feat_dim = feat_dim

    # -- helpers shared by all methods -------------------------------------------------
    def encode(self, x: torch.Tensor, feature_transform: FeatureTransform | None = None):
        """Backbone features ``h`` and the transformed features ``f`` the heads see."""
        h = self.backbone(x).flatten(1)
        f = feature_transform(h) if feature_transform is not None else h
        return h, f

    # -- protocol ----------------------------------------------------------------------
    def forward(self, views: list[torch.Tensor], feature_transform: FeatureTransform | None = None) -> dict[str, Any]:
        raise NotImplementedError

    def loss(self, out: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def update_after_step(self, out: dict[str, Any], progress: float) -> None:
        """Per-real-step state update (EMA targets, queues). Default: nothing."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def check_views(views: list[torch.Tensor], method: str) -> None:
    if len(views) < 2:
        raise ValueError(f"{method} needs at least 2 views, got {len(views)}")


def encode_views(
    method: Method, views: list[torch.Tensor], feature_transform: FeatureTransform | None, projector: nn.Module
) -> dict[str, list[torch.Tensor]]:
    """``h``, ``f`` and ``z = projector(f)`` for every view, each view its own forward pass
    (batch-norm statistics per view, as the official PyTorch implementations)."""
    out: dict[str, list[torch.Tensor]] = {"h": [], "f": [], "z": []}
    for x in views:
        h, f = method.encode(x, feature_transform)
        out["h"].append(h)
        out["f"].append(f)
        out["z"].append(projector(f))
    return out


METHODS: dict[str, type[Method]] = {}


def register_method(name: str):
    """Class decorator: make a method available by ``name`` (``method.name=...`` in configs)."""

    def wrap(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


def keyword_parameters(fn: Callable, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Names and defaults of ``fn``'s named parameters (no ``*args``/``**kwargs``), minus ``skip``:
    what a config section may set for a builder."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if k not in skip and p.kind in kinds}


def method_hparams(name: str) -> dict[str, Any]:
    """The constructor hyper-parameters of a method and their defaults (backbone excluded)."""
    return keyword_parameters(get_method_class(name).__init__, skip=("self", "backbone", "feat_dim"))


def get_method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def build_method(name: str, backbone: nn.Module, feat_dim: int, **hparams: Any) -> Method:
    """Build a registered method; unknown hyper-parameters raise one clear error."""
    valid = method_hparams(name)
    unknown = sorted(set(hparams) - set(valid))
    if unknown:
        raise ValueError(
            f"method {name!r} has no parameter(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}"
        )
    return get_method_class(name)(backbone, feat_dim, **hparams)
