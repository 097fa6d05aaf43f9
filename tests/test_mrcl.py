"""MRCL (metassl.regularizers.mrcl), its masks (metassl.data.masking) and decoders
(metassl.models.decoders) on tiny networks."""

from __future__ import annotations

import warnings

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from metassl.config import load_config
from metassl.data.masking import (
    apply_mask,
    block_mask,
    draw_mask,
    erase_mask,
    mask_ratio,
    random_patch_mask,
)
from metassl.engine.step import training_step
from metassl.methods import METHODS, build_method
from metassl.models.backbones import build_backbone
from metassl.models.decoders import (
    ConvUpsamplingDecoder,
    PatchLinearDecoder,
    build_decoder,
    feature_map_geometry,
)
from metassl.regularizers import REGULARIZERS, StepContext, build_regularizer
from metassl.regularizers.mrcl import (
    MRCL,
    masked_reconstruction_loss,
    patch_denormalize,
    patch_normalize,
)

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTHS = [4, 4, 8, 8]  # convnet_small: 16 px -> (8, 2, 2) maps, stride 8


def make(method: str = "simclr", seed: int = 0, **reg_kw):
    reg_kw.setdefault("rec_fraction", 1.0)  # every sample masked: the tests below read whole views
    torch.manual_seed(seed)
    backbone, dim = build_backbone("convnet_small", widths=WIDTHS)
    kw = dict(proj_hidden_dim=8, proj_output_dim=4)
    if method == "moco_v2":
        kw["queue_size"] = 16
    if method in ("byol", "simsiam"):
        kw["pred_hidden_dim"] = 8
    m = build_method(method, backbone, dim, **kw)
    reg = build_regularizer("mrcl", m, **{"decoder_width": 8, **reg_kw})
    return m, reg


def views_for(n=8, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, size, size, generator=g) for _ in range(2)]


def encoder_opt(m, reg, lr=0.05):
    return torch.optim.SGD(list(m.trainable_parameters()) + reg.encoder_parameters(), lr=lr, momentum=0.9)


def patch_constant(mask: torch.Tensor, p: int) -> bool:
    """Every p x p patch of the (B, 1, H, W) mask is all True or all False."""
    b, _, h, w = mask.shape
    blocks = mask.view(b, h // p, p, w // p, p)
    return bool((blocks.all(dim=(2, 4)) | ~blocks.any(dim=(2, 4))).all())


# -- masks -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio,size,p", [(0.25, 32, 4), (0.5, 32, 4), (0.3, 24, 3), (0.75, 16, 2)])
def test_patch_mask_ratio_exact_per_sample_aligned_and_different(ratio, size, p):
    torch.manual_seed(0)
    mask = random_patch_mask(64, size, size, p, ratio)
    assert mask.shape == (64, 1, size, size) and mask.dtype == torch.bool
    patches = (size // p) ** 2
    expected = round(ratio * patches) / patches
    assert torch.equal(mask_ratio(mask), torch.full((64,), expected))  # the same count in every sample
    assert abs(expected - ratio) <= 0.5 / patches
    assert patch_constant(mask, p)
    flat = mask.flatten(1)
    assert len({tuple(row.tolist()) for row in flat}) == 64  # masks differ per sample
    # each patch is hidden with probability ~ ratio over samples (no fixed positions)
    per_patch = mask[:, 0, ::p, ::p].float().mean(0)
    assert 0.0 < float(per_patch.min()) and float(per_patch.max()) < 1.0


def test_masks_follow_the_default_generator():
    torch.manual_seed(5)
    a = random_patch_mask(4, 16, 16, 4, 0.5)
    b = block_mask(4, 16, 16, 4, 0.5)
    c = erase_mask(4, 16, 16, 0.3)
    torch.manual_seed(5)
    assert torch.equal(a, random_patch_mask(4, 16, 16, 4, 0.5))
    assert torch.equal(b, block_mask(4, 16, 16, 4, 0.5))
    assert torch.equal(c, erase_mask(4, 16, 16, 0.3))
    assert not torch.equal(a, random_patch_mask(4, 16, 16, 4, 0.5))  # the stream moved on


def _is_one_rectangle(m2d: torch.Tensor) -> bool:
    rows, cols = m2d.any(1).nonzero().flatten(), m2d.any(0).nonzero().flatten()
    box = m2d[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    return bool(box.all()) and int(box.numel()) == int(m2d.sum())


def test_block_and_erase_masks_are_one_rectangle_near_the_ratio():
    torch.manual_seed(0)
    block = block_mask(200, 32, 32, 4, 0.25)
    assert patch_constant(block, 4)
    assert all(_is_one_rectangle(m[0]) for m in block)
    r = mask_ratio(block)
    assert float((r - 0.25).abs().mean()) < 0.05 and float(r.min()) > 0
    assert len({tuple(m.flatten().tolist()) for m in block}) > 50  # positions and shapes vary (8x8 grid: ~100 possible)
    erase = erase_mask(200, 32, 32, 0.3)
    assert all(_is_one_rectangle(m[0]) for m in erase)
    r = mask_ratio(erase)
    assert float((r - 0.3).abs().mean()) < 0.03
    assert not patch_constant(erase, 4)  # pixel level, not patch aligned


def test_apply_mask_fills_hidden_pixels_only():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 8, 8)
    mask = draw_mask("patch", x, 4, 0.5)
    y = apply_mask(x, mask, fill=-1.5)
    hidden = mask.expand_as(x)
    assert torch.all(y[hidden] == -1.5) and torch.equal(y[~hidden], x[~hidden])
    assert not torch.equal(y, x) and y.data_ptr() != x.data_ptr()


# -- the loss -----------------------------------------------------------------------------------------
def test_masked_reconstruction_loss_hand_case():
    """Two samples, 1x2x2, 2 channels: per-sample mean over the hidden pixels, then over samples."""
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]],
                         [[[1.0, 1.0], [1.0, 1.0]], [[2.0, 2.0], [2.0, 2.0]]]])
    target = torch.zeros_like(pred)
    mask = torch.tensor([[[[True, False], [False, True]]], [[[False, False], [True, False]]]])
    # sample 0: hidden pixels (0,0), (1,1): squared errors ch0 1, 16; ch1 0, 0 -> (1 + 16) / (2 * 2) = 4.25
    # sample 1: hidden pixel (1,0): ch0 1, ch1 4 -> 5 / 2 = 2.5;  loss = (4.25 + 2.5) / 2
    assert float(masked_reconstruction_loss(pred, target, mask)) == pytest.approx(3.375)
    with pytest.raises(ValueError, match="shapes differ"):
        masked_reconstruction_loss(pred, target, mask[:, :, :1])


def test_masked_reconstruction_loss_gradient_matches_finite_differences():
    torch.manual_seed(0)
    pred = torch.randn(3, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    mask = random_patch_mask(3, 4, 4, 2, 0.5)
    assert torch.autograd.gradcheck(lambda p: masked_reconstruction_loss(p, target, mask), (pred,))
    masked_reconstruction_loss(pred, target, mask).backward()
    assert torch.all(pred.grad[~mask.expand_as(pred)] == 0)  # visible pixels get no gradient


def test_patch_normalize_hand_case_and_inverse():
    x = torch.arange(2 * 4 * 4, dtype=torch.float64).view(1, 2, 4, 4)
    y = patch_normalize(x, 2)
    first = torch.tensor([0.0, 1, 4, 5, 16, 17, 20, 21], dtype=torch.float64)  # patch (0, 0), both channels
    expected = (first - first.mean()) / (first.var() + 1e-6).sqrt()
    torch.testing.assert_close(y[0, :, :2, :2].flatten(), expected)
    torch.testing.assert_close(patch_denormalize(y, x, 2), x)
    assert torch.autograd.gradcheck(lambda t: patch_normalize(t, 2), (x.clone().requires_grad_(),))


# -- decoders ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kw,size,geometry", [
    ("convnet_small", dict(widths=WIDTHS), 32, (8, 8)),
    ("convnet_small", dict(), 32, (256, 8)),
    ("resnet18", dict(cifar_stem=True), 32, (512, 8)),
    ("resnet18", dict(cifar_stem=False), 64, (512, 32)),
])
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_decoder_output_shape(name, kw, size, geometry, kind):
    torch.manual_seed(0)
    backbone, _ = build_backbone(name, **kw)
    assert feature_map_geometry(backbone) == geometry
    dec = build_decoder(kind, *geometry, width=16, depth=2)
    fmap = backbone.forward_features(torch.randn(2, 3, size, size))
    assert dec(fmap, (size, size)).shape == (2, 3, size, size)


def test_decoders_resize_odd_sizes_and_read_tokens():
    conv = ConvUpsamplingDecoder(6, 8, width=16)
    assert conv.num_stages == 3 and conv(torch.randn(2, 6, 3, 3), (25, 23)).shape == (2, 3, 25, 23)
    lin = PatchLinearDecoder(6, 4)
    tokens = torch.randn(2, 16, 6)  # a 4x4 grid of 6-d tokens
    out = lin(tokens, (16, 16))
    assert out.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out, lin(tokens.transpose(1, 2).reshape(2, 6, 4, 4), (16, 16)))
    # each map cell predicts exactly its own 4x4 patch
    grid = torch.zeros(1, 6, 4, 4)
    grid[0, :, 1, 2] = 1.0
    diff = lin(grid, (16, 16)) - lin(torch.zeros_like(grid), (16, 16))
    assert torch.count_nonzero(diff[..., :4, :]) == 0 and torch.count_nonzero(diff[..., 4:8, 8:12]) > 0
    with pytest.raises(ValueError, match="square grid"):
        lin(torch.randn(2, 17, 6), (16, 16))
    with pytest.raises(ValueError, match=r"expects feature maps \(B, 6, h, w\)"):
        conv(torch.randn(2, 5, 3, 3), (24, 24))


def test_decoder_gradient_matches_finite_differences():
    torch.manual_seed(0)
    dec = ConvUpsamplingDecoder(3, 2, width=4, depth=1).double()
    fmap = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    target = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    mask = random_patch_mask(4, 4, 4, 2, 0.5)
    assert torch.autograd.gradcheck(lambda f: masked_reconstruction_loss(dec(f, (4, 4)), target, mask), (fmap,))


# -- the regularizer ----------------------------------------------------------------------------------------
def test_registered_preset_composes_and_resolves_the_display_statistics():
    assert REGULARIZERS["mrcl"] is MRCL
    cfg = OmegaConf.to_container(load_config(["regularizer=mrcl"]), resolve=True)["regularizer"]
    assert cfg["display_normalization"] == "imagenet" and cfg["display_dataset"] == "builtin"
    m, reg = make(**{k: v for k, v in cfg.items() if k != "name"})
    mean, _ = reg.display
    torch.testing.assert_close(mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    assert m.return_feature_maps and reg.needs_feature_maps


@pytest.mark.parametrize("views_opt", ["first", "both"])
def test_prepare_views_masks_the_chosen_views_and_keeps_the_clean_ones(views_opt):
    m, reg = make(masked_views=views_opt, fill_value=0.5, mask_ratio=0.5, contrastive_input="masked")
    views = views_for()
    ctx = StepContext(method=m, views=views)
    prepared = reg.prepare_views(views, ctx)
    cache = ctx.cache["mrcl"]
    indices = (0,) if views_opt == "first" else (0, 1)
    assert cache["indices"] == indices
    for k, i in enumerate(indices):
        assert cache["clean"][k] is views[i]
        hidden = cache["mask"][k].expand_as(views[i])
        assert torch.all(prepared[i][hidden] == 0.5) and torch.equal(prepared[i][~hidden], views[i][~hidden])
    if views_opt == "first":
        assert prepared[1] is views[1]
    clean_m, clean_reg = make(contrastive_input="clean")
    ctx = StepContext(method=clean_m, views=views)
    assert all(a is b for a, b in zip(clean_reg.prepare_views(views, ctx), views))
    assert ctx.cache["mrcl"]["masked"][0].shape == views[0].shape


@pytest.mark.parametrize("options", [dict(contrastive_input="masked"), dict(target_norm="patch", contrastive_input="masked"),
                                     dict(contrastive_input="clean"), dict(decoder="linear", contrastive_input="masked")],
                         ids=["masked-input", "patch-norm", "clean-input", "linear"])
def test_extra_loss_is_the_weighted_masked_mse_of_the_decoder(options):
    m, reg = make(rec_weight=0.7, **options)
    views = views_for()
    ctx = StepContext(method=m, views=views)
    prepared = reg.prepare_views(views, ctx)
    out = m(prepared)
    terms = reg.extra_loss(out, ctx)
    assert set(terms) == {"rec"}
    cache = ctx.cache["mrcl"]
    with torch.no_grad():
        fmap = m.backbone.forward_features(cache["masked"][0])
        if options.get("contrastive_input") != "clean":
            torch.testing.assert_close(fmap, out["fmap"][0])
        target = patch_normalize(views[0], 4) if options.get("target_norm") == "patch" else views[0]
        expected = masked_reconstruction_loss(reg.decoder(fmap, (16, 16)), target, cache["mask"][0])
    torch.testing.assert_close(terms["rec"].detach(), 0.7 * expected, rtol=1e-5, atol=1e-6)
    stats = reg.log_stats()
    assert set(stats) == {"rec_loss", "mask_ratio"}
    assert stats["rec_loss"] == pytest.approx(float(expected), rel=1e-5) and stats["mask_ratio"] == 0.25


@pytest.mark.parametrize("contrastive_input", ["masked", "clean"])
def test_rec_fraction_masks_and_reconstructs_only_the_first_samples(contrastive_input):
    m, reg = make(rec_weight=0.7, rec_fraction=0.3, contrastive_input=contrastive_input)
    views = views_for()
    batch = views[0].shape[0]
    n = math.ceil(0.3 * batch)
    assert reg.num_masked(batch) == n < batch and reg.num_masked(1) == 1
    ctx = StepContext(method=m, views=views)
    prepared = reg.prepare_views(views, ctx)
    cache = ctx.cache["mrcl"]
    assert cache["clean"][0].shape[0] == cache["mask"][0].shape[0] == cache["masked"][0].shape[0] == n
    torch.testing.assert_close(cache["clean"][0], views[0][:n])
    if contrastive_input == "masked":  # the rest of the view is untouched, the masked samples lead
        assert torch.equal(prepared[0][n:], views[0][n:]) and torch.equal(prepared[0][:n], cache["masked"][0])
    else:
        assert prepared[0] is views[0]
    out = m(prepared)
    terms = reg.extra_loss(out, ctx)
    with torch.no_grad():  # masked input: the map of the whole (partly masked) view, batch-norm over all of it
        fmap = out["fmap"][0][:n] if contrastive_input == "masked" else m.backbone.forward_features(cache["masked"][0])
        expected = masked_reconstruction_loss(reg.decoder(fmap, (16, 16)), views[0][:n], cache["mask"][0])
    torch.testing.assert_close(terms["rec"].detach(), 0.7 * expected, rtol=1e-5, atol=1e-6)


def test_loss_precision_float64_kept_bf16_raised_to_float32():
    m, reg = make()
    m.double(), reg.double()
    views = [v.double() for v in views_for()]
    ctx = StepContext(method=m, views=views)
    assert reg.extra_loss(m(reg.prepare_views(views, ctx)), ctx)["rec"].dtype == torch.float64
    m, reg = make()
    views = views_for()
    ctx = StepContext(method=m, views=views)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rec = reg.extra_loss(m(reg.prepare_views(views, ctx)), ctx)["rec"]
    assert rec.dtype == torch.float32 and torch.isfinite(rec)


@pytest.mark.parametrize("contrastive_input", ["masked", "clean"])
def test_reconstruction_gradient_reaches_the_encoder(contrastive_input):
    m, reg = make(contrastive_input=contrastive_input)
    views = views_for()
    ctx = StepContext(method=m, views=views)
    out = m(reg.prepare_views(views, ctx))
    reg.extra_loss(out, ctx)["rec"].backward()  # L_rec alone
    for name, p in m.backbone.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in reg.decoder.parameters())
    assert all(p.grad is None for p in m.projector.parameters())  # the heads are not on L_rec's path


def test_momentum_target_sees_the_masked_view_with_masked_input():
    m, reg = make("byol", contrastive_input="masked")
    views = views_for()
    ctx = StepContext(method=m, views=views)
    prepared = reg.prepare_views(views, ctx)
    out = m(prepared)
    torch.testing.assert_close(out["z_target"][0], m.target_embed(ctx.cache["mrcl"]["masked"][0]))
    assert not torch.allclose(out["z_target"][0], m.target_embed(views[0]))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_training_steps_with_every_base_method(method):
    m, reg = make(method)
    opt = encoder_opt(m, reg)
    decoder0 = [p.detach().clone() for p in reg.decoder.parameters()]
    for step in range(2):
        logs = training_step(m, reg, views_for(seed=step), None, opt, None, global_step=step)
        assert torch.isfinite(logs["loss"]) and torch.isfinite(logs["loss_rec"])
        assert float(logs["loss"]) == pytest.approx(float(logs["loss_base"] + logs["loss_rec"]), rel=1e-5)
        assert logs["reg/mask_ratio"] == 0.25 and logs["reg/rec_loss"] > 0
    assert any(not torch.equal(a, p.detach()) for a, p in zip(decoder0, reg.decoder.parameters()))  # trained by the encoder optimizer
    assert reg.samples["input"].shape == (8, 3, 16, 16) and reg.samples["input"].device.type == "cpu"


@pytest.mark.parametrize("options", [dict(masked_views="both"), dict(mask_type="block"), dict(mask_type="erase", mask_ratio=0.3),
                                     dict(contrastive_input="clean", target_norm="patch"), dict(decoder="linear", patch_size=2)],
                         ids=["both", "block", "erase", "clean-patchnorm", "linear-p2"])
def test_two_training_steps_with_options(options):
    m, reg = make("byol", **options)
    opt = encoder_opt(m, reg)
    for step in range(2):
        logs = training_step(m, reg, views_for(seed=step), None, opt, None, global_step=step)
        assert torch.isfinite(logs["loss"]) and logs["loss_rec"] > 0


def test_reconstruction_png_is_written(tmp_path):
    m, reg = make(target_norm="patch", display_normalization="imagenet")
    opt = encoder_opt(m, reg)
    training_step(m, reg, views_for(n=10), None, opt, None)
    assert reg.samples["reconstruction"].shape == (8, 3, 16, 16) and not reg.samples["reconstruction"].requires_grad
    reg.on_train_end(tmp_path / "run")
    png = (tmp_path / "run" / "reconstruction.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    plain_m, plain = make()  # no display statistics: stretched to [0, 1], still written
    training_step(plain_m, plain, views_for(n=4), None, encoder_opt(plain_m, plain), None)
    assert plain.samples["input"].shape[0] == 4
    plain.on_train_end(tmp_path / "plain")
    assert (tmp_path / "plain" / "reconstruction.png").is_file()
    _, fresh = make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh.on_train_end(tmp_path / "fresh")
    assert not (tmp_path / "fresh" / "reconstruction.png").exists() and "no training step" in str(caught[0].message)


# -- bad input: one clear line ---------------------------------------------------------------------------------
@pytest.mark.parametrize("options,fragment", [
    (dict(mask_type="grid"), "mask type must be one of patch, block, erase"),
    (dict(mask_ratio=1.0), "mask ratio must be in (0, 1)"),
    (dict(mask_ratio=0.0), "mask ratio must be in (0, 1)"),
    (dict(patch_size=0), "patch_size must be a positive integer"),
    (dict(masked_views="second"), "masked_views must be one of first, both"),
    (dict(contrastive_input="mixed"), "contrastive_input must be one of masked, clean"),
    (dict(decoder="mlp"), "decoder must be one of conv, linear"),
    (dict(decoder_depth=0), "decoder_depth must be a positive integer"),
    (dict(target_norm="pixel"), "target_norm must be one of none, patch"),
    (dict(rec_weight=-1.0), "rec_weight must be a number >= 0"),
    (dict(rec_fraction=0.0), "rec_fraction must be in (0, 1]"),
    (dict(rec_fraction=1.5), "rec_fraction must be in (0, 1]"),
    (dict(display_mean=[0.5, 0.5]), "display_mean and display_std must both be"),
    (dict(display_normalization="sRGB"), "unknown normalization 'sRGB'"),
])
def test_bad_options_are_one_clear_line(options, fragment):
    with pytest.raises(ValueError) as err:
        make(**options)
    assert fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("options,views,fragment", [
    (dict(patch_size=5), views_for(), "patch_size=5 does not divide the 16x16 views"),
    (dict(mask_type="erase", target_norm="patch", patch_size=5), views_for(), "patch_size=5 does not divide"),
    (dict(mask_ratio=0.1), views_for(size=8), "hides 0; choose a ratio"),
    (dict(), [torch.randn(4, 1, 16, 16)] * 2, "3-channel images"),
])
def test_bad_views_are_one_clear_line(options, views, fragment):
    m, reg = make(**options)
    with pytest.raises(ValueError) as err:
        reg.prepare_views(views, StepContext(method=m, views=views))
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_backbone_without_feature_maps_is_refused_in_one_line():
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    m = build_method("simclr", backbone, 4, proj_hidden_dim=8, proj_output_dim=4)
    with pytest.raises(ValueError) as err:
        build_regularizer("mrcl", m)
    assert "has no spatial feature map" in str(err.value) and "\n" not in str(err.value)


def test_extra_loss_without_prepare_views_says_what_to_do():
    m, reg = make()
    with pytest.raises(RuntimeError, match="prepare_views"):
        reg.extra_loss(m(views_for()), StepContext(method=m, views=views_for()))
