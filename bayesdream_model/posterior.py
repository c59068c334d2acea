"""Posterior draws in batches: latent sites from the guide, results derived from them.

The model runs with `observe=False`, so the likelihood is never evaluated: heavy-tailed
draws cannot turn into NaN through it, and no [S, N, T] tensor is built.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import Predictive

from bayesdream_model.fit import FittedModel
from bayesdream_model.memory import SamplingPlan

log = logging.getLogger(__name__)


def latent_shapes(fitted: FittedModel) -> dict[str, torch.Size]:
    """Each latent site's shape in one draw (from a trace of the guide)."""
    with torch.no_grad():
        trace = poutine.trace(fitted.guide).get_trace(observe=False)
    return {
        name: site["value"].shape
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and name in fitted.family.latent_sites
    }


def draw_batch(fitted: FittedModel, size: int, *, parallel: bool) -> dict[str, torch.Tensor]:
    """`size` draws of every latent site, shaped [size, *site shape]."""
    shapes = latent_shapes(fitted)
    predictive = Predictive(
        fitted.model,
        guide=fitted.guide,
        num_samples=size,
        return_sites=list(shapes),
        parallel=parallel,
    )
    with torch.no_grad():
        draws = predictive(observe=False)
    return {name: draws[name].reshape(size, *shapes[name]) for name in shapes}


def draw_range(
    fitted: FittedModel, start: int, stop: int, *, seed: int, parallel: bool = True
) -> dict[str, np.ndarray]:
    """Results for draws start..stop, seeded from (seed, start) alone.

    A range's draws therefore do not depend on which ranges were drawn before it: a
    resumed run redraws only what is missing and gets what the uninterrupted run got.
    """
    pyro.set_rng_seed((seed * 1_000_003 + start) % 2**32)  # numpy's seeds are 32-bit
    draws = draw_batch(fitted, stop - start, parallel=parallel)
    if fitted.refinement:
        draws = fitted.family.refine_draws(draws, fitted.refinement)
    derived = fitted.family.derive(draws, fitted.model.n_groups, fitted.model.inputs)
    return {k: v.detach().cpu().numpy() for k, v in derived.items()}


def posterior_batches(
    fitted: FittedModel, plan: SamplingPlan, *, seed: int, skip: frozenset[int] = frozenset()
) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
    """Yield (start, stop, results for the fit features) batch by batch (skipping `skip`)."""
    for index, (start, stop) in enumerate(plan.batches()):
        if start in skip:
            continue
        results = draw_range(fitted, start, stop, seed=seed, parallel=plan.parallel)
        log.info("posterior batch %d/%d (draws %d-%d)", index + 1, plan.n_batches, start, stop)
        yield start, stop, results
