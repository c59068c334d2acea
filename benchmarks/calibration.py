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


def cramer_rao_rmse(
    mu: np.ndarray,
    phi: np.ndarray,
    log2_alpha: np.ndarray,
    sum_factor: np.ndarray,
    groups: np.ndarray,
    *,
    block: int = 512,
) -> float:
    """The RMSE an efficient unbiased estimator of the NB screen's log2 effects would have:
    the root mean Cramér-Rao variance over the effects log2 alpha[g >= 1, t], with the true
    baseline means `mu` [T], dispersions `phi` [T] (NB total_count) and size factors.

    Group g's log mean theta_gt has Fisher information I_gt = Σ_{n in g} μ φ / (μ + φ)
    (μ = mu_t 2^alpha_gt sf_n; the NB mean and dispersion are orthogonal), and the effect
    (theta_gt - theta_0t) / ln 2 has variance (1/I_gt + 1/I_0t) / ln(2)^2. An estimator
    under a flat effect prior (a StudentT(3, 0, 20) on log2 effects is one) cannot beat it
    on average, short of shrinking: below this RMSE lies only prior information."""
    n_groups = log2_alpha.shape[0]
    variances = []
    for lo in range(0, mu.size, block):
        m = mu[lo : lo + block, None] * np.exp2(log2_alpha[:, lo : lo + block].T)  # [t, C]
        p = phi[lo : lo + block, None]
        info = np.stack(
            [
                (m[:, [g]] * sf * p / (m[:, [g]] * sf + p)).sum(axis=1)
                for g in range(n_groups)
                for sf in [sum_factor[groups == g][None, :]]
            ],
            axis=1,
        )  # [t, C]
        variances.append((1.0 / info[:, 1:] + 1.0 / info[:, :1]) / np.log(2.0) ** 2)
    return float(np.sqrt(np.concatenate(variances).mean()))
