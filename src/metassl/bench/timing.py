"""The timing harness: every configuration warmed up (its step memory measured on the last warm-up
step), then ``--repeats`` interleaved rounds (the order rotated every round, so slow drifts of the
machine hit all configurations alike; a round disturbed by other processes is measured again), and
the per-configuration summary (median step time, views/s, overheads and ratios)."""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from typing import Any

from metassl.bench.cases import NUM_VIEWS, Case, error_text
from metassl.bench.probes import Contention, PeakMemory

__all__ = ["log", "time_cases", "case_result", "add_ratios"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _warm_up(case: Case, args: argparse.Namespace) -> None:
    for i in range(args.warmup):
        start = time.perf_counter()
        if i == args.warmup - 1:
            with PeakMemory(args.device) as mem:
                case.last_loss = case.step(i)
            case.mem_mb = mem.peak_mb
        else:
            case.last_loss = case.step(i)
        case.warmup_times.append(time.perf_counter() - start)
    case.nonfinite_warmup = not math.isfinite(case.last_loss)
    t = case.warmup_times[-1]
    case.steps_per_round = args.steps
    if args.round_time > 0:
        case.steps_per_round = max(1, min(args.steps, math.ceil(args.round_time / max(t, 1e-6))))
    log(f"  warmed up {case.key}: loss {case.last_loss:.4f}, last warm-up step {t:.2f} s, "
        f"step memory {case.mem_mb:.0f} MB, {case.steps_per_round} step(s) per round")


def _timed_round(case: Case, args: argparse.Namespace, rnd: int) -> None:
    k = case.steps_per_round
    for attempt in range(args.retries + 1):
        with Contention() as busy:
            start = time.perf_counter()
            for s in range(k):
                case.last_loss = case.step(args.warmup + rnd * k + s)
            elapsed = (time.perf_counter() - start) / k
        disturbed = busy.others_cores is not None and busy.others_cores > args.busy_threshold
        if disturbed and attempt < args.retries:  # another process took CPU: measure this round again
            case.disturbed_times.append(elapsed)
            continue
        if not math.isfinite(case.last_loss):
            case.nonfinite_rounds.append(len(case.round_times))
        case.round_times.append(elapsed)
        if busy.others_cores is not None:
            case.others_cores.append(busy.others_cores)
        return


def time_cases(cases: list[Case], args: argparse.Namespace) -> None:
    """Warm-up (memory measured on the last warm-up step), then interleaved timed rounds."""
    for case in cases:
        try:
            _warm_up(case, args)
        except Exception as err:  # noqa: BLE001 - reported in the table, the others go on
            case.error = error_text(err)
            log(f"  FAILED {case.key}: {case.error}")
    live = [c for c in cases if c.error is None]
    for rnd in range(args.repeats):
        order = live[rnd % len(live):] + live[: rnd % len(live)] if live else []
        for case in order:
            try:
                _timed_round(case, args, rnd)
            except Exception as err:  # noqa: BLE001
                case.error = error_text(err)
        log(f"  round {rnd + 1}/{args.repeats} done")


def case_result(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {
        "impl": case.impl,
        "method": case.method,
        "regularizer": case.regularizer,
        "precision": case.variant.precision,
        "channels_last": case.variant.channels_last,
        "compile": case.variant.compile,
        "params_mb": round(case.param_bytes / 2**20, 1),
    }
    if case.error or not case.round_times:
        res["error"] = case.error or "no timed round"
        return res
    valid = [x for i, x in enumerate(case.round_times) if i not in case.nonfinite_rounds]
    if case.nonfinite_rounds or case.nonfinite_warmup:
        # a diverged run may skip work (e.g. a meta step skipped on non-finite gradients)
        res["nonfinite_loss"] = {"in_warmup": case.nonfinite_warmup, "rounds": case.nonfinite_rounds}
    times = valid or case.round_times
    t = statistics.median(times)
    res.update(
        step_time_s=round(t, 4),
        step_time_min_s=round(min(times), 4),
        others_cpu_cores=round(statistics.mean(case.others_cores), 2) if case.others_cores else None,
        round_times_s=[round(x, 4) for x in case.round_times],
        warmup_times_s=[round(x, 4) for x in case.warmup_times],
        discarded_disturbed_rounds_s=[round(x, 4) for x in case.disturbed_times],
        steps_per_round=case.steps_per_round,
        views_per_s=round(args.batch * NUM_VIEWS / t, 1),
        step_mem_mb=None if case.mem_mb is None else round(case.mem_mb, 1),
        last_loss=case.last_loss,
    )
    return res


def _ratio(r: dict[str, Any], other: dict[str, Any] | None) -> float | None:
    return round(r["step_time_s"] / other["step_time_s"], 3) if other and "step_time_s" in other else None


def add_ratios(results: list[dict[str, Any]]) -> None:
    """``overhead_vs_base`` (base + regularizer / base), ``time_ratio_vs_lightly`` (metassl / lightly,
    same variant) and, for compiled rows, ``time_ratio_vs_lightly_eager`` (what a user of either
    library gets out of the box)."""
    by_key = {(r["impl"], r["method"], r["regularizer"], r["precision"], r["channels_last"], r["compile"]): r for r in results}
    for r in results:
        if "step_time_s" not in r or r["impl"] != "metassl":
            continue
        variant = (r["precision"], r["channels_last"])
        ratios = (
            {"overhead_vs_base": _ratio(r, by_key.get(("metassl", r["method"], "none", *variant, r["compile"])))}
            if r["regularizer"] != "none" else
            {"time_ratio_vs_lightly": _ratio(r, by_key.get(("lightly", r["method"], "none", *variant, r["compile"]))),
             "time_ratio_vs_lightly_eager": _ratio(r, by_key.get(("lightly", r["method"], "none", *variant, False))) if r["compile"] else None}
        )
        r.update({k: v for k, v in ratios.items() if v is not None})
