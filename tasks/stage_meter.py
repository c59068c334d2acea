"""A step's wall time and peak memory, for the run's page and the store's `steps`.

`StageMeter` measures the process it runs in (a Dask worker's, when the step runs there):

- peak resident memory (RSS) while the step ran: the larger of a 10 ms sampler's highest
  reading and the kernel's high-water mark (`ru_maxrss`) when that mark rose during the
  step (a rise means the process's new lifetime peak fell inside the step, so it is exact;
  when it did not rise, the sampler's reading stands, and a spike shorter than 10 ms may
  be missed);
- the GPU's peak allocated memory, when torch already uses CUDA in this process.

Steps that run side by side in one process (`--workers`) share its memory: each reports
the process's peak over its own interval.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass

import psutil

try:
    import resource
except ImportError:  # Windows: the sampler alone
    resource = None  # type: ignore[assignment]

SAMPLE_SECONDS = 0.01
#: ru_maxrss is in kilobytes on Linux, in bytes on macOS
_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024


def _high_water_mark() -> int | None:
    if resource is None:
        return None
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * _MAXRSS_UNIT


class _Sampler:
    """One thread per process samples the RSS for every open meter (none when idle)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._peaks: dict[int, int] = {}
        self._next_id = 0
        self._thread: threading.Thread | None = None
        self._process = psutil.Process()

    def open(self) -> int:
        rss = self.rss()
        with self._lock:
            meter = self._next_id
            self._next_id += 1
            self._peaks[meter] = rss
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="stage-meter", daemon=True)
                self._thread.start()
        return meter

    def close(self, meter: int) -> int:
        rss = self.rss()
        with self._lock:
            return max(self._peaks.pop(meter), rss)

    def rss(self) -> int:
        return int(self._process.memory_info().rss)

    def _run(self) -> None:
        while True:
            rss = self.rss()
            with self._lock:
                if not self._peaks:
                    self._thread = None
                    return
                for meter, peak in self._peaks.items():
                    if rss > peak:
                        self._peaks[meter] = rss
            time.sleep(SAMPLE_SECONDS)


_SAMPLER = _Sampler()


@dataclass(frozen=True)
class StageUse:
    """What one step used."""

    seconds: float
    peak_rss_bytes: int
    peak_gpu_bytes: int | None = None

    def as_dict(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {
            "seconds": round(self.seconds, 3),
            "peak_rss_bytes": self.peak_rss_bytes,
        }
        if self.peak_gpu_bytes is not None:
            out["peak_gpu_bytes"] = self.peak_gpu_bytes
        return out


class StageMeter:
    """`with StageMeter() as meter: ...`, then `meter.use` (a `StageUse`)."""

    def __init__(self) -> None:
        self.use: StageUse | None = None

    def __enter__(self) -> StageMeter:
        self._cuda = _cuda_in_use()
        if self._cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        self._mark = _high_water_mark()
        self._meter = _SAMPLER.open()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        seconds = time.perf_counter() - self._start
        peak = _SAMPLER.close(self._meter)
        mark = _high_water_mark()
        if mark is not None and self._mark is not None and mark > self._mark:
            peak = max(peak, mark)
        gpu = None
        if self._cuda or _cuda_in_use():
            import torch

            gpu = int(torch.cuda.max_memory_allocated())
        self.use = StageUse(seconds, peak, gpu)


def _cuda_in_use() -> bool:
    """torch is imported and has started CUDA here (never imports torch or starts CUDA)."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_initialized()
