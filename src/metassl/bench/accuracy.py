"""``metassl bench accuracy``: paired multi-seed "base vs base + regularizer" accuracy.

Every cell ``method=M regularizer=R seed=S`` is one ``metassl train`` in its own process, in its
own run folder with ``resume=auto`` (an interrupted run continues from its last checkpoint).  A
finished cell (``summary.json`` there, and the command recorded beside it equal to this cell's) is
read back, not rerun; so is a cell whose raw record ``<out>/runs/<cell>.json`` (committed by an
earlier sitting on another checkout or machine) was made by the same overrides, so a table grows
across sittings even where the run folders are gone.  Runs are ordered seed by seed (base, then each
regularizer; ``--jobs N`` trains N at once, each with its share of the cores), and
``<out>/results.json``, ``<out>/runs/<cell>.json`` and ``<out>/table.md`` are rewritten after every
run; ``knn_curves.png`` and ``paired_differences.png`` at the end of a sitting.

Usage::

    metassl bench accuracy --protocol cpu_cifar --data-root PATH --methods simclr --regularizers none,metamask --seeds 0,1,2
    metassl bench accuracy --protocol gpu_cifar10 --data-root PATH --epochs 200 --max-runs 2
    metassl bench accuracy --protocol cpu_cifar --data-root PATH --methods simclr,barlow_twins --jobs 2
    metassl bench accuracy --protocol smoke --regularizers none,mrcl --seeds 0,1 --no-run
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from metassl.bench.accuracy_cells import (
    MACHINE_ONLY_KEYS,
    cell_numbers,
    cell_overrides,
    command_identity,
    is_finished,
    read_cell,
    read_committed,
    run_cell,
    run_order,
    set_aside_stale,
    threads_per_job,
    train_command,
)
from metassl.bench.accuracy_protocols import PROTOCOLS, Cell, Protocol
from metassl.bench.accuracy_table import (
    compute_stats,
    mean_std,
    paired_differences,
    paired_summary,
    render_table,
    t_quantile_975,
)
from metassl.bench.metadata import redact

__all__ = ["PROTOCOLS", "Cell", "Protocol", "cell_numbers", "command_identity", "main", "mean_std", "paired_differences",
           "paired_summary", "run_order", "set_aside_stale", "t_quantile_975"]


class BenchError(Exception):
    """Bad input: reported as one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's hook: one line, no usage text + exit
        raise BenchError(f"{message}; see `metassl bench accuracy --help`")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="metassl bench accuracy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--protocol", default="cpu_cifar", help=f"one of {', '.join(PROTOCOLS)}")
    ap.add_argument("--data-root", help="dataset folder (all protocols but smoke)")
    ap.add_argument("--data", help="dataset preset (cpu_cifar: cifar10 or imagefolder; default: the protocol's first)")
    ap.add_argument("--methods", default="simclr")
    ap.add_argument("--regularizers", default="none,metamask")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, help="training epochs (default: the protocol's)")
    ap.add_argument("--train-subset", type=int, help="train on the first N images (data.subset=N)")
    ap.add_argument("--out", help="results folder (default benchmarks/accuracy/<protocol>)")
    ap.add_argument("--runs", help="run folders (default runs/bench-accuracy/<protocol>)")
    ap.add_argument("--extra", action="append", nargs="+", default=[], help="further key=value overrides for every run")
    ap.add_argument("--max-runs", type=int, help="stop after N newly trained runs")
    ap.add_argument("--jobs", type=int, default=1,
                    help="cells trained at once, each with cores/N CPU threads (or OMP_NUM_THREADS if set); small "
                         "models on few cores often train more images/s in all as several 1-thread runs")
    ap.add_argument("--no-run", action="store_true", help="read back finished runs and rewrite the outputs only")
    ap.add_argument("--plots-only", action="store_true", help="redraw the PNGs from <out>/results.json")
    return ap


def _names(text: str, valid: list[str], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in valid]
    if bad or not names:
        raise BenchError(f"unknown {what} {', '.join(bad) or repr(text)}; valid: {', '.join(valid)}")
    return names


_ROOT_HINT = {"cifar10": "the folder that holds cifar-10-batches-py/", "cifar100": "the folder that holds cifar-100-python/",
              "stl10": "the folder that holds stl10_binary/", "imagefolder": "the folder with train/ and test/ class folders",
              "builtin": "no folder is needed"}


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Check the command line and derive the plan: protocol, grid, budget, base overrides, folders."""
    from metassl.config import available_presets

    if args.protocol not in PROTOCOLS:
        raise BenchError(f"unknown protocol {args.protocol!r}; valid: {', '.join(PROTOCOLS)}")
    protocol = PROTOCOLS[args.protocol]
    methods = _names(args.methods, available_presets("method"), "method")
    regularizers = _names(args.regularizers, available_presets("regularizer"), "regularizer")
    data = args.data or protocol.data_choices[0]
    if data not in protocol.data_choices:
        raise BenchError(f"--data {data} is not one of protocol {protocol.name}'s: {', '.join(protocol.data_choices)}")
    if protocol.needs_root and not args.data_root and not args.plots_only:
        raise BenchError(f"--protocol {protocol.name} needs --data-root PATH: {_ROOT_HINT[data]}")
    if args.data_root and not Path(args.data_root).expanduser().is_dir() and not args.plots_only:
        raise BenchError(f"--data-root {args.data_root} is not a folder; pass {_ROOT_HINT[data]}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise BenchError(f"--seeds {args.seeds!r} is not a comma-separated list of integers, e.g. 0,1,2") from None
    if not seeds:
        raise BenchError("--seeds is empty; pass a comma-separated list of integers, e.g. 0,1,2")
    extras = [item for group in args.extra for item in group]
    if bad := [e for e in extras if "=" not in e]:
        raise BenchError(f"--extra {' '.join(bad)}: each item must be key=value, e.g. optimizer.lr=0.5")
    for flag in ("epochs", "train_subset", "max_runs", "jobs"):
        if getattr(args, flag) is not None and getattr(args, flag) < (0 if flag == "max_runs" else 1):
            raise BenchError(f"--{flag.replace('_', '-')} must be a positive integer")
    if args.jobs < 1:
        raise BenchError("--jobs must be a positive integer")
    budget = {"epochs": args.epochs or protocol.epochs, "train_subset": args.train_subset or protocol.train_subset}
    base = protocol.train_overrides(data, str(Path(args.data_root).expanduser().resolve()) if args.data_root else None)
    base.append(f"trainer.max_epochs={budget['epochs']}")
    base += [f"data.subset={budget['train_subset']}"] if budget["train_subset"] else []
    planned = planned_config(base + extras)
    key = f"{protocol.name}-{data}-e{budget['epochs']}" + (f"-n{budget['train_subset']}" if budget["train_subset"] else "")
    # the extras name the results folder, less those that only say where this machine keeps things
    trained = [e for e in extras if not e.startswith(MACHINE_ONLY_KEYS)]
    key += f"-x{hashlib.sha1(json.dumps(trained).encode()).hexdigest()[:8]}" if trained else ""
    roots = {p: "<data-root>" for p in ([str(Path(args.data_root).expanduser().resolve()), str(args.data_root)] if args.data_root else [])}
    roots.update({e.split("=", 1)[1]: "<cache>" for e in extras if e.startswith("data.cache_dir=") and len(e) > 15})
    roots[sys.executable] = "python"  # the interpreter's folder is the machine's too
    for flag, name in ((args.out, "<out>"), (args.runs, "<runs>")):  # absolute folders given on the command line
        if flag and Path(flag).expanduser().is_absolute():
            roots[str(Path(flag).expanduser())] = name
    return {"protocol": protocol, "data": data, "budget": budget, "extras": extras, "key": key, "base": base + extras, "planned": planned,
            "machine_paths": dict(sorted(roots.items(), key=lambda kv: -len(kv[0]))),
            "methods": methods, "regularizers": regularizers, "seeds": seeds,
            "out": Path(args.out or f"benchmarks/accuracy/{protocol.name}"),
            "runs": Path(args.runs or f"runs/bench-accuracy/{protocol.name}") / key}


def planned_config(overrides: list[str]) -> dict[str, Any]:
    """Compose (and so validate) the base overrides once: a bad --extra is an error before any run."""
    from metassl.config import load_config
    from metassl.errors import MetasslError

    try:
        cfg = load_config(overrides)
    except MetasslError as err:
        raise BenchError(f"{err} (in the overrides of every run: check --extra)") from None
    precision = cfg.trainer.precision
    return {"dataset": cfg.data.name, "backbone": cfg.backbone.name, "batch_size": int(cfg.batch_size),
            "precision": f"{precision} (resolved per run)" if precision == "auto" else precision}


def precision_here(overrides: list[str]) -> str | None:
    """The precision a run of these overrides resolves to on this machine (``auto`` included); None
    where such a run cannot train here (a GPU protocol on a machine without one: its table can
    still be rewritten from the committed records, whatever precision they trained at)."""
    import torch

    from metassl.config import load_config
    from metassl.engine.precision import resolve_precision

    trainer = load_config(overrides).trainer
    if str(trainer.accelerator) in ("gpu", "cuda") and not torch.cuda.is_available():
        return None
    return resolve_precision(trainer.precision, str(trainer.accelerator), str(trainer.strategy))


def _check_out(out: Path, key: str) -> None:
    results = out / "results.json"
    if results.is_file():
        old = json.loads(results.read_text()).get("protocol_key")
        if old not in (None, key):
            raise BenchError(f"{out} holds the results of {old}, not {key}; pass another --out (nothing was changed)")


def build_doc(plan: dict, cells: dict, meta: dict) -> dict:
    """results.json: metadata, protocol, budget, grid, every cell, the statistics and the table."""
    protocol, grid = plan["protocol"], (plan["methods"], plan["regularizers"], plan["seeds"])
    order = run_order(*grid)
    done = sum(cells.get(c.key, {}).get("status") == "done" for c in order)
    doc = {**meta, "protocol_key": plan["key"],
           "protocol": {"name": protocol.name, "description": protocol.description, "data": plan["data"],
                        "overrides": plan["base"], "published_anchors": list(protocol.anchors)},
           "budget": plan["budget"], "extra_overrides": plan["extras"], "planned": plan["planned"],
           "grid": {"methods": grid[0], "regularizers": grid[1], "seeds": grid[2]}, "runs_done": done,
           "runs_total": len(order), "partial": done < len(order),
           "cells": {c.key: cells[c.key] for c in order if c.key in cells}}
    doc["stats"] = compute_stats(doc["cells"], protocol, *grid)
    doc["table"] = render_table(doc, protocol, *grid)
    return redact(doc, plan.get("machine_paths", {}))


def write_outputs(out: Path, doc: dict) -> None:
    """results.json, table.md and the raw per-run JSON, each written whole (temp file + rename)."""
    from metassl.data.utils import atomic_write_text

    (out / "runs").mkdir(parents=True, exist_ok=True)
    for key, cell in doc["cells"].items():
        if cell.get("status") == "done":
            raw = {"command": cell["command"], "summary": cell["summary"], "curve": cell["curve"], "wall_s": cell["wall_s"],
                   "machine": cell.get("machine"), "trained_at_commit": cell.get("trained_at_commit")}
            atomic_write_text(out / "runs" / f"{key}.json", json.dumps(raw, indent=1) + "\n")
    slim = {**doc, "cells": {k: {f: v for f, v in c.items() if f != "summary"} for k, c in doc["cells"].items()}}
    atomic_write_text(out / "results.json", json.dumps(slim, indent=1) + "\n")
    atomic_write_text(out / "table.md", doc["table"])


def sitting(plan: dict, args: argparse.Namespace) -> dict:
    """Read back every finished cell, then train the others in pairing order (``--jobs`` at once),
    rewriting the outputs after each run."""
    from metassl.bench.metadata import run_metadata

    meta = run_metadata(device=plan["protocol"].device)
    cells: dict[str, dict] = {}
    order = run_order(plan["methods"], plan["regularizers"], plan["seeds"])
    to_train = []
    precision = precision_here(plan["base"])
    for i, cell in enumerate(order, 1):
        folder = plan["runs"] / cell.key
        overrides = cell_overrides(plan["base"], cell, folder)
        ident = {"method": cell.method, "regularizer": cell.regularizer, "seed": cell.seed,
                 "command": shlex.join(train_command(overrides)), "run_folder": str(folder), "budget": plan["budget"]}
        if is_finished(folder, overrides):
            cells[cell.key] = {**ident, **read_cell(folder, plan["protocol"])}
        elif committed := read_committed(plan["out"], cell.key, redact(ident["command"], plan.get("machine_paths", {})),
                                         plan["protocol"], precision):
            cells[cell.key] = {**ident, **committed}
        elif not args.no_run and (args.max_runs is None or len(to_train) < args.max_runs):
            to_train.append((i, cell, folder, overrides, ident))
    write_outputs(plan["out"], build_doc(plan, cells, meta))
    threads = threads_per_job(args.jobs)

    def train(i: int, cell: Cell, folder: Path, overrides: list[str]) -> dict:
        if stale := set_aside_stale(folder, overrides):
            print(f"  {folder} was made by another command: kept as {stale}", file=sys.stderr)
        print(f"[{i}/{len(order)}] training {cell.key} ...", file=sys.stderr, flush=True)
        return run_cell(overrides, folder, threads)

    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        running = {pool.submit(train, i, cell, folder, overrides): (cell, folder, ident)
                   for i, cell, folder, overrides, ident in to_train}
        for future in concurrent.futures.as_completed(running):  # outputs are written by this thread only
            cell, folder, ident = running[future]
            outcome = future.result()
            if outcome["status"] == "failed":
                cells[cell.key] = {**ident, **outcome}
                print(f"  {cell.key} failed: {outcome['error']}", file=sys.stderr)
            else:
                cells[cell.key] = {**ident, **read_cell(folder, plan["protocol"])}
            write_outputs(plan["out"], build_doc(plan, cells, meta))
    doc = build_doc(plan, cells, meta)
    write_outputs(plan["out"], doc)
    return doc


def main(argv: list[str] | None = None) -> int:
    """Run ``metassl bench accuracy``; 0 when every cell done so far trained, 1 if one failed, 2 on bad input."""
    try:
        args = build_parser().parse_args(argv)
        plan = resolve(args)
        if args.plots_only:
            if not (plan["out"] / "results.json").is_file():
                raise BenchError(f"--plots-only: no {plan['out'] / 'results.json'} yet; run without --plots-only first")
            doc = json.loads((plan["out"] / "results.json").read_text())
        else:
            _check_out(plan["out"], plan["key"])
            plan["out"].mkdir(parents=True, exist_ok=True)
            doc = sitting(plan, args)
            print(doc["table"])
            print(f"wrote {plan['out'] / 'results.json'}, {plan['out'] / 'table.md'} and {plan['out'] / 'runs'}/",
                  file=sys.stderr)
    except BenchError as err:
        print(f"metassl bench accuracy: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    from metassl.bench.accuracy_plots import write_plots

    for path in write_plots(plan["out"], doc):
        print(f"wrote {path}", file=sys.stderr)
    return 1 if any(c.get("status") == "failed" for c in doc["cells"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
