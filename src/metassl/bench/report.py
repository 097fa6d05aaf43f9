"""The Markdown report of a speed run (the JSON is the result dict itself): provenance, the step
table (metassl beside lightly), the data pipeline, and the fast-path summary."""

from __future__ import annotations

import statistics
from typing import Any

__all__ = ["to_markdown"]


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "—" if x is None else format(x, spec)


def _header(result: dict[str, Any]) -> list[str]:
    m, s = result["machine"], result["settings"]
    return [
        f"### Speed: {s['backbone']}, batch {s['batch']} x {s['views']} views ({s['image_size']} px), {', '.join(s['variants'])}",
        "",
        f"{m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads{', ' + m['gpu'] if m.get('gpu') else ''}), "
        f"torch {m['torch']}, lightly {m.get('lightly') or 'n/a'}, device {s['device']}; "
        f"{s['warmup']} warm-up step(s) + {s['repeats']} interleaved rounds of up to {s['steps']} step(s) per configuration; "
        f"{result['date']}, commit {result['commit'] or 'unknown'}.",
        "",
        f"Command: `{result['command']}`",
        "",
    ]


def _step_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| method | regularizer | precision | step time (s) | best round (s) | views/s | overhead vs base | step memory (MB) "
             "| lightly views/s | metassl / lightly (time) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    lightly = {(r["method"], r["precision"], r["channels_last"], r["compile"]): r for r in rows if r["impl"] == "lightly"}
    for r in rows:
        if r["impl"] != "metassl":
            continue
        prec = r["precision"] + (" + cl" if r["channels_last"] else "") + (" + compile" if r["compile"] else "")
        if "error" in r:
            lines.append(f"| {r['method']} | {r['regularizer']} | {prec} | failed: {r['error'][:80]} | | | | | | |")
            continue
        lt = lightly.get((r["method"], r["precision"], r["channels_last"], r["compile"])) if r["regularizer"] == "none" else None
        lv = _fmt(lt.get("views_per_s"), ".1f") if lt and "views_per_s" in lt else ("failed" if lt else "")
        ratio = _fmt(r.get("time_ratio_vs_lightly"), ".2f") if r["regularizer"] == "none" and lt else ""
        over = _fmt(r.get("overhead_vs_base"), ".2f") + "×" if r["regularizer"] != "none" and r.get("overhead_vs_base") else ""
        if r.get("nonfinite_loss"):
            all_bad = len(r["nonfinite_loss"]["rounds"]) == len(r["round_times_s"])
            prec += " (loss non-finite: timing not representative)" if all_bad else " (loss became non-finite: finite rounds timed)"
        lines.append(
            f"| {r['method']} | {r['regularizer']} | {prec} | {r['step_time_s']:.3f} | {r['step_time_min_s']:.3f} | {r['views_per_s']:.1f} | {over} | "
            f"{_fmt(r.get('step_mem_mb'), '.0f')} | {lv} | {ratio} |"
        )
    out_of_box = [r for r in rows if r["impl"] == "metassl" and r.get("time_ratio_vs_lightly_eager") is not None]
    if out_of_box:
        lines += ["", "metassl with `trainer.compile=true` against lightly as written (eager), step time ratio: "
                  + ", ".join(f"{r['method']} {r['time_ratio_vs_lightly_eager']:.2f}" for r in out_of_box)
                  + " (the compiled lightly rows above are the like-for-like control)."]
    busy = [r["others_cpu_cores"] for r in rows if r.get("others_cpu_cores") is not None]
    if busy and max(busy) > 0.2:
        lines += ["", f"**Shared machine:** other processes used {statistics.mean(busy):.2f} CPU cores on average (up to "
                  f"{max(busy):.2f}) while these steps were timed, so times are inflated and noisy; `step_time_min_s` in the "
                  "JSON is the least disturbed round."]
    return lines


def _data_table(data: list[dict[str, Any]]) -> list[str]:
    lines = ["", "Data pipeline (`build_data` + `DataLoader`, 2 views per image):", "",
             "| dataset | augmentation | num_workers | views/s (median) | views/s (best round) |", "|---|---|---:|---:|---:|"]
    for d in data:
        if "error" in d:
            lines.append(f"| {d['dataset']} | {d['augmentation']} | | failed: {d['error'][:80]} |")
        else:
            lines.append(f"| {d['dataset']} | {d['augmentation']} | {d['num_workers']} | {d['views_per_s']:.0f} | {d['views_per_s_best']:.0f} |")
    return lines


def _fastpath_summary(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["", "Fast path: views/s relative to fp32 of the same implementation:", ""]
    for impl in ("metassl", "lightly"):
        base = next((r for r in rows if r["impl"] == impl and r["precision"] == "fp32" and "views_per_s" in r), None)
        if base:
            parts = [f"{r['precision'] + (' + channels_last' if r['channels_last'] else '')}: {r['views_per_s']:.1f} views/s "
                     f"({r['views_per_s'] / base['views_per_s']:.2f}×)" for r in rows if r["impl"] == impl and "views_per_s" in r]
            lines.append(f"- {impl} {base['method']}: " + "; ".join(parts))
    return lines


def to_markdown(result: dict[str, Any]) -> str:
    lines = _header(result) + _step_table(result["results"])
    if result.get("data_pipeline"):
        lines += _data_table(result["data_pipeline"])
    if result["settings"].get("fastpath"):
        lines += _fastpath_summary(result["results"])
    if result.get("notes"):
        lines += [""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"
