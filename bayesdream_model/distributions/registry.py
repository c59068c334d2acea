"""The registry of distribution families, and the lookup helpers that reject unknown names."""

from __future__ import annotations

from bayesdream_model.distributions.base import DistributionSpec, EffectType, Family
from bayesdream_model.distributions.binomial import Binomial
from bayesdream_model.distributions.continuous import Normal, StudentT
from bayesdream_model.distributions.multinomial import Multinomial
from bayesdream_model.distributions.negbinom import NegBinom
from bayesdream_model.errors import UnknownDistributionError

_FAMILIES: dict[str, Family] = {
    family.spec.name: family
    for family in (NegBinom(), Binomial(), Multinomial(), Normal(), StudentT())
}

DISTRIBUTIONS: tuple[str, ...] = tuple(_FAMILIES)


def get_family(name: str) -> Family:
    """The family registered under `name`."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise UnknownDistributionError(
            f"Unknown distribution '{name}': expected one of {', '.join(DISTRIBUTIONS)}. "
            "Fix the modality's `distribution:` in the config."
        ) from None


def get_spec(name: str) -> DistributionSpec:
    """The static facts about `name`."""
    return get_family(name).spec


def requires_denominator(name: str) -> bool:
    """Binomial needs a denominator of the counts' shape."""
    return get_spec(name).needs_denominator


def requires_sum_factor(name: str) -> bool:
    """Negbinom needs positive size factors."""
    return get_spec(name).needs_sum_factor


def is_3d(name: str) -> bool:
    """Multinomial data are features x cells x K."""
    return get_spec(name).is_3d


def supports_group_effects(name: str) -> bool:
    """Whether technical groups shift this distribution's features."""
    return get_spec(name).supports_group_effects


def effect_type(name: str) -> EffectType:
    """multiplicative, logit or additive."""
    return get_spec(name).effect_type
