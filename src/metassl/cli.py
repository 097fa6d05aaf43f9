"""The ``metassl`` command: train, eval, export, config, presets.

Examples::

    metassl train                                   # SimCLR + small ConvNet on the built-in shapes
    metassl train method=byol data=cifar10 data.root=PATH backbone=resnet18 trainer.max_epochs=100 output_dir=runs/x
    metassl train regularizer=metamask protocol=smoke
    metassl eval knn --ckpt runs/x/checkpoints/last.ckpt eval.knn.k=20
    metassl eval linear --ckpt runs/x/checkpoints/last.ckpt
    metassl eval background --ckpt runs/x/checkpoints/last.ckpt eval.background.linear=false
    metassl eval segment --ckpt runs/x/checkpoints/last.ckpt eval.segment.head=conv
    metassl export --ckpt runs/x/checkpoints/last.ckpt --out backbone.pt
    metassl analyze --ckpt runs/x/checkpoints/last.ckpt --compare runs/y/checkpoints/last.ckpt
    metassl bench speed --quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from metassl.errors import MetasslError


def _train(args: argparse.Namespace) -> int:
    from metassl.config import load_config
    from metassl.engine.train import train

    cfg = load_config(args.overrides, extra_files=args.config or ())
    summary = train(cfg)
    if summary:
        k, t = cfg.eval.knn.k, cfg.eval.knn.t
        init = summary.get("knn_top1_init")
        untrained = f" (untrained {init:.4f})" if init is not None else ""
        print(
            f"kNN top-1 on the {cfg.data.name} test split (k={k}, t={t}, last epoch): {summary['knn_top1']:.4f}{untrained}"
            f"  | run folder: {Path(summary['output_dir']).resolve()}"
        )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from metassl.engine.checkpoint import evaluate_checkpoint

    results = evaluate_checkpoint(args.ckpt, args.protocol, args.overrides)
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _export(args: argparse.Namespace) -> int:
    from metassl.engine.checkpoint import export_backbone

    info = export_backbone(args.ckpt, args.out)
    print(f"wrote {args.out}: {info['num_tensors']} tensors of backbone {info['backbone']!r}; {info['load_hint']}")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from metassl.analysis.pipeline import AnalysisOptions, run_analysis

    opts = AnalysisOptions(group_size=args.group_size, linear=not args.no_linear, device=args.device,
                           precision=args.precision)
    report = run_analysis(args.ckpt, args.overrides, out=args.out, compare=args.compare, backbone=args.backbone, opts=opts)
    print(f"wrote {report} and {report.parent / 'analysis.json'}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.what == "speed":
        from metassl.bench.speed import main as speed_main

        return speed_main(args.bench_args)
    if args.what == "accuracy":
        from metassl.bench.accuracy import main as accuracy_main

        return accuracy_main(args.bench_args)
    raise AssertionError(args.what)


def _config(args: argparse.Namespace) -> int:
    from metassl.config import load_config, to_yaml

    print(to_yaml(load_config(args.overrides, extra_files=args.config or ())), end="")
    return 0


def _presets(args: argparse.Namespace) -> int:
    from metassl.config import GROUPS, available_presets

    for group in GROUPS:
        print(f"{group}: {', '.join(available_presets(group))}")
    return 0


class UsageError(Exception):
    """A command line argparse rejects (reported as one line, exit 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as :class:`UsageError` (one line) instead of usage text + exit."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        raise UsageError(f"{message}; see `{self.prog} --help`")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="metassl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a method (+ regularizer); overrides as group=preset or key=value")
    p.add_argument("overrides", nargs="*", help="e.g. method=byol data=cifar10 trainer.max_epochs=100")
    p.add_argument("--config", action="append", help="extra YAML file merged on top (repeatable)")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint offline (kNN, linear probe, background, dense segmentation)")
    p.add_argument("protocol", choices=["knn", "linear", "background", "segment"])
    p.add_argument("--ckpt", required=True, help="a metassl checkpoint (.ckpt)")
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("overrides", nargs="*", help="eval.* or data.* overrides, e.g. eval.knn.k=20 data.root=PATH")
    p.set_defaults(func=_eval)

    p = sub.add_parser("export", help="write the backbone as a plain state_dict for torchvision/timm")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_export)

    p = sub.add_parser("analyze", help="HTML report of a trained representation (redundancy, confounder dims, background)")
    p.add_argument("--ckpt", required=True, help="a metassl checkpoint, or a `metassl export` file with --backbone")
    p.add_argument("--out", help="output folder (default: <run folder>/analysis)")
    p.add_argument("--compare", help="a second checkpoint shown side by side (e.g. the base method without regularizer)")
    p.add_argument("--backbone", help="backbone name of an exported state_dict (e.g. resnet18)")
    p.add_argument("--group-size", type=int, default=None, help="dimensions removed together (default: 1 up to 128 dims, else 8)")
    p.add_argument("--no-linear", action="store_true", help="skip the ridge-probe ablation")
    p.add_argument("--device", default="cpu", help="where features are extracted (cpu, cuda)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="feature extraction: auto (bf16 where the device computes it natively, as training), fp32, or "
                        "bf16 autocast + channels-last")
    p.add_argument("overrides", nargs="*", help="eval.*, data.* or seed overrides, e.g. data.root=PATH eval.knn.k=20")
    p.set_defaults(func=_analyze)

    p = sub.add_parser("bench", help="benchmarks: `metassl bench speed --help`, `metassl bench accuracy --help`")
    p.add_argument("what", choices=["speed", "accuracy"])
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments of the benchmark")
    p.set_defaults(func=_bench)

    p = sub.add_parser("config", help="print the resolved configuration")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--config", action="append")
    p.set_defaults(func=_config)

    p = sub.add_parser("presets", help="list the presets of every group")
    p.set_defaults(func=_presets)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    if argv[:1] == ["bench"]:  # everything after `bench speed` belongs to the benchmark's own parser
        args = parser.parse_args(argv[:2])
        args.bench_args = argv[2:]
        return args
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if "=" not in item or item.startswith("-")]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    """Run one command; errors are one line on stderr, ``metassl: error: ...``: exit 2 for bad
    input (:class:`MetasslError`, a command line argparse rejects, an OS error such as a full
    disk), 1 for anything unexpected (a bug: ``METASSL_TRACEBACK=1`` shows the traceback)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parse(parser, argv)
        return args.func(args)
    except (MetasslError, UsageError) as err:
        print(f"metassl: error: {_one_line(err)}", file=sys.stderr)
        if os.environ.get("METASSL_TRACEBACK"):
            raise
        return 2
    except OSError as err:  # a full disk, a read-only or vanished folder, outside the checks made up front
        where = f" ({err.filename})" if err.filename else ""
        print(f"metassl: error: {err.strerror or _one_line(err)}{where}; what was already written in the run folder "
              "is kept: fix the disk or permissions, then resume=auto", file=sys.stderr)
        if os.environ.get("METASSL_TRACEBACK"):
            raise
        return 2
    except KeyboardInterrupt:
        print("metassl: interrupted; the run folder keeps what was written (resume=auto continues it)", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - a bug: still one line, and the way to see more
        if os.environ.get("METASSL_TRACEBACK"):
            raise
        print(f"metassl: error: unexpected {type(err).__name__}: {_one_line(err)[:300]} (a bug: rerun with "
              "METASSL_TRACEBACK=1 to see the traceback, and report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
