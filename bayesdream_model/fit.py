"""Fit the technical model to the fit cells' data; rebuild a fitted guide from its params."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import pyro
import torch

from bayesdream_model.data import FitArrays
from bayesdream_model.distributions.base import Family
from bayesdream_model.errors import ModelError
from bayesdream_model.guides import (
    GuideKind,
    GuidePreference,
    build_guide,
    choose_guide,
    elbo_for,
)
from bayesdream_model.inference import (
    Checkpointing,
    ProgressFn,
    SviResult,
    SviSettings,
    run_svi,
)
from bayesdream_model.laplace import laplace_start
from bayesdream_model.model import TechnicalModel
from bayesdream_model.recovery import DivergenceError
from bayesdream_model.sparse import as_sparse
from bayesdream_model.streaming import CellSource, CellStream, blockwise_inputs, merged_tensors

log = logging.getLogger(__name__)

# Guides keep their parameters in the module, not in Pyro's global parameter store, so
# that fits (and restored fits) never overwrite each other's parameters by name. This is
# the package's one global setting; Pyro applies it to every PyroModule.
pyro.settings.set(module_local_params=True)


@dataclass(frozen=True)
class FitOptions:
    """Optimiser options; `niters=None` means the default for the family and guide."""

    niters: int | None = None
    lr: float = 1e-3
    tolerance: float = 1e-4
    seed: int = 0
    device: str = "cpu"
    vram_bytes: int | None = None
    guide: GuidePreference = "auto"
    convergence: Literal["plateau", "ewma"] = "plateau"
    #: "laplace": the per-feature guide starts at each feature's MAP and Laplace covariance
    #: (`bayesdream_model.laplace`) and SVI polishes it on a short schedule; "prior": it
    #: starts at the initial values (scales 0.1) on the reference's schedule, as the other
    #: guides and every fit under `convergence: ewma` always do.
    init: Literal["laplace", "prior"] = "laplace"
    #: names the fit in warnings and errors ("modality 'gene'")
    label: str | None = None


@dataclass(frozen=True)
class FittedModel:
    """A fitted guide with what is needed to sample from it and to store it."""

    family: Family
    model: TechnicalModel
    guide: object
    guide_kind: GuideKind
    n_features: int
    svi: SviResult | None = None
    #: what the posterior draws are refined with (`Family.refine_draws`; {}: nothing)
    refinement: dict[str, torch.Tensor] = field(default_factory=dict)
    #: per fit feature, bool [T] by name: what the results flag (`Family.feature_flags`,
    #: and `start_not_converged`: kept the initial values at the Laplace start)
    flags: dict[str, np.ndarray] = field(default_factory=dict)

    def params(self) -> dict[str, np.ndarray]:
        """The guide's state (unconstrained parameters), for storage."""
        return {k: v.detach().cpu().numpy() for k, v in self.guide.state_dict().items()}

    def prior_inputs(self) -> dict[str, np.ndarray]:
        """The empirical prior parameters, for storage."""
        return {k: v.detach().cpu().numpy() for k, v in self.model.inputs.items()}


def fit_technical(
    family: Family,
    data: FitArrays | CellSource,
    options: FitOptions,
    *,
    on_progress: ProgressFn | None = None,
    checkpointing: Checkpointing | None = None,
) -> FittedModel:
    """SVI fit of the technical model on `data` (fit features only), resumable.

    `data` is the fit matrix in memory, or a `CellSource` that hands it out in pieces
    (`bayesdream_model.streaming`): then the priors are computed feature block by block,
    and the likelihood either merges exact per-group statistics batch by batch or, for
    families that read every cell, sees one batch of cells per step, scaled to the whole.
    """
    device = torch.device(options.device)
    pyro.set_rng_seed(options.seed)
    priors, inits, tensors, stream = _fit_data(family, data, device, options.seed)
    family.check_inputs(priors)
    inputs = {k: v.to(device) for k, v in priors.items()}
    model = TechnicalModel(family, inputs, data.n_groups, tensors, stream)
    n_features = data.n_features
    choice = choose_guide(
        family,
        n_groups=data.n_groups,
        n_features=n_features,
        device=device,
        vram_bytes=options.vram_bytes,
        preference=options.guide,
    )
    log.info("guide: %s (%s)", choice.kind, choice.reason)
    guide = build_guide(model, choice.kind, inits)
    guide(observe=False)  # build the guide's parameters before the first step
    guide.to(device)
    try:
        laplace = (
            options.init == "laplace"
            and choice.kind == "feature_mvn"
            and options.convergence == "plateau"  # `ewma`: the reference's fit, unchanged
        )
        start = _start(model, guide, stream, checkpointing) if laplace else None
        result = run_svi(
            model,
            guide,
            elbo_for(choice.kind),
            svi_settings(options, choice.default_niters, start=start),
            on_progress=on_progress,
            checkpointing=checkpointing,
            before_step=None if stream is None else stream.advance,
            start=start,
        )
    except DivergenceError as err:
        hint = family.divergence_hint(priors)
        if not hint:
            raise
        raise DivergenceError(f"{err} {hint}") from err
    finally:
        if stream is not None:
            stream.close()
    after = _after_fit(model, guide, choice.kind, start, n_features)
    return FittedModel(
        family, replace(model, stream=None), guide, choice.kind, n_features, result, *after
    )


def _after_fit(model, guide, kind: GuideKind, start: dict | None, n_features: int):
    """(refinement, flags) of a finished fit: the family's, from the data's statistics
    where the likelihood reads them (a fit whose cells are streamed one batch per step
    has none), and the features that kept their initial values at the Laplace start."""
    flags = _start_flags(start, n_features)
    data = model.data
    if data is None or not data.stats:
        return {}, flags
    with torch.no_grad():
        family_flags = model.family.feature_flags(model.inputs, data)
        refinement = {}
        if kind == "feature_mvn":
            refinement = model.family.refinement(model.inputs, data, guide.feature_locs())
    if refinement:
        log.info(
            "posterior of the baseline mean of %d features with few baseline counts: exact "
            "(on a grid), not the guide's normal",
            refinement["features"].numel(),
        )
    return refinement, flags | {k: v.cpu().numpy() for k, v in family_flags.items()}


def _start_flags(start: dict | None, n_features: int) -> dict[str, np.ndarray]:
    """`start_not_converged` [T] after a Laplace start (none without one)."""
    if start is None:
        return {}
    kept = np.zeros(n_features, dtype=bool)
    kept[np.asarray(start.get("kept_features", []), dtype=np.int64)] = True
    return {"start_not_converged": kept}


#: the schedule after a Laplace start: the fit starts at its plateau, so Adam runs at
#: `fit.lr` itself (no 10x peak: its steps of ~lr only jitter the guide around the
#: optimum) after a 10-step warm-up (not 10 % of the iteration cap, 5,000 steps), windows
#: of 10 steps, 2 flat ones after the first, "flat" meaning within 2 standard errors, and
#: a closing anneal of max(20 steps, 25 %) instead of 250 / 3 / 1 / max(1,000, 25 %):
#: 50 steps at the least. On the 4,000 x 3,000 negbinom screens (0.08 to 50 counts a
#: cell) the posterior right after the Laplace start already recovered the effects as
#: well as after 300-562 steps (correlation, RMSE and 90 % coverage within 0.002); 25-step
#: windows gave the same recovery as 50-step ones, and 10-step windows as 25-step ones on
#: the real-shaped screens (coverage per effect class within 0.005, RMSE within 0.006;
#: benchmarks/bench_steps.py and bench_real_screens.py)
LAPLACE_SCHEDULE = {
    "peak_factor": 1.0,
    "warmup_steps": 10,
    "window": 10,
    "patience": 2,
    "noise_factor": 2.0,
    "anneal_windows": 2,
}


def _start(model, guide, stream: CellStream | None, checkpointing: Checkpointing | None) -> dict:
    """The Laplace start's summary: run now, or, when resuming, the one the checkpoint
    recorded (its guide state replaces the start: the deterministic start is not redone)."""
    if checkpointing is not None and checkpointing.state is not None:
        return checkpointing.state.get("start")
    family = model.family
    passes = None if stream is None else stream.each_batch
    begin = {} if model.data is None else family.newton_start(model.inputs, model.data)
    with pyro.validation_enabled(False):  # as in SVI: argument checks cost, NaN is caught
        return laplace_start(
            model,
            guide,
            second_derivatives=family.second_derivatives,
            passes=passes,
            start=begin,
        ).summary()


def svi_settings(options: FitOptions, default_niters: int, *, start: dict | None) -> SviSettings:
    """The optimiser and stop rule: the reference's schedule, or, after a Laplace start
    that every feature took, `LAPLACE_SCHEDULE` (a feature that kept the initial values
    needs the reference's schedule to get anywhere)."""
    short = start is not None and start["features_kept_start"] == 0
    return SviSettings(
        niters=options.niters or default_niters,
        lr=options.lr,
        tolerance=options.tolerance,
        convergence=options.convergence,
        context="" if options.label is None else f" for {options.label}",
        **(LAPLACE_SCHEDULE if short else {}),
    )


def _fit_data(family: Family, data: FitArrays | CellSource, device: torch.device, seed: int):
    """Prior inputs, initial values, and what the likelihood reads: the data's tensors, or
    statistics merged over cell batches, or (families that read every cell) a stream."""
    if isinstance(data, FitArrays):
        if family.sparse_fit:
            data = replace(data, y=as_sparse(data.y))  # once, not per use
        tensors = family.tensors(data, device)
        priors, inits = family.fit_inputs(data, tensors)
        return family.finish_inputs(priors), inits, tensors, None
    priors, inits = blockwise_inputs(family, data)
    priors = family.finish_inputs(priors)
    if data.n_batches == 1:
        return priors, inits, family.tensors(data.read_batch(0), device), None
    tensors = merged_tensors(family, data, device)
    if tensors is not None:
        log.info("exact statistics merged over %d cell batches", data.n_batches)
        return priors, inits, tensors, None
    log.info("cells streamed: %d batches, one per step", data.n_batches)
    return priors, inits, None, CellStream(family, data, device, seed=seed)


def restore_fitted(
    family: Family,
    *,
    inputs: dict[str, np.ndarray],
    params: dict[str, np.ndarray],
    guide_kind: GuideKind,
    n_groups: int,
    device: str = "cpu",
    refinement: dict[str, np.ndarray] | None = None,
) -> FittedModel:
    """Rebuild a fitted guide from stored prior inputs and guide parameters (no data)."""
    tensors = {k: torch.as_tensor(v, device=device) for k, v in inputs.items()}
    model = TechnicalModel(family, tensors, n_groups, None)
    guide = build_guide(model, guide_kind, {})
    guide(observe=False)
    state = {k: torch.as_tensor(v, device=device) for k, v in params.items()}
    try:
        guide.load_state_dict(state)
    except RuntimeError as err:
        raise ModelError(
            f"Stored guide parameters do not match the {guide_kind} guide: {err}"
        ) from err
    refined = {k: torch.as_tensor(v, device=device) for k, v in (refinement or {}).items()}
    n_features = family.n_features(tensors)
    return FittedModel(family, model, guide, guide_kind, n_features, refinement=refined)
