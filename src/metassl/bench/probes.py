"""What a timed block costs besides time: the peak extra memory of a step (:class:`PeakMemory`)
and the CPU time that *other* processes took meanwhile (:class:`Contention`, to detect and redo
rounds disturbed on a shared machine).

Memory: CUDA: ``max_memory_allocated`` during the block minus the memory allocated before it.
CPU: the resident set size sampled every 2 ms during the block, after ``malloc_trim`` (so that
freed heap memory is not counted as free), minus the RSS before it: the memory a step adds on top
of weights and optimizer state (activations, gradients, temporaries; on a configuration's first
step also the optimizer's momentum buffers).
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading

import torch

__all__ = ["PeakMemory", "Contention"]


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak extra memory of a block: CUDA allocator statistics, or sampled RSS on CPU."""

    def __init__(self, device: str, interval: float = 0.002) -> None:
        self.device, self.interval = device, interval
        self.peak_mb: float | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        gc.collect()
        _malloc_trim()
        self._base = _rss_bytes()
        self._peak = self._base
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self._peak = max(self._peak, _rss_bytes())
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self._base) / 2**20
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes())
        self.peak_mb = (self._peak - self._base) / 2**20


class Contention:
    """CPU time used by *other* processes during a block, in cores (from /proc/stat and
    /proc/self/stat; None where unavailable).  A shared machine inflates step times."""

    def __init__(self) -> None:
        self.others_cores: float | None = None

    @staticmethod
    def _machine() -> tuple[int, int, int]:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:9]]
        ncpu = sum(1 for line in open("/proc/stat") if line.startswith("cpu") and line[3:4].isdigit())
        return sum(vals) - vals[3] - vals[4], sum(vals), ncpu

    @staticmethod
    def _own() -> int:
        with open("/proc/self/stat") as f:
            text = f.read()
        fields = text[text.rindex(")") + 2 :].split()
        return sum(int(x) for x in fields[11:15])  # utime stime cutime cstime

    def __enter__(self) -> "Contention":
        try:
            self._start = (*self._machine(), self._own())
        except (OSError, ValueError, IndexError):
            self._start = None
        return self

    def __exit__(self, *exc) -> None:
        if self._start is None:
            return
        try:
            busy, total, ncpu = self._machine()
            own = self._own()
        except (OSError, ValueError, IndexError):
            return
        d_total = total - self._start[1]
        if d_total <= 0:
            return
        others = (busy - self._start[0]) - (own - self._start[3])
        self.others_cores = max(0.0, others / d_total * ncpu)
