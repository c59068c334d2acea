"""Binomial counts over a denominator (splice junctions): group effects on the logit scale.

The likelihood of cell n in group g is `y log p[g,t] + (n - y) log(1 - p[g,t])`, and p
depends on the cell only through its group, so the sum over cells equals the same
expression on per-group totals of valid cells (n > 0): computed once, exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F

from bayesdream_model.constants import OBS_SITE
from bayesdream_model.data import FitArrays, FitTensors
from bayesdream_model.distributions.base import (
    DistributionSpec,
    Family,
    FilterFlags,
    OutputSpec,
    summed_stats,
)
from bayesdream_model.distributions.effects import (
    additive_outputs,
    derive_additive,
    sample_group_effects,
    with_baseline,
)
from bayesdream_model.errors import NonFiniteLikelihoodError
from bayesdream_model.plates import Plates
from bayesdream_model.stats import any_group_all, constant, group_sums

EFFECT_SITE = "alpha_logit_y"
P_CLAMP = 1e-6
LOG_P_CLAMP = 1e-12
LOG_FLOOR = math.log(LOG_P_CLAMP)  # log(1e-12)
LOG_CEIL = math.log1p(-LOG_P_CLAMP)  # log(1 - 1e-12)


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p) - np.log1p(-p)


class Binomial(Family):
    """`logit p = logit(clamp(mu_ntc)) + alpha[g]`; y ~ Binomial(n, p) for cells with n > 0."""

    spec = DistributionSpec(
        name="binomial",
        effect_type="logit",
        needs_denominator=True,
        needs_sum_factor=False,
        is_3d=False,
        supports_group_effects=True,
        default_niters=50_000,
        count_data=True,
    )
    latent_sites = (EFFECT_SITE, "mu_ntc")
    effect_site = EFFECT_SITE

    def __init__(self, *, effect_df: float = 3.0, effect_scale: float = 20.0) -> None:
        self.effect_df = effect_df
        self.effect_scale = effect_scale

    def flags(self, data: FitArrays) -> FilterFlags:
        """No valid cell, zero std of y/n, or a group all n = 0, all PSI 0 or all PSI 1."""
        y, n = data.y, data.denominator
        valid = n > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(valid, y / n, np.nan)
        no_valid = ~valid.any(axis=0)
        with np.errstate(invalid="ignore"):
            flat = constant(ratio)  # over valid cells (NaN elsewhere)
        g, c = data.groups, data.n_groups
        boundary = (
            any_group_all(~valid, g, c)
            | any_group_all(~valid | (y == 0), g, c)  # all valid numerators 0 (PSI = 0)
            | any_group_all(~valid | (y == n), g, c)  # all valid numerators = n (PSI = 1)
        )
        return FilterFlags(
            ntc_zero_count=y.sum(axis=0) == 0,
            ntc_zero_std=no_valid | flat | boundary,
            ntc_single_category=np.zeros(y.shape[1], dtype=bool),
        )

    def _baseline_totals(self, data: FitArrays) -> tuple[np.ndarray, np.ndarray]:
        base = data.groups == 0
        if not base.any():
            base = np.ones_like(base)
        return data.y[base].sum(axis=0, dtype=np.float64), data.denominator[base].sum(
            axis=0, dtype=np.float64
        )

    def prior_inputs(self, data: FitArrays) -> dict[str, torch.Tensor]:
        """Beta(p̂κ + 1e-3, (1 - p̂)κ + 1e-3) from baseline totals, κ = clamp(Σn, 20, 200)."""
        y_sum, n_sum = self._baseline_totals(data)
        p_hat = np.clip((y_sum + 0.5) / (n_sum + 1.0), P_CLAMP, 1 - P_CLAMP)
        kappa = np.clip(n_sum, 20.0, 200.0)
        return {
            "beta_a": torch.as_tensor(p_hat * kappa + 1e-3, dtype=torch.float32),
            "beta_b": torch.as_tensor((1 - p_hat) * kappa + 1e-3, dtype=torch.float32),
        }

    def initial_values(self, data: FitArrays) -> dict[str, torch.Tensor]:
        """Effects at the empirical logit difference to the baseline (pseudocounts 0.5 / 1)."""
        if data.n_groups < 2:
            return {}
        valid = data.denominator > 0
        y = group_sums(np.where(valid, data.y, 0), data.groups, data.n_groups)
        n = group_sums(np.where(valid, data.denominator, 0), data.groups, data.n_groups)
        psi = np.clip((y + 0.5) / (n + 1.0), P_CLAMP, 1 - P_CLAMP)
        return {
            EFFECT_SITE: torch.as_tensor(_logit(psi[1:]) - _logit(psi[:1]), dtype=torch.float32)
        }

    def tensors(self, data: FitArrays, device: torch.device | str) -> FitTensors:
        """Per-group totals of y and n over valid cells, and the number of valid cells."""
        valid = data.denominator > 0
        g, c = data.groups, data.n_groups
        stats = {
            "y": group_sums(np.where(valid, data.y, 0), g, c),
            "n": group_sums(np.where(valid, data.denominator, 0), g, c),
            "valid": group_sums(valid, g, c),
        }
        return FitTensors(
            y=torch.empty(0),
            groups=torch.as_tensor(g, dtype=torch.int64, device=device),
            n_groups=c,
            stats={
                k: torch.as_tensor(v, dtype=torch.float32, device=device) for k, v in stats.items()
            },
        )

    mergeable = True
    second_derivatives = "autograd"  # plain torch ops: double backward is exact

    def merge_stats(self, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
        """Totals add."""
        return summed_stats(a, b)

    def sample_latents(self, inputs: dict[str, torch.Tensor], plates: Plates) -> dict:
        """alpha_logit_y [C-1, T] ~ StudentT(3, 0, 20); mu_ntc [T] ~ Beta."""
        a = inputs["beta_a"]
        prior = dist.StudentT(
            a.new_tensor(self.effect_df), a.new_tensor(0.0), a.new_tensor(self.effect_scale)
        )
        effect = sample_group_effects(EFFECT_SITE, plates, prior)
        with plates.features:
            mu_ntc = pyro.sample("mu_ntc", dist.Beta(a, inputs["beta_b"]))
        return {EFFECT_SITE: effect, "mu_ntc": mu_ntc}

    def observe(self, params: dict, data: FitTensors, plates: Plates) -> None:
        """Σ_g [Y log p + (Nd - Y) log(1 - p)] on per-group totals of valid cells."""
        mu = params["mu_ntc"].clamp(P_CLAMP, 1 - P_CLAMP)
        logit_mu = torch.log(mu) - torch.log1p(-mu)
        alpha = with_baseline(params[EFFECT_SITE], mu, 0.0)  # [C, T]
        z = logit_mu + alpha
        # log p and log(1 - p) of p clamped to [1e-12, 1 - 1e-12], computed from the logit:
        # in float32 1 - 1e-12 rounds to 1, so clamping p itself does nothing above logit 16.6
        log_p = F.logsigmoid(z).clamp(min=LOG_FLOOR, max=LOG_CEIL)
        log_q = F.logsigmoid(-z).clamp(min=LOG_FLOOR, max=LOG_CEIL)
        y, n = data.stats["y"], data.stats["n"]
        total = (y * log_p + (n - y) * log_q).sum()
        if not torch.isfinite(total):
            p = torch.sigmoid(z).clamp(LOG_P_CLAMP, 1 - LOG_P_CLAMP)
            raise NonFiniteLikelihoodError(_diagnose(mu, logit_mu, alpha, p, data))
        pyro.factor(OBS_SITE, total)

    def outputs(self) -> tuple[OutputSpec, ...]:
        """alpha_y = alpha_y_add (logit shift, baseline 0); alpha_y_mult is 1."""
        return additive_outputs(EFFECT_SITE, ("mu_ntc",))

    def derive(
        self, samples: dict[str, torch.Tensor], n_groups: int, inputs: dict | None = None
    ) -> dict[str, torch.Tensor]:
        """Effects as drawn (never exponentiated), baseline row 0."""
        return derive_additive(samples, EFFECT_SITE, ("mu_ntc",))

    def n_features(self, inputs: dict[str, torch.Tensor]) -> int:
        """T."""
        return int(inputs["beta_a"].shape[-1])

    def n_latent(self, n_groups: int, n_features: int) -> int:
        """C * T."""
        return n_groups * n_features


def _range(name: str, x: torch.Tensor) -> str:
    x = x.detach()
    finite = torch.isfinite(x)
    if not finite.any():
        return f"{name}: no finite values ({x.numel()} entries)"
    vals = x[finite]
    return (
        f"{name}: range [{vals.min().item():.4g}, {vals.max().item():.4g}], "
        f"{int((~finite).sum())} of {x.numel()} non-finite"
    )


def _diagnose(mu, logit_mu, alpha, p, data: FitTensors) -> str:
    """Ranges and finiteness of every intermediate of the binomial log-likelihood."""
    parts = [
        _range("mu", mu),
        _range("logit(mu)", logit_mu),
        _range("alpha", alpha),
        _range("p", p),
        _range("log p", torch.log(p)),
        _range("log(1-p)", torch.log1p(-p)),
        _range("y (group totals)", data.stats["y"]),
        _range("n (group totals)", data.stats["n"]),
        f"valid cells: {int(data.stats['valid'].sum().item())}",
    ]
    return "Non-finite binomial log-likelihood. " + "; ".join(parts)
