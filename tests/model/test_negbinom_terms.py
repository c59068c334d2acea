"""The split negbinom likelihood equals the dense baseline to float32 resolution, in every regime.

`nb_log_likelihood` never touches a cell whose count is 0: the part of the log1p term that
reads every cell is a per-group function of one number, tabulated once
(`log1p_table`), and only the non-zero counts get a per-entry pass (`nonzero_log1p`).
Here, each piece against its direct float64 sum, and the whole against the dense per-cell
baseline of `benchmarks/baselines.py` (float64), on data drawn from the model in the
regimes where a split could lose accuracy: tiny means (the power-series branch and the
y log(mu + 1e-8) series), huge means and tiny phi (a = sf x >> 1: the asymptotic branch;
the gradient's information sits in Σ y / (1 + a)), phi near the Poisson limit (1e5: the
dispersion gradient is a difference of terms 1e5 x larger), C = 1 and C = 3, size factors
spread over two orders of magnitude. Parameters are moved off the generating values, so
that gradients are of the size of their terms.

Tolerances (float32: u = 6e-8). Values: the family returns float32, and its per-entry
pass evaluates each log1p(a) in float32, so VALUE_RTOL = 2e-7 of Σ|dense terms| (a few
roundings of the total) plus PIECE_RTOL = 1e-7 of Σ y log1p(a): float32 log1p is biased
by up to ~1/2 ulp (measured 4.5e-8 of the pieces at a ~ 1e4), and where a >> 1 the
pieces are up to 1e5 x the terms. This is the value only; the gradients do not see it.
Gradients: GRAD_RTOL = 2e-6 of the largest |element| of each parameter; measured 2e-8 to
7e-7 (the old fused float32 pass: 1e-5 to 1e-2; a float32 dense baseline: up to 3e2 near
the Poisson limit).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bayesdream_model.distributions.nonzero_log1p as nonzero_log1p
from bayesdream_model.data import FitArrays
from bayesdream_model.distributions import get_family
from bayesdream_model.distributions.log1p_table import evaluate, log1p_table
from bayesdream_model.distributions.negbinom import nb_log_likelihood, nb_statistics
from bayesdream_model.sparse import SparseCounts

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


@pytest.mark.parametrize("block", [7, 1 << 17])  # 7: rounded up to one chunk
def test_nonzero_pass_equals_the_direct_sum(monkeypatch: pytest.MonkeyPatch, block: int) -> None:
    """Σ y log1p(sf x) and its gradient, whatever the blocks (runs cut by a block boundary
    are summed in both), for x small, near 1 and large."""
    monkeypatch.setitem(nonzero_log1p.BLOCK_ENTRIES, "cpu", block)
    rng = np.random.default_rng(3)
    groups = rng.integers(0, 3, 200)
    data = FitArrays(
        y=_counts(rng, 200, 12, 0.3),
        groups=groups,
        n_groups=3,
        sum_factor=np.exp(rng.uniform(-2.3, 2.3, 200)),
    )
    stats = nb_statistics(data, "cpu")
    x = torch.as_tensor(np.exp(rng.uniform(np.log(1e-4), np.log(1e4), (3, 12)))).requires_grad_()
    totals = stats["group_totals"].T.reshape(-1)
    got = nonzero_log1p.NonzeroLog1p.apply(x.T.reshape(-1), totals, stats)
    (grad,) = torch.autograd.grad(got, [x])
    sf = torch.as_tensor(data.sum_factor, dtype=torch.float32).double()  # as the entries hold it
    leaf = x.detach().clone().requires_grad_()
    exact = (torch.as_tensor(data.y).double() * torch.log1p(sf[:, None] * leaf[groups])).sum()
    (exact_grad,) = torch.autograd.grad(exact, [leaf])
    torch.testing.assert_close(got.detach(), exact.detach(), rtol=1e-7, atol=0)
    torch.testing.assert_close(
        grad, exact_grad, rtol=1e-6, atol=1e-9 * exact_grad.abs().max().item()
    )


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
