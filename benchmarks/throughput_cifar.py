"""End-to-end training throughput on CIFAR-10: images/s a CPU user feels, data loading included.

Each row is one ``metassl train protocol=cpu_cifar`` process (SimCLR, the 4-block ConvNet
64-128-256-512, batch 256, bf16 autocast + channels-last where the CPU has bf16 units) on an
ImageFolder tree (e.g. the CIFAR-10 JPEG export), with the views made per sample in the DataLoader
(``data.augment_on=loader``) or for the whole batch on the training device
(``data.augment_on=device``).  The figure is ``train/images_per_s`` of the run's metrics.csv: the
training images of an epoch over its wall time from the epoch's start to its last optimizer step
(loading, augmentation, forward, backward, step; not the kNN monitor).  Epoch 1 warms up (worker
start-up, allocator, first batches); the row reports the mean of the later epochs.  The modes
alternate (``--repeats`` rounds) so that both see the same machine load; the load average is
recorded.  The decoded images are cached in ``--cache`` once, untimed.

Target (issue "Does it help?"): >= 420 images/s end to end for SimCLR on this protocol, 2 cores.

Usage::

    python benchmarks/throughput_cifar.py --root PATH/TO/cifar10 --cache /tmp/cifar-cache
    python benchmarks/throughput_cifar.py --root PATH --modes device --epochs 2 --subset 10000
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from metassl.bench.metadata import run_metadata

HERE = Path(__file__).resolve().parent


def train_command(root: Path, mode: str, epochs: int, subset: int | None, cache: Path, out: Path, extra: list[str]) -> list[str]:
    args = [sys.executable, "-m", "metassl.cli", "train", "protocol=cpu_cifar", "data=imagefolder", f"data.root={root}",
            f"data.cache_dir={cache}", f"data.augment_on={mode}", f"trainer.max_epochs={epochs}", "trainer.progress_bar=false",
            "eval.knn_init=false", "eval.linear_probe=false", "eval.knn_extra=[]", f"eval.knn.every_n_epochs={epochs}",
            "data.test_subset=1000", f"output_dir={out}"]
    if subset:
        args.append(f"data.subset={subset}")
    return args + extra


def images_per_s(run: Path) -> list[float]:
    rows = csv.DictReader(open(run / "metrics.csv"))
    return [float(r["train/images_per_s"]) for r in rows if r.get("train/images_per_s")]


def run_row(args: argparse.Namespace, mode: str, cache: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = train_command(Path(args.root), mode, args.epochs, args.subset, cache, out, args.extra)
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            return {"mode": mode, "error": " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])}
        rates = images_per_s(out)
        summary = json.loads((out / "summary.json").read_text())
    warm = rates[1:] or rates
    return {"mode": mode, "images_per_s_per_epoch": [round(r, 1) for r in rates], "images_per_s": round(statistics.fmean(warm), 1),
            "wall_s": round(wall, 1), "precision": summary.get("precision"), "loadavg_1min_before_after": [load, os.getloadavg()[0]],
            "command": " ".join(cmd[1:])}


def table(rows: list[dict]) -> str:
    lines = ["| augment_on | images/s (epochs 2+) | per epoch | precision | wall (s) | load avg before/after |",
             "|---|---:|---|---|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['mode']} | {r['error']} | | | | |")
            continue
        load = "/".join(f"{v:.1f}" for v in r["loadavg_1min_before_after"])
        lines.append(f"| {r['mode']} | {r['images_per_s']:.0f} | {', '.join(f'{v:.0f}' for v in r['images_per_s_per_epoch'])} | "
                     f"{r['precision']} | {r['wall_s']:.0f} | {load} |")
    by_mode: dict[str, list[float]] = {}
    for r in rows:
        if "error" not in r:
            by_mode.setdefault(r["mode"], []).append(r["images_per_s"])
    if {"loader", "device"} <= set(by_mode):
        ratio = statistics.fmean(by_mode["device"]) / statistics.fmean(by_mode["loader"])
        lines += ["", f"device / loader: {ratio:.2f}x (means over the rounds)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True, help="ImageFolder tree with train/ and test/ (the CIFAR-10 JPEG export)")
    ap.add_argument("--modes", default="loader,device")
    ap.add_argument("--repeats", type=int, default=2, help="rounds; each round runs every mode once")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--subset", type=int, default=None, help="train images (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=None, help="folder for the decoded-image cache (default: temporary)")
    ap.add_argument("--extra", nargs="*", default=[], help="further metassl train overrides")
    ap.add_argument("--out", default=str(HERE / "throughput_cifar.json"))
    args = ap.parse_args(argv)
    meta = run_metadata()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.cache) if args.cache else Path(tmp) / "cache"
        cache.mkdir(parents=True, exist_ok=True)
        rows: list[dict] = []
        for _ in range(args.repeats):
            for mode in args.modes.split(","):
                rows.append(run_row(args, mode, cache))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "command"}), flush=True)
                doc = {**meta, "threads": args.threads, "epochs": args.epochs, "subset": args.subset, "rows": rows,
                       "partial": len(rows) < args.repeats * len(args.modes.split(",")), "table": table(rows)}
                Path(args.out).write_text(json.dumps(doc, indent=1))  # after every row: a cut run keeps its rows
    print(table(rows))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
