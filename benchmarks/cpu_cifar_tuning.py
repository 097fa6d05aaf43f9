"""Choosing ``protocol=cpu_cifar``'s SimCLR values on the validation split (never on test).

Each variant is one ``metassl bench accuracy --protocol cpu_cifar --methods simclr --regularizers none``
at a proxy budget that keeps the protocol's schedule (8 epochs, batch 256, the same optimizer and
views) but costs about a tenth: the ConvNet at half width (32-64-128-256), 25,000 of the train images
(spread over the folder), kNN only after the last epoch, no linear probe.  The variant's own
overrides come on top.  Results go to ``benchmarks/accuracy/cpu_cifar_tuning/<variant>/`` (the
harness's folders: resumable, and committed raw records are read back instead of retrained), and
``summary.md`` / ``summary.json`` beside them rank the variants by the validation kNN (k=200, t=0.1,
last epoch; the validation split is ``eval.val_fraction`` of the labelled train split) with the test
kNN beside it for the record, not for the choice.

A variant names only what it changes, on top of the presets as they stood when it trained (each raw
record keeps ``trained_at_commit``): the first variants ran before the chosen values entered
``configs/protocol_method/cpu_cifar_simclr.yaml``, so their crops are the data preset's 0.08-1.

Usage::

    python benchmarks/cpu_cifar_tuning.py --data-root ~/data/cifar10 --jobs 2
    python benchmarks/cpu_cifar_tuning.py --data-root ~/data/cifar10 --variants t02,t02_crop02 --seeds 0,1
    python benchmarks/cpu_cifar_tuning.py --summary-only
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from metassl.bench.metadata import redact, run_metadata

HERE = Path(__file__).resolve().parent
OUT = HERE / "accuracy" / "cpu_cifar_tuning"
PROXY = ["backbone.widths=[32,64,128,256]", "eval.knn.every_n_epochs=8", "eval.linear_probe=false"]
TRAIN_SUBSET = 25000

#: name -> (overrides on top of the proxy, what it tests)
VARIANTS: dict[str, tuple[list[str], str]] = {
    "t05": (["method.temperature=0.5"], "the SimCLR preset's temperature (CIFAR-10 setting of the paper, long schedules)"),
    "t02": (["method.temperature=0.2"], "a lower temperature"),
    "t01": (["method.temperature=0.1"], "lower still"),
    "t05_loader": (["method.temperature=0.5", "data.augment_on=loader"],
                   "per-sample torchvision views instead of the batched ones (a check that the batched views train as well)"),
    "t02_crop02": (["method.temperature=0.2", "data.aug.crop_scale_min=0.2"], "milder crops (scale 0.2-1 instead of 0.08-1)"),
    "t02_crop02_lr2": (["method.temperature=0.2", "data.aug.crop_scale_min=0.2", "optimizer.lr=2.0"],
                       "twice the LARS learning rate, on top of the milder crops"),
}


def bench_command(name: str, seeds: str, data_root: str, cache_dir: str | None) -> list[str]:
    extra = [*PROXY, *VARIANTS[name][0], *([f"data.cache_dir={cache_dir}"] if cache_dir else [])]
    return [sys.executable, "-m", "metassl.cli", "bench", "accuracy", "--protocol", "cpu_cifar", "--data", "imagefolder",
            "--data-root", data_root, "--methods", "simclr", "--regularizers", "none", "--seeds", seeds,
            "--train-subset", str(TRAIN_SUBSET), "--out", os.path.relpath(OUT / name), "--runs", f"runs/cpu_cifar_tuning/{name}",
            "--extra", *extra]


def run_variant(name: str, args: argparse.Namespace, threads: int | None) -> int:
    env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log = Path("runs/cpu_cifar_tuning") / f"{name}.log"  # not committed: it names this machine's folders
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        return subprocess.run(bench_command(name, args.seeds, args.data_root, args.cache_dir), stdout=out,
                              stderr=subprocess.STDOUT, env=env, check=False).returncode


def variant_rows(names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        path = OUT / name / "results.json"
        if not path.is_file():
            rows.append({"variant": name, "overrides": VARIANTS[name][0], "what": VARIANTS[name][1], "n": 0})
            continue
        cells = [c for c in json.loads(path.read_text())["cells"].values() if c.get("status") == "done"]
        val = [c["curve"][-1]["val_knn_top1"] for c in cells]
        test = [c["knn_top1"] for c in cells]
        rows.append({"variant": name, "overrides": VARIANTS[name][0], "what": VARIANTS[name][1], "n": len(cells),
                     "seeds": [c["seed"] for c in cells], "val_knn_last": val, "test_knn_last": test,
                     "val_mean": statistics.fmean(val) if val else None, "test_mean": statistics.fmean(test) if test else None,
                     "untrained_test_knn": [c.get("knn_top1_init") for c in cells],
                     "train_seconds": [c.get("train_seconds") for c in cells], "images_per_s": [c.get("images_per_s") for c in cells],
                     "trained_at_commit": sorted({c.get("trained_at_commit") or "?" for c in cells}),
                     "machines": sorted({json.dumps(c.get("machine"), sort_keys=True) for c in cells})})
    return rows


def summary_md(rows: list[dict]) -> str:
    ranked = sorted(rows, key=lambda r: -(r.get("val_mean") or -1))
    lines = ["# `protocol=cpu_cifar`: SimCLR values chosen on the validation split", "",
             f"Proxy budget: CIFAR-10 ImageFolder, {TRAIN_SUBSET:,} train images (spread over the folder; validation = "
             "10 % of them, labels held out of the kNN bank; self-supervised training sees their pixels), ConvNet 32-64-128-256 (half the protocol's "
             "widths), 8 epochs, batch 256, LARS lr 1.0 warmup-cosine, batched views, kNN k=200 t=0.1 on backbone "
             "features after the last epoch, values per seed. Ranked by the mean validation kNN; the test kNN is for the record only.", "",
             "| variant | overrides | seeds | val kNN last | val mean | test kNN last | test mean | untrained test kNN | what it tests |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in ranked:
        if not r["n"]:
            lines.append(f"| {r['variant']} | `{' '.join(r['overrides'])}` | — | not run | | | | | {r['what']} |")
            continue
        def fmt(xs):
            return " / ".join(f"{100 * x:.2f}" for x in xs)
        lines.append(f"| {r['variant']} | `{' '.join(r['overrides'])}` | {', '.join(map(str, r['seeds']))} | "
                     f"{fmt(r['val_knn_last'])} | {100 * r['val_mean']:.2f} | {fmt(r['test_knn_last'])} | "
                     f"{100 * r['test_mean']:.2f} | {fmt(r['untrained_test_knn'])} | {r['what']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", help="the CIFAR-10 ImageFolder (train/ and test/ class folders)")
    ap.add_argument("--cache-dir", help="data.cache_dir for the decoded images (optional, machine-only)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--jobs", type=int, default=1, help="variants trained at once, one CPU thread each when > 1")
    ap.add_argument("--summary-only", action="store_true")
    args = ap.parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    if bad := [n for n in names if n not in VARIANTS]:
        ap.error(f"unknown variant {bad[0]}; valid: {', '.join(VARIANTS)}")
    if not args.summary_only:
        if not args.data_root:
            ap.error("--data-root PATH is needed (the folder with train/ and test/ class folders), or --summary-only")
        threads = None if args.jobs == 1 else max(1, (os.cpu_count() or 1) // args.jobs)
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            codes = list(pool.map(lambda n: run_variant(n, args, threads), names))
        for name, code in zip(names, codes):
            if code:
                print(f"{name}: bench accuracy exited {code}; see runs/cpu_cifar_tuning/{name}.log", file=sys.stderr)
    rows = variant_rows(list(VARIANTS))  # every variant's folder, not only those trained in this call
    meta = run_metadata()
    paths = {p: "<data-root>" for p in [args.data_root] if p}
    paths.update({p: "<cache>" for p in [args.cache_dir] if p})
    doc = redact({**meta, "proxy_overrides": PROXY, "train_subset": TRAIN_SUBSET, "variants": rows}, paths)
    (OUT / "summary.json").write_text(json.dumps(doc, indent=1) + "\n")
    (OUT / "summary.md").write_text(summary_md(rows))
    print(summary_md(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
