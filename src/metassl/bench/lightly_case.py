"""The lightly side (optional extra): the same base method written with lightly's own heads and
losses (``SimCLRProjectionHead`` + ``NTXentLoss``, MoCo's ``NTXentLoss`` memory bank, ...) on the
same backbone object type, batch of views, precision and memory format, in a minimal step loop as
lightly's examples (forward each view, loss, backward, SGD step, momentum update).  Head widths,
temperatures and queue sizes are the metassl preset's."""

from __future__ import annotations

import argparse
import copy
from typing import Any

import torch
from torch import nn

from metassl.bench.cases import DEFAULT_OPTIMIZER, Case, Variant, make_views, method_hparams, param_bytes, scaled_lr, seeded_backbone, timed_step

__all__ = ["LightlyModel", "build_lightly_case", "lightly_available", "lightly_version"]

#: method -> (projection head, prediction head or None, momentum target, loss from (lightly.loss, hp, out))
_SPEC: dict[str, tuple[str, str | None, bool, Any]] = {
    "simclr": ("SimCLRProjectionHead", None, False, lambda L, hp, out: L.NTXentLoss(temperature=hp["temperature"])),
    "moco_v2": ("MoCoProjectionHead", None, True,
                lambda L, hp, out: L.NTXentLoss(temperature=hp["temperature"], memory_bank_size=(hp["queue_size"], out))),
    "byol": ("BYOLProjectionHead", "BYOLPredictionHead", True, lambda L, hp, out: L.NegativeCosineSimilarity()),
    "simsiam": ("SimSiamProjectionHead", "SimSiamPredictionHead", False, lambda L, hp, out: L.NegativeCosineSimilarity()),
    "barlow_twins": ("BarlowTwinsProjectionHead", None, False, lambda L, hp, out: L.BarlowTwinsLoss(lambda_param=hp["lambd"])),
    "vicreg": ("VICRegProjectionHead", None, False,
               lambda L, hp, out: L.VICRegLoss(lambda_param=hp["sim_weight"], mu_param=hp["var_weight"], nu_param=hp["cov_weight"])),
}


class LightlyModel(nn.Module):
    """A base method written with lightly's building blocks, as lightly's examples."""

    def __init__(self, name: str, backbone: nn.Module, feat_dim: int, hp: dict[str, Any]) -> None:
        super().__init__()
        import lightly.loss
        from lightly.models.modules import heads
        from lightly.models.utils import deactivate_requires_grad

        if name not in _SPEC:
            raise KeyError(f"no lightly counterpart for method {name!r}")
        proj_head, pred_head, momentum, loss = _SPEC[name]
        self.name = name
        self.backbone = backbone
        hid, out = hp.get("proj_hidden_dim"), hp.get("proj_output_dim")
        extra = {"num_layers": 3} if name == "vicreg" else {}
        self.projection = getattr(heads, proj_head)(feat_dim, hid, out, **extra)
        if pred_head:
            self.prediction = getattr(heads, pred_head)(out, hp["pred_hidden_dim"], out)
        self.criterion = loss(lightly.loss, hp, out)
        self.momentum = hp["momentum"] if momentum else None
        if self.momentum is not None:
            self.backbone_momentum = copy.deepcopy(self.backbone)
            self.projection_momentum = copy.deepcopy(self.projection)
            deactivate_requires_grad(self.backbone_momentum)
            deactivate_requires_grad(self.projection_momentum)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.backbone(x).flatten(start_dim=1))

    @torch.no_grad()
    def embed_momentum(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()

    def loss(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        n = self.name
        if n in ("simclr", "barlow_twins", "vicreg"):
            return self.criterion(self.embed(x0), self.embed(x1))
        if n == "moco_v2":  # symmetrised like metassl's MoCo v2 (two queries, two keys)
            q0, q1 = self.embed(x0), self.embed(x1)
            k0, k1 = self.embed_momentum(x0), self.embed_momentum(x1)
            return 0.5 * (self.criterion(q0, k1) + self.criterion(q1, k0))
        if n == "byol":
            p0, p1 = self.prediction(self.embed(x0)), self.prediction(self.embed(x1))
            z0, z1 = self.embed_momentum(x0), self.embed_momentum(x1)
            return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))
        z0, z1 = self.embed(x0), self.embed(x1)  # simsiam
        p0, p1 = self.prediction(z0), self.prediction(z1)
        return 0.5 * (self.criterion(p0, z1.detach()) + self.criterion(p1, z0.detach()))

    @torch.no_grad()
    def after_step(self) -> None:
        if self.momentum is not None:
            from lightly.models.utils import update_momentum

            update_momentum(self.backbone, self.backbone_momentum, m=self.momentum)
            update_momentum(self.projection, self.projection_momentum, m=self.momentum)


def build_lightly_case(args: argparse.Namespace, method_name: str, variant: Variant) -> Case:
    backbone, feat_dim = seeded_backbone(args)
    model = LightlyModel(method_name, backbone, feat_dim, method_hparams(method_name)).to(args.device).train()
    if variant.channels_last:
        model.to(memory_format=torch.channels_last)
    if variant.compile:  # the same backbone compiled the same way: a like-for-like control
        model.backbone.compile()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=scaled_lr(args), momentum=DEFAULT_OPTIMIZER["momentum"], weight_decay=DEFAULT_OPTIMIZER["weight_decay"])
    views, _ = make_views(args, variant)

    def body(i: int) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = model.loss(views[0], views[1])
        loss.backward()
        opt.step()
        model.after_step()
        return loss.detach()

    return Case("lightly", method_name, "none", variant, step=timed_step(args, variant, body), param_bytes=param_bytes(model))


def lightly_available() -> str | None:
    """None if lightly is importable, else the reason."""
    try:
        import lightly.loss  # noqa: F401
        import lightly.models.modules.heads  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import problem means: skip the column
        return f"lightly not importable ({type(err).__name__}: {str(err).splitlines()[0][:120]}); its column is skipped (pip install lightly)"
    return None


def lightly_version() -> str | None:
    try:
        import lightly
    except ImportError:
        return None
    return lightly.__version__
