"""Every family's feature filters on planted features (docs/model.md "Feature filters").

Each test builds ordinary random features plus one planted feature per rule, and checks
which flags each planted feature raises and that the ordinary ones raise none. Also the
multinomial category mask, and that masked categories stay exactly 0 in posterior draws
of the effects while the effects are centred over k the way docs/model.md words it ("set to 0 at
masked categories, centred over k, re-masked").
"""

from __future__ import annotations

import numpy as np
import pytest

from bayesdream_model.data import FitArrays
from bayesdream_model.distributions import get_family
from bayesdream_model.distributions.multinomial import category_mask
from bayesdream_model.fit import FitOptions, fit_technical
from bayesdream_model.memory import SamplingPlan
from bayesdream_model.posterior import posterior_batches

N_CELLS = 60


def groups_for(n_groups: int, seed: int = 0) -> np.ndarray:
    groups = np.arange(N_CELLS) % n_groups  # every group has cells
    np.random.default_rng(seed).shuffle(groups)
    return groups


def flag_table(flags) -> dict[str, list[int]]:
    """{flag: the features that raise it}, for readable assertion messages."""
    return {name: np.flatnonzero(values).tolist() for name, values in flags.as_dict().items()}


def assert_flags(flags, *, zero_count=(), zero_std=(), single=(), n_features: int) -> None:
    """Exactly these features raise each flag; excluded = any; applied = not excluded."""
    table = flag_table(flags)
    assert table["ntc_zero_count"] == sorted(zero_count), table
    assert table["ntc_zero_std"] == sorted(zero_std), table
    assert table["ntc_single_category"] == sorted(single), table
    excluded = sorted(set(zero_count) | set(zero_std) | set(single))
    assert table["ntc_excluded_from_fit"] == excluded, table
    applied = [t for t in range(n_features) if t not in excluded]
    assert table["technical_correction_applied"] == applied, table


# -- negbinom ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n_groups", [1, 3])
def test_negbinom_flags(n_groups: int) -> None:
    rng = np.random.default_rng(1)
    y = rng.poisson(4.0, size=(N_CELLS, 5)).astype(np.float64)
    y[:, 2] = 0.0  # all zero: zero count (and zero std)
    y[:, 3] = 7.0  # constant: zero std only
    y[:, 4] = 0.0
    y[11, 4] = 1.0  # a single non-zero cell: kept
    data = FitArrays(y, groups_for(n_groups), n_groups, sum_factor=np.ones(N_CELLS))
    flags = get_family("negbinom").flags(data)
    assert_flags(flags, zero_count=[2], zero_std=[2, 3], n_features=5)


# -- binomial ---------------------------------------------------------------------------------
def binomial_planted(n_groups: int) -> tuple[FitArrays, dict[str, int]]:
    """Features 0-1 ordinary; one planted feature per rule (indices in the dict)."""
    rng = np.random.default_rng(2)
    groups = groups_for(n_groups)
    t = 9
    n = rng.poisson(10.0, size=(N_CELLS, t)).astype(np.float64) + 1.0
    y = rng.binomial(n.astype(np.int64), 0.4).astype(np.float64)
    n[:5, 0] = 0.0  # an ordinary feature with some n = 0 cells
    y[:5, 0] = 0.0
    planted = {
        "no_valid": 2,
        "constant_ratio": 3,
        "all_zero": 4,
        "group_no_valid": 5,
        "group_psi0": 6,
        "group_psi1": 7,
        "psi1_where_valid": 8,
    }
    n[:, 2], y[:, 2] = 0.0, 0.0  # no cell with n > 0 (and y = 0 everywhere)
    y[:, 3] = n[:, 3] / 2.0  # ratio 0.5 in every valid cell
    n[::3, 3] = 0.0  # (invalid cells do not count)
    y[::3, 3] = 0.0
    y[:, 4] = 0.0  # PSI = 0 everywhere: zero count
    last = groups == n_groups - 1
    n[last, 5], y[last, 5] = 0.0, 0.0  # one group without a valid cell
    y[last, 6] = 0.0  # PSI = 0 in one group
    y[last, 7] = n[last, 7]  # PSI = 1 in one group
    y[last, 8] = n[last, 8]  # PSI = 1 in one group's valid cells; its other cells n = 0
    n[np.flatnonzero(last)[:2], 8] = 0.0
    y[np.flatnonzero(last)[:2], 8] = 0.0
    return FitArrays(y, groups, n_groups, denominator=n), planted


@pytest.mark.parametrize("n_groups", [1, 3])
def test_binomial_flags(n_groups: int) -> None:
    data, p = binomial_planted(n_groups)
    flags = get_family("binomial").flags(data)
    zero_std = [
        p["no_valid"],
        p["constant_ratio"],
        p["all_zero"],
        p["group_no_valid"],
        p["group_psi0"],
        p["group_psi1"],
        p["psi1_where_valid"],
    ]
    zero_count = [p["no_valid"], p["all_zero"]]
    if n_groups == 1:  # "one group" is every cell: all n = 0 / PSI 0 / PSI 1 overall
        zero_count.append(p["group_no_valid"])
        zero_count.append(p["group_psi0"])
    assert_flags(flags, zero_count=zero_count, zero_std=zero_std, n_features=9)


def test_binomial_boundary_in_one_group_only_is_enough() -> None:
    """PSI 0 / PSI 1 / no valid cell in group 1 of 3 while the other groups are ordinary."""
    data, p = binomial_planted(3)
    valid = data.denominator > 0
    ratio = np.where(valid, data.y / np.where(valid, data.denominator, 1), np.nan)
    for key in ("group_psi0", "group_psi1", "group_no_valid"):
        others = data.groups != 2
        assert np.nanstd(ratio[others, p[key]]) > 0  # the feature is ordinary elsewhere
    assert get_family("binomial").flags(data).ntc_zero_std[[p["group_psi0"], p["group_psi1"]]].all()


# -- normal / studentt -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["normal", "studentt"])
@pytest.mark.parametrize("n_groups", [1, 3])
def test_continuous_flags(name: str, n_groups: int) -> None:
    rng = np.random.default_rng(3)
    groups = groups_for(n_groups)
    y = rng.normal(1.0, 2.0, size=(N_CELLS, 7))
    y[rng.random(y.shape) < 0.2] = np.nan  # ordinary features with missing values: kept
    y[:3, 1] = [np.inf, -np.inf, np.nan]  # Inf is missing too
    y[:, 2] = np.nan  # no finite value
    y[:20, 2] = np.inf
    y[:, 3] = 2.5  # constant over its finite values
    y[::4, 3] = np.nan
    y[groups == n_groups - 1, 4] = np.nan  # every value missing in one group
    y[:, 5] = rng.normal(0.0, 1.0, N_CELLS)
    y[:, 5] -= y[:, 5].mean()  # finite values summing to ~0 (not exactly): kept
    y[:, 6] = 0.0  # constant 0: zero total and zero std
    data = FitArrays(y, groups, n_groups)
    flags = get_family(name).flags(data)
    assert abs(np.nansum(y[:, 5])) > 0
    zero_std = [2, 3, 4, 6]
    zero_count = [2, 4, 6] if n_groups == 1 else [2, 6]  # (4 has no finite value when C = 1)
    assert_flags(flags, zero_count=zero_count, zero_std=zero_std, n_features=7)


# -- multinomial -------------------------------------------------------------------------------
K = 4


def multinomial_planted(n_groups: int) -> tuple[FitArrays, dict[str, int]]:
    rng = np.random.default_rng(4)
    groups = groups_for(n_groups)
    t = 7
    probs = rng.dirichlet(np.full(K, 3.0), size=t)
    y = np.stack([rng.multinomial(15, probs[f], size=N_CELLS) for f in range(t)], axis=1)
    y = y.astype(np.float64)  # [N, T, K]
    planted = {
        "all_zero": 2,
        "constant_ratio": 3,
        "single": 4,
        "single_with_extra": 5,
        "masked_category": 6,
    }
    y[:, 2] = 0.0
    y[:, 3] = np.array([2.0, 1.0, 1.0, 0.0]) * rng.integers(1, 5, N_CELLS)[:, None]
    y[:, 4] = 0.0
    y[:, 4, 1] = rng.integers(1, 9, N_CELLS)  # one category only
    y[:, 5] = 0.0
    y[:, 5, 0] = rng.integers(1, 9, N_CELLS)  # category 0 everywhere,
    y[groups == 0, 5, 2] = rng.integers(1, 3, (groups == 0).sum())  # category 2 in group 0 only
    y[:, 6, 3] = 0.0  # category 3 never used: masked, but three categories left
    return FitArrays(y, groups, n_groups), planted


def test_multinomial_flags() -> None:
    data, p = multinomial_planted(3)
    flags = get_family("multinomial").flags(data)
    assert_flags(
        flags,
        zero_count=[p["all_zero"]],
        zero_std=[p["all_zero"], p["constant_ratio"], p["single"]],
        single=[p["all_zero"], p["single"], p["single_with_extra"]],
        n_features=7,
    )


def test_multinomial_single_group() -> None:
    """C = 1: 'in every group' is over all cells; a second category anywhere keeps it."""
    data, p = multinomial_planted(1)
    flags = get_family("multinomial").flags(data)
    assert_flags(
        flags,
        zero_count=[p["all_zero"]],
        zero_std=[p["all_zero"], p["constant_ratio"], p["single"]],
        single=[p["all_zero"], p["single"]],
        n_features=7,
    )


def test_multinomial_category_mask() -> None:
    """Masked where a category's total is 0 overall or in any group."""
    data, p = multinomial_planted(3)
    mask = category_mask(data)
    assert mask.shape == (7, K) and mask.dtype == bool
    expected = np.zeros((7, K), dtype=bool)
    expected[p["all_zero"]] = True
    expected[p["constant_ratio"], 3] = True
    expected[p["single"], [0, 2, 3]] = True
    expected[p["single_with_extra"], 1:] = True  # category 2 is missing in groups 1 and 2
    expected[p["masked_category"], 3] = True
    np.testing.assert_array_equal(mask, expected)


def _masked_screen() -> FitArrays:
    """Healthy features; feature 1 lacks category 3, feature 2 lacks category 0 in group 2."""
    rng = np.random.default_rng(6)
    groups = groups_for(3)
    probs = rng.dirichlet(np.full(K, 4.0), size=4)
    y = np.stack([rng.multinomial(20, probs[f], size=N_CELLS) for f in range(4)], axis=1)
    y = y.astype(np.float64)
    y[:, 1, 3] = 0.0
    y[groups == 2, 2, 0] = 0.0
    return FitArrays(y, groups, 3)


def test_multinomial_draws_keep_masked_categories_at_zero_and_are_centred() -> None:
    data = _masked_screen()
    family = get_family("multinomial")
    mask = category_mask(data)
    assert mask[1, 3] and mask[2, 0] and mask.sum() == 2
    fitted = fit_technical(family, data, FitOptions(niters=60, lr=0.01))
    plan = SamplingPlan(40, 40, True, 0, "one batch")
    ((_, _, draws),) = posterior_batches(fitted, plan, seed=3)
    add = draws["alpha_y_add"]  # [S, C, T, K]
    assert add.shape == (40, 3, 4, K) and np.isfinite(add).all()
    np.testing.assert_array_equal(add[:, 0], 0.0)  # baseline group
    np.testing.assert_array_equal(add[:, :, mask], 0.0)  # masked: exactly 0, every draw
    assert (add[:, 1:][:, :, ~mask] != 0).all()
    # features without masked categories: centred over k, up to float32 rounding of the raw
    # values, which are as wide as their prior along the mean over k (the data leave it free,
    # and the Laplace start's covariance says so)
    full = ~mask.any(axis=1)
    rounding = 1e-6 * max(1.0, float(np.abs(draws["alpha_logits_y"]).max()))
    np.testing.assert_allclose(add[:, :, full].mean(axis=-1), 0.0, atol=rounding)
    # with masked categories: the reference's order (zero the masked, centre over all K, re-mask),
    # so the mean over k of the result is (1 - U/K) x the mean of the unmasked raw values
    raw = np.where(mask, 0.0, draws["alpha_logits_y"])  # [S, C-1, T, K]
    expected = np.where(mask, 0.0, raw - raw.mean(axis=-1, keepdims=True))
    np.testing.assert_allclose(add[:, 1:], expected, rtol=1e-6, atol=1e-6)
    probs = draws["probs_baseline"]
    np.testing.assert_array_equal(probs[:, mask], 0.0)
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-5)
