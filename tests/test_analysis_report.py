"""`metassl analyze` end to end on tiny checkpoints: report.html + analysis.json, the HTML is
self-contained, the feature cache is reused, exported backbones, one-line errors, the per-epoch
label-free metrics in metrics.csv, and (where Chromium is installed) a headless rendering."""

import base64
import csv
import io
import json
import math
import os
import re
import shutil
import subprocess

import pytest
import torch
from PIL import Image

from metassl.cli import main

TINY = ["protocol=smoke", "data.num_train=160", "data.num_test=60", "method.proj_hidden_dim=64",
        "method.proj_output_dim=32", "trainer.max_steps=-1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    out = {}
    for name, extra in (("metamask", ["regularizer=metamask"]), ("base", [])):
        assert main(["train", *TINY, *extra, f"output_dir={root / name}"]) == 0
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def report(runs):
    ckpt = runs["metamask"] / "checkpoints" / "last.ckpt"
    assert main(["analyze", "--ckpt", str(ckpt), "--compare", str(runs["base"] / "checkpoints" / "last.ckpt"),
                 "--precision", "fp32"]) == 0  # fp32 here: the bf16 test below compares against it
    return runs["metamask"] / "analysis"


def test_report_and_json_are_written_with_every_section(report):
    assert (report / "report.html").is_file() and (report / "features.pt").is_file()
    figures = sorted(p.name for p in (report / "figures").glob("*.png"))
    assert any(n.startswith("a_") for n in figures) and any(n.startswith("b_") for n in figures)
    page = (report / "report.html").read_text()
    assert page.count("<img") == len(figures)  # every picture of the page is also a file
    record = json.loads((report / "analysis.json").read_text())
    a, b = record["runs"]
    assert a["run"]["regularizer"] == "metamask" and b["run"]["regularizer"] == "none"
    assert set(a["spaces"]) == {"backbone", "backbone_transformed", "projector", "projector_transformed"}
    assert set(b["spaces"]) == {"backbone", "projector"}
    space = a["spaces"]["backbone"]
    for key in ("dead_fraction", "off_diagonal_energy", "effective_rank", "rankme", "alignment", "uniformity", "knn"):
        assert isinstance(space[key], float) and math.isfinite(space[key]), key
    assert len(space["std"]) == space["dim"] == 256
    assert 0 < space["effective_rank"] <= space["dim"] and -4.0 <= space["uniformity"] <= 0.0
    assert a["evaluated_space"] == "backbone_transformed" and b["evaluated_space"] == "backbone"
    ablated = a["ablation"]["backbone"]
    assert ablated["group_size"] == 8 and ablated["removals"] == 32 and len(ablated["knn"]["rows"]) == 32
    assert "linear" in ablated and "mask_comparison" in ablated  # MetaMask's mask is a per-dimension gate
    assert len(ablated["mask_comparison"]["mask"]) == 256
    assert "mask_comparison" not in b["ablation"]["backbone"]
    # the built-in data has foreground masks: background dependence is measured
    bg = a["background"]
    assert bg["gap"] == pytest.approx(bg["knn_full"] - bg["knn_foreground"]) and 0 <= bg["background_knn"] <= 1
    assert a["features"]["splits"] == {"train": 128, "test": 60, "test_foreground": 60}  # protocol=smoke: subset 128
    assert a["embedding"]["points"] == 60


def test_html_is_self_contained(report):
    page = (report / "report.html").read_text()
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", page)
    assert "http://" not in page and "https://" not in page
    sources = re.findall(r"<img[^>]*\ssrc=\"([^\"]+)\"", page)
    assert len(sources) >= 10 and len(sources) == page.count("<img")
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
        assert image.format == "PNG" and image.size[0] > 100
        image.verify()


def test_second_analysis_reads_the_feature_cache(report, runs, tmp_path):
    ckpt = runs["metamask"] / "checkpoints" / "last.ckpt"
    shutil.copy(report / "features.pt", tmp_path / "features.pt")
    assert main(["analyze", "--ckpt", str(ckpt), "--out", str(tmp_path), "--no-linear", "--precision", "fp32"]) == 0
    record = json.loads((tmp_path / "analysis.json").read_text())["runs"][0]
    first = json.loads((report / "analysis.json").read_text())["runs"][0]
    assert record["features"]["from_cache"] and "linear" not in record["ablation"]["backbone"]
    assert record["spaces"]["backbone"]["rankme"] == first["spaces"]["backbone"]["rankme"]
    assert record["ablation"]["backbone"]["knn"]["rows"] == first["ablation"]["backbone"]["knn"]["rows"]


def test_bf16_extraction_matches_fp32_and_has_its_own_cache(report, runs, tmp_path):
    ckpt = runs["metamask"] / "checkpoints" / "last.ckpt"
    shutil.copy(report / "features.pt", tmp_path / "features.pt")  # an fp32 cache must not be reused for bf16
    assert main(["analyze", "--ckpt", str(ckpt), "--out", str(tmp_path), "--no-linear", "--precision", "bf16"]) == 0
    record = json.loads((tmp_path / "analysis.json").read_text())
    first = json.loads((report / "analysis.json").read_text())["runs"][0]
    assert record["options"]["precision"] == "bf16" and not record["runs"][0]["features"]["from_cache"]
    assert record["runs"][0]["features"]["precision"] == "bf16"
    fp32 = torch.load(report / "features.pt")["splits"]["test"]["backbone"]
    bf16 = torch.load(tmp_path / "features.pt")["splits"]["test"]["backbone"]
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape
    assert torch.nn.functional.cosine_similarity(bf16, fp32, dim=1).min() > 0.99
    got, want = record["runs"][0]["spaces"]["backbone"], first["spaces"]["backbone"]
    assert got["rankme"] == pytest.approx(want["rankme"], rel=0.05)


def test_exported_backbone_is_analysed_with_backbone_and_data_options(runs, tmp_path):
    exported = tmp_path / "backbone.pt"
    assert main(["export", "--ckpt", str(runs["base"] / "checkpoints" / "last.ckpt"), "--out", str(exported)]) == 0
    out = tmp_path / "report"
    args = ["analyze", "--ckpt", str(exported), "--backbone", "convnet_small", "--out", str(out),
            "data.num_train=160", "data.num_test=60", "data.subset=128", "eval.batch_size=128"]
    assert main(args) == 0
    record = json.loads((out / "analysis.json").read_text())["runs"][0]
    assert record["run"]["kind"] == "exported backbone" and list(record["spaces"]) == ["backbone"]
    base = json.loads((runs["base"] / "summary.json").read_text())
    assert record["spaces"]["backbone"]["knn"] == pytest.approx(base["knn_top1"], abs=1e-6)  # same weights, same kNN


def _one_line_error(capsys, args) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("metassl: error:")
    return err


def test_bad_inputs_give_one_line_errors(runs, tmp_path, capsys):
    assert "not found" in _one_line_error(capsys, ["analyze", "--ckpt", str(tmp_path / "missing.ckpt")])
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    assert "not a PyTorch checkpoint" in _one_line_error(capsys, ["analyze", "--ckpt", str(junk)])
    foreign = tmp_path / "foreign.pt"
    torch.save({"epoch": 3, "model": "resnet"}, foreign)
    assert "not a metassl checkpoint" in _one_line_error(capsys, ["analyze", "--ckpt", str(foreign)])
    exported = tmp_path / "backbone.pt"
    assert main(["export", "--ckpt", str(runs["base"] / "checkpoints" / "last.ckpt"), "--out", str(exported)]) == 0
    capsys.readouterr()
    assert "--backbone" in _one_line_error(capsys, ["analyze", "--ckpt", str(exported)])
    assert "does not fit backbone" in _one_line_error(capsys, ["analyze", "--ckpt", str(exported), "--backbone", "resnet18"])
    ckpt = str(runs["base"] / "checkpoints" / "last.ckpt")
    assert "drop --backbone" in _one_line_error(capsys, ["analyze", "--ckpt", ckpt, "--backbone", "resnet18"])
    unlabelled = tmp_path / "images"
    unlabelled.mkdir()
    err = _one_line_error(capsys, ["analyze", "--ckpt", str(exported), "--backbone", "convnet_small", "data=imagefolder",
                                   f"data.train_dir={unlabelled}", "data.labelled=false"])
    assert "labelled" in err
    assert "only eval.*" in _one_line_error(capsys, ["analyze", "--ckpt", ckpt, "trainer.max_epochs=3"])


def test_training_logs_label_free_metrics_every_epoch(runs):
    rows = [r for r in csv.DictReader(open(runs["base"] / "metrics.csv")) if r.get("val/rankme")]
    assert rows
    for row in rows:
        rankme, uniformity, alignment = (float(row[f"val/{k}"]) for k in ("rankme", "uniformity", "alignment"))
        assert 1.0 <= rankme <= 256 and -4.0 <= uniformity <= 0.0 and 0.0 <= alignment <= 4.0


def test_report_renders_in_headless_chromium(report, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("METASSL_REQUIRE_CHROMIUM") == "1":  # set by .ci/run, which installs it
            pytest.fail("METASSL_REQUIRE_CHROMIUM=1 but chromium is not on PATH (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    shot = tmp_path / "shot.png"
    page = (report / "report.html").resolve().as_uri()
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1400,3000",
           "--virtual-time-budget=5000", "--enable-logging=stderr", "--v=0", f"--screenshot={shot}", page]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    log = done.stderr
    assert "Failed to load resource" not in log and "Uncaught" not in log and "net::ERR" not in log
    image = Image.open(shot).convert("L")
    assert image.size == (1400, 3000)
    lo, hi = image.getextrema()
    assert hi - lo > 100  # text and pictures, not a blank page
    artifacts = os.environ.get("METASSL_TEST_ARTIFACTS")  # .ci/run keeps the screenshot there
    if artifacts:
        os.makedirs(artifacts, exist_ok=True)
        shutil.copy(shot, os.path.join(artifacts, "analysis_report_screenshot.png"))
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page],
                         capture_output=True, text=True, timeout=120)
    assert "What the representation looks like" in dom.stdout and dom.stdout.count("<img") >= 10
