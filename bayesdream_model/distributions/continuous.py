"""Continuous scores (SpliZ and the like): Normal and Student-t, additive group effects.

NaN/Inf are missing values: they contribute nothing to the likelihood and are never
imputed. The Normal likelihood depends on the data only through each group's count,
mean and centred sum of squares of its finite values, computed once:
Σ_n log N(y_n; m, σ) = -n_g (log σ + ½ log 2π) - (M2_g + n_g (ȳ_g - m)²) / 2σ².
The Student-t likelihood has no such statistics and is evaluated per cell.
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import torch

from bayesdream_model.constants import EPSILON, OBS_SITE
from bayesdream_model.data import FitArrays, FitTensors
from bayesdream_model.distributions.base import (
    ContinuousPrior,
    DistributionSpec,
    Family,
    FilterFlags,
    OutputSpec,
    PriorOptions,
)
from bayesdream_model.distributions.effects import (
    additive_outputs,
    derive_additive,
    sample_group_effects,
    with_baseline,
)
from bayesdream_model.plates import Plates
from bayesdream_model.stats import any_group_all, constant, group_sums, robust_sd

EFFECT_SITE = "delta_y"
STUDENT_DF = 3.0


class _Continuous(Family):
    """What Normal and Student-t share: filters, priors, sites, results."""

    latent_sites = (EFFECT_SITE, "sigma_y", "mu_ntc")
    effect_site = EFFECT_SITE

    def __init__(self, *, effect_df: float = 3.0, prior: ContinuousPrior = "weak") -> None:
        self.effect_df = effect_df
        self.prior = prior

    def configured(self, options: PriorOptions) -> _Continuous:
        """The same family with the run's prior (see `PriorOptions.continuous`)."""
        family = copy.copy(self)
        family.prior = options.continuous
        return family

    def flags(self, data: FitArrays) -> FilterFlags:
        """No finite value, zero std over finite values, or all missing in some group."""
        y = data.y
        finite = np.isfinite(y)
        none = ~finite.any(axis=0)
        clean = np.where(finite, y, np.nan)
        flat = constant(clean)  # over finite values
        missing_group = any_group_all(~finite, data.groups, data.n_groups)
        return FilterFlags(
            ntc_zero_count=np.nansum(clean, axis=0) == 0,
            ntc_zero_std=none | flat | missing_group,
            ntc_single_category=np.zeros(y.shape[1], dtype=bool),
        )

    def prior_inputs(self, data: FitArrays) -> dict[str, torch.Tensor]:
        """mu_ntc ~ Normal(m, s); sigma_y ~ HalfNormal(2σ̂); effects' scale `effect_scale`.

        m is the baseline cells' mean. "weak" (the default): s = the effects' scale = the
        feature's robust sd over all fit cells (its own spread: one pseudo-cell for the
        baseline mean, and a scale at which shifts of the size of that spread are not
        shrunk). "standard_error" (the reference's): s = that sd / √N, floored at
        max(0.1 |m|, 0.1), for both: the standard error of a mean, not the size of a shift
        between groups, so real shifts were shrunk towards 0 (90 % coverage 0.76-0.85)."""
        y = np.where(np.isfinite(data.y), data.y, np.nan).astype(np.float64)
        base = y[data.groups == 0]
        with warnings.catch_warnings():  # all-missing columns are handled below
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(base, axis=0)
            spread = robust_sd(y, epsilon=EPSILON, nan_aware=True) + EPSILON
            sigma_hat = np.nanstd(base, axis=0) + EPSILON
        if self.prior == "standard_error":
            sd = spread / math.sqrt(data.n_cells) + EPSILON
            sd = np.maximum(sd, np.maximum(np.abs(mean) * 0.1, 0.1))
        else:
            sd = spread
        mean = np.where(np.isfinite(mean), mean, 0.0)
        sd = np.where(np.isfinite(sd), sd, 1.0)
        sigma_hat = np.where(np.isfinite(sigma_hat), sigma_hat, 1.0)
        as_t = lambda x: torch.as_tensor(x, dtype=torch.float32)  # noqa: E731
        return {
            "mu_mean": as_t(mean),
            "mu_sd": as_t(sd),
            "sigma_hat": as_t(sigma_hat),
            "effect_scale": as_t(sd),
        }

    def initial_values(self, data: FitArrays) -> dict[str, torch.Tensor]:
        """Effects start at 0."""
        if data.n_groups < 2:
            return {}
        return {EFFECT_SITE: torch.zeros(data.n_groups - 1, data.n_features)}

    def sample_latents(self, inputs: dict[str, torch.Tensor], plates: Plates) -> dict:
        """delta_y [C-1, T] ~ StudentT(3, 0, effect_scale); sigma_y [T]; mu_ntc [T]."""
        mu_sd = inputs["mu_sd"]
        scale = inputs.get("effect_scale", mu_sd)  # stores from before it: the reference's
        prior = dist.StudentT(mu_sd.new_tensor(self.effect_df), mu_sd.new_tensor(0.0), scale)
        effect = sample_group_effects(EFFECT_SITE, plates, prior)
        with plates.features:
            sigma_y = pyro.sample("sigma_y", dist.HalfNormal(2.0 * inputs["sigma_hat"]))
            mu_ntc = pyro.sample("mu_ntc", dist.Normal(inputs["mu_mean"], mu_sd))
        return {EFFECT_SITE: effect, "sigma_y": sigma_y, "mu_ntc": mu_ntc}

    def outputs(self) -> tuple[OutputSpec, ...]:
        """alpha_y = alpha_y_add (data units, baseline 0); alpha_y_mult is 1."""
        return additive_outputs(EFFECT_SITE, ("mu_ntc", "sigma_y"))

    def derive(
        self, samples: dict[str, torch.Tensor], n_groups: int, inputs: dict | None = None
    ) -> dict[str, torch.Tensor]:
        """Effects as drawn (never exponentiated), baseline row 0."""
        return derive_additive(samples, EFFECT_SITE, ("mu_ntc", "sigma_y"))

    def n_features(self, inputs: dict[str, torch.Tensor]) -> int:
        """T."""
        return int(inputs["mu_mean"].shape[-1])

    def n_latent(self, n_groups: int, n_features: int) -> int:
        """(C + 1) * T."""
        return (n_groups + 1) * n_features


class Normal(_Continuous):
    """y ~ Normal(mu_ntc + delta[g], sigma_y), on per-group sufficient statistics."""

    spec = DistributionSpec(
        name="normal",
        effect_type="additive",
        needs_denominator=False,
        needs_sum_factor=False,
        is_3d=False,
        supports_group_effects=True,
        default_niters=50_000,
        count_data=False,
    )

    def tensors(self, data: FitArrays, device: torch.device | str) -> FitTensors:
        """Count, mean and centred sum of squares of finite values per group and feature."""
        finite = np.isfinite(data.y)
        y = np.where(finite, data.y, 0.0).astype(np.float64)
        g, c = data.groups, data.n_groups
        count = group_sums(finite, g, c)
        mean = group_sums(y, g, c) / np.maximum(count, 1.0)
        centred = np.where(finite, y - mean[g], 0.0)
        m2 = group_sums(centred**2, g, c)
        stats = {"count": count, "mean": mean, "m2": m2}
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
        """Counts add; means and centred sums of squares merge by Chan et al.'s update."""
        na, nb = a["count"], b["count"]
        n = na + nb
        delta = b["mean"] - a["mean"]
        weight = torch.where(n > 0, nb / n.clamp(min=1.0), torch.zeros_like(n))
        return {
            "count": n,
            "mean": a["mean"] + delta * weight,
            "m2": a["m2"] + b["m2"] + delta**2 * na * weight,
        }

    def observe(self, params: dict, data: FitTensors, plates: Plates) -> None:
        """Exact Normal log-likelihood of the finite values."""
        loc = params["mu_ntc"] + with_baseline(params[EFFECT_SITE], params["mu_ntc"], 0.0)
        sigma = params["sigma_y"]
        n, mean, m2 = data.stats["count"], data.stats["mean"], data.stats["m2"]
        log_lik = -n * (torch.log(sigma) + 0.5 * math.log(2 * math.pi)) - (
            m2 + n * (mean - loc) ** 2
        ) / (2 * sigma**2)
        pyro.factor(OBS_SITE, log_lik.sum())


class _Log1pSquareTerm(torch.autograd.Function):
    """Σ_{n,t} mask · log1p(((y - loc_gt) · inv_scale_t)² / ν), gradient in the same pass.

    Cells are sorted by group; one block of cells at a time, nothing [N, T] is kept for
    backward. With d = y - loc, r = d·s, q = r²/ν: ∂/∂loc = -Σ mask·2r·s/(ν(1+q)) and
    ∂/∂s = Σ mask·2r·d/(ν(1+q)).
    """

    @staticmethod
    def forward(ctx, loc, inv_scale, y, mask, bounds, df):  # noqa: D102
        total = torch.zeros((), dtype=torch.float64, device=loc.device)
        grad_loc, grad_s = torch.zeros_like(loc), torch.zeros_like(inv_scale)
        for g, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            for start in range(lo, hi, BLOCK_CELLS):
                stop = min(start + BLOCK_CELLS, hi)
                d = y[start:stop] - loc[g]
                r = d * inv_scale
                q = r.square().div_(df)
                total += torch.dot(
                    mask[start:stop].reshape(-1), torch.log1p(q).reshape(-1)
                ).double()
                weight = r.mul_(mask[start:stop]).div_(q.add_(1.0)).mul_(2.0 / df)  # 2r·m/(ν(1+q))
                grad_loc[g] -= weight.sum(0) * inv_scale
                grad_s += (weight * d).sum(0)
        ctx.save_for_backward(grad_loc, grad_s)
        return total.to(loc.dtype)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        grad_loc, grad_s = ctx.saved_tensors
        return grad * grad_loc, grad * grad_s, None, None, None, None


BLOCK_CELLS = 256  # cells per block: ~3 MB at T = 3000, stays in cache


class StudentT(_Continuous):
    """y ~ StudentT(3, mu_ntc + delta[g], sigma_y) per cell; missing values contribute 0.

    Σ log t = Σ_t n_t (c(ν) - log σ_t) - (ν+1)/2 · Σ mask·log1p(r²/ν): the first part needs
    only each feature's count of observed values, the second one fused pass over cells.
    """

    spec = DistributionSpec(
        name="studentt",
        effect_type="additive",
        needs_denominator=False,
        needs_sum_factor=False,
        is_3d=False,
        supports_group_effects=True,
        default_niters=50_000,
        count_data=False,
    )

    def tensors(self, data: FitArrays, device: torch.device | str) -> FitTensors:
        """Cells sorted by group; missing values set to 0 with a 0/1 mask."""
        order = np.argsort(data.groups, kind="stable")
        y = data.y[order]
        finite = np.isfinite(y)
        groups = data.groups[order]

        def t(x, dtype=torch.float32):
            return torch.as_tensor(np.ascontiguousarray(x), dtype=dtype, device=device)

        stats = {
            "y": t(np.where(finite, y, 0.0)),
            "mask": t(finite),
            "count": t(finite.sum(axis=0)),
            "bounds": t(np.searchsorted(groups, np.arange(data.n_groups + 1)), torch.int64),
        }
        return FitTensors(
            y=torch.empty(0),
            groups=t(data.groups, torch.int64),
            n_groups=data.n_groups,
            stats=stats,
        )

    def observe(self, params: dict, data: FitTensors, plates: Plates) -> None:
        """Exact masked Student-t log-likelihood over cells x features."""
        nu = STUDENT_DF
        loc = params["mu_ntc"] + with_baseline(params[EFFECT_SITE], params["mu_ntc"], 0.0)
        sigma = params["sigma_y"]
        stats = data.stats
        log_norm = math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) - 0.5 * math.log(nu * math.pi)
        quad = _Log1pSquareTerm.apply(
            loc, 1.0 / sigma, stats["y"], stats["mask"], stats["bounds"].tolist(), nu
        )
        log_lik = (stats["count"] * (log_norm - torch.log(sigma))).sum() - (nu + 1) / 2 * quad
        pyro.factor(OBS_SITE, log_lik)
