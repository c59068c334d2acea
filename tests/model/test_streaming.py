"""Fitting from a `CellSource`: block-wise priors, merged statistics, streamed cell batches.

What must hold, for data that is never whole in memory:
- priors and initial values computed feature block by block equal the whole-matrix ones
  (every one of them is per feature);
- for binomial, multinomial, normal and negbinom the statistics merged batch by batch give
  the same log-likelihood as the whole matrix's (float32 sums: relative 1e-5);
- for Student-t, the batches' log-likelihoods add up to the whole one (so the batch drawn
  uniformly and scaled by the number of batches is unbiased), and the model applies
  exactly that scale;
- each epoch visits every batch once, and the batch depends on the step alone (resume);
- a negbinom fit from cell batches recovers known effects within the sampling-noise
  bounds of tests/model/test_recovery.py, and resumes bit for bit.
"""

from __future__ import annotations

import io
import threading

import numpy as np
import pyro
import pytest
import torch
from factories import negbinom_screen
from pyro import poutine

import bayesdream_model.guides
from bayesdream_model.constants import OBS_SITE
from bayesdream_model.data import FitArrays
from bayesdream_model.distributions import get_family
from bayesdream_model.fit import FitOptions, fit_technical
from bayesdream_model.inference import Checkpointing
from bayesdream_model.memory import SamplingPlan
from bayesdream_model.model import TechnicalModel
from bayesdream_model.posterior import posterior_batches
from bayesdream_model.streaming import (
    CellStream,
    InMemoryCells,
    blockwise_inputs,
    even_bounds,
    merged_tensors,
    read_ahead,
)

from .test_families_recovery import Case, fit_arrays, simulate
from .test_recovery import check_recovery


def test_read_ahead_produces_the_next_piece_while_the_current_one_is_used() -> None:
    """In order; piece k + 1 is produced (in another thread) before the caller is done
    with piece k; no more than one ahead; an error in producing a piece reaches the caller."""
    produced = [threading.Event() for _ in range(4)]
    threads = set()

    def pieces():
        for k in range(4):
            threads.add(threading.get_ident())
            produced[k].set()
            yield k
        raise OSError("store went away")

    got = []
    with pytest.raises(OSError, match="store went away"):
        for k in read_ahead(pieces()):
            got.append(k)
            if k < 3:  # the caller is still busy with k: k + 1 arrives meanwhile
                assert produced[k + 1].wait(timeout=10)
            assert not any(e.is_set() for e in produced[k + 2 :])  # never two ahead
    assert got == [0, 1, 2, 3]
    assert threads and threading.get_ident() not in threads


FAMILIES = ("negbinom", "binomial", "multinomial", "normal", "studentt")


def arrays(name: str, n_cells: int = 300, n_features: int = 23) -> FitArrays:
    """Simulated fit data of family `name`, 3 groups."""
    if name == "negbinom":
        return negbinom_screen(n_cells=n_cells, n_features=n_features, n_groups=3, seed=1)[1]
    case = Case(n_cells=n_cells, n_features=n_features)
    return fit_arrays(simulate(name, case), case.n_groups)


def source(data: FitArrays, batch_cells: int = 70) -> InMemoryCells:
    """5 batches of 60 cells, features in blocks of 7 (23 = 7 + 7 + 7 + 2)."""
    return InMemoryCells(data, batch_cells=batch_cells, block_features=7)


def obs_log_lik(family, inputs, tensors=None, stream=None, seed: int = 0) -> float:
    """The likelihood factor of one model trace, latents drawn from the prior by `seed`."""
    pyro.set_rng_seed(seed)
    model = TechnicalModel(family, inputs, 3, tensors, stream)
    trace = poutine.trace(model).get_trace()
    trace.compute_log_prob()
    return float(trace.nodes[OBS_SITE]["log_prob_sum"])


@pytest.mark.parametrize("name", FAMILIES)
def test_blockwise_priors_and_inits_equal_the_whole(name: str) -> None:
    family, data = get_family(name), arrays(name)
    priors, inits = blockwise_inputs(family, source(data))
    whole_priors, whole_inits = family.prior_inputs(data), family.initial_values(data)
    assert priors.keys() == whole_priors.keys() and inits.keys() == whole_inits.keys()
    for key in whole_priors:
        torch.testing.assert_close(priors[key], whole_priors[key], msg=key)
    for key in whole_inits:
        torch.testing.assert_close(inits[key], whole_inits[key], msg=key)


@pytest.mark.parametrize("name", ["binomial", "multinomial", "normal", "negbinom"])
def test_merged_statistics_give_the_whole_likelihood(name: str) -> None:
    family, data = get_family(name), arrays(name)
    inputs = family.prior_inputs(data)
    merged = merged_tensors(family, source(data), "cpu")
    assert merged is not None
    for seed in range(3):
        whole = obs_log_lik(family, inputs, family.tensors(data, "cpu"), seed=seed)
        assert obs_log_lik(family, inputs, merged, seed=seed) == pytest.approx(whole, rel=1e-5)


@pytest.mark.parametrize("name", ["studentt"])
def test_batches_add_up_to_the_whole_likelihood_and_are_scaled(name: str) -> None:
    family, data = get_family(name), arrays(name)
    cells = source(data)
    assert merged_tensors(family, cells, "cpu") is None  # reads every cell: streamed
    inputs = family.prior_inputs(data)
    whole = obs_log_lik(family, inputs, family.tensors(data, "cpu"))
    parts = [
        obs_log_lik(family, inputs, family.tensors(cells.read_batch(k), "cpu"))
        for k in range(cells.n_batches)
    ]
    assert sum(parts) == pytest.approx(whole, rel=1e-5)
    stream = CellStream(family, cells, "cpu", seed=4)
    try:
        for step in range(cells.n_batches):
            stream.advance(step)
            k = stream.batch_index(step)
            scaled = obs_log_lik(family, inputs, stream=stream)
            assert scaled == pytest.approx(cells.n_batches * parts[k], rel=1e-5)
    finally:
        stream.close()


def test_every_epoch_visits_every_batch_once_in_a_step_determined_order() -> None:
    cells = source(arrays("negbinom"))
    stream, again = (CellStream(get_family("negbinom"), cells, "cpu", seed=2) for _ in "ab")
    n = cells.n_batches
    order = [stream.batch_index(step) for step in range(3 * n)]
    for epoch in range(3):
        assert sorted(order[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert order[:n] != order[n : 2 * n] or order[n : 2 * n] != order[2 * n :]  # reshuffled
    assert [again.batch_index(step) for step in range(3 * n)] == order
    stream.close()
    again.close()


def test_even_bounds_partition() -> None:
    bounds = even_bounds(300, 70)
    assert bounds[0] == 0 and bounds[-1] == 300 and len(bounds) == 6
    assert np.diff(bounds).max() <= 70 and np.diff(bounds).min() >= 59
    assert even_bounds(10, 50).tolist() == [0, 10]


def _mean_field(monkeypatch: pytest.MonkeyPatch) -> None:
    """the reference bayesDREAM's choice picks the IAF at this size on the CPU; force mean-field."""
    monkeypatch.setattr(bayesdream_model.guides, "CPU_FLOW_MAX_LATENT", 0)


@pytest.mark.slow  # statistical: recovery
def test_batched_negbinom_fit_recovers_known_effects(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same screen and settings as test_recovery's mean-field case, in 5 batches of cells."""
    _mean_field(monkeypatch)
    screen, data = negbinom_screen(n_cells=1500, n_features=40, n_groups=3, seed=0)
    fitted = fit_technical(
        get_family("negbinom"),
        InMemoryCells(data, batch_cells=300),
        FitOptions(niters=1000, lr=0.01, guide="mean_field"),
    )
    assert fitted.guide_kind == "mean_field"
    plan = SamplingPlan(300, 300, True, 0, "one batch")
    ((_, _, draws),) = posterior_batches(fitted, plan, seed=0)
    check_recovery(screen, draws)


def test_batched_fit_resumes_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    _mean_field(monkeypatch)
    _, data = negbinom_screen(n_cells=200, n_features=10, n_groups=3, seed=3)
    family, options = get_family("negbinom"), FitOptions(niters=40, lr=0.01, guide="mean_field")
    saved: list[bytes] = []

    def save(state: dict) -> None:
        if len(state["losses"]) == 17:  # a kill after step 17
            buffer = io.BytesIO()
            torch.save(state, buffer)
            saved.append(buffer.getvalue())

    cells = InMemoryCells(data, batch_cells=45)
    full = fit_technical(family, cells, options, checkpointing=Checkpointing(save, every_s=0.0))
    assert len(saved) == 1
    state = torch.load(io.BytesIO(saved[0]), weights_only=False)
    resumed = fit_technical(
        family, cells, options, checkpointing=Checkpointing(lambda s: None, state, 0.0)
    )
    np.testing.assert_array_equal(resumed.svi.losses, full.svi.losses)
    for key, value in full.params().items():
        np.testing.assert_array_equal(resumed.params()[key], value, err_msg=key)
