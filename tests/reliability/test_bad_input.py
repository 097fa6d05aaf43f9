"""Bad input: one line naming the fix, exit != 0, nothing already written lost."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from metassl.cli import main
from metassl.data.folder import load_image
from metassl.eval.knn import knn_accuracy

from reliability_helpers import error_lines, tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one intra-op thread (tests/conftest.py)

FOLDER = ["data=imagefolder", "data.image_size=16", "data.subset=null", "batch_size=8", "eval.knn.k=3"]
MODES = {
    "gray": lambda rng: Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8), "L"),
    "rgba": lambda rng: Image.fromarray(rng.integers(0, 256, (20, 24, 4), dtype=np.uint8), "RGBA"),
    "gray16": lambda rng: Image.fromarray(rng.integers(0, 65536, (20, 24), dtype=np.uint16)),
    "palette": lambda rng: Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).convert("P"),
    "rgb": lambda rng: Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)),
}


def make_folder(root, classes=("a", "b"), per_class=8, mode="rgb", seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            MODES[mode](rng).save(root / c / f"{i}.png")
    return root


def run_folder(tmp_path, *extra):
    args = tiny(tmp_path / "run", *FOLDER, f"data.train_dir={tmp_path / 'train'}", f"data.test_dir={tmp_path / 'test'}", *extra)
    return [a for a in args if not a.startswith("data.num_")]  # built-in data only


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("mode", ["gray", "rgba", "gray16", "palette"])
def test_image_modes_are_converted_to_rgb(tmp_path, mode):
    path = tmp_path / f"{mode}.png"
    MODES[mode](np.random.default_rng(0)).save(path)
    img = load_image(str(path), 16)
    assert img.dtype == torch.uint8 and img.shape == (3, 16, 16)
    ref = np.asarray(Image.open(path).convert("RGB").resize((16, 16))) if mode in ("rgba", "palette") else None
    if mode == "gray16":  # 16 bits scaled to 8, not clipped: a bright image stays bright
        assert int(img.max()) > 200
    if ref is not None:
        assert img.float().mean().item() == pytest.approx(float(ref.mean()), abs=8)


def test_mixed_modes_folder_trains(tmp_path):
    for i, mode in enumerate(MODES):
        make_folder(tmp_path / "train", per_class=4, mode=mode, seed=i)
        make_folder(tmp_path / "test", per_class=2, mode=mode, seed=10 + i)
        for c in ("a", "b"):  # distinct names per mode
            for p in (tmp_path / "train" / c).glob("[0-9].png"):
                p.rename(p.with_name(f"{mode}-{p.name}"))
            for p in (tmp_path / "test" / c).glob("[0-9].png"):
                p.rename(p.with_name(f"{mode}-{p.name}"))
    assert main(run_folder(tmp_path)) == 0


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_unreadable_image_names_the_file(tmp_path, capsys, damage):
    make_folder(tmp_path / "train")
    make_folder(tmp_path / "test", per_class=3)
    bad = tmp_path / "train" / "b" / "3.png"
    blob = bad.read_bytes()
    bad.write_bytes({"truncated": blob[: len(blob) // 3], "garbage": os.urandom(200), "empty": b""}[damage])
    assert main(run_folder(tmp_path)) == 2
    assert str(bad) in one_error(capsys)


@pytest.mark.parametrize("case", ["missing", "empty", "no_images"])
def test_missing_or_empty_dataset_folder(tmp_path, capsys, case):
    make_folder(tmp_path / "test", per_class=3)
    if case == "empty":
        (tmp_path / "train").mkdir()
    elif case == "no_images":
        (tmp_path / "train" / "a").mkdir(parents=True)
        (tmp_path / "train" / "a" / "notes.txt").write_text("x")
    assert main(run_folder(tmp_path)) == 2
    line = one_error(capsys)
    assert str(tmp_path / "train") in line and "<class>" in line or "images" in line


def test_mismatched_class_folders(tmp_path, capsys):
    make_folder(tmp_path / "train", classes=("a", "b"))
    make_folder(tmp_path / "test", classes=("a", "c"), per_class=3)
    assert main(run_folder(tmp_path)) == 2
    line = one_error(capsys)
    assert "c" in line.split(":")[-1] and "training classes" in line


def test_batch_larger_than_dataset(tmp_path, capsys):
    assert main(tiny(tmp_path / "run", "batch_size=512")) == 2
    assert "lower batch_size" in one_error(capsys)


def test_train_says_in_one_line_that_a_knn_k_larger_than_its_bank_is_clamped(tmp_path, capsys):
    assert main(tiny(tmp_path / "run", "eval.knn.k=100000")) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "larger than the kNN bank" in line]
    assert len(notes) == 1 and notes[0].startswith("metassl: note: kNN k=100000") and "votes with all" in notes[0]


def test_knn_k_larger_than_the_bank_is_clamped_in_the_library():
    g = torch.Generator().manual_seed(0)
    bank, labels = torch.randn(30, 8, generator=g), torch.randint(0, 3, (30,), generator=g)
    query, query_labels = torch.randn(10, 8, generator=g), torch.randint(0, 3, (10,), generator=g)
    assert knn_accuracy(bank, labels, query, query_labels, 3, k=1000, t=0.1) == knn_accuracy(bank, labels, query, query_labels, 3, k=30, t=0.1)


@pytest.mark.parametrize("override, words", [
    ("optimizer.lr=-0.1", "must be > 0"), ("trainer.max_epochs=0", "must be > 0"), ("batch_size=0", "must be > 0"),
    ("eval.knn.k=0", "must be > 0"), ("trainer.max_steps=0", "must be -1"), ("trainer.checkpoint_every_n_steps=-2", ">= 0"),
    ("trainer.skip_nonfinite_steps=-1", ">= 0"), ("trainer.gradient_clip_val=-1", "null"),
    ("trainer.limit_train_batches=0", "fraction"), ("trainer.log_every_n_steps=0", "must be > 0"),
    ("eval.val_fraction=1.5", "[0, 1)"), ("optimizer.weight_decay=-1", ">= 0"), ("batch_size=abc", "wrong type"),
])
def test_impossible_config_values(tmp_path, capsys, override, words):
    assert main(tiny(tmp_path / "run", override)) == 2
    line = one_error(capsys)
    assert override.split("=")[0] in line and words in line
    assert not (tmp_path / "run").exists()  # refused before anything is written


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root ignores directory permissions")
def test_read_only_run_folder(tmp_path, capsys):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        if os.access(parent, os.W_OK):
            pytest.skip("chmod has no effect here")
        assert main(tiny(parent / "run")) == 2
        assert "writable output_dir" in one_error(capsys)
    finally:
        parent.chmod(0o700)


def test_unwritable_run_folder_is_one_line(tmp_path, capsys):
    """Also as root: a run folder whose path runs through a file cannot be created."""
    (tmp_path / "file").write_text("x")
    assert main(tiny(tmp_path / "file" / "run")) == 2
    assert "writable output_dir" in one_error(capsys)
