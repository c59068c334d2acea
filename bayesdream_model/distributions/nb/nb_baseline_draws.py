"""Exact posterior draws of the baseline mean of negbinom features with few baseline counts.

Where a feature has few or no counts in the baseline group, the posterior of its baseline
mean u = log mu_ntc is far from normal: the counts bound it from above only, the prior
(learned across features, `baseline_prior`) shapes everything below, and where the screen
holds genes that are off in the baseline the prior has two modes, so the posterior can
too. A normal guide (a Laplace start at one mode) cannot say that; its 90 % intervals
covered ~0.4 of such genes' true effects. Those features' other latents are pinned by the
other groups' counts, and the baseline enters them only through the (wide) effect prior,
so given them u has a one-dimensional posterior that is computed exactly here, on a grid:

    log p(u | rest) = log p_mu(e^u) + u + Σ_{g≥1} log StudentT((θ_g - u) / ln 2)
                      + log L_0(e^u, phi),

θ_g = u + ln2 · log2_alpha[g] the group's log mean (held at the guide's posterior mean,
as phi = 1 / o_y²), L_0 the baseline cells' NB likelihood (exact: the fit's tabulated
Σ_n log1p(sf_n x) and Σ_n y log1p(sf_n x) of the baseline group). Each posterior draw
then takes its u from this density (inverse CDF, linear within grid cells) and keeps its
group means: log2_alpha[g] = (θ_g - u) / ln 2 with the draw's own θ_g.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pyro.distributions as dist
import torch

from bayesdream_model.constants import LOG_EPS
from bayesdream_model.distributions.nb.log1p_table import evaluate
from bayesdream_model.sparse import SparseCounts

#: a feature with no baseline count is "silent" there when the other groups' rate predicts
#: at least this many baseline counts (P(0) < 5 % under equal expression)
SILENT_EXPECTED = 3.0
#: features with fewer baseline counts than this get the exact draws
FEW_COUNTS = 20
GRID_POINTS = 512  # 0.076 apart (0.11 log2 units): a 90 % interval spans dozens
#: the grid spans the guide's mean of u - BELOW to + ABOVE (natural log): 2^-43 to 2^13
BELOW, ABOVE = 30.0, 9.0
LN2 = math.log(2.0)


#: the likelihood statistics that hold the baseline cells' non-zero entries of the features
#: with few baseline counts (a batch's are joined to another's by concatenation)
ENTRY_KEYS = ("base_entry_feature", "base_entry_value", "base_entry_sf")


def baseline_entries(
    y: SparseCounts, groups: np.ndarray, sum_factor: np.ndarray, base_totals: np.ndarray
) -> dict[str, np.ndarray]:
    """The baseline cells' non-zero entries (feature, count, size factor) of the features
    whose baseline total (`base_totals` [T]) is below FEW_COUNTS: fewer than FEW_COUNTS
    each. A feature below it over all cells is below it in every batch of them, so
    batches' entries join whole."""
    few = np.flatnonzero(np.asarray(base_totals) < FEW_COUNTS)
    lengths = y.indptr[few + 1] - y.indptr[few]
    # the entries of those features only: a few of the fit's, not a pass over all
    starts = np.repeat(y.indptr[few] - np.cumsum(lengths) + lengths, lengths)
    entries = starts + np.arange(lengths.sum())
    column, rows = np.repeat(few, lengths), y.rows[entries]
    keep = groups[rows] == 0
    return {
        "base_entry_feature": column[keep],
        "base_entry_value": y.values[entries[keep]].astype(np.float64),
        "base_entry_sf": np.asarray(sum_factor, np.float64)[rows[keep]],
    }


def joined_entries(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    """The baseline entries of two disjoint sets of cells' statistics, joined, of the
    features still below FEW_COUNTS over both (a batch records a feature below it in that
    batch alone; kept unpruned, a streamed fit's lists would grow with its batches)."""
    totals = a["group_totals"][0] + b["group_totals"][0]
    joined = {k: torch.cat([a[k], b[k]]) for k in ENTRY_KEYS}
    keep = totals[joined["base_entry_feature"]] < FEW_COUNTS
    return {k: v[keep] for k, v in joined.items()}


def few_count_features(stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """Indices of the features whose baseline total is below FEW_COUNTS [F]."""
    return torch.nonzero(stats["group_totals"][0] < FEW_COUNTS).flatten()


def baseline_log_likelihood(
    u: torch.Tensor, phi: torch.Tensor, stats: dict[str, torch.Tensor], features: torch.Tensor
) -> torch.Tensor:
    """log L_0 of the baseline cells at mu_ntc = e^u, up to terms free of u.

    u [G, F], phi [F], `features` [F] their indices in the fit: -phi F_0(x) - Σ y log1p(sf x)
    + Y_0t u with x = e^u / (phi + 2ε) (as `nb_log_likelihood` splits it); the second sum
    over the feature's few non-zero baseline entries."""
    phi = phi.double()
    x = torch.exp(u.double()) / (phi + 2 * LOG_EPS)  # [G, F]
    baseline = {"sf_grid": stats["sf_grid"], "sf_coef": stats["sf_coef"][:1]}
    baseline["sf_moments"] = stats["sf_moments"][:1]
    table = evaluate(x.reshape(1, -1), baseline)[0].reshape(x.shape)
    position = torch.full_like(stats["group_totals"][0], -1, dtype=torch.int64)
    position[features] = torch.arange(features.numel(), device=features.device)
    column = position[stats["base_entry_feature"]]
    chosen = column >= 0
    column, value = column[chosen], stats["base_entry_value"][chosen]
    terms = value * torch.log1p(stats["base_entry_sf"][chosen] * x[:, column])  # [G, P]
    weighted = torch.zeros_like(x).index_add_(1, column, terms)
    totals = stats["group_totals"][0, features]
    return -phi * table - weighted + totals * u.double()


def conditional_grid(
    prior: torch.distributions.Distribution,
    effect_prior: torch.distributions.Distribution,
    means: dict[str, torch.Tensor],
    stats: dict[str, torch.Tensor],
    features: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The grid of each feature in `features`: its first point and step [F], and the CDF
    [F, G] of p(u | rest) there. `prior` is mu_ntc's prior restricted to those features
    (batch [F]); `means` the guide's posterior means of u, theta [C-1, F] and phi [F]."""
    u_hat = means["u"].double()
    start, step = u_hat - BELOW, torch.full_like(u_hat, (BELOW + ABOVE) / (GRID_POINTS - 1))
    steps = torch.arange(GRID_POINTS, dtype=torch.float64, device=u_hat.device)
    u = start[None, :] + steps[:, None] * step[None, :]  # [G, F]
    log_p = prior.log_prob(torch.exp(u).to(means["u"].dtype)).double() + u
    for theta in means["theta"].double():  # each non-baseline group
        log_p = log_p + effect_prior.log_prob(((theta - u) / LN2).to(means["u"].dtype)).double()
    log_p = log_p + baseline_log_likelihood(u, means["phi"], stats, features)
    log_p = torch.nan_to_num(log_p, nan=-math.inf)
    density = torch.exp(log_p - log_p.amax(0, keepdim=True)).T  # [F, G]
    # trapezoid masses of the cells between grid points, as a CDF over the points
    cells = 0.5 * (density[:, 1:] + density[:, :-1])
    cdf = torch.cat([torch.zeros_like(cells[:, :1]), cells.cumsum(-1)], dim=-1)
    return {"start": start, "step": step, "cdf": cdf / cdf[:, -1:]}


def draw_u(grid: dict[str, torch.Tensor], n_draws: int) -> torch.Tensor:
    """[S, F] draws of u from each feature's grid CDF (linear within a cell)."""
    cdf = grid["cdf"].double()  # [F, G]
    uniform = torch.rand(cdf.shape[0], n_draws, dtype=cdf.dtype, device=cdf.device)
    right = torch.searchsorted(cdf, uniform).clamp(1, cdf.shape[1] - 1)
    lo, hi = cdf.gather(1, right - 1), cdf.gather(1, right)
    within = ((uniform - lo) / (hi - lo).clamp_min(1e-300)).clamp(0.0, 1.0)
    u = grid["start"].double()[:, None] + (right - 1 + within) * grid["step"].double()[:, None]
    return u.T


def baseline_refinement(
    prior_of: Callable[[torch.Tensor], dist.Distribution],
    effect_prior: dist.Distribution,
    stats: dict[str, torch.Tensor],
    locs: dict[str, torch.Tensor],
    effect_site: str,
) -> dict[str, torch.Tensor]:
    """The grids of the features with few baseline counts ({} when none): `prior_of`
    gives mu_ntc's prior of the features it is handed (indices), `locs` the guide's
    posterior means by site (unconstrained: log mu_ntc, log o_y, the log2 effects)."""
    features = few_count_features(stats)
    if features.numel() == 0:
        return {}
    u = locs["mu_ntc"][features].double()
    means = {
        "u": u,
        "theta": u + LN2 * locs[effect_site][:, features].double(),
        "phi": torch.exp(-2.0 * locs["o_y"][features].double()),
    }
    grid = conditional_grid(prior_of(features), effect_prior, means, stats, features)
    return {"features": features, **grid, "cdf": grid["cdf"].float()}


def baseline_flags(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`baseline_no_counts` [T]: no count in the baseline group, some in another (the data
    bound the feature's effects from one side only); `baseline_silent`: those of them whose
    other groups' rate predicts at least SILENT_EXPECTED baseline counts (not a low gene's
    chance zeros: a gene off in the baseline group)."""
    totals = stats["group_totals"]
    exposure = stats["sf_moments"][:, 2]  # Σ sf per group [C]
    none = (totals[0] == 0) & (totals[1:].sum(0) > 0)
    expected = totals[1:].sum(0) / exposure[1:].sum().clamp_min(1e-300) * exposure[0]
    return {"baseline_no_counts": none, "baseline_silent": none & (expected >= SILENT_EXPECTED)}


def refined_draws(
    draws: dict[str, torch.Tensor], refinement: dict[str, torch.Tensor], effect_site: str
) -> dict[str, torch.Tensor]:
    """Each draw's log mu_ntc of the refined features from their grid, its group means kept:
    the log2 effects move by the opposite amount (in log2)."""
    features = refinement["features"].long()
    mu = draws["mu_ntc"]
    old = torch.log(mu[:, features].double())
    new = draw_u(refinement, mu.shape[0]).to(old.device)
    refined = dict(draws)
    refined["mu_ntc"] = mu.index_copy(1, features, torch.exp(new).to(mu.dtype))
    effect = draws[effect_site]
    shift = ((old - new) / LN2).to(effect.dtype)[:, None, :]
    refined[effect_site] = effect.index_copy(2, features, effect[:, :, features] + shift)
    return refined
