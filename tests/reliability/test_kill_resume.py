"""Kill and resume: a run stopped mid-epoch and resumed with ``resume=auto`` ends with the same
weights, optimizer and scheduler states and metrics as an uninterrupted run with the same seed
(``trainer.deterministic=true``, a checkpoint every step).

2 epochs of 3 steps; the interruption comes at global step 4, the middle of the second epoch.
Every case is killed for real: SIGKILL to a child process once the step-4 checkpoint is on disk
(simclr, moco_v2, each bilevel regularizer, MRCL, and views made on the device), while this process trains the
uninterrupted run.  One more case crashes with an exception inside the step (exit 1, an
unexpected error) and resumes the same way.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from metassl.cli import main
from metassl.engine.module import SSLModule

from reliability_helpers import tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one intra-op thread (tests/conftest.py)

KILL_AT = 4
DETERMINISTIC = ["trainer.deterministic=true", "trainer.max_steps=-1", "trainer.max_epochs=2", "trainer.checkpoint_every_n_steps=1"]


def _load(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def _losses(out: Path) -> list[tuple[str, str]]:
    return [(r["step"], r["train/loss"]) for r in csv.DictReader(open(out / "metrics.csv")) if r.get("train/loss")]


def _images_per_s(out: Path) -> list[float]:
    rows = csv.DictReader(open(out / "metrics.csv"))
    return [float(r["train/images_per_s"]) for r in rows if r.get("train/images_per_s")]


def assert_same_run(a: Path, b: Path) -> None:
    ca, cb = _load(a), _load(b)
    assert ca["global_step"] == cb["global_step"] == 6
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    differ = [k for k in ca["state_dict"] if not torch.equal(ca["state_dict"][k], cb["state_dict"][k])]
    assert not differ, f"weights/buffers differ after resume: {differ[:5]}"
    for sa, sb in zip(ca["optimizer_states"], cb["optimizer_states"], strict=True):  # encoder and meta optimizers
        for key, value in sa["state"].items():
            for name, tensor in value.items():
                if isinstance(tensor, torch.Tensor):
                    assert torch.equal(tensor, sb["state"][key][name]), (key, name)
    assert ca["lr_schedulers"] == cb["lr_schedulers"]
    assert _losses(a) == _losses(b)  # every step's loss, the killed run's rows and the resumed run's, once each
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (a, b))
    for key in ("knn_top1", "knn_top1_best_val", "steps", "epochs"):
        assert sa[key] == sb[key], key


def _crash_at(monkeypatch, step: int, pause_s: float = 0.0) -> None:
    """Raise at ``step``; each step before it first sleeps ``pause_s`` (a slow first process)."""
    original = SSLModule.training_step

    def training_step(self, batch, batch_idx):
        if self.global_step == step:
            raise RuntimeError("simulated kill")
        time.sleep(pause_s)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(SSLModule, "training_step", training_step)


@pytest.mark.parametrize("preset", ["regularizer=metamask", "regularizer=iclmsr data.augment_on=device"])
def test_resume_after_a_crash_mid_epoch_is_exact(tmp_path, monkeypatch, preset):
    args = [*DETERMINISTIC, *preset.split()]
    assert main(tiny(tmp_path / "a", *args)) == 0
    with monkeypatch.context() as patch:
        _crash_at(patch, KILL_AT, pause_s=1.0)  # >= 4 s before the kill, more than the resumed part takes
        assert main(tiny(tmp_path / "b", *args)) == 1  # an unexpected error: exit 1
    at_kill = _load(tmp_path / "b")
    assert at_kill["global_step"] == KILL_AT
    assert main(tiny(tmp_path / "b", *args, "resume=auto")) == 0
    assert_same_run(tmp_path / "a", tmp_path / "b")
    # the resumed epoch's images/s covers the batches it trained, timed from the resume, not from zero
    rate_a, rate_b = (_images_per_s(p)[1] for p in (tmp_path / "a", tmp_path / "b"))
    assert rate_a / 20 < rate_b < rate_a * 20, (rate_a, rate_b)
    # train_seconds counts the first process's time up to its checkpoint too, not the resumed part only
    before = at_kill["metassl"]["train_seconds"]
    resumed = json.loads((tmp_path / "b" / "summary.json").read_text())["train_seconds"]
    assert before >= 4.0 and resumed >= before, (before, resumed)


CHILD = textwrap.dedent("""
    import pathlib, sys, time
    from metassl.cli import main
    from metassl.engine.module import SSLModule
    step = SSLModule.training_step
    def slow(self, batch, i):  # the step-4 checkpoint and step 3's metrics row are on disk: wait there to be killed
        if self.global_step >= 4:
            (pathlib.Path(self.trainer.default_root_dir) / "asleep").touch()
            time.sleep(120)
        return step(self, batch, i)
    SSLModule.training_step = slow
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("preset", [None, "method=moco_v2", "regularizer=metamask", "regularizer=metaug",
                                    "regularizer=iclmsr", "regularizer=mrcl", "data.augment_on=device"])
def test_sigkill_mid_epoch_then_resume_auto_is_exact(tmp_path, preset):
    args = [*DETERMINISTIC, *(preset.split() if preset else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, *tiny(tmp_path / "b", *args)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert main(tiny(tmp_path / "a", *args)) == 0  # the uninterrupted run, meanwhile
        # killed inside step 5 (global step 4), never between the step-4 checkpoint and step 3's row:
        # Lightning writes that checkpoint at on_train_batch_end, before it logs the step's metrics
        asleep, deadline = tmp_path / "b" / "asleep", time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None and not asleep.is_file():
            time.sleep(0.1)
        assert child.poll() is None, "the child ended before it could be killed"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    assert _load(tmp_path / "b")["global_step"] == KILL_AT
    assert main(tiny(tmp_path / "b", *args, "resume=auto")) == 0
    assert_same_run(tmp_path / "a", tmp_path / "b")


def test_default_mode_resume_continues_the_epoch_order(tmp_path, monkeypatch):
    """Without trainer.deterministic the augmentations follow the global generator (not exact), but
    the resumed epoch still trains on the rest of the same permutation: the sampler state is saved."""
    args = ["trainer.max_steps=-1", "trainer.max_epochs=2", "trainer.checkpoint_every_n_steps=1"]
    with monkeypatch.context() as patch:
        _crash_at(patch, KILL_AT)
        assert main(tiny(tmp_path / "b", *args)) == 1  # an unexpected error: exit 1
    state = _load(tmp_path / "b")["metassl"]["sampler"]
    assert state["epoch"] == 1 and state["batches_done"] == 1 and not state["seeded"]
    assert main(tiny(tmp_path / "b", *args, "resume=auto")) == 0
    assert _load(tmp_path / "b")["global_step"] == 6
