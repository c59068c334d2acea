"""Where the negbinom Laplace start's Newton iterations begin (`nb_moments`).

The moment estimates only move Newton's starting point: the start must reach the same
MAP and covariance as from the guide's initial values (within the Newton tolerance:
|loc difference| <= 0.05 posterior sd, as in test_laplace), in fewer iterations, and
from merged batch statistics it must be the whole data's.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import torch

from bayesdream_model.data import FitArrays
from bayesdream_model.distributions import get_family
from bayesdream_model.distributions.nb.nb_moments import O_FLOOR_FRACTION, squares_per_feature
from bayesdream_model.guides import build_guide
from bayesdream_model.laplace import LaplaceSettings, laplace_start
from bayesdream_model.model import TechnicalModel
from bayesdream_model.simulate import simulate_negbinom_screen
from bayesdream_model.streaming import InMemoryCells, merged_tensors


def screen(mu_median: float, *, n_cells: int = 2000, n_features: int = 200, seed: int = 1):
    s = simulate_negbinom_screen(
        n_cells=n_cells, n_features=n_features, n_groups=3, mu_median=mu_median, seed=seed
    )
    data = FitArrays(
        y=s.counts.T.astype(np.float64), groups=s.groups, n_groups=3, sum_factor=s.sum_factor
    )
    return s, data


def start_of(data) -> dict[str, torch.Tensor]:
    family = get_family("negbinom")
    tensors = data if not isinstance(data, FitArrays) else family.tensors(data, "cpu")
    inputs = family.prior_inputs(data if isinstance(data, FitArrays) else data.data)
    return family.newton_start(inputs, tensors)


def test_squares_come_from_the_histogram_exactly() -> None:
    """Small counts (<= 16) from the per-feature table, the rest from the pairs."""
    _, data = screen(50.0, n_cells=500, n_features=40)
    tensors = get_family("negbinom").tensors(data, "cpu")
    assert tensors.stats["pair_feature"].numel() > 0 and tensors.stats["small_count"].sum() > 0
    expected = (data.y**2).sum(axis=0)
    np.testing.assert_allclose(squares_per_feature(tensors.stats).numpy(), expected, rtol=1e-12)


def test_moments_estimate_the_baseline_mean_and_dispersion() -> None:
    """2,000 cells at ~50 counts: the moment estimator of 1/phi has a relative sd of a few
    %, and the floor adds (0.083)^2 to 1/phi ~ 0.2 (+2 % in o): median |log o error| was
    0.06 and its 90 % quantile 0.14; the bounds allow twice that. A wrong formula (phi for
    1/phi, a missing Poisson term) is off by ~1.6 in log o."""
    s, data = screen(50.0)
    start = start_of(data)
    baseline = data.groups == 0
    mean = data.y[baseline].sum(0) / data.sum_factor[baseline].sum()
    np.testing.assert_allclose(start["mu_ntc"].numpy(), mean, rtol=1e-12)
    error = np.abs(np.log(start["o_y"].numpy()) - np.log(1.0 / np.sqrt(s.phi)))
    assert np.median(error) <= 0.12 and np.quantile(error, 0.9) <= 0.3, error
    o = start["o_y"].numpy()
    beta = (9.0 + o.size) / (3.0 + o.sum())  # MAP of log beta_o given o (Gamma(9, 3) prior)
    np.testing.assert_allclose(float(start["beta_o"]), beta, rtol=1e-12)


def test_no_information_puts_o_at_the_floor_and_mu_at_half_a_count() -> None:
    """Poisson counts (no spread beyond Poisson) start at the floor, half the prior's mode
    of o_y; a feature without a baseline count at half a count over the baseline cells."""
    rng = np.random.default_rng(0)
    groups = np.arange(900) % 3
    sf = rng.lognormal(0.0, 0.3, size=900)
    y = rng.poisson(2.0 * sf[:, None], size=(900, 5)).astype(np.float64)
    y[groups == 0, 4] = 0.0
    start = start_of(FitArrays(y=y, groups=groups, n_groups=3, sum_factor=sf))
    floor = O_FLOOR_FRACTION * 3.0 / 9.0
    assert np.all(start["o_y"].numpy() < 2.5 * floor) and np.all(start["o_y"].numpy() >= floor)
    np.testing.assert_allclose(float(start["mu_ntc"][4]), 0.5 / sf[groups == 0].sum())


def test_merged_batches_give_the_whole_datas_start() -> None:
    _, data = screen(5.0, n_cells=900, n_features=60)
    family = get_family("negbinom")
    merged = merged_tensors(family, InMemoryCells(data, batch_cells=250), "cpu")
    whole, batched = start_of(data), family.newton_start(family.prior_inputs(data), merged)
    for name, value in whole.items():
        torch.testing.assert_close(batched[name], value, rtol=1e-10, atol=0)


def started(data: FitArrays, *, moments: bool):
    """(loc, scale) of the guide after the Laplace start from the guide's initial values or
    from the moments (copies: guides may share Pyro's parameter store by name), and how
    the start went."""
    pyro.set_rng_seed(0)
    family = get_family("negbinom")
    tensors = family.tensors(data, "cpu")
    model = TechnicalModel(family, family.prior_inputs(data), 3, tensors)
    guide = build_guide(model, "feature_mvn", family.initial_values(data))
    guide(observe=False)
    begin = family.newton_start(model.inputs, tensors) if moments else None
    result = laplace_start(model, guide, second_derivatives=family.second_derivatives, start=begin)
    return guide.loc.detach().clone(), guide.scale.detach().clone(), result


def test_the_moment_start_reaches_the_same_map_in_fewer_iterations() -> None:
    """Deep counts, where the prior's median of o_y and mu_ntc is far from the MAP."""
    _, data = screen(50.0, n_cells=1500, n_features=60, seed=4)
    plain_loc, plain_scale, plain_result = started(data, moments=False)
    loc, scale, result = started(data, moments=True)
    assert result.features_kept_start == 0 and plain_result.features_kept_start == 0
    # each start stops within a Newton decrement of `tolerance` of the MAP: sqrt(tolerance)
    # posterior sds (0.032) at most in any direction, so the two are 2 x that apart at most
    difference = ((loc - plain_loc).abs() / plain_scale).max()
    assert 0 < difference <= 2 * math.sqrt(LaplaceSettings().tolerance), difference
    torch.testing.assert_close(scale, plain_scale, rtol=0.02, atol=0)
    assert result.gradient_evaluations < 0.6 * plain_result.gradient_evaluations, (
        result,
        plain_result,
    )
