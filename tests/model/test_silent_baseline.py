"""Features silent in the baseline group: the learned baseline-mean prior, the exact draws
of their baseline mean, the flags, and recovery on a screen shaped like a cell-line panel.

A feature with no (or few) counts in the baseline group has effects that the data bound
from one side only; how far below the others its baseline lies is the prior's to say.
The default negbinom prior is learned from the screen (`baseline_prior`), and the draws of
such features' baseline means come from its exact conditional posterior on a grid
(`nb_baseline_draws`), since the guide's normal cannot hold a posterior bounded on one
side with two modes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bayesdream_model.data import FitArrays
from bayesdream_model.distributions import PriorOptions, get_family
from bayesdream_model.distributions.nb.baseline_prior import (
    CENTRES,
    SLAB_WEIGHT,
    WIDTH,
    fit_mixture,
    log_density_table,
    slab_log_density,
)
from bayesdream_model.distributions.nb.mixture_prior import BaselineMixture
from bayesdream_model.distributions.nb.nb_baseline_draws import (
    FEW_COUNTS,
    baseline_log_likelihood,
    draw_u,
    few_count_features,
)
from bayesdream_model.fit import FitOptions, fit_technical
from bayesdream_model.memory import SamplingPlan
from bayesdream_model.posterior import posterior_batches
from bayesdream_model.simulate import SILENT, RealScreenShape, simulate_real_screen
from bayesdream_model.sparse import as_sparse


def test_learned_prior_finds_the_share_of_genes_off_in_the_baseline() -> None:
    """2,000 features whose baseline mean is 2^r of the others' mean: r ~ N(0, 0.5) for 95 %
    and r = -8 for 5 % (100 features). Features with many baseline counts place r exactly,
    those with none only bound it, so g's mass below 2^-4 is the silent share up to the
    binomial noise of the draw (sd 0.005) and the ambiguity of the least expressed (~1 in
    10 of them can't tell -8 from the bulk's lower tail): within 0.035-0.065."""
    rng = np.random.default_rng(1)
    n = 2000
    reference = 10 ** rng.uniform(-2.0, 1.0, n)
    silent = rng.random(n) < 0.05
    r = np.where(silent, -8.0, rng.normal(0.0, 0.5, n))
    exposure = 500.0
    counts = rng.poisson(exposure * reference * 2.0**r)
    log_w = fit_mixture(counts, exposure, reference)
    below = float(np.exp(log_w[CENTRES <= -4.0]).sum())
    assert abs(below - silent.mean()) < 0.015, (below, silent.mean())
    assert math.isclose(float(np.exp(log_w).sum()), 1.0, rel_tol=1e-9)


def test_the_tabulated_prior_is_the_mixture() -> None:
    """log g from the table (inside it and beyond its ends) equals the mixture summed
    exactly, and so do its slopes (by autograd through the table's backward): cubic
    Hermite on nodes 0.02 apart errs by ~h^4 in value, ~h^3 in slope (observed 8e-8 and
    5e-6 per log2 unit, against slopes up to ~80)."""
    rng = np.random.default_rng(2)
    log_w = np.log(rng.dirichlet(np.ones(CENTRES.size)))
    table = torch.as_tensor(log_density_table(log_w))
    mixture = (torch.as_tensor(log_w), torch.as_tensor(CENTRES), torch.tensor(WIDTH))
    reference = torch.full((400,), 0.3, dtype=torch.float64)
    prior = BaselineMixture(reference, mixture, table)
    r = torch.linspace(-45.0, 33.0, 400, dtype=torch.float64)
    mu = (reference * torch.exp2(r)).requires_grad_(True)
    value = prior.log_prob(mu)
    (slope,) = torch.autograd.grad(value.sum(), mu)
    r_exact = r.clone().requires_grad_(True)
    z = (r_exact[:, None] - mixture[1][None]) / WIDTH
    log_g = torch.logsumexp(mixture[0][None] - 0.5 * z**2, -1) - math.log(
        WIDTH * math.sqrt(2 * math.pi)
    )
    log_g = torch.logaddexp(log_g + math.log1p(-SLAB_WEIGHT), slab_log_density(r_exact)[0])
    exact = log_g - torch.log(reference * torch.exp2(r_exact)) - math.log(math.log(2.0))
    (exact_slope,) = torch.autograd.grad(exact.sum(), r_exact)
    assert torch.allclose(value, exact.detach(), atol=3e-7, rtol=0)
    # d/dmu = d/dr / (mu ln 2)
    assert torch.allclose(slope * mu.detach() * math.log(2.0), exact_slope, atol=2e-5, rtol=0)


def test_a_diverged_draw_gives_a_non_finite_prior_not_an_error() -> None:
    """SVI's recovery needs a non-finite loss from a NaN parameter, not an IndexError."""
    log_w = np.full(CENTRES.size, -math.log(CENTRES.size))
    mixture = (torch.as_tensor(log_w), torch.as_tensor(CENTRES), torch.tensor(WIDTH))
    prior = BaselineMixture(torch.ones(3), mixture, torch.as_tensor(log_density_table(log_w)))
    value = prior.log_prob(torch.tensor([float("nan"), 1.0, 1e-30]))
    assert torch.isnan(value[0]) and torch.isfinite(value[1:]).all()


def _small_screen(silent_fraction: float, seed: int = 0):
    """NTC cells of a real-shaped screen with the small group (10 %) as the baseline."""
    shape = RealScreenShape(
        n_cells=2400,
        n_features=700,
        ntc_fraction=1.0,
        silent_fraction=silent_fraction,
        silent_group=2,
        seed=seed,
    )
    screen = simulate_real_screen(shape)
    order = np.array([2, 0, 1])  # the small group first: it is the baseline
    codes = np.argsort(order)[screen.groups]
    y = np.ascontiguousarray(screen.counts.T, dtype=np.float32)
    keep = (y.sum(0) > 0) & (y.std(0) > 0)
    data = FitArrays(y=y[:, keep], groups=codes, n_groups=3, sum_factor=screen.sum_factor)
    truth = screen.effects_against(2)[order][1:, keep]
    classes = screen.effect_class(2)[order][1:, keep]
    return data, truth, classes


def test_baseline_log_likelihood_is_the_dense_negative_binomial() -> None:
    """For the features with few baseline counts, log L_0(u) from the fit's statistics
    differs from the dense NB log-pmf of the baseline cells by a constant in u."""
    data, _, _ = _small_screen(0.1)
    family = get_family("negbinom")
    stats = family.tensors(data, "cpu").stats
    features = few_count_features(stats)
    assert 20 < features.numel() < data.n_features
    base = data.groups == 0
    y = torch.as_tensor(data.y[base][:, features.numpy()], dtype=torch.float64)  # [N0, F]
    assert bool((y.sum(0) < FEW_COUNTS).all())
    sf = torch.as_tensor(data.sum_factor[base], dtype=torch.float64)
    phi = torch.linspace(0.3, 30.0, features.numel(), dtype=torch.float64)
    u = torch.linspace(-14.0, 1.0, 16, dtype=torch.float64)[:, None].expand(-1, features.numel())
    ours = baseline_log_likelihood(u, phi, stats, features)  # [G, F]
    mean = torch.exp(u)[:, None, :] * sf[None, :, None]  # [G, N0, F]
    dense = (
        torch.distributions.NegativeBinomial(
            total_count=phi, logits=torch.log(mean) - torch.log(phi)
        )
        .log_prob(y[None])
        .sum(1)
    )
    # the tables hold ~1e-11 of their value, and the logits carry the model's 1e-8
    assert torch.allclose(ours - ours[:1], dense - dense[:1], atol=1e-5, rtol=1e-9)


def test_grid_draws_follow_the_grid_density() -> None:
    """A grid holding N(-3, 0.7) gives draws of that mean and sd (4,000 draws: the mean's
    sd is 0.011, the sd's 0.008)."""
    step = 0.02
    points = torch.arange(0, 800, dtype=torch.float64) * step - 10.0
    density = torch.exp(-0.5 * ((points + 3.0) / 0.7) ** 2)
    cells = 0.5 * (density[1:] + density[:-1])
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), cells.cumsum(0)])
    grid = {
        "start": torch.tensor([-10.0]),
        "step": torch.tensor([step]),
        "cdf": (cdf / cdf[-1])[None],
    }
    torch.manual_seed(0)
    u = draw_u(grid, 4000)[:, 0]
    assert abs(float(u.mean()) + 3.0) < 0.05
    assert abs(float(u.std()) - 0.7) < 0.04


def _fit(data: FitArrays, prior: str = "empirical"):
    family = get_family("negbinom").configured(PriorOptions(negbinom_baseline=prior))
    return fit_technical(family, data, FitOptions(seed=0))


def _draws(fitted) -> np.ndarray:
    plan = SamplingPlan(nsamples=800, batch_size=400, parallel=True, bytes_per_sample=0, reason="")
    parts = posterior_batches(fitted, plan, seed=0)
    return np.concatenate([r["alpha_y_add"][:, 1:] for _, _, r in parts])


def test_silent_features_are_flagged_and_the_fit_stays_short() -> None:
    """Every fit feature with no baseline count (and counts elsewhere) is flagged, no other;
    every feature takes the Laplace start; the fit stops within 2x the SVI steps of the
    same screen drawn without silent genes (it took 75x that before the moment start also
    placed the effects)."""
    data, _, _ = _small_screen(0.1)
    fitted = _fit(data)
    base = data.y[data.groups == 0].sum(0)
    expected = (base == 0) & (data.y[data.groups != 0].sum(0) > 0)
    assert expected.sum() > 20
    np.testing.assert_array_equal(fitted.flags["baseline_no_counts"], expected)
    silent = fitted.flags["baseline_silent"]  # of them, those the others predict >= 3 of
    assert (silent <= expected).all() and 0 < silent.sum() < expected.sum()
    assert not fitted.flags["start_not_converged"].any()
    assert fitted.svi.start["features_kept_start"] == 0
    plain = _fit(_small_screen(0.0)[0])
    assert fitted.svi.niters_run <= 2 * plain.svi.niters_run, (
        fitted.svi.niters_run,
        plain.svi.niters_run,
    )


@pytest.mark.slow
def test_silent_in_the_baseline_intervals_cover_their_effects() -> None:
    """The small group is the baseline and 10 % of the genes are off in it (log2 effect -6
    to -10), two seeds: ~280 effects of silent genes. Their 90 % intervals cover 0.85-0.95
    of the true effects by design; with 280 effects the binomial sd is 0.018, so the test
    asks for 0.83-0.97. Before (the weak prior, the guide's normal): ~0.3-0.4. The other
    effects keep their coverage (0.86-0.95 over ~2,400: sd 0.006, wider for the screens'
    mixture of depths)."""
    inside, other = [], []
    for seed in (0, 1):
        data, truth, classes = _small_screen(0.1, seed)
        draws = _draws(_fit(data))
        low, high = np.quantile(draws, [0.05, 0.95], axis=0)
        covered = (truth >= low) & (truth <= high)
        inside.append(covered[classes == SILENT])
        other.append(covered[classes != SILENT])
    silent, rest = np.concatenate(inside), np.concatenate(other)
    assert silent.size > 200
    assert 0.83 <= silent.mean() <= 0.97, silent.mean()
    assert 0.86 <= rest.mean() <= 0.95, rest.mean()


def test_the_sparse_and_dense_inputs_give_the_same_learned_prior() -> None:
    """The learned prior reads the non-zeros: a sparse fit matrix gives the dense one's."""
    data, _, _ = _small_screen(0.1)
    family = get_family("negbinom").configured(PriorOptions(negbinom_baseline="empirical"))
    dense = family.finish_inputs(family.fit_inputs(data)[0])
    sparse = family.finish_inputs(
        family.fit_inputs(FitArrays(**{**data.__dict__, "y": as_sparse(data.y)}))[0]
    )
    for key in ("mu_mean", "base_count", "mu_logits"):
        assert torch.allclose(dense[key].double(), sparse[key].double(), rtol=1e-6), key


def test_features_that_keep_their_start_are_counted_with_a_reason_and_flagged(
    caplog, monkeypatch
) -> None:
    """No feature may keep its initial values silently: force Newton to stop short (one
    iteration, a tolerance no feature meets) and every feature is flagged, with one warning
    that counts them and says why."""
    import bayesdream_model.fit as fit_module
    from bayesdream_model.laplace import LaplaceSettings, laplace_start

    def stopped_short(*args, **kwargs):
        return laplace_start(*args, **kwargs, settings=LaplaceSettings(max_iters=1, tolerance=0.0))

    monkeypatch.setattr(fit_module, "laplace_start", stopped_short)
    data, _, _ = _small_screen(0.0)
    with caplog.at_level("WARNING", logger="bayesdream_model.laplace"):
        fitted = fit_technical(get_family("negbinom"), data, FitOptions(niters=20))
    flags = fitted.flags["start_not_converged"]
    assert flags.all() and flags.shape == (data.n_features,)
    assert fitted.svi.start["features_kept_start"] == data.n_features
    warning = caplog.text
    assert f"{data.n_features} features kept their initial values" in warning
    assert "did not reach their MAP within 1 Newton iterations" in warning
    assert "start_not_converged" in warning
