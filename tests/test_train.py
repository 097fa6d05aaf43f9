"""End-to-end: `metassl train` smoke runs, the run folder, resume, eval and export."""

import csv
import json

import pytest
import torch

from metassl.cli import main
from metassl.methods import METHODS

SUMMARY_KEYS = {"knn_top1", "epochs", "method", "regularizer", "backbone", "dataset", "seed"}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "simclr"
    args = ["train", "protocol=smoke", f"output_dir={out}", "data.num_train=160", "data.num_test=60",
            "method.proj_hidden_dim=64", "method.proj_output_dim=32", "trainer.max_steps=-1"]
    assert main(args) == 0
    return out


def test_run_folder_contents(trained_run):
    out = trained_run
    for name in ("config.yaml", "metrics.csv", "summary.json", "curves.png", "checkpoints/last.ckpt", "knn_init.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert 0.0 <= summary["knn_top1"] <= 1.0
    init = json.loads((out / "knn_init.json").read_text())
    assert init["k"] == summary["knn"]["k"] and init["t"] == summary["knn"]["t"]
    assert 0.0 < summary["knn_top1_init"] == init["knn_top1_init"] <= 1.0
    assert summary["precision"] in ("bf16-mixed", "32-true")  # trainer.precision=auto, resolved
    assert summary["method"] == "simclr" and summary["dataset"] == "builtin" and summary["steps"] == 4  # 128 images / batch 32
    metrics = (out / "metrics.csv").read_text()
    assert "train/loss" in metrics


def test_existing_run_is_not_overwritten(trained_run, capsys):
    before = (trained_run / "checkpoints" / "last.ckpt").read_bytes()
    code = main(["train", "protocol=smoke", f"output_dir={trained_run}", "data.num_train=160", "data.num_test=60"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "resume=auto" in err and len(err.splitlines()) == 1
    assert (trained_run / "checkpoints" / "last.ckpt").read_bytes() == before


def test_resume_auto_continues(trained_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "resumed"
    shutil.copytree(trained_run, out)
    # the untrained kNN recorded by the first run is kept, not recomputed (a marker value shows it)
    record = json.loads((out / "knn_init.json").read_text())
    (out / "knn_init.json").write_text(json.dumps({**record, "knn_top1_init": 0.0123}))
    args = ["train", "protocol=smoke", f"output_dir={out}", "data.num_train=160", "data.num_test=60",
            "method.proj_hidden_dim=64", "method.proj_output_dim=32", "trainer.max_steps=-1", "trainer.max_epochs=2",
            "resume=auto"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["epochs"] == 2
    assert summary["knn_top1_init"] == 0.0123
    assert "(untrained 0.0123)" in capsys.readouterr().out
    # last.ckpt is the last epoch's, whatever the validation score did (Lightning >= 2.5 only
    # refreshes a monitored callback's save_last file when its top-k file changes)
    assert torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 8
    # the first run's metrics are kept: steps 0..7 all present
    steps = {int(float(r["step"])) for r in csv.DictReader(open(out / "metrics.csv")) if r.get("train/loss")}
    assert steps == set(range(8))


def test_extending_a_finished_run_with_limited_epochs_trains_the_new_epochs(tmp_path):
    """A run of 1 epoch cut to 2 batches, extended to 2 epochs with ``resume=auto``, trains 2 more steps
    (the restart must not take the limited epoch for an unfinished one, nor skip the new one)."""
    out = tmp_path / "limited"
    common = ["train", "protocol=smoke", f"output_dir={out}", "data.num_train=160", "data.num_test=60",
              "trainer.max_steps=-1", "trainer.limit_train_batches=2", "trainer.checkpoint_every_n_steps=1"]
    assert main([*common, "trainer.max_epochs=1"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert main([*common, "trainer.max_epochs=2", "resume=auto"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["epochs"] == 2
    steps = {int(float(r["step"])) for r in csv.DictReader(open(out / "metrics.csv")) if r.get("train/loss")}
    assert steps == set(range(4))


def test_eval_knn_and_linear(trained_run, capsys, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    assert main(["eval", "knn", "--ckpt", str(ckpt), "eval.knn.k=5", "eval.knn.t=1.0"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0.0 <= result["knn_top1_k5_t1"] <= 1.0
    out = tmp_path / "linear.json"
    assert main(["eval", "linear", "--ckpt", str(ckpt), "eval.linear.epochs=3", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"linear_top1_last", "linear_top1_best_val", "linear_best_epoch"} <= set(result)


def test_eval_rejects_training_overrides(trained_run, capsys):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    assert main(["eval", "knn", "--ckpt", str(ckpt), "method.temperature=0.1"]) == 2
    assert "only eval.*" in capsys.readouterr().err


def test_export_loads_into_plain_backbone(trained_run, tmp_path):
    from metassl.engine.checkpoint import load_module
    from metassl.models.backbones import build_backbone

    out = tmp_path / "backbone.pt"
    assert main(["export", "--ckpt", str(trained_run / "checkpoints" / "last.ckpt"), "--out", str(out)]) == 0
    state = torch.load(out, weights_only=True)
    model, _ = build_backbone("convnet_small", cifar_stem=True)
    model.load_state_dict(state, strict=True)
    module = load_module(trained_run / "checkpoints" / "last.ckpt")
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(model(x).flatten(1), module.method.backbone(x).flatten(1))


def test_missing_checkpoint_is_one_line(capsys, tmp_path):
    assert main(["export", "--ckpt", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "b.pt")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains(method, tmp_path):
    overrides = ["train", "protocol=smoke", f"method={method}", f"output_dir={tmp_path / method}",
                 "data.num_train=160", "data.num_test=60", "trainer.max_steps=2", "eval.linear_probe=false"]
    small = {"moco_v2": ["method.queue_size=64"]}
    assert main(overrides + small.get(method, [])) == 0
    summary = json.loads((tmp_path / method / "summary.json").read_text())
    assert summary["method"] == method and summary["steps"] == 2


def test_compiled_metamask_run_checkpoints_like_an_eager_one(tmp_path, capsys):
    """trainer.compile=true compiles the backbone in place: the meta step runs (eagerly) and the
    checkpoint has the eager parameter names, so eval and export need no unwrapping."""
    out = tmp_path / "compiled"
    args = ["train", "protocol=smoke", "regularizer=metamask", "trainer.compile=true", f"output_dir={out}",
            "data.num_train=96", "data.num_test=40", "trainer.max_steps=2", "eval.linear_probe=false"]
    assert main(args) == 0
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert not [k for k in state if "_orig_mod" in k] and any(k.startswith("method.backbone.") for k in state)
    capsys.readouterr()
    assert main(["eval", "knn", "--ckpt", str(out / "checkpoints" / "last.ckpt")]) == 0
    assert json.loads(capsys.readouterr().out)["regularizer"] == "metamask"


def test_divergence_stops_with_one_clear_line(tmp_path, capsys):
    """A non-finite loss stops training with an error naming the fixes, not a run that
    finishes on NaN weights with chance accuracy; the run folder stays."""
    out = tmp_path / "diverged"
    args = ["train", "protocol=smoke", "method=vicreg", "optimizer.name=sgd", "optimizer.lr=1000", f"output_dir={out}",
            "data.num_train=96", "data.num_test=40", "trainer.max_steps=4"]
    assert main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("metassl: error:")]
    assert len(errors) == 1 and "training diverged" in errors[0] and "gradient_clip_val" in errors[0]
    assert (out / "config.yaml").is_file() and not (out / "summary.json").exists()


def test_untrained_knn_is_printed_and_leaves_training_unchanged(tmp_path, capsys):
    """The untrained network's kNN is computed before fit without moving training's random
    stream: the losses are those of a run without it."""
    base = ["train", "protocol=smoke", "data.num_train=96", "data.num_test=40", "trainer.max_steps=2"]
    assert main(base + [f"output_dir={tmp_path / 'with'}"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    init = json.loads((tmp_path / "with" / "summary.json").read_text())["knn_top1_init"]
    assert f"(untrained {init:.4f})" in line
    assert main(base + [f"output_dir={tmp_path / 'without'}", "eval.knn_init=false"]) == 0
    assert "(untrained " not in capsys.readouterr().out
    assert json.loads((tmp_path / "without" / "summary.json").read_text())["knn_top1_init"] is None
    assert not (tmp_path / "without" / "knn_init.json").exists()

    def losses(run):
        return [r["train/loss"] for r in csv.DictReader(open(tmp_path / run / "metrics.csv")) if r.get("train/loss")]

    assert losses("with") == losses("without") and len(losses("with")) == 2


def test_unlabelled_folder_without_eval_folders_is_one_line(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "unl").mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(tmp_path / "unl" / f"{i}.png")
    args = ["train", "protocol=smoke", "data=imagefolder", f"data.train_dir={tmp_path / 'unl'}", "data.labelled=false",
            f"output_dir={tmp_path / 'run'}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.eval_train_dir=" in err[0] and "data.test_dir=" in err[0]
    assert not (tmp_path / "run").exists()
    assert main(args + [f"data.test_dir={tmp_path / 'unl'}"]) == 2
    err = capsys.readouterr().err
    assert "data.eval_train_dir=" in err and "data.test_dir=" not in err


def test_no_validation_split(tmp_path):
    """eval.val_fraction=0: no held-out kNN and no best checkpoint, the run still finishes."""
    out = tmp_path / "noval"
    assert main(["train", "protocol=smoke", "data.num_train=96", "data.num_test=40", "trainer.max_steps=2",
                 "eval.val_fraction=0", f"output_dir={out}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["knn_top1_best_val"] is None and not (out / "checkpoints" / "best.ckpt").exists()
