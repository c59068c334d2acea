"""Recovery of known effects from posterior draws: what the calibration benchmarks report."""

from __future__ import annotations

import numpy as np


def interval_recovery(draws: np.ndarray, truth: np.ndarray) -> dict:
    """Correlation of posterior means with the truth, their RMSE, and the share of true
    effects inside the central 90 % interval; `draws` [S, *truth.shape]."""
    low, high = np.quantile(draws, [0.05, 0.95], axis=0)
    mean = draws.mean(axis=0)
    return {
        "correlation": round(float(np.corrcoef(mean.ravel(), truth.ravel())[0, 1]), 5),
        "rmse": round(float(np.sqrt(((mean - truth) ** 2).mean())), 5),
        "coverage90": round(float(((truth >= low) & (truth <= high)).mean()), 4),
        "n_effects": int(truth.size),
    }
