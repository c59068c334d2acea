"""Every family's fast likelihood equals a plain dense per-cell one written from docs/model.md.

The families compute their likelihood the fast way (per-group sufficient statistics,
cells sorted by group, value histograms, a fused negbinom pass with its own backward).
`bayesdream_model/dense_likelihoods.py` holds the slow, obvious version of each: one [N, T] tensor of
per-cell terms from torch / pyro distributions. Here, on random data with the awkward
cases planted (zeros, all-zero features, NaN/Inf missing values, n = 0 cells, masked and
fully masked categories), for C = 1, 2, 3 and several seeds:

- the value the family adds to the model (site "y") equals the dense sum: every family
  keeps its parameter-free constant (negbinom and multinomial keep the lgamma terms;
  normal and Student-t keep the full density; binomial drops the combinatorial term,
  which the baseline drops too, as the model allows), so they are compared directly, and
  the difference between two random parameter settings (the parameter-dependent part,
  which is all SVI sees) is compared as well;
- the gradients with respect to every parameter are equal.

The family runs as it does in the fit (float32); the reference is the dense baseline in
float64, so the tolerances below are float32 error budgets:

- Values: float32 has unit roundoff u = 6e-8. The fast sums accumulate O(N T) terms in
  float32 (torch reduces pairwise / in blocks, error <= ~u log2(N T) sum|terms|, ~1e-6
  relative to sum|terms| at N T ~ 2000) after float32 rounding of the parameters and of
  the statistics (relative u each, amplified by at most the terms' condition numbers,
  O(1-10) here). RTOL = 1e-5 of sum|terms| is ~10x that budget, while one wrong cell
  (a dropped n = 0 cell counted, a missing value used, the wrong group's row) moves the
  sum by ~1 / (N T) ~ 5e-4 of it: 50x above the tolerance.
- Gradients: each gradient element is a float32 sum over up to N cells whose terms can
  cancel (a parameter near its optimum for one group but not another), so an element's
  float32 error scales with the sum of |terms|, not with |element|: GRAD_RTOL = 1e-4
  relative, plus GRAD_ATOL = 1e-5 of the largest |element| of the same parameter (the
  gradients' scale; ~10x the float32 budget u log2 N sum|terms| ~ 5e-7 sum|terms|). A
  term with the wrong weight (a factor of sf, of 1/ln 2, a missing group) changes
  elements at O(1) relative.

negbinom keeps y log(mu + 1e-8) exact (a series in 1e-8 / mu) while every cell mean is
>= 1e-7; here every cell mean is >= 1e-3 (asserted). Its regimes (tiny and huge means,
the Poisson limit, tiny phi, size factors over two orders of magnitude) are held to
float32 resolution in tests/model/test_negbinom_terms.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pyro import poutine

import bayesdream_model.dense_likelihoods as baselines
from bayesdream_model.data import FitArrays
from bayesdream_model.distributions import get_family
from bayesdream_model.distributions.multinomial import category_mask
from bayesdream_model.errors import ModelError
from bayesdream_model.plates import Plates

N_CELLS, N_FEATURES, N_CATEGORIES = 150, 9, 4
RTOL = 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-5
MIN_NB_MEAN = 1e-3
FAMILIES = ("negbinom", "binomial", "multinomial", "normal", "studentt")
SEEDS = (0, 1, 2)


# -- random data with the awkward cases planted ----------------------------------------------
def _groups(rng: np.random.Generator, n_groups: int) -> np.ndarray:
    groups = rng.integers(0, n_groups, size=N_CELLS)
    groups[:n_groups] = np.arange(n_groups)  # every group present
    return groups


def data_negbinom(rng: np.random.Generator, groups: np.ndarray, n_groups: int) -> FitArrays:
    sf = rng.lognormal(0.0, 0.4, size=N_CELLS)
    mean = rng.lognormal(np.log(3.0), 1.0, size=N_FEATURES)[None] * sf[:, None]
    y = rng.poisson(rng.gamma(1.5, mean / 1.5)).astype(np.float64)
    y[:, 0] = 0.0  # an all-zero feature
    y[::2, 1] = 0.0  # many zeros
    y[3, 2] = 400.0  # a large count
    return FitArrays(y=y, groups=groups, n_groups=n_groups, sum_factor=sf)


def data_binomial(rng: np.random.Generator, groups: np.ndarray, n_groups: int) -> FitArrays:
    n = rng.poisson(6.0, size=(N_CELLS, N_FEATURES)).astype(np.float64)
    n[rng.random(n.shape) < 0.2] = 0.0  # n = 0 cells: contribute nothing
    y = rng.binomial(n.astype(np.int64), rng.uniform(0.05, 0.95, N_FEATURES)).astype(np.float64)
    y[:, 0] = 0.0  # PSI = 0 everywhere
    y[:, 1] = n[:, 1]  # PSI = 1 everywhere
    n[groups == 0, 2] = 0.0  # no valid cell in the baseline group
    y[groups == 0, 2] = 0.0
    return FitArrays(y=y, groups=groups, n_groups=n_groups, denominator=n)


def _continuous(rng: np.random.Generator, groups: np.ndarray, n_groups: int) -> FitArrays:
    loc, scale = rng.normal(0, 2, N_FEATURES), rng.uniform(0.5, 2, N_FEATURES)
    y = rng.normal(loc, scale, (N_CELLS, N_FEATURES))
    y[:, 1] = rng.standard_t(2.0, N_CELLS) * 3.0  # heavy tails
    y[rng.random(y.shape) < 0.15] = np.nan  # missing
    y[5, :3] = np.inf  # Inf is missing too
    y[6, 3:6] = -np.inf
    y[groups == n_groups - 1, 4] = np.nan  # all missing in one group
    y[:, 5] = 10.0 + 1e-3 * rng.standard_normal(N_CELLS)  # a tight feature far from 0
    return FitArrays(y=y, groups=groups, n_groups=n_groups)


def data_multinomial(rng: np.random.Generator, groups: np.ndarray, n_groups: int) -> FitArrays:
    probs = rng.dirichlet(np.full(N_CATEGORIES, 2.0), size=N_FEATURES)  # [T, K]
    totals = rng.poisson(8.0, size=(N_CELLS, N_FEATURES))
    totals[::7] = 0  # cells without counts
    y = np.stack([rng.multinomial(totals[:, t], probs[t]) for t in range(N_FEATURES)], axis=1)
    y = y.astype(np.float64)  # [N, T, K]
    y[:, 0, 3] = 0.0  # masked: zero overall
    y[groups == 0, 1, 2] = 0.0  # masked: zero in the baseline group only (counts elsewhere)
    y[groups == n_groups - 1, 2, 0] = 0.0  # masked: zero in the last group
    y[:, 3, :] = 0.0  # every category masked: uniform p, never NaN
    y[:, 4, 1:] = 0.0  # one category left
    y[groups == 0, 4, 0] += 1.0  # (present in every group)
    return FitArrays(y=y, groups=groups, n_groups=n_groups)


DATA = {
    "negbinom": data_negbinom,
    "binomial": data_binomial,
    "multinomial": data_multinomial,
    "normal": _continuous,
    "studentt": _continuous,
}


# -- random parameters, built by the family's own sample_latents ------------------------------
def raw_values(name: str, data: FitArrays, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Values of the latent sites (moderate: away from the clamps, cell means >= 1e-3)."""
    c1, t = data.n_groups - 1, data.n_features
    if name == "negbinom":
        values = {
            "mu_ntc": np.exp(rng.uniform(np.log(0.05), np.log(20.0), t)),
            "o_y": rng.uniform(0.2, 1.5, t),
            "beta_o": np.array(3.0),
            "log2_alpha_y": rng.normal(0, 1, (c1, t)).clip(-2.5, 2.5),
        }
    elif name == "binomial":
        values = {
            "mu_ntc": rng.uniform(0.05, 0.95, t),
            "alpha_logit_y": rng.normal(0, 1.5, (c1, t)),
        }
    elif name == "multinomial":
        values = {
            "probs_baseline_raw": rng.dirichlet(np.full(N_CATEGORIES, 2.0), size=t),
            "alpha_logits_y": rng.normal(0, 1.0, (c1, t, N_CATEGORIES)),
        }
    else:
        values = {
            "mu_ntc": rng.normal(0, 2, t),
            "sigma_y": rng.uniform(0.3, 2.5, t),
            "delta_y": rng.normal(0, 1, (c1, t)),
        }
    return {k: v for k, v in values.items() if data.n_groups > 1 or k not in EFFECT_SITES}


EFFECT_SITES = {"log2_alpha_y", "alpha_logit_y", "alpha_logits_y", "delta_y"}


def model_params(name: str, data: FitArrays, rng: np.random.Generator) -> dict:
    """The params dict `observe` receives: `sample_latents` conditioned on random values.

    Float tensors are detached into leaves (float32, as in the fit) so that gradients can
    be read off them; the multinomial mask stays a bool tensor.
    """
    family = get_family(name)
    inputs = family.prior_inputs(data)
    raw = raw_values(name, data, rng)
    values = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in raw.items()}
    plates = Plates.make(data.n_features, data.n_groups)
    params = poutine.condition(family.sample_latents, data=values)(inputs, plates)
    return {
        k: v.detach().clone().requires_grad_(True) if _is_float(v) else v for k, v in params.items()
    }


def _is_float(v) -> bool:
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def as_float64(params: dict) -> dict:
    """Independent float64 leaves with the same values."""
    return {
        k: v.detach().double().requires_grad_(True) if _is_float(v) else v
        for k, v in params.items()
    }


def make_case(name: str, n_groups: int, seed: int) -> tuple[FitArrays, dict, dict]:
    rng = np.random.default_rng(1000 * seed + 10 * n_groups + FAMILIES.index(name))
    data = DATA[name](rng, _groups(rng, n_groups), n_groups)
    return data, model_params(name, data, rng), model_params(name, data, rng)


# -- the comparison --------------------------------------------------------------------------
def assert_nb_means_in_range(params: dict, data: FitArrays) -> None:
    """Every cell mean is >= MIN_NB_MEAN (the cases are moderate; see the module doc)."""
    mu_ntc = params["mu_ntc"].detach().double().numpy()
    effect = params.get("log2_alpha_y")
    rows = np.zeros((data.n_groups, mu_ntc.size))
    if effect is not None:
        rows[1:] = effect.detach().double().numpy()
    mu = mu_ntc * np.exp2(rows[data.groups]) * data.sum_factor[:, None]
    assert mu.min() >= MIN_NB_MEAN, mu.min()


def evaluate(name: str, params: dict, data: FitArrays):
    """(fast value, its gradients), (dense float64 terms [N, T], sum, gradients)."""
    fast = baselines.fast_log_likelihood(get_family(name), params, data)
    leaves = {k: v for k, v in params.items() if _is_float(v)}
    fast_grads = torch.autograd.grad(fast, list(leaves.values()), allow_unused=True)
    ref_params = as_float64(params)
    terms = baselines.dense_log_likelihood(name, ref_params, data)
    ref = terms.sum()
    ref_leaves = [ref_params[k] for k in leaves]
    ref_grads = torch.autograd.grad(ref, ref_leaves, allow_unused=True)
    return (
        fast.detach().double(),
        dict(zip(leaves, fast_grads, strict=True)),
        terms.detach(),
        ref.detach(),
        dict(zip(leaves, ref_grads, strict=True)),
    )


def value_atol(name: str, params: dict, data: FitArrays, terms: torch.Tensor) -> float:
    atol = RTOL * terms.abs().sum().item()
    if name == "negbinom":
        assert_nb_means_in_range(params, data)
    return atol


def assert_gradients_equal(fast: dict, ref: dict) -> None:
    for key, ref_grad in ref.items():
        got = fast[key]
        if ref_grad is None:  # a leaf the likelihood does not read
            assert got is None or not got.any(), key
            continue
        assert got is not None, f"{key}: the fast likelihood has no gradient"
        expected = ref_grad.numpy()
        assert np.isfinite(got.numpy()).all(), key
        scale = np.abs(expected).max()
        np.testing.assert_allclose(
            got.double().numpy(), expected, rtol=GRAD_RTOL, atol=GRAD_ATOL * scale, err_msg=key
        )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_groups", [1, 2, 3])
@pytest.mark.parametrize("name", FAMILIES)
def test_fast_likelihood_equals_dense_baseline(name: str, n_groups: int, seed: int) -> None:
    data, params_a, params_b = make_case(name, n_groups, seed)
    fast_a, grads_a, terms_a, ref_a, ref_grads_a = evaluate(name, params_a, data)
    fast_b, _, terms_b, ref_b, _ = evaluate(name, params_b, data)
    assert torch.isfinite(terms_a).all() and torch.isfinite(fast_a)
    atol_a = value_atol(name, params_a, data, terms_a)
    atol_b = value_atol(name, params_b, data, terms_b)
    # the constant is kept by every family (and dropped identically by the binomial baseline)
    np.testing.assert_allclose(fast_a.item(), ref_a.item(), rtol=0, atol=atol_a)
    # the parameter-dependent part: what SVI differentiates
    np.testing.assert_allclose(
        (fast_a - fast_b).item(), (ref_a - ref_b).item(), rtol=0, atol=atol_a + atol_b
    )
    assert_gradients_equal(grads_a, ref_grads_a)


@pytest.mark.parametrize("name", FAMILIES)
def test_fast_likelihood_does_not_depend_on_cell_order(name: str) -> None:
    data, params, _ = make_case(name, 3, seed=5)
    order = np.random.default_rng(5).permutation(data.n_cells)
    pick = lambda x: None if x is None else x[order]  # noqa: E731
    shuffled = FitArrays(
        y=data.y[order],
        groups=data.groups[order],
        n_groups=3,
        sum_factor=pick(data.sum_factor),
        denominator=pick(data.denominator),
    )
    family = get_family(name)
    first = baselines.fast_log_likelihood(family, params, data).item()
    second = baselines.fast_log_likelihood(family, params, shuffled).item()
    terms = baselines.dense_log_likelihood(name, as_float64(params), data)
    np.testing.assert_allclose(second, first, rtol=0, atol=RTOL * terms.abs().sum().item())


def test_planted_cases_are_in_the_data() -> None:
    """The awkward cases this file claims to cover are really there (C = 3)."""
    rng = np.random.default_rng(0)
    groups = _groups(rng, 3)
    binomial = data_binomial(rng, groups, 3)
    assert (binomial.denominator == 0).any() and (binomial.denominator > 0).any()
    continuous = _continuous(rng, groups, 3)
    assert np.isnan(continuous.y).any() and np.isinf(continuous.y).any()
    multinomial = data_multinomial(rng, groups, 3)
    mask = category_mask(multinomial)
    assert mask[0, 3] and mask[1, 2] and mask[2, 0] and mask[3].all() and not mask[5:].any()
    # a masked category with counts in other groups: p is floored there, a constant term
    assert multinomial.y[:, 1, 2].sum() > 0


@pytest.mark.parametrize("bad", [-1.0, np.nan, np.inf])
def test_multinomial_rejects_negative_or_non_finite_counts(bad: float) -> None:
    """docs/model.md: negative or non-finite multinomial counts are an error, not a likelihood."""
    rng = np.random.default_rng(0)
    data = data_multinomial(rng, _groups(rng, 2), 2)
    y = data.y.copy()
    y[4, 6, 1] = bad
    with pytest.raises(ModelError, match="finite and non-negative"):
        get_family("multinomial").tensors(FitArrays(y=y, groups=data.groups, n_groups=2), "cpu")


# -- known deviations (bugs) --------------------------------------------------------------------
@pytest.mark.parametrize("logit", [17.0, 25.0])
def test_binomial_likelihood_at_high_logit_is_spec_clamped(logit: float) -> None:
    rng = np.random.default_rng(0)
    groups = np.arange(40) % 2
    n = rng.poisson(10.0, size=(40, 2)).astype(np.float64) + 1.0
    y = n.copy()  # feature 0: PSI = 1 exactly (n - y = 0); feature 1: one failure
    y[1, 1] -= 1.0
    data = FitArrays(y=y, groups=groups, n_groups=2, denominator=n)
    params = {
        "mu_ntc": torch.tensor([0.5, 0.5]),
        "alpha_logit_y": torch.tensor([[logit, logit]]),
    }
    expected = baselines.dense_log_likelihood("binomial", as_float64(params), data).sum()
    assert torch.isfinite(expected)  # docs/model.md: finite, log(1 - p) floored at log(1e-12)
    value = baselines.fast_log_likelihood(get_family("binomial"), params, data)
    np.testing.assert_allclose(value.item(), expected.item(), rtol=RTOL)


def test_negbinom_dispersion_gradient_near_the_poisson_limit() -> None:
    """o_y = 3e-3 (phi ~ 1e5; the Exponential(beta_o ~ 3) prior puts ~1 % of its mass
    below): lgamma(phi + y) - lgamma(phi), y log phi and (phi + y) log1p(mu / phi) cancel to
    O(mu^2 / phi^2), so a float32 evaluation of those terms gives noise 10^2-10^4 x the
    exact gradient (a plain float32 dense NB does: o_y <~ 0.05 already loses >10 %). The
    family evaluates every [C, T] term in float64 and only the per-entry pass in float32,
    whose share of this gradient is itself O(mu / phi): exact to ~1e-8 of its scale."""
    data, params, _ = make_case("negbinom", 3, seed=0)
    params = {**params, "o_y": torch.full_like(params["o_y"], 3e-3).requires_grad_(True)}
    fast = baselines.fast_log_likelihood(get_family("negbinom"), params, data)
    (got,) = torch.autograd.grad(fast, [params["o_y"]])
    ref_params = as_float64(params)
    ref = baselines.dense_log_likelihood("negbinom", ref_params, data).sum()
    (expected,) = torch.autograd.grad(ref, [ref_params["o_y"]])
    scale = expected.abs().max().item()  # an element near 0 is held to the gradients' scale
    np.testing.assert_allclose(got.double().numpy(), expected.numpy(), rtol=1e-5, atol=1e-8 * scale)
