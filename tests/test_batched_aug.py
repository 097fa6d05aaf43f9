"""Batched view augmentation against the per-sample torchvision pipeline it replaces."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from metassl.data import DataConfigError
from metassl.data.batched_aug import (
    BatchedViewAugment,
    build_batched_ssl_transform,
    check_images,
    color_jitter_batch,
    crop_resize,
    gaussian_blur_batch,
    grayscale_where,
    sample_crop_boxes,
    solarize_where,
)
from metassl.data.transforms import (
    ColorJitterFast,
    ScaleNormalize,
    blur_kernel_size,
    build_eval_transform,
    build_ssl_transform,
    resolve_augmentation,
)

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
N_DRAWS = 20000
#: every stage on: byol view 1 at 64 px has blur 0.1 and solarize 0.2; raise them for coverage
ALL_STAGES = {"blur_p": 0.6, "solarize_p": 0.5}


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _view(augmentation="byol", view=1, image_size=64, overrides=None) -> BatchedViewAugment:
    _, params = resolve_augmentation(augmentation, image_size, overrides)
    return BatchedViewAugment(params, view, image_size, MEAN, STD)


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov–Smirnov statistic: the largest gap between the two ECDFs."""
    a, b = a.double().flatten().sort().values, b.double().flatten().sort().values
    points = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, points, right=True) / a.numel()
    cdf_b = torch.searchsorted(b, points, right=True) / b.numel()
    return (cdf_a - cdf_b).abs().max().item()


def ks_critical(n: int, m: int, alpha: float = 1e-3) -> float:
    """Asymptotic KS critical value c(alpha) * sqrt((n + m) / (n m))."""
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


def _interior(crop: int, size: int) -> torch.Tensor:
    """Output positions whose bilinear sample point lies inside the crop (no edge clamping)."""
    src = (torch.arange(size) + 0.5) * crop / size - 0.5
    return (src >= 0) & (src <= crop - 1)


def _row(params: dict, i: int) -> dict:
    return {k: v[i].tolist() for k, v in params.items()}


def _reference_view(img: torch.Tensor, p: dict, aug: BatchedViewAugment) -> torch.Tensor:
    """Sample ``p``'s view built from torchvision functional ops and the pipeline's own ops."""
    s = aug.p
    x = TF.resized_crop(img.float() / 255, p["top"], p["left"], p["height"], p["width"],
                        [aug.image_size] * 2, antialias=True)
    if p["flip"]:
        x = TF.horizontal_flip(x)
    if p["jitter"]:
        x = _reference_jitter(x, p, s)
    if p["gray"] and s["grayscale_p"] > 0:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if p["blur"] and s["blur_p"] > 0:
        x = TF.gaussian_blur(x, [aug.kernel_size] * 2, [p["sigma"]] * 2)
    if p["solarize"] and s["solarize_p"] > 0:
        x = TF.solarize(x, 0.5)
    return ScaleNormalize(MEAN, STD)(x)


def _reference_jitter(x: torch.Tensor, p: dict, s: dict) -> torch.Tensor:
    cj = ColorJitterFast(s["brightness"], s["contrast"], s["saturation"], s["hue"])
    f = p["factors"]
    on = [s[k] > 0 for k in ("brightness", "contrast", "saturation", "hue")]
    params = {"order": p["order"], **{k: (f[i] if on[i] else None) for i, k in enumerate("bcsh")}}
    return cj.transform(x, params)


# ----------------------------------------------------------------------------- exactness given params


def test_crop_upscale_interior_matches_torchvision():
    images, size = _images(48, 32), 64
    p = sample_crop_boxes(48, 32, 32, (0.08, 1.0), _gen(1))
    out = crop_resize(images, p["top"], p["left"], p["height"], p["width"], size) / 255
    worst_interior, diffs = 0.0, []
    for i in range(48):
        r = _row(p, i)
        ref = TF.resized_crop(images[i].float() / 255, r["top"], r["left"], r["height"], r["width"], [size] * 2, antialias=True)
        inside = _interior(r["height"], size)[:, None] & _interior(r["width"], size)[None, :]
        d = (out[i] - ref).abs()
        worst_interior = max(worst_interior, d[:, inside].max().item())
        diffs.append(d)
    assert worst_interior <= 1e-4
    assert torch.stack(diffs).mean().item() < 0.01  # only the half-pixel rim of each crop differs


def test_crop_touching_the_image_border_is_exact_everywhere():
    images = _images(4, 32)
    full = torch.zeros(4, dtype=torch.long), torch.full((4,), 32)
    out = crop_resize(images, full[0], full[0], full[1], full[1], 64) / 255
    ref = TF.resize(images.float() / 255, [64, 64], antialias=True)
    assert (out - ref).abs().max().item() <= 1e-5


def test_crop_downscale_is_close_to_antialiased_resize():
    images, size = _images(32, 96), 64
    p = sample_crop_boxes(32, 96, 96, (0.7, 1.0), _gen(2))
    assert (p["height"] > size).all()
    out = crop_resize(images, p["top"], p["left"], p["height"], p["width"], size) / 255
    ref = torch.stack([TF.resized_crop(images[i].float() / 255, *(_row(p, i)[k] for k in ("top", "left", "height", "width")),
                                       [size] * 2, antialias=True) for i in range(32)])
    d = (out - ref).abs()
    assert d.mean().item() < 0.02 and d.max().item() < 0.5  # uint8 noise: the hardest case for a low-pass


def test_full_view_matches_reference_on_border_touching_crops():
    aug, images = _view(overrides=ALL_STAGES), _images(64, 32, seed=3)
    p = aug.sample(64, 32, 32, _gen(4))
    p.update(top=torch.zeros(64, dtype=torch.long), left=torch.zeros(64, dtype=torch.long),
             height=torch.full((64,), 32), width=torch.full((64,), 32))
    out = aug.apply(images, p)
    assert {k for k in ("flip", "jitter", "gray", "blur", "solarize") if p[k].any() and not p[k].all()} == {
        "flip", "jitter", "gray", "blur", "solarize"}
    for i in range(64):
        assert (out[i] - _reference_view(images[i], _row(p, i), aug)).abs().max().item() <= 1e-4, i


def test_full_view_close_to_reference_on_random_crops():
    aug, images = _view(overrides=ALL_STAGES), _images(32, 32, seed=5)
    p = aug.sample(32, 32, 32, _gen(6))
    out = aug.apply(images, p)
    ref = torch.stack([_reference_view(images[i], _row(p, i), aug) for i in range(32)])
    assert (out - ref).abs().mean().item() < 0.03  # normalised units (1/std ~ 4x the [0, 1] scale)


def _floats(n=24, size=16, seed=7) -> torch.Tensor:
    return _images(n, size, seed).float() / 255


def test_jitter_stage_matches_colorjitterfast_per_sample():
    aug = _view("simclr", 0, 32)
    x, p = _floats(), aug.sample(24, 16, 16, _gen(8))
    out = color_jitter_batch(x, p["factors"], p["order"], p["jitter"], aug.enabled)
    assert p["jitter"].any() and not p["jitter"].all()
    for i in range(24):
        r = _row(p, i)
        ref = _reference_jitter(x[i], r, aug.p) if r["jitter"] else x[i]
        assert (out[i] - ref).abs().max().item() <= 1e-5, (i, r["order"])


def test_jitter_stage_skips_disabled_ops():
    aug = _view("simclr", 0, 32, {"brightness": 0.0, "hue": 0.0, "jitter_p": 1.0})
    x, p = _floats(), aug.sample(24, 16, 16, _gen(9))
    assert aug.enabled == (1, 2)
    out = color_jitter_batch(x, p["factors"], p["order"], p["jitter"], aug.enabled)
    ref = torch.stack([_reference_jitter(x[i], _row(p, i), aug.p) for i in range(24)])
    assert (out - ref).abs().max().item() <= 1e-5


def test_grayscale_blur_solarize_stages_match_torchvision():
    x, bits = _floats(), torch.arange(24) % 3 == 0
    gray = grayscale_where(x, bits)
    sol = solarize_where(x, bits)
    sigma = torch.linspace(0.1, 2.0, 24)
    k = blur_kernel_size(64)
    blur = gaussian_blur_batch(x, sigma, k)
    for i in range(24):
        g_ref = TF.rgb_to_grayscale(x[i], num_output_channels=3) if bits[i] else x[i]
        s_ref = TF.solarize(x[i], 0.5) if bits[i] else x[i]
        assert (gray[i] - g_ref).abs().max().item() <= 1e-5
        assert torch.equal(sol[i], s_ref)
        b_ref = TF.gaussian_blur(x[i], [k, k], [sigma[i].item()] * 2)
        assert (blur[i] - b_ref).abs().max().item() <= 1e-5, sigma[i]


# ----------------------------------------------------------------------------- parameter distributions


@pytest.fixture(scope="module")
def torchvision_crops():
    torch.manual_seed(0)
    rrc = v2.RandomResizedCrop(32, scale=(0.08, 1.0))
    image = torch.empty(3, 48, 64)
    rows = [rrc.make_params([image]) for _ in range(N_DRAWS)]
    return {k: torch.tensor([r[k] for r in rows]) for k in ("top", "left", "height", "width")}


def _crop_stats(c: dict) -> dict:
    h, w = c["height"].double(), c["width"].double()
    return {"area": h * w / (48 * 64), "aspect": w / h, "top": c["top"], "left": c["left"],
            "top_frac": c["top"] / (48 - h + 1), "left_frac": c["left"] / (64 - w + 1)}


def test_crop_distributions_match_torchvision_ks(torchvision_crops):
    ours = _crop_stats(sample_crop_boxes(N_DRAWS, 48, 64, (0.08, 1.0), _gen(10)))
    theirs = _crop_stats(torchvision_crops)
    crit = ks_critical(N_DRAWS, N_DRAWS)
    for key in ours:
        assert ks_statistic(ours[key], theirs[key]) < crit, key


def test_ks_rejects_a_wrong_scale_range(torchvision_crops):
    wrong = _crop_stats(sample_crop_boxes(N_DRAWS, 48, 64, (0.2, 1.0), _gen(11)))
    assert ks_statistic(wrong["area"], _crop_stats(torchvision_crops)["area"]) > 3 * ks_critical(N_DRAWS, N_DRAWS)


def test_crop_fallback_is_torchvisions_central_crop():
    ours = sample_crop_boxes(64, 1, 1000, (0.08, 1.0), _gen(12))  # no try can fit: always the fallback
    theirs = v2.RandomResizedCrop(8).make_params([torch.empty(3, 1, 1000)])
    for k in ("top", "left", "height", "width"):
        assert (ours[k] == theirs[k]).all(), k


def test_bernoulli_rates_within_four_std():
    aug = _view(overrides={"blur_p": 0.3, "solarize_p": 0.2})
    p = aug.sample(N_DRAWS, 32, 32, _gen(13))
    for key, rate in {"flip": 0.5, "jitter": 0.8, "gray": 0.2, "blur": 0.3, "solarize": 0.2}.items():
        std = math.sqrt(rate * (1 - rate) / N_DRAWS)
        assert abs(p[key].double().mean().item() - rate) < 4 * std, key


def test_jitter_factors_match_colorjitterfast_and_order_is_uniform():
    aug = _view()
    p = aug.sample(N_DRAWS, 32, 32, _gen(14))
    torch.manual_seed(1)
    cj = ColorJitterFast(0.4, 0.4, 0.2, 0.1)
    rows = [cj.make_params([]) for _ in range(N_DRAWS)]
    crit = ks_critical(N_DRAWS, N_DRAWS)
    for op, (key, strength) in enumerate({"b": 0.4, "c": 0.4, "s": 0.2, "h": 0.1}.items()):
        ours, theirs = p["factors"][:, op], torch.tensor([r[key] for r in rows])
        lo, hi = (-strength, strength) if key == "h" else (1 - strength, 1 + strength)
        assert lo <= ours.min().item() and ours.max().item() <= hi, key
        assert ks_statistic(ours, theirs) < crit, key
    codes = (p["order"] * torch.tensor([64, 16, 4, 1])).sum(1)
    assert (p["order"].sort(dim=1).values == torch.arange(4)).all()
    counts = torch.bincount(codes, minlength=256)[codes.unique()].double()
    assert counts.numel() == 24
    expected = N_DRAWS / 24
    assert ((counts - expected) ** 2 / expected).sum().item() < 49.73  # chi-square, 23 dof, alpha = 0.001


def test_blur_sigma_matches_gaussianblur_ks():
    p = _view().sample(N_DRAWS, 32, 32, _gen(15))
    torch.manual_seed(2)
    gb = v2.GaussianBlur(7, sigma=(0.1, 2.0))
    theirs = torch.tensor([gb.make_params([])["sigma"][0] for _ in range(N_DRAWS)])
    assert ks_statistic(p["sigma"], theirs) < ks_critical(N_DRAWS, N_DRAWS)


def test_view_statistics_match_per_sample_pipeline():
    images, n = _images(600, 32, seed=16), 600
    batched = build_batched_ssl_transform("simclr", 32, MEAN, STD, num_views=1)(images, _gen(17))[0]
    torch.manual_seed(3)
    per_sample = build_ssl_transform("simclr", 32, MEAN, STD, num_views=1)
    reference = torch.stack([per_sample(images[i])[0] for i in range(n)])
    crit = ks_critical(n, n)
    for stat in (lambda v: v.mean(dim=(1, 2, 3)), lambda v: v.std(dim=(1, 2, 3)), lambda v: v[:, 0].mean(dim=(1, 2))):
        assert ks_statistic(stat(batched), stat(reference)) < crit


# ----------------------------------------------------------------------------- behaviour


def test_same_seed_same_views_other_seed_differs():
    t, images = build_batched_ssl_transform("byol", 32, MEAN, STD), _images(16, 32)
    a, b, c = t(images, _gen(0)), t(images, _gen(0)), t(images, _gen(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], a[1])
    aug = t.transforms[0]
    p = aug.sample(16, 32, 32, _gen(5))
    assert torch.equal(aug.apply(images, p), aug.apply(images, p))


def test_shapes_and_dtypes():
    views = build_batched_ssl_transform("simclr", 32, MEAN, STD, num_views=3)(_images(8, 32), _gen(0))
    assert len(views) == 3 and all(v.shape == (8, 3, 32, 32) and v.dtype == torch.float32 for v in views)
    down = build_batched_ssl_transform("vicreg", 64, MEAN, STD)(_images(8, 96), _gen(0))
    assert all(v.shape == (8, 3, 64, 64) and torch.isfinite(v).all() for v in down)


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(2, 3, 8, 8), "uint8"),
    (torch.zeros(3, 8, 8, dtype=torch.uint8), "(B, 3, H, W)"),
    (torch.zeros(2, 1, 8, 8, dtype=torch.uint8), "(B, 3, H, W)"),
    ([torch.zeros(3, 8, 8, dtype=torch.uint8)], "torch.Tensor"),
])
def test_bad_images_raise_one_clear_error(bad, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_images(bad)
    with pytest.raises(ValueError):
        build_batched_ssl_transform("simclr", 32, MEAN, STD)(bad, _gen(0))


@pytest.mark.parametrize("kwargs, message", [
    ({"num_views": 0}, "num_views"),
    ({"overrides": {"crop_scale_min": 0.0}}, "crop scale"),
    ({"overrides": {"flip_p": 1.5}}, "probability"),
    ({"overrides": {"hue": 0.7}}, "hue"),
    ({"overrides": {"nope": 1}}, "unknown augmentation key"),
    ({"std": (0.2, 0.0, 0.2)}, "std"),
    ({"mean": (0.5, 0.5)}, "3 values"),
])
def test_bad_parameters_raise_value_error(kwargs, message):
    args = {"augmentation": "simclr", "image_size": 32, "mean": MEAN, "std": STD, **kwargs}
    with pytest.raises(ValueError, match=message):
        build_batched_ssl_transform(**args)


@pytest.mark.parametrize("overrides, message", [
    ({"flip_p": 1.5}, "flip_p is a probability"),
    ({"grayscale_p": -0.1}, "grayscale_p is a probability"),
    ({"jitter_p": 2.0}, "jitter_p is a probability"),
    ({"solarize_p": [0.0, 1.2]}, "solarize_p is a probability"),
    ({"brightness": -0.4}, "jitter strengths"),
    ({"hue": 0.7}, "hue must be in"),
    ({"crop_scale_min": 0.0}, "crop scale"),
])
def test_per_sample_and_batched_paths_refuse_the_same_strengths(overrides, message):
    """A bad strength fails at build time with the same one-line error whichever ``data.augment_on``
    is chosen (the per-sample pipeline used to leave probabilities to torchvision at call time)."""
    for build in (build_ssl_transform, build_batched_ssl_transform):
        with pytest.raises(DataConfigError, match=message):
            build("simclr", 32, MEAN, STD, overrides=overrides)


def test_none_augmentation_is_the_eval_transform():
    for stored in (32, 48):
        images = _images(6, stored)
        views = build_batched_ssl_transform("none", 32, MEAN, STD, num_views=2)(images, _gen(0))
        ref = build_eval_transform(32, MEAN, STD, stored_size=stored)
        expected = torch.stack([ref(images[i]) for i in range(6)])
        assert len(views) == 2 and all((v - expected).abs().max().item() <= 1e-5 for v in views)


def test_byol_views_differ_as_the_family_says():
    t = build_batched_ssl_transform("byol", 64, MEAN, STD, num_views=4)
    assert [v.p["blur_p"] for v in t.transforms] == [1.0, 0.1, 1.0, 0.1]
    assert [v.p["solarize_p"] for v in t.transforms] == [0.0, 0.2, 0.0, 0.2]
    first, second = (v.sample(4000, 64, 64, _gen(i)) for i, v in enumerate(t.transforms[:2]))
    assert first["blur"].all() and not first["solarize"].any()
    assert abs(second["blur"].double().mean().item() - 0.1) < 0.02
    assert abs(second["solarize"].double().mean().item() - 0.2) < 0.03


def test_small_images_have_no_blur_at_32_px():
    t = build_batched_ssl_transform("simclr", 32, MEAN, STD)
    assert all(v.p["blur_p"] == 0.0 for v in t.transforms)
    assert t(_images(4, 32), _gen(0))[0].shape == (4, 3, 32, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batch_matches_cpu_given_the_same_generator():
    t, images = build_batched_ssl_transform("byol", 64, MEAN, STD, overrides=ALL_STAGES), _images(32, 96)
    cpu = t(images, _gen(0))
    gpu = t(images.cuda(), _gen(0))
    for a, b in zip(cpu, gpu):
        assert b.is_cuda and (a - b.cpu()).abs().max().item() < 1e-3


# ----------------------------------------------------------------------------- data.augment_on=device


def _builtin(**extra):
    return {"name": "builtin", "num_train": 64, "num_test": 16, **extra}


def test_build_data_on_device_yields_uint8_items_and_batched_views():
    from metassl.data import build_data

    bundle = build_data(_builtin(augment_on="device"), augmentation="simclr", num_views=2, clean_view=True)
    image, label = bundle.train_ssl[3]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and isinstance(label, int)
    batch = torch.stack([bundle.train_ssl[i][0] for i in range(8)])
    views = bundle.batch_views(batch, torch.Generator().manual_seed(0))
    reference = build_data(_builtin(), augmentation="simclr", num_views=2).train_ssl[3][0]
    assert len(views) == 2 and views[0].shape == (8, *reference[0].shape) and views[0].dtype == reference[0].dtype
    clean = bundle.batch_clean(batch)
    eval_image = bundle.train_eval[3][0]
    assert torch.allclose(clean[3], eval_image, atol=1e-6)  # the un-augmented view: the eval transform
    loader_bundle = build_data(_builtin(), augmentation="simclr", num_views=2)
    assert loader_bundle.batch_views is None and loader_bundle.batch_clean is None


def test_masks_need_the_per_sample_path():
    from metassl.data import build_data

    with pytest.raises(DataConfigError, match="augment_on=loader"):
        build_data(_builtin(augment_on="device", return_mask=True))
    with pytest.raises(DataConfigError, match="loader, device"):
        build_data(_builtin(augment_on="gpu"))


def test_training_on_device_views_is_reproducible_and_logs_images_per_s(tmp_path):
    import csv

    from metassl.cli import main

    args = ["train", "protocol=smoke", "data.augment_on=device", "trainer.max_steps=3", "eval.knn_init=false"]
    assert main([*args, f"output_dir={tmp_path / 'a'}"]) == 0
    assert main([*args, f"output_dir={tmp_path / 'b'}"]) == 0
    rows = [list(csv.DictReader(open(tmp_path / r / "metrics.csv"))) for r in ("a", "b")]
    losses = [[r["train/loss"] for r in rs if r.get("train/loss")] for rs in rows]
    assert losses[0] == losses[1] and len(losses[0]) == 3  # views seeded by (seed, rank, epoch, batch)
    rates = [float(r["train/images_per_s"]) for r in rows[0] if r.get("train/images_per_s")]
    assert len(rates) == 1 and rates[0] > 0


def test_device_views_give_a_base_and_a_regularized_run_the_same_batches(tmp_path, monkeypatch):
    """Paired comparisons: with data.augment_on=device the data order (seed, epoch) and the views
    (seed, rank, epoch, batch) do not depend on what else the run draws from the global generator
    (a regularizer's parameters are initialised from it)."""
    from metassl.cli import main
    from metassl.engine.module import SSLModule

    seen: dict[str, list] = {}
    original = SSLModule._views_on_device

    def record(self, images, batch_idx, extras):
        views, extras = original(self, images, batch_idx, extras)
        seen.setdefault(self.cfg["regularizer"]["name"], []).append([v.clone() for v in views])
        return views, extras

    monkeypatch.setattr(SSLModule, "_views_on_device", record)
    args = ["train", "protocol=smoke", "data.augment_on=device", "trainer.max_steps=3", "eval.knn_init=false"]
    for reg in ("none", "mrcl"):
        assert main([*args, f"regularizer={reg}", f"output_dir={tmp_path / reg}"]) == 0
    assert len(seen["none"]) == len(seen["mrcl"]) == 3
    for a, b in zip(seen["none"], seen["mrcl"]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
