"""Every method preset x regularizer preset trains as written: the preset's optimizer (e.g.
VICReg's LARS) with the regularizer's defaults (e.g. MetaMask's mirrored virtual step), a few
real steps on tiny inputs, finite losses, the meta parameters move."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from metassl.config import load_config
from metassl.engine.optim import build_optimizer
from metassl.engine.step import training_step
from metassl.methods import METHODS, build_method
from metassl.models.backbones import build_backbone
from metassl.regularizers import REGULARIZERS, build_regularizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _small(section: dict) -> dict:
    """Head widths shrunk (cost only; every other value as the preset writes it)."""
    return {k: (16 if k.endswith("_dim") and isinstance(v, int) else v) for k, v in section.items() if k != "name"}


@pytest.mark.parametrize("reg_name", sorted(REGULARIZERS))
@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_preset_pair_trains_as_written(method_name, reg_name):
    cfg = OmegaConf.to_container(load_config([f"method={method_name}", f"regularizer={reg_name}"]), resolve=True)
    torch.manual_seed(0)
    backbone, dim = build_backbone("convnet_small", widths=[4, 8, 8, 16])
    method = build_method(method_name, backbone, dim, **_small(cfg["method"]))
    reg = build_regularizer(reg_name, method, **_small(cfg["regularizer"]))
    named = list(method.named_trainable_parameters()) + [(f"regularizer.{n}", p) for n, p in reg.named_encoder_parameters()]
    opt = build_optimizer(cfg["optimizer"], named, float(cfg["optimizer"]["lr"]) * 8 / 256)
    meta = reg.configure_meta_optimizer(10)[0] if reg.bilevel else None
    before = [p.detach().clone() for p in reg.meta_parameters()]
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        views = [torch.randn(8, 3, 16, 16, generator=g) for _ in range(2)]
        extras = {"clean": torch.randn(8, 3, 16, 16, generator=g)} if "clean" in reg.data_requirements else {}
        logs = training_step(method, reg, views, None, opt, meta, extras=extras, global_step=step)
        assert torch.isfinite(logs["loss"]), (method_name, reg_name, step, logs)
    for b, p in zip(before, reg.meta_parameters()):
        assert not torch.equal(b, p.detach()), "the meta parameters did not move"
