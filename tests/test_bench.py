"""Benchmark provenance: every benchmark JSON records commit, date, machine and command."""

import datetime
import shlex
import sys

import pytest

from metassl.bench import metadata
from metassl.bench.metadata import run_metadata
from metassl.bench.report import to_markdown


def test_run_metadata_records_commit_date_machine_command():
    meta = run_metadata(["benchmarks/speed.py", "--quick", "--name", "a b"])
    assert set(meta) == {"commit", "date", "machine", "command"}
    assert shlex.split(meta["command"]) == ["benchmarks/speed.py", "--quick", "--name", "a b"]
    date = datetime.datetime.fromisoformat(meta["date"].replace("Z", "+00:00"))
    assert meta["date"].endswith("Z") and date.utcoffset() == datetime.timedelta(0)
    assert abs((datetime.datetime.now(datetime.timezone.utc) - date).total_seconds()) < 60
    machine = meta["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and machine["torch"] and "gpu" in machine
    assert meta["commit"] is None or len(meta["commit"].removesuffix("-dirty")) == 40


def test_run_metadata_command_defaults_to_the_process_command_line():
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    assert run_metadata()["command"] == shlex.join(argv)


@pytest.mark.parametrize(("status", "expected"), [("", "ab" * 20), (" M src/x.py\n", "ab" * 20 + "-dirty"), (None, "ab" * 20 + "-dirty")])
def test_git_commit_marks_a_dirty_tree(monkeypatch, status, expected):
    monkeypatch.setattr(metadata, "_git", lambda *a: "ab" * 20 + "\n" if a[0] == "rev-parse" else status)
    assert metadata.git_commit() == expected


def test_git_commit_outside_a_checkout_is_none(monkeypatch):
    monkeypatch.setattr(metadata, "_git", lambda *a: None)
    assert metadata.git_commit() is None


def test_speed_report_shows_the_provenance():
    meta = run_metadata(["metassl", "bench", "speed", "--quick"])
    result = {
        **meta,
        "settings": {"backbone": "convnet_small", "batch": 4, "views": 2, "image_size": 8, "variants": ["fp32"], "device": "cpu",
                     "warmup": 1, "repeats": 1, "steps": 1},
        "results": [],
    }
    md = to_markdown(result)
    assert meta["date"] in md and str(meta["commit"] or "unknown") in md and "`metassl bench speed --quick`" in md


def test_speed_cases_run_every_regularizer_with_its_data_extras():
    """`metassl bench speed` times each regularizer as it trains, including those that ask the
    data pipeline for extras (ICL-MSR's un-augmented image)."""
    import argparse
    import math

    from metassl.bench.cases import Variant
    from metassl.bench.metassl_case import build_metassl_case
    from metassl.regularizers import REGULARIZERS

    args = argparse.Namespace(backbone="convnet_small", batch=8, image_size=32, seed=0, device="cpu", warmup=1,
                              steps=1, repeats=1)
    for name in REGULARIZERS:
        case = build_metassl_case(args, "simclr", name, Variant("fp32", channels_last=False))
        assert math.isfinite(case.step(0)), name
