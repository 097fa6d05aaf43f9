"""Does each regularizer, with its defaults, train at least as well as its base?

Each cell is one ``metassl train method=<m> regularizer=<r> seed=<s>`` on the built-in data with
the library's defaults (the README's first run plus the regularizer), in its own process.
Resumable like ``metamask_defaults.py``: finished cells are read back from the JSON, an
interrupted run continues from its ``last.ckpt`` (``resume=auto``), and the JSON is rewritten
after every run.  ``--import KEY=RUN_FOLDER`` records a run finished elsewhere (its
``summary.json`` and ``config.yaml`` are read; the folder is named in the JSON).

Usage::

    python benchmarks/regularizer_defaults.py --regularizers none,mrcl,iclmsr --seeds 0,1,2
    python benchmarks/regularizer_defaults.py --no-run --import simclr-mrcl-s0=runs/x
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

from metamask_defaults import train_args  # same folder: benchmarks/ is on sys.path when run as a script

from metassl.bench.metadata import run_metadata

HERE = Path(__file__).resolve().parent
KEEP = ("knn_top1", "knn_top1_init", "knn_top1_best_val", "best_val_epoch", "epochs", "steps", "precision", "train_seconds")


def read_run(folder: Path) -> dict:
    summary = json.loads((folder / "summary.json").read_text())
    return {**{k: summary.get(k) for k in KEEP}, "run_folder": str(folder)}


def run_one(method: str, reg: str, seed: int, runs: Path, extra: list[str]) -> dict:
    out = runs / f"{method}-{reg}-s{seed}"
    args = train_args(out, method, reg, seed, extra)
    t0 = time.time()
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])}
    return {**read_run(out), "wall_s": time.time() - t0, "command": " ".join(args[1:])}


def table(results: dict, methods: list[str], regs: list[str], seeds: list[int]) -> str:
    lines = ["| method | regularizer | seed | test kNN (last) | Δ vs base (points) | val kNN (best epoch) | untrained kNN | train s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for m in methods:
        for s in seeds:
            base = results.get(f"{m}-none-s{s}", {})
            for r in regs:
                row = results.get(f"{m}-{r}-s{s}", {})
                if "knn_top1" not in row:
                    lines.append(f"| {m} | {r} | {s} | {row.get('error', 'not run yet')} | | | | |")
                    continue
                delta = f"{100 * (row['knn_top1'] - base['knn_top1']):+.1f}" if "knn_top1" in base and r != "none" else ""
                lines.append(f"| {m} | {r} | {s} | {row['knn_top1']:.3f} | {delta} | {row['knn_top1_best_val']:.3f} | "
                             f"{row['knn_top1_init']:.3f} | {row.get('train_seconds') or 0:.0f} |")
    return "\n".join(lines)


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
    print(table(results, methods, regs, seeds))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
