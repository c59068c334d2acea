"""Synthetic-data factories shared by the test suites (simulated negbinom screens)."""

from __future__ import annotations

import numpy as np

from bayesdream_model.data import FitArrays
from bayesdream_model.simulate import SimulatedScreen, simulate_negbinom_screen


def fit_arrays(screen: SimulatedScreen) -> FitArrays:
    """The fit cells of a simulated screen (its NTC cells) as cells x features."""
    keep = screen.is_ntc
    return FitArrays(
        y=screen.counts.T[keep].astype(np.float64),
        groups=screen.groups[keep],
        n_groups=int(screen.log2_alpha.shape[0]),
        sum_factor=screen.sum_factor[keep],
    )


def negbinom_screen(
    *,
    n_cells: int = 120,
    n_features: int = 8,
    n_groups: int = 2,
    effect_sd: float = 0.5,
    seed: int = 0,
) -> tuple[SimulatedScreen, FitArrays]:
    """An all-NTC simulated screen and its fit arrays."""
    screen = simulate_negbinom_screen(
        n_cells=n_cells, n_features=n_features, n_groups=n_groups, effect_sd=effect_sd, seed=seed
    )
    return screen, fit_arrays(screen)


def counts_matrix(
    *, n_cells: int, n_features: int, n_groups: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Overdispersed counts [N, T], group codes [N] (every group present), size factors [N]."""
    rng = np.random.default_rng(seed)
    groups = np.arange(n_cells) % n_groups
    rng.shuffle(groups)
    sum_factor = rng.lognormal(0.0, 0.4, size=n_cells)
    mean = rng.lognormal(np.log(8.0), 1.0, size=n_features)[None, :] * sum_factor[:, None]
    rate = rng.gamma(shape=1.5, scale=mean / 1.5)
    return rng.poisson(rate).astype(np.float64), groups, sum_factor
