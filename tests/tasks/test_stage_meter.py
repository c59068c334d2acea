"""`StageMeter`: a step's peak memory is the process's highest resident memory while the
step ran: an allocation freed before the step ends still counts, and a later step that
allocates nothing does not inherit an earlier step's peak."""

from __future__ import annotations

import time

import numpy as np
import psutil

from tasks.stage_meter import StageMeter

MIB = 2**20
BLOCK = 300 * MIB  # large enough to stand far above the noise of a test process


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


def _touch(n_bytes: int) -> np.ndarray:
    block = np.ones(n_bytes // 8)  # ones, not empty: every page is written, so resident
    return block


def test_a_block_freed_inside_the_step_still_counts() -> None:
    before = _rss()
    with StageMeter() as meter:
        block = _touch(BLOCK)
        time.sleep(0.05)  # the sampler sees it even where the high-water mark was higher
        del block
    use = meter.use
    assert use.peak_rss_bytes >= before + 0.9 * BLOCK
    assert _rss() < before + 0.5 * BLOCK  # it was given back: the peak is not the end state
    assert use.seconds >= 0.05


def test_a_step_that_allocates_nothing_does_not_inherit_an_earlier_peak() -> None:
    with StageMeter() as big:
        block = _touch(BLOCK)
        del block
    with StageMeter() as small:
        time.sleep(0.03)
    assert small.use.peak_rss_bytes < big.use.peak_rss_bytes - 0.5 * BLOCK
    assert small.use.peak_rss_bytes >= _rss() - 50 * MIB  # about what the process holds


def test_without_cuda_no_gpu_figure_is_recorded() -> None:
    with StageMeter() as meter:
        pass
    recorded = meter.use.as_dict()
    assert set(recorded) == {"seconds", "peak_rss_bytes"}
    assert recorded["peak_rss_bytes"] > 0
