"""Step cost of every regularizer (and of chosen option variants) against the base step, side by side.

Each case is ``REG`` or ``REG:key=value,key=value`` (the regularizer's preset with those options
changed), timed as it trains: one :func:`metassl.engine.step.training_step` with the engine's
SGD parameter groups, the regularizer's meta optimizer and the data extras it asks for
(ICL-MSR's un-augmented image), on one seeded backbone and one fixed batch of two views
(:mod:`metassl.bench.cases`, as ``metassl bench speed``).  Rounds are interleaved in rotating
order; per case the median wall time and the median process CPU time (``time.process_time``,
robust when other processes share the cores) of ``--reps`` rounds after ``--warmup``.
Reference passes of the base model are timed with them, for pass-count floors: ``pass:fwd``
(forward + loss, graph kept), ``pass:nograd`` (forward without grad).

Usage::

    python benchmarks/regularizer_overhead.py                                   # resnet18, fp32, defaults
    python benchmarks/regularizer_overhead.py --precision bf16 --channels-last
    python benchmarks/regularizer_overhead.py --cases none mrcl mrcl:rec_fraction=0.25 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
import yaml

from metassl.bench.cases import DEFAULT_OPTIMIZER, Variant, make_views, preset, scaled_lr, seeded_backbone
from metassl.bench.metadata import run_metadata

HERE = Path(__file__).resolve().parent
DEFAULT_CASES = ["none", "metamask", "metaug", "iclmsr", "mrcl", "mrcl:rec_fraction=0.25", "mrcl:contrastive_input=masked",
                 "pass:fwd", "pass:nograd"]


def parse_case(spec: str) -> tuple[str, dict]:
    """``"mrcl:rec_fraction=0.25,decoder=linear"`` → ``("mrcl", {"rec_fraction": 0.25, "decoder": "linear"})``."""
    name, _, opts = spec.partition(":")
    if name == "pass":
        return name, {"kind": opts}
    options = {}
    for item in filter(None, opts.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"case {spec!r}: options are key=value, comma separated")
        options[key] = yaml.safe_load(value)
    return name, options


def build_case(args: argparse.Namespace, spec: str):
    """``step() -> None`` of one case (a training step, or a reference pass of the base model)."""
    from metassl.engine.optim import build_optimizer
    from metassl.engine.step import training_step
    from metassl.methods import build_method
    from metassl.regularizers import build_regularizer

    name, options = parse_case(spec)
    variant = Variant(args.precision, args.channels_last)
    backbone, feat_dim = seeded_backbone(args)
    method = build_method(args.method, backbone, feat_dim, **preset("method", args.method))
    reg = build_regularizer("none" if name == "pass" else name, method,
                            **({} if name == "pass" else {**preset("regularizer", name), **options}))
    method.to(args.device).train()
    reg.to(args.device).train()
    if args.channels_last:
        method.to(memory_format=torch.channels_last)
    named = list(method.named_trainable_parameters()) + [(f"regularizer.{n}", p) for n, p in reg.named_encoder_parameters()]
    opt = build_optimizer(DEFAULT_OPTIMIZER, named, scaled_lr(args))
    meta_opt = reg.configure_meta_optimizer(1000)[0] if reg.bilevel else None
    views, labels = make_views(args, variant)
    extras = {"clean": views[0].clone()} if "clean" in reg.data_requirements else None
    autocast = (lambda: torch.autocast(device_type=args.device, dtype=torch.bfloat16)) if args.precision == "bf16" else contextlib.nullcontext

    def step() -> None:
        with autocast():
            if name == "pass":
                with torch.no_grad() if options["kind"] == "nograd" else contextlib.nullcontext():
                    loss = method.loss(method(views))
            else:
                loss = training_step(method, reg, views, labels, opt, meta_opt, extras=extras)["loss"]
        if not torch.isfinite(loss):
            raise RuntimeError(f"{spec}: non-finite loss")

    return step


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="*", default=DEFAULT_CASES)
    ap.add_argument("--method", default="simclr")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--batch", type=int, default=64, help="images per view (2 views)")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="JSON (default benchmarks/regularizer_overhead_<precision>.json); a .md beside it")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = list(dict.fromkeys(["none", *args.cases]))
    steps = {c: build_case(args, c) for c in cases}
    wall: dict[str, list[float]] = {c: [] for c in cases}
    cpu: dict[str, list[float]] = {c: [] for c in cases}
    load_before = list(__import__("os").getloadavg())
    for r in range(args.warmup + args.reps):
        order = cases[r % len(cases):] + cases[: r % len(cases)]
        for c in order:
            if args.device == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            steps[c]()
            if args.device == "cuda":
                torch.cuda.synchronize()
            if r >= args.warmup:
                wall[c].append(time.perf_counter() - t0)
                cpu[c].append(time.process_time() - c0)
        print(f"round {r + 1}/{args.warmup + args.reps}: " + ", ".join(f"{c} {wall[c][-1]:.2f}s" for c in cases if wall[c]), flush=True)
    base_w, base_c = statistics.median(wall["none"]), statistics.median(cpu["none"])
    rows = [{"case": c, "wall_s": statistics.median(wall[c]), "cpu_s": statistics.median(cpu[c]),
             "ratio_wall": statistics.median(wall[c]) / base_w, "ratio_cpu": statistics.median(cpu[c]) / base_c,
             "wall_all_s": wall[c], "cpu_all_s": cpu[c]} for c in cases]
    lines = [f"{args.method}, {args.backbone} (CIFAR stem), batch {args.batch} x 2 views, {args.precision}"
             f"{' + channels_last' if args.channels_last else ''}, {torch.get_num_threads()} thread(s), median of {args.reps} interleaved rounds", "",
             "| case | wall s | × base (wall) | CPU s | × base (CPU) |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['case']} | {r['wall_s']:.2f} | {r['ratio_wall']:.2f} | {r['cpu_s']:.2f} | {r['ratio_cpu']:.2f} |" for r in rows]
    table = "\n".join(lines)
    out = Path(args.out) if args.out else HERE / f"regularizer_overhead_{args.precision}.json"
    doc = {**run_metadata(), "settings": {k: v for k, v in vars(args).items() if k != "out"}, "torch": torch.__version__,
           "torch_threads": torch.get_num_threads(), "loadavg_before_after": [load_before, list(__import__("os").getloadavg())],
           "rows": rows, "table": table}
    out.write_text(json.dumps(doc, indent=1))
    machine = doc["machine"].get("cpu", doc["machine"]) if isinstance(doc["machine"], dict) else doc["machine"]
    out.with_suffix(".md").write_text(f"{table}\n\nCommand: `{doc['command']}` — commit {doc['commit']}, {doc['date']}, {machine}\n")
    print(table)
    print(f"\nwrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
