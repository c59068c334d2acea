"""The SVI loop: Adam, one-cycle learning rate, gradient clipping, EWMA early stop."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyro
import torch
from pyro.infer import SVI
from torch.optim.lr_scheduler import OneCycleLR

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, float], None]  # (step, niters, loss)


@dataclass(frozen=True)
class SviSettings:
    """SPEC "Optimiser" defaults; `niters` already resolved for the guide."""

    niters: int
    lr: float = 1e-3
    tolerance: float = 1e-4
    ewma_alpha: float = 0.05
    peak_factor: float = 10.0
    clip_norm: float = 10.0
    log_every: int = 1000


@dataclass(frozen=True)
class SviResult:
    """The loss trace, how many steps ran, and why the loop stopped."""

    losses: np.ndarray
    niters_run: int
    stop_reason: str
    seconds: float


def make_optimizer(settings: SviSettings) -> pyro.optim.PyroLRScheduler:
    """Adam under a one-cycle schedule peaking at `peak_factor * lr`, clipped gradients."""
    return pyro.optim.PyroLRScheduler(
        OneCycleLR,
        {
            "optimizer": torch.optim.Adam,
            "optim_args": {"lr": settings.lr, "betas": (0.9, 0.999)},
            "max_lr": settings.lr * settings.peak_factor,
            "total_steps": settings.niters,
            "pct_start": 0.1,
            "div_factor": 25.0,
            "final_div_factor": 1e4,
        },
        clip_args={"clip_norm": settings.clip_norm},
    )


def ewma_converged(loss: float, smoothed: float, settings: SviSettings) -> bool:
    """SPEC early stop: |a * (loss - ewma)| < tolerance."""
    return abs(settings.ewma_alpha * (loss - smoothed)) < settings.tolerance


def run_svi(
    model,
    guide,
    elbo,
    settings: SviSettings,
    *,
    on_progress: ProgressFn | None = None,
) -> SviResult:
    """Run SVI until `niters` steps or the EWMA early stop; the scheduler steps every step."""
    optimizer = make_optimizer(settings)
    svi = SVI(model, guide, optimizer, loss=elbo)
    losses: list[float] = []
    smoothed: float | None = None
    reason = f"reached niters={settings.niters}"
    start = time.perf_counter()
    for step in range(settings.niters):
        loss = float(svi.step())
        losses.append(loss)
        if step + 1 < settings.niters:
            optimizer.step()  # advance the one-cycle schedule (stepping past its end raises)
        if not math.isfinite(loss):
            reason = f"non-finite loss at step {step}"
            break
        if step % settings.log_every == 0:
            log.info("SVI step %d/%d: loss %.5e", step, settings.niters, loss)
        if on_progress is not None:
            on_progress(step, settings.niters, loss)
        if smoothed is None:
            smoothed = loss
        elif ewma_converged(loss, smoothed, settings):
            reason = f"converged: |a*(loss-ewma)| < {settings.tolerance:g} at step {step}"
            break
        else:
            smoothed = settings.ewma_alpha * loss + (1 - settings.ewma_alpha) * smoothed
    seconds = time.perf_counter() - start
    log.info("SVI stopped after %d steps (%s) in %.1f s", len(losses), reason, seconds)
    return SviResult(np.asarray(losses), len(losses), reason, seconds)
