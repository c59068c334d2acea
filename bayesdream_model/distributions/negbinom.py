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
from bayesdream_model.stats import constant, group_means, robust_sd

EFFECT_SITE = "log2_alpha_y"


def nb_statistics(data: FitArrays, device: torch.device | str) -> dict[str, torch.Tensor]:
    """What `nb_log_likelihood` reads, computed once before SVI.

    Cells are sorted by group, so each group's block of means is an outer product
    sf[n] * m[g, t] (no gather); the y log(mu) terms need only per-group totals; the lgamma
    terms only each feature's histogram of non-zero values.
    """
    order = np.argsort(data.groups, kind="stable")
    y = np.ascontiguousarray(data.y[order], dtype=np.float32)
    groups, sf = data.groups[order], data.sum_factor[order].astype(np.float64)
    bounds = np.searchsorted(groups, np.arange(data.n_groups + 1))
    spans = list(zip(bounds[:-1], bounds[1:], strict=True))  # each group's rows, sorted
    rows, cols = np.nonzero(y)
    pairs, counts = _value_histogram(cols, y[rows, cols].astype(np.float64), y.shape[1])
    # parameter-free: -Σ lgamma(y + 1) (over the histogram) + Σ_n log sf_n Σ_t y_nt (the
    # part of y log mu that sf carries)
    lgamma_y1 = torch.lgamma(torch.as_tensor(pairs[1]) + 1).numpy()
    constant = -float(counts @ lgamma_y1) + float(y.sum(axis=1, dtype=np.float64) @ np.log(sf))

    def t(x, dtype=torch.float32):
        return torch.as_tensor(np.asarray(x), dtype=dtype, device=device)

    return {
        "y": t(y),
        "sum_factor": t(sf),
        "bounds": t(bounds, torch.int64),
        "group_totals": t(np.stack([y[lo:hi].sum(0, dtype=np.float64) for lo, hi in spans])),
        "pair_feature": t(pairs[0], torch.int64),
        "pair_value": t(pairs[1]),
        "pair_count": t(counts),
        "constant": t(constant),
    }


def _value_histogram(
    cols: np.ndarray, values: np.ndarray, n_features: int
) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (feature, value) pairs [2, P], by feature then value, and their counts.

    Integer keys (feature x distinct value), counted by `bincount` when the table is small
    (integer counts of modest size: one pass, no sort), else by one 1-D sort; numpy's
    unique over the columns of a 2-D array sorts structured records and was 20x slower.
    """
    top = values.max(initial=0.0)
    if (
        n_features * (top + 1) <= HISTOGRAM_BINS
        and (values == np.round(values)).all()
        and values.size
    ):
        width = int(top) + 1
        table = np.bincount(cols * width + values.astype(np.int64), minlength=n_features * width)
        keys = np.flatnonzero(table)
        feature, value = np.divmod(keys, width)
        return np.stack([feature.astype(np.float64), value.astype(np.float64)]), table[keys]
    distinct, code = np.unique(values, return_inverse=True)
    keys, counts = np.unique(cols.astype(np.int64) * len(distinct) + code, return_counts=True)
    feature, which = np.divmod(keys, len(distinct))
    return np.stack([feature.astype(np.float64), distinct[which]]), counts


HISTOGRAM_BINS = 1 << 23  # 64 MB of int64 counts at most


class _Log1pTerm(torch.autograd.Function):
    """Σ_{n,t} (φ_t + y_nt) · log1p(sf_n · m̃_gt + ẽ_t), with its gradient in the same pass.

    One pass over the cells, block by block, keeping no [N, T] tensor for backward:
    with u = sf·m̃ + ẽ and w = φ + y, d/dm̃_gt = Σ_n w·sf/(1+u), d/dẽ_t = Σ_n w/(1+u),
    and d/dφ_t (through w) = Σ_n log1p(u).
    """

    @staticmethod
    def forward(ctx, m_tilde, e_tilde, phi, y, sum_factor, bounds):  # noqa: D102
        total = torch.zeros((), dtype=torch.float64, device=m_tilde.device)
        grad_m = torch.zeros_like(m_tilde)
        grad_e, grad_phi = torch.zeros_like(e_tilde), torch.zeros_like(phi)
        for g, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            for start in range(lo, hi, BLOCK_CELLS):
                stop = min(start + BLOCK_CELLS, hi)
                sf = sum_factor[start:stop]
                u = torch.addcmul(e_tilde, sf[:, None], m_tilde[g])
                log1p_u = torch.log1p(u)
                w = y[start:stop] + phi
                total += torch.dot(w.reshape(-1), log1p_u.reshape(-1)).double()
                ratio = w.div_(u.add_(1.0))
                grad_m[g] += sf @ ratio
                grad_e += ratio.sum(0)
                grad_phi += log1p_u.sum(0)
        ctx.save_for_backward(grad_m, grad_e, grad_phi)
        return total.to(m_tilde.dtype)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        grad_m, grad_e, grad_phi = ctx.saved_tensors
        return grad * grad_m, grad * grad_e, grad * grad_phi, None, None, None


BLOCK_CELLS = 256  # cells per block: ~3 MB at T = 3000, stays in cache


def nb_log_likelihood(params: dict, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ_{n,t} log NB(y; φ, logits = log(μ + ε) - log(φ + ε)), μ = m[g,t]·sf[n], m = mu·alpha.

    log NB = φ log(φ+ε) + y log(μ+ε) - (φ+y) log(μ+φ+2ε) + lgamma(φ+y) - lgamma(φ) - lgamma(y+1)
           = -(φ+y) log1p((μ+ε)/(φ+ε)) - y log(φ+ε) + y log(μ+ε) + lgammas,
    the second form staying finite as φ grows. Zeros add nothing to the y terms; y log μ
    splits into per-group totals of y times log m plus a constant; the lgamma terms need
    only value histograms: only the log1p term is a pass over all cells. One deviation,
    far below float32 resolution: y log(μ+ε) is taken as y log μ (relative change ε/μ).
    """
    phi = 1.0 / params["o_y"] ** 2  # [T]
    log_m = torch.log(params["mu_ntc"]) + math.log(2.0) * with_baseline(
        params[EFFECT_SITE], params["mu_ntc"], 0.0
    )  # [C, T]
    inv = 1.0 / (phi + LOG_EPS)
    dense = _Log1pTerm.apply(
        torch.exp(log_m) * inv,
        LOG_EPS * inv,
        phi,
        stats["y"],
        stats["sum_factor"],
        stats["bounds"].tolist(),
    )
    # float64: near the Poisson limit (phi ~ 1e5) lgamma(phi + y) - lgamma(phi) cancels to
    # below float32 resolution and the dispersion gradient would be mostly rounding error
    phi_pair = phi.double().index_select(0, stats["pair_feature"])
    pair_value = stats["pair_value"].double()
    lgammas = (torch.lgamma(phi_pair + pair_value) - torch.lgamma(phi_pair)).to(phi.dtype)
    return (
        -dense
        - (stats["group_totals"].sum(0) * torch.log(phi + LOG_EPS)).sum()
        + (stats["group_totals"] * log_m).sum()
        + (stats["pair_count"] * lgammas).sum()
        + stats["constant"]
    )


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
            ntc_zero_std=constant(y),
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
            mu_ntc = pyro.sample("mu_ntc", dist.Gamma(mu_mean**2 / mu_sd**2, mu_mean / mu_sd**2))
        return {EFFECT_SITE: log2_alpha, "o_y": o_y, "mu_ntc": mu_ntc}

    def tensors(self, data: FitArrays, device: torch.device | str) -> FitTensors:
        """Cells sorted by group, the non-zero entries, and per-feature value histograms."""
        return FitTensors(
            y=torch.empty(0),
            groups=torch.as_tensor(data.groups, dtype=torch.int64, device=device),
            n_groups=data.n_groups,
            stats=nb_statistics(data, device),
        )

    def observe(self, params: dict, data: FitTensors, plates: Plates) -> None:
        """NB log-likelihood of every fit cell and feature (exact; see `nb_log_likelihood`)."""
        pyro.factor(OBS_SITE, nb_log_likelihood(params, data.stats))

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
        """(C + 1) * T, as the reference bayesDREAM counts them."""
        return (n_groups + 1) * n_features

    def n_features(self, inputs: dict[str, torch.Tensor]) -> int:
        """T = length of the mu_ntc prior mean."""
        return int(inputs["mu_mean"].shape[-1])
