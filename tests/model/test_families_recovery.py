"""Recovery of known group effects for binomial, normal, Student-t and multinomial data.

(negbinom: tests/model/test_recovery.py.) Each screen is drawn by `bayesdream_model.simulate`
with 3 groups and known effects, fit with `fit_technical` (guide 'auto': a full covariance
per feature; `fit.guide: mean_field` for multinomial is the reference's point-mass baseline), and drawn
with `posterior_batches`. The bounds come from the sampling noise of the simulated data,
computed from the simulation's own parameters and group sizes (nothing tuned per seed).

Standard error of an effect (group g vs the baseline group 0): se = sqrt(v_g + v_0), with
v_g the variance of group g's empirical estimate:
- binomial: the logit of a group's pooled proportion over N_g = Σ n trials,
  v_g = 1 / (N_g p_g (1 - p_g)) (delta method; N_g ~ 10^4 here, se ~ 0.03).
- normal: v_g = σ² / n_g over the n_g finite values of the group (se ~ 0.09).
- Student-t(3): the efficient location estimator, v_g = σ² (ν + 3) / ((ν + 1) n_g)
  = 1.5 σ² / n_g (the Fisher information of a t location), which the posterior approaches.
- multinomial: effects are centred log-probabilities c_k = log p_k - mean_j log p_j; over
  M_g counts Cov(log p̂) = (diag(1/p) - 1 1ᵀ) / M_g, so with the centring H = I - 1 1ᵀ / K,
  v_g = (H diag(1/p) H)_kk / M_g = [(1 - 2/K) / p_k + Σ_j (1/p_j) / K²] / M_g.

Checks (on k = (C-1) T effects; multinomial (C-1) T K, (C-1) T (K-1) of them free):
- RMSE <= 1.5 rms(se): if the fit is as good as the empirical estimator, RMSE² / ms(se) is
  ~ χ²_k / k, and P(χ²_k / k > 2.25) < 1e-4 even at k = 40 (the effects of one feature
  share its baseline, so fewer than k are independent); 1.5 also absorbs the delta-method
  error and the prior's shrinkage (below). Observed: RMSE / rms(se) 0.75-1.2.
- correlation >= sqrt(var(truth) / (var(truth) + (1.5 rms se)²)): what an estimator at the
  RMSE bound reaches on these effects (0.92-0.995 here).
- 90 % central intervals (5-95 % quantiles of the draws): coverage within E ± 4 sd with
  sd = sqrt(E (1 - E) / T): the T = 40 features are the independent units (the effects of
  a feature are correlated through its baseline), so ±0.19-0.23, capped at 1. E is the
  coverage the model and guide should reach, not a flat 0.9:
  * full covariance per feature: the posterior under the reference's effect prior StudentT(3, 0, s).
    For binomial s = 20 and E = 0.90. For normal / Student-t the model sets s to the baseline
    mean's prior sd (~0.1-0.15 here, against effects of sd 0.5), which shrinks the effects
    (posterior-mean slope ~0.95 normal, ~0.92 Student-t, unchanged with 3x the steps), so
    E = the frequentist coverage of the exact 1-D posterior N(x; δ, se²) t3(δ; 0, s) at
    x ~ N(δ_true, se²), computed by quadrature: 0.85-0.87.
  * multinomial, full covariance: the reference's baseline prior Dirichlet(baseline counts + 1)
    counts the baseline cells twice (prior and likelihood), so the exact posterior gives
    the baseline half its sampling variance: a centred effect has posterior variance
    v_g + v_0 / 2 against the error variance v_g + v_0 of its (empirical) posterior mean,
    E = mean 2 Φ(1.645 r) - 1 with r = sqrt((v_g + v_0 / 2) / (v_g + v_0)), ~0.85 (r ~ 0.87).
  * multinomial, the reference's guide: a point mass on the Dirichlet baseline and a mean-field
    normal on the raw effects, cannot carry the baseline's uncertainty into the effects,
    and mean-field on the raw logits gives each raw a_k the variance 1 / (M_g p_k (1-p_k))
    (the inverse diagonal of the likelihood's Hessian M_g (diag p - p pᵀ)), so a centred
    effect has guide variance w_g = Σ_j H_kj² / (M_g p_j (1 - p_j)) against the true error
    variance v_g + v_0: E = mean 2 Φ(1.645 r) - 1 with r = sqrt(w_g / (v_g + v_0)), ~0.82
    (r ~ 0.82 at 4 near-equal categories): the reference guide under-covers by design.
- posterior spread: median posterior sd / se within a factor 1.5 of the guide's expected
  ratio (1 for the full covariance, median r for multinomial). The medians are over >= 80
  effects of 300 draws each (~4 % noise per sd); the factor allows for the continuous
  prior's narrowing of small effects (observed ratio ~0.93). A posterior collapsed onto
  its mean, or left at its initial scale 0.1, fails.

Sampling never evaluates the likelihood (docs/model.md "Posterior sampling"): for every family
`observe` is replaced by a function that raises while drawing, and every draw is finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import pytest
from scipy.stats import norm
from scipy.stats import t as t_dist

from bayesdream_model.data import FitArrays
from bayesdream_model.distributions import get_family
from bayesdream_model.fit import FitOptions, FittedModel, fit_technical
from bayesdream_model.memory import SamplingPlan
from bayesdream_model.posterior import posterior_batches
from bayesdream_model.simulate import (
    SimulatedModality,
    simulate_binomial,
    simulate_continuous,
    simulate_multinomial,
    simulate_negbinom_screen,
)

RMSE_FACTOR = 1.5
SPREAD_FACTOR = 1.5
COVERAGE_SDS = 4.0
NSAMPLES = 300
STUDENT_DF = 3.0  # docs/model.md: Student-t likelihood df, and the effect prior's df
Z90 = norm.ppf(0.95)
FAMILIES = ("binomial", "normal", "studentt", "multinomial")


@dataclass(frozen=True)
class Case:
    """A simulated screen's size and the fit settings that recover it."""

    n_cells: int = 1500
    n_features: int = 40
    n_groups: int = 3
    niters: int | None = 1000  # None: the default cap
    lr: float = 0.01
    seed: int = 0
    init: str = "prior"


# niters / lr: from the initial values (init: prior) the full-covariance guide is stable at
# lr 0.01 (one-cycle peak 0.1) on these likelihoods and has converged within the steps (3x
# the steps changes nothing); ~2-5 s a fit on one core. `DEFAULT`: the package defaults
# (the Laplace start, lr 1e-3, the iteration cap and the plateau rule).
CASES = {
    "binomial": Case(niters=800),
    "normal": Case(niters=800),
    "studentt": Case(niters=1000),
    "multinomial": Case(niters=1000),
}
DEFAULT = Case(niters=None, lr=1e-3, init="laplace")
#: the reference's schedule cannot stop before 2,000 steps (4 windows of 250 and an
#: anneal of 1,000); after a Laplace start the plateau rule stops from 500 on
LAPLACE_MAX_STEPS = 1000


def simulate(name: str, case: Case) -> SimulatedModality:
    size = {"n_cells": case.n_cells, "n_features": case.n_features, "n_groups": case.n_groups}
    if name == "binomial":
        return simulate_binomial(**size, seed=case.seed)
    if name == "multinomial":
        return simulate_multinomial(**size, seed=case.seed)
    df = STUDENT_DF if name == "studentt" else None
    return simulate_continuous(**size, student_df=df, seed=case.seed)


def fit_arrays(sim: SimulatedModality, n_groups: int) -> FitArrays:
    """Features x cells (x K) -> cells x features (x K)."""
    y = np.moveaxis(sim.y, 0, 1).astype(np.float64)
    den = None if sim.denominator is None else sim.denominator.T.astype(np.float64)
    return FitArrays(y=y, groups=sim.groups, n_groups=n_groups, denominator=den)


# -- sampling noise of the simulated data --------------------------------------------------
def _per_group(x: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Sum over each group's cells of x [T, N, ...] -> [C, T, ...]."""
    return np.stack([x[:, groups == g].sum(axis=1) for g in range(n_groups)])


def group_probs(sim: SimulatedModality) -> np.ndarray:
    """Multinomial category probabilities of every group [C, T, K]."""
    logits = np.log(sim.baseline)[None] + sim.effects
    return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)


def group_variances(name: str, sim: SimulatedModality, n_groups: int) -> np.ndarray:
    """v_g, the variance of group g's empirical estimate: [C, T] (multinomial [C, T, K])."""
    if name == "binomial":
        trials = _per_group(sim.denominator, sim.groups, n_groups)
        logit = np.log(sim.baseline / (1 - sim.baseline))[None] + sim.effects
        p = 1 / (1 + np.exp(-logit))
        return 1.0 / (trials * p * (1 - p))
    if name == "multinomial":
        counts = _per_group(sim.y.sum(axis=-1), sim.groups, n_groups)  # M_g [C, T]
        inv, k = 1.0 / group_probs(sim), sim.y.shape[-1]
        return ((1 - 2 / k) * inv + inv.sum(-1, keepdims=True) / k**2) / counts[..., None]
    n_finite = _per_group(np.isfinite(sim.y), sim.groups, n_groups)
    efficiency = (STUDENT_DF + 3) / (STUDENT_DF + 1) if name == "studentt" else 1.0
    return efficiency * noise_scale(name, sim)[None] ** 2 / n_finite


def noise_scale(name: str, sim: SimulatedModality) -> np.ndarray:
    """The simulation's noise scale sigma [T], from its noise y - mu - effect[g].

    SimulatedModality does not carry sigma; the noise itself is known exactly (the truth
    is), so sigma = median |noise| / the noise law's median |.| (Normal, or t with 3 df),
    within ~3 % at ~1350 finite values per feature.
    """
    noise = sim.y - sim.baseline[:, None] - sim.effects[sim.groups].T  # [T, N]
    law_mad = t_dist.ppf(0.75, STUDENT_DF) if name == "studentt" else norm.ppf(0.75)
    return np.nanmedian(np.abs(noise), axis=1) / law_mad


def multinomial_guide_variances(sim: SimulatedModality, n_groups: int) -> np.ndarray:
    """w_g: a centred effect's variance under the mean-field guide on raw logits [C, T, K]."""
    p = group_probs(sim)
    counts = _per_group(sim.y.sum(axis=-1), sim.groups, n_groups)[..., None]
    raw_var = 1.0 / (counts * p * (1 - p))  # [C, T, K]
    k = p.shape[-1]
    centring = np.eye(k) - 1.0 / k
    return np.einsum("kj,ctj->ctk", centring**2, raw_var)


def prior_coverage(truth: np.ndarray, se: np.ndarray, scale: np.ndarray) -> float:
    """Mean frequentist coverage of the 90 % posterior interval of δ under a t3(0, scale) prior.

    For each effect: estimates x on a grid of ±7 se around the truth, the exact 1-D
    posterior N(x; δ, se²) t3(δ; 0, scale) on a fine δ grid, its 5 % / 95 % quantiles
    lo(x), hi(x) (increasing in x), and P(lo(x) <= δ_true <= hi(x)) = Φ at the x where
    hi crosses δ_true to the x where lo does.
    """
    truth, se, scale = (a.ravel() for a in np.broadcast_arrays(truth, se, scale))
    coverage = np.empty(truth.size)
    for i, (delta, s, tau) in enumerate(zip(truth, se, scale, strict=True)):
        x = delta + s * np.linspace(-7, 7, 281)
        grid = np.linspace(min(x[0], 0.0) - 6 * s, max(x[-1], 0.0) + 6 * s, 1601)
        log_lik = -0.5 * ((x[:, None] - grid) / s) ** 2  # [x, δ]
        log_post = t_dist.logpdf(grid / tau, STUDENT_DF)[None] + log_lik
        cdf = np.cumsum(np.exp(log_post - log_post.max(axis=1, keepdims=True)), axis=1)
        cdf /= cdf[:, -1:]
        lo = grid[np.argmax(cdf >= 0.05, axis=1)]
        hi = grid[np.argmax(cdf >= 0.95, axis=1)]
        x_hi, x_lo = np.interp(delta, hi, x), np.interp(delta, lo, x)
        coverage[i] = norm.cdf((x_lo - delta) / s) - norm.cdf((x_hi - delta) / s)
    return float(coverage.mean())


@dataclass(frozen=True)
class Expected:
    """What a fit of this screen should reach (module docstring)."""

    se: np.ndarray  # [C-1, T(, K)]
    coverage: float
    spread: float  # median posterior sd / se


def expected(name: str, sim: SimulatedModality, fitted: FittedModel) -> Expected:
    n_groups = fitted.model.n_groups
    v = group_variances(name, sim, n_groups)
    se = np.sqrt(v[1:] + v[:1])
    if fitted.guide_kind == "point_baseline":
        ratio = np.sqrt(multinomial_guide_variances(sim, n_groups)[1:]) / se
        return Expected(se, float(np.mean(2 * norm.cdf(Z90 * ratio) - 1)), float(np.median(ratio)))
    if name == "multinomial":  # the baseline's prior counts its cells again
        ratio = np.sqrt((v[1:] + v[:1] / 2) / (v[1:] + v[:1]))
        return Expected(se, float(np.mean(2 * norm.cdf(Z90 * ratio) - 1)), float(np.median(ratio)))
    if name == "binomial":
        scale = np.asarray(fitted.family.effect_scale)
    else:  # docs/model.md: continuous effects ~ StudentT(3, 0, s), s = the mu_ntc prior's sd
        scale = fitted.model.inputs["mu_sd"].cpu().numpy()[None]
    return Expected(se, prior_coverage(sim.effects[1:], se, scale), 1.0)


# -- fit, draw, check -----------------------------------------------------------------------
def assert_fit_learned(svi) -> None:
    """Finite losses; from the initial values the ELBO improved; from a Laplace start, which
    is already at the optimum, polishing left it no worse than 4 standard errors of the
    first and last 100 steps' mean losses."""
    losses = svi.losses
    assert np.isfinite(losses).all()
    if svi.start is None:
        assert losses[-50:].mean() < losses[:10].mean()
        return
    first, last = losses[:100], losses[-100:]
    noise = math.sqrt((first.var() + last.var()) / 100)
    assert last.mean() - first.mean() < 4 * noise, (first.mean(), last.mean(), noise)


def fit_and_draw(
    name: str, case: Case, guide: str = "auto"
) -> tuple[SimulatedModality, FittedModel, dict]:
    sim = simulate(name, case)
    data = fit_arrays(sim, case.n_groups)
    family = get_family(name)
    assert not family.flags(data).ntc_excluded_from_fit.any()  # the fit sees every feature
    options = FitOptions(
        niters=case.niters, lr=case.lr, seed=case.seed, guide=guide, init=case.init
    )
    fitted = fit_technical(family, data, options)
    assert_fit_learned(fitted.svi)
    plan = SamplingPlan(NSAMPLES, NSAMPLES, True, 0, "one batch")
    ((_, _, draws),) = posterior_batches(fitted, plan, seed=case.seed)
    return sim, fitted, draws


def check_recovery(name: str, sim: SimulatedModality, fitted: FittedModel, draws: dict) -> dict:
    want = expected(name, sim, fitted)
    truth = sim.effects[1:]
    effects = draws["alpha_y_add"][:, 1:]  # [S, C-1, T(, K)]
    est = effects.mean(axis=0)
    rms_se = float(np.sqrt(np.mean(want.se**2)))
    lo, hi = np.quantile(effects, [0.05, 0.95], axis=0)
    coverage = float(np.mean((truth >= lo) & (truth <= hi)))
    band = COVERAGE_SDS * math.sqrt(want.coverage * (1 - want.coverage) / truth.shape[1])
    summary = {
        "guide": fitted.guide_kind,
        "corr": float(np.corrcoef(est.ravel(), truth.ravel())[0, 1]),
        "corr_min": math.sqrt(truth.var() / (truth.var() + (RMSE_FACTOR * rms_se) ** 2)),
        "rmse": float(np.sqrt(np.mean((est - truth) ** 2))),
        "rmse_bound": RMSE_FACTOR * rms_se,
        "spread": float(np.median(effects.std(axis=0) / want.se)),
        "spread_expected": want.spread,
        "coverage": coverage,
        "coverage_band": (want.coverage - band, min(1.0, want.coverage + band)),
    }
    assert summary["corr"] >= summary["corr_min"], summary
    assert summary["rmse"] <= summary["rmse_bound"], summary
    assert 1 / SPREAD_FACTOR <= summary["spread"] / want.spread <= SPREAD_FACTOR, summary
    assert summary["coverage_band"][0] <= coverage <= summary["coverage_band"][1], summary
    np.testing.assert_array_equal(draws["alpha_y_add"][:, 0], 0.0)  # the baseline group
    for key, value in draws.items():
        assert np.isfinite(value).all(), key
    return summary


@pytest.mark.slow  # statistical tier: the initial values' path (the default, below, is fast)
@pytest.mark.parametrize("name", FAMILIES)
def test_recovers_known_effects(name: str) -> None:
    sim, fitted, draws = fit_and_draw(name, CASES[name])
    summary = check_recovery(name, sim, fitted, draws)
    assert summary["guide"] == "feature_mvn"


@pytest.mark.parametrize("name", FAMILIES)
def test_default_laplace_start_recovers_in_few_steps(name: str) -> None:
    """The defaults: every feature starts at its MAP and Laplace covariance, the same
    bounds hold, and the plateau rule stops within LAPLACE_MAX_STEPS."""
    sim, fitted, draws = fit_and_draw(name, DEFAULT)
    check_recovery(name, sim, fitted, draws)
    assert fitted.svi.start["features_kept_start"] == 0
    assert fitted.svi.niters_run <= LAPLACE_MAX_STEPS, fitted.svi.stop_reason
    assert fitted.svi.stop_reason.startswith("converged"), fitted.svi.stop_reason


@pytest.mark.slow  # statistical tier: the reference's guide, not the default
def test_multinomial_spec_guide_recovers_known_effects() -> None:
    """`fit.guide: mean_field` keeps the reference's multinomial guide, a point-mass baseline."""
    case = CASES["multinomial"]
    sim, fitted, draws = fit_and_draw("multinomial", case, guide="mean_field")
    summary = check_recovery("multinomial", sim, fitted, draws)
    assert summary["guide"] == "point_baseline"


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("name", FAMILIES)
def test_recovery_other_seeds(name: str, seed: int) -> None:
    sim, fitted, draws = fit_and_draw(name, replace(CASES[name], seed=seed))
    check_recovery(name, sim, fitted, draws)


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_recovery_more_features_and_groups(name: str) -> None:
    """2000 cells, 60 features, 4 groups."""
    case = Case(n_cells=2000, n_features=60, n_groups=4, niters=1500, lr=0.01, seed=7)
    sim, fitted, draws = fit_and_draw(name, case)
    check_recovery(name, sim, fitted, draws)


# -- sampling never evaluates the likelihood ------------------------------------------------
def small_data(name: str) -> FitArrays:
    """300 cells, 10 features, 3 groups of any family."""
    if name == "negbinom":
        screen = simulate_negbinom_screen(n_cells=300, n_features=10, n_groups=3, seed=4)
        return FitArrays(
            y=screen.counts.T.astype(np.float64),
            groups=screen.groups,
            n_groups=3,
            sum_factor=screen.sum_factor,
        )
    return fit_arrays(simulate(name, Case(n_cells=300, n_features=10, seed=4)), 3)


@pytest.mark.parametrize("name", ("negbinom",) + FAMILIES)
def test_sampling_never_evaluates_the_likelihood(name: str, monkeypatch) -> None:
    family = get_family(name)
    fitted = fit_technical(family, small_data(name), FitOptions(niters=40, lr=0.01))

    def refuse(*args, **kwargs):
        raise AssertionError(f"{name}: the likelihood was evaluated while sampling")

    monkeypatch.setattr(family, "observe", refuse)
    plans = (SamplingPlan(60, 60, True, 0, "vectorised"), SamplingPlan(60, 25, False, 0, "loop"))
    for plan in plans:
        batches = list(posterior_batches(fitted, plan, seed=2))
        assert [(start, stop) for start, stop, _ in batches] == plan.batches()
        for _, _, out in batches:
            assert set(out) == {spec.name for spec in family.outputs()}
            for key, value in out.items():
                assert np.isfinite(value).all(), f"{name}: {key}"
