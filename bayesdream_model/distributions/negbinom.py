"""Negative binomial counts (genes, transcripts): multiplicative group effects on log2 scale."""

from __future__ import annotations

import copy
import functools
import logging
import math
from dataclasses import fields, replace
from itertools import pairwise

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
    MeanPrior,
    OutputSpec,
    PriorOptions,
)
from bayesdream_model.distributions.effects import sample_group_effects, with_baseline
from bayesdream_model.distributions.nb.baseline_prior import empirical_inputs, learned_mixture
from bayesdream_model.distributions.nb.group_sums import GroupSums
from bayesdream_model.distributions.nb.lgamma_segments import SegmentedLgamma
from bayesdream_model.distributions.nb.log1p_table import POWERS, GroupLog1p, log1p_table
from bayesdream_model.distributions.nb.mixture_prior import baseline_mean_prior
from bayesdream_model.distributions.nb.nb_baseline_draws import (
    baseline_entries,
    baseline_flags,
    baseline_refinement,
    joined_entries,
    refined_draws,
)
from bayesdream_model.distributions.nb.nb_moments import moment_start
from bayesdream_model.distributions.nb.shifted_lgamma import shifted_lgamma_sum
from bayesdream_model.distributions.nb.value_histogram import (
    SMALL_VALUES,
    joined_pairs,
    value_histograms,
)
from bayesdream_model.distributions.nb.weighted_log1p import WeightedLog1p, weighted_log1p_table
from bayesdream_model.errors import ModelError
from bayesdream_model.plates import Plates
from bayesdream_model.sparse import SparseCounts, as_sparse, block_width
from bayesdream_model.sparse_stats import scaled_robust_sd
from bayesdream_model.stats import constant

log = logging.getLogger(__name__)
EFFECT_SITE = "log2_alpha_y"


def nb_statistics(data: FitArrays, device: torch.device | str) -> dict[str, torch.Tensor]:
    """What `nb_log_likelihood` reads, computed once before SVI (see there for the terms).

    From the size factors, per group: the tabulated Σ_n log1p(sf_n x) (`log1p_table`).
    From the non-zero entries (dense input is made sparse first), per (group, feature):
    the tabulated Σ_n y log1p(sf_n x) (`weighted_log1p`), the totals of y and of y / sf^k
    (the y log(mu + ε) terms, the latter as the coefficients of their series); the
    (feature, value) histogram (the lgamma terms); and the constant. Nothing of size N or
    of the number of non-zeros is kept: a step costs O(C T) (the histogram's lgamma terms
    through interpolants in log φ, `lgamma_segments`, each built once from it).
    """
    y = as_sparse(data.y)
    groups = np.asarray(data.groups, dtype=np.int64)
    sf = np.asarray(data.sum_factor, dtype=np.float64)
    order = np.argsort(groups, kind="stable")
    bounds = np.searchsorted(groups[order], np.arange(data.n_groups + 1))
    arrays = value_histograms(y)
    arrays |= log1p_table(sf[order], bounds, data.sf_range)
    x_range = tuple(float(v) for v in arrays["sf_grid"][2:4])
    arrays |= weighted_log1p_table(
        y, groups, sf, data.n_groups, x_range, inverse_powers=EPS_TERMS, device=device
    )
    moments = arrays["yl_moments"]  # [C, M, T]: Σ y, Σ y log sf, Σ y sf^k, Σ y sf^-k
    arrays["group_totals"] = moments[:, 0]
    inverse = moments[:, 2 + POWERS : 2 + POWERS + EPS_TERMS].transpose(1, 0, 2)  # [K, C, T]
    signs = np.array([(-1.0) ** (k + 1) / k for k in range(1, EPS_TERMS + 1)])
    arrays["eps_weights"] = signs[:, None, None] * inverse  # (-1)^(k+1) / k Σ y / sf^k
    arrays["constant"] = arrays["constant"] + moments[:, 1].sum()  # Σ y log sf (y log mu)
    arrays["sf_floor"] = _floors(sf[order], bounds)
    # the exact baseline draws' few entries
    arrays |= baseline_entries(y, groups, sf, arrays["group_totals"][0])
    exact = {"pair_feature": torch.int64, "base_entry_feature": torch.int64}
    return {
        key: torch.as_tensor(np.asarray(value), dtype=exact.get(key, torch.float64), device=device)
        for key, value in arrays.items()
    }


GRIDS = ("sf_grid", "yl_grid")  # the tables' grids: equal in statistics that merge


def _floors(sf_sorted: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Per group, the mean m below which ε / (sf m) may exceed EPS_SERIES_MAX [C]."""
    # a group with no cells here (a batch) reads nothing below its floor: 0, so that the
    # merged floor is the largest of the batches' (`NegBinom.merge_stats`)
    smallest = [sf_sorted[lo:hi].min() if hi > lo else np.inf for lo, hi in pairwise(bounds)]
    return LOG_EPS / (EPS_SERIES_MAX * np.asarray(smallest))


EPS_TERMS = 6  # terms of the series of Σ y log1p(ε / μ)
EPS_SERIES_MAX = 0.1  # ... used while ε / μ <= 0.1 (truncation < 2e-8 of the correction)


def nb_log_likelihood(
    params: dict, stats: dict[str, torch.Tensor], lgammas: SegmentedLgamma | None = None
) -> torch.Tensor:
    """Σ_{n,t} log NB(y; φ, logits = log(μ + ε) - log(φ + ε)), μ = m[g,t]·sf[n], m = mu·alpha.

    log NB = φ log(φ+ε) + y log(μ+ε) - (φ+y) log(μ+φ+2ε) + lgamma(φ+y) - lgamma(φ) - lgamma(y+1)
           = -(φ+y) log1p((μ+ε)/(φ+ε)) - y log(φ+ε) + y log(μ+ε) + lgammas,
    the second form staying finite as φ grows. Zeros add nothing to the y terms, and
    y log(μ+ε) = y log sf + y log m + y log1p(ε/μ): per-group totals of y times log m, a
    constant, and a power series in ε/m over per-group totals of y / sf^k. The lgamma terms
    need only value histograms. The log1p term splits exactly, since
    1 + (μ+ε)/(φ+ε) = (1 + ε/(φ+ε)) (1 + sf x), x = m / (φ + 2ε):

        Σ_{n,t} (φ+y) log1p(u) = Σ_t (N φ_t + Y_t) log1p(ε/(φ_t+ε))
                               + Σ_{g,t} φ_t F_g(x_gt)            (F_g tabulated: all cells)
                               + Σ_{g,t} H_gt(x_gt)               (H_gt tabulated: y > 0).

    Everything runs in float64 on [C, T] (near the Poisson limit, φ ~ 1e5, the dispersion
    gradient is a difference of terms 1e5 times larger than itself). Exact but for one
    bound: where ε/μ > 0.1 (μ < 1e-7) the series in ε/μ stops at its value for μ = 1e-7.
    The large values' lgamma terms come from `lgammas` (the fit's interpolants of them,
    `lgamma_segments`, to float64 rounding in value and 1e-8 in gradient) where given,
    else from Stirling's series pair by pair (`shifted_lgamma`).
    """
    mu_ntc, dtype = params["mu_ntc"].double(), params["mu_ntc"].dtype
    phi = 1.0 / params["o_y"].double() ** 2  # [T]
    effect = params.get(EFFECT_SITE)
    log_m = torch.log(mu_ntc) + math.log(2.0) * with_baseline(
        None if effect is None else effect.double(), mu_ntc, 0.0
    )  # [C, T]
    m = torch.exp(log_m)
    x = m / (phi + 2 * LOG_EPS)  # [C, T]
    totals = stats["group_totals"]  # [C, T]
    n_cells = stats["sf_moments"][:, 0].sum()
    table = GroupLog1p.apply(x, stats["sf_grid"], stats["sf_coef"], stats["sf_moments"])
    log1p_term = (
        ((n_cells * phi + totals.sum(0)) * torch.log1p(LOG_EPS / (phi + LOG_EPS))).sum()
        + (phi * table).sum()
        + WeightedLog1p.apply(
            x, stats["sf_grid"], stats["yl_nodes"], stats["yl_grid"], stats["yl_moments"]
        )
    )
    steps = torch.arange(SMALL_VALUES, dtype=phi.dtype, device=phi.device)
    rising = torch.cumsum(torch.log(phi[:, None] + steps), dim=1)  # Σ_{i<v} log(φ + i)
    total = (
        -log1p_term
        - (totals.sum(0) * torch.log(phi + LOG_EPS)).sum()
        + (totals * log_m).sum()
        + _eps_series(m, stats)
        + _pair_lgammas(phi, stats, lgammas)
        + (stats["small_count"] * rising).sum()
        + stats["constant"]
    )
    return total.to(dtype)


def _pair_lgammas(phi: torch.Tensor, stats: dict, lgammas: SegmentedLgamma | None):
    """Σ_p c_p [lgamma(φ + v_p) - lgamma(φ)] over the histogram's pairs."""
    if lgammas is not None:
        return lgammas(phi)
    return shifted_lgamma_sum(phi, stats["pair_feature"], stats["pair_value"], stats["pair_count"])


def histogram_lgammas(stats: dict[str, torch.Tensor]) -> SegmentedLgamma:
    """The interpolants of the pairs' lgamma terms (built segment by segment on use)."""
    n_features = stats["small_count"].shape[0]
    pairs = (stats[k] for k in ("pair_feature", "pair_value", "pair_count"))
    return SegmentedLgamma(*pairs, n_features)


def _eps_series(m: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ_{y > 0} y log1p(ε/μ) = Σ_{g,t} Σ_k (-1)^(k+1) (ε/m)^k / k Σ y / sf^k, by Horner
    over the coefficients `eps_weights` [K, C, T] (sign and 1/k included)."""
    ratio = LOG_EPS / torch.maximum(m, stats["sf_floor"][:, None])  # [C, T]
    weights = stats["eps_weights"]
    series = ratio * weights[-1]
    for k in range(weights.shape[0] - 2, -1, -1):
        series = ratio * (weights[k] + series)
    return series.sum()


def _by_feature_block(method):
    """Run `method(self, data)` on a sparse fit matrix one dense block of features at a
    time (at most ~64 MB), joining the results along the feature axis. Every filter,
    prior input and initial value of negbinom is per feature, so this is the dense
    computation, bit for bit, with the dense matrix never whole in memory."""

    @functools.wraps(method)
    def blockwise(self, data: FitArrays):
        if not isinstance(data.y, SparseCounts) or data.n_features == 0:
            y = data.y.dense() if isinstance(data.y, SparseCounts) else data.y
            return method(self, replace(data, y=y))
        blocks = data.y.dense_blocks(block_width(data.n_cells))
        return _joined([method(self, replace(data, y=block)) for _, block in blocks])

    return blockwise


def _joined(parts: list):
    """Per-feature results of consecutive feature blocks joined (0-d entries: the first)."""
    if isinstance(parts[0], FilterFlags):
        return FilterFlags(
            *(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(FilterFlags))
        )
    return {
        key: value if value.ndim == 0 else torch.cat([p[key] for p in parts], dim=-1)
        for key, value in parts[0].items()
    }


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
    sparse_fit = True  # the likelihood reads the non-zeros, totals and size factors only
    mergeable = True  # ... through sums over cells (a streamed fit merges its batches once)

    def merge_stats(self, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
        """Sums over cells add (tables too: batches share one grid, `FitArrays.sf_range`);
        the y log1p(ε/μ) floor is the largest; value histograms are joined."""
        for key in GRIDS:
            if not torch.equal(a[key], b[key]):
                raise ModelError(f"negbinom statistics on different grids ({key}) cannot merge")
        out = {key: a[key] for key in GRIDS}
        out["sf_floor"] = torch.maximum(a["sf_floor"], b["sf_floor"])
        pairs = ("pair_feature", "pair_value", "pair_count")
        out |= joined_pairs(*(torch.cat([a[k], b[k]]) for k in pairs))
        out |= joined_entries(a, b)
        skip = {*out, *pairs}
        return out | {k: a[k] + b[k] for k in a if k not in skip}

    def __init__(
        self,
        *,
        beta_o_alpha: float = 9.0,
        beta_o_beta: float = 3.0,
        effect_df: float = 3.0,
        effect_scale: float = 20.0,
        baseline_prior: MeanPrior = "empirical",
    ) -> None:
        self.beta_o_alpha = beta_o_alpha
        self.beta_o_beta = beta_o_beta
        self.effect_df = effect_df
        self.effect_scale = effect_scale
        self.baseline_prior = baseline_prior

    def configured(self, options: PriorOptions) -> NegBinom:
        """The same family with the run's baseline-mean prior (see `PriorOptions`)."""
        family = copy.copy(self)
        family.baseline_prior = options.negbinom_baseline
        return family

    # -- filters, priors, initial values (numpy, fit cells) ------------------------
    @_by_feature_block
    def flags(self, data: FitArrays) -> FilterFlags:
        """Zero total, or zero standard deviation of the raw counts across fit cells."""
        y = data.y
        return FilterFlags(
            ntc_zero_count=y.sum(axis=0) == 0,
            ntc_zero_std=constant(y),
            ntc_single_category=np.zeros(y.shape[1], dtype=bool),
        )

    def prior_inputs(self, data: FitArrays) -> dict[str, torch.Tensor]:
        """Gamma prior on mu_ntc: mean = baseline mean, sd = robust SE floored at 10 %
        ("standard_error", the reference's), or mean = sd = the mean over all fit cells
        ("weak", the default: an exponential, about one pseudo-count).

        From the non-zeros (`sparse_stats`; dense input is made sparse first, so the two
        agree bit for bit): cost O(non-zeros), but for "standard_error" the features that
        are mostly non-zero, whose median is taken dense, a block at a time."""
        return self._priors(data, GroupSums.of(data))

    def fit_inputs(self, data: FitArrays, tensors: FitTensors | None = None) -> tuple[dict, dict]:
        """Prior inputs and initial values from one set of group sums: the likelihood's
        statistics hold them (`tensors`, when given), else one pass over the entries."""
        sums = GroupSums.of(data, tensors)
        return self._priors(data, sums), self._inits(data, sums.scaled)

    def _priors(self, data: FitArrays, sums: GroupSums) -> dict[str, torch.Tensor]:
        """`prior_inputs` given the group sums."""
        y, sf = as_sparse(data.y), data.sum_factor
        if self.baseline_prior == "empirical" and data.n_groups > 1:
            return self._empirical_inputs(data, sums.raw())
        if self.baseline_prior in ("weak", "empirical"):  # empirical, one group: weak
            # an exponential whose mean is the mean over all fit cells: never ~0 for a
            # feature the filters kept (one with no baseline count still has others'), and
            # no robust sd needed, so the priors cost O(non-zeros)
            mean = sums.scaled.sum(axis=0) / data.n_cells + EPSILON
            sd = mean.copy()
        else:
            n_base = max(int((data.groups == 0).sum()), 1)
            mean = sums.scaled[0] / n_base + EPSILON
            sd = scaled_robust_sd(y, sf, epsilon=EPSILON) / math.sqrt(data.n_cells) + EPSILON
            sd = np.maximum(sd, mean * 0.1)
        return {
            "mu_mean": torch.as_tensor(mean, dtype=torch.float32),
            "mu_sd": torch.as_tensor(sd, dtype=torch.float32),
            "beta_o_alpha": torch.tensor(self.beta_o_alpha),
            "beta_o_beta": torch.tensor(self.beta_o_beta),
        }

    def _empirical_inputs(self, data: FitArrays, totals: np.ndarray) -> dict[str, torch.Tensor]:
        """Per feature, what the learned prior needs (`baseline_prior.empirical_inputs`)."""
        arrays = empirical_inputs(totals, data.groups, data.n_groups, data.sum_factor)
        return {k: torch.as_tensor(v, dtype=torch.float32) for k, v in arrays.items()} | {
            "beta_o_alpha": torch.tensor(self.beta_o_alpha),
            "beta_o_beta": torch.tensor(self.beta_o_beta),
        }

    def finish_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Under the learned baseline prior, its mixture from every feature's baseline
        total (`baseline_prior.learned_mixture`)."""
        if "base_count" not in inputs:
            return inputs
        arrays = {k: inputs[k].double().numpy() for k in ("base_count", "base_exposure")}
        learned = learned_mixture(reference=inputs["mu_mean"].double().numpy(), **arrays)
        return inputs | {k: torch.as_tensor(v) for k, v in learned.items()}

    def initial_values(self, data: FitArrays) -> dict[str, torch.Tensor]:
        """Effects start at log2(group mean / baseline mean) of size-factor-normalised counts
        (group sums over the non-zeros)."""
        return {} if data.n_groups < 2 else self._inits(data, GroupSums.of(data).scaled)

    @staticmethod
    def _inits(data: FitArrays, sums: np.ndarray) -> dict[str, torch.Tensor]:
        """`initial_values` given the size-factor-scaled group sums [C, T]."""
        if data.n_groups < 2:
            return {}
        sizes = np.bincount(data.groups, minlength=data.n_groups).astype(np.float64)
        means = sums / np.maximum(sizes, 1.0)[:, None] + LOG_EPS
        log2_ratio = np.log2(means[1:] / means[0])
        return {EFFECT_SITE: torch.as_tensor(log2_ratio, dtype=torch.float32)}

    # -- model pieces (pyro) -------------------------------------------------------
    def sample_latents(self, inputs: dict[str, torch.Tensor], plates: Plates) -> dict:
        """log2_alpha_y [C-1, T], beta_o [], o_y [T], mu_ntc [T]."""
        log2_alpha = sample_group_effects(
            EFFECT_SITE, plates, self._effect_prior(inputs["mu_mean"])
        )
        beta_o = pyro.sample("beta_o", dist.Gamma(inputs["beta_o_alpha"], inputs["beta_o_beta"]))
        with plates.features:
            o_y = pyro.sample("o_y", dist.Exponential(beta_o))
            mu_ntc = pyro.sample("mu_ntc", baseline_mean_prior(inputs))
        return {EFFECT_SITE: log2_alpha, "o_y": o_y, "mu_ntc": mu_ntc}

    def tensors(self, data: FitArrays, device: torch.device | str) -> FitTensors:
        """The per-group size-factor tables, the non-zero entries, totals and histograms."""
        return FitTensors(
            y=torch.empty(0),
            groups=torch.as_tensor(data.groups, dtype=torch.int64, device=device),
            n_groups=data.n_groups,
            stats=nb_statistics(data, device),
        )

    def check_inputs(self, inputs: dict[str, torch.Tensor]) -> None:
        """Under the reference's prior, warn of features with no baseline count."""
        if hint := self.divergence_hint(inputs):
            log.warning("%s", hint)

    def divergence_hint(self, inputs: dict[str, torch.Tensor]) -> str:
        """Features with no baseline count under the reference's prior, if any: it puts
        such a feature's mu_ntc at Gamma(shape ~1e-8, mean 1e-6), whose fit may not start
        (non-finite loss), and lowering the learning rate does not help.

        They are the features whose prior mean is ε alone (under "standard_error"; the
        weak prior's mean pools every group, > 0 for a kept feature): any count adds at
        least 1 / (sf N) >> ε's float32 spacing to the mean."""
        if self.baseline_prior != "standard_error":
            return ""
        mean = inputs["mu_mean"]
        count = int((mean == torch.tensor(EPSILON, dtype=mean.dtype)).sum())
        if not count:
            return ""
        return (
            f"{count} of {mean.shape[-1]} features have no count in the baseline group; "
            "under negbinom_baseline_prior: standard_error their baseline mean's prior is a "
            "Gamma of mean 1e-6 and shape ~1e-8, whose fit may diverge at its first step (a "
            "lower fit.lr does not help). negbinom_baseline_prior: empirical (the default) "
            "or weak fits them."
        )

    def newton_start(self, inputs: dict[str, torch.Tensor], data: FitTensors) -> dict:
        """Moment estimates of mu_ntc, the effects and o_y, and beta_o given them
        (`nb_moments`)."""
        prior = {k: float(inputs[k]) for k in ("beta_o_alpha", "beta_o_beta")}
        return moment_start(data.stats, **prior, effect_site=EFFECT_SITE)

    def feature_flags(
        self, inputs: dict[str, torch.Tensor], data: FitTensors
    ) -> dict[str, torch.Tensor]:
        """`baseline_no_counts` and `baseline_silent` (`nb_baseline_draws.baseline_flags`)."""
        return baseline_flags(data.stats)

    def refinement(
        self, inputs: dict[str, torch.Tensor], data: FitTensors, locs: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The exact conditional of log mu_ntc on a grid, for the features with few baseline
        counts (`nb_baseline_draws`): their posterior draws take u from it."""
        if EFFECT_SITE not in locs:  # one group: no effect relative to a baseline
            return {}

        def prior_of(features: torch.Tensor) -> dist.Distribution:
            per_feature = {k: inputs[k][features] for k in ("mu_mean", "mu_sd") if k in inputs}
            return baseline_mean_prior(inputs | per_feature)

        effect = self._effect_prior(locs["mu_ntc"].double())
        return baseline_refinement(prior_of, effect, data.stats, locs, EFFECT_SITE)

    def refine_draws(
        self, draws: dict[str, torch.Tensor], refinement: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Draws with log mu_ntc of the refined features from their exact conditional."""
        return refined_draws(draws, refinement, EFFECT_SITE) if refinement else draws

    def _effect_prior(self, like: torch.Tensor) -> dist.Distribution:
        """StudentT(df, 0, scale) of the log2 effects, on `like`'s device and dtype."""
        return dist.StudentT(
            torch.tensor(self.effect_df, dtype=like.dtype, device=like.device),
            torch.tensor(0.0, dtype=like.dtype, device=like.device),
            torch.tensor(self.effect_scale, dtype=like.dtype, device=like.device),
        )

    def observe(self, params: dict, data: FitTensors, plates: Plates) -> None:
        """NB log-likelihood of every fit cell and feature (exact; see `nb_log_likelihood`),
        with the lgamma terms' interpolants kept in `data.memo` across evaluations."""
        if "lgammas" not in data.memo:
            data.memo["lgammas"] = histogram_lgammas(data.stats)
        pyro.factor(OBS_SITE, nb_log_likelihood(params, data.stats, data.memo["lgammas"]))

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
