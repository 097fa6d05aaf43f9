"""Does ``regularizer=metamask`` with its defaults hurt? Every base method with and without it.

Each cell is one ``metassl train method=<m> [regularizer=metamask] seed=<s>`` on the built-in
data with the library's defaults (the README's first run, per method), in its own process.
The script resumes where it stopped: finished runs are read from the JSON, an interrupted
run continues from its ``last.ckpt`` (``resume=auto``), and the JSON is rewritten after every
run, so partial results are kept.  The table gives kNN top-1 on the built-in test split (last
epoch, the defaults' k/t), the untrained network's kNN, the difference to the base, the wall
time, and the mask's spread and most suppressed dimensions.

Pairing: by default a base run and its MetaMask run see different data streams (the regularizer's
own parameters are drawn from the global generator before the loaders are, which shifts every
later draw), and on the built-in data one stream against another moves a 20-epoch Barlow Twins
run by 8 points on its own.  ``--extra trainer.deterministic=true`` seeds the data order and each
sample's views by (seed, epoch, index), so both runs of a pair see the same images and views
(``benchmarks/metamask_defaults_paired.json``).

Usage::

    python benchmarks/metamask_defaults.py                      # all six methods, seed 0
    python benchmarks/metamask_defaults.py --methods simclr,byol --seeds 0,1
    python benchmarks/metamask_defaults.py --extra trainer.deterministic=true --runs runs/bench-metamask-paired \
        --out benchmarks/metamask_defaults_paired.json               # paired: same data order and views
    python benchmarks/metamask_defaults.py --extra trainer.max_epochs=5 --out quick.json   # not the defaults
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

from metassl.bench.metadata import run_metadata

METHODS = ("simclr", "moco_v2", "byol", "simsiam", "barlow_twins", "vicreg")
HERE = Path(__file__).resolve().parent


def train_args(out: Path, method: str, reg: str, seed: int, extra: list[str]) -> list[str]:
    """The ``metassl train`` command of one cell, resuming from ``out``'s last checkpoint if any."""
    args = [sys.executable, "-m", "metassl.cli", "train", f"method={method}", f"regularizer={reg}", f"seed={seed}",
            f"output_dir={out}", "trainer.progress_bar=false", *extra]
    if (out / "checkpoints" / "last.ckpt").exists():
        args.append("resume=auto")
    return args


def run_one(method: str, reg: str, seed: int, runs: Path, extra: list[str]) -> dict:
    out = runs / f"{method}-{reg}-s{seed}"
    args = train_args(out, method, reg, seed, extra)
    t0 = time.time()
    proc = subprocess.run(args, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail), "wall_s": wall}
    summary = json.loads((out / "summary.json").read_text())
    row = {k: summary.get(k) for k in ("knn_top1", "knn_top1_init", "knn_top1_best_val", "epochs", "steps", "precision")}
    row["wall_s"] = wall
    mask_file = out / "mask.json"
    if mask_file.exists():
        mask = json.loads(mask_file.read_text())
        row["mask"] = {k: mask.get(k) for k in ("mask_mean", "mask_std", "mask_min", "mask_max", "mask_frac_below_half", "most_suppressed")}
    return row


def table(results: dict, methods: list[str], seeds: list[int]) -> str:
    lines = ["| method | seed | base kNN | + MetaMask kNN | Δ (points) | untrained kNN | base wall s | MetaMask wall s | mask mean ± std [min, max] | most suppressed dims |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for m in methods:
        for s in seeds:
            b, r = results.get(f"{m}-none-s{s}", {}), results.get(f"{m}-metamask-s{s}", {})
            if "knn_top1" not in b or "knn_top1" not in r:
                def cell(d):
                    if "knn_top1" in d:
                        return f"{d['knn_top1']:.3f}"
                    part = d.get("partial_knn_by_epoch")
                    return f"interrupted after {len(part)} epochs: {part[-1]:.3f}" if part else d.get("error", "not run yet")

                lines.append(f"| {m} | {s} | {cell(b)} | {cell(r)} | | | | | | |")
                continue
            mk = r.get("mask", {})
            spread = f"{mk['mask_mean']:.3f} ± {mk['mask_std']:.3f} [{mk['mask_min']:.3f}, {mk['mask_max']:.3f}]" if mk else "—"
            init = b.get("knn_top1_init")
            lines.append(
                f"| {m} | {s} | {b['knn_top1']:.3f} | {r['knn_top1']:.3f} | {100 * (r['knn_top1'] - b['knn_top1']):+.1f} | "
                f"{init if init is None else f'{init:.3f}'} | {b['wall_s']:.0f} | {r['wall_s']:.0f} | {spread} | {mk.get('most_suppressed', [])[:8]} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--extra", nargs="*", default=[], help="further key=value overrides for every run")
    ap.add_argument("--runs", default="runs/bench-metamask-defaults", help="run folders (resumable)")
    ap.add_argument("--out", default=str(HERE / "metamask_defaults.json"))
    ap.add_argument("--merge", nargs="*", default=[], help="JSON files of parallel invocations to merge into --out first")
    ap.add_argument("--no-run", action="store_true", help="only merge and print the table")
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {}
    results = doc.get("results", {})
    for other in args.merge:
        results.update({k: v for k, v in json.loads(Path(other).read_text()).get("results", {}).items() if "knn_top1" in v})
    meta = run_metadata()
    for s in seeds:  # interrupted runs: their per-epoch kNN so far (resumed, not rerun, next time)
        for m in methods:
            for reg in ("none", "metamask"):
                key, folder = f"{m}-{reg}-s{s}", Path(args.runs) / f"{m}-{reg}-s{s}"
                # a resumed run's earlier epochs are in metrics.part<N>.csv until it finishes
                parts = sorted(folder.glob("metrics.part*.csv"), key=lambda p: int(p.stem.split("part")[1]))
                files = [*parts, folder / "metrics.csv"]
                if not files[-1].exists():
                    continue
                curve = [float(r["test/knn_top1"]) for f in files for r in csv.DictReader(f.open()) if r.get("test/knn_top1")]
                if "knn_top1" in results.get(key, {}):
                    results[key].setdefault("knn_by_epoch", curve)
                else:
                    results[key] = {"partial_knn_by_epoch": curve}
    if args.merge or args.no_run:
        doc = {**meta, "overrides": args.extra, "results": results, "table": table(results, methods, seeds)}
        out.write_text(json.dumps(doc, indent=1))
    if args.no_run:
        print(doc["table"])
        return
    for s in seeds:
        for m in methods:
            for reg in ("none", "metamask"):
                key = f"{m}-{reg}-s{s}"
                if "knn_top1" in results.get(key, {}):
                    continue
                print(f"running {key} ...", flush=True)
                results[key] = {**run_one(m, reg, s, Path(args.runs), args.extra), "commit": meta["commit"]}
                doc = {**meta, "overrides": args.extra, "results": results, "table": table(results, methods, seeds)}
                out.write_text(json.dumps(doc, indent=1))
                print(f"  {results[key]}", flush=True)
    print(table(results, methods, seeds))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
