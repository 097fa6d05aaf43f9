"""Does each regularizer, with its defaults, train at least as well as its base?

Each cell is one ``metassl train method=<m> regularizer=<r> seed=<s>`` on the built-in data with
the library's defaults (the README's first run plus the regularizer), in its own process.
Resumable like ``metamask_defaults.py``: finished cells are read back from the JSON, an
interrupted run continues from its ``last.ckpt`` (``resume=auto``), and the JSON is rewritten
after every run.  ``--import KEY=RUN_FOLDER`` records a run finished elsewhere (its
``summary.json`` and ``config.yaml`` are read; the folder is named in the JSON).  ``--segment``
adds the dense evaluation of every finished run (``metassl eval segment`` on its last checkpoint,
defaults: linear head on the frozen feature map, the built-in foreground masks; mIoU on test at the
head epoch selected on a validation split of train), kept in the run folder's ``segment.json``.
Over several seeds the table ends with mean ± std per regularizer and the paired difference to
the base (seed by seed).

Usage::

    python benchmarks/regularizer_defaults.py --regularizers none,mrcl,iclmsr --seeds 0,1,2
    python benchmarks/regularizer_defaults.py --regularizers none,mrcl --seeds 0,1,2 --segment
    python benchmarks/regularizer_defaults.py --no-run --import simclr-mrcl-s0=runs/x
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from metamask_defaults import train_args  # same folder: benchmarks/ is on sys.path when run as a script

from metassl.bench.metadata import run_metadata

HERE = Path(__file__).resolve().parent
KEEP = ("knn_top1", "knn_top1_init", "knn_top1_best_val", "best_val_epoch", "epochs", "steps", "precision", "train_seconds")


def read_run(folder: Path) -> dict:
    summary = json.loads((folder / "summary.json").read_text())
    return {**{k: summary.get(k) for k in KEEP}, "run_folder": str(folder)}


def segment(folder: Path) -> dict:
    """``metassl eval segment`` of a finished run (read back from its ``segment.json`` when there)."""
    report = folder / "segment.json"
    if not report.is_file():
        args = [sys.executable, "-m", "metassl.cli", "eval", "segment", "--ckpt", str(folder / "checkpoints" / "last.ckpt"),
                "--out", str(report)]
        proc = subprocess.run(args, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"segment_error": " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])}
    scores = json.loads(report.read_text())
    return {k: scores.get(k) for k in ("segment_miou_best_val", "segment_pixel_acc_best_val", "segment_miou_last",
                                       "segment_constant_miou")}


def run_one(method: str, reg: str, seed: int, runs: Path, extra: list[str]) -> dict:
    out = runs / f"{method}-{reg}-s{seed}"
    args = train_args(out, method, reg, seed, extra)
    t0 = time.time()
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])}
    return {**read_run(out), "wall_s": time.time() - t0, "command": " ".join(args[1:])}


def table(results: dict, methods: list[str], regs: list[str], seeds: list[int]) -> str:
    lines = ["| method | regularizer | seed | test kNN (last) | Δ vs base (points) | val kNN (best epoch) | untrained kNN | "
             "segmentation mIoU | train s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in methods:
        for s in seeds:
            base = results.get(f"{m}-none-s{s}", {})
            for r in regs:
                row = results.get(f"{m}-{r}-s{s}", {})
                if "knn_top1" not in row:
                    lines.append(f"| {m} | {r} | {s} | {row.get('error', 'not run yet')} | | | | | |")
                    continue
                delta = f"{100 * (row['knn_top1'] - base['knn_top1']):+.1f}" if "knn_top1" in base and r != "none" else ""
                miou = f"{row['segment_miou_best_val']:.3f}" if row.get("segment_miou_best_val") is not None else ""
                lines.append(f"| {m} | {r} | {s} | {row['knn_top1']:.3f} | {delta} | {row['knn_top1_best_val']:.3f} | "
                             f"{row['knn_top1_init']:.3f} | {miou} | {row.get('train_seconds') or 0:.0f} |")
    if len(seeds) > 1:
        lines += ["", "Mean ± std over seeds (points) and the paired difference to the base, seed by seed:", "",
                  "| method | regularizer | seeds | test kNN (last) | Δ kNN vs base | segmentation mIoU | Δ mIoU vs base |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for m in methods:
            for r in regs:
                cells = []
                for key in ("knn_top1", "segment_miou_best_val"):
                    vals, diffs = [], []
                    for s in seeds:
                        row, base = results.get(f"{m}-{r}-s{s}", {}), results.get(f"{m}-none-s{s}", {})
                        if row.get(key) is not None:
                            vals.append(100 * row[key])
                            if base.get(key) is not None and r != "none":
                                diffs.append(100 * (row[key] - base[key]))
                    cells += [_mean_std(vals), _mean_std(diffs, signed=True) if r != "none" else ""]
                n = sum("knn_top1" in results.get(f"{m}-{r}-s{s}", {}) for s in seeds)
                lines.append(f"| {m} | {r} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_std(xs: list[float], signed: bool = False) -> str:
    if not xs:
        return "—"
    mean = f"{statistics.fmean(xs):+.1f}" if signed else f"{statistics.fmean(xs):.1f}"
    return f"{mean} ± {statistics.stdev(xs):.1f} (n={len(xs)})" if len(xs) > 1 else f"{mean} (n=1)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="simclr")
    ap.add_argument("--regularizers", default="none,mrcl,iclmsr,metaug")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--extra", nargs="*", default=[], help="further key=value overrides for every run")
    ap.add_argument("--runs", default="runs/bench-regularizer-defaults")
    ap.add_argument("--out", default=str(HERE / "regularizer_defaults.json"))
    ap.add_argument("--import", dest="imports", nargs="*", default=[], help="KEY=RUN_FOLDER of finished runs")
    ap.add_argument("--no-run", action="store_true")
    ap.add_argument("--segment", action="store_true", help="also `metassl eval segment` every finished run (mIoU column)")
    args = ap.parse_args()
    methods, regs = args.methods.split(","), args.regularizers.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {}
    results = doc.get("results", {})
    for item in args.imports:
        key, folder = item.split("=", 1)
        results[key] = {**read_run(Path(folder)), "imported": True}
    meta = run_metadata()

    def save() -> None:
        out.write_text(json.dumps({**meta, "overrides": args.extra, "results": results, "table": table(results, methods, regs, seeds)}, indent=1))

    save()
    if not args.no_run:
        for s in seeds:
            for m in methods:
                for r in regs:
                    key = f"{m}-{r}-s{s}"
                    if "knn_top1" in results.get(key, {}):
                        continue
                    print(f"running {key} ...", flush=True)
                    results[key] = {**run_one(m, r, s, Path(args.runs), args.extra), "commit": meta["commit"]}
                    save()
    if args.segment:
        for s in seeds:
            for m in methods:
                for r in regs:
                    row = results.get(f"{m}-{r}-s{s}", {})
                    if "knn_top1" in row and row.get("segment_miou_best_val") is None:
                        print(f"segmenting {m}-{r}-s{s} ...", flush=True)
                        row.update(segment(Path(row["run_folder"])))
                        save()
    print(table(results, methods, regs, seeds))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
