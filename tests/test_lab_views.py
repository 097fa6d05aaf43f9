"""CIE Lab views (data.color_space=lab, data.lab_views): conversion, range, shared split crops, wiring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from metassl.data import DataConfigError, build_data
from metassl.data.batched_aug import BatchedViewAugment, build_batched_ssl_transform
from metassl.data.lab import (
    LAB_RANGES,
    LabNormalize,
    lab_to_unit_range,
    rgb_to_lab,
    rgb_to_lab_normalized,
)
from metassl.data.transforms import (
    build_eval_transform,
    build_ssl_transform,
    build_view_transform,
    resolve_augmentation,
)

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
#: the official CMC / MetAug augmentation: crop (0.2, 1) + flip, nothing photometric
OFFICIAL = {"crop_scale_min": 0.2, "crop_scale_max": 1.0, "flip_p": 0.5, "jitter_p": 0.0,
            "grayscale_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0}


def _pixels(*rgb: tuple[float, float, float], dtype=torch.float64) -> torch.Tensor:
    """(3, 1, n) image of the given colours."""
    return torch.tensor(rgb, dtype=dtype).T.unsqueeze(1)


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rgb_to_lab_matches_published_values(dtype):
    colours = [(1, 1, 1), (0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)]
    expected = torch.tensor([(100, 0, 0), (0, 0, 0), (53.24, 80.09, 67.20), (87.73, -86.18, 83.18),
                             (32.30, 79.19, -107.86)], dtype=torch.float64)
    lab = rgb_to_lab(_pixels(*colours, dtype=dtype)).squeeze(1).T.double()
    assert (lab - expected).abs().max().item() < 0.05


def _reference_lab(rgb: np.ndarray) -> np.ndarray:
    """Independent float64 sRGB → Lab: pixels as rows, XYZ by a matrix product, np.piecewise curves;
    the reference white is the matrix's image of RGB white (D65 to 7 digits)."""
    pixels = rgb.reshape(3, -1).T.astype(np.float64)
    linear = np.piecewise(pixels, [pixels <= 0.04045], [lambda c: c / 12.92, lambda c: ((c + 0.055) / 1.055) ** 2.4])
    to_xyz = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                       [0.0193339, 0.1191920, 0.9503041]])
    white = to_xyz @ np.ones(3)
    assert np.allclose(white, [0.95047, 1.0, 1.08883], atol=1e-6)
    xyz = linear @ to_xyz.T / white
    f = np.piecewise(xyz, [xyz > 216 / 24389], [np.cbrt, lambda t: (24389 / 27 * t + 16) / 116])
    lab = np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=1)
    return lab.T.reshape(rgb.shape)


def test_rgb_to_lab_matches_an_independent_float64_implementation():
    rgb = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rgb[:, 0, :] *= 0.03  # the linear parts of both curves
    reference = torch.from_numpy(_reference_lab(rgb.numpy()))
    assert (rgb_to_lab(rgb) - reference).abs().max().item() < 1e-9
    assert (rgb_to_lab(rgb.float()).double() - reference).abs().max().item() < 2e-3


def test_batched_input_equals_per_image_input():
    rgb = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    batched = rgb_to_lab_normalized(rgb)
    assert batched.shape == rgb.shape and batched.dtype == torch.float32
    for i in range(4):
        torch.testing.assert_close(batched[i], rgb_to_lab_normalized(rgb[i]))
    as_uint8 = (rgb * 255).round().to(torch.uint8)
    torch.testing.assert_close(rgb_to_lab_normalized(as_uint8), rgb_to_lab_normalized(as_uint8.float() / 255))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_conversion_matches_cpu():
    rgb = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(rgb_to_lab_normalized(rgb.cuda()).cpu(), rgb_to_lab_normalized(rgb), atol=1e-5, rtol=0)


def test_bad_conversion_input_raises_one_clear_error():
    with pytest.raises(ValueError, match="float"):
        rgb_to_lab(torch.zeros(3, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, H, W\)"):
        rgb_to_lab(torch.zeros(4, 4, 4))


# ----------------------------------------------------------------------------- normalised range


def test_gamut_ranges_are_the_cube_corners_extremes():
    corners = _pixels(*[(r, g, b) for r in (0, 1) for g in (0, 1) for b in (0, 1)])
    lab = rgb_to_lab(corners).reshape(3, -1)
    for channel, (lo, hi) in enumerate(LAB_RANGES):
        assert lab[channel].min().item() == pytest.approx(lo, abs=1e-9)
        assert lab[channel].max().item() == pytest.approx(hi, abs=1e-9)
    assert LAB_RANGES[1] == pytest.approx((-86.18, 98.23), abs=0.01)
    assert LAB_RANGES[2] == pytest.approx((-107.86, 94.48), abs=0.01)


def test_every_rgb_input_lands_in_minus_one_one():
    corners = _pixels(*[(r, g, b) for r in (0, 1) for g in (0, 1) for b in (0, 1)])
    norm = rgb_to_lab_normalized(corners).reshape(3, -1)
    assert norm.abs().max().item() <= 1.0 + 1e-12
    assert torch.allclose(norm.amin(1), -torch.ones(3, dtype=torch.float64), atol=1e-12)  # the range is tight
    assert torch.allclose(norm.amax(1), torch.ones(3, dtype=torch.float64), atol=1e-12)
    g = torch.linspace(0, 1, 41, dtype=torch.float64)
    grid = torch.cartesian_prod(g, g, g).T.reshape(3, 41, -1)  # the whole cube, interior included
    assert rgb_to_lab_normalized(grid).abs().max().item() <= 1.0 + 1e-12
    random = torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(3))
    assert rgb_to_lab_normalized(random).abs().max().item() <= 1.0 + 1e-6  # float32 rounding


def test_unit_range_is_affine_with_mid_value_zero():
    mids = torch.tensor([(lo + hi) / 2 for lo, hi in LAB_RANGES], dtype=torch.float64).view(3, 1, 1)
    assert lab_to_unit_range(mids).abs().max().item() < 1e-12


# ----------------------------------------------------------------------------- split views share one crop


def _check_split(views: list[torch.Tensor], full: torch.Tensor) -> None:
    lum, chroma = views
    assert lum.shape == chroma.shape == full.shape
    assert torch.equal(lum[..., 0, :, :], full[..., 0, :, :]) and not lum[..., 1:, :, :].any()
    assert torch.equal(chroma[..., 1:, :, :], full[..., 1:, :, :]) and not chroma[..., 0, :, :].any()


def test_per_sample_split_views_share_the_crop():
    split = build_ssl_transform("moco_v2", 32, MEAN, STD, overrides=OFFICIAL, color_space="lab", lab_views="split")
    _, params = resolve_augmentation("moco_v2", 32, OFFICIAL)
    full_lab = build_view_transform(params, 0, 32, MEAN, STD, "lab")
    image = _images(1, 48, seed=4)[0]
    for seed in range(5):
        torch.manual_seed(seed)
        views = split(image)
        torch.manual_seed(seed)
        _check_split(views, full_lab(image))
    torch.manual_seed(0)
    first, second = full_lab(image), full_lab(image)  # the test can tell crops apart
    assert not torch.equal(first, second)


def test_batched_split_views_share_the_crop():
    split = build_batched_ssl_transform("moco_v2", 32, MEAN, STD, overrides=OFFICIAL, color_space="lab", lab_views="split")
    _, params = resolve_augmentation("moco_v2", 32, OFFICIAL)
    full_lab = BatchedViewAugment(params, 0, 32, MEAN, STD, "lab")
    images = _images(16, 48, seed=5)
    gen = torch.Generator().manual_seed(6)
    views = split(images, torch.Generator().manual_seed(6))
    _check_split(views, full_lab(images, gen))
    two = build_batched_ssl_transform("moco_v2", 32, MEAN, STD, overrides=OFFICIAL, color_space="lab")(images, _gen(6))
    assert len(two) == 2 and not torch.equal(two[0], two[1])  # full: two independent Lab crops


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_batched_matches_per_sample_on_a_border_touching_crop():
    """Whole-image crops (RandomResizedCrop's fallback at scale 1) flipped: the two paths must agree."""
    whole = {**OFFICIAL, "crop_scale_min": 1.0, "flip_p": 1.0}
    per_sample = build_ssl_transform("moco_v2", 32, MEAN, STD, overrides=whole, color_space="lab", lab_views="split")
    batched = build_batched_ssl_transform("moco_v2", 32, MEAN, STD, overrides=whole, color_space="lab", lab_views="split")
    images = _images(8, 32, seed=7)
    views = batched(images, _gen(8))
    torch.manual_seed(9)
    for i in range(8):
        reference = per_sample(images[i])
        expected = LabNormalize()(TF.horizontal_flip(images[i].float() / 255))
        assert (reference[0][0] - expected[0]).abs().max().item() < 1e-5
        for v in range(2):
            assert (views[v][i] - reference[v]).abs().max().item() <= 1e-4, (i, v)


def test_eval_transform_converts_to_full_lab_in_both_paths():
    from metassl.data.batched_aug import BatchedEvalView

    images = _images(4, 32, seed=10)
    per_sample = build_eval_transform(32, MEAN, STD, color_space="lab")
    batched = BatchedEvalView(32, MEAN, STD, "lab")(images)
    for i in range(4):
        expected = rgb_to_lab_normalized(images[i])
        torch.testing.assert_close(per_sample(images[i]), expected)
        torch.testing.assert_close(batched[i], expected)


# ----------------------------------------------------------------------------- build_data wiring


def _builtin(**extra):
    return {"name": "builtin", "num_train": 32, "num_test": 8, "color_space": "lab", "lab_views": "split",
            "aug": dict(OFFICIAL), **extra}


def test_build_data_split_items_have_the_right_shapes():
    bundle = build_data(_builtin(), augmentation="moco_v2", num_views=2, clean_view=True)
    views, _, extras = bundle.train_ssl[3]
    assert len(views) == 2 and all(v.shape == (3, 32, 32) and v.dtype == torch.float32 for v in views)
    assert not views[0][1:].any() and not views[1][0].any() and views[0][0].any() and views[1][1:].any()
    image, _ = bundle.test[0]
    assert image.shape == (3, 32, 32) and image.abs().max().item() <= 1.0 + 1e-6
    torch.testing.assert_close(extras["clean"], bundle.train_eval[3][0])
    torch.testing.assert_close(image, rgb_to_lab_normalized(bundle.test.images[0]))
    assert bundle.mean[0] == 50.0 and bundle.std[0] == 50.0  # Lab units, as CMC's Normalize


def test_build_data_on_device_gives_split_batch_views():
    bundle = build_data(_builtin(augment_on="device"), augmentation="moco_v2", num_views=2, clean_view=True)
    batch = torch.stack([bundle.train_ssl[i][0] for i in range(8)])
    views = bundle.batch_views(batch, _gen(0))
    assert len(views) == 2 and all(v.shape == (8, 3, 32, 32) for v in views)
    assert not views[0][:, 1:].any() and not views[1][:, 0].any()
    torch.testing.assert_close(bundle.batch_clean(batch)[2], bundle.train_eval[2][0], atol=1e-5, rtol=0)


def test_full_lab_views_are_two_independent_lab_images():
    bundle = build_data(_builtin(lab_views="full"), augmentation="moco_v2", num_views=2)
    torch.manual_seed(0)
    views, _ = bundle.train_ssl[0]
    assert len(views) == 2 and views[0][1:].any() and views[1][0].any() and not torch.equal(views[0], views[1])


@pytest.mark.parametrize(("extra", "message"), [
    ({"color_space": "rgb", "lab_views": "split"}, "set data.color_space=lab"),
    ({"mean": [0.5] * 3, "std": [0.2] * 3}, "drop data.mean and data.std"),
    ({"color_space": "hsv"}, "rgb, lab"),
    ({"lab_views": "three"}, "full, split"),
])
def test_bad_combinations_raise_one_data_config_error(extra, message):
    with pytest.raises(DataConfigError, match=message):
        build_data(_builtin(**extra), augmentation="moco_v2")


def test_builders_refuse_split_with_rgb():
    with pytest.raises(DataConfigError, match="set data.color_space=lab"):
        build_ssl_transform("simclr", 32, MEAN, STD, lab_views="split")
    with pytest.raises(DataConfigError, match="set data.color_space=lab"):
        build_batched_ssl_transform("simclr", 32, MEAN, STD, lab_views="split")


def test_metaug_official_smoke_run_trains_on_split_lab_views(tmp_path):
    import yaml

    from metassl.cli import main

    args = ["train", "protocol=smoke", "regularizer=metaug", "paper=metaug_official", "trainer.max_steps=3",
            "trainer.max_epochs=1", "eval.knn_init=false", "data=builtin", "backbone=convnet_small",
            "batch_size=16", "data.subset=64", "eval.linear.epochs=1", f"output_dir={tmp_path}"]
    assert main(args) == 0
    data = yaml.safe_load((tmp_path / "config.yaml").read_text())["data"]
    assert (data["color_space"], data["lab_views"], data["aug"]["jitter_p"]) == ("lab", "split", 0.0)
