"""The SVI loop: Adam, one-cycle learning rate, gradient clipping, stop rules, recovery."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyro
import torch
from torch.nn.utils import clip_grad_norm_

from bayesdream_model.errors import NonFiniteLikelihoodError
from bayesdream_model.optim import Adam, OneCycle
from bayesdream_model.recovery import (
    Recovery,
    Snapshots,
    scale_learning_rates,
    trouble,
    window_reference,
)

log = logging.getLogger(__name__)

MIN_SCHEDULE_STEPS = 100
ProgressFn = Callable[[int, int, float], None]  # (step, niters, loss)


@dataclass(frozen=True)
class SviSettings:
    """Optimiser defaults (docs/model.md, "Optimisation"); `niters` already resolved."""

    niters: int
    lr: float = 1e-3
    tolerance: float = 1e-4
    ewma_alpha: float = 0.05
    peak_factor: float = 10.0
    #: steps of the one-cycle warm-up to the peak; None: 10 % of `niters` (the reference's
    #: schedule). A fit that starts at the posterior (the Laplace start) needs only a few
    #: steps of it, then runs at the peak until the stop rule's closing anneal
    warmup_steps: int | None = None
    clip_norm: float = 10.0
    log_every: int = 1000
    #: "plateau": windowed, noise-aware (default); "ewma": the reference's
    #: |a·(loss - ewma)| < tol
    convergence: Literal["plateau", "ewma"] = "plateau"
    window: int = 250
    patience: int = 3
    rel_tol: float = 1e-6
    #: a window is flat when its mean changed by less than `noise_factor` standard errors
    #: (or rel_tol): 1 for the reference's schedule; after a Laplace start 2, since the fit
    #: starts at its plateau and the question is only whether it left it (at 1 standard
    #: error, pure noise passes a window only ~2 times in 3, and Adam's correlated steps
    #: make the per-step variance understate the window mean's noise ~1.5x)
    noise_factor: float = 1.0
    #: after the plateau rule fires: max(anneal_windows x window, anneal_fraction x steps
    #: so far) more steps, the learning rate falling from its value then to anneal_floor x
    #: that value (cosine); 0 windows and fraction: stop at once
    anneal_windows: int = 4
    anneal_fraction: float = 0.25
    anneal_floor: float = 1e-3
    #: divergence recovery: a non-finite loss, or one above its last window's median by
    #: `blowup` x max(|median|, 20 MAD), rolls back and scales every learning rate by
    #: `recovery_lr_factor`, at most `max_recoveries` times
    max_recoveries: int = 4
    recovery_lr_factor: float = 0.2
    blowup: float = 1.0
    context: str = ""  # " for modality 'gene'": names the fit in warnings and errors


@dataclass(frozen=True)
class SviResult:
    """The loss trace, how many steps ran, and why the loop stopped."""

    losses: np.ndarray
    niters_run: int
    stop_reason: str
    seconds: float
    recoveries: tuple[Recovery, ...] = ()
    #: how the guide was started (the Laplace start's summary), None for the initial values
    start: dict | None = None


def make_optimizer(params: list[torch.nn.Parameter], settings: SviSettings):
    """Adam under a one-cycle schedule peaking at `peak_factor * lr` after 10 % of the steps
    (`bayesdream_model.optim`: torch.optim's arithmetic without its compiler import)."""
    optimizer = Adam(params, lr=settings.lr, betas=(0.9, 0.999))
    total = max(settings.niters, MIN_SCHEDULE_STEPS)  # shorter schedules divide by 0
    warmup = 0.1 if settings.warmup_steps is None else min(0.1, settings.warmup_steps / total)
    scheduler = OneCycle(
        optimizer,
        max_lr=settings.lr * settings.peak_factor,
        total_steps=total,
        pct_start=warmup,
        div_factor=25.0,
        final_div_factor=1e4,
    )
    return optimizer, scheduler


def ewma_converged(loss: float, smoothed: float, settings: SviSettings) -> bool:
    """The reference's early stop, |a * (loss - ewma)| < tolerance, guarded: a loss above
    its average (rising) never counts as converged."""
    close = abs(settings.ewma_alpha * (loss - smoothed)) < settings.tolerance
    return close and loss <= smoothed


class PlateauDetector:
    """Stop when the loss stopped changing beyond its own noise, for `patience` windows.

    Every `window` steps the mean loss of the window is compared with the previous
    window's: a change smaller than max(standard error of the difference, rel_tol·|loss|)
    either way counts as a flat window; a window worse than that, like a better one,
    ends the streak. The SVI loss of these models is 1e5-1e8 with step-to-step noise of
    hundreds, so an absolute tolerance either never fires or fires by chance when the
    noisy loss crosses its average; this criterion is scale-free. A loss that rises, even
    by less than the noise each window, is never a plateau: when the streak is long
    enough, its last window must not be worse than the window before it began.
    """

    def __init__(self, settings: SviSettings) -> None:
        self.settings = settings
        self.previous: tuple[float, float] | None = None
        self.flat = 0
        self.streak_start: float | None = None  # window mean before the flat streak

    def update(self, losses: list[float]) -> str | None:
        """Called every step; returns the stop reason once converged."""
        window = self.settings.window
        if len(losses) % window:
            return None
        recent = np.asarray(losses[-window:])
        mean, var = float(recent.mean()), float(recent.var(ddof=1))
        reason = None
        if self.previous is not None:
            prev_mean, prev_var = self.previous
            improvement = prev_mean - mean
            noise = self.settings.noise_factor * math.sqrt((prev_var + var) / window)
            threshold = max(noise, self.settings.rel_tol * abs(mean))
            if abs(improvement) < threshold:
                self.streak_start = prev_mean if self.flat == 0 else self.streak_start
                self.flat += 1
            else:
                self.flat = 0
            if self.flat >= self.settings.patience and self.streak_start - mean < -threshold:
                self.flat = 0  # a slow rise, window by window: not converged
            elif self.flat >= self.settings.patience:
                reason = (
                    f"converged: window-mean loss changed by {improvement:.4g} (|.| < "
                    f"{threshold:.4g}, noise/rel_tol) for {self.flat} windows of {window} steps"
                )
        self.previous = (mean, var)
        return reason

    def state(self) -> list:
        """Plain data, for checkpoints and snapshots."""
        return [self.previous, self.flat, self.streak_start]

    def load(self, state: list) -> None:
        """Continue from `state()`."""
        previous, self.flat, self.streak_start = state
        self.previous = None if previous is None else tuple(previous)


#: standard errors by which the annealed loss must exceed the plateau's to count as a rise
#: (a one-sided test: under pure noise about one fit in 700 is called not converged)
RISE_SE = 3.0


@dataclass
class Anneal:
    """The closing phase after a plateau: learning rates scaled down to the floor."""

    start: int  # the first annealing step
    stop: int  # the step after the last
    lrs: list[float]  # each parameter group's learning rate when the plateau was reached
    reason: str  # the plateau rule's reason
    level: tuple[float, float] = (math.nan, math.nan)  # the plateau window's mean, variance

    def factor(self, step: int, floor: float) -> float:
        """Cosine from 1 (first annealing step) to `floor` (last)."""
        t = (step - self.start) / max(1, self.stop - 1 - self.start)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    def outcome(self, losses: list[float], window: int) -> str:
        """The stop reason: converged, unless the last window is worse than the plateau's
        beyond RISE_SE standard errors of their difference (then the loss rose while the
        rate fell: say so). At one standard error a pure-noise rise was called a failure
        in about one fit of six (the demo, a newcomer's first run, ended in that warning)."""
        done = f"{self.reason}; then annealed for {len(losses) - self.start} steps"
        recent = np.asarray(losses[-min(window, len(losses) - self.start) :])
        mean, (level, level_var) = float(recent.mean()), self.level
        noise = math.sqrt((level_var + float(recent.var(ddof=1))) / max(len(recent), 2))
        if not mean - level > max(RISE_SE * noise, 1e-6 * abs(level)):
            return done
        log.warning("SVI: the loss rose by %.4g during the final anneal", mean - level)
        return f"not converged: the loss rose by {mean - level:.4g} while annealing ({done})"


@dataclass(frozen=True)
class Checkpointing:
    """Resumable SVI: `save(state)` every `every_s` seconds; `state` resumes a killed fit."""

    save: Callable[[dict], None]
    state: dict | None = None
    every_s: float = 30.0


def run_svi(
    model,
    guide,
    elbo,
    settings: SviSettings,
    *,
    on_progress: ProgressFn | None = None,
    checkpointing: Checkpointing | None = None,
    before_step: Callable[[int], None] | None = None,
    start: dict | None = None,
) -> SviResult:
    """Run SVI until converged or `niters` steps; the scheduler steps every step.

    The guide holds its parameters itself (Pyro's module-local parameters), so fits never
    share state through Pyro's global parameter store. Gradients are clipped per parameter
    tensor at `clip_norm`, as Pyro's `clip_args` does. A step whose loss is non-finite or
    blows up rolls the fit back to an earlier state with lower learning rates
    (`bayesdream_model.recovery`); `DivergenceError` once that no longer helps. With
    `checkpointing`, the whole state (guide, optimiser, schedule, losses, stop rule,
    recovery copies, torch RNG) is saved regularly, and a fit resumed from it continues
    exactly as the uninterrupted one would have. `before_step(step)` runs before each
    step (a cell stream loads that step's batch). `start` (plain data: how the guide was
    started) is returned in the result and kept in checkpoints, so that a resumed fit,
    which does not start the guide again, reports the same.
    """
    loop = _Loop(elbo(model, guide), guide, settings)
    loop.start = start
    if checkpointing is not None and checkpointing.state is not None:
        loop.load_state_dict(checkpointing.state)
        log.info("SVI resumed at step %d of %d", len(loop.losses), settings.niters)
    # Distribution argument checks cost about half of a small step; a diverging fit still
    # shows as a non-finite loss, which the loop recovers from.
    with pyro.validation_enabled(False):
        return loop.run(on_progress, checkpointing, before_step)


class _Loop:
    """The optimisation loop's state, so that it can be saved and resumed."""

    def __init__(self, loss_fn, guide, settings: SviSettings) -> None:
        self.loss_fn, self.guide, self.settings = loss_fn, guide, settings
        self.params = [p for p in guide.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = make_optimizer(self.params, settings)
        self.losses: list[float] = []
        self.smoothed: float | None = None
        self.plateau = PlateauDetector(settings)
        self.anneal: Anneal | None = None
        self.reference: tuple[float, float] | None = None  # last window's (median, MAD)
        self.snapshots = Snapshots(
            max_recoveries=settings.max_recoveries, lr_factor=settings.recovery_lr_factor
        )
        self.seconds = 0.0
        self.start: dict | None = None

    def _core(self) -> dict:
        """What a roll-back restores: everything but the loss trace, clock and RNG."""
        return {
            "guide": self.guide.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "smoothed": self.smoothed,
            "plateau": self.plateau.state(),
            "anneal": None if self.anneal is None else vars(self.anneal).copy(),
            "reference": self.reference,
            "lr_scale": self.snapshots.lr_scale,
        }

    def _load_core(self, state: dict) -> None:
        self.guide.load_state_dict(state["guide"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.smoothed = state["smoothed"]
        self.plateau.load(state["plateau"])
        anneal = state["anneal"]
        self.anneal = None if anneal is None else Anneal(**anneal)
        if self.anneal is not None:
            self.anneal.level = tuple(self.anneal.level)
        self.reference = None if state["reference"] is None else tuple(state["reference"])

    def state_dict(self) -> dict:
        """Everything needed to continue bit for bit."""
        return self._core() | {
            "losses": list(self.losses),
            "snapshots": self.snapshots.state_dict(),
            "seconds": self.seconds,
            "rng": torch.get_rng_state(),
            "start": self.start,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`'s output."""
        self._load_core(state)
        self.snapshots.load_state_dict(state["snapshots"])
        self.losses = list(state["losses"])
        self.seconds = state["seconds"]
        self.start = state.get("start")
        torch.set_rng_state(state["rng"])

    def run(
        self,
        on_progress: ProgressFn | None,
        checkpointing: Checkpointing | None,
        before_step: Callable[[int], None] | None = None,
    ) -> SviResult:
        """Steps until a stop rule fires; returns the trace and the reason."""
        settings = self.settings
        start, saved = time.perf_counter() - self.seconds, time.perf_counter()
        reason = f"reached niters={settings.niters}"
        while (step := len(self.losses)) < settings.niters:
            kept = self.snapshots.kept
            if step % settings.window == 0 and (not kept or kept[-1][0] != step):
                self.snapshots.keep(step, self._core())
            if before_step is not None:
                before_step(step)
            self._anneal_rates(step)
            loss, problem = _step(self.loss_fn, self.optimizer, self.params, settings.clip_norm)
            problem = problem or trouble(loss, self.reference, settings.blowup)
            if problem is not None:
                self._recover(step, problem)
                continue
            self.losses.append(loss)
            if step + 1 < settings.niters and self.anneal is None:
                self.scheduler.step()  # stepping past the schedule's end raises
            if (step + 1) % settings.window == 0:
                self.reference = window_reference(self.losses, settings.window)
            if step % settings.log_every == 0:
                log.info("SVI step %d/%d: loss %.5e", step, settings.niters, loss)
            if on_progress is not None:
                on_progress(step, settings.niters, loss)
            stop = self._converged(step, loss)
            if stop is not None:
                reason = stop
                break
            if checkpointing is not None and time.perf_counter() - saved > checkpointing.every_s:
                self.seconds = time.perf_counter() - start
                checkpointing.save(self.state_dict())
                saved = time.perf_counter()
        seconds = time.perf_counter() - start
        recoveries = tuple(self.snapshots.recoveries)
        if recoveries:
            reason += (
                f"; after {len(recoveries)} divergence recover"
                + ("y" if len(recoveries) == 1 else "ies")
                + f" ({'; '.join(r.describe() for r in recoveries)})"
            )
        log.info("SVI stopped after %d steps (%s) in %.1f s", len(self.losses), reason, seconds)
        return SviResult(
            np.asarray(self.losses), len(self.losses), reason, seconds, recoveries, self.start
        )

    def _anneal_rates(self, step: int) -> None:
        if self.anneal is not None:
            factor = self.anneal.factor(step, self.settings.anneal_floor)
            for group, lr in zip(self.optimizer.param_groups, self.anneal.lrs, strict=True):
                group["lr"] = lr * factor

    def _recover(self, step: int, problem: str) -> None:
        """Back to the older kept state, every learning rate scaled down (or raise)."""
        restored_to, state, factor = self.snapshots.recover(step, problem, self.settings.context)
        log.warning(
            "SVI%s step %d: %s; rolling back to step %d with the learning rates x%.3g "
            "(recovery %d of at most %d)",
            self.settings.context,
            step,
            problem,
            restored_to,
            factor,
            len(self.snapshots.recoveries),
            self.settings.max_recoveries,
        )
        self._load_core(state)
        del self.losses[restored_to:]
        scale_learning_rates(self.optimizer.param_groups, factor)
        if self.anneal is not None:
            self.anneal.lrs = [lr * factor for lr in self.anneal.lrs]

    def _converged(self, step: int, loss: float) -> str | None:
        settings = self.settings
        if settings.convergence == "plateau":
            return self._plateau(step)
        if self.smoothed is None:
            self.smoothed = loss
            return None
        if ewma_converged(loss, self.smoothed, settings):
            return f"converged: |a*(loss-ewma)| < {settings.tolerance:g} at step {step}"
        self.smoothed = settings.ewma_alpha * loss + (1 - settings.ewma_alpha) * self.smoothed
        return None

    def _plateau(self, step: int) -> str | None:
        """The plateau rule, then (when it fires) the annealing phase before stopping.

        The one-cycle schedule is laid out for `niters` steps, so the plateau usually comes
        while the learning rate is still near its peak: stopping there leaves the
        parameters where the noisy steps put them. Annealing the rate to a small fraction
        lets them settle (Student-t: effect RMSE 0.0701 -> 0.0693 on the benchmark screen)
        for ~25 % more steps.
        """
        settings = self.settings
        if self.anneal is not None:
            if step + 1 < self.anneal.stop:
                return None
            return self.anneal.outcome(self.losses, settings.window)
        stop = self.plateau.update(self.losses)
        if stop is None:
            return None
        reason = f"{stop} (step {step})"
        extra = max(
            settings.anneal_windows * settings.window, int(settings.anneal_fraction * (step + 1))
        )
        if extra <= 0 or step + 1 >= settings.niters:
            return reason
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        stop_at = min(step + 1 + extra, settings.niters)
        self.anneal = Anneal(step + 1, stop_at, lrs, reason, self.plateau.previous)
        log.info("SVI plateau at step %d: annealing the learning rate for %d steps", step, extra)
        return None


def _step(loss_fn, optimizer, params, clip_norm: float) -> tuple[float, str | None]:
    """One gradient step: (loss, None), or (nan, why) when the guide's parameters became
    non-finite or the likelihood could not be evaluated at them (a diverging fit)."""
    optimizer.zero_grad(set_to_none=True)
    try:
        loss = loss_fn()
    except ValueError as err:  # a distribution or likelihood check on diverged parameters
        finite = all(torch.isfinite(p).all() for p in params)
        if finite and not isinstance(err, NonFiniteLikelihoodError):
            raise
        what = "non-finite guide parameters" if not finite else "non-finite likelihood"
        return math.nan, f"{what} ({str(err).splitlines()[0][:200]})"
    loss.backward()
    for p in params:
        if p.grad is not None:
            clip_grad_norm_(p, clip_norm)
    optimizer.step()
    return float(loss.detach()), None
