"""Base methods: shapes, purity of ``loss``, momentum targets, the MoCo queue, configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.func import functional_call

import metassl
from metassl.losses import moco_infonce
from metassl.methods import METHODS, Method, build_method, method_hparams
from metassl.methods.momentum import MomentumMethod, cosine_momentum
from metassl.models.backbones import build_backbone

NAMES = ["simclr", "moco_v2", "byol", "simsiam", "barlow_twins", "vicreg"]
B, IMG = 6, 16
PROJ_OUT = 12


def tiny(name: str, **over) -> Method:
    torch.manual_seed(0)
    backbone, feat_dim = build_backbone("convnet_small", widths=(4, 4, 8, 8))
    hp = {"proj_hidden_dim": 16, "proj_output_dim": PROJ_OUT}
    if name == "moco_v2":
        hp["queue_size"] = 10
    if name in ("byol", "simsiam"):
        hp["pred_hidden_dim"] = 8
    hp.update(over)
    return build_method(name, backbone, feat_dim, **hp)


def views(n: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 3, IMG, IMG, generator=g) for _ in range(n)]


def buffers(m: nn.Module):
    return {k: v.clone() for k, v in m.named_buffers()}


# -- registry and configs ---------------------------------------------------------------------
def test_registry_has_the_six_methods():
    assert sorted(METHODS) == sorted(NAMES)
    assert {n: METHODS[n].augmentation for n in NAMES} == {
        "simclr": "simclr",
        "moco_v2": "simclr",
        "byol": "byol",
        "simsiam": "simclr",
        "barlow_twins": "byol",
        "vicreg": "byol",
    }
    with pytest.raises(ValueError, match="no parameter"):
        tiny("simclr", tau=0.1)


CONFIG_DIR = Path(metassl.__file__).parent / "configs"


@pytest.mark.parametrize("name", NAMES)
def test_method_config_keys_are_the_constructor_hparams(name):
    text = (CONFIG_DIR / "method" / f"{name}.yaml").read_text()
    cfg = yaml.safe_load(text)
    if "@package _global_" in text:  # a preset that also sets other sections (vicreg: its optimizer)
        cfg = cfg["method"]
    assert cfg.pop("name") == name
    hp = method_hparams(name)
    assert set(cfg) == set(hp)
    assert cfg == hp  # the YAML repeats the paper defaults of the constructor


def test_paper_defaults():
    hp = {n: method_hparams(n) for n in NAMES}
    assert hp["simclr"]["temperature"] == 0.5 and hp["simclr"]["proj_output_dim"] == 128
    assert (hp["moco_v2"]["temperature"], hp["moco_v2"]["queue_size"], hp["moco_v2"]["momentum"]) == (0.2, 65536, 0.999)
    assert (hp["byol"]["proj_hidden_dim"], hp["byol"]["proj_output_dim"], hp["byol"]["momentum"]) == (4096, 256, 0.99)
    assert (hp["simsiam"]["proj_num_layers"], hp["simsiam"]["pred_hidden_dim"]) == (3, 512)
    assert hp["barlow_twins"]["lambd"] == 0.0051
    assert (hp["vicreg"]["sim_weight"], hp["vicreg"]["var_weight"], hp["vicreg"]["cov_weight"]) == (25, 25, 1)


@pytest.mark.parametrize("name", ["convnet_small", "resnet18", "resnet50"])
def test_backbone_configs(name):
    cfg = yaml.safe_load((CONFIG_DIR / "backbone" / f"{name}.yaml").read_text())
    assert cfg == {"name": name, "cifar_stem": None, "pretrained": False}


# -- protocol ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_forward_shapes_and_finite_loss(name):
    m = tiny(name)
    out = m(views(3))  # any number of views >= 2
    for key in ("h", "f", "z"):
        assert len(out[key]) == 3
    assert out["h"][0].shape == (B, m.feat_dim) and out["f"][0].shape == (B, m.feat_dim)
    assert out["z"][0].shape == (B, PROJ_OUT)
    if name in ("byol", "simsiam"):
        assert [p.shape for p in out["p"]] == [(B, PROJ_OUT)] * 3
    if name in ("byol", "moco_v2"):
        assert [z.shape for z in out["z_target"]] == [(B, PROJ_OUT)] * 3
        assert not any(z.requires_grad for z in out["z_target"])
    loss = m.loss(out)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    trainable = {id(p) for p in m.trainable_parameters()}
    for pname, p in m.named_parameters():
        if pname.startswith("target_"):
            assert id(p) not in trainable and p.grad is None and not p.requires_grad
        else:
            assert id(p) in trainable
    assert all(p.grad is not None for p in m.backbone.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_too_few_views(name):
    with pytest.raises(ValueError, match="at least 2 views"):
        tiny(name)(views(1))


@pytest.mark.parametrize("name", NAMES)
def test_loss_is_pure(name):
    m = tiny(name)
    out = m(views())
    before = buffers(m)
    l1, l2 = m.loss(out), m.loss(out)
    assert torch.equal(l1, l2)
    after = buffers(m)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", NAMES)
def test_functional_call_matches_normal_call(name):
    m = tiny(name)
    v = views()
    expected = m.loss(m(v))
    state = {**dict(m.named_parameters()), **dict(m.named_buffers())}
    got = m.loss(functional_call(m, state, (v,)))
    torch.testing.assert_close(got, expected)
    # at other ("virtual") weights the loss changes and the module's weights do not
    virtual = {k: (p + 0.05 * torch.randn_like(p)) if p.requires_grad else p for k, p in m.named_parameters()}
    snapshot = {k: p.detach().clone() for k, p in m.named_parameters()}
    shifted = m.loss(functional_call(m, {**virtual, **dict(m.named_buffers())}, (v,)))
    assert not torch.allclose(shifted, expected)
    assert all(torch.equal(p, snapshot[k]) for k, p in m.named_parameters())


@pytest.mark.parametrize("name", NAMES)
def test_a_few_sgd_steps_stay_finite(name):
    m = tiny(name)
    opt = torch.optim.SGD(m.trainable_parameters(), lr=0.05, momentum=0.9)
    for step in range(3):
        out = m(views(seed=step))
        loss = m.loss(out)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.update_after_step(out, step / 3)


@pytest.mark.parametrize("name", NAMES)
def test_feature_transform_reaches_every_head(name):
    m = tiny(name)
    mask = torch.zeros(m.feat_dim)
    mask[::2] = 1.0

    def ft(h):
        return h * mask

    v = views()
    out = m(v, feature_transform=ft)
    torch.testing.assert_close(out["f"][0], out["h"][0] * mask)
    torch.testing.assert_close(out["z"][0], m.projector(out["f"][0]))
    if name in ("byol", "moco_v2"):  # the target sees the same transform
        with torch.no_grad():
            expected = m.target_projector(ft(m.target_backbone(v[1]).flatten(1)))
            unmasked = m.target_projector(m.target_backbone(v[1]).flatten(1))
        torch.testing.assert_close(out["z_target"][1], expected)
        assert not torch.allclose(out["z_target"][1], unmasked)


# -- spatial feature maps on request ------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_feature_maps_on_request(name):
    m = tiny(name)
    assert m.return_feature_maps is False
    v = views(3)
    trunk_passes = []
    m.backbone.features.register_forward_hook(lambda *a: trunk_passes.append(1))  # online trunk only
    out_off = m(v)
    assert "fmap" not in out_off
    m.return_feature_maps = True
    out_on = m(v)
    assert len(trunk_passes) == 2 * len(v)  # one backbone pass per view either way
    assert [f.shape for f in out_on["fmap"]] == [(B, 8, 2, 2)] * 3  # widths (4, 4, 8, 8), 16 px, 3 pools
    for fmap, h in zip(out_on["fmap"], out_on["h"]):
        assert torch.equal(h, m.backbone.forward_head(fmap))  # h is pooled from the same map
    for key in ("h", "z"):
        for a, b in zip(out_on[key], out_off[key]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(m.loss(out_on), m.loss(out_off), rtol=0, atol=0)
    out_on["fmap"][0].sum().backward()  # the map is on the online graph
    assert all(p.grad is not None for p in m.backbone.parameters())
    m.return_feature_maps = False
    assert "fmap" not in m(v)


@pytest.mark.parametrize("name", ["simclr", "byol"])
def test_feature_maps_under_functional_call(name):
    m = tiny(name)
    m.return_feature_maps = True
    v = views()
    virtual = {k: (p + 0.05 * torch.randn_like(p)) if p.requires_grad else p for k, p in m.named_parameters()}
    state = {**virtual, **dict(m.named_buffers())}
    on = functional_call(m, state, (v,))
    m.return_feature_maps = False
    off = functional_call(m, state, (v,))
    torch.testing.assert_close(m.loss(on), m.loss(off), rtol=0, atol=0)
    with torch.no_grad():
        real = m.backbone.forward_features(v[0])
    assert not torch.allclose(on["fmap"][0], real)  # the map was computed at the virtual weights


def test_feature_maps_off_calls_the_backbone_module():
    """Without maps the backbone is called as ``backbone(x)``: a patched ``forward`` (the
    replay of cached features) is honoured."""
    m = tiny("simclr")
    v = views()
    cached = {id(x): torch.randn(B, m.feat_dim) for x in v}
    m.backbone.forward = lambda x: cached[id(x)]
    try:
        out = m(v)
    finally:
        del m.backbone.forward
    assert all(torch.equal(h, cached[id(x)]) for h, x in zip(out["h"], v))


def test_feature_maps_need_a_backbone_that_has_them():
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    m = build_method("simclr", backbone, 4, proj_hidden_dim=8, proj_output_dim=4)
    with pytest.raises(ValueError, match="backbone 'Sequential' has no spatial feature map") as info:
        m.return_feature_maps = True
    assert "\n" not in str(info.value)
    assert m.return_feature_maps is False


@pytest.mark.parametrize("name", NAMES)
def test_named_trainable_parameters(name):
    m = tiny(name)
    named = m.named_trainable_parameters()
    assert [p for _, p in named] == m.trainable_parameters()
    everything = dict(m.named_parameters())
    assert all(everything[n] is p for n, p in named)
    expected = {n for n in everything if not n.startswith("target_")}
    assert {n for n, _ in named} == expected
    m.requires_grad_(True)  # target networks stay out even when unfrozen by mistake
    assert {n for n, _ in m.named_trainable_parameters()} == expected
    m.projector[0].weight.requires_grad_(False)  # a frozen parameter is not updated
    assert {n for n, _ in m.named_trainable_parameters()} == expected - {"projector.0.weight"}
    assert isinstance(m, MomentumMethod) is (name in ("byol", "moco_v2"))


# -- momentum methods ------------------------------------------------------------------------
def test_cosine_momentum_schedule():
    assert cosine_momentum(0.99, 1.0, 0.0) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 1.0, 1.0) == pytest.approx(1.0)
    # BYOL: tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2
    assert cosine_momentum(0.99, 1.0, 0.25) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)
    assert cosine_momentum(0.999, 0.999, 0.7) == pytest.approx(0.999)


@pytest.mark.parametrize("name,progress", [("byol", 0.0), ("byol", 0.5), ("byol", 1.0), ("moco_v2", 0.3)])
def test_ema_update_math(name, progress):
    m = tiny(name)
    with torch.no_grad():  # make online and target differ
        for p in m.backbone.parameters():
            p.add_(torch.randn_like(p))
        for p in m.projector.parameters():
            p.add_(torch.randn_like(p))
    online = [p.detach().clone() for p in [*m.backbone.parameters(), *m.projector.parameters()]]
    target = [p.detach().clone() for p in [*m.target_backbone.parameters(), *m.target_projector.parameters()]]
    out = m(views())
    m.update_after_step(out, progress)
    if name == "byol":
        tau = 1 - (1 - 0.99) * (math.cos(math.pi * progress) + 1) / 2
    else:
        tau = 0.999  # MoCo v2: constant momentum
    new = [p.detach() for p in [*m.target_backbone.parameters(), *m.target_projector.parameters()]]
    for t_old, o, t_new in zip(target, online, new):
        torch.testing.assert_close(t_new, tau * t_old + (1 - tau) * o)


def test_target_starts_as_copy_and_predictor_is_online_only():
    m = tiny("byol")
    for p, t in zip(m.backbone.parameters(), m.target_backbone.parameters()):
        assert torch.equal(p, t) and p is not t
    assert not any(n.startswith("target_predictor") for n, _ in m.named_parameters())


def test_moco_queue_enqueue_and_wraparound():
    m = tiny("moco_v2")  # queue_size 10, batch 6
    assert m.queue.shape == (10, PROJ_OUT)
    torch.testing.assert_close(m.queue.norm(dim=1), torch.ones(10))
    first = m(views(seed=1))
    m.update_after_step(first, 0.0)
    k1 = torch.nn.functional.normalize(first["z_target"][0], dim=1)
    torch.testing.assert_close(m.queue[:6], k1)
    assert int(m.queue_ptr) == 6
    second = m(views(seed=2))
    m.update_after_step(second, 0.1)
    k2 = torch.nn.functional.normalize(second["z_target"][0], dim=1)
    torch.testing.assert_close(m.queue[6:10], k2[:4])  # wraps around
    torch.testing.assert_close(m.queue[0:2], k2[4:6])
    torch.testing.assert_close(m.queue[2:6], k1[2:6])  # older keys not yet overwritten
    assert int(m.queue_ptr) == 2
    m.enqueue(torch.randn(25, PROJ_OUT))  # more keys than the queue: keeps the last 10
    assert int(m.queue_ptr) == 2


def test_moco_loss_uses_queue_symmetrically():
    m = tiny("moco_v2")
    out = m(views())
    q, k = out["z"], out["z_target"]
    expected = (moco_infonce(q[0], k[1], m.queue, 0.2) + moco_infonce(q[1], k[0], m.queue, 0.2)) / 2
    torch.testing.assert_close(m.loss(out), expected)
    with torch.no_grad():
        m.queue.copy_(torch.nn.functional.normalize(torch.randn_like(m.queue), dim=1))
    assert not torch.allclose(m.loss(out), expected)  # the queue is read at loss time
