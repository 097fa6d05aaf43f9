"""How long the whole ``metassl analyze`` report takes on CIFAR-10 with a ResNet-18 (512-d).

One ``metassl analyze`` process per row, timed from the outside (wall clock of the whole
command: loading, feature extraction, every statistic, the dimension-removal ablation with kNN
and ridge probe, background, t-SNE, figures, HTML) and from the inside (the per-stage seconds
``analysis.json`` records).  The network is a ResNet-18 with the CIFAR stem, either randomly
initialised at ``--seed`` (cost does not depend on what the weights learned; the ablation and
t-SNE do the same work on any features) or the backbone of ``--ckpt``.  Data: an ImageFolder
tree (``train/`` and ``test/`` with one folder per class, as the CIFAR-10 JPEG export); the test
split is the full 10,000 images, the kNN bank BANK train images spread evenly over the split
(``data.subset``), features extracted in fp32 or bf16 (``--precision``).
The decoded images are cached once, untimed, in ``--cache`` so that the rows time the analysis,
not JPEG decoding.  Every row runs in a fresh process with ``--threads`` intra-op threads.

Target (issue "metassl analyze"): the whole report in <= 3 min on 2 CPU cores.

Usage::

    python benchmarks/analyze_speed.py --root PATH/TO/cifar10            # bank 10k fp32 / bf16, bank 50k bf16
    python benchmarks/analyze_speed.py --root PATH --rows 10000:bf16 --out /tmp/a.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from metassl.bench.metadata import run_metadata
from metassl.models.backbones import build_backbone

HERE = Path(__file__).resolve().parent


def export_random_resnet18(path: Path, seed: int) -> None:
    """A freshly initialised CIFAR-stem ResNet-18 as a ``metassl export``-style state_dict."""
    torch.manual_seed(seed)
    backbone, _ = build_backbone("resnet18", cifar_stem=True)
    torch.save(backbone.state_dict(), path)


def analyze_command(ckpt: Path, root: Path, bank: int, precision: str, cache: Path, out: Path, exported: bool) -> list[str]:
    args = [sys.executable, "-m", "metassl.cli", "analyze", "--ckpt", str(ckpt), "--out", str(out), "--precision", precision]
    if exported:
        args += ["--backbone", "resnet18", "data=imagefolder", f"data.root={root}", "backbone.cifar_stem=true"]
    else:
        args += [f"data.root={root}"]
    return args + [f"data.subset={bank}", "data.test_subset=null", f"data.cache_dir={cache}"]  # the whole test split


def run_row(ckpt: Path, root: Path, bank: int, precision: str, cache: Path, threads: int, exported: bool) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report"
        args = analyze_command(ckpt, root, bank, precision, cache, out, exported)
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            return {"bank": bank, "precision": precision,
                    "error": " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])}
        record = json.loads((out / "analysis.json").read_text())["runs"][0]
        return {"bank": bank, "precision": precision, "test": record["features"]["splits"].get("test"),
                "wall_s": round(wall, 1), "loadavg_1min_before_after": [load_before, os.getloadavg()[0]],
                "extract_s": record.get("timings_s", {}).get("features"), "timings_s": record.get("timings_s"),
                "report_bytes": (out / "report.html").stat().st_size, "command": " ".join(args[1:])}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True, help="ImageFolder tree with train/ and test/ (e.g. CIFAR-10 as JPEG folders)")
    ap.add_argument("--ckpt", help="a metassl checkpoint of a ResNet-18 run (default: a random-init ResNet-18)")
    ap.add_argument("--rows", default="10000:fp32,10000:bf16,50000:bf16",
                    help="BANK:PRECISION per row: kNN bank size (train images) and feature-extraction precision")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=None, help="folder for the decoded-image cache (default: a temporary folder)")
    ap.add_argument("--no-warm", action="store_true", help="skip the warm-up run (the --cache folder already holds the decoded images)")
    ap.add_argument("--out", default=str(HERE / "analyze_speed.json"))
    args = ap.parse_args(argv)
    root = Path(args.root).expanduser().resolve()
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise SystemExit(f"--root {root}: needs train/ and test/ folders with one subfolder per class")
    rows_spec = [(int(b), p) for b, p in (item.split(":") for item in args.rows.split(",") if item)]
    meta = run_metadata()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.cache) if args.cache else Path(tmp) / "cache"
        cache.mkdir(parents=True, exist_ok=True)
        exported = args.ckpt is None
        ckpt = Path(tmp) / "resnet18_random.pt" if exported else Path(args.ckpt)
        if exported:
            export_random_resnet18(ckpt, args.seed)
        warm, warm_s = None, None
        if not args.no_warm:  # warm the decoded-image cache (untimed in the rows)
            t0 = time.perf_counter()
            warm = run_row(ckpt, root, max(b for b, _ in rows_spec), "bf16", cache, args.threads, exported)
            warm_s = round(time.perf_counter() - t0, 1)
        rows = []
        for bank, precision in rows_spec:
            row = run_row(ckpt, root, bank, precision, cache, args.threads, exported)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "command"}), flush=True)
            write(Path(args.out), meta, args, exported, warm, warm_s, rows, partial=len(rows) < len(rows_spec))
    print(write(Path(args.out), meta, args, exported, warm, warm_s, rows, partial=False))
    print(f"\nwrote {args.out}")


def write(out: Path, meta: dict, args: argparse.Namespace, exported: bool, warm, warm_s, rows: list[dict], partial: bool) -> str:
    """The JSON (rewritten after every row: an interrupted run keeps its finished rows) and the table."""
    lines = ["| kNN bank (train images) | extraction | test images | whole report (s) | feature extraction (s) | "
             "ablation (s) | t-SNE (s) | within 3 min | load avg before/after |", "|---:|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['bank']} | {r['precision']} | | {r['error']} | | | | | |")
            continue
        t = r.get("timings_s") or {}
        load = "/".join(f"{v:.1f}" for v in r["loadavg_1min_before_after"])
        lines.append(f"| {r['bank']} | {r['precision']} | {r['test']} | {r['wall_s']:.0f} | {t.get('features', 0):.0f} | "
                     f"{t.get('ablation', 0):.0f} | {t.get('embedding', 0):.0f} | {'yes' if r['wall_s'] <= 180 else 'no'} | {load} |")
    table = "\n".join(lines)
    doc = {**meta, "threads": args.threads, "weights": f"random init, seed {args.seed}" if exported else args.ckpt,
           "first_run_with_decode_s": warm_s, "first_run": warm and {k: v for k, v in warm.items() if k != "command"},
           "partial": partial, "rows_requested": args.rows, "rows": rows, "table": table}
    out.write_text(json.dumps(doc, indent=1))
    return table


if __name__ == "__main__":
    main()
