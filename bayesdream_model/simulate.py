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
    shift_scale: float | None = None,
    group_fractions: tuple[float, ...] | None = None,
    seed: int = 0,
) -> SimulatedModality:
    """y = mu + effect[g] + sigma * noise (Normal, or Student-t with `student_df`); NaN missing.

    Effects are N(0, 0.5²), or with `shift_scale` N(0, (shift_scale · sigma_t)²): shifts
    between groups of the size of each feature's own spread. `group_fractions`: groups
    drawn with these shares (default: uniform)."""
    rng = np.random.default_rng(seed)
    if group_fractions is None:
        groups = _groups(rng, n_cells, n_groups)
    else:
        shares = np.asarray(group_fractions, dtype=np.float64)
        groups = rng.choice(n_groups, size=n_cells, p=shares / shares.sum())
        groups[:n_groups] = np.arange(n_groups)
    mu = rng.normal(0.0, 2.0, size=n_features)
    sigma = rng.uniform(0.5, 2.0, size=n_features)
    effects = rng.normal(0.0, 0.5, size=(n_groups, n_features))
    if shift_scale is not None:
        effects = effects / 0.5 * shift_scale * sigma[None, :]
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


#: effect classes of `RealScreen.effect_class` (per group and feature, against the baseline)
SMALL, LARGE, SILENT = 0, 1, 2
EFFECT_CLASSES = ("small", "large", "silent")


@dataclass(frozen=True)
class RealScreenShape:
    """How a screen shaped like real droplet data is drawn (`simulate_real_screen`).

    Defaults follow a Perturb-seq screen of several cell lines: unbalanced groups, size
    factors with the spread of a real cell table (log-sd ~0.5) and a depth that differs
    by group, gene means over four decades (~18 % of entries non-zero), dispersions spread
    too, and group effects that mix small shifts, large ones and genes that are off in
    one group (cell-line-specific genes).
    """

    n_cells: int = 30_000
    n_features: int = 5_000
    group_fractions: tuple[float, ...] = (0.6, 0.3, 0.1)
    ntc_fraction: float = 0.15
    sf_log_sd: float = 0.5  # natural-log sd of the size factors within a group
    group_depth_log2: tuple[float, ...] = (0.0, -0.4, 0.3)  # each group's depth shift
    log10_mean_range: tuple[float, float] = (-3.45, 0.55)  # baseline means per unit sf
    phi_median: float = 3.0  # NB total_count; log-normal, sd 1 (natural log)
    phi_log_sd: float = 1.0
    small_sd: float = 0.25  # log2 effects of the small class
    large_sd: float = 1.5  # ... and of the large class
    large_fraction: float = 0.15  # of (group, gene) pairs
    silent_fraction: float = 0.05  # of genes, off in `silent_group`
    silent_log2: tuple[float, float] = (-10.0, -6.0)  # their log2 effect there
    silent_group: int = 2  # the group (by index in group_fractions) they are off in
    seed: int = 0


@dataclass(frozen=True)
class RealScreen:
    """A screen drawn by `simulate_real_screen`; arrays are features x cells.

    `group_effects` are each group's own log2 shifts (no baseline yet): the true effects
    against baseline group b are `group_effects - group_effects[b]` (`effects_against`).
    """

    counts: np.ndarray  # [T, N] int32
    groups: np.ndarray  # [N] group index into group_fractions
    is_ntc: np.ndarray  # [N] bool
    sum_factor: np.ndarray  # [N]
    mu: np.ndarray  # [T] mean per unit size factor before group effects
    phi: np.ndarray  # [T]
    group_effects: np.ndarray  # [C, T] log2
    large: np.ndarray  # [C, T] bool: the pair's effect is of the large class
    silent: np.ndarray  # [T] bool: off in the silent group
    feature_names: np.ndarray  # [T]
    cell_ids: np.ndarray  # [N]

    def effects_against(self, baseline: int) -> np.ndarray:
        """True log2 effects [C, T] with `baseline` as the reference (its row 0)."""
        return self.group_effects - self.group_effects[baseline]

    def effect_class(self, baseline: int) -> np.ndarray:
        """SMALL / LARGE / SILENT per (group, feature) against `baseline` [C, T]."""
        large = self.large | self.large[baseline]
        out = np.where(large, LARGE, SMALL)
        return np.where(self.silent[None, :], SILENT, out)


def simulate_real_screen(shape: RealScreenShape = RealScreenShape()) -> RealScreen:
    """Draw a screen shaped like real droplet data (see `RealScreenShape`): NB counts
    with mean mu[t] * 2**group_effects[g, t] * sf[n], dispersion phi[t]."""
    s = shape
    rng = np.random.default_rng(s.seed)
    n_groups = len(s.group_fractions)
    fractions = np.asarray(s.group_fractions, dtype=np.float64)
    groups = rng.choice(n_groups, size=s.n_cells, p=fractions / fractions.sum())
    groups[:n_groups] = np.arange(n_groups)
    is_ntc = rng.random(s.n_cells) < s.ntc_fraction
    is_ntc[: 2 * n_groups] = True  # every group has NTC cells
    depth = np.exp2(np.asarray(s.group_depth_log2, dtype=np.float64))[groups]
    sum_factor = depth * rng.lognormal(0.0, s.sf_log_sd, size=s.n_cells)
    mu = 10.0 ** rng.uniform(*s.log10_mean_range, size=s.n_features)
    phi = rng.lognormal(np.log(s.phi_median), s.phi_log_sd, size=s.n_features)
    large = rng.random((n_groups, s.n_features)) < s.large_fraction
    effects = np.where(
        large,
        rng.normal(0.0, s.large_sd, size=large.shape),
        rng.normal(0.0, s.small_sd, size=large.shape),
    )
    silent = rng.random(s.n_features) < s.silent_fraction
    effects[s.silent_group, silent] = rng.uniform(*s.silent_log2, size=int(silent.sum()))
    counts = np.empty((s.n_features, s.n_cells), dtype=np.int32)
    for start in range(0, s.n_features, 256):  # [256, N] at a time: memory stays small
        rows = slice(start, start + 256)
        mean = mu[rows, None] * np.exp2(effects[:, rows].T[:, groups]) * sum_factor[None, :]
        rate = rng.gamma(shape=phi[rows, None], scale=mean / phi[rows, None])
        counts[rows] = rng.poisson(rate)
    return RealScreen(
        counts=counts,
        groups=groups,
        is_ntc=is_ntc,
        sum_factor=sum_factor,
        mu=mu,
        phi=phi,
        group_effects=effects,
        large=large,
        silent=silent,
        feature_names=np.array([f"gene{t:05d}" for t in range(s.n_features)]),
        cell_ids=np.array([f"cell{n:06d}" for n in range(s.n_cells)]),
    )
