"""Tests of the data layer (tiny data, CPU, a few seconds)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from metassl.data import (
    BACKGROUNDS,
    BuiltinShapes,
    CorruptImageError,
    DataConfigError,
    DatasetNotFoundError,
    ImageDataset,
    MultiViewTransform,
    build_data,
    data_config_keys,
    generate_builtin,
    validate_data_config,
)
from metassl.data import builtin as builtin_mod
from metassl.data.transforms import (
    adjust_contrast_fast,
    adjust_hue_fast,
    adjust_saturation_fast,
    resolve_augmentation,
)

SMALL = {"name": "builtin", "num_train": 60, "num_test": 20}


# ----------------------------------------------------------------------------- builtin


def test_builtin_deterministic_balanced_prefix_stable():
    a = generate_builtin(50, "train", seed=3)
    b = generate_builtin(50, "train", seed=3)
    assert a.images.shape == (50, 3, 32, 32) and a.images.dtype == torch.uint8
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks) and torch.equal(a.labels, b.labels)
    assert torch.bincount(a.labels, minlength=10).tolist() == [5] * 10
    assert not torch.equal(a.images, generate_builtin(50, "train", seed=4).images)
    assert not torch.equal(a.images, generate_builtin(50, "test", seed=3).images)
    short = generate_builtin(17, "train", seed=3)  # the first images do not depend on N
    assert torch.equal(short.images, a.images[:17]) and torch.equal(short.labels, a.labels[:17])


def test_builtin_masks_mark_the_object():
    d = generate_builtin(40, "train", seed=1)
    m = d.masks
    assert m.shape == (40, 32, 32) and m.dtype == torch.uint8
    assert set(m.unique().tolist()) <= {0, 1}
    area = m.float().mean(dim=(1, 2))
    assert (area > 0.01).all() and (area < 0.6).all()
    # object pixels differ in colour from the background pixels around them
    img = d.images.float()
    diffs = []
    for i in range(len(m)):
        fg = m[i].bool()
        ring = torch.nn.functional.max_pool2d(m[i][None, None].float(), 7, 1, 3)[0, 0].bool() & ~fg
        diffs.append((img[i][:, fg].mean(1) - img[i][:, ring].mean(1)).abs().max())
    assert (torch.stack(diffs) > 25).float().mean() >= 0.9


def test_background_class_correlation():
    n = 400
    tied = generate_builtin(n, seed=2, background_class_correlation=1.0)
    assert torch.equal(tied.backgrounds, tied.labels % len(BACKGROUNDS))
    free = generate_builtin(n, seed=2, background_class_correlation=0.0)
    assert (free.backgrounds == free.labels % len(BACKGROUNDS)).float().mean() < 0.25
    assert len(free.backgrounds.unique()) == len(BACKGROUNDS)
    half = generate_builtin(n, seed=2, background_class_correlation=0.5)
    assert 0.35 < (half.backgrounds == half.labels).float().mean() < 0.75


def test_builtin_disk_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin_mod, "_MEMORY_CACHE", {})
    a = BuiltinShapes("test", 12, root=tmp_path)
    files = list((tmp_path / "builtin").glob("*.pt"))
    assert len(files) == 1
    monkeypatch.setattr(builtin_mod, "_MEMORY_CACHE", {})
    monkeypatch.setattr(builtin_mod, "generate_builtin", lambda *a, **k: pytest.fail("cache not used"))
    b = BuiltinShapes("test", 12, root=tmp_path)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)


# ----------------------------------------------------------------------------- views and transforms


def test_views_shapes_and_normalisation():
    b = build_data(SMALL, "simclr", num_views=3)
    assert b.num_classes == 10 and b.image_size == 32 and b.name == "builtin"
    views, label = b.train_ssl[0]
    assert isinstance(views, list) and len(views) == 3
    assert all(v.shape == (3, 32, 32) and v.dtype == torch.float32 for v in views)
    assert 0 <= label < 10
    img, label = b.test[3]
    raw = b.test.images[3].float() / 255
    mean, std = torch.tensor(b.mean).view(3, 1, 1), torch.tensor(b.std).view(3, 1, 1)
    torch.testing.assert_close(img, (raw - mean) / std)
    assert b.mean == (0.485, 0.456, 0.406)
    plain = build_data({**SMALL, "normalization": "none"}, "byol", 2)
    v = plain.train_ssl[1][0]
    assert all(0.0 <= x.min() and x.max() <= 1.0 for x in v)
    assert build_data({**SMALL, "normalization": "cifar"}).mean[0] == pytest.approx(0.4914)


def test_subset_and_masks_through_views():
    b = build_data({**SMALL, "subset": 10, "return_mask": True}, "simclr", 2)
    assert len(b.train_ssl) == 10 and len(b.train_eval) == 10 and len(b.test) == 20
    views, label, masks = b.train_ssl[0]
    assert len(views) == len(masks) == 2 and masks[0].shape == (1, 32, 32)
    img, label, mask = b.test[0]
    assert mask.shape == (1, 32, 32) and img.shape == (3, 32, 32)


def test_mask_follows_geometric_ops():
    m = generate_builtin(8, seed=5).masks
    ds = ImageDataset(
        (m * 255)[:, None].expand(-1, 3, -1, -1).contiguous(), torch.zeros(8), masks=m, return_mask=True,
        transform=MultiViewTransform([v2.Compose([v2.RandomResizedCrop(32, scale=(0.3, 1.0)), v2.RandomHorizontalFlip()])]),
    )
    for i in range(8):
        (view,), _, (mask,) = ds[i]
        assert ((view[0] > 127) == mask[0].bool()).float().mean() > 0.9


def test_fast_color_ops_match_torchvision():
    x = torch.rand(2, 3, 16, 16)
    for h in (-0.3, 0.1, 0.45):
        torch.testing.assert_close(adjust_hue_fast(x, h), TF.adjust_hue(x, h), atol=1e-5, rtol=0)
    torch.testing.assert_close(adjust_contrast_fast(x[0], 1.3), TF.adjust_contrast(x[0], 1.3), atol=1e-5, rtol=0)
    torch.testing.assert_close(adjust_saturation_fast(x, 0.4), TF.adjust_saturation(x, 0.4), atol=1e-5, rtol=0)


def test_augmentation_families():
    fam, p = resolve_augmentation("byol", 96)
    assert fam == "byol" and p["blur_p"] == [1.0, 0.1] and p["solarize_p"] == [0.0, 0.2] and p["saturation"] == 0.2
    assert resolve_augmentation("simclr", 32)[1]["blur_p"] == 0.0  # no blur on 32 px images
    assert resolve_augmentation("simclr", 96)[1]["blur_p"] == [0.5]
    assert resolve_augmentation("moco_v2", 32, {"hue": 0.2})[1]["crop_scale_min"] == 0.2
    with pytest.raises(DataConfigError, match="unknown augmentation"):
        build_data(SMALL, "nope")


# ----------------------------------------------------------------------------- config


def test_unknown_config_keys():
    with pytest.raises(DataConfigError) as e:
        validate_data_config({"name": "cifar10", "roots": "/x"})
    msg = str(e.value)
    assert "roots" in msg and "root" in msg and "download" in msg and "\n" not in msg
    with pytest.raises(DataConfigError, match="data.aug.*valid keys.*crop_scale_min"):
        validate_data_config({"name": "builtin", "aug": {"blurr": 1}})
    with pytest.raises(DataConfigError, match="valid names"):
        validate_data_config({"name": "mnist"})
    with pytest.raises(DataConfigError, match="image_size"):
        validate_data_config({"name": "builtin", "image_size": "big"})
    assert {"train_dir", "eval_train_dir", "test_dir", "labelled"} <= data_config_keys("imagefolder")
    assert "num_train" in data_config_keys("builtin") and "num_train" not in data_config_keys("cifar10")


def test_yaml_presets_validate():
    yaml = pytest.importorskip("yaml")
    folder = Path(__file__).resolve().parents[1] / "src" / "metassl" / "configs" / "data"
    names = {p.stem for p in folder.glob("*.yaml")}
    assert names == {"builtin", "cifar10", "cifar100", "stl10", "imagefolder"}
    for p in folder.glob("*.yaml"):
        cfg = validate_data_config(yaml.safe_load(p.read_text()))
        assert cfg["name"] == p.stem


# ----------------------------------------------------------------------------- CIFAR / STL in torchvision format


def _write_fake_cifar(root: Path, rng: np.random.Generator, per_batch: int = 6, n_test: int = 10):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        entry = {"batch_label": name, "labels": labels, "data": data, "filenames": [f"{i}.png" for i in range(n)]}
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh, protocol=2)
        batches[name] = (data, labels)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072}, fh)
    return batches


def test_fake_cifar10_loads(tmp_path):
    batches = _write_fake_cifar(tmp_path, np.random.default_rng(0))
    b = build_data({"name": "cifar10", "root": str(tmp_path), "normalization": "none"}, "simclr")
    assert len(b.train_ssl) == 30 and len(b.train_eval) == 30 and len(b.test) == 10
    assert b.num_classes == 10 and b.classes[0] == "airplane"
    data, labels = batches["data_batch_2"]
    img, label = b.train_eval[6]  # first image of the second batch
    assert label == labels[0]
    expected = torch.from_numpy(data[0].reshape(3, 32, 32)).float() / 255
    torch.testing.assert_close(img, expected)
    views, label = b.train_ssl[0]
    assert len(views) == 2 and views[0].shape == (3, 32, 32)
    assert len(build_data({"name": "cifar10", "root": str(tmp_path), "subset": 7}).train_ssl) == 7


def test_missing_cifar_one_clear_error(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        build_data({"name": "cifar100", "root": str(tmp_path)})
    msg = str(e.value)
    assert str(tmp_path / "cifar-100-python") in msg and "data.download=true" in msg and "\n" not in msg


def test_failed_download_leaves_nothing(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    def broken(url, download_root, filename=None, md5=None, **kw):
        (Path(download_root) / filename).write_bytes(b"partial")
        (Path(download_root) / "cifar-10-batches-py").mkdir()
        raise OSError("network is unreachable")

    monkeypatch.setattr(tvu, "download_and_extract_archive", broken)
    with pytest.raises(DatasetNotFoundError, match="download .* failed .*network is unreachable"):
        build_data({"name": "cifar10", "root": str(tmp_path), "download": True})
    assert list(tmp_path.iterdir()) == []


def test_fake_stl10_loads(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    rng = np.random.default_rng(0)
    imgs = {}
    for split, n in (("train", 4), ("test", 3), ("unlabeled", 5)):
        x = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        x.transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")  # the binaries are column-major
        imgs[split] = x
        if split != "unlabeled":
            (rng.integers(1, 11, n).astype(np.uint8)).tofile(folder / f"{split}_y.bin")
    for in_memory in (True, False):
        b = build_data({"name": "stl10", "root": str(tmp_path), "in_memory": in_memory, "normalization": "none"})
        assert len(b.train_ssl) == 9 and len(b.train_eval) == 4 and len(b.test) == 3
        assert b.train_ssl.labels[:5].tolist() == [-1] * 5
        img, label = b.test[2]
        torch.testing.assert_close(img, torch.from_numpy(imgs["test"][2]).float() / 255)
        assert 0 <= label < 10 and b.train_ssl[0][0][0].shape == (3, 96, 96)


# ----------------------------------------------------------------------------- image folders


def _write_images(folder: Path, n: int, size=(32, 32), ext="png", seed=0, mode="RGB"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).convert(mode).save(folder / f"{i:03d}.{ext}")


def test_imagefolder_labelled(tmp_path):
    _write_images(tmp_path / "train" / "cat", 5, ext="png")
    _write_images(tmp_path / "train" / "dog", 4, size=(40, 30), ext="jpg", seed=1)
    _write_images(tmp_path / "train" / "dog" / "more", 2, ext="jpg", mode="L", seed=2)
    _write_images(tmp_path / "test" / "cat", 2, seed=3)
    _write_images(tmp_path / "test" / "dog", 3, seed=4)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    cfg = {"name": "imagefolder", "root": str(tmp_path)}
    b = build_data(cfg, "simclr")
    assert b.classes == ("cat", "dog") and b.num_classes == 2
    assert len(b.train_ssl) == 11 and len(b.train_eval) == 11 and len(b.test) == 5
    assert b.train_eval.labels.tolist() == [0] * 5 + [1] * 6
    assert b.train_ssl.images is b.train_eval.images  # decoded once, shared
    views, label = b.train_ssl[7]
    assert views[0].shape == (3, 32, 32) and label == 1
    lazy = build_data({**cfg, "in_memory": False}, "simclr")
    for i in range(len(b.test)):
        torch.testing.assert_close(lazy.test[i][0], b.test[i][0])
    assert lazy.train_ssl[9][0][1].shape == (3, 32, 32)
    cached = build_data({**cfg, "cache_dir": str(tmp_path / "cache")})
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    again = build_data({**cfg, "cache_dir": str(tmp_path / "cache")})
    assert torch.equal(cached.train_eval.images, again.train_eval.images)
    sub = build_data({**cfg, "subset": 4})
    assert set(sub.train_eval.labels.tolist()) == {0, 1}  # spread over the sorted folder


def test_imagefolder_relative_root(tmp_path, monkeypatch):
    """A relative data.root (e.g. ../data/cifar10) resolves once, not twice."""
    _write_images(tmp_path / "x" / "data" / "train" / "a", 3)
    _write_images(tmp_path / "x" / "data" / "test" / "a", 2, seed=1)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    b = build_data({"name": "imagefolder", "root": "../x/data"})
    assert len(b.train_ssl) == 3 and len(b.train_eval) == 3 and len(b.test) == 2


def test_imagefolder_unlabelled(tmp_path):
    _write_images(tmp_path / "unl" / "a" / "b", 3)
    _write_images(tmp_path / "unl", 2, ext="jpg", seed=1)
    _write_images(tmp_path / "ev" / "x", 2, seed=2)
    _write_images(tmp_path / "ev" / "y", 2, seed=3)
    b = build_data({"name": "imagefolder", "train_dir": str(tmp_path / "unl"), "labelled": False})
    assert len(b.train_ssl) == 5 and b.train_ssl.labels.tolist() == [-1] * 5
    assert b.train_eval is None and b.test is None and b.num_classes == 0
    b = build_data({
        "name": "imagefolder", "root": str(tmp_path), "train_dir": "unl", "labelled": False,
        "eval_train_dir": "ev", "test_dir": "ev",
    }, "byol", 2)
    assert len(b.train_ssl) == 5 and len(b.train_eval) == 4 and b.num_classes == 2
    assert b.train_ssl[4][0][1].shape == (3, 32, 32)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "train")):
        build_data({"name": "imagefolder", "root": str(tmp_path)})
    _write_images(tmp_path / "train" / "a", 3)
    _write_images(tmp_path / "test" / "a", 1)
    bad = tmp_path / "train" / "a" / "001.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(CorruptImageError, match=str(bad)):
        build_data({"name": "imagefolder", "root": str(tmp_path)})
    lazy = build_data({"name": "imagefolder", "root": str(tmp_path), "in_memory": False})
    lazy.train_ssl[0]
    with pytest.raises(CorruptImageError, match=str(bad)):
        lazy.train_ssl[1]
    truncated = tmp_path / "test" / "a" / "000.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(CorruptImageError, match=str(truncated)):
        lazy.test[0]


def test_augmentation_for_every_method():
    """Each method maps to an augmentation the data layer knows: its own recipe where there is
    one (moco_v2: crop scale 0.2), else the family its class declares."""
    from metassl.data import augmentation_for, augmentation_names
    from metassl.methods import METHODS
    from metassl.methods.base import get_method_class

    for name in METHODS:
        aug = augmentation_for(name)
        assert aug in augmentation_names()
        assert resolve_augmentation(aug, 32)[0] == get_method_class(name).augmentation
    assert resolve_augmentation(augmentation_for("moco_v2"), 32)[1]["crop_scale_min"] == 0.2
