"""The self-contained HTML report of ``metassl analyze``: one file, every picture a base64 PNG
data URI, inline CSS, no script and no external resource; runs side by side (``--compare``).

What each number and picture tells is explained in docs/analysis.md; the report repeats a
one-line reading guide under every section.
"""

from __future__ import annotations

import base64
import datetime
import html
from pathlib import Path
from typing import Any, Sequence

__all__ = ["render_report", "write_report"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1500px}
h1{font-size:22px}h2{font-size:17px;border-bottom:1px solid #ccc;padding-bottom:3px;margin-top:28px}
h3{font-size:14px;margin:10px 0 4px}p.guide{color:#555;font-size:13px;margin:4px 0 10px}
table{border-collapse:collapse;font-size:12px;margin:6px 0}td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}.row{display:flex;flex-wrap:wrap;gap:18px}
.col{flex:1 1 0;min-width:420px}img{max-width:100%;height:auto;border:1px solid #eee}
.flag{color:#b35900;font-weight:600}.muted{color:#888}
"""

_SUMMARY_ROWS = [
    ("dimensions", "dim", "{:d}"), ("kNN top-1", "knn", "{:.4f}"), ("dead dimensions", "dead_fraction", "{:.1%}"),
    ("off-diagonal energy (mean ρ²)", "off_diagonal_energy", "{:.4f}"), ("effective rank (participation ratio)",
    "effective_rank", "{:.1f}"), ("RankMe", "rankme", "{:.1f}"), ("directions for 99% of the variance", "rank_99", "{:d}"),
    ("alignment (lower: views closer)", "alignment", "{:.4f}"), ("uniformity (lower: more uniform)", "uniformity", "{:.4f}"),
]


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return '<span class="muted">–</span>'
    try:
        return _e(spec.format(value))
    except (ValueError, TypeError):
        return _e(value)


def _img(png: bytes | None, alt: str) -> str:
    if not png:
        return ""
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _name(run: dict) -> str:
    info = run["run"]
    if info.get("method"):
        return f"{info['method']} + {info.get('regularizer') or 'none'} ({info['backbone']})"
    return f"exported {info['backbone']}"


def _columns(cells: Sequence[str]) -> str:
    return '<div class="row">' + "".join(f'<div class="col">{c}</div>' for c in cells) + "</div>"


def _runs_table(runs: list[dict]) -> str:
    keys = ["checkpoint", "kind", "method", "regularizer", "backbone", "dataset", "eval_features"]
    head = "".join(f"<th class='l'>{_e(chr(65 + i))}: {_e(_name(r))}</th>" for i, r in enumerate(runs))
    body = "".join(f"<tr><th class='l'>{_e(k)}</th>" + "".join(f"<td class='l'>{_e(r['run'].get(k))}</td>" for r in runs)
                   + "</tr>" for k in keys)
    extra = "<tr><th class='l'>kNN</th>" + "".join(
        f"<td class='l'>k={r['knn']['k']}, t={r['knn']['t']:g}, bank: {_e(r['knn']['bank'])}; evaluated space: "
        f"{_e(r['evaluated_space'])}</td>" for r in runs) + "</tr>"
    times = "<tr><th class='l'>time (s)</th>" + "".join(
        "<td class='l'>" + ", ".join(f"{_e(k)} {v:.1f}" for k, v in r["timings_s"].items()) + "</td>" for r in runs) + "</tr>"
    return f"<table><tr><th></th>{head}</tr>{body}{extra}{times}</table>"


def _summary_table(runs: list[dict]) -> str:
    cols = [(i, s) for i, r in enumerate(runs) for s in r["spaces"]]
    head = "".join(f"<th>{_e(chr(65 + i))}: {_e(s)}</th>" for i, s in cols)
    rows = ""
    for label, key, spec in _SUMMARY_ROWS:
        rows += f"<tr><th class='l'>{_e(label)}</th>" + "".join(
            f"<td>{_fmt(runs[i]['spaces'][s].get(key), spec)}</td>" for i, s in cols) + "</tr>"
    rows += "<tr><th class='l'>dims with a near-copy (|ρ| ≥ 0.9)</th>" + "".join(
        f"<td>{runs[i]['spaces'][s]['redundant']['fraction_with_partner']:.1%}</td>" for i, s in cols) + "</tr>"
    return f"<table><tr><th></th>{head}</tr>{rows}</table>"


def _removal_table(block: dict, limit: int = 10) -> str:
    rows = block["rows"]
    flagged = [r for r in rows if r["flagged"]]
    head = ("<tr><th class='l'>dims removed</th><th>accuracy</th><th>change (pts)</th><th>fixed</th><th>broken</th>"
            "<th>McNemar p</th><th class='l'>verdict</th></tr>")
    body = ""
    for r in rows[:limit]:
        dims = r["dims"]
        name = str(dims[0]) if len(dims) == 1 else f"{dims[0]}–{dims[-1]}"
        verdict = ("<span class='flag'>confounder (significant)</span>" if r["significant"] else
                   "<span class='flag'>raises accuracy</span>" if r["flagged"] else "needed")
        body += (f"<tr><td class='l'>{_e(name)}</td><td>{r['accuracy']:.4f}</td><td>{100 * r['gain']:+.2f}</td>"
                 f"<td>{r['fixed']}</td><td>{r['broken']}</td><td>{r['p_value']:.3g}</td><td class='l'>{verdict}</td></tr>")
    return (f"<p>all dims: {block['base_accuracy']:.4f}; removals that raise accuracy: {len(flagged)} of {len(rows)}"
            f" (most helpful first, top {min(limit, len(rows))} shown)</p><table>{head}{body}</table>")


def _ablation_cell(run: dict, pics: dict, tag: str) -> str:
    out = ""
    for space, block in run["ablation"].items():
        out += f"<h3>{_e(space)} — groups of {block['group_size']} ({block['removals']} removals)</h3>"
        out += _img(pics.get(f"{tag}ablation_{space}"), f"ablation {space}")
        out += "<p><b>kNN</b> (exact: every removal re-scored against the whole bank)</p>"
        out += _removal_table(block["knn"])
        if "linear" in block:
            out += f"<p><b>linear probe</b> ({_e(block['linear']['probe'])}, λ = {block['linear']['lambda']:g})</p>"
            out += _removal_table(block["linear"])
        mc = block.get("mask_comparison")
        if mc:
            rho = mc["spearman_mask_vs_importance"]
            out += ("<p>learned mask vs importance: Spearman ρ = " + _fmt(rho, "{:+.3f}") + "; mean mask of groups whose "
                    "removal raises accuracy " + _fmt(mc["mean_mask_flagged"], "{:.3f}") + " vs others "
                    + _fmt(mc["mean_mask_others"], "{:.3f}") + "</p>")
            out += _img(pics.get(f"{tag}mask_{space}"), "mask vs importance")
    return out


def _background_cell(run: dict, pics: dict, tag: str) -> str:
    bg = run.get("background")
    if not bg:
        return "<p class='muted'>no foreground masks in this data (only data=builtin has them)</p>"
    out = (f"<table><tr><th class='l'>space</th><td class='l'>{_e(bg['space'])}</td></tr>"
           f"<tr><th class='l'>kNN, full test images</th><td>{bg['knn_full']:.4f}</td></tr>"
           f"<tr><th class='l'>kNN, foreground only</th><td>{bg['knn_foreground']:.4f}</td></tr>"
           f"<tr><th class='l'>gap (full − foreground)</th><td>{100 * bg['gap']:+.2f} pts</td></tr>"
           f"<tr><th class='l'>mean background sensitivity</th><td>{bg['sensitivity_mean']:.3f} std</td></tr>")
    if "background_knn" in bg:
        out += (f"<tr><th class='l'>kNN predicts the background family</th><td>{bg['background_knn']:.4f} "
                f"(chance {bg['background_chance']:.3f})</td></tr>")
    out += ("<tr><th class='l'>Spearman: sensitivity vs removal gain</th><td>"
            + _fmt(bg.get("spearman_sensitivity_vs_removal_gain"), "{:+.3f}") + "</td></tr></table>")
    return out + _img(pics.get(f"{tag}background"), "background dependence")


def render_report(record: dict, pictures: list[dict[str, bytes]]) -> str:
    """The HTML text for ``record`` (analysis.json content) and each run's pictures."""
    runs = record["runs"]
    tags = [f"{chr(97 + i)}_" for i in range(len(runs))]
    title = " vs ".join(_name(r) for r in runs)
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>metassl analyze: {_e(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>What the representation looks like: {_e(title)}</h1>",
             f"<p class='guide'>Written {datetime.datetime.now():%Y-%m-%d %H:%M} by <code>metassl analyze</code>; every number "
             "is in analysis.json beside this file, and docs/analysis.md explains each one. Letters A, B name the runs.</p>",
             "<h2>Runs</h2>", _runs_table(runs),
             "<h2>Summary per feature space</h2><p class='guide'>Test split. Effective rank and RankMe near the dimension: "
             "the space is used evenly; far below: dimensional collapse. Off-diagonal energy near 0: decorrelated "
             "dimensions; large: redundant ones.</p>", _summary_table(runs),
             "<h2>Redundancy</h2><p class='guide'>Bright off-diagonal blocks are groups of dimensions that repeat each "
             "other; a spectrum that drops steeply spends its variance on few directions.</p>",
             _columns([_img(p.get(f"{t}spectrum"), "spectrum") + "".join(
                 _img(p.get(f"{t}corr_{s}"), f"correlation {s}") for s in r["spaces"]) for r, p, t in zip(runs, pictures, tags)]),
             "<h2>Per-dimension statistics</h2><p class='guide'>Standard deviation of each dimension, sorted; dead "
             "dimensions (red) no longer vary. The orange line is the learned mask where the run has one.</p>",
             _columns(["".join(_img(p.get(f"{t}dims_{s}"), f"dims {s}") for s in r["spaces"])
                       for r, p, t in zip(runs, pictures, tags)]),
             "<h2>Confounder dimensions</h2><p class='guide'>Each bar: accuracy change when those dimensions are "
             "removed. Above zero (orange): the evaluation is better without them, MetaMask's dimensional confounders; "
             "hatched: significant by McNemar's test with a Bonferroni correction.</p>",
             _columns([_ablation_cell(r, p, t) for r, p, t in zip(runs, pictures, tags)]),
             "<h2>Background dependence</h2><p class='guide'>The same kNN on full test images and on the objects alone "
             "(background filled with a neutral colour). A large gap means the representation leans on backgrounds, "
             "the confounder ICL-MSR targets.</p>",
             _columns([_background_cell(r, p, t) for r, p, t in zip(runs, pictures, tags)]),
             "<h2>Embedding</h2><p class='guide'>Test points in two dimensions, coloured by class; distances between "
             "far-apart clusters in t-SNE or UMAP carry little meaning.</p>",
             _columns(["".join(_img(p.get(f"{t}embedding_{m}"), f"embedding {m}") for m in r["embedding"]["methods"])
                       + (f"<p class='muted'>{_e(r['embedding']['note'])}</p>" if r["embedding"]["note"] else "")
                       for r, p, t in zip(runs, pictures, tags)]),
             "</body></html>"]
    return "\n".join(parts)


def write_report(path: Path, record: dict, pictures: list[dict[str, bytes]]) -> Path:
    """Write :func:`render_report` to ``path`` and return it."""
    path = Path(path)
    path.write_text(render_report(record, pictures), encoding="utf-8")
    return path
