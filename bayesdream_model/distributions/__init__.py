"""Distribution families and their registry."""

from bayesdream_model.distributions.base import (
    DistributionSpec,
    Family,
    FilterFlags,
    OutputSpec,
    PriorOptions,
)
from bayesdream_model.distributions.registry import (
    DISTRIBUTIONS,
    effect_type,
    get_family,
    get_spec,
    is_3d,
    requires_denominator,
    requires_sum_factor,
    supports_group_effects,
)

__all__ = [
    "DISTRIBUTIONS",
    "DistributionSpec",
    "Family",
    "FilterFlags",
    "OutputSpec",
    "PriorOptions",
    "effect_type",
    "get_family",
    "get_spec",
    "is_3d",
    "requires_denominator",
    "requires_sum_factor",
    "supports_group_effects",
]
