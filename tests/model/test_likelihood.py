"""The negbinom likelihood the fit optimises equals the NB log-likelihood of docs/model.md, value and gradient.

docs/model.md: mu = mu_ntc[t] * 2**log2_alpha[g, t] * sf[n];
y ~ NB(total_count = phi, logits = log(mu + 1e-8) - log(phi + 1e-8)), phi = 1 / o_y^2.
The family may compute it any way it likes (sufficient statistics, sorted cells, a custom
backward); here it is compared with torch's NegativeBinomial on every cell, in float64.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from factories import counts_matrix
from pyro import poutine

from bayesdream_model.data import FitArrays
from bayesdream_model.distributions import get_family
from bayesdream_model.distributions.nb import value_histogram
from bayesdream_model.plates import Plates

LOG_EPS = 1e-8


def data_and_params(n_groups: int, seed: int = 0) -> tuple[FitArrays, dict[str, torch.Tensor]]:
    y, groups, sum_factor = counts_matrix(n_cells=90, n_features=7, n_groups=n_groups, seed=seed)
    y[:, 3] = 0.0  # an all-zero feature
    y[::2, 4] = 0.0  # many zeros
    y[5, 5] = 250.0  # a large count
    data = FitArrays(y=y, groups=groups, n_groups=n_groups, sum_factor=sum_factor)
    gen = torch.Generator().manual_seed(seed)
    params = {
        "mu_ntc": torch.rand(7, generator=gen) * 10 + 0.5,
        "o_y": torch.rand(7, generator=gen) + 0.2,
        "log2_alpha_y": torch.randn(n_groups - 1, 7, generator=gen) if n_groups > 1 else None,
    }
    return data, params


def reference(data: FitArrays, params: dict[str, torch.Tensor | None]) -> torch.Tensor:
    """Σ over cells and features of torch's NB log-probability (float64)."""
    mu_ntc = params["mu_ntc"].double()
    effect = params["log2_alpha_y"]
    log2_alpha = torch.zeros(data.n_groups, mu_ntc.shape[0], dtype=torch.float64)
    if effect is not None:
        log2_alpha = torch.cat([log2_alpha[:1], effect.double()])
    phi = 1.0 / params["o_y"].double() ** 2
    sf = torch.as_tensor(data.sum_factor, dtype=torch.float64)[:, None]
    mu = mu_ntc * torch.exp2(log2_alpha)[torch.as_tensor(data.groups)] * sf  # [N, T]
    logits = torch.log(mu + LOG_EPS) - torch.log(phi + LOG_EPS)
    nb = torch.distributions.NegativeBinomial(total_count=phi, logits=logits)
    return nb.log_prob(torch.as_tensor(data.y, dtype=torch.float64)).sum()


def family_log_likelihood(data: FitArrays, params: dict[str, torch.Tensor | None]) -> torch.Tensor:
    """The log-likelihood term the family adds to the model (site `y`)."""
    family = get_family("negbinom")
    tensors = family.tensors(data, "cpu")
    plates = Plates.make(data.n_features, data.n_groups)
    trace = poutine.trace(family.observe).get_trace(params, tensors, plates)
    trace.compute_log_prob()
    return trace.nodes["y"]["log_prob_sum"]


def leaves(params: dict) -> dict[str, torch.Tensor | None]:
    return {k: None if v is None else v.clone().requires_grad_(True) for k, v in params.items()}


@pytest.mark.parametrize("n_groups", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_log_likelihood_value_and_gradient(n_groups: int, seed: int) -> None:
    data, params = data_and_params(n_groups, seed)
    ours, theirs = leaves(params), leaves(params)
    value = family_log_likelihood(data, ours)
    expected = reference(data, theirs)
    assert torch.isfinite(value)
    np.testing.assert_allclose(value.item(), expected.item(), rtol=2e-6)
    value.backward()
    expected.backward()
    for name, leaf in ours.items():
        if leaf is None:
            continue
        np.testing.assert_allclose(
            leaf.grad.numpy(), theirs[name].grad.numpy(), rtol=2e-4, atol=1e-3, err_msg=name
        )


def test_log_likelihood_does_not_depend_on_cell_order() -> None:
    data, params = data_and_params(3)
    order = np.random.default_rng(5).permutation(data.n_cells)
    shuffled = FitArrays(
        y=data.y[order], groups=data.groups[order], n_groups=3, sum_factor=data.sum_factor[order]
    )
    np.testing.assert_allclose(
        family_log_likelihood(shuffled, params).item(),
        family_log_likelihood(data, params).item(),
        rtol=1e-6,
    )


@pytest.mark.parametrize(("integers", "bins"), [(True, None), (True, 40 * 6), (False, None)])
def test_value_histogram_counts_and_sort_paths_agree(
    monkeypatch: pytest.MonkeyPatch, integers: bool, bins: int | None
) -> None:
    """The bincount path (integer counts up to a cap), the overflow of counts above the cap
    (`bins` = 40 x 6: counts above 4 are sorted) and the sort path give the same (feature,
    value) pairs in the same order, with the same counts."""
    rng = np.random.default_rng(0)
    cols = rng.integers(0, 40, size=5000)
    values = rng.poisson(3.0, size=5000).astype(np.float64) + 1.0
    if not integers:
        values += 0.5 * (rng.random(5000) < 0.2)  # corrected counts: the sort path only
    if bins is not None:
        monkeypatch.setattr(value_histogram, "HISTOGRAM_BINS", bins)
        assert (values > 4).any() and (values <= 4).any()
    pairs, counts = value_histogram._value_histogram(cols, values, 40)
    sorted_pairs, sorted_counts = value_histogram._sorted_histogram(cols, values)
    np.testing.assert_array_equal(pairs, sorted_pairs)
    np.testing.assert_array_equal(counts, sorted_counts)
    assert counts.sum() == 5000
    one = (pairs[0] == cols[0]) & (pairs[1] == values[0])
    assert counts[one].item() == int(((cols == cols[0]) & (values == values[0])).sum())
