"""``metassl bench speed``: views/s, step time and peak memory of every base method and every
base + regularizer, side by side with lightly's implementation of the same base method, plus the
throughput of the data pipeline.  This module is the command line and the run; the pieces:

- :mod:`metassl.bench.cases`: one configuration (:class:`~metassl.bench.cases.Case`) and what all
  share (backbone, views, precision, optimizer settings);
- :mod:`metassl.bench.metassl_case`: what is timed is what trains,
  :func:`metassl.engine.step.training_step` with the engine's optimizer, the regularizer's meta
  optimizer, bf16 autocast around the whole step (as ``bf16-mixed``) and ``channels_last`` where
  the engine applies it;
- :mod:`metassl.bench.lightly_case`: the same base method with lightly's heads and losses;
- :mod:`metassl.bench.timing`: warm-up, interleaved rounds (step time = median over rounds of
  the per-round mean; views/s = batch x views / step time), overheads and ratios;
- :mod:`metassl.bench.probes`: step memory, CPU time of other processes;
- :mod:`metassl.bench.data_pipeline`, :mod:`metassl.bench.report` (Markdown),
  :mod:`metassl.bench.metadata` (commit, date, machine and command, in every JSON).

Shared machines: the CPU time that *other* processes used during each round is recorded
(``others_cpu_cores``); a round during which they used more than ``--busy-threshold``
cores is measured again (``--retries``).  With 2 torch threads on 2 cores a single busy
neighbour slows OpenMP regions by large factors (a 2.5 s step took up to 76 s here), so on
a busy machine ``--threads 1 --busy-threshold 1.25`` gives stable *ratios* (overheads,
metassl/lightly) at half the absolute speed.

Usage::

    python -m metassl.bench.speed --quick                     # convnet_small, batch 64, ~2 min on 2 cores
    python -m metassl.bench.speed                             # resnet18, batch 256, bf16, channels_last
    python -m metassl.bench.speed --fastpath                  # SimCLR: fp32 / bf16, without / with channels_last
    python -m metassl.bench.speed --methods simclr,byol --regularizers metamask --steps 2

Writes ``<out-dir>/<name>.json`` and ``<out-dir>/<name>.md`` (default ``benchmarks/speed``,
``speed_quick`` with ``--quick``, ``speed_fastpath`` with ``--fastpath``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from metassl.bench.cases import NUM_VIEWS, Case, Variant, error_text
from metassl.bench.data_pipeline import measure_data_pipeline
from metassl.bench.lightly_case import build_lightly_case, lightly_available, lightly_version
from metassl.bench.metadata import machine_info, run_metadata
from metassl.bench.metassl_case import build_metassl_case
from metassl.bench.report import to_markdown
from metassl.bench.timing import add_ratios, case_result, log, time_cases

__all__ = ["main", "build_parser", "run", "to_markdown", "machine_info", "run_metadata"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="metassl bench speed",
        description="Speed of every method and method + regularizer (metassl.engine.step.training_step), "
        "side by side with lightly's implementation, and of the data pipeline.",
    )
    p.add_argument("--backbone", default=None, help="backbone name (default resnet18; convnet_small with --quick)")
    p.add_argument("--batch", type=int, default=None, help="images per step (default 256; 64 with --quick); views = 2 x batch")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16", help="bf16 = autocast around the step")
    p.add_argument("--channels-last", dest="channels_last", action="store_true", default=True, help="(default)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--compile", choices=["off", "on", "both"], default="off",
                   help="torch.compile the backbone in place (as trainer.compile=true), for metassl and lightly alike: "
                   "off (default), on, or both (every configuration eager and compiled; the compiled ones' first "
                   "steps, which compile, are untimed warm-up)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per configuration and round, at most (default 1; 3 with --quick); see --round-time")
    p.add_argument("--round-time", type=float, default=None,
                   help="target seconds per configuration and round: a configuration whose warm-up step took t seconds "
                   "runs min(--steps, ceil(round-time / t)) steps per round (default 1.0 with --quick, else 0 = always --steps)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per configuration (default 1)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 3)")
    p.add_argument("--retries", type=int, default=2,
                   help="a round during which other processes used more than --busy-threshold CPU cores is measured "
                   "again, up to this many times (shared machines; default 2)")
    p.add_argument("--busy-threshold", type=float, default=0.25, help="see --retries (CPU cores used by other processes)")
    p.add_argument("--methods", default="all", help="comma-separated base methods (default: every registered one)")
    p.add_argument("--regularizers", default="all", help="comma-separated regularizers besides 'none' (default: every registered one; '' = none)")
    p.add_argument("--no-lightly", action="store_true", help="skip the lightly column")
    p.add_argument("--no-data", action="store_true", help="skip the data-pipeline measurement")
    p.add_argument("--data", default="builtin", help="data for the pipeline measurement: builtin or an imagefolder root (e.g. CIFAR-10 JPEG)")
    p.add_argument("--data-workers", default="0,1", help="num_workers values for the data pipeline")
    p.add_argument("--data-batches", type=int, default=None, help="timed batches per data configuration and round (default 4; 5 with --quick)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--quick", action="store_true", help="convnet_small, batch 64, few steps: about 2 minutes on 2 CPU cores (mostly MetaMask's first steps)")
    p.add_argument("--fastpath", action="store_true",
                   help="SimCLR (+ lightly) in fp32 and bf16 autocast, each without and with channels_last")
    p.add_argument("--out-dir", default="benchmarks")
    p.add_argument("--name", default=None, help="output file stem (default speed, speed_quick, speed_fastpath)")
    p.add_argument("--seed", type=int, default=0)
    return p


def _resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    quick = args.quick
    args.backbone = args.backbone or ("convnet_small" if quick else "resnet18")
    args.batch = args.batch or (64 if quick else 256)
    args.steps = args.steps if args.steps is not None else (3 if quick else 1)
    args.warmup = args.warmup if args.warmup is not None else 1
    args.repeats = args.repeats if args.repeats is not None else 3
    args.round_time = args.round_time if args.round_time is not None else (0.5 if quick else 0.0)
    args.data_batches = args.data_batches if args.data_batches is not None else (5 if quick else 4)
    if args.name is None:
        args.name = "speed_fastpath" if args.fastpath else ("speed_quick" if quick else "speed")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.steps < 1 or args.repeats < 1 or args.warmup < 1 or args.batch < 2:
        raise SystemExit("metassl bench speed: --steps, --repeats and --warmup must be >= 1 and --batch >= 2")
    return args


def _select(names: str, available: list[str], what: str) -> list[str]:
    if names == "all":
        return available
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in available]
    if unknown:
        raise SystemExit(f"metassl bench speed: unknown {what} {', '.join(unknown)}; available: {', '.join(available)}")
    return chosen


def _registered() -> tuple[list[str], list[str]]:
    from metassl.methods import METHODS
    from metassl.regularizers import REGULARIZERS

    return sorted(METHODS), sorted(r for r in REGULARIZERS if r != "none")


def _plan(args: argparse.Namespace) -> tuple[list[str], list[str], list[Variant]]:
    """The methods, regularizers (``none`` first) and variants that ``args`` asks for."""
    methods_all, regs_all = _registered()
    if args.fastpath:
        methods = _select(args.methods if args.methods != "all" else "simclr", methods_all, "method")
        regs = ["none"]
        variants = [Variant("fp32", False), Variant("fp32", True), Variant("bf16", False), Variant("bf16", True)]
    else:
        methods = _select(args.methods, methods_all, "method")
        regs = ["none"] + (_select(args.regularizers, regs_all, "regularizer") if args.regularizers else [])
        variants = [Variant(args.precision, args.channels_last)]
    if args.compile == "on":
        variants = [Variant(v.precision, v.channels_last, True) for v in variants]
    elif args.compile == "both":
        variants = [Variant(v.precision, v.channels_last, c) for v in variants for c in (False, True)]
    return methods, regs, variants


def _built(impl: str, method: str, reg: str, variant: Variant, build: Callable[[], Case]) -> Case:
    """``build()``, or a failed row if it raises (the other configurations go on)."""
    try:
        return build()
    except Exception as err:  # noqa: BLE001
        return Case(impl, method, reg, variant, error=f"build failed: {error_text(err)}")


def _build_cases(args: argparse.Namespace, methods: list[str], regs: list[str], variants: list[Variant],
                 with_lightly: bool) -> list[Case]:
    """Every configuration built once: per variant and method, metassl with each regularizer, then lightly."""
    cases: list[Case] = []
    for variant in variants:
        for m in methods:
            cases += [_built("metassl", m, r, variant, lambda: build_metassl_case(args, m, r, variant)) for r in regs]
            if with_lightly:
                cases.append(_built("lightly", m, "none", variant, lambda: build_lightly_case(args, m, variant)))
    return cases


NOTES = [
    "step time: median over interleaved rounds of the mean time of the round's steps; views/s = batch x 2 / step time; "
    "a round during which other processes used more than --busy-threshold cores is measured again (--retries)",
    "metassl: metassl.engine.step.training_step with SGD (engine parameter groups), meta optimizer of bilevel regularizers, "
    "autocast around the whole step for bf16; channels_last on the method's weights and the views (as SSLModule)",
    "lightly: lightly heads + losses, same backbone, views, precision and memory format; MoCo symmetrised like metassl "
    "(its memory bank is updated by both loss calls)",
]
MEMORY_NOTE = {
    "cuda": "step_mem_mb: CUDA max_memory_allocated during a step minus allocated before",
    "cpu": "step_mem_mb: peak RSS during the last warm-up step minus RSS before it (after malloc_trim): activations, "
           "gradients, temporaries (and optimizer state created on a first step)",
}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure everything asked by ``args``; returns the JSON-ready result (provenance first:
    commit, date, machine, command, see :func:`metassl.bench.metadata.run_metadata`)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = run_metadata(device=args.device)
    meta["machine"]["lightly"] = lightly_version()
    methods, regs, variants = _plan(args)
    lightly_reason = "lightly column disabled (--no-lightly)" if args.no_lightly else lightly_available()
    notes = [lightly_reason] if lightly_reason else []
    cases = _build_cases(args, methods, regs, variants, with_lightly=lightly_reason is None)
    log(f"metassl bench speed: {len(cases)} configurations, backbone {args.backbone}, batch {args.batch} x {NUM_VIEWS} views, "
        f"{', '.join(v.label for v in variants)}, device {args.device}, {torch.get_num_threads()} threads")
    start = time.perf_counter()
    time_cases(cases, args)
    results = [case_result(c, args) for c in cases]
    add_ratios(results)
    data = []
    if not args.no_data and not args.fastpath:
        from metassl.methods import get_method_class

        families = sorted({get_method_class(m).augmentation for m in methods})
        data = measure_data_pipeline(args, families)
    return {
        "benchmark": "speed",
        **meta,
        "settings": {
            "backbone": args.backbone, "batch": args.batch, "views": NUM_VIEWS, "image_size": args.image_size,
            "variants": [v.label for v in variants], "device": args.device, "steps": args.steps, "warmup": args.warmup,
            "repeats": args.repeats, "round_time": args.round_time, "retries": args.retries, "busy_threshold": args.busy_threshold,
            "quick": args.quick, "fastpath": args.fastpath, "compile": args.compile,
        },
        "results": results,
        "data_pipeline": data,
        "notes": notes + NOTES + [MEMORY_NOTE["cuda" if args.device == "cuda" else "cpu"]],
        "wall_seconds": round(time.perf_counter() - start, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = _resolve_args(build_parser().parse_args(argv))
    result = run(args)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{args.name}.json", out_dir / f"{args.name}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md = to_markdown(result)
    md_path.write_text(md)
    print(md)
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    failed = [r for r in result["results"] if "error" in r]
    return 1 if failed and len(failed) == len(result["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
