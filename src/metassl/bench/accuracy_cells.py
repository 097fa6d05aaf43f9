"""One cell of ``metassl bench accuracy``: its command, its run folder, training it in a subprocess,
and reading its numbers back (from the run folder, or from the raw record an earlier sitting committed).

A cell is ``method=M regularizer=R seed=S`` on the protocol's base overrides.  Its run folder holds
``bench_accuracy_cell.json`` (the overrides that made it, wall seconds so far, machine, commit) beside
what ``metassl train`` writes; a folder made by other overrides is set aside, never reused.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from metassl.bench.accuracy_protocols import Cell, Protocol, extra_name


def run_order(methods: list[str], regularizers: list[str], seeds: list[int]) -> list[Cell]:
    """Seed by seed, method by method: the base first, then each regularizer (pairs fill up together)."""
    regs = ["none"] + [r for r in regularizers if r != "none"] if "none" in regularizers else list(regularizers)
    return [Cell(m, r, s) for s in seeds for m in methods for r in regs]


def cell_overrides(base: list[str], cell: Cell, folder: Path) -> list[str]:
    """The ``metassl train`` overrides of one cell (protocol + budget + extras come in ``base``)."""
    return [f"method={cell.method}", f"regularizer={cell.regularizer}", f"seed={cell.seed}", *base,
            f"output_dir={folder}", "resume=auto", "trainer.checkpoint_every_n_steps=50", "trainer.progress_bar=false"]


def train_command(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "metassl.cli", "train", *overrides]


_CELL_FILE = "bench_accuracy_cell.json"  # in the run folder: the command that made it, wall seconds so far
WALL_NOTE_EVERY_S = 30.0  # how often a running cell's wall seconds are written to it


def _read_json(path: Path) -> dict:
    """A JSON file's object; {} when it is missing or unreadable (a half-written or foreign file)."""
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _cell_record(folder: Path) -> dict:
    return _read_json(folder / _CELL_FILE)


def is_finished(folder: Path, overrides: list[str]) -> bool:
    return (folder / "summary.json").is_file() and _cell_record(folder).get("overrides") == overrides


def set_aside_stale(folder: Path, overrides: list[str]) -> Path | None:
    """A run folder made by another command is renamed ``<folder>.stale-<time>`` (kept, not reused)."""
    if not folder.is_dir() or not any(folder.iterdir()) or _cell_record(folder).get("overrides") == overrides:
        return None
    target = folder.with_name(f"{folder.name}.stale-{time.strftime('%Y%m%dT%H%M%S')}")
    folder.rename(target)
    return target


def run_cell(overrides: list[str], folder: Path, threads: int | None = None) -> dict:
    """Train one cell in a subprocess (stdout/stderr appended to logs in its folder); an error
    record with the last 3 stderr lines if it fails.  ``threads``: the subprocess's CPU threads
    (``OMP_NUM_THREADS``), recorded beside the machine; None = the inherited environment."""
    from metassl.bench.metadata import git_commit, machine_info
    from metassl.data.utils import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    record = _cell_record(folder)
    info = machine_info()
    env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    machine = {k: info[k] for k in ("cpu", "cpu_flags", "cores", "gpu")}
    machine["threads"] = threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or info["torch_threads"]
    where = {"machine": machine, "commit": git_commit()}
    before = record.get("wall_s", 0.0)

    def note(wall: float) -> None:  # the cell file, whole: a sitting killed mid-run keeps its wall time so far
        atomic_write_text(folder / _CELL_FILE, json.dumps({"overrides": overrides, "wall_s": round(wall, 1), **where}, indent=1))

    note(before)
    start = time.perf_counter()
    with open(folder / "bench_stdout.log", "a") as out, open(folder / "bench_stderr.log", "a") as err:
        err.write(f"\n--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {shlex.join(train_command(overrides))}\n")
        err.flush()
        proc = subprocess.Popen(train_command(overrides), stdout=out, stderr=err, env=env)
        while True:
            try:
                proc.wait(timeout=WALL_NOTE_EVERY_S)
                break
            except subprocess.TimeoutExpired:
                note(before + time.perf_counter() - start)
    wall = before + time.perf_counter() - start
    note(wall)
    if proc.returncode != 0 or not (folder / "summary.json").is_file():
        attempt = (folder / "bench_stderr.log").read_text().rsplit("\n--- ", 1)[-1].splitlines()[1:]  # this attempt's lines
        error = " | ".join([ln for ln in attempt if ln.strip()][-3:]) or f"exit code {proc.returncode}"
        return {"status": "failed", "error": error, "wall_s": round(wall, 1)}
    return {"status": "done"}


def read_curve(csv_path: Path) -> list[dict[str, float]]:
    """Per epoch (1-based): val and test kNN top-1 and training images/s, from ``metrics.csv``."""
    from metassl.engine.artifacts import read_metrics

    by_epoch: dict[int, dict[str, float]] = {}
    names = {"val/knn_top1": "val_knn_top1", "test/knn_top1": "test_knn_top1", "train/images_per_s": "images_per_s"}
    for row in read_metrics(csv_path):
        if "epoch" not in row:
            continue
        entry = by_epoch.setdefault(int(row["epoch"]) + 1, {"epoch": int(row["epoch"]) + 1})
        entry.update({short: row[name] for name, short in names.items() if name in row})
    return [by_epoch[e] for e in sorted(by_epoch)]


def read_cell(folder: Path, protocol: Protocol) -> dict:
    """A finished cell's numbers: summary fields, the kNN extras, the probe, the per-epoch curve."""
    summary, record = json.loads((folder / "summary.json").read_text()), _cell_record(folder)
    return {**cell_numbers(summary, read_curve(folder / "metrics.csv"), record.get("wall_s"), protocol),
            "machine": record.get("machine"), "trained_at_commit": record.get("commit")}


def command_identity(command: str) -> list[str]:
    """What makes two cells' commands the same run: the overrides, less the interpreter, the run
    folder and where the machine caches data (none of them changes what is trained), and less
    ``trainer.precision``: the precision a run *resolved to* is compared instead (``read_committed``),
    since ``auto`` means fp32 on one machine and bf16 on another."""
    return [tok for tok in shlex.split(command)[1:]
            if not tok.startswith(("output_dir=", "trainer.precision=", *MACHINE_ONLY_KEYS))]


def read_committed(out: Path, key: str, command: str, protocol: Protocol, precision: str | None) -> dict | None:
    """A cell finished in an earlier sitting elsewhere (another checkout or machine, whose run folder is
    gone): its raw record ``<out>/runs/<key>.json``, when it was made by the same command and trained at
    ``precision``, the one a run of that command resolves to on this machine (so no table mixes an
    fp32 cell from one machine with a bf16 cell of the same seed from another; None: any)."""
    raw = _read_json(out / "runs" / f"{key}.json")
    if "summary" not in raw or command_identity(raw.get("command", "")) != command_identity(command):
        return None
    if precision is not None and raw["summary"].get("precision") != precision:
        return None
    return {**cell_numbers(raw["summary"], raw["curve"], raw.get("wall_s"), protocol), "from_record": True,
            "machine": raw.get("machine"), "trained_at_commit": raw.get("trained_at_commit")}


def cell_numbers(summary: dict, curve: list[dict], wall_s: float | None, protocol: Protocol) -> dict:
    from metassl.engine.evaluation import knn_key

    speeds = [row["images_per_s"] for row in curve if "images_per_s" in row]
    keep = ("knn_top1", "knn_top1_best_val", "best_val_epoch", "knn_top1_init", "train_seconds", "epochs", "steps",
            "precision", "dataset", "backbone", "batch_size")
    return {"status": "done", **{k: summary.get(k) for k in keep},
            "knn_extra": {extra_name(k, t): summary.get(knn_key(k, t)) for k, t in protocol.knn_extra},
            "linear": {k: v for k, v in summary.items() if k.startswith("linear_")} or None,
            # harmonic mean: epochs of equal size, so this is all images over all training seconds (an
            # arithmetic mean of rates would let one fast epoch hide a slow one)
            "images_per_s": statistics.harmonic_mean(speeds) if speeds else None,
            "wall_s": wall_s, "curve": curve, "summary": summary}


#: Overrides that change where a run keeps its files, not what it trains: left out of the results key.
MACHINE_ONLY_KEYS = ("data.cache_dir=", "data.decode_workers=")


def threads_per_job(jobs: int) -> int | None:
    """CPU threads of each of ``jobs`` concurrent cells: OMP_NUM_THREADS if set, else the cores this
    process may use divided among the jobs (None for one job: the environment's default)."""
    if jobs == 1:
        return None
    if os.environ.get("OMP_NUM_THREADS"):
        return int(os.environ["OMP_NUM_THREADS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // jobs)
