"""What every distribution family provides; the registry maps names to families."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from bayesdream_model.data import FitArrays, FitTensors
from bayesdream_model.plates import Plates

EffectType = Literal["multiplicative", "logit", "additive"]


@dataclass(frozen=True)
class DistributionSpec:
    """Static facts about one distribution (the registry's entry)."""

    name: str
    effect_type: EffectType
    needs_denominator: bool
    needs_sum_factor: bool
    is_3d: bool
    supports_group_effects: bool
    default_niters: int
    count_data: bool  # values must be non-negative finite counts
    supports_cis: bool = False  # may carry the cis feature (the primary negbinom modality)
    #: "mean_field"; "flow_if_fits" (IAF when it fits in memory, else mean-field);
    #: "point_baseline" (point mass on the family's point_sites, mean-field on the rest)
    guide: Literal["mean_field", "flow_if_fits", "point_baseline"] = "mean_field"


BaselinePrior = Literal["flat", "baseline_counts"]
MeanPrior = Literal["empirical", "weak", "standard_error"]
ContinuousPrior = Literal["weak", "standard_error"]


@dataclass(frozen=True)
class PriorOptions:
    """Prior choices a run may make (families ignore those that are not theirs).

    `multinomial_baseline`: "flat" = Dirichlet(1) on each feature's baseline probabilities
    (the default: calibrated); "baseline_counts" = Dirichlet(baseline-group counts + 1),
    the reference bayesDREAM's prior, which counts the baseline cells a second time on top
    of the likelihood and so narrows the posterior (90 % intervals cover ~0.85).

    `negbinom_baseline`: the prior on each feature's baseline mean mu_ntc. "empirical"
    (the default) is learned from the screen (`baseline_prior`): log2 mu_ntc is the
    non-baseline cells' mean plus r, r drawn from a smooth mixture fitted to every
    feature's baseline counts, so that genes off in the baseline group (cell-line panels)
    get intervals as wide as the screen says such genes are spread. "weak" is an
    exponential (shape 1) whose mean is the feature's mean over all fit cells (size-factor
    normalised): about one pseudo-count, calibrated where every gene is expressed in the
    baseline, but it gives a baseline 2^-8 of that mean ~0.4 % of its mass. "standard_error",
    the reference bayesDREAM's, is a Gamma with the baseline cells' mean and sd = the
    robust standard error over the fit cells, floored at 10 % of that mean; at low depth
    it carries about as much information as the baseline cells themselves, so it counts
    them twice (droplet-like screens: 90 % intervals cover ~0.85).

    `continuous` (normal, studentt): "weak" (the default) puts the effects' StudentT scale
    and the baseline mean's prior sd at the feature's own spread (robust sd over the fit
    cells); "standard_error", the reference's, at the standard error of a mean (that sd /
    √N, floored), which shrinks real shifts between groups (90 % coverage 0.76-0.85).
    """

    multinomial_baseline: BaselinePrior = "flat"
    negbinom_baseline: MeanPrior = "empirical"
    continuous: ContinuousPrior = "weak"


@dataclass(frozen=True)
class OutputSpec:
    """One result array: `kind` says how it is laid out and what excluded features hold.

    effect:  [S, C, T(, K)], excluded features at `fill` (the baseline value)
    raw:     [S, C-1, T(, K)], excluded features 0
    feature: [S, T(, K)], excluded features NaN
    scalar:  [S]
    """

    name: str
    kind: Literal["effect", "raw", "feature", "scalar"]
    fill: float = float("nan")
    feature_axis: int = -1  # where T sits (multinomial: -2, before K)


@dataclass(frozen=True)
class FilterFlags:
    """Per-feature exclusion reasons, bool [T] each."""

    ntc_zero_count: np.ndarray
    ntc_zero_std: np.ndarray
    ntc_single_category: np.ndarray

    @property
    def ntc_excluded_from_fit(self) -> np.ndarray:
        """Any reason."""
        return self.ntc_zero_count | self.ntc_zero_std | self.ntc_single_category

    @property
    def technical_correction_applied(self) -> np.ndarray:
        """Not excluded."""
        return ~self.ntc_excluded_from_fit

    def as_dict(self) -> dict[str, np.ndarray]:
        """All five flags by their result names."""
        return {
            "ntc_zero_count": self.ntc_zero_count,
            "ntc_zero_std": self.ntc_zero_std,
            "ntc_single_category": self.ntc_single_category,
            "ntc_excluded_from_fit": self.ntc_excluded_from_fit,
            "technical_correction_applied": self.technical_correction_applied,
        }


def summed_stats(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    """Statistics that are sums over cells, of two disjoint sets of cells."""
    return {k: a[k] + b[k] for k in a}


class Family(ABC):
    """The behaviour of one distribution: filters, priors, inits, sites, likelihood."""

    spec: DistributionSpec
    #: latent sites the guide covers, in the order they are sampled
    latent_sites: tuple[str, ...]
    #: the raw effect site (zero-filled for excluded features)
    effect_site: str
    #: the per-feature result that holds the baseline group's level (mean, proportion)
    baseline_site: str = "mu_ntc"

    def configured(self, options: PriorOptions) -> Family:
        """This family with the run's prior choices (default: none apply, itself)."""
        return self

    def tensors(self, data: FitArrays, device: torch.device | str) -> FitTensors:
        """What the likelihood reads, on `device` (default: the fit cells' data as is)."""
        return FitTensors.from_arrays(data, device)

    @abstractmethod
    def flags(self, data: FitArrays) -> FilterFlags:
        """The feature filters (docs/model.md, section 4), on the cells that are fit."""

    @abstractmethod
    def prior_inputs(self, data: FitArrays) -> dict[str, torch.Tensor]:
        """Empirical prior parameters for the fit features."""

    @abstractmethod
    def initial_values(self, data: FitArrays) -> dict[str, torch.Tensor]:
        """Data-driven initial values (sites not named start at the prior median)."""

    def fit_inputs(self, data: FitArrays, tensors: FitTensors | None = None) -> tuple[dict, dict]:
        """(prior inputs, initial values): what the fit computes from the data before it
        starts (a family whose two share work computes it once, or reads it from the
        likelihood's `tensors` of the same data when given)."""
        return self.prior_inputs(data), self.initial_values(data)

    def finish_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The prior inputs of every fit feature, completed by what is learned across
        features (`fit_inputs` sees one block of features at a time; default: nothing)."""
        return inputs

    @abstractmethod
    def sample_latents(self, inputs: dict[str, torch.Tensor], plates: Plates) -> dict:
        """Pyro sample statements for every latent site; returns the site values."""

    @abstractmethod
    def observe(self, params: dict, data: FitTensors, plates: Plates) -> None:
        """The likelihood of the fit cells' data (a pyro observe statement)."""

    @abstractmethod
    def n_features(self, inputs: dict[str, torch.Tensor]) -> int:
        """T, read off the prior inputs."""

    @abstractmethod
    def outputs(self) -> tuple[OutputSpec, ...]:
        """The result arrays, in the order they are written."""

    #: sites the guide pins to a point (AutoDelta) instead of a distribution
    point_sites: tuple[str, ...] = ()
    #: how the Laplace start takes the log joint's second derivatives: "autograd" (double
    #: backward; the likelihood is plain torch) or "finite_differences" of the gradient (the
    #: likelihood is a custom autograd Function with a hand-written first derivative only,
    #: whose double backward would be silently wrong)
    second_derivatives: Literal["autograd", "finite_differences"] = "finite_differences"
    #: the likelihood reads only per-group sums that `merge_stats` can combine exactly
    mergeable: bool = False
    #: the fit matrix may be held as its non-zeros (`bayesdream_model.sparse.SparseCounts`)
    sparse_fit: bool = False

    def check_inputs(self, inputs: dict[str, torch.Tensor]) -> None:
        """Warn once per fit of what in the prior inputs (all fit features) the user should
        act on (default: nothing)."""
        return None

    def divergence_hint(self, inputs: dict[str, torch.Tensor]) -> str:
        """What in the prior inputs may make a fit diverge, for the error that says it did
        ('' when nothing is known)."""
        return ""

    def newton_start(self, inputs: dict[str, torch.Tensor], data: FitTensors) -> dict:
        """Where the Laplace start's Newton iterations begin, for the sites named (their
        constrained values; default: none, i.e. the guide's initial values): a point near
        each feature's MAP, from the data the likelihood reads. It moves only Newton's
        starting point, not the MAP it converges to nor the guide's initial values."""
        return {}

    def feature_flags(
        self, inputs: dict[str, torch.Tensor], data: FitTensors
    ) -> dict[str, torch.Tensor]:
        """What the results flag per fit feature, bool [T] by name (default: nothing)."""
        return {}

    def refinement(
        self, inputs: dict[str, torch.Tensor], data: FitTensors, locs: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """What the per-feature guide's posterior draws are refined with (`refine_draws`),
        given its posterior means `locs` (unconstrained, by site); {} for nothing."""
        return {}

    def refine_draws(
        self, draws: dict[str, torch.Tensor], refinement: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Posterior draws of the latents [S, ...] with the refinement applied (default:
        as they are)."""
        return draws

    def merge_stats(self, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
        """`FitTensors.stats` of two disjoint sets of cells, combined (mergeable families)."""
        raise NotImplementedError(f"{self.spec.name}: the likelihood reads every cell")

    @abstractmethod
    def derive(
        self, samples: dict[str, torch.Tensor], n_groups: int, inputs: dict | None = None
    ) -> dict[str, torch.Tensor]:
        """Result arrays for the fit features from posterior draws of the latents [S, ...]."""

    def n_categories(self, inputs: dict[str, torch.Tensor]) -> int | None:
        """K for 3-D families, else None."""
        return None

    @abstractmethod
    def n_latent(self, n_groups: int, n_features: int) -> int:
        """Number of latent scalars, for the guide choice."""
