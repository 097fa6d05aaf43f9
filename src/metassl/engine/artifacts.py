"""Files of a run folder that Lightning does not write: training curves and the summary."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any


def read_metrics(csv_path: Path) -> list[dict[str, float]]:
    """Rows of Lightning's CSVLogger file, numbers parsed, empty cells dropped."""
    if not csv_path.is_file():
        return []
    rows = []
    with open(csv_path, newline="") as fh:
        for row in csv.DictReader(fh):
            parsed = {}
            for key, value in row.items():
                if value not in ("", None):
                    try:
                        parsed[key] = float(value)
                    except ValueError:
                        continue
            rows.append(parsed)
    return rows


def set_aside_metrics(out: Path, before_step: int | None = None) -> None:
    """Before a resumed run: keep the earlier ``metrics.csv`` (Lightning's CSV logger rewrites it).

    ``before_step``: the resumed checkpoint's global step; rows the killed run logged after it
    (``step >= before_step``) are dropped, since the resumed run trains those steps again."""
    current = out / "metrics.csv"
    if not current.is_file():
        return
    n = len(list(out.glob("metrics.part*.csv")))
    part = out / f"metrics.part{n}.csv"
    if before_step is None:
        current.rename(part)
        return
    with open(current, newline="") as fh:
        reader = csv.DictReader(fh)
        columns = list(reader.fieldnames or [])
        rows = [row for row in reader if _step_of(row) < before_step]
    tmp = out / "metrics.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(part)
    current.unlink()


def _step_of(row: dict[str, str]) -> float:
    try:
        return float(row.get("step") or 0)
    except ValueError:
        return 0.0


def merge_metrics(out: Path) -> None:
    """Join the parts set aside by :func:`set_aside_metrics` and the current file into ``metrics.csv``."""
    parts = sorted(out.glob("metrics.part*.csv"), key=lambda p: int(p.stem.split("part")[1]))
    if not parts:
        return
    files = parts + ([out / "metrics.csv"] if (out / "metrics.csv").is_file() else [])
    rows, columns = [], []
    for path in files:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            columns += [c for c in reader.fieldnames or [] if c not in columns]
            rows += list(reader)
    tmp = out / "metrics.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(out / "metrics.csv")
    for path in parts:
        path.unlink()


def series(rows: list[dict[str, float]], key: str, x_key: str = "step") -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in rows:
        if key in row and x_key in row and math.isfinite(row[key]):
            xs.append(row[x_key])
            ys.append(row[key])
    return xs, ys


def best_val_epoch(rows: list[dict[str, float]]) -> dict[str, float] | None:
    """The epoch row with the highest ``val/knn_top1`` (first one on ties), or None."""
    best = None
    for row in rows:
        if "val/knn_top1" in row and (best is None or row["val/knn_top1"] > best["val/knn_top1"]):
            best = row
    return best


def plot_curves(rows: list[dict[str, float]], out_png: Path, title: str, knn_init: float | None = None) -> None:
    """Training loss per step and kNN top-1 per epoch, side by side; ``knn_init`` (the untrained
    network's test kNN) as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_knn) = plt.subplots(1, 2, figsize=(10, 3.6))
    x, y = series(rows, "train/loss_step") if series(rows, "train/loss_step")[0] else series(rows, "train/loss")
    ax_loss.plot(x, y, lw=1)
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("training loss")
    ax_loss.grid(alpha=0.3)
    for key, label in (("test/knn_top1", "test kNN"), ("val/knn_top1", "val kNN (held out from train)")):
        x, y = series(rows, key, "epoch")
        if x:
            ax_knn.plot([e + 1 for e in x], y, marker="o", ms=3, label=label)
    if knn_init is not None:
        ax_knn.axhline(knn_init, ls="--", lw=1, color="grey", label="test kNN, untrained")
    ax_knn.set_xlabel("epoch")
    ax_knn.set_ylabel("kNN top-1")
    ax_knn.set_ylim(0, 1)
    ax_knn.grid(alpha=0.3)
    if ax_knn.lines:
        ax_knn.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    from metassl.data.utils import atomic_write_text

    atomic_write_text(path, json.dumps(summary, indent=2, sort_keys=True) + "\n")
