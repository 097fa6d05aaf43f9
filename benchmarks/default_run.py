"""The README's first run, measured: ``metassl train`` with every default, wall time and kNN.

Runs ``metassl train`` (plus ``--extra`` overrides, if any) in a fresh process, times it from
the outside, and writes ``benchmarks/default_run.json`` with the run's ``summary.json`` (kNN of
the trained and of the untrained network, precision as resolved, epochs, seed), the wall time,
and the commit, date, machine and command.

Usage::

    python benchmarks/default_run.py
    python benchmarks/default_run.py --extra trainer.precision=32-true --key fp32
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

from metassl.bench.metadata import redact, run_metadata

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--extra", nargs="*", default=[], help="key=value overrides (none: the defaults)")
    ap.add_argument("--key", default="default", help="name of this measurement in the JSON")
    ap.add_argument("--out", default=str(HERE / "default_run.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "metassl.cli", "train", f"output_dir={run}", "trainer.progress_bar=false", *args.extra]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.time() - t0
        if proc.returncode != 0:
            raise SystemExit(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")
        summary = json.loads((run / "summary.json").read_text())
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {}
    entry = {**run_metadata(), "overrides": args.extra, "wall_s": wall, "loadavg_after": os.getloadavg(),
             "last_line": proc.stdout.strip().splitlines()[-1], "summary": summary}
    doc[args.key] = redact(entry, {str(tmp): "<temporary folder>"})  # the run folder is this machine's
    out.write_text(json.dumps(doc, indent=1))
    print(f"{args.key}: {wall:.0f} s wall, kNN {summary['knn_top1']:.3f} (untrained {summary.get('knn_top1_init')}), "
          f"precision {summary.get('precision')} -> {out}")


if __name__ == "__main__":
    main()
