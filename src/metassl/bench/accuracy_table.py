"""Statistics and the markdown table of ``metassl bench accuracy``: mean ± std per row, the paired
difference to the base seed by seed with its 95 % t-interval, and the protocol line."""

from __future__ import annotations

import math
import statistics
from typing import Any

from metassl.bench.accuracy_protocols import Cell, Protocol, extra_name

# ---------------------------------------------------------------------------------------------- statistics
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423)  # Student t 0.975 quantiles, dof 1..30


def t_quantile_975(dof: int) -> float:
    """The 0.975 quantile of Student's t (two-sided 95 %): exact table to 30 dof, then scipy or a
    Cornish-Fisher expansion around the normal quantile (error < 1e-4 above 30 dof)."""
    if dof < 1:
        raise ValueError(f"dof must be >= 1, got {dof}")
    if dof <= len(_T975):
        return _T975[dof - 1]
    try:
        from scipy.stats import t as student_t

        return float(student_t.ppf(0.975, dof))
    except ImportError:
        z = 1.959964
        return z + (z ** 3 + z) / (4 * dof) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * dof ** 2)


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None where undefined: no values, or one for the std)."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def paired_differences(base: dict[int, float], other: dict[int, float]) -> dict[int, float]:
    """``other - base`` seed by seed, over the seeds present (and not None) in both."""
    return {s: other[s] - base[s] for s in sorted(base) if s in other and base[s] is not None and other[s] is not None}


def paired_summary(diffs: list[float]) -> dict[str, Any]:
    """n, mean, sample std and the 95 % t-interval of paired differences (no interval for n < 2)."""
    mean, std = mean_std(diffs)
    ci = None
    if std is not None:
        half = t_quantile_975(len(diffs) - 1) * std / math.sqrt(len(diffs))
        ci = [mean - half, mean + half]
    return {"n": len(diffs), "mean": mean, "std": std, "ci95": ci}


# ---------------------------------------------------------------------------------------------- table
def metric_columns(protocol: Protocol) -> list[tuple[str, str, float]]:
    """(label, path in a cell, scale) of the table's columns; accuracies in percentage points."""
    k, t = protocol.knn
    cols = [(f"kNN k={k} t={t} last", "knn_top1", 100.0), (f"kNN k={k} t={t} @best-val", "knn_top1_best_val", 100.0)]
    cols += [(f"kNN k={ke} t={te} last", f"knn_extra/{extra_name(ke, te)}", 100.0) for ke, te in protocol.knn_extra]
    return cols + [("linear top-1", "linear/linear_top1_best_val", 100.0), ("untrained kNN", "knn_top1_init", 100.0),
                   ("train s", "train_seconds", 1.0), ("images/s", "images_per_s", 1.0)]


PAIRED = ("knn_top1", "knn_top1_best_val", "linear/linear_top1_best_val")  # paths: "/" between levels


def cell_value(cell: dict, path: str) -> float | None:
    value: Any = cell
    for part in path.split("/"):
        value = value.get(part) if isinstance(value, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def values_by_seed(cells: dict, method: str, reg: str, seeds: list[int], path: str, scale: float = 1.0) -> dict[int, float]:
    out = {}
    for s in seeds:
        v = cell_value(cells.get(Cell(method, reg, s).key, {}), path)
        if v is not None:
            out[s] = v * scale
    return out


def compute_stats(cells: dict, protocol: Protocol, methods: list[str], regs: list[str], seeds: list[int]) -> dict:
    """Mean ± std per (method, regularizer) and column; paired differences to the base per regularizer."""
    stats: dict[str, Any] = {"groups": {}, "paired": {}}
    for m in methods:
        for r in regs:
            group = {"n": sum(cells.get(Cell(m, r, s).key, {}).get("status") == "done" for s in seeds)}
            for _, path, scale in metric_columns(protocol):
                mean, std = mean_std(list(values_by_seed(cells, m, r, seeds, path, scale).values()))
                group[path] = {"mean": mean, "std": std}
            stats["groups"][f"{m}/{r}"] = group
            if r != "none" and "none" in regs:
                stats["paired"][f"{m}/{r}"] = {path: paired_to_base(cells, m, r, seeds, path) for path in PAIRED}
    return stats


def paired_to_base(cells: dict, method: str, reg: str, seeds: list[int], path: str) -> dict[str, Any]:
    """``reg - none`` in points, seed by seed, and its summary (n, mean, std, 95 % interval)."""
    diffs = paired_differences(values_by_seed(cells, method, "none", seeds, path, 100.0),
                               values_by_seed(cells, method, reg, seeds, path, 100.0))
    return {**paired_summary(list(diffs.values())), "per_seed": diffs}


def _fmt(mean: float | None, std: float | None, digits: int = 2) -> str:
    if mean is None:
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def _fmt_paired(p: dict) -> str:
    if not p["n"]:
        return "—"
    ci = f" [{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}] (n={p['n']})" if p["ci95"] else f" (n={p['n']}, no interval)"
    return f"{p['mean']:+.2f}{ci}"


def _values_of(done: list[dict], key: str, planned: Any) -> str:
    """The values the finished runs report (the planned config value before any run finished)."""
    return ", ".join(sorted({str(c.get(key)) for c in done})) or str(planned)


def protocol_line(protocol: Protocol, budget: dict, cells: dict, seeds: list[int], planned: dict) -> str:
    """One line: dataset, backbone, epochs, batch, precision, k/t, probe, last-or-best, seeds (as run)."""
    done = [c for c in cells.values() if c.get("status") == "done"]
    dataset, backbone, batch, precision = (_values_of(done, name, planned.get(name)) for name in planned)
    k, t = protocol.knn
    extra = ", ".join(f"k={a} t={b}" for a, b in protocol.knn_extra)
    subset = budget["train_subset"] or "full train split"
    return (f"**Protocol** `{protocol.name}`: dataset {dataset} (training images: {subset}), backbone {backbone}, "
            f"{budget['epochs']} epochs, batch {batch}, precision {precision}, kNN k={k} t={t} "
            f"(+ {extra}) on the test split with the labelled train split as bank, linear probe on frozen features (test "
            "top-1 at the probe epoch best on val); kNN reported at the last epoch and at the epoch with the best "
            f"validation kNN; seeds {', '.join(map(str, seeds))}.")


def machine_name(machine: dict | None) -> str:
    if not machine:
        return "not recorded"
    flags = f" ({', '.join(machine.get('cpu_flags') or [])})" if machine.get("cpu_flags") else ""
    threads = machine.get("threads")
    per_run = f", {threads} thread{'s' * (threads != 1)} per run" if threads else ""
    return f"{machine.get('gpu') or machine.get('cpu')}{flags}, {machine.get('cores')} cores{per_run}"


def machines_lines(cells: dict) -> list[str]:
    """Where the finished runs trained: one line, or a list when a table grew on several machines
    (its train s and images/s then compare only between runs of one machine)."""
    count: dict[str, int] = {}
    for c in cells.values():
        if c.get("status") == "done":
            name = machine_name(c.get("machine"))
            count[name] = count.get(name, 0) + 1
    if len(count) <= 1:
        return ["", f"Trained on: {next(iter(count))}."] if count else []
    return ["", "Trained on several machines (train s and images/s compare only between runs of one machine):", "",
            *(f"- {name}: {n} run{'s' * (n > 1)}" for name, n in count.items())]


def render_table(doc: dict, protocol: Protocol, methods: list[str], regs: list[str], seeds: list[int]) -> str:
    """The markdown: title (partial or not), protocol line, per-group table, paired-difference table, anchors."""
    cells, stats, budget = doc["cells"], doc["stats"], doc["budget"]
    done, total = doc["runs_done"], doc["runs_total"]
    state = f" — **partial**: {done} of {total} runs done" if done < total else f" — {done} of {total} runs done"
    title = (f"# Accuracy: base vs base + regularizer, protocol `{protocol.name}`, {budget['epochs']} epochs, "
             f"train subset {budget['train_subset'] or 'full'}{state}")
    lines = [title, "",
             protocol_line(protocol, budget, cells, seeds, doc["planned"]), "", protocol.description, "",
             "Mean ± sample std over seeds (accuracies in %):", ""]
    cols = metric_columns(protocol)
    lines += ["| method | regularizer | n | " + " | ".join(c[0] for c in cols) + " |",
              "|---|---|---:|" + "---:|" * len(cols)]
    for m in methods:
        for r in regs:
            g = stats["groups"][f"{m}/{r}"]
            row = [_fmt(g[p]["mean"], g[p]["std"], 0 if scale == 1.0 else 2) for _, p, scale in cols]
            lines.append(f"| {m} | {r} | {g['n']} | " + " | ".join(row) + " |")
    if stats["paired"]:
        lines += ["", ("Paired difference to the base (regularizer − none, points), mean [95 % t-interval], over the "
                       "seeds done for both:"), "", "| method | regularizer | Δ kNN last | Δ kNN @best-val | Δ linear |",
                  "|---|---|---:|---:|---:|"]
        for name, p in stats["paired"].items():
            m, r = name.split("/")
            lines.append(f"| {m} | {r} | " + " | ".join(_fmt_paired(p[path]) for path in PAIRED) + " |")
    lines += machines_lines(cells)
    failed = [f"- `{key}`: {c['error']}" for key, c in cells.items() if c.get("status") == "failed"]
    if failed:
        lines += ["", "Failed runs (retried at the next sitting):", "", *failed]
    if protocol.anchors:
        lines += ["", "Published anchors (**published, not measured here**):", ""]
        lines += [f"- {a['method']} + {a['regularizer']} on {a['dataset']}: {a['metric']} = {a['value']} "
                  f"({a['selection']}; {a['source']})" for a in protocol.anchors]
    return "\n".join(lines) + "\n"
