"""The PNGs of ``metassl bench accuracy``, drawn from its ``results.json`` document (matplotlib, Agg).

* ``knn_curves.png``: validation kNN per epoch, one panel per method, one colour per regularizer,
  one thin line per seed (the mean over seeds bold where there are two or more).
* ``paired_differences.png``: per method x regularizer, the per-seed differences to the base
  (points) and their mean with the 95 % t-interval (error bar), around a zero line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["curves_by_group", "plot_knn_curves", "plot_paired_differences", "write_plots"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves_by_group(doc: dict) -> dict[str, dict[str, list[tuple[list[int], list[float]]]]]:
    """method -> regularizer -> [(epochs, val kNN in %)] of each finished seed that has a curve."""
    grid = doc["grid"]
    out: dict[str, dict[str, list]] = {m: {r: [] for r in grid["regularizers"]} for m in grid["methods"]}
    for cell in doc["cells"].values():
        points = [(p["epoch"], 100 * p["val_knn_top1"]) for p in cell.get("curve") or [] if "val_knn_top1" in p]
        method, reg = cell.get("method"), cell.get("regularizer")
        if points and method in out and reg in out[method]:
            out[method][reg].append(([e for e, _ in points], [v for _, v in points]))
    return out


def plot_knn_curves(doc: dict, path: Path) -> Path:
    plt = _pyplot()
    groups = curves_by_group(doc)
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.6), squeeze=False)
    from matplotlib.ticker import MaxNLocator

    for ax, (method, regs) in zip(axes[0], groups.items()):
        for colour, (reg, runs) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], regs.items()):
            for i, (epochs, values) in enumerate(runs):
                ax.plot(epochs, values, color=colour, lw=0.8, alpha=0.6, marker="." if len(epochs) < 3 else None,
                        label=f"{reg} ({len(runs)} seeds)" if i == 0 else None)
            common = min((len(e) for e, _ in runs), default=0)
            if len(runs) > 1 and common:
                mean = [sum(v[j] for _, v in runs) / len(runs) for j in range(common)]
                ax.plot(runs[0][0][:common], mean, color=colour, lw=2.2)
        ax.set(title=method, xlabel="epoch", ylabel="val kNN top-1 (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"{doc['protocol']['name']}: validation kNN per epoch (thin: seeds, bold: mean)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def paired_points(doc: dict, metric: str = "knn_top1") -> list[tuple[str, list[float], dict[str, Any]]]:
    """(label, per-seed differences, summary) per method x regularizer, for one paired metric."""
    rows = []
    for name, paired in doc["stats"]["paired"].items():
        p = paired[metric]
        rows.append((name.replace("/", " + "), list(p["per_seed"].values()), p))
    return rows


def plot_paired_differences(doc: dict, path: Path) -> Path:
    plt = _pyplot()
    metrics = [("knn_top1", "kNN last"), ("knn_top1_best_val", "kNN @best-val"), ("linear/linear_top1_best_val", "linear")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.6), squeeze=False)
    for ax, (metric, title) in zip(axes[0], metrics):
        rows = paired_points(doc, metric) if doc["stats"]["paired"] else []
        for x, (label, diffs, p) in enumerate(rows):
            ax.scatter([x - 0.12] * len(diffs), diffs, s=16, color="tab:gray", zorder=3)
            if p["mean"] is not None:
                err = [[p["mean"] - p["ci95"][0]], [p["ci95"][1] - p["mean"]]] if p["ci95"] else None
                ax.errorbar([x + 0.12], [p["mean"]], yerr=err, fmt="o", color="tab:red", capsize=4, zorder=4)
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_xticks(range(len(rows)), [r[0] for r in rows], rotation=20, fontsize=8)
        ax.set(title=f"Δ {title} vs base (points)", xlim=(-0.6, max(len(rows), 1) - 0.4))
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{doc['protocol']['name']}: paired differences (gray: seeds, red: mean ± 95 % t-interval)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(out: Path, doc: dict) -> list[Path]:
    """Both PNGs into ``out``; returns their paths."""
    return [plot_knn_curves(doc, out / "knn_curves.png"), plot_paired_differences(doc, out / "paired_differences.png")]
