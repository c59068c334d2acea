"""Divergence recovery for the SVI loop: spot a step gone wrong, roll back, go slower.

A fit diverges when a step lands the guide where the loss is non-finite or explodes
(the one-cycle schedule's peak learning rate is the usual moment). Instead of failing,
the loop keeps a copy of its state every window of steps, and on trouble returns to the
older of the last two copies (the newer may already be on its way out) with every
learning rate of the schedule scaled down; only after `max_recoveries` such returns does
the fit stop, with an error that says where and what was tried.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import numpy as np

from bayesdream_model.errors import ModelError

#: the schedule's learning-rate keys in each optimiser parameter group (torch's OneCycleLR)
LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
KEPT = 2  # snapshots kept: the last two window boundaries


class DivergenceError(ModelError):
    """SVI kept diverging after every recovery; the message lists what was tried."""


@dataclass(frozen=True)
class Recovery:
    """One roll-back: where the trouble was, where the fit went back to, at what peak."""

    step: int
    restored_to: int
    reason: str
    lr_peak: float

    def describe(self) -> str:
        """'step 972 (non-finite loss) -> step 500, peak lr 0.002'."""
        return f"step {self.step} ({self.reason}) -> step {self.restored_to}, peak lr {self.lr_peak:.3g}"


def trouble(loss: float, reference: tuple[float, float] | None, factor: float) -> str | None:
    """Why this step's loss means the fit went wrong, or None.

    `reference` is (median, MAD) of the last full window of losses: a loss above the
    median by more than `factor` x max(|median|, 20 MAD) has blown up. The losses of these
    models are 1e3-1e8 with noise of a fraction of a percent, so a doubling is far beyond
    noise, while the early fall from the initial values never counts (it goes down).
    """
    if not math.isfinite(loss):
        return "non-finite loss"
    if reference is None:
        return None
    median, mad = reference
    if loss - median > factor * max(abs(median), 20.0 * mad):
        return f"loss blew up to {loss:.4g} from a window median of {median:.4g}"
    return None


def window_reference(losses: list[float], window: int) -> tuple[float, float]:
    """(median, MAD) of the last `window` losses."""
    recent = np.asarray(losses[-window:])
    median = float(np.median(recent))
    return median, float(np.median(np.abs(recent - median)))


class Snapshots:
    """Copies of the loop's state at window boundaries, and the recoveries made from them."""

    def __init__(self, *, max_recoveries: int, lr_factor: float) -> None:
        self.max_recoveries, self.lr_factor = max_recoveries, lr_factor
        self.kept: list[tuple[int, dict]] = []  # (step, state), oldest first
        self.recoveries: list[Recovery] = []
        self.lr_scale = 1.0  # product of the factors applied so far

    def keep(self, step: int, state: dict) -> None:
        """A copy of `state` (tensors cloned) as the fall-back for trouble after `step`."""
        self.kept.append((step, copy.deepcopy(state)))
        del self.kept[:-KEPT]

    def recover(self, step: int, reason: str, context: str) -> tuple[int, dict, float]:
        """The step and state to return to, and the factor for every learning rate; raises
        `DivergenceError` once `max_recoveries` roll-backs have been spent."""
        if len(self.recoveries) >= self.max_recoveries or not self.kept:
            tried = "; ".join(r.describe() for r in self.recoveries) or "none"
            raise DivergenceError(
                f"SVI diverged{context} at step {step} ({reason}) after {len(self.recoveries)} "
                f"recoveries (rolled back to an earlier state with a lower learning-rate peak "
                f"each time: {tried}). Lower fit.lr, or check the input for extreme values."
            )
        restored_to, state = self.kept[0]
        self.kept = self.kept[:1]  # the newer copy led here
        factor = self.lr_factor * self.lr_scale / state["lr_scale"]
        self.lr_scale *= self.lr_factor
        peak = max(g["max_lr"] for g in state["optimizer"]["param_groups"]) * factor
        self.recoveries.append(Recovery(step, restored_to, reason, peak))
        return restored_to, copy.deepcopy(state), factor

    def state_dict(self) -> dict:
        """Plain data, for the loop's checkpoint."""
        return {
            "kept": [[step, state] for step, state in self.kept],
            "recoveries": [asdict(r) for r in self.recoveries],
            "lr_scale": self.lr_scale,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`'s output."""
        self.kept = [(int(step), saved) for step, saved in state["kept"]]
        self.recoveries = [Recovery(**r) for r in state["recoveries"]]
        self.lr_scale = float(state["lr_scale"])


def scale_learning_rates(param_groups: list[dict], factor: float) -> None:
    """Every learning rate the schedule reads, scaled (OneCycleLR recomputes the rate
    from these each step, so the whole remaining schedule is lowered)."""
    for group in param_groups:
        for key in LR_KEYS:
            if key in group:
                group[key] *= factor
