"""Provenance of a benchmark run: which code (commit), when (UTC date), where (machine) and how
(the exact command).  Every JSON a benchmark writes carries :func:`run_metadata` at its top level,
so that a number quoted in the README can be traced to the run and the code that made it.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = ["git_commit", "cpu_model", "cpu_flags", "machine_info", "redact", "run_metadata"]

#: the CPU features that decide which bf16 / vector kernels a CPU run gets
_FLAG_PREFIXES = ("avx512_bf16", "amx", "avx512f", "avx2")


def _cpuinfo(key: str) -> str | None:
    """The first ``key: value`` of /proc/cpuinfo (None where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, sep, value = line.partition(":")
            if sep and name.strip().lower() == key:
                return value.strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    return sorted(f for f in (_cpuinfo("flags") or "").split() if f.startswith(_FLAG_PREFIXES))


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_commit() -> str | None:
    """``git rev-parse HEAD`` of the checkout this package runs from, + ``-dirty`` when tracked
    files differ from it or untracked (not ignored) files exist; None outside a git checkout."""
    sha = (_git("rev-parse", "HEAD") or "").strip()
    if not sha:
        return None
    status = _git("status", "--porcelain")
    return sha + ("-dirty" if status is None or status.strip() else "")


def machine_info(device: str | None = None) -> dict[str, Any]:
    """CPU model, flags and cores, torch version and threads, Python, OS, and the GPU (None if
    the run does not use one; ``device="cuda"`` or ``None`` with CUDA available names it)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    use_gpu = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if use_gpu and torch.cuda.is_available() else None,
        "cuda": torch.version.cuda if use_gpu else None,
    }


def run_metadata(command: Sequence[str] | None = None, device: str | None = None) -> dict[str, Any]:
    """``{"commit", "date", "machine", "command"}`` of the running benchmark.

    ``command`` defaults to the process's own command line (``sys.orig_argv``: interpreter,
    ``-m module`` or script, and every argument as typed), shell-quoted.
    """
    argv = list(command) if command is not None else list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    return {
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "machine": machine_info(device),
        "command": shlex.join(argv),
    }


def redact(obj: Any, paths: dict[str, str]) -> Any:
    """``obj`` (nested dicts, lists, strings) with every string's occurrence of a path in ``paths``
    (a dataset folder as given and resolved, a decoded-image cache, a temporary run folder) replaced
    by its placeholder: committed results name no folder of the machine that made them."""
    if isinstance(obj, str):
        for path, name in paths.items():
            obj = obj.replace(path, name)
        return obj
    if isinstance(obj, dict):
        return {k: redact(v, paths) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v, paths) for v in obj]
    return obj
