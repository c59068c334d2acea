"""Fitting helpers shared by the model tests.

`FitOptions.guide` forces a guide by name, except that `mean_field` means "the reference bayesDREAM's choice"
(the IAF when it fits): mean-field proper is forced with a zero CPU flow limit as well.
"""

from __future__ import annotations

import pytest
import torch

import bayesdream_model.guides
from bayesdream_model.data import FitArrays
from bayesdream_model.distributions import get_family
from bayesdream_model.fit import FitOptions, FittedModel, fit_technical
from bayesdream_model.guides import GuideChoice, choose_guide
from bayesdream_model.inference import ProgressFn

#: the negbinom guides: the reference's two, and the per-feature full-covariance guide
GUIDES = ("iaf", "mean_field", "feature_mvn")


def fit_negbinom(
    data: FitArrays,
    guide: str,
    *,
    niters: int | None,
    lr: float = 1e-3,
    seed: int = 0,
    on_progress: ProgressFn | None = None,
    init: str = "laplace",
) -> FittedModel:
    """A negbinom fit with the given guide (asserted); `init` matters to feature_mvn."""
    options = FitOptions(niters=niters, lr=lr, seed=seed, guide=guide, init=init)
    limit = 0 if guide == "mean_field" else bayesdream_model.guides.CPU_FLOW_MAX_LATENT
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bayesdream_model.guides, "CPU_FLOW_MAX_LATENT", limit)
        fitted = fit_technical(get_family("negbinom"), data, options, on_progress=on_progress)
    assert fitted.guide_kind == guide
    return fitted


def negbinom_guide_choice(
    n_groups: int,
    n_features: int,
    *,
    device: str = "cpu",
    vram: int | None = None,
    preference: str = "mean_field",
) -> GuideChoice:
    """The guide choice for negbinom; preference `mean_field` is the reference's rule."""
    return choose_guide(
        get_family("negbinom"),
        n_groups=n_groups,
        n_features=n_features,
        device=torch.device(device),
        vram_bytes=vram,
        preference=preference,
    )
