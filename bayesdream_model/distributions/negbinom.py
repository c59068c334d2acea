"""Negative binomial counts (genes, transcripts): multiplicative group effects on log2 scale."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import torch

from bayesdream_model.constants import EPSILON, LOG_EPS, OBS_SITE
from bayesdream_model.data import FitArrays, FitTensors
from bayesdream_model.distributions.base import (
    DistributionSpec,
    Family,
    FilterFlags,
    OutputSpec,
)
from bayesdream_model.distributions.effects import sample_group_effects, with_baseline
from bayesdream_model.plates import Plates
from bayesdream_model.stats import group_means, robust_sd

EFFECT_SITE = "log2_alpha_y"


class NegBinom(Family):
    """`y ~ NB(phi, logits = log(mu_ntc * 2**log2_alpha[g] * sf) - log(phi))`."""

    spec = DistributionSpec(
        name="negbinom",
        effect_type="multiplicative",
        needs_denominator=False,
        needs_sum_factor=True,
        is_3d=False,
        supports_group_effects=True,
        default_niters=50_000,
        count_data=True,
        guide="flow_if_fits",
        supports_cis=True,
    )
    latent_sites = (EFFECT_SITE, "beta_o", "o_y", "mu_ntc")
    effect_site = EFFECT_SITE

    def __init__(
        self,
        *,
        beta_o_alpha: float = 9.0,
        beta_o_beta: float = 3.0,
        effect_df: float = 3.0,
        effect_scale: float = 20.0,
    ) -> None:
        self.beta_o_alpha = beta_o_alpha
        self.beta_o_beta = beta_o_beta
        self.effect_df = effect_df
        self.effect_scale = effect_scale

    # -- filters, priors, initial values (numpy, fit cells) ------------------------
    def flags(self, data: FitArrays) -> FilterFlags:
        """Zero total, or zero standard deviation of the raw counts across fit cells."""
        y = data.y
        return FilterFlags(
            ntc_zero_count=y.sum(axis=0) == 0,
            ntc_zero_std=y.std(axis=0) == 0,
            ntc_single_category=np.zeros(y.shape[1], dtype=bool),
        )

    def prior_inputs(self, data: FitArrays) -> dict[str, torch.Tensor]:
        """Gamma prior on mu_ntc with mean = baseline mean, sd = robust SE floored at 10 %."""
        y_norm = data.y / data.sum_factor[:, None]
        mean = y_norm[data.groups == 0].mean(axis=0)
        sd = robust_sd(y_norm, epsilon=EPSILON) / math.sqrt(data.n_cells) + EPSILON
        sd = np.maximum(sd, (mean + EPSILON) * 0.1)
        mean = mean + EPSILON
        return {
            "mu_mean": torch.as_tensor(mean, dtype=torch.float32),
            "mu_sd": torch.as_tensor(sd, dtype=torch.float32),
            "beta_o_alpha": torch.tensor(self.beta_o_alpha),
            "beta_o_beta": torch.tensor(self.beta_o_beta),
        }

    def initial_values(self, data: FitArrays) -> dict[str, torch.Tensor]:
        """Effects start at log2(group mean / baseline mean) of size-factor-normalised counts."""
        if data.n_groups < 2:
            return {}
        y_norm = data.y / data.sum_factor[:, None]
        means = group_means(y_norm, data.groups, data.n_groups) + LOG_EPS
        log2_ratio = np.log2(means[1:] / means[0])
        return {EFFECT_SITE: torch.as_tensor(log2_ratio, dtype=torch.float32)}

    # -- model pieces (pyro) -------------------------------------------------------
    def sample_latents(self, inputs: dict[str, torch.Tensor], plates: Plates) -> dict:
        """log2_alpha_y [C-1, T], beta_o [], o_y [T], mu_ntc [T]."""
        mu_mean, mu_sd = inputs["mu_mean"], inputs["mu_sd"]
        prior = dist.StudentT(
            torch.tensor(self.effect_df, device=mu_mean.device),
            torch.tensor(0.0, device=mu_mean.device),
            torch.tensor(self.effect_scale, device=mu_mean.device),
        )
        log2_alpha = sample_group_effects(EFFECT_SITE, plates, prior)
        beta_o = pyro.sample("beta_o", dist.Gamma(inputs["beta_o_alpha"], inputs["beta_o_beta"]))
        with plates.features:
            o_y = pyro.sample("o_y", dist.Exponential(beta_o))
            mu_ntc = pyro.sample(
                "mu_ntc", dist.Gamma(mu_mean**2 / mu_sd**2, mu_mean / mu_sd**2)
            )
        return {EFFECT_SITE: log2_alpha, "o_y": o_y, "mu_ntc": mu_ntc}

    def observe(self, params: dict, data: FitTensors, plates: Plates) -> None:
        """NB likelihood of every fit cell and feature."""
        alpha = torch.exp2(with_baseline(params[EFFECT_SITE], params["mu_ntc"], 0.0))  # [C, T]
        phi = 1.0 / params["o_y"] ** 2  # [T]
        mu = params["mu_ntc"] * alpha.index_select(0, data.groups) * data.sum_factor[:, None]
        logits = torch.log(mu + LOG_EPS) - torch.log(phi + LOG_EPS)  # [N, T]
        with plates.cells(data.y.shape[0]), plates.features:
            pyro.sample(OBS_SITE, dist.NegativeBinomial(total_count=phi, logits=logits), obs=data.y)

    # -- results ----------------------------------------------------------------------
    def outputs(self) -> tuple[OutputSpec, ...]:
        """alpha_y = alpha_y_mult (baseline 1); alpha_y_add = the log2 effect (baseline 0)."""
        return (
            OutputSpec("alpha_y", "effect", 1.0),
            OutputSpec("alpha_y_mult", "effect", 1.0),
            OutputSpec("alpha_y_add", "effect", 0.0),
            OutputSpec(EFFECT_SITE, "raw", 0.0),
            OutputSpec("mu_ntc", "feature"),
            OutputSpec("o_y", "feature"),
            OutputSpec("phi_y", "feature"),
            OutputSpec("beta_o", "scalar"),
        )

    def derive(
        self, samples: dict[str, torch.Tensor], n_groups: int, inputs: dict | None = None
    ) -> dict[str, torch.Tensor]:
        """Result arrays from latent draws: mu_ntc/o_y [S, T], log2_alpha_y [S, C-1, T]."""
        mu_ntc, o_y = samples["mu_ntc"], samples["o_y"]
        raw = samples.get(EFFECT_SITE)
        if raw is None:
            raw = mu_ntc.new_zeros(mu_ntc.shape[0], 0, mu_ntc.shape[-1])
        add = with_baseline(raw, mu_ntc, 0.0)
        mult = torch.exp2(add)
        return {
            "alpha_y": mult,
            "alpha_y_mult": mult,
            "alpha_y_add": add,
            EFFECT_SITE: raw,
            "mu_ntc": mu_ntc,
            "o_y": o_y,
            "phi_y": 1.0 / o_y**2,
            "beta_o": samples["beta_o"],
        }

    def n_latent(self, n_groups: int, n_features: int) -> int:
        """SPEC: (C + 1) * T."""
        return (n_groups + 1) * n_features

    def n_features(self, inputs: dict[str, torch.Tensor]) -> int:
        """T = length of the mu_ntc prior mean."""
        return int(inputs["mu_mean"].shape[-1])
