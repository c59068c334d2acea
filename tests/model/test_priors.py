"""Negbinom empirical priors and initial values against a plain numpy re-computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from factories import counts_matrix
from pyro import poutine

import bayesdream_model.distributions.nb.group_sums as group_sums
import bayesdream_model.fit
from bayesdream_model.data import FitArrays
from bayesdream_model.distributions import PriorOptions, get_family
from bayesdream_model.fit import FitOptions, fit_technical
from bayesdream_model.guides import build_guide
from bayesdream_model.model import TechnicalModel
from bayesdream_model.recovery import DivergenceError
from bayesdream_model.streaming import InMemoryCells

EPS = 1e-6  # the model's epsilon
LOG_EPS = 1e-8  # pseudocount of the log2-ratio initial values


def screen(n_groups: int = 3) -> FitArrays:
    """Overdispersed counts plus a sparse feature (MAD = 0) and a high, tight feature."""
    y, groups, sum_factor = counts_matrix(n_cells=40, n_features=10, n_groups=n_groups, seed=7)
    rng = np.random.default_rng(8)
    sparse = np.zeros(40)
    sparse[rng.choice(40, size=5, replace=False)] = rng.integers(1, 6, size=5)
    tight = rng.poisson(1000.0 * sum_factor).astype(np.float64)
    y = np.column_stack([y, sparse, tight])
    return FitArrays(y=y, groups=groups, n_groups=n_groups, sum_factor=sum_factor)


def reference_priors(data: FitArrays) -> dict[str, np.ndarray]:
    """docs/model.md "Priors: negbinom", written out step by step in float64."""
    y_norm = data.y / data.sum_factor[:, None]
    baseline_mean = y_norm[data.groups == 0].mean(axis=0)
    mad = np.median(np.abs(y_norm - np.median(y_norm, axis=0)), axis=0)
    rsd = 1.4826 * mad
    rsd = np.where(rsd <= EPS, y_norm.std(axis=0), rsd)
    s = rsd / math.sqrt(data.n_cells) + EPS
    floor = 0.1 * (baseline_mean + EPS)
    return {
        "mu_mean": baseline_mean + EPS,
        "mu_sd": np.maximum(s, floor),
        "unfloored": s,
        "floor": floor,
        "mad": mad,
    }


def reference_inits(data: FitArrays) -> np.ndarray:
    """log2((group mean + 1e-8) / (baseline mean + 1e-8)) of size-factor-normalised counts."""
    y_norm = data.y / data.sum_factor[:, None]
    means = np.stack([y_norm[data.groups == g].mean(axis=0) for g in range(data.n_groups)])
    return np.log2((means[1:] + LOG_EPS) / (means[0] + LOG_EPS))


def test_prior_inputs_match_the_reference_formulas() -> None:
    data = screen()
    ref = reference_priors(data)
    # The matrix exercises every branch: MAD fallback, floored and unfloored s.
    assert (ref["mad"] == 0).any() and (ref["mad"] > 0).any()
    assert (ref["unfloored"] < ref["floor"]).any() and (ref["unfloored"] > ref["floor"]).any()

    family = get_family("negbinom").configured(PriorOptions(negbinom_baseline="standard_error"))
    inputs = family.prior_inputs(data)
    assert set(inputs) == {"mu_mean", "mu_sd", "beta_o_alpha", "beta_o_beta"}
    for key in ("mu_mean", "mu_sd"):
        assert inputs[key].dtype == torch.float32 and inputs[key].shape == (data.n_features,)
        np.testing.assert_allclose(inputs[key].numpy(), ref[key], rtol=1e-6, err_msg=key)
    assert float(inputs["beta_o_alpha"]) == 9.0
    assert float(inputs["beta_o_beta"]) == 3.0


def test_weak_baseline_prior_is_an_exponential_at_the_pooled_mean() -> None:
    """Gamma(1, 1 / m), m = the mean over all fit cells: sd = mean = m, so a feature with
    no baseline count (the matrix's sparse one) is not pinned at ~0."""
    data = screen()
    ref = reference_priors(data)
    pooled = (data.y / data.sum_factor[:, None]).mean(axis=0) + EPS
    weak = get_family("negbinom").configured(PriorOptions(negbinom_baseline="weak"))
    inputs = weak.prior_inputs(data)
    np.testing.assert_allclose(inputs["mu_mean"].numpy(), pooled, rtol=1e-6)
    np.testing.assert_array_equal(inputs["mu_sd"].numpy(), inputs["mu_mean"].numpy())
    assert ref["mu_mean"][10] == EPS and inputs["mu_mean"].numpy()[10] > 0.1  # no baseline count
    # wider than the reference's prior on every feature of this matrix
    assert (inputs["mu_sd"].numpy() > ref["mu_sd"]).all()


def test_empirical_baseline_prior_is_the_default_centred_on_the_other_groups() -> None:
    """Default: log2 mu_ntc = log2 m_t + r, r ~ the learned mixture, m_t the non-baseline
    cells' total over their summed size factors; the baseline totals ride along."""
    data = screen()
    default = get_family("negbinom")
    inputs = default.finish_inputs(default.prior_inputs(data))
    others = data.groups != 0
    reference = np.maximum(data.y[others].sum(0), 0.5) / data.sum_factor[others].sum()
    np.testing.assert_allclose(inputs["mu_mean"].numpy(), reference, rtol=1e-5)
    np.testing.assert_array_equal(
        inputs["base_count"].numpy(), data.y[data.groups == 0].sum(0).astype(np.float32)
    )
    weights = np.exp(inputs["mu_logits"].numpy())
    assert abs(weights.sum() - 1.0) < 1e-9
    assert inputs["mu_table"].shape[0] == 2


def test_reference_prior_mean_uses_baseline_cells_only() -> None:
    data = screen()
    y = data.y.copy()
    y[data.groups != 0] *= 10.0  # other groups do not move the baseline mean
    shifted = FitArrays(y=y, groups=data.groups, n_groups=3, sum_factor=data.sum_factor)
    family = get_family("negbinom").configured(PriorOptions(negbinom_baseline="standard_error"))
    np.testing.assert_array_equal(
        family.prior_inputs(shifted)["mu_mean"], family.prior_inputs(data)["mu_mean"]
    )


def test_model_priors_use_the_inputs() -> None:
    """mu_ntc ~ Gamma(m^2/s^2, m/s^2), beta_o ~ Gamma(9, 3), o_y ~ Exp(beta_o), T(3, 0, 20)."""
    data = screen()
    family = get_family("negbinom")
    inputs = family.prior_inputs(data)
    trace = poutine.trace(TechnicalModel(family, inputs, data.n_groups)).get_trace(observe=False)
    m, s = inputs["mu_mean"], inputs["mu_sd"]
    mu_prior = trace.nodes["mu_ntc"]["fn"]
    torch.testing.assert_close(mu_prior.concentration, m**2 / s**2)
    torch.testing.assert_close(mu_prior.rate, m / s**2)
    beta_prior = trace.nodes["beta_o"]["fn"]
    assert float(beta_prior.concentration) == 9.0 and float(beta_prior.rate) == 3.0
    o_prior = trace.nodes["o_y"]["fn"]
    beta_o = trace.nodes["beta_o"]["value"]
    torch.testing.assert_close(o_prior.rate, beta_o.expand(data.n_features))
    effect = trace.nodes["log2_alpha_y"]
    assert effect["value"].shape == (data.n_groups - 1, data.n_features)
    for attr, expected in (("df", 3.0), ("loc", 0.0), ("scale", 20.0)):
        assert torch.all(getattr(effect["fn"], attr) == expected), attr
    assert "y" not in trace.nodes  # no likelihood without data


@pytest.mark.parametrize("n_groups", [2, 3])
def test_initial_values_are_empirical_log2_ratios(n_groups: int) -> None:
    data = screen(n_groups)
    inits = get_family("negbinom").initial_values(data)
    assert set(inits) == {"log2_alpha_y"}
    value = inits["log2_alpha_y"]
    assert value.dtype == torch.float32 and value.shape == (n_groups - 1, data.n_features)
    np.testing.assert_allclose(value.numpy(), reference_inits(data), rtol=1e-6, atol=1e-6)


def test_single_group_has_no_effect_init() -> None:
    assert get_family("negbinom").initial_values(screen(1)) == {}


@pytest.mark.parametrize("kind", ["mean_field", "iaf", "feature_mvn"])
def test_guides_start_at_the_initial_values(kind: str) -> None:
    """Mean-field locs, the IAF anchor, the per-feature MVN locs hold the empirical effects."""
    data = screen()
    family = get_family("negbinom")
    model = TechnicalModel(family, family.prior_inputs(data), data.n_groups)
    inits = family.initial_values(data)
    guide = build_guide(model, kind, inits)
    guide(observe=False)
    expected = inits["log2_alpha_y"]
    if kind == "mean_field":
        start = guide.locs.log2_alpha_y.detach()
    elif kind == "iaf":  # the anchor is the unconstrained latent vector; effects come first
        start = guide.anchor[: expected.numel()].reshape(expected.shape)
    else:  # loc [T, D]: each feature's effects come first
        start = guide.loc.detach()[:, : expected.shape[0]].T
    torch.testing.assert_close(start, expected)


def test_reference_prior_warns_of_features_with_no_baseline_count(caplog) -> None:
    """The matrix's sparse feature has no count in the baseline group: the reference's
    prior puts its mu_ntc at Gamma(mean 1e-6, shape ~1e-8); the default does not."""
    data = screen()
    reference = get_family("negbinom").configured(PriorOptions(negbinom_baseline="standard_error"))
    with caplog.at_level("WARNING", logger="bayesdream_model.distributions.negbinom"):
        reference.check_inputs(reference.prior_inputs(data))
    assert "1 of 12 features have no count in the baseline group" in caplog.text
    assert "negbinom_baseline_prior: empirical (the default) or weak" in reference.divergence_hint(
        reference.prior_inputs(data)
    )
    caplog.clear()
    default = get_family("negbinom")
    with caplog.at_level("WARNING", logger="bayesdream_model.distributions.negbinom"):
        default.check_inputs(default.prior_inputs(data))
    assert caplog.text == "" and default.divergence_hint(default.prior_inputs(data)) == ""


def test_streamed_fit_warns_once_of_features_with_no_baseline_count(caplog) -> None:
    """Priors computed feature block by block: one warning for the fit, counting all."""
    data = screen()
    y = data.y.copy()
    y[data.groups == 0, :3] = 0.0  # 3 more without a baseline count (blocks 1-2; 10 in 6)
    data = FitArrays(y=y, groups=data.groups, n_groups=3, sum_factor=data.sum_factor)
    family = get_family("negbinom").configured(PriorOptions(negbinom_baseline="standard_error"))
    source = InMemoryCells(data, batch_cells=15, block_features=2)
    with caplog.at_level("WARNING", logger="bayesdream_model.distributions.negbinom"):
        fit_technical(family, source, FitOptions(niters=2))
    assert caplog.text.count("features have no count in the baseline group") == 1
    assert "4 of 12 features have no count" in caplog.text


def test_a_diverging_fit_names_the_features_with_no_baseline_count(monkeypatch) -> None:
    """The error says what to change (the prior), not only "lower fit.lr"."""

    def diverge(*args, **kwargs):
        raise DivergenceError("SVI diverged at step 0 (non-finite loss). Lower fit.lr.")

    monkeypatch.setattr(bayesdream_model.fit, "run_svi", diverge)
    family = get_family("negbinom").configured(PriorOptions(negbinom_baseline="standard_error"))
    with pytest.raises(
        DivergenceError, match=r"Lower fit.lr. 1 of 12 features have no count.*weak"
    ):
        fit_technical(family, screen(), FitOptions(niters=2))
    with pytest.raises(DivergenceError) as plain:
        fit_technical(get_family("negbinom"), screen(), FitOptions(niters=2))
    assert "baseline" not in str(plain.value)


@pytest.mark.parametrize("baseline", ["empirical", "weak", "standard_error"])
@pytest.mark.parametrize("n_groups", [1, 3])
def test_fit_inputs_are_the_prior_inputs_and_initial_values(baseline: str, n_groups: int) -> None:
    """The fit's one pass over the group sums gives both, bit for bit."""
    family = get_family("negbinom").configured(PriorOptions(negbinom_baseline=baseline))
    data = screen(n_groups)
    priors, inits = family.fit_inputs(data)
    expected_priors, expected_inits = family.prior_inputs(data), family.initial_values(data)
    assert priors.keys() == expected_priors.keys() and inits.keys() == expected_inits.keys()
    for got, expected in ((priors, expected_priors), (inits, expected_inits)):
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("baseline", ["empirical", "weak"])
def test_fit_inputs_read_from_the_likelihood_statistics_equal_a_pass_over_the_entries(
    baseline: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The in-memory fit takes its group sums from the likelihood's tables (the same sums
    in float64, no pass over the entries): the priors and initial values equal those of a
    pass over the entries."""
    family = get_family("negbinom").configured(PriorOptions(negbinom_baseline=baseline))
    data = screen(3)
    tensors = family.tensors(data, "cpu")
    expected_priors, expected_inits = family.fit_inputs(data)

    def no_pass(*args, **kwargs):
        raise AssertionError("the group sums were summed over the entries again")

    monkeypatch.setattr(group_sums, "scaled_group_sums", no_pass)
    priors, inits = family.fit_inputs(data, tensors)
    assert priors.keys() == expected_priors.keys() and inits.keys() == expected_inits.keys()
    for got, expected in ((priors, expected_priors), (inits, expected_inits)):
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=1e-6, atol=0)
