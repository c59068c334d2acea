"""Fitting helpers shared by the model tests.

Mean-field is SPEC's fallback when the IAF does not fit: a zero CPU flow limit forces it
(with `FitOptions(guide="mean_field")`, "SPEC's choice", where the package has that option).
Other guides are asked for by name where the package offers `FitOptions.guide`; without
it the tiny screens here get the IAF by default.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest
import torch

import bayesdream_model.guides
from bayesdream_model.data import FitArrays
from bayesdream_model.distributions import get_family
from bayesdream_model.fit import FitOptions, FittedModel, fit_technical
from bayesdream_model.guides import GuideChoice, choose_guide
from bayesdream_model.inference import ProgressFn

HAS_GUIDE_OPTION = "guide" in {f.name for f in dataclasses.fields(FitOptions)}
HAS_PREFERENCE = "preference" in inspect.signature(choose_guide).parameters
#: the negbinom guides to exercise (feature_mvn where the package has it)
GUIDES = tuple(
    kind
    for kind in ("iaf", "mean_field", "feature_mvn")
    if kind in typing.get_args(bayesdream_model.guides.GuideKind)
)


def fit_negbinom(
    data: FitArrays,
    guide: str,
    *,
    niters: int,
    lr: float = 1e-3,
    seed: int = 0,
    on_progress: ProgressFn | None = None,
) -> FittedModel:
    """A negbinom fit with the given guide (asserted)."""
    extra = {"guide": guide} if HAS_GUIDE_OPTION else {}
    options = FitOptions(niters=niters, lr=lr, seed=seed, **extra)
    limit = 0 if guide == "mean_field" else bayesdream_model.guides.CPU_FLOW_MAX_LATENT
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bayesdream_model.guides, "CPU_FLOW_MAX_LATENT", limit)
        fitted = fit_technical(get_family("negbinom"), data, options, on_progress=on_progress)
    assert fitted.guide_kind == guide
    return fitted


def spec_guide_choice(
    n_groups: int, n_features: int, device: str = "cpu", vram: int | None = None
) -> GuideChoice:
    """SPEC's guide choice for negbinom (preference `mean_field` where there is a preference)."""
    extra = {"preference": "mean_field"} if HAS_PREFERENCE else {}
    return choose_guide(
        get_family("negbinom"),
        n_groups=n_groups,
        n_features=n_features,
        device=torch.device(device),
        vram_bytes=vram,
        **extra,
    )
