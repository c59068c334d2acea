"""Fit, draw and restore on tiny screens: output shapes by kind, for C = 1, 2, 3 and each guide."""

from __future__ import annotations

import numpy as np
import pytest
from factories import negbinom_screen

from bayesdream_model.data import FitArrays
from bayesdream_model.distributions import get_family
from bayesdream_model.distributions.negbinom import NegBinom
from bayesdream_model.errors import ModelError
from bayesdream_model.fit import FitOptions, FittedModel, fit_technical, restore_fitted
from bayesdream_model.memory import SamplingPlan
from bayesdream_model.posterior import posterior_batches

from ._support import GUIDES, fit_negbinom

N_CELLS, N_FEATURES, NITERS = 120, 8, 30
NSAMPLES = 20
ONE_BATCH = SamplingPlan(NSAMPLES, NSAMPLES, True, 0, "one vectorised batch")
SPLIT = SamplingPlan(NSAMPLES, 7, False, 0, "batches of 7, the last one partial")
PLANS = [pytest.param(ONE_BATCH, id="one_batch"), pytest.param(SPLIT, id="split")]


_FITS: dict[tuple[int, str], FittedModel] = {}


def fit_tiny(n_groups: int, guide: str, *, data_seed: int | None = None) -> FittedModel:
    """A 30-step fit of a 120 x 8 all-NTC screen; of the default screen, fit once per test
    run and shared (drawing and restoring leave a fit as it was: the tests below show
    the same seed gives the same draws, whichever test drew before)."""
    if data_seed is None:
        if (n_groups, guide) not in _FITS:
            _FITS[n_groups, guide] = fit_tiny(n_groups, guide, data_seed=n_groups)
        return _FITS[n_groups, guide]
    _, data = negbinom_screen(
        n_cells=N_CELLS, n_features=N_FEATURES, n_groups=n_groups, seed=data_seed
    )
    return fit_negbinom(data, guide, niters=NITERS, seed=1)


def draw_all(fitted: FittedModel, plan: SamplingPlan, *, seed: int = 11, skip=frozenset()) -> dict:
    """{start: (stop, results)} for every batch drawn."""
    return {
        start: (stop, out)
        for start, stop, out in posterior_batches(fitted, plan, seed=seed, skip=skip)
    }


def assert_same_draws(first: dict, second: dict) -> None:
    assert sorted(first) == sorted(second)
    for start, (stop, out) in first.items():
        assert second[start][0] == stop
        for name, value in out.items():
            np.testing.assert_array_equal(value, second[start][1][name], err_msg=name)


def expected_shape(kind: str, s: int, c: int, t: int) -> tuple[int, ...]:
    return {"effect": (s, c, t), "raw": (s, c - 1, t), "feature": (s, t), "scalar": (s,)}[kind]


@pytest.mark.parametrize("guide", GUIDES)
@pytest.mark.parametrize("n_groups", [1, 2, 3])
def test_output_shapes_and_values(n_groups: int, guide: str) -> None:
    fitted = fit_tiny(n_groups, guide)
    family = fitted.family
    for plan in (ONE_BATCH, SPLIT):
        batches = draw_all(fitted, plan)
        assert sorted(batches) == [start for start, _ in plan.batches()]
        assert sum(stop - start for start, (stop, _) in batches.items()) == NSAMPLES
        for start, (stop, out) in batches.items():
            s = stop - start
            assert set(out) == {o.name for o in family.outputs()}
            for spec in family.outputs():
                shape = expected_shape(spec.kind, s, n_groups, N_FEATURES)
                assert out[spec.name].shape == shape, (plan.reason, spec.name)
                assert np.isfinite(out[spec.name]).all(), spec.name
            assert (out["alpha_y_mult"][:, 0] == 1.0).all()
            assert (out["alpha_y_add"][:, 0] == 0.0).all()
            np.testing.assert_array_equal(out["alpha_y"], out["alpha_y_mult"])
            np.testing.assert_allclose(out["alpha_y_mult"], np.exp2(out["alpha_y_add"]), rtol=1e-6)
            np.testing.assert_array_equal(out["alpha_y_add"][:, 1:], out["log2_alpha_y"])
            np.testing.assert_allclose(out["phi_y"], 1.0 / out["o_y"] ** 2, rtol=1e-6)
            assert (out["mu_ntc"] > 0).all() and (out["o_y"] > 0).all()
            assert (out["beta_o"] > 0).all()
        if plan is SPLIT:
            assert [stop - start for start, (stop, _) in batches.items()] == [7, 7, 6]


@pytest.mark.parametrize("guide", GUIDES)
@pytest.mark.parametrize("n_groups", [1, 3])
def test_draws_vary_across_samples(n_groups: int, guide: str) -> None:
    out = draw_all(fit_tiny(n_groups, guide), ONE_BATCH)[0][1]
    assert np.unique(out["mu_ntc"][:, 0]).size == NSAMPLES
    if n_groups > 1:
        assert np.unique(out["log2_alpha_y"][:, 0, 0]).size == NSAMPLES


@pytest.mark.parametrize("guide", GUIDES)
@pytest.mark.parametrize("plan", PLANS)
def test_same_seed_same_draws(guide: str, plan: SamplingPlan) -> None:
    fitted = fit_tiny(2, guide)
    first = draw_all(fitted, plan)
    assert_same_draws(first, draw_all(fitted, plan))
    other = draw_all(fitted, plan, seed=12)
    assert not np.array_equal(first[0][1]["mu_ntc"], other[0][1]["mu_ntc"])


@pytest.mark.parametrize("guide", GUIDES)
@pytest.mark.parametrize("n_groups", [1, 2, 3])
def test_restore_fitted_reproduces_draws(n_groups: int, guide: str) -> None:
    fitted = fit_tiny(n_groups, guide)
    original = {plan.reason: draw_all(fitted, plan) for plan in (ONE_BATCH, SPLIT)}
    restored = restore_fitted(
        get_family("negbinom"),
        inputs=fitted.prior_inputs(),
        params=fitted.params(),
        guide_kind=fitted.guide_kind,
        n_groups=n_groups,
    )
    assert restored.n_features == N_FEATURES and restored.guide_kind == guide
    for plan in (ONE_BATCH, SPLIT):
        assert_same_draws(original[plan.reason], draw_all(restored, plan))


@pytest.mark.parametrize("guide", GUIDES)
def test_restore_fitted_does_not_depend_on_input_order(guide: str) -> None:
    """Inputs read back from a store come in store order (was a bug: T read off the first)."""
    fitted = fit_tiny(2, guide)
    restored = restore_fitted(
        get_family("negbinom"),
        inputs=dict(sorted(fitted.prior_inputs().items())),  # beta_o_alpha first
        params=fitted.params(),
        guide_kind=fitted.guide_kind,
        n_groups=2,
    )
    assert restored.n_features == N_FEATURES


@pytest.mark.parametrize("guide", GUIDES)
def test_draws_survive_a_later_fit(guide: str) -> None:
    """Fitting another screen of the same shape must not change an earlier fit's draws.

    (Was a bug: guides kept their parameters in Pyro's global param store under fixed names,
    so an earlier mean-field fit silently sampled the later fit's parameters.)
    """
    fitted = fit_tiny(2, guide)
    before = draw_all(fitted, ONE_BATCH)
    fit_tiny(2, guide, data_seed=99)  # same shapes and parameter names, other data
    assert_same_draws(before, draw_all(fitted, ONE_BATCH))


@pytest.mark.parametrize("guide", GUIDES)
def test_sampling_never_evaluates_the_likelihood(guide: str, monkeypatch) -> None:
    def refuse(self, params, data, plates):
        raise AssertionError("the likelihood was evaluated during posterior sampling")

    fitted = fit_tiny(3, guide)
    assert fitted.model.data is not None  # the fitted model still holds its data
    monkeypatch.setattr(NegBinom, "observe", refuse)
    for plan in (ONE_BATCH, SPLIT):
        assert len(draw_all(fitted, plan)) == plan.n_batches


@pytest.mark.parametrize("guide", GUIDES)
def test_batches_are_seeded_per_start(guide: str) -> None:
    fitted = fit_tiny(2, guide)
    everything = draw_all(fitted, SPLIT)
    resumed = draw_all(fitted, SPLIT, skip=frozenset({0}))
    assert sorted(resumed) == [7, 14]
    assert_same_draws(resumed, {start: everything[start] for start in resumed})
    only_last = draw_all(fitted, SPLIT, skip=frozenset({0, 7}))
    assert_same_draws(only_last, {14: everything[14]})


@pytest.mark.parametrize("guide", GUIDES)
def test_restore_with_mismatched_params_is_a_model_error(guide: str) -> None:
    fitted = fit_tiny(2, guide)
    other = fit_tiny(3, guide)
    with pytest.raises(ModelError, match=f"do not match the {guide} guide"):
        restore_fitted(
            get_family("negbinom"),
            inputs=other.prior_inputs(),
            params=fitted.params(),
            guide_kind=guide,
            n_groups=3,
        )


def test_feature_guide_covers_the_multinomial_baseline() -> None:
    """`guide: feature_mvn` puts the Dirichlet baseline ([T, K], features first) and the
    effects ([C-1, T, K]) of each feature in one Gaussian; draws keep every shape."""
    from bayesdream_model.memory import MemoryBudget, plan_sampling
    from bayesdream_model.simulate import simulate_multinomial

    sim = simulate_multinomial(n_cells=200, n_features=6, n_groups=3, n_categories=4, seed=1)
    data = FitArrays(y=np.swapaxes(sim.y, 0, 1).astype(np.float32), groups=sim.groups, n_groups=3)
    fitted = fit_technical(
        get_family("multinomial"), data, FitOptions(niters=60, guide="feature_mvn")
    )
    assert fitted.guide_kind == "feature_mvn"
    plan = plan_sampling(nsamples=12, shape=(200, 24, 3), budget=MemoryBudget(10**9, "t", 1.0))
    (_, _, draws), *_ = posterior_batches(fitted, plan, seed=0)
    assert draws["alpha_y_add"].shape == (12, 3, 6, 4)
    assert draws["probs_baseline"].shape == (12, 6, 4)
    np.testing.assert_allclose(draws["probs_baseline"].sum(-1), 1.0, rtol=1e-5)
    assert np.isfinite(draws["alpha_y_add"]).all()
