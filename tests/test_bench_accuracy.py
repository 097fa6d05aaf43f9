"""`metassl bench accuracy`: paired statistics by hand, resumable smoke sittings, failures, bad input."""

import json
import math
import sys

import pytest
from PIL import Image

from metassl.bench import accuracy
from metassl.bench.accuracy import (
    PROTOCOLS,
    Cell,
    Protocol,
    cell_numbers,
    mean_std,
    paired_differences,
    paired_summary,
    run_order,
    set_aside_stale,
    t_quantile_975,
)
from metassl.cli import main as cli_main

SMOKE = ["--protocol", "smoke", "--methods", "simclr", "--regularizers", "none,mrcl"]


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the training subprocesses inherit it


def _folders(tmp_path):
    return ["--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs")]


# ---------------------------------------------------------------------------------------------- statistics
def test_mean_and_sample_std_by_hand():
    mean, std = mean_std([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)
    assert std == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))  # n-1
    assert mean_std([3.0]) == (3.0, None)
    assert mean_std([]) == (None, None)


def test_t_interval_n3_uses_4303_and_n1_has_none():
    p = paired_summary([1.0, 2.0, 4.0])
    half = 4.303 * math.sqrt(7 / 3) / math.sqrt(3)
    assert p["n"] == 3 and p["mean"] == pytest.approx(7 / 3)
    assert p["ci95"] == pytest.approx([7 / 3 - half, 7 / 3 + half], abs=1e-3)
    one = paired_summary([0.5])
    assert one == {"n": 1, "mean": 0.5, "std": None, "ci95": None}


def test_t_quantile_table_and_large_dof_without_scipy(monkeypatch):
    assert t_quantile_975(1) == pytest.approx(12.706, abs=1e-3)
    assert t_quantile_975(2) == pytest.approx(4.303, abs=1e-3)
    assert t_quantile_975(30) == pytest.approx(2.042, abs=1e-3)
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # scipy is not a dependency: the expansion must do
    assert t_quantile_975(60) == pytest.approx(2.0003, abs=2e-4)
    assert t_quantile_975(1000) == pytest.approx(1.9623, abs=2e-4)
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_pairing_only_over_seeds_present_in_both():
    base = {0: 50.0, 1: 60.0, 2: 70.0}
    other = {0: 55.0, 2: 80.0, 3: 90.0}
    assert paired_differences(base, other) == {0: 5.0, 2: 10.0}
    assert paired_differences({0: 1.0, 1: None}, {0: 2.0, 1: 3.0}) == {0: 1.0}


def test_run_order_interleaves_pairs_base_first():
    order = [c.key for c in run_order(["simclr"], ["mrcl", "none"], [0, 1])]
    assert order == ["simclr-none-s0", "simclr-mrcl-s0", "simclr-none-s1", "simclr-mrcl-s1"]


def test_protocol_overrides_pairing_and_registry():
    loader = Protocol(name="x", description="", overrides=("protocol=smoke",), data_choices=("builtin",), epochs=1,
                      needs_root=False, augment_on="loader")
    assert "trainer.deterministic=true" in loader.train_overrides("builtin", None)
    gpu = PROTOCOLS["gpu_cifar10"].train_overrides("cifar10", "/data")
    assert {"backbone=resnet18", "batch_size=512", "trainer.accelerator=gpu", "data=cifar10", "data.root=/data",
            "data.augment_on=device", "eval.knn_extra=[[20,0.1],[5,1.0]]", "eval.linear_probe=true"} <= set(gpu)
    assert "trainer.deterministic=true" not in gpu
    assert all(a["note"] == "published, not measured here" for a in PROTOCOLS["gpu_cifar10"].anchors)
    assert PROTOCOLS["gpu_cifar10"].epochs == 800


def test_images_per_s_is_all_images_over_all_seconds():
    """Two epochs of 1,000 images at 100 and 400 images/s took 12.5 s: 160 images/s, not their
    arithmetic mean 250 (a pause in one epoch must count with the time it cost)."""
    curve = [{"epoch": 1, "images_per_s": 100.0}, {"epoch": 2, "images_per_s": 400.0}, {"epoch": 3}]
    row = cell_numbers({"knn_top1": 0.5}, curve, 20.0, PROTOCOLS["smoke"])
    assert row["images_per_s"] == pytest.approx(2000 / 12.5)
    assert cell_numbers({}, [{"epoch": 1}], None, PROTOCOLS["smoke"])["images_per_s"] is None


def test_stale_run_folder_is_kept_aside(tmp_path):
    folder = tmp_path / "simclr-none-s0"
    folder.mkdir()
    (folder / "bench_accuracy_cell.json").write_text(json.dumps({"overrides": ["seed=0", "trainer.max_epochs=2"]}))
    assert set_aside_stale(folder, ["seed=0", "trainer.max_epochs=2"]) is None  # same command: continue in place
    moved = set_aside_stale(folder, ["seed=0", "trainer.max_epochs=4"])
    assert moved is not None and (moved / "bench_accuracy_cell.json").is_file() and not folder.exists()


def test_a_running_cell_notes_its_wall_time_so_a_killed_sitting_keeps_it(tmp_path, monkeypatch):
    """The cell file's wall seconds grow while the training runs (a sitting killed mid-run keeps
    them for the next one), and add up over attempts."""
    from metassl.bench import accuracy_cells

    folder = tmp_path / "cell"
    cell_file = folder / "bench_accuracy_cell.json"
    # a stand-in training that waits, prints what the cell file says meanwhile, and fails
    child = f"import json, time; time.sleep(1.5); print(json.load(open({str(cell_file)!r}))['wall_s']); raise SystemExit(3)"
    monkeypatch.setattr(accuracy_cells, "train_command", lambda overrides: [sys.executable, "-c", child])
    monkeypatch.setattr(accuracy_cells, "WALL_NOTE_EVERY_S", 0.2)
    first = accuracy_cells.run_cell(["seed=0"], folder)
    assert first["status"] == "failed" and first["wall_s"] >= 1.5
    noted = float((folder / "bench_stdout.log").read_text().split()[-1])
    assert 0.2 <= noted < first["wall_s"]  # written while the child ran, before it ended
    second = accuracy_cells.run_cell(["seed=0"], folder)
    assert second["wall_s"] >= first["wall_s"] + 1.5
    assert json.loads(cell_file.read_text())["wall_s"] == second["wall_s"]


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("argv, needle", [
    (["--protocol", "nope"], "valid: cpu_cifar, cpu_cifar_paired, gpu_cifar10"),
    (["--protocol", "smoke", "--methods", "simclr,foo"], "valid: barlow_twins"),
    (["--protocol", "smoke", "--regularizers", "none,bar"], "valid: iclmsr, metamask"),
    (["--protocol", "cpu_cifar"], "needs --data-root PATH"),
    (["--protocol", "gpu_cifar10", "--data-root", "/does/not/exist"], "is not a folder"),
    (["--protocol", "smoke", "--extra", "optimizer.lr=-1"], "optimizer.lr=-1 must be > 0"),  # before any run
    (["--protocol", "smoke", "--seeds", "0,x"], "comma-separated list of integers"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, needle):
    assert cli_main(["bench", "accuracy", *argv, *_folders(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "out" / "results.json").exists()


def test_out_folder_of_another_protocol_is_left_alone(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").write_text(json.dumps({"protocol_key": "cpu_cifar-cifar10-e8"}))
    assert accuracy.main([*SMOKE, "--seeds", "0", *_folders(tmp_path)]) == 2
    assert "pass another --out" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == {"protocol_key": "cpu_cifar-cifar10-e8"}


# ---------------------------------------------------------------------------------------------- end to end
def _snapshot(base, code):
    out = base / "out"
    return {"code": code, "doc": json.loads((out / "results.json").read_text()), "table": (out / "table.md").read_text(),
            "mtimes": {p.parent.name: p.stat().st_mtime_ns for p in (base / "runs").glob("*/*/summary.json")}}


@pytest.fixture(scope="module")
def sittings(tmp_path_factory):
    """Three sittings in one folder: --max-runs 3; the 4th cell broken (optimizer.lr=-1); a plain rerun."""
    base = tmp_path_factory.mktemp("bench_accuracy")
    argv = [*SMOKE, "--seeds", "0,1", *_folders(base)]
    plain = accuracy.cell_overrides

    def break_mrcl_s1(overrides, cell: Cell, folder):
        return plain(overrides + (["optimizer.lr=-1"] if cell.key == "simclr-mrcl-s1" else []), cell, folder)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        first = _snapshot(base, cli_main(["bench", "accuracy", *argv, "--max-runs", "3"]))
        mp.setattr(accuracy, "cell_overrides", break_mrcl_s1)
        broken = _snapshot(base, accuracy.main(argv))
        mp.setattr(accuracy, "cell_overrides", plain)
        last = _snapshot(base, accuracy.main(argv))
    return {"base": base, "first": first, "broken": broken, "last": last}


def test_first_sitting_stops_after_max_runs_and_is_partial(sittings):
    first = sittings["first"]
    assert first["code"] == 0
    assert sorted(first["doc"]["cells"]) == ["simclr-mrcl-s0", "simclr-none-s0", "simclr-none-s1"]
    assert first["doc"]["partial"] and (first["doc"]["runs_done"], first["doc"]["runs_total"]) == (3, 4)
    title = first["table"].splitlines()[0]
    assert "**partial**" in title and "3 of 4 runs done" in title
    assert len(first["mtimes"]) == 3


def test_failing_cell_is_recorded_and_finished_cells_kept(sittings):
    broken, first = sittings["broken"], sittings["first"]
    assert broken["code"] == 1
    failed = broken["doc"]["cells"]["simclr-mrcl-s1"]
    assert failed["status"] == "failed" and "optimizer.lr=-1 must be > 0" in failed["error"]
    assert "simclr-mrcl-s1" in broken["table"].split("Failed runs")[1]
    assert broken["mtimes"] == first["mtimes"]  # finished cells read back, untouched
    assert all(broken["doc"]["cells"][k]["status"] == "done" for k in first["doc"]["cells"])
    assert broken["doc"]["runs_done"] == 3 and broken["doc"]["partial"]


def test_rerun_trains_only_the_missing_cell_and_completes(sittings):
    last, first, out = sittings["last"], sittings["first"], sittings["base"] / "out"
    assert last["code"] == 0
    assert set(last["mtimes"]) - set(first["mtimes"]) == {"simclr-mrcl-s1"}
    assert all(last["mtimes"][k] == first["mtimes"][k] for k in first["mtimes"])  # not retrained
    doc, table = last["doc"], last["table"]
    assert not doc["partial"] and "partial" not in table.splitlines()[0] and "4 of 4 runs done" in table
    assert "Failed runs" not in table
    assert "**Protocol** `smoke`: dataset builtin" in table and "seeds 0, 1" in table and "batch 32" in table
    assert doc["commit"] is not None and doc["command"] and doc["machine"]["cores"] >= 1
    assert doc["budget"] == {"epochs": 2, "train_subset": 128}
    cell = doc["cells"]["simclr-mrcl-s1"]
    assert cell["status"] == "done" and "regularizer=mrcl" in cell["command"] and "resume=auto" in cell["command"]
    assert "optimizer.lr=-1" not in cell["command"] and cell["budget"] == doc["budget"]
    assert [row["epoch"] for row in cell["curve"]] == [1, 2] and "val_knn_top1" in cell["curve"][0]
    assert cell["knn_extra"]["k20_t0.1"] is not None and cell["linear"]["linear_top1_best_val"] is not None
    paired = doc["stats"]["paired"]["simclr/mrcl"]["knn_top1"]
    base, reg = (100 * doc["cells"][f"simclr-{r}-s0"]["knn_top1"] for r in ("none", "mrcl"))
    assert paired["n"] == 2 and paired["per_seed"]["0"] == pytest.approx(reg - base)
    for key in doc["cells"]:
        raw = json.loads((out / "runs" / f"{key}.json").read_text())
        assert raw["summary"]["method"] == "simclr" and raw["curve"]
    base_folder = str(sittings["base"])  # --out and --runs were absolute: written as <out> and <runs>
    assert all(base_folder not in p.read_text() for p in [out / "results.json", *(out / "runs").glob("*.json")])
    assert doc["cells"]["simclr-mrcl-s1"]["run_folder"].startswith("<runs>/")
    for name in ("knn_curves.png", "paired_differences.png"):
        with Image.open(out / name) as image:
            image.load()
            assert image.size[0] > 300 and image.size[1] > 200


def test_results_name_no_folder_of_the_machine():
    doc = {"command": "metassl bench accuracy --data-root /data/c10", "cells": {"a": {"command": "train data.root=/abs/data/c10"}},
           "n": 3, "grid": {"seeds": (0, 1)}}
    clean = accuracy.redact(doc, {"/abs/data/c10": "<data-root>", "/data/c10": "<data-root>"})
    assert clean["command"].endswith("--data-root <data-root>")
    assert clean["cells"]["a"]["command"] == "train data.root=<data-root>" and clean["n"] == 3 and clean["grid"]["seeds"] == [0, 1]


def test_committed_records_stand_in_for_lost_run_folders(sittings, tmp_path, monkeypatch):
    """A new checkout holds only the committed <out>: its raw records are read back, nothing is retrained."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(sittings["base"] / "out", out)
    monkeypatch.setattr(accuracy, "run_cell", lambda *a: pytest.fail("a committed cell was retrained"))
    assert accuracy.main([*SMOKE, "--seeds", "0,1", "--out", str(out), "--runs", str(tmp_path / "gone")]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert (doc["runs_done"], doc["partial"]) == (4, False)
    assert all(cell.get("from_record") for cell in doc["cells"].values())
    assert doc["stats"] == sittings["last"]["doc"]["stats"]
    # a record made by other overrides is not taken for this cell: it is trained (here: refused)
    raw = json.loads((out / "runs" / "simclr-mrcl-s1.json").read_text())
    raw["command"] = raw["command"].replace("seed=1", "seed=7")
    (out / "runs" / "simclr-mrcl-s1.json").write_text(json.dumps(raw))
    with pytest.raises(pytest.fail.Exception, match="retrained"):
        accuracy.main([*SMOKE, "--seeds", "0,1", "--out", str(out), "--runs", str(tmp_path / "gone")])
    # nor is one trained at a precision other than the one a run resolves to here (precision=auto is
    # fp32 on one CPU and bf16 on another: a paired difference must not mix them)
    raw["command"] = raw["command"].replace("seed=7", "seed=1")
    here = raw["summary"]["precision"]
    raw["summary"]["precision"] = "16-mixed"  # never what a CPU run resolves to
    (out / "runs" / "simclr-mrcl-s1.json").write_text(json.dumps(raw))
    with pytest.raises(pytest.fail.Exception, match="retrained"):
        accuracy.main([*SMOKE, "--seeds", "0,1", "--out", str(out), "--runs", str(tmp_path / "gone")])
    raw["summary"]["precision"] = here  # and an explicit trainer.precision=<that one> is the same run as auto
    raw["command"] = raw["command"].replace("seed=1", f"seed=1 trainer.precision={here}")
    (out / "runs" / "simclr-mrcl-s1.json").write_text(json.dumps(raw))
    assert accuracy.main([*SMOKE, "--seeds", "0,1", "--out", str(out), "--runs", str(tmp_path / "gone")]) == 0


def test_each_run_records_its_machine_and_a_mixed_table_says_so(sittings):
    cells = sittings["last"]["doc"]["cells"]
    assert all(c["machine"]["cores"] >= 1 and "cpu_flags" in c["machine"] for c in cells.values())
    assert "Trained on: " in sittings["last"]["table"]
    from metassl.bench.accuracy_table import machines_lines

    fast = {"cpu": "X", "cpu_flags": ["avx2", "avx512_bf16"], "cores": 2, "gpu": None}
    slow = {"cpu": "X", "cpu_flags": ["avx2"], "cores": 2, "gpu": None}
    mixed = machines_lines({"a": {"status": "done", "machine": fast}, "b": {"status": "done", "machine": slow},
                            "c": {"status": "done", "machine": slow}, "d": {"status": "failed"}})
    assert "several machines" in mixed[1]
    assert mixed[3:] == ["- X (avx2, avx512_bf16), 2 cores: 1 run", "- X (avx2), 2 cores: 2 runs"]
    assert machines_lines({"a": {"status": "done", "machine": {**slow, "threads": 1}}}) == [
        "", "Trained on: X (avx2), 2 cores, 1 thread per run."]
    assert machines_lines({"a": {"status": "done"}}) == ["", "Trained on: not recorded."]


def test_jobs_train_cells_at_once_with_the_same_numbers(sittings, tmp_path, monkeypatch):
    """--jobs 2: the two cells of seed 0 train at the same time, each with its thread share, and end
    at exactly the numbers of the one-at-a-time sitting (same threads, deterministic smoke runs)."""
    import threading
    import time

    spans, plain, lock = {}, accuracy.run_cell, threading.Lock()

    def timed(overrides, folder, threads=None):
        start = time.monotonic()
        outcome = plain(overrides, folder, threads)
        with lock:
            spans[folder.name] = (start, time.monotonic(), threads)
        return outcome

    monkeypatch.setattr(accuracy, "run_cell", timed)
    argv = [*SMOKE, "--seeds", "0", *_folders(tmp_path), "--jobs", "2"]
    assert accuracy.main(argv) == 0
    (a0, a1, ta), (b0, b1, tb) = spans["simclr-none-s0"], spans["simclr-mrcl-s0"]
    assert max(a0, b0) < min(a1, b1), "the two cells did not overlap"
    assert ta == tb == 1  # OMP_NUM_THREADS=1 (the module's fixture) is each job's share
    doc, seq = json.loads((tmp_path / "out" / "results.json").read_text()), sittings["last"]["doc"]
    for key in ("simclr-none-s0", "simclr-mrcl-s0"):
        assert doc["cells"][key]["knn_top1"] == seq["cells"][key]["knn_top1"]
        assert doc["cells"][key]["machine"]["threads"] == 1
    assert accuracy.main([*SMOKE, "--seeds", "0", *_folders(tmp_path), "--jobs", "0"]) == 2


def test_where_a_machine_caches_data_names_neither_the_results_nor_the_run(tmp_path):
    """data.cache_dir (and decode threads) differ between machines but train the same run: the results
    key and the command identity ignore them; an override that trains differently does not."""
    def key(*extra):
        args = accuracy.build_parser().parse_args(["--protocol", "cpu_cifar", "--data", "imagefolder", "--data-root",
                                                   str(tmp_path), *(["--extra", *extra] if extra else [])])
        return accuracy.resolve(args)["key"]

    assert key() == key("data.cache_dir=/a") == key("data.cache_dir=/b", "data.decode_workers=2")
    assert key("optimizer.lr=0.5") == key("optimizer.lr=0.5", "data.cache_dir=/a") != key()
    same = accuracy.command_identity("py -m metassl.cli train seed=0 data.cache_dir=/a output_dir=/x")
    assert same == accuracy.command_identity("python -m metassl.cli train seed=0 output_dir=/y")
    assert same != accuracy.command_identity("python -m metassl.cli train seed=1 output_dir=/y")
    assert same == accuracy.command_identity("python -m metassl.cli train seed=0 trainer.precision=32-true")


def test_the_paired_budget_is_cpu_cifar_at_half_width_on_a_train_subset(tmp_path):
    """protocol cpu_cifar_paired trains what cpu_cifar trains (schedule, batch, views, per-method
    presets such as SimCLR's temperature) with the ConvNet at half width on 20,000 train images."""
    from metassl.config import load_config

    def plan(protocol, method):
        args = accuracy.build_parser().parse_args(["--protocol", protocol, "--data", "imagefolder",
                                                   "--data-root", str(tmp_path), "--methods", method])
        return accuracy.resolve(args)

    full, paired = plan("cpu_cifar", "simclr"), plan("cpu_cifar_paired", "simclr")
    assert paired["budget"] == {"epochs": 8, "train_subset": 20000} and full["budget"]["train_subset"] is None
    cfg_full, cfg = load_config(full["base"] + ["method=simclr"]), load_config(paired["base"] + ["method=simclr"])
    assert list(cfg.backbone.widths) == [32, 64, 128, 256] and list(cfg_full.backbone.widths) == [64, 128, 256, 512]
    assert cfg.data.subset == 20000 and cfg.method.temperature == cfg_full.method.temperature == 0.2
    for key in ("batch_size", "optimizer", "eval"):
        assert cfg[key] == cfg_full[key], key
    # fp32 on every CPU: its cells are trained over sittings on different machines, bf16 units or not
    assert cfg.trainer.precision == "32-true" and cfg_full.trainer.precision == "auto"
    assert {**cfg.trainer, "precision": "auto"} == dict(cfg_full.trainer)
    assert cfg.data.aug == cfg_full.data.aug


def test_precision_here_is_what_a_run_resolves_to_and_none_where_none_can_train(tmp_path, monkeypatch):
    """The precision a committed cell must have trained at: the one a run resolves to here; a GPU
    protocol on a machine without a GPU cannot train, so its committed records are all read back."""
    import torch

    from metassl.engine.precision import resolve_precision

    def base(protocol):
        args = accuracy.build_parser().parse_args(["--protocol", protocol, "--data", "imagefolder", "--data-root", str(tmp_path)])
        return accuracy.resolve(args)["base"]

    assert accuracy.precision_here(base("cpu_cifar_paired")) == "32-true"
    assert accuracy.precision_here(base("cpu_cifar")) == resolve_precision("auto", "auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert accuracy.precision_here(base("gpu_cifar10")) is None
