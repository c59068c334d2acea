"""Guide choice (docs/model.md, "Guides") and construction with data-driven initial values."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from pyro import poutine
from pyro.distributions.transforms import (
    AffineTransform,
    ComposeTransformModule,
    affine_autoregressive,
)
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoDelta, AutoGuideList, AutoNormal, AutoNormalizingFlow
from pyro.infer.autoguide.guides import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median

from bayesdream_model.distributions.base import Family
from bayesdream_model.feature_guide import AutoFeatureMVN

log = logging.getLogger(__name__)

GuideKind = Literal["mean_field", "feature_mvn", "iaf", "point_baseline"]
GuidePreference = Literal["auto", "mean_field", "feature_mvn", "iaf"]
CPU_FLOW_MAX_LATENT = 5000
VRAM_RESERVE_BYTES = 10 * 1024**3
MEAN_FIELD_FALLBACK_NITERS = 100_000


@dataclass(frozen=True)
class GuideChoice:
    """Which guide, and the default iteration count that goes with it."""

    kind: GuideKind
    default_niters: int
    reason: str


def flow_bytes(n_latent: int) -> float:
    """The reference bayesDREAM's estimate of an IAF guide's memory: n_latent^2 * 4 B * 3 * 1.5."""
    return n_latent**2 * 4 * 3 * 1.5


def choose_guide(
    family: Family,
    *,
    n_groups: int,
    n_features: int,
    device: torch.device,
    vram_bytes: int | None,
    preference: GuidePreference = "auto",
) -> GuideChoice:
    """`auto`: a full covariance per feature for every family and size; `mean_field`: the
    reference bayesDREAM's choice exactly (negbinom: the IAF when it fits, else mean-field;
    multinomial: a point mass on its Dirichlet baseline, normal on the rest);
    `feature_mvn`/`iaf` force that guide.

    Why not the reference's IAF under `auto`: on held-out negbinom screens of 300-5,000
    latents (the sizes where it would be chosen) it diverged (a non-finite loss near the
    one-cycle peak), or stopped with intervals that missed their 90 % target, at 5-15x the
    per-step cost of the per-feature guide, whose coverage and correlation were as good
    or better at every size (benchmarks/bench_guides.py).
    """
    choice = _spec_choice(family, n_groups, n_features, device, vram_bytes)
    if preference == "mean_field":
        return choice
    if preference == "auto":
        why = {
            "iaf": "the IAF diverged or mis-covered on small screens",
            "mean_field": "mean-field under-covers",
            "point_baseline": "a point-mass baseline ignores its uncertainty",
        }[choice.kind]
        reason = f"{choice.reason}; a full covariance per feature, since {why}"
        return GuideChoice("feature_mvn", choice.default_niters, reason)
    return GuideChoice(preference, choice.default_niters, f"fit.guide = {preference}")


def _spec_choice(
    family: Family, n_groups: int, n_features: int, device: torch.device, vram_bytes: int | None
) -> GuideChoice:
    """IAF for negbinom when it fits (GPU: below VRAM - 10 GB; CPU: <= 5000 latents)."""
    default = family.spec.default_niters
    if family.spec.guide == "point_baseline":
        return GuideChoice(
            "point_baseline", default, "point mass on " + ", ".join(family.point_sites)
        )
    if family.spec.guide != "flow_if_fits":
        return GuideChoice("mean_field", default, f"{family.spec.name} uses a mean-field guide")
    n_latent = family.n_latent(n_groups, n_features)
    if device.type == "cuda" and vram_bytes is not None:
        fits = flow_bytes(n_latent) < vram_bytes - VRAM_RESERVE_BYTES
        where = f"IAF needs ~{flow_bytes(n_latent) / 1e9:.1f} GB of {vram_bytes / 1e9:.1f} GB VRAM"
    else:
        fits = n_latent <= CPU_FLOW_MAX_LATENT
        where = f"{n_latent} latents on CPU (IAF up to {CPU_FLOW_MAX_LATENT})"
    if fits:
        return GuideChoice("iaf", default, where)
    return GuideChoice("mean_field", max(default, MEAN_FIELD_FALLBACK_NITERS), where)


def init_fn(values: dict[str, torch.Tensor]):
    """Initial values from `values`; every other site at its prior median."""

    def init(site: dict) -> torch.Tensor:
        value = values.get(site["name"])
        if value is None:
            return init_to_median(site)
        reference = site["fn"].sample()
        return value.to(device=reference.device, dtype=reference.dtype).expand(reference.shape)

    return init


class AutoAnchoredIAFNormal(AutoNormalizingFlow):
    """An inverse-autoregressive-flow guide whose flow lives in a standardised space.

    Pyro's AutoIAFNormal ignores initial values: its flow starts near N(0, 1) in the
    unconstrained space, far from posteriors of counts in the hundreds, and with the
    one-cycle peak learning rate it diverges to NaN within ~150 steps on simulated
    screens. Here a fixed affine map `z -> init_loc + anchor_scale * z` follows the
    flow, so the guide starts at the initial values (empirical effects, prior
    medians) and the flow (hidden width = n_latent, as the reference's memory rule assumes)
    learns the posterior's shape and correlations around them.
    """

    def __init__(self, model, *, init_loc_fn, anchor_scale: float = 0.1) -> None:
        AutoContinuous.__init__(self, model, init_loc_fn=init_loc_fn)
        self._init_transform_fn = self._anchored_flow
        self.transform = None
        self._prototype_tensor = torch.tensor(0.0)
        self.anchor_scale = anchor_scale

    def _anchored_flow(self, latent_dim: int):
        # A buffer, so that it travels in state_dict and load_state_dict updates it in place.
        self.register_buffer("anchor", self._init_loc().detach().clone())
        anchor = self.anchor
        flow = affine_autoregressive(latent_dim, hidden_dims=[latent_dim], stable=True)
        shift = AffineTransform(anchor, torch.full_like(anchor, self.anchor_scale), cache_size=1)
        return ComposeTransformModule([flow.to(anchor.device), shift], cache_size=1)


def build_guide(model, kind: GuideKind, init_values: dict[str, torch.Tensor]):
    """An autoguide over every latent site of `model`."""
    if kind == "iaf":
        return AutoAnchoredIAFNormal(model, init_loc_fn=init_fn(init_values))
    if kind == "feature_mvn":
        return AutoFeatureMVN(model, init_loc_fn=init_fn(init_values))
    if kind == "point_baseline":
        points = list(model.family.point_sites)
        guide = AutoGuideList(model)
        guide.append(
            AutoDelta(poutine.block(model, expose=points), init_loc_fn=init_fn(init_values))
        )
        guide.append(
            AutoNormal(poutine.block(model, hide=points), init_loc_fn=init_fn(init_values))
        )
        return guide
    return AutoNormal(model, init_loc_fn=init_fn(init_values))


def elbo_for(kind: GuideKind):
    """Mean-field guides use the mean-field ELBO; others the standard trace ELBO."""
    return TraceMeanField_ELBO() if kind == "mean_field" else Trace_ELBO()
