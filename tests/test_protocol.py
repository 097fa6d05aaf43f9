"""The regularizer protocol v2 as the engine runs it: hook order, the step context, input
views, extras, feature maps on request, objective override, per-step updates, supports()."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metassl.engine.module import batch_extras
from metassl.engine.step import clip_info, training_step
from metassl.methods import build_method
from metassl.models.backbones import build_backbone
from metassl.regularizers.base import REGULARIZERS, Regularizer, build_regularizer, check_regularizer, register_regularizer

pytestmark = pytest.mark.usefixtures("one_thread")


class Probe(Regularizer):
    """Records every hook call with what it saw."""

    needs_feature_maps = True

    def __init__(self, replace: bool = False) -> None:
        super().__init__()
        self.replace = replace
        self.calls: list[tuple[str, dict]] = []
        self.scale = nn.Parameter(torch.ones(()))

    @classmethod
    def supports(cls, method_name):
        return "it has no negatives to add to" if method_name == "simsiam" else None

    def prepare_views(self, views, ctx):
        self.calls.append(("prepare_views", dict(out=dict(ctx.out), extras=set(ctx.extras), progress=ctx.progress)))
        return [v.clone().index_fill_(3, torch.tensor([0]), 0.0) for v in views]  # zero one pixel column

    def objective(self, out, ctx):
        self.calls.append(("objective", dict(views=ctx.views, fmap=[f.shape for f in out["fmap"]])))
        if self.replace:
            z = torch.cat(out["z"])
            return {"base": self.scale * z.pow(2).mean()}
        return super().objective(out, ctx)

    def extra_loss(self, out, ctx):
        self.calls.append(("extra_loss", dict(lr=ctx.lr)))
        return {"probe": 0.0 * self.scale}

    def before_encoder_step(self, ctx):
        self.calls.append(("before_encoder_step", dict(clip=ctx.clip, has_grad=self.scale.grad is not None)))

    def after_step(self, ctx):
        self.calls.append(("after_step", dict(step=ctx.global_step, mask=ctx.extras.get("mask"))))


def _setup(replace=False, method="simclr"):
    torch.manual_seed(0)
    backbone, dim = build_backbone("convnet_small", widths=[4, 4, 8, 8])
    m = build_method(method, backbone, dim, proj_hidden_dim=8, proj_output_dim=4)
    reg = Probe(replace)
    reg.setup(m)
    m.return_feature_maps = True
    opt = torch.optim.SGD(list(m.trainable_parameters()) + reg.encoder_parameters(), lr=0.1)
    return m, reg, opt


def test_hook_order_context_and_extras():
    m, reg, opt = _setup()
    views = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    mask = torch.ones(4, 1, 16, 16)
    logs = training_step(m, reg, views, None, opt, extras={"mask": mask}, progress=0.25, global_step=7)
    names = [c[0] for c in reg.calls]
    assert names == ["prepare_views", "objective", "extra_loss", "before_encoder_step", "after_step"]
    seen = dict(reg.calls)
    assert seen["prepare_views"]["out"] == {} and seen["prepare_views"]["extras"] == {"mask"}
    assert seen["prepare_views"]["progress"] == 0.25
    assert all(float(v[..., 0].abs().sum()) == 0.0 for v in seen["objective"]["views"])  # the method saw the prepared views
    assert seen["objective"]["fmap"] == [torch.Size([4, 8, 2, 2])] * 2
    assert seen["extra_loss"]["lr"] == pytest.approx(0.1)
    assert seen["before_encoder_step"]["has_grad"] and seen["before_encoder_step"]["clip"] is None
    assert seen["after_step"]["step"] == 7 and seen["after_step"]["mask"] is mask
    assert "loss_probe" in logs and "loss_base" in logs


def test_objective_may_replace_the_base_loss():
    m, reg, opt = _setup(replace=True)
    views = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    prepared = [v.clone().index_fill_(3, torch.tensor([0]), 0.0) for v in views]
    with torch.no_grad():
        expected = float(torch.cat(m(prepared)["z"]).pow(2).mean())
    logs = training_step(m, reg, views, None, opt)
    assert "loss_probe" not in logs  # the override did not call extra_loss
    assert float(logs["loss"]) == pytest.approx(expected, rel=1e-5)
    assert reg.scale.grad is not None  # the replaced objective trained the regularizer's own parameter


def test_clip_info_reaches_before_encoder_step():
    m, reg, opt = _setup()
    views = [torch.randn(4, 3, 16, 16) for _ in range(2)]

    def backward(loss):
        loss.backward()
        info = clip_info(opt, 1e-3)
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1e-3)
        return info

    training_step(m, reg, views, None, opt, backward=backward)
    clip = dict(reg.calls)["before_encoder_step"]["clip"]
    assert clip.max_norm == 1e-3 and clip.norm > 1e-3 and 0 < clip.factor < 1
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for g in opt.param_groups for p in g["params"] if p.grad is not None]))
    assert float(after) == pytest.approx(1e-3, rel=1e-3)


def test_supports_refuses_in_one_line_and_feature_maps_on_request():
    register_regularizer("probe_v2")(Probe)
    try:
        with pytest.raises(ValueError, match="does not support method 'simsiam'") as err:
            check_regularizer("probe_v2", "simsiam")
        assert len(str(err.value).splitlines()) == 1
        backbone, dim = build_backbone("convnet_small", widths=[4, 4, 8, 8])
        m = build_method("simclr", backbone, dim, proj_hidden_dim=8, proj_output_dim=4)
        assert "fmap" not in m([torch.randn(2, 3, 16, 16)] * 2)
        build_regularizer("probe_v2", m)
        assert m.return_feature_maps and "fmap" in m([torch.randn(2, 3, 16, 16)] * 2)
    finally:
        REGULARIZERS.pop("probe_v2", None)


def test_batch_extras():
    assert batch_extras(([], torch.zeros(2))) == {}
    mask = torch.ones(2, 1, 4, 4)
    assert batch_extras(([], torch.zeros(2), mask))["mask"] is mask
    assert set(batch_extras(([], torch.zeros(2), {"clean": mask, "mask": mask}))) == {"clean", "mask"}


def test_clean_view_and_masks_reach_the_batch_extras():
    """``data_requirements=("clean",)``: the SSL items carry the un-augmented image (the eval
    transform of the same sample) and, with ``return_mask``, the views' foreground masks."""
    from torch.utils.data import DataLoader

    from metassl.config import load_config
    from metassl.data import build_data
    from omegaconf import OmegaConf

    cfg = load_config(["data.num_train=40", "data.num_test=20", "data.return_mask=true"])
    bundle = build_data(OmegaConf.to_container(cfg.data, resolve=True), clean_view=True)
    batch = next(iter(DataLoader(bundle.train_ssl, batch_size=4, shuffle=False)))
    extras = batch_extras(batch)
    assert set(extras) == {"clean", "mask"}
    assert extras["clean"].shape == batch[0][0].shape and len(extras["mask"]) == 2
    torch.testing.assert_close(extras["clean"][1], bundle.train_eval[1][0])
    plain = build_data(OmegaConf.to_container(cfg.data, resolve=True))
    assert len(plain.train_ssl[0]) == 3 and not isinstance(plain.train_ssl[0][2], dict)
