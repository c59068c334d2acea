"""Category usage (donor/acceptor, isoforms): K categories, group effects on the logits.

`p[g] = masked_softmax(log probs_baseline + alpha[g])`; the log-likelihood of cell n,
`lgamma(Σy + 1) - Σ lgamma(y + 1) + Σ y log p[g]`, depends on the parameters only through
the per-group category totals, so it is computed on those (plus the parameter-free
lgamma terms, computed once), exactly.
"""

from __future__ import annotations

import copy

import numpy as np
import pyro
import pyro.distributions as dist
import torch

from bayesdream_model.constants import OBS_SITE
from bayesdream_model.data import FitArrays, FitTensors
from bayesdream_model.distributions.base import (
    BaselinePrior,
    DistributionSpec,
    Family,
    FilterFlags,
    OutputSpec,
    PriorOptions,
    summed_stats,
)
from bayesdream_model.distributions.effects import broadcast_shape, sample_group_effects
from bayesdream_model.errors import ModelError
from bayesdream_model.plates import Plates
from bayesdream_model.stats import constant, group_sums

EFFECT_SITE = "alpha_logits_y"
DIRICHLET_SITE = "probs_baseline_raw"
P_FLOOR = 1e-12
INIT_CLIP = 1e-6
INTERIOR = 5e-3


def category_mask(data: FitArrays) -> np.ndarray:
    """[T, K] True where a category's total is 0 overall or in any group."""
    totals = group_sums(data.y, data.groups, data.n_groups)  # [C, T, K]
    return (totals.sum(axis=0) == 0) | (totals == 0).any(axis=0)


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over unmasked categories; masked ones get 0; a fully masked row is uniform."""
    filled = logits.masked_fill(mask, float("-inf"))
    all_masked = mask.all(dim=-1, keepdim=True)
    filled = torch.where(all_masked, torch.zeros_like(logits), filled)
    return torch.softmax(filled, dim=-1)


def centred_effects(raw: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero at masked categories, centred over k, re-masked (masked stay exactly 0)."""
    alpha = raw.masked_fill(mask, 0.0)
    alpha = alpha - alpha.mean(dim=-1, keepdim=True)
    return alpha.masked_fill(mask, 0.0)


def _with_baseline_k(effect: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """[..., C, T, K] with a zero baseline row; `like` is [..., T, K]."""
    first = torch.zeros_like(like).unsqueeze(-3)
    if effect is None:
        return first
    batch = broadcast_shape(effect.shape[:-3], first.shape[:-3])
    first = first.expand(*batch, *first.shape[-3:])
    return torch.cat([first, effect.expand(*batch, *effect.shape[-3:])], dim=-3)


class Multinomial(Family):
    """Dirichlet baseline probabilities per feature, Student-t logit shifts per group."""

    spec = DistributionSpec(
        name="multinomial",
        effect_type="logit",
        needs_denominator=False,
        needs_sum_factor=False,
        is_3d=True,
        supports_group_effects=True,
        default_niters=100_000,
        count_data=True,
        guide="point_baseline",
    )
    latent_sites = (EFFECT_SITE, DIRICHLET_SITE)
    effect_site = EFFECT_SITE
    baseline_site = "probs_baseline"
    point_sites = (DIRICHLET_SITE,)

    def __init__(
        self,
        *,
        effect_df: float = 3.0,
        effect_scale: float = 20.0,
        baseline_prior: BaselinePrior = "flat",
    ) -> None:
        self.effect_df = effect_df
        self.effect_scale = effect_scale
        self.baseline_prior = baseline_prior

    def configured(self, options: PriorOptions) -> Multinomial:
        """The same family with the run's baseline prior (see `PriorOptions`)."""
        family = copy.copy(self)
        family.baseline_prior = options.multinomial_baseline
        return family

    def flags(self, data: FitArrays) -> FilterFlags:
        """Zero total; every category's per-cell ratio constant; <= 1 category in all groups."""
        y = data.y  # [N, T, K]
        totals = y.sum(axis=2, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = np.where(totals > 0, y / totals, 0.0)
        present = group_sums(y, data.groups, data.n_groups) > 0  # [C, T, K]
        return FilterFlags(
            ntc_zero_count=y.sum(axis=(0, 2)) == 0,
            ntc_zero_std=constant(ratios).all(axis=-1),
            ntc_single_category=present.all(axis=0).sum(axis=-1) <= 1,
        )

    def prior_inputs(self, data: FitArrays) -> dict[str, torch.Tensor]:
        """Dirichlet concentration (1, or baseline-group counts + 1); the category mask."""
        if self.baseline_prior == "baseline_counts":
            counts = data.y[data.groups == 0].sum(axis=0, dtype=np.float64)
        else:
            counts = np.zeros(data.y.shape[1:], dtype=np.float64)
        return {
            "concentration": torch.as_tensor(counts + 1.0, dtype=torch.float32),
            "mask": torch.as_tensor(category_mask(data)),
        }

    def initial_values(self, data: FitArrays) -> dict[str, torch.Tensor]:
        """Effects at log(P_g / P_ref) (pseudocount 0.5); baseline at interior proportions."""
        sums = group_sums(data.y, data.groups, data.n_groups) + 0.5  # [C, T, K]
        props = np.clip(sums / sums.sum(axis=-1, keepdims=True), INIT_CLIP, 1 - INIT_CLIP)
        k = data.y.shape[-1]
        ref = data.y[data.groups == 0].sum(axis=0, dtype=np.float64) + 1.0
        p = ref / ref.sum(axis=-1, keepdims=True)
        p = (1.0 - k * INTERIOR) * p + INTERIOR
        values = {
            DIRICHLET_SITE: torch.as_tensor(p / p.sum(-1, keepdims=True), dtype=torch.float32)
        }
        if data.n_groups > 1:
            values[EFFECT_SITE] = torch.as_tensor(
                np.log(props[1:] / props[:1]), dtype=torch.float32
            )
        return values

    def tensors(self, data: FitArrays, device: torch.device | str) -> FitTensors:
        """Per-group category totals and the parameter-free lgamma constant."""
        y = data.y
        if not np.isfinite(y).all() or (y < 0).any():
            raise ModelError("Multinomial counts must be finite and non-negative.")
        y64 = torch.as_tensor(y, dtype=torch.float64)
        constant = (torch.lgamma(y64.sum(-1) + 1) - torch.lgamma(y64 + 1).sum(-1)).sum()
        stats = {
            "totals": torch.as_tensor(
                group_sums(y, data.groups, data.n_groups), dtype=torch.float32, device=device
            ),
            "constant": constant.to(dtype=torch.float32, device=device),
        }
        groups = torch.as_tensor(data.groups, dtype=torch.int64, device=device)
        return FitTensors(y=torch.empty(0), groups=groups, n_groups=data.n_groups, stats=stats)

    mergeable = True
    second_derivatives = "autograd"  # plain torch ops: double backward is exact

    def merge_stats(self, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
        """Category totals and the lgamma constant add."""
        return summed_stats(a, b)

    def sample_latents(self, inputs: dict[str, torch.Tensor], plates: Plates) -> dict:
        """alpha_logits_y [C-1, T, K]; probs_baseline_raw [T, K] ~ Dirichlet."""
        conc, mask = inputs["concentration"], inputs["mask"]
        k = conc.shape[-1]
        prior = (
            dist.StudentT(
                conc.new_tensor(self.effect_df),
                conc.new_tensor(0.0),
                conc.new_tensor(self.effect_scale),
            )
            .expand([k])
            .to_event(1)
        )
        raw = sample_group_effects(EFFECT_SITE, plates, prior)
        with plates.features:
            probs_raw = pyro.sample(DIRICHLET_SITE, dist.Dirichlet(conc))
        probs = probs_raw.masked_fill(mask, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True).clamp_min(P_FLOOR)
        alpha = None if raw is None else centred_effects(raw, mask)
        return {"alpha": alpha, "probs_baseline": probs, "mask": mask}

    def observe(self, params: dict, data: FitTensors, plates: Plates) -> None:
        """Σ_{g,t,k} Y log p + the lgamma constant."""
        probs, mask = params["probs_baseline"], params["mask"]
        alpha = _with_baseline_k(params["alpha"], probs)  # [C, T, K]
        logits = torch.log(probs.clamp_min(P_FLOOR)) + alpha
        p = masked_softmax(logits, mask).clamp_min(P_FLOOR)
        pyro.factor(OBS_SITE, (data.stats["totals"] * torch.log(p)).sum() + data.stats["constant"])

    def outputs(self) -> tuple[OutputSpec, ...]:
        """alpha_y = alpha_y_add [S, C, T, K] (masked categories 0); no alpha_y_mult."""
        return (
            OutputSpec("alpha_y", "effect", 0.0, feature_axis=-2),
            OutputSpec("alpha_y_add", "effect", 0.0, feature_axis=-2),
            OutputSpec(EFFECT_SITE, "raw", 0.0, feature_axis=-2),
            OutputSpec("probs_baseline", "feature", feature_axis=-2),
        )

    def derive(
        self, samples: dict[str, torch.Tensor], n_groups: int, inputs: dict | None = None
    ) -> dict[str, torch.Tensor]:
        """Centred, masked effects and renormalised baseline probabilities from the draws."""
        raw_probs = samples[DIRICHLET_SITE]  # [S, T, K]
        mask = inputs["mask"].to(raw_probs.device)
        probs = raw_probs.masked_fill(mask, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True).clamp_min(P_FLOOR)
        raw = samples.get(EFFECT_SITE)
        if raw is None:
            raw = raw_probs.new_zeros(raw_probs.shape[0], 0, *raw_probs.shape[1:])
        add = _with_baseline_k(centred_effects(raw, mask), probs)
        return {"alpha_y": add, "alpha_y_add": add, EFFECT_SITE: raw, "probs_baseline": probs}

    def n_features(self, inputs: dict[str, torch.Tensor]) -> int:
        """T."""
        return int(inputs["concentration"].shape[-2])

    def n_categories(self, inputs: dict[str, torch.Tensor]) -> int | None:
        """K."""
        return int(inputs["concentration"].shape[-1])

    def n_latent(self, n_groups: int, n_features: int) -> int:
        """Not used for the guide choice (the guide is fixed); C * T for reference."""
        return n_groups * n_features
