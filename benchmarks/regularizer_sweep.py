"""A small sweep of one regularizer hyper-parameter on the built-in data, beside its base method.

Each cell is one ``metassl train method=<m> regularizer=<r> regularizer.<param>=<value> seed=<s>``
(the library's default run, ``--epochs`` epochs), plus the base method alone with the same seed and
budget.  Values are meant to be compared on the validation split (``val kNN`` best epoch, the
column to choose by); the test kNN of the last epoch is reported beside it.  Resumable like
``regularizer_defaults.py``: finished cells are read back from the JSON, an interrupted run
continues from its ``last.ckpt``, and the JSON is rewritten after every run.

Usage::

    python benchmarks/regularizer_sweep.py --regularizer metaug --param weight_gen --values 1e-5,1e-3,1e-1,1 \\
        --epochs 5 --out benchmarks/metaug_weight_sweep.json
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import time
from pathlib import Path

from metamask_defaults import train_args  # same folder: benchmarks/ is on sys.path when run as a script

from metassl.bench.metadata import run_metadata


def read_cell(out: Path, keys: tuple[str, ...]) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    val = [float(r["val/knn_top1"]) for r in rows if r.get("val/knn_top1")]
    last = {}
    for r in rows:  # the last logged value of each regularizer term, to show how much each weighs
        last.update({k: float(r[k]) for k in keys if r.get(k)})
    row = {"knn_top1": summary["knn_top1"], "knn_top1_best_val": summary.get("knn_top1_best_val"),
            "val_knn_per_epoch": val, "val_knn_best": max(val) if val else None, "knn_top1_init": summary.get("knn_top1_init"),
            "train_seconds": summary.get("train_seconds"), "last_terms": last, "run_folder": str(out)}
    mask = out / "mask.json"  # MetaMask: the learnt mask's spread
    if mask.exists():
        stats = json.loads(mask.read_text())
        row["mask"] = {k: stats.get(k) for k in ("mask_mean", "mask_std", "mask_min", "mask_max")}
    return row


def table(results: dict, cells: list[tuple[str, str]]) -> str:
    lines = ["| cell | val kNN (best epoch) | test kNN (last epoch) | Δ test vs base (points) | last logged terms |",
             "|---|---:|---:|---:|---|"]
    base = results.get("base", {})
    for key, _ in cells:
        row = results.get(key, {})
        if "knn_top1" not in row:
            lines.append(f"| {key} | {row.get('error', 'not run yet')} | | | |")
            continue
        delta = f"{100 * (row['knn_top1'] - base['knn_top1']):+.1f}" if key != "base" and "knn_top1" in base else ""
        terms = ", ".join(f"{k.split('/')[-1]} {v:.3g}" for k, v in row["last_terms"].items())
        lines.append(f"| {key} | {row['val_knn_best']:.3f} | {row['knn_top1']:.3f} | {delta} | {terms} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="simclr")
    ap.add_argument("--regularizer", required=True)
    ap.add_argument("--param", required=True, help="a regularizer key, e.g. weight_gen")
    ap.add_argument("--values", required=True, help="comma-separated values")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra", nargs="*", default=[], help="further overrides for the regularized runs, e.g. regularizer.weight_mi=0")
    ap.add_argument("--common", nargs="*", default=[],
                    help="overrides for every cell, the base included, e.g. trainer.deterministic=true (paired data order and views)")
    ap.add_argument("--runs", default=None, help="run folders (default runs/bench-sweep-<regularizer>-<param>)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--merge", nargs="*", default=[], help="JSON files of parallel invocations (other values, same base) to fold into --out")
    ap.add_argument("--no-run", action="store_true", help="only merge and print the table")
    args = ap.parse_args()
    runs = Path(args.runs or f"runs/bench-sweep-{args.regularizer}-{args.param}")
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {}
    results = doc.get("results", {})
    for other in args.merge:  # finished cells only; the base of a parallel invocation is the same run
        results.update({k: v for k, v in json.loads(Path(other).read_text()).get("results", {}).items() if "knn_top1" in v and k not in results})
    common = [f"trainer.max_epochs={args.epochs}", *args.common]
    cells = [("base", "none")] + [(f"{args.param}={v}", args.regularizer) for v in args.values.split(",")]
    keys = ("train/loss_base", "train/loss_gen", "train/loss_mi", "train/loss_rec", "train/loss_do", "train/loss_drr", "train/reg/mask_std")
    meta = run_metadata()

    def save() -> None:
        out.write_text(json.dumps({**meta, "method": args.method, "regularizer": args.regularizer, "param": args.param,
                                   "epochs": args.epochs, "seed": args.seed, "common": args.common, "extra": args.extra, "results": results,
                                   "table": table(results, cells)}, indent=1))

    save()
    for key, reg in [] if args.no_run else cells:
        if "knn_top1" in results.get(key, {}):
            continue
        folder = runs / (f"{args.method}-none-s{args.seed}" if reg == "none" else f"{args.method}-{key.replace('=', '-')}-s{args.seed}")
        extra = common + ([] if reg == "none" else [f"regularizer.{key}", *args.extra])
        cmd = train_args(folder, args.method, reg, args.seed, extra)
        print(f"running {key} ...", flush=True)
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            results[key] = {"error": " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])}
        else:
            results[key] = {**read_cell(folder, keys), "wall_s": time.time() - t0, "command": " ".join(cmd[1:])}
        save()
    print(table(results, cells))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
