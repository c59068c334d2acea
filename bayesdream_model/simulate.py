"""Simulated screens with known technical effects (for the demo, tests and benchmarks).

Counts follow the model's own negative binomial: cell n of group g, feature t has
mean `mu[t] * 2**log2_alpha[g, t] * sf[n]` and dispersion `phi[t]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SimulatedScreen:
    """A screen drawn from the negbinom technical model; arrays are features x cells."""

    counts: np.ndarray  # [T, N] int64
    groups: np.ndarray  # [N] group code, 0 = baseline
    is_ntc: np.ndarray  # [N] bool
    sum_factor: np.ndarray  # [N]
    mu: np.ndarray  # [T] baseline mean per unit size factor
    phi: np.ndarray  # [T] NB total_count
    log2_alpha: np.ndarray  # [C, T], row 0 = 0
    feature_names: np.ndarray  # [T]
    cell_ids: np.ndarray  # [N]


def simulate_negbinom_screen(
    *,
    n_cells: int,
    n_features: int,
    n_groups: int,
    ntc_fraction: float = 1.0,
    effect_sd: float = 0.5,
    seed: int = 0,
) -> SimulatedScreen:
    """Draw a screen whose groups shift every feature by a known log2 factor."""
    rng = np.random.default_rng(seed)
    groups = np.sort(rng.integers(0, n_groups, size=n_cells))
    groups[:n_groups] = np.arange(n_groups)  # every group present
    rng.shuffle(groups)
    sum_factor = rng.lognormal(0.0, 0.3, size=n_cells)
    mu = rng.lognormal(np.log(5.0), 1.0, size=n_features)
    phi = rng.lognormal(np.log(5.0), 0.5, size=n_features)
    log2_alpha = rng.normal(0.0, effect_sd, size=(n_groups, n_features))
    log2_alpha[0] = 0.0
    mean = mu[:, None] * np.exp2(log2_alpha[groups].T) * sum_factor[None, :]  # [T, N]
    # NB(total_count=phi, mean) as a gamma-Poisson mixture.
    rate = rng.gamma(shape=phi[:, None], scale=mean / phi[:, None])
    counts = rng.poisson(rate)
    is_ntc = rng.random(n_cells) < ntc_fraction
    is_ntc[:n_groups] = True
    return SimulatedScreen(
        counts=counts,
        groups=groups,
        is_ntc=is_ntc,
        sum_factor=sum_factor,
        mu=mu,
        phi=phi,
        log2_alpha=log2_alpha,
        feature_names=np.array([f"gene{t:05d}" for t in range(n_features)]),
        cell_ids=np.array([f"cell{n:06d}" for n in range(n_cells)]),
    )
