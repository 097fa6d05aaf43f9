"""Throughput of the data pipeline: views/s of ``metassl.data.build_data`` + ``DataLoader`` (the
training loader's settings) for each augmentation family used, with each ``num_workers``."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from metassl.bench.cases import NUM_VIEWS, error_text
from metassl.bench.probes import Contention
from metassl.bench.timing import log

__all__ = ["measure_data_pipeline"]


def _data_config(args: argparse.Namespace, n_images: int) -> tuple[dict[str, Any], str]:
    if args.data == "builtin":
        return ({"name": "builtin", "num_train": n_images, "num_test": 10, "image_size": args.image_size},
                "builtin (generated shapes, in memory)")
    return ({"name": "imagefolder", "root": args.data, "subset": n_images, "test_subset": 10, "image_size": args.image_size},
            f"imagefolder {args.data} (decoded once into memory)")


def measure_data_pipeline(args: argparse.Namespace, families: list[str]) -> list[dict[str, Any]]:
    """views/s of build_data + DataLoader (shuffle, drop_last, the training loader's settings),
    for each augmentation family and ``num_workers``; ``--repeats`` interleaved rounds of
    ``--data-batches`` batches each (median and best round reported)."""
    from torch.utils.data import DataLoader

    from metassl.data import build_data

    workers = [int(w) for w in args.data_workers.split(",") if w.strip()]
    cfg, label = _data_config(args, args.batch * (args.repeats * args.data_batches + 2))
    out: list[dict[str, Any]] = []
    runs: list[tuple[dict[str, Any], Any, list[float], list[float]]] = []
    for family in families:
        try:
            bundle = build_data(cfg, augmentation=family, num_views=NUM_VIEWS)
        except Exception as err:  # noqa: BLE001
            out.append({"dataset": label, "augmentation": family, "error": error_text(err)})
            continue
        for w in workers:
            loader = DataLoader(bundle.train_ssl, batch_size=args.batch, shuffle=True, drop_last=True, num_workers=w,
                                persistent_workers=w > 0)
            it = iter(loader)
            next(it)  # worker start-up and first batch not timed
            row = {"dataset": label, "augmentation": family, "num_workers": w, "batch": args.batch, "batches": args.data_batches}
            runs.append((row, it, [], []))
    for _ in range(args.repeats):
        for row, it, rates, others in runs:
            count = 0
            with Contention() as busy:
                start = time.perf_counter()
                for _ in range(args.data_batches):
                    views = next(it)[0]
                    count += sum(v.shape[0] for v in views)
                rates.append(count / (time.perf_counter() - start))
            if busy.others_cores is not None:
                # the loader's worker process is "another process" here: report what is left
                others.append(max(0.0, busy.others_cores - (1.0 if row["num_workers"] else 0.0)))
    for row, it, rates, others in runs:
        row.update(views_per_s=round(statistics.median(rates), 1), views_per_s_best=round(max(rates), 1),
                   others_cpu_cores=round(statistics.mean(others), 2) if others else None)
        out.append(row)
        log(f"  data {row['augmentation']} workers={row['num_workers']}: {row['views_per_s']:.0f} views/s "
            f"(best {row['views_per_s_best']:.0f})")
    del runs
    return out
