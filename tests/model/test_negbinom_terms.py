"""The split negbinom likelihood equals the dense baseline to float32 resolution, in every regime.

`nb_log_likelihood` never touches a cell whose count is 0: the part of the log1p term that
reads every cell is a per-group function of one number, tabulated once
(`log1p_table`), and so, per (group, feature), is the part that reads the non-zero counts
(`weighted_log1p`).
Here, each piece against its direct float64 sum, and the whole against the dense per-cell
baseline of `bayesdream_model/dense_likelihoods.py` (float64), on data drawn from the model in the
regimes where a split could lose accuracy: tiny means (the power-series branch and the
y log(mu + 1e-8) series), huge means and tiny phi (a = sf x >> 1: the asymptotic branch;
the gradient's information sits in Σ y / (1 + a)), phi near the Poisson limit (1e5: the
dispersion gradient is a difference of terms 1e5 x larger), C = 1 and C = 3, size factors
spread over two orders of magnitude. Parameters are moved off the generating values, so
that gradients are of the size of their terms.

Tolerances (float32: u = 6e-8). Values: the family returns float32, so VALUE_RTOL =
2e-7 of Σ|dense terms| (a few roundings of the total) plus PIECE_RTOL = 1e-7 of
Σ y log1p(a): where a >> 1 the pieces are up to 1e5 x the terms, and the tables hold them
to ~1e-11 of themselves. This is the value only; the gradients do not see it.
Gradients: GRAD_RTOL = 2e-6 of the largest |element| of each parameter; measured 2e-8 to
7e-7 (the old fused float32 pass: 1e-5 to 1e-2; a float32 dense baseline: up to 3e2 near
the Poisson limit).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bayesdream_model.distributions.nb.weighted_log1p as weighted_log1p
from bayesdream_model.data import FitArrays
from bayesdream_model.distributions import get_family
from bayesdream_model.distributions.nb.lgamma_segments import SEGMENT_WIDTH, SegmentedLgamma
from bayesdream_model.distributions.nb.log1p_table import evaluate, log1p_table
from bayesdream_model.distributions.nb.shifted_lgamma import shifted_lgamma_sum
from bayesdream_model.distributions.negbinom import nb_log_likelihood, nb_statistics
from bayesdream_model.sparse import SparseCounts
from bayesdream_model.streaming import InMemoryCells, merged_tensors

from .test_exactness import baselines

VALUE_RTOL, PIECE_RTOL, GRAD_RTOL = 2e-7, 1e-7, 2e-6
REGIMES = ("moderate", "tiny_mu", "huge_mu", "poisson", "phi_tiny")
MEANS = {"tiny_mu": (1e-3, 1e-2), "huge_mu": (1e3, 1e5)}


# -- the tabulated term ------------------------------------------------------------------
def _table_case(spread: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    groups = np.sort(rng.integers(0, 3, 3000))
    sf = np.exp(rng.uniform(-spread, spread, groups.size))
    bounds = np.searchsorted(groups, np.arange(4))
    table = {k: torch.as_tensor(v) for k, v in log1p_table(sf, bounds).items()}
    x = torch.as_tensor(np.exp(rng.uniform(np.log(1e-12), np.log(1e10), (3, 2000))))
    _, _, x_low, x_high = table["sf_grid"]
    x[:, :4] = torch.stack([x_low, x_high, x_low * (1 + 1e-12), x_high * (1 - 1e-12)])
    return torch.as_tensor(sf), bounds, table, x


@pytest.mark.parametrize("spread", [0.0, np.log(10.0), np.log(100.0)])
def test_tabulated_log1p_equals_the_sum_over_cells(spread: float) -> None:
    """F_g(x) = Σ_n log1p(sf_n x) and dF/dx across all three branches and their boundaries;
    F - x F' (what the dispersion gradient reads near the Poisson limit) to 1e-7 of F a."""
    sf, bounds, table, x = _table_case(spread)
    value, slope = evaluate(x, table)
    for g, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        a = sf[lo:hi, None] * x[g][None]  # [cells, points]
        exact = torch.log1p(a).sum(0)
        exact_slope = (sf[lo:hi, None] / (1 + a)).sum(0)
        difference = (torch.log1p(a) - a / (1 + a)).sum(0)
        torch.testing.assert_close(value[g], exact, rtol=1e-11, atol=0)
        torch.testing.assert_close(slope[g], exact_slope, rtol=1e-9, atol=0)
        scale = exact * a.max(0).values.clamp(min=1e-8)
        assert ((value[g] - x[g] * slope[g] - difference).abs() <= 1e-7 * scale).all()


# -- the pass over the non-zeros -------------------------------------------------------------
def _counts(rng: np.random.Generator, n_cells: int, n_features: int, density: float):
    y = (rng.random((n_cells, n_features)) < density) * (
        1.0 + rng.poisson(3.0, (n_cells, n_features))
    )
    y[:, 0] = 0.0  # an empty feature
    return y.astype(np.float32)


@pytest.mark.parametrize("block_bytes", [4096, 64 * 2**20])  # 4096: one feature a block
def test_weighted_table_equals_the_direct_sum(
    monkeypatch: pytest.MonkeyPatch, block_bytes: int
) -> None:
    """H_gt(x) = Σ_n y log1p(sf_n x) and dH/dx for x across all three branches (x from
    1e-9 to 1e9), whatever the feature blocks it was built in; and, where a = sf x >> 1,
    Y - x dH/dx = Σ y / (1 + a), the small difference the dispersion gradient reads there.
    Tolerances: value 1e-10 of Σ y, gradient 1e-7 relative (measured 3e-11 and 2e-8 at
    STEP = 0.2: the quintic's O(STEP^6) and O(STEP^5)); Σ y / (1 + a) 1e-7 relative
    (measured 2.5e-8: float64 rounding of W ~ Y against a difference ~1e-5 Y)."""
    monkeypatch.setattr(weighted_log1p, "BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(3)
    groups = rng.integers(0, 3, 300)
    y = rng.poisson(rng.gamma(0.5, 20.0, (300, 40))).astype(np.float32)
    y[rng.random(y.shape) < 0.4] = 0.0
    y[:, 0] = 0.0  # an empty feature
    sf = np.exp(rng.uniform(-2.3, 2.3, 300)).astype(np.float32)
    stats = nb_statistics(FitArrays(y=y, groups=groups, n_groups=3, sum_factor=sf), "cpu")
    x = torch.as_tensor(np.exp(rng.uniform(np.log(1e-9), np.log(1e9), (3, 40))))
    _, _, x_low, x_high = stats["sf_grid"]
    x[:, 1:5] = torch.stack([x_low, x_high, x_low * (1 + 1e-12), x_high * (1 - 1e-12)])
    value, slope = weighted_log1p.evaluate_weighted(x, stats)
    leaf = x.clone().requires_grad_()
    a = torch.as_tensor(sf).double()[:, None] * leaf[groups]
    counts, index = torch.as_tensor(y).double(), torch.as_tensor(groups)
    exact = torch.zeros(3, 40, dtype=torch.float64).index_add(0, index, counts * torch.log1p(a))
    (exact_slope,) = torch.autograd.grad(exact.sum(), [leaf])
    totals = stats["group_totals"]
    assert ((value - exact.detach()).abs() <= 1e-10 * totals.clamp_min(1.0)).all()
    torch.testing.assert_close(slope, exact_slope, rtol=1e-7, atol=0)
    rest = torch.zeros(3, 40, dtype=torch.float64).index_add(0, index, counts / (1 + a.detach()))
    torch.testing.assert_close(totals - slope * x, rest, rtol=1e-7, atol=1e-300)


# -- the histogram's lgamma terms ---------------------------------------------------------------
@pytest.mark.parametrize("phi_scale", [1e-3, 1.0, 30.0, 1e5, 1e8])
def test_shifted_lgamma_equals_the_exact_sum(phi_scale: float) -> None:
    """Stirling's series for the values >= 16 (torch.lgamma for non-integer values below)
    against the sum computed by mpmath at 40 digits. Value to 1e-13 of the sum (the series'
    truncation is 1e-14 a pair). Gradient to 1e-10 of each feature's own: near the Poisson
    limit it is a sum of digamma differences of ~v/φ, which a float64 difference of two
    digammas (~log φ each) keeps to only ~16 - log10(φ log φ / v) digits; the series forms
    each difference directly."""
    import mpmath  # in the test extra: where it is missing, this test fails, never skips

    mpmath.mp.dps = 40
    rng = np.random.default_rng(int(np.log10(phi_scale) + 10))
    n_features, n_pairs = 20, 600
    phi = phi_scale * np.exp(rng.normal(0.0, 1.0, n_features))
    feature = rng.integers(0, n_features, n_pairs)
    value = rng.integers(17, 5000, n_pairs).astype(np.float64)
    value[:30] = rng.uniform(0.01, 16.0, 30)  # non-integer (ambient-corrected) counts
    count = rng.integers(1, 100, n_pairs).astype(np.float64)
    leaf = torch.as_tensor(phi).requires_grad_()
    got = shifted_lgamma_sum(leaf, *(torch.as_tensor(a) for a in (feature, value, count)))
    (grad,) = torch.autograd.grad(got, [leaf])
    want, want_grad = mpmath.mpf(0), [mpmath.mpf(0)] * n_features
    for f, v, c in zip(feature, value, count, strict=True):
        p, v = mpmath.mpf(float(phi[f])), mpmath.mpf(float(v))
        want += c * (mpmath.loggamma(p + v) - mpmath.loggamma(p))
        want_grad[f] += c * (mpmath.digamma(p + v) - mpmath.digamma(p))
    assert abs(got.item() - float(want)) <= 1e-13 * abs(float(want))
    expected = torch.as_tensor([float(g) for g in want_grad], dtype=torch.float64)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("phi_scale", [1e-3, 1.0, 30.0, 1e5, 1e8])
def test_segment_interpolants_equal_the_series(phi_scale: float) -> None:
    """The fit's interpolants of each feature's lgamma sum in s = log φ against the pair-by-
    pair series (itself checked against mpmath above), φ spread over several segments and
    on their edges: value to 1e-14 of the sum (float64 rounding of the node values, ~1e-16,
    with margin), gradient to 1e-8 of each feature's own. Where φ << 1 the gradient C/φ is
    a difference of terms ~v log v larger, whose rounding at the nodes the interpolant's
    derivative carries (measured: up to 4e-9); everywhere else it is 1e-10 or better."""
    rng = np.random.default_rng(int(np.log10(phi_scale) + 20))
    n_features, n_pairs = 40, 4000
    feature = rng.integers(1, n_features, n_pairs)  # feature 0 has no pairs
    value = rng.integers(16, 3000, n_pairs).astype(np.float64)
    value[:30] = rng.uniform(0.01, 16.0, 30)  # non-integer counts: torch.lgamma
    count = rng.integers(1, 60, n_pairs).astype(np.float64)
    pairs = [torch.as_tensor(a) for a in (feature, value, count)]
    segments = SegmentedLgamma(*pairs, n_features)
    for trial in range(4):
        phi = phi_scale * np.exp(rng.normal(0.0, 1.5, n_features))
        if trial == 0:  # on segment edges and just inside them
            edges = np.exp(SEGMENT_WIDTH * np.round(np.log(phi) / SEGMENT_WIDTH))
            phi = edges * np.where(np.arange(n_features) % 2, 1.0, 1.0 - 1e-15)
        leaf = torch.as_tensor(phi).requires_grad_()
        want = shifted_lgamma_sum(leaf, *pairs)
        (want_grad,) = torch.autograd.grad(want, [leaf])
        got = segments(leaf)
        (grad,) = torch.autograd.grad(got, [leaf])
        assert abs(got.item() - want.item()) <= 1e-14 * abs(want.item())
        assert grad[0] == 0.0
        torch.testing.assert_close(grad[1:], want_grad[1:], rtol=1e-8, atol=0)
    assert segments.built >= n_features - 1  # one interpolant a feature and segment at least


def test_segment_interpolants_do_not_depend_on_what_came_before() -> None:
    """A segment's interpolant is built from the data and the segment alone: a fresh
    object gives the same value, bit for bit, as one that built other segments first (a
    resumed fit takes the very steps of the uninterrupted one); φ that is not finite and
    positive falls back to the series."""
    rng = np.random.default_rng(5)
    feature = rng.integers(0, 10, 800)
    value = rng.integers(16, 400, 800).astype(np.float64)
    pairs = [torch.as_tensor(a) for a in (feature, value, np.ones(800))]
    phi = torch.as_tensor(np.exp(rng.normal(2.0, 0.3, 10)))
    warm = SegmentedLgamma(*pairs, 10)
    for scale in (1e-2, 1e3, 1e6):
        warm(phi * scale)
    assert warm(phi).item() == SegmentedLgamma(*pairs, 10)(phi).item()
    broken = phi.clone()
    broken[3] = float("nan")
    assert torch.isnan(warm(broken))


# -- the whole likelihood against the dense baseline ------------------------------------------
def regime_case(regime: str, n_groups: int, seed: int, n_cells: int = 400, n_features: int = 30):
    """Counts drawn from the model in `regime`, and parameter leaves moved off the truth."""
    rng = np.random.default_rng([seed, n_groups, REGIMES.index(regime)])
    groups = rng.integers(0, n_groups, n_cells)
    groups[:n_groups] = np.arange(n_groups)
    sf = np.exp(rng.uniform(np.log(0.1), np.log(10.0), n_cells))  # two orders of magnitude
    lo, hi = MEANS.get(regime, (0.05, 20.0))
    mu = np.exp(rng.uniform(np.log(lo), np.log(hi), n_features))
    o_y = {
        "poisson": np.full(n_features, 3e-3),  # phi ~ 1.1e5
        "phi_tiny": rng.uniform(10.0, 30.0, n_features),  # phi ~ 1e-3 to 1e-2
    }.get(regime, rng.uniform(0.2, 1.5, n_features))
    effect = rng.normal(0.0, 1.0, (n_groups - 1, n_features)).clip(-2.5, 2.5)
    rows = np.concatenate([np.zeros((1, n_features)), effect])[groups]
    mean, phi = mu * np.exp2(rows) * sf[:, None], 1.0 / o_y**2
    y = rng.poisson(rng.gamma(phi, mean / phi)).astype(np.float32)
    data = FitArrays(y=y, groups=groups, n_groups=n_groups, sum_factor=sf.astype(np.float32))
    moved = {
        "mu_ntc": mu * np.exp(rng.normal(0.0, 0.3, n_features)),
        "o_y": o_y * np.exp(rng.normal(0.0, 0.3, n_features)),
        "log2_alpha_y": effect + rng.normal(0.0, 0.3, effect.shape),
    }
    if n_groups == 1:
        del moved["log2_alpha_y"]
    params = {k: torch.tensor(v, dtype=torch.float32, requires_grad=True) for k, v in moved.items()}
    return data, params


def dense_reference(data: FitArrays, params: dict):
    """Dense float64 terms [N, T], their sum's gradients, and Σ y log1p(a) (the pieces)."""
    leaves = {k: v.detach().double().requires_grad_() for k, v in params.items()}
    wide = FitArrays(
        y=data.y.astype(np.float64),
        groups=data.groups,
        n_groups=data.n_groups,
        sum_factor=data.sum_factor.astype(np.float64),
    )
    terms = baselines.dense_log_likelihood("negbinom", leaves, wide)
    grads = torch.autograd.grad(terms.sum(), list(leaves.values()))
    phi = 1.0 / leaves["o_y"].detach() ** 2
    rows = torch.zeros(data.n_groups, data.n_features, dtype=torch.float64)
    if "log2_alpha_y" in leaves:
        rows[1:] = leaves["log2_alpha_y"].detach()
    m = leaves["mu_ntc"].detach() * torch.exp2(rows)[data.groups]
    a = torch.as_tensor(wide.sum_factor)[:, None] * m / (phi + 2e-8)
    pieces = (torch.as_tensor(wide.y) * torch.log1p(a)).sum().item()
    return terms.detach(), dict(zip(leaves, grads, strict=True)), pieces


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("n_groups", [1, 3])
@pytest.mark.parametrize("regime", REGIMES)
def test_split_likelihood_equals_dense_baseline(regime: str, n_groups: int, seed: int) -> None:
    data, params = regime_case(regime, n_groups, seed)
    value = baselines.fast_log_likelihood(get_family("negbinom"), params, data)
    grads = dict(zip(params, torch.autograd.grad(value, list(params.values())), strict=True))
    terms, expected, pieces = dense_reference(data, params)
    tolerance = VALUE_RTOL * terms.abs().sum().item() + PIECE_RTOL * pieces
    assert abs(value.item() - terms.sum().item()) <= tolerance
    for key, want in expected.items():
        got = grads[key].double()
        assert torch.isfinite(got).all(), key
        error = (got - want).abs().max().item() / want.abs().max().item()
        assert error <= GRAD_RTOL, f"{regime}, C = {n_groups}: {key} off by {error:.1e}"


def test_sparse_input_gives_the_same_statistics_and_likelihood() -> None:
    """The fit matrix held as its non-zeros is read exactly as the dense one."""
    data, params = regime_case("moderate", 3, 0)
    sparse = FitArrays(
        y=SparseCounts.from_dense(data.y),
        groups=data.groups,
        n_groups=3,
        sum_factor=data.sum_factor,
    )
    dense_stats, sparse_stats = nb_statistics(data, "cpu"), nb_statistics(sparse, "cpu")
    assert dense_stats.keys() == sparse_stats.keys()
    for key, value in dense_stats.items():
        torch.testing.assert_close(sparse_stats[key], value, rtol=0, atol=0, msg=key)
    assert (
        nb_log_likelihood(params, sparse_stats).item()
        == nb_log_likelihood(params, dense_stats).item()
    )


def test_batches_merge_into_the_whole_fits_statistics() -> None:
    """A streamed fit merges each cell batch's statistics once: tables built on the fit
    cells' size-factor range add up to the whole's (float64 sums in another order), the
    value histograms join, and a batch missing a group leaves the merged floor alone."""
    data, params = regime_case("moderate", 3, 0, n_cells=600)
    order = np.argsort(data.groups == 2, kind="stable")  # the last batch is group 2 only
    data = FitArrays(
        y=data.y[order], groups=data.groups[order], n_groups=3, sum_factor=data.sum_factor[order]
    )
    source = InMemoryCells(data, batch_cells=150)
    assert (source.read_batch(0).groups != 2).all() and source.n_batches == 4
    family = get_family("negbinom")
    merged = merged_tensors(family, source, "cpu").stats
    whole = nb_statistics(data, "cpu")
    assert merged.keys() == whole.keys()
    for key, value in whole.items():
        got = merged[key]
        if key.startswith(("pair_", "base_entry_")):  # the same entries, in another order
            got, value = got.sort().values, value.sort().values
        if key != "sf_coef":  # its top coefficients cancel: compared by value below
            torch.testing.assert_close(got, value, rtol=1e-12, atol=1e-9, msg=key)
    x = torch.logspace(-9, 9, 400, dtype=torch.float64).expand(3, -1)
    for got, want in zip(evaluate(x, merged), evaluate(x, whole), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=0)
    assert abs(
        nb_log_likelihood(params, merged).item() - nb_log_likelihood(params, whole).item()
    ) <= 1e-6 * abs(nb_log_likelihood(params, whole).item())
