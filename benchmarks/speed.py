"""Speed benchmark (thin wrapper): ``python benchmarks/speed.py [--quick] [options]``.

Same as ``python -m metassl.bench.speed`` / ``metassl bench speed``; see
:mod:`metassl.bench.speed` for what is measured.  Results go next to this file
(``benchmarks/speed*.json`` and ``.md``) unless ``--out-dir`` is given.
"""

import sys
from pathlib import Path

from metassl.bench.speed import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a == "--out-dir" or a.startswith("--out-dir=") for a in argv):
        argv = ["--out-dir", str(Path(__file__).resolve().parent)] + argv
    sys.exit(main(argv))
