"""Group-effect sites shared by the families: a [C-1, T] site, baseline row prepended."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from bayesdream_model.plates import Plates


def sample_group_effects(
    name: str, plates: Plates, prior: dist.Distribution
) -> torch.Tensor | None:
    """`name[g >= 1, t] ~ prior`; None when there is a single group (nothing to learn)."""
    if plates.groups is None:
        return None
    with plates.features, plates.groups:
        return pyro.sample(name, prior)


def with_baseline(effect: torch.Tensor | None, like: torch.Tensor, baseline: float) -> torch.Tensor:
    """[..., C, T] with row 0 = `baseline`; `like` [..., T] gives batch shape and device."""
    first = torch.full_like(like, baseline).unsqueeze(-2)
    if effect is None:
        return first
    batch = broadcast_shape(effect.shape[:-2], first.shape[:-2])
    first = first.expand(*batch, 1, first.shape[-1])
    effect = effect.expand(*batch, *effect.shape[-2:])
    return torch.cat([first, effect], dim=-2)


def broadcast_shape(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    """The shape `shapes` broadcast to, worked out here: `torch.broadcast_shapes` imports
    sympy on first use (~0.5 s once per process, a tenth of a fit stage)."""
    ndim = max((len(s) for s in shapes), default=0)
    out = [1] * ndim
    for shape in shapes:
        for i, size in enumerate(shape, start=ndim - len(shape)):
            if size != 1:
                if out[i] not in (1, size):
                    raise ValueError(f"shapes {shapes} do not broadcast")
                out[i] = size
    return tuple(out)


def additive_outputs(effect_site: str, feature_sites: tuple[str, ...]):
    """Results of a family whose effects add (logit or data units): alpha_y = alpha_y_add,
    alpha_y_mult is 1 (kept for a uniform layout), the raw effect site, per-feature sites."""
    from bayesdream_model.distributions.base import OutputSpec

    return (
        OutputSpec("alpha_y", "effect", 0.0),
        OutputSpec("alpha_y_mult", "effect", 1.0),
        OutputSpec("alpha_y_add", "effect", 0.0),
        OutputSpec(effect_site, "raw", 0.0),
        *(OutputSpec(site, "feature") for site in feature_sites),
    )


def derive_additive(
    samples: dict[str, torch.Tensor], effect_site: str, feature_sites: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """`additive_outputs` from posterior draws [S, ...] (never exponentiated)."""
    like = samples[feature_sites[0]]
    raw = samples.get(effect_site)
    if raw is None:  # a single group: nothing was sampled
        raw = like.new_zeros(like.shape[0], 0, like.shape[-1])
    add = with_baseline(raw, like, 0.0)
    derived = {"alpha_y": add, "alpha_y_mult": torch.ones_like(add), "alpha_y_add": add}
    return derived | {effect_site: raw} | {site: samples[site] for site in feature_sites}
