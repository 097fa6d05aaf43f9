"""The background study of ICL-MSR (docs/algorithms.md §5.6): train on full or foreground-only images,
test on full and on foreground-only images, for a base method with and without a regularizer.

Each training cell is one ``metassl train method=<m> regularizer=<r> seed=<s> data.foreground_only=<f>``
in its own process, on the built-in data with a background–class correlation in the train split
and none in the test split (``STUDY_KNOBS``), followed by ``metassl eval background`` on its last
checkpoint, which scores both test conditions (kNN with the run's k/t and the linear probe, each
with its bank / probe split in the test's condition; model selection on a validation split of
train, never on test).  Four settings per (method, regularizer, seed): train full | foreground ×
test full | foreground.  Seeds pair the cells: a regularizer's difference to the base is taken
seed by seed.

Resumable: finished cells are read back from the JSON, an interrupted training continues from its
``last.ckpt`` (``resume=auto``), a finished training whose evaluation is missing is only evaluated,
and the JSON (commit, date, machine, command, the knobs, raw per-run results, a markdown table of
mean ± std over seeds and of the paired differences) and the bar chart are rewritten after every
cell.  Parallel streams write their own ``--out`` and are merged with ``--merge ... --no-run``.

Usage::

    python benchmarks/background_study.py                                   # simclr, none vs iclmsr, seeds 0,1,2
    python benchmarks/background_study.py --regularizers none --seeds 0 --out a.json      # one stream
    python benchmarks/background_study.py --merge a.json b.json --no-run                  # merge streams
    python benchmarks/background_study.py --regularizers none --seeds 0 --extra trainer.max_epochs=1 data.num_train=300 \\
        --out /tmp/quick.json --runs /tmp/bg-runs                                         # an end-to-end check, not the study
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from metassl.bench.metadata import run_metadata

HERE = Path(__file__).resolve().parent
TRAIN_CONDITIONS = ("full", "foreground")
TEST_CONDITIONS = ("full", "foreground")
METRICS = ("knn", "linear")
#: the study's data knobs (docs/algorithms.md §5.6): the background family is tied to the class in 80 %
#: of the train images and in none of the test images, at full texture contrast.  Base SimCLR, 5 epochs,
#: trained on full images: kNN gap (full − foreground) -11.8 points at contrast 1.0, -1.0 at the library's
#: default contrast 0.3 (chosen for learning shapes), -7.0 at contrast 1.0 without the correlation
STUDY_KNOBS = (
    "data.background_class_correlation=0.8",
    "data.test_background_class_correlation=0.0",
    "data.background_contrast=1.0",
)


def cell_key(method: str, reg: str, train: str, seed: int) -> str:
    return f"{method}-{reg}-train_{train}-s{seed}"


def is_finished(row: dict[str, Any] | None) -> bool:
    """A cell is finished when its evaluation is in: both test conditions scored."""
    return bool(row) and all(isinstance(row.get(test), dict) and row[test].get("knn") is not None for test in TEST_CONDITIONS)


def merge_results(results: dict[str, Any], others: list[dict[str, Any]]) -> dict[str, Any]:
    """``results`` updated with the finished cells of other streams (unfinished ones never overwrite)."""
    merged = dict(results)
    for other in others:
        merged.update({key: row for key, row in other.items() if is_finished(row)})
    return merged


def mean_std(xs: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def fmt(xs: list[float], scale: float = 100.0, signed: bool = False) -> str:
    """``mean ± std (n)`` in points; an em dash without values."""
    if not xs:
        return "—"
    mean, std = mean_std([v * scale for v in xs])
    head = f"{mean:+.1f}" if signed else f"{mean:.1f}"
    return f"{head} ± {std:.1f} (n={len(xs)})" if std is not None else f"{head} (n=1)"


def setting_values(results: dict[str, Any], method: str, reg: str, train: str, test: str, metric: str,
                   seeds: list[int]) -> list[float]:
    """One setting's metric over the finished seeds; ``test="gap"`` gives full − foreground."""
    out = []
    for seed in seeds:
        row = results.get(cell_key(method, reg, train, seed))
        if is_finished(row) and row[test].get(metric) is not None:
            out.append(float(row[test][metric]))
    return out


def paired_differences(results: dict[str, Any], method: str, reg: str, base: str, train: str, test: str,
                       metric: str, seeds: list[int]) -> list[float]:
    """``reg − base`` seed by seed, over the seeds where both cells are finished."""
    out = []
    for seed in seeds:
        a, b = results.get(cell_key(method, reg, train, seed)), results.get(cell_key(method, base, train, seed))
        if is_finished(a) and is_finished(b) and a[test].get(metric) is not None and b[test].get(metric) is not None:
            out.append(float(a[test][metric]) - float(b[test][metric]))
    return out


def table(results: dict[str, Any], methods: list[str], regs: list[str], seeds: list[int]) -> str:
    """Markdown: mean ± std over seeds (points) per setting, then the paired differences to ``none``."""
    cols = [(test, metric) for metric in METRICS for test in (*TEST_CONDITIONS, "gap")]
    head = " | ".join(f"{metric} test {test}" if test != "gap" else f"{metric} gap (full − fg)" for test, metric in cols)
    lines = [f"| method | regularizer | train | {head} |", "|---|---|---|" + "---:|" * len(cols)]
    for m in methods:
        for r in regs:
            for train in TRAIN_CONDITIONS:
                cells = [fmt(setting_values(results, m, r, train, test, metric, seeds), signed=test == "gap")
                         for test, metric in cols]
                lines.append(f"| {m} | {r} | {train} | " + " | ".join(cells) + " |")
    others = [r for r in regs if r != "none"]
    if "none" in regs and others:
        lines += ["", "Paired differences regularizer − none (points, seed by seed, mean ± std over seeds):", "",
                  f"| method | regularizer | train | {head} |", "|---|---|---|" + "---:|" * len(cols)]
        for m in methods:
            for r in others:
                for train in TRAIN_CONDITIONS:
                    cells = [fmt(paired_differences(results, m, r, "none", train, test, metric, seeds), signed=True)
                             for test, metric in cols]
                    lines.append(f"| {m} | {r} | {train} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, Any], methods: list[str], regs: list[str], seeds: list[int], path: Path) -> None:
    """Bar chart: the four settings × regularizers, mean ± std over seeds, one panel per method and metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [(train, test) for train in TRAIN_CONDITIONS for test in TEST_CONDITIONS]
    metrics = [mt for mt in METRICS if any(setting_values(results, m, r, tr, te, mt, seeds)
                                           for m in methods for r in regs for tr, te in settings)] or ["knn"]
    fig, axes = plt.subplots(len(methods), len(metrics), figsize=(6.5 * len(metrics), 3.6 * len(methods)), squeeze=False)
    width = 0.8 / max(1, len(regs))
    for i, m in enumerate(methods):
        for j, metric in enumerate(metrics):
            ax = axes[i][j]
            for k, r in enumerate(regs):
                stats = [setting_values(results, m, r, tr, te, metric, seeds) for tr, te in settings]
                means = [100 * statistics.fmean(v) if v else 0.0 for v in stats]
                errs = [100 * statistics.stdev(v) if len(v) > 1 else 0.0 for v in stats]
                xs = [x + (k - (len(regs) - 1) / 2) * width for x in range(len(settings))]
                ax.bar(xs, means, width, yerr=errs, capsize=3, label=r)
            ax.set_xticks(range(len(settings)), [f"train {tr}\ntest {te}" for tr, te in settings], fontsize=8)
            ax.set_ylabel(f"{metric} top-1 (%)")
            ax.set_title(f"{m}: {metric}, mean ± std over seeds {','.join(map(str, seeds))}", fontsize=9)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_cell(method: str, reg: str, train: str, seed: int, runs: Path, extra: list[str], eval_extra: list[str]) -> dict[str, Any]:
    """Train (or resume, or skip when finished) one cell, then ``metassl eval background`` on its last checkpoint."""
    out = runs / cell_key(method, reg, train, seed)
    row: dict[str, Any] = {}
    t0 = time.time()
    if not (out / "summary.json").is_file():
        args = [sys.executable, "-m", "metassl.cli", "train", f"method={method}", f"regularizer={reg}", f"seed={seed}",
                f"output_dir={out}", "trainer.progress_bar=false", f"data.foreground_only={str(train == 'foreground').lower()}",
                *STUDY_KNOBS, *extra]
        if (out / "checkpoints" / "last.ckpt").exists():
            args.append("resume=auto")
        proc = subprocess.run(args, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            return {"error": "train: " + _tail(proc), "train_wall_s": time.time() - t0}
        row["train_wall_s"] = time.time() - t0
    summary = json.loads((out / "summary.json").read_text())
    row.update({k: summary.get(k) for k in ("knn_top1", "knn_top1_init", "epochs", "steps", "precision", "train_seconds")})
    t1 = time.time()
    report = out / "background.json"
    args = [sys.executable, "-m", "metassl.cli", "eval", "background", "--ckpt", str(out / "checkpoints" / "last.ckpt"),
            "--out", str(report), *eval_extra]
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {**row, "error": "eval: " + _tail(proc)}
    bg = json.loads(report.read_text())
    row.update({name: bg[name] for name in (*TEST_CONDITIONS, "gap")}, fill=bg.get("fill"), eval_wall_s=time.time() - t1)
    return row


def _tail(proc: subprocess.CompletedProcess) -> str:
    return " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])


def write(out: Path, doc: dict[str, Any], methods: list[str], regs: list[str], seeds: list[int]) -> None:
    doc["table"] = table(doc["results"], methods, regs, seeds)
    out.write_text(json.dumps(doc, indent=1))
    plot(doc["results"], methods, regs, seeds, out.with_suffix(".png"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="simclr", help="base methods, comma separated")
    ap.add_argument("--regularizers", default="none,iclmsr", help="'none' is the base; differences are taken to it")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--train", default=",".join(TRAIN_CONDITIONS),
                    help="training conditions to run (full, foreground); the table shows every finished cell")
    ap.add_argument("--extra", nargs="*", default=[], help="further key=value overrides for every training run")
    ap.add_argument("--eval-extra", nargs="*", default=[],
                    help="overrides for `metassl eval background`, e.g. eval.background.linear=false")
    ap.add_argument("--runs", default="runs/bench-background-study", help="run folders (resumable)")
    ap.add_argument("--out", default=str(HERE / "background_study.json"), help="JSON; the chart goes next to it as .png")
    ap.add_argument("--merge", nargs="*", default=[], help="JSON files of parallel invocations to merge into --out first")
    ap.add_argument("--no-run", action="store_true", help="only merge, write and print the table")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    regs = [r for r in args.regularizers.split(",") if r]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.exists() else {}
    results = merge_results(old.get("results", {}), [json.loads(Path(p).read_text()).get("results", {}) for p in args.merge])
    meta = run_metadata()
    doc = {**meta, "study_knobs": list(STUDY_KNOBS), "overrides": args.extra, "eval_overrides": args.eval_extra,
           "results": results}
    if args.merge or args.no_run:
        write(out, doc, methods, regs, seeds)
    if not args.no_run:
        for seed in seeds:
            for m in methods:
                for r in regs:
                    for train in [t for t in args.train.split(",") if t]:
                        if train not in TRAIN_CONDITIONS:
                            raise SystemExit(f"--train: unknown condition {train!r}; use {', '.join(TRAIN_CONDITIONS)}")
                        key = cell_key(m, r, train, seed)
                        if is_finished(results.get(key)):
                            continue
                        print(f"running {key} ...", flush=True)
                        results[key] = {**run_cell(m, r, train, seed, Path(args.runs), args.extra, args.eval_extra),
                                        "commit": meta["commit"]}
                        write(out, doc, methods, regs, seeds)
                        print(f"  {json.dumps(results[key])}", flush=True)
    print(table(results, methods, regs, seeds))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
