"""Atomic checkpoints, and one line (exit 2) for a truncated, empty or foreign checkpoint given to
``resume=``, ``metassl eval`` and ``metassl export``."""

from __future__ import annotations

import errno
import shutil

import pytest
import torch

import metassl.data.utils as file_utils
from metassl.cli import main

from reliability_helpers import error_lines, last_step, tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one intra-op thread (tests/conftest.py)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    assert main(tiny(out)) == 0
    return out


def test_crash_while_writing_keeps_the_previous_last_ckpt(tmp_path, capsys, monkeypatch):
    """The 3rd checkpoint write dies half-way (disk full): last.ckpt stays the 2nd one, and loads."""
    real_save, calls = torch.save, []

    def dying_save(obj, fh, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            fh.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, fh, *args, **kwargs)

    monkeypatch.setattr(file_utils.torch, "save", dying_save)
    out = tmp_path / "run"
    assert main(tiny(out, "trainer.checkpoint_every_n_steps=1")) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "No space left on device" in lines[0] and "previous checkpoint" in lines[0]
    assert last_step(out) == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.ckpt"]  # no temporary file left


def _broken_files(run, tmp_path):
    good = (run / "checkpoints" / "last.ckpt").read_bytes()
    files = {"truncated": good[: len(good) // 2], "empty": b"", "text": b"not a checkpoint\n"}
    paths = {}
    for name, blob in files.items():
        paths[name] = tmp_path / f"{name}.ckpt"
        paths[name].write_bytes(blob)
    paths["foreign"] = tmp_path / "foreign.ckpt"
    torch.save({"epoch": 3, "model": {"w": torch.zeros(2)}}, paths["foreign"])
    paths["state_dict"] = tmp_path / "backbone.pt"
    assert main(["export", "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--out", str(paths["state_dict"])]) == 0
    return paths


@pytest.mark.parametrize("command", ["eval", "export", "resume"])
def test_broken_or_foreign_checkpoint_is_one_line(run, tmp_path, capsys, command):
    for name, path in _broken_files(run, tmp_path).items():
        capsys.readouterr()
        if command == "eval":
            argv = ["eval", "knn", "--ckpt", str(path)]
        elif command == "export":
            argv = ["export", "--ckpt", str(path), "--out", str(tmp_path / "out.pt")]
        else:
            argv = tiny(tmp_path / f"resumed-{name}", f"resume={path}")
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        lines = error_lines(err)
        assert len(lines) == 1 and "Traceback" not in err, (name, err)
        assert str(path) in lines[0] and "last.ckpt" in lines[0], (name, lines[0])
    assert not (tmp_path / "out.pt").exists()


def test_resume_auto_with_a_broken_last_ckpt_names_the_fix(run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    last = out / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    assert main(tiny(out, "resume=auto")) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "delete it to start the run over" in lines[0]
    assert len(last.read_bytes()) == 1000  # nothing touched


def test_resume_with_another_method_is_one_line(run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    assert main(tiny(out, "resume=auto", "method=byol")) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "method=simclr" in lines[0] and "method=byol" in lines[0]
