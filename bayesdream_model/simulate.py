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
    mu_median: float = 5.0,
    phi_median: float = 5.0,
    sf_sd: float = 0.3,
    seed: int = 0,
) -> SimulatedScreen:
    """Draw a screen whose groups shift every feature by a known log2 factor.

    `mu_median` is the median baseline mean per unit size factor (log-normal, sd 1 on
    the log scale): 5 gives ~10 % zeros, 0.08 ~89 % zeros as in droplet data.
    `phi_median`: the median dispersion (log-normal, sd 0.5; smaller is more overdispersed);
    `sf_sd`: the sd of the log size factors.
    """
    rng = np.random.default_rng(seed)
    groups = np.sort(rng.integers(0, n_groups, size=n_cells))
    groups[:n_groups] = np.arange(n_groups)  # every group present
    rng.shuffle(groups)
    sum_factor = rng.lognormal(0.0, sf_sd, size=n_cells)
    mu = rng.lognormal(np.log(mu_median), 1.0, size=n_features)
    phi = rng.lognormal(np.log(phi_median), 0.5, size=n_features)
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


@dataclass(frozen=True)
class SimulatedModality:
    """Data of any family drawn with known group effects; arrays are features x cells (x K)."""

    y: np.ndarray  # [T, N] (multinomial [T, N, K]); NaN = missing for continuous data
    groups: np.ndarray  # [N]
    effects: np.ndarray  # [C, T] (multinomial [C, T, K], centred), row 0 = 0
    baseline: np.ndarray  # [T] (multinomial [T, K]): mu_ntc / baseline probabilities
    denominator: np.ndarray | None = None  # [T, N] (binomial)


def _groups(rng: np.random.Generator, n_cells: int, n_groups: int) -> np.ndarray:
    groups = rng.integers(0, n_groups, size=n_cells)
    groups[:n_groups] = np.arange(n_groups)
    return groups


def simulate_binomial(
    *, n_cells: int, n_features: int, n_groups: int, effect_sd: float = 0.5, seed: int = 0
) -> SimulatedModality:
    """y ~ Binomial(n, sigmoid(logit(mu) + effect[g])), n ~ Poisson(20) (some 0)."""
    rng = np.random.default_rng(seed)
    groups = _groups(rng, n_cells, n_groups)
    mu = rng.uniform(0.1, 0.9, size=n_features)
    effects = rng.normal(0.0, effect_sd, size=(n_groups, n_features))
    effects[0] = 0.0
    logit = np.log(mu / (1 - mu))[:, None] + effects[groups].T
    denominator = rng.poisson(20.0, size=(n_features, n_cells))
    y = rng.binomial(denominator, 1 / (1 + np.exp(-logit)))
    return SimulatedModality(y, groups, effects, mu, denominator)


def simulate_continuous(
    *,
    n_cells: int,
    n_features: int,
    n_groups: int,
    student_df: float | None = None,
    missing: float = 0.1,
    seed: int = 0,
) -> SimulatedModality:
    """y = mu + effect[g] + sigma * noise (Normal, or Student-t with `student_df`); NaN missing."""
    rng = np.random.default_rng(seed)
    groups = _groups(rng, n_cells, n_groups)
    mu = rng.normal(0.0, 2.0, size=n_features)
    sigma = rng.uniform(0.5, 2.0, size=n_features)
    effects = rng.normal(0.0, 0.5, size=(n_groups, n_features))
    effects[0] = 0.0
    shape = (n_features, n_cells)
    noise = rng.standard_normal(shape) if student_df is None else rng.standard_t(student_df, shape)
    y = mu[:, None] + effects[groups].T + sigma[:, None] * noise
    y[rng.random(shape) < missing] = np.nan
    return SimulatedModality(y, groups, effects, mu)


def simulate_multinomial(
    *, n_cells: int, n_features: int, n_groups: int, n_categories: int = 4, seed: int = 0
) -> SimulatedModality:
    """y ~ Multinomial(total ~ Poisson(30), softmax(log p0 + effect[g])), effects centred."""
    rng = np.random.default_rng(seed)
    groups = _groups(rng, n_cells, n_groups)
    p0 = rng.dirichlet(np.full(n_categories, 3.0), size=n_features)  # [T, K]
    effects = rng.normal(0.0, 0.4, size=(n_groups, n_features, n_categories))
    effects -= effects.mean(axis=-1, keepdims=True)
    effects[0] = 0.0
    logits = np.log(p0)[None] + effects  # [C, T, K]
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    totals = rng.poisson(30.0, size=n_cells)
    y = np.zeros((n_features, n_cells, n_categories), dtype=np.int64)
    for n in range(n_cells):
        y[:, n] = np.stack(
            [rng.multinomial(totals[n], probs[groups[n], t]) for t in range(n_features)]
        )
    return SimulatedModality(y, groups, effects, p0)
