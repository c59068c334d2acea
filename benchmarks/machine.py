"""What the benchmarks share: the machine's description, load, and RSS measurement."""

from __future__ import annotations

import math
import os
import platform
import resource
import threading
import time
from pathlib import Path

MIB = 1024**2


def ru_maxrss_bytes() -> int:
    """Peak RSS of this process so far (Linux reports KiB). Not reset at exec."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def vm_hwm_bytes() -> int | None:
    """This process's own RSS high-water mark (VmHWM, reset at exec; Linux only).

    `ru_maxrss` is not reset at exec: a child starts from the high-water mark of the
    process it was spawned from (an orchestrator that simulated a large screen), so a
    worker's own peak is read here.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_affinity() -> int | None:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return None


class RssSampler:
    """This process's RSS (bytes), sampled by a background thread; peak over any window."""

    def __init__(self, interval: float = 0.02) -> None:
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.samples: list[tuple[float, int]] = []  # (perf_counter, rss bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), self.process.memory_info().rss))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, start: float = -math.inf, stop: float = math.inf) -> int | None:
        """Largest sampled RSS in [start, stop] (bytes)."""
        samples = list(self.samples)
        values = [rss for t, rss in samples if start <= t <= stop]
        if not values:  # a window shorter than the interval: the last sample before it ends
            values = [rss for t, rss in samples if t <= stop][-1:]
        return max(values) if values else None


def mb(nbytes: float | None) -> float | None:
    """Bytes as MiB, one decimal."""
    return None if nbytes is None else round(nbytes / MIB, 1)
