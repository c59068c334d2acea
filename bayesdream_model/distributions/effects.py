"""Group-effect sites shared by the families: a [C-1, T] site, baseline row prepended."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from bayesdream_model.plates import Plates


def sample_group_effects(name: str, plates: Plates, prior: dist.Distribution) -> torch.Tensor | None:
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
    batch = torch.broadcast_shapes(effect.shape[:-2], first.shape[:-2])
    first = first.expand(*batch, 1, first.shape[-1])
    effect = effect.expand(*batch, *effect.shape[-2:])
    return torch.cat([first, effect], dim=-2)
