"""The background study tooling (docs/algorithms.md §5.6): foreground-only images, `metassl eval
background`, and the pure functions of benchmarks/background_study.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from metassl.cli import main
from metassl.data import DataConfigError, ImageDataset, build_data, validate_data_config
from metassl.data.builtin import FILL_REFERENCE_IMAGES, BuiltinShapes, generate_builtin, resolve_fill
from metassl.data.datasets import fill_background
from metassl.eval.background import background_gap, condition_scores, evaluate_background

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the fill


def test_fill_background_hand_case():
    images = torch.arange(2 * 3 * 2 * 2, dtype=torch.uint8).reshape(2, 3, 2, 2)
    masks = torch.tensor([[[1, 0], [0, 1]], [[0, 0], [1, 0]]], dtype=torch.uint8)
    out = fill_background(images, masks, [200, 100, 50])
    fill = torch.tensor([200, 100, 50], dtype=torch.uint8)
    for n in range(2):
        for i in range(2):
            for j in range(2):
                expected = images[n, :, i, j] if masks[n, i, j] else fill
                assert torch.equal(out[n, :, i, j], expected), (n, i, j)
    assert out.dtype == torch.uint8
    assert torch.equal(images[0, 0], torch.tensor([[0, 1], [2, 3]], dtype=torch.uint8))  # the input is untouched
    assert torch.equal(fill_background(images, masks[:, None], fill), out)  # (N, 1, H, W) masks too


@pytest.mark.parametrize(
    ("images", "masks", "fill", "match"),
    [
        (torch.zeros(1, 3, 2, 2), torch.ones(1, 2, 2), [0, 0, 0], "uint8 images"),
        (torch.zeros(1, 3, 2, 2, dtype=torch.uint8), torch.ones(1, 3, 3), [0, 0, 0], "do not match"),
        (torch.zeros(1, 3, 2, 2, dtype=torch.uint8), torch.ones(1, 2, 2), [0, 0, 256], "three integers"),
        (torch.zeros(1, 3, 2, 2, dtype=torch.uint8), torch.ones(1, 2, 2), [0.5, 0.5, 0.5], "three integers"),
    ],
)
def test_fill_background_rejects_bad_input(images, masks, fill, match):
    with pytest.raises(ValueError, match=match):
        fill_background(images, masks, fill)


def test_builtin_foreground_only_fills_outside_the_mask_with_the_mean_colour():
    kw = {"image_size": 16, "num_classes": 4, "seed": 3, "background_contrast": 1.0}
    full = BuiltinShapes("test", 40, background_class_correlation=0.5, **kw)
    fg = BuiltinShapes("test", 40, background_class_correlation=0.5, foreground_only=True, **kw)
    reference = generate_builtin(FILL_REFERENCE_IMAGES, "train", 16, 4, 3, 0.0, 1.0).images.double()
    mean = reference.mean(dim=(0, 2, 3)).round().to(torch.uint8)  # the "mean" fill, by hand
    assert torch.equal(fg.fill, mean) and full.fill is None
    inside = full.masks.bool()[:, None].expand_as(full.images)
    assert torch.equal(fg.images[inside], full.images[inside])  # the object is unchanged
    outside = fg.images.permute(0, 2, 3, 1)[~full.masks.bool()]  # (pixels, 3)
    assert outside.shape[0] > 0 and bool((outside == mean).all())
    assert not torch.equal(fg.images, full.images)
    # the train split of any correlation gets the same fill: train and test backgrounds match
    train = BuiltinShapes("train", 30, background_class_correlation=0.9, foreground_only=True, **kw)
    assert torch.equal(train.fill, fg.fill)
    explicit = BuiltinShapes("test", 40, foreground_only=True, foreground_fill=[0, 255, 7], **kw)
    outside = explicit.images.permute(0, 2, 3, 1)[~explicit.masks.bool()]
    assert bool((outside == torch.tensor([0, 255, 7], dtype=torch.uint8)).all())


@pytest.mark.parametrize("fill", ["grey", [1, 2], [1, 2, 300], [1.0, 2, 3]])
def test_resolve_fill_rejects_bad_values(fill):
    with pytest.raises(ValueError, match="'mean' or \\[r, g, b\\]"):
        resolve_fill(fill)


# ----------------------------------------------------------------------------- the data option


@pytest.mark.parametrize("key", ["foreground_only", "test_foreground_only", "foreground_fill"])
def test_mask_options_on_data_without_masks_fail_in_one_line(key):
    with pytest.raises(DataConfigError) as err:
        validate_data_config({"name": "cifar10", key: True})
    msg = str(err.value)
    assert len(msg.splitlines()) == 1 and f"data.{key}" in msg and "data=builtin" in msg and "masks" in msg


def test_foreground_fill_value_is_validated():
    with pytest.raises(DataConfigError, match="foreground_fill"):
        validate_data_config({"name": "builtin", "foreground_fill": [1, 2, 999]})
    with pytest.raises(DataConfigError, match="foreground_only must be true or false"):
        validate_data_config({"name": "builtin", "foreground_only": "yes"})
    c = validate_data_config({"name": "builtin"})
    assert c["foreground_only"] is False and c["test_foreground_only"] is False and c["foreground_fill"] == "mean"


def test_background_filled_copy_needs_masks():
    ds = ImageDataset(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), [0, 1])
    with pytest.raises(ValueError, match="data=builtin") as err:
        ds.with_background_filled([0, 0, 0])
    assert len(str(err.value).splitlines()) == 1


def test_build_data_applies_the_fill_before_augmentation_per_split():
    """`data.foreground_only` fills the train split (SSL views and kNN bank), `data.test_foreground_only`
    the test split; the SSL transform runs on the filled images."""
    base = {"name": "builtin", "num_train": 48, "num_test": 24, "image_size": 16, "background_contrast": 1.0}
    full = build_data(base)
    fg_train = build_data({**base, "foreground_only": True})
    fg_test = build_data({**base, "test_foreground_only": True})
    fill = resolve_fill("mean", image_size=16, seed=0, background_contrast=1.0)

    def filled(ds, ref):
        return torch.equal(ds.images, fill_background(ref.images, ref.masks, fill))

    assert filled(fg_train.train_ssl, full.train_ssl) and filled(fg_train.train_eval, full.train_eval)
    assert torch.equal(fg_train.test.images, full.test.images)
    assert filled(fg_test.test, full.test) and torch.equal(fg_test.train_ssl.images, full.train_ssl.images)
    # the augmentation reads the stored (filled) image: with an identity augmentation the view is the filled image
    ident = build_data({**base, "foreground_only": True, "normalization": "none"}, augmentation="none")
    view = ident.train_ssl[0][0][0]
    assert torch.allclose(view, ident.train_ssl.images[0].float() / 255.0, atol=1e-6)


# ----------------------------------------------------------------------------- the evaluation


def test_condition_scores_and_gap_on_a_hand_case():
    # bank: two clusters; the kNN (k=1) gets 2 of 3 test points right; no probe
    bank_x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    bank_y = torch.tensor([0, 0, 1, 1])
    test_x = torch.tensor([[1.0, 0.05], [0.05, 1.0], [0.8, 0.2]])
    test_y = torch.tensor([0, 1, 1])
    scores = condition_scores(bank_x, bank_y, test_x, test_y, 2, k=1, t=0.1)
    assert scores["knn"] == pytest.approx(2 / 3) and scores["linear"] is None
    gap = background_gap({"knn": 0.75, "linear": 0.5}, {"knn": 0.5, "linear": None})
    assert gap == {"knn": pytest.approx(0.25), "linear": None}
    with pytest.raises(ValueError, match="eval.linear"):
        condition_scores(bank_x, bank_y, test_x, test_y, 2, k=1, t=0.1, linear={"epochs": 1})


def _two_pixel_data(backgrounds: list[int], labels: list[int]) -> ImageDataset:
    """2x2 images: pixel (1, 1) is the object (20 for class 0, 220 for class 1), the rest background."""
    n = len(labels)
    images = torch.zeros(n, 3, 2, 2, dtype=torch.uint8)
    images[:, :, 0, 0] = torch.tensor(backgrounds, dtype=torch.uint8).view(-1, 1)
    images[:, :, 1, 1] = torch.tensor([20 + 200 * y for y in labels], dtype=torch.uint8).view(-1, 1)
    masks = torch.zeros(n, 2, 2, dtype=torch.uint8)
    masks[:, 1, 1] = 1
    return ImageDataset(images, labels, transform=lambda x: x.float() / 255.0, masks=masks)


class _PixelFeatures(torch.nn.Module):
    """Features (w * background pixel, object pixel, 0.5): w = 3 makes the background dominate."""

    def __init__(self, background_weight: float):
        super().__init__()
        self.w = background_weight

    def forward(self, x):
        return torch.stack([self.w * x[:, 0, 0, 0], x[:, 0, 1, 1], torch.full_like(x[:, 0, 0, 0], 0.5)], dim=1)


def test_evaluate_background_scores_each_condition_with_its_own_bank():
    """Hand case: in the bank the background is the class (250 for class 0, 0 for class 1); in the
    test split it is swapped.  A background-dominated model gets every full test image wrong (cosine
    to the wrong class: 0.63 vs 0.17 and 0.97 vs 0.32) and every foreground-only one right (the fill
    makes test and bank features of a class identical): full 0, foreground 1, gap -1.  A model that
    ignores the background scores 1 in both conditions."""
    bank = _two_pixel_data([250, 250, 0, 0], [0, 0, 1, 1])
    test = _two_pixel_data([0, 250], [0, 1])
    fill = [128, 128, 128]
    splits = {"full": (bank, test), "foreground": (bank.with_background_filled(fill), test.with_background_filled(fill))}
    report = evaluate_background(_PixelFeatures(3.0), None, splits, 2, k=1, t=0.1, batch_size=3)
    assert report["full"]["knn"] == 0.0 and report["foreground"]["knn"] == 1.0 and report["gap"] == {"knn": -1.0, "linear": None}
    report = evaluate_background(_PixelFeatures(0.0), None, splits, 2, k=1, t=0.1, batch_size=3)
    assert report["full"]["knn"] == 1.0 and report["foreground"]["knn"] == 1.0 and report["gap"]["knn"] == 0.0
    with pytest.raises(ValueError, match="conditions full, foreground"):
        evaluate_background(_PixelFeatures(0.0), None, {"full": (bank, test)}, 2, k=1, t=0.1)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("bg") / "run"
    args = ["train", "protocol=smoke", f"output_dir={out}", "data.num_train=160", "data.num_test=60",
            "method.proj_hidden_dim=64", "method.proj_output_dim=32", "data.background_class_correlation=0.8"]
    assert main(args) == 0
    return out / "checkpoints" / "last.ckpt"


def test_eval_background_end_to_end(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "bg.json"
    assert main(["eval", "background", "--ckpt", str(tiny_checkpoint), "eval.knn.k=5", "eval.knn.t=1.0",
                 "eval.linear.epochs=2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    for cond in ("full", "foreground"):
        assert 0.0 <= report[cond]["knn"] <= 1.0 and 0.0 <= report[cond]["linear"] <= 1.0
    for metric in ("knn", "linear"):
        assert report["gap"][metric] == pytest.approx(report["full"][metric] - report["foreground"][metric])
    assert report["knn"] == {"k": 5, "t": 1.0} and report["trained_foreground_only"] is False
    assert report["background_class_correlation"] == 0.8 and len(report["fill"]) == 3
    # the full condition is the ordinary offline kNN of the checkpoint
    assert main(["eval", "knn", "--ckpt", str(tiny_checkpoint), "eval.knn.k=5", "eval.knn.t=1.0"]) == 0
    assert json.loads(capsys.readouterr().out)["knn_top1_k5_t1"] == pytest.approx(report["full"]["knn"])
    # kNN only
    assert main(["eval", "background", "--ckpt", str(tiny_checkpoint), "eval.background.linear=false"]) == 0
    quick = json.loads(capsys.readouterr().out)
    assert quick["full"]["linear"] is None and quick["gap"]["linear"] is None and quick["gap"]["knn"] is not None


def test_eval_background_rejects_data_without_masks(tiny_checkpoint, tmp_path, capsys):
    state = torch.load(tiny_checkpoint, map_location="cpu", weights_only=False)
    state["hyper_parameters"]["cfg"]["data"] = {"name": "cifar10", "root": str(tmp_path)}
    other = tmp_path / "cifar.ckpt"
    torch.save(state, other)
    assert main(["eval", "background", "--ckpt", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data=builtin" in err and "cifar10" in err


# ----------------------------------------------------------------------------- the study script


def _study():
    spec = importlib.util.spec_from_file_location("background_study", ROOT / "benchmarks" / "background_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(full_knn, fg_knn, full_lin=None, fg_lin=None):
    return {"full": {"knn": full_knn, "linear": full_lin}, "foreground": {"knn": fg_knn, "linear": fg_lin},
            "gap": {"knn": full_knn - fg_knn, "linear": None if full_lin is None else full_lin - fg_lin}}


def test_study_table_means_and_paired_differences():
    st = _study()
    key = st.cell_key
    results = {
        key("simclr", "none", "full", 0): _row(0.50, 0.40, 0.6, 0.5),
        key("simclr", "none", "full", 1): _row(0.60, 0.44, 0.7, 0.5),
        key("simclr", "iclmsr", "full", 0): _row(0.55, 0.50, 0.6, 0.6),
        key("simclr", "iclmsr", "full", 1): _row(0.70, 0.50, 0.8, 0.6),
        key("simclr", "iclmsr", "full", 2): _row(0.99, 0.99, 0.9, 0.9),  # no base at seed 2: not paired
        key("simclr", "none", "foreground", 0): {"error": "train: boom"},  # unfinished: left out
    }
    seeds = [0, 1, 2]
    assert st.setting_values(results, "simclr", "none", "full", "full", "knn", seeds) == [0.50, 0.60]
    assert st.setting_values(results, "simclr", "none", "foreground", "full", "knn", seeds) == []
    diffs = st.paired_differences(results, "simclr", "iclmsr", "none", "full", "gap", "knn", seeds)
    assert diffs == pytest.approx([0.05 - 0.10, 0.20 - 0.16])
    assert st.fmt([0.50, 0.60]) == "55.0 ± 7.1 (n=2)"  # sample std of 50 and 60 points
    assert st.fmt([0.05], signed=True) == "+5.0 (n=1)" and st.fmt([]) == "—"
    text = st.table(results, ["simclr"], ["none", "iclmsr"], seeds)
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:3]): [c.strip() for c in line.strip("|").split("|")[3:]]
            for line in text.splitlines() if line.startswith("| simclr")}
    assert rows[("simclr", "none", "full")][:3] == ["55.0 ± 7.1 (n=2)", "42.0 ± 2.8 (n=2)", "+13.0 ± 4.2 (n=2)"]
    assert rows[("simclr", "none", "foreground")][0] == "—"
    assert "Paired differences" in text
    paired = [line for line in text.split("Paired differences")[1].splitlines() if line.startswith("| simclr | iclmsr | full")]
    assert paired[0].split("|")[4].strip() == "+7.5 ± 3.5 (n=2)"  # iclmsr − none on test full kNN: +5, +10 points


def test_study_merge_keeps_finished_cells_only(tmp_path):
    st = _study()
    mine = {"a": _row(0.5, 0.4), "b": {"error": "eval: x"}}
    theirs = {"b": _row(0.3, 0.2), "a": {"error": "train: y"}, "c": {"partial": True}}
    merged = st.merge_results(mine, [theirs])
    assert merged["a"] == mine["a"] and merged["b"] == theirs["b"] and "c" not in merged
    assert st.is_finished(merged["a"]) and not st.is_finished({"error": "x"}) and not st.is_finished(None)
    # --merge --no-run writes the JSON and the chart from the merged results without training
    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "study.json"
    a.write_text(json.dumps({"results": {st.cell_key("simclr", "none", "full", 0): _row(0.5, 0.4)}}))
    b.write_text(json.dumps({"results": {st.cell_key("simclr", "none", "foreground", 0): _row(0.3, 0.45)}}))
    st.main(["--regularizers", "none", "--seeds", "0", "--merge", str(a), str(b), "--no-run", "--out", str(out),
             "--runs", str(tmp_path / "runs")])
    doc = json.loads(out.read_text())
    assert set(doc["results"]) == {st.cell_key("simclr", "none", t, 0) for t in ("full", "foreground")}
    assert {"commit", "date", "machine", "command", "table", "study_knobs"} <= set(doc)
    assert out.with_suffix(".png").is_file() and not (tmp_path / "runs").exists()
