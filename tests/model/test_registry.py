"""The distribution registry: lookups reject unknown names; negbinom's static facts."""

from __future__ import annotations

import dataclasses

import pytest

from bayesdream_model.distributions import (
    DISTRIBUTIONS,
    effect_type,
    get_family,
    get_spec,
    is_3d,
    requires_denominator,
    requires_sum_factor,
    supports_group_effects,
)
from bayesdream_model.distributions.negbinom import NegBinom
from bayesdream_model.errors import ModelError, UnknownDistributionError

LOOKUPS = [
    get_family,
    get_spec,
    requires_denominator,
    requires_sum_factor,
    is_3d,
    supports_group_effects,
    effect_type,
]


@pytest.mark.parametrize("lookup", LOOKUPS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("name", ["negbinomial", "", "poisson"])
def test_lookup_rejects_unknown_name_naming_the_valid_ones(lookup, name: str) -> None:
    with pytest.raises(UnknownDistributionError) as info:
        lookup(name)
    message = str(info.value)
    assert f"'{name}'" in message
    for valid in DISTRIBUTIONS:
        assert valid in message
    assert isinstance(info.value, ModelError)


def test_negbinom_is_registered() -> None:
    assert "negbinom" in DISTRIBUTIONS
    family = get_family("negbinom")
    assert isinstance(family, NegBinom)
    assert get_spec("negbinom") is family.spec
    assert family.spec.name == "negbinom"


def test_negbinom_spec_facts() -> None:
    spec = get_spec("negbinom")
    assert effect_type("negbinom") == spec.effect_type == "multiplicative"
    assert requires_sum_factor("negbinom") is True
    assert requires_denominator("negbinom") is False
    assert is_3d("negbinom") is False
    assert supports_group_effects("negbinom") is True
    assert spec.default_niters == 50_000
    assert spec.count_data is True
    assert spec.guide == "flow_if_fits"


def test_spec_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_spec("negbinom").default_niters = 1  # type: ignore[misc]


def test_negbinom_outputs_match_spec_results() -> None:
    outputs = {o.name: o for o in get_family("negbinom").outputs()}
    assert {"alpha_y", "alpha_y_mult", "alpha_y_add", "log2_alpha_y", "mu_ntc", "o_y"} <= set(
        outputs
    )
    assert outputs["alpha_y"].kind == outputs["alpha_y_mult"].kind == "effect"
    assert outputs["alpha_y_mult"].fill == outputs["alpha_y"].fill == 1.0
    assert outputs["alpha_y_add"].kind == "effect" and outputs["alpha_y_add"].fill == 0.0
    assert outputs["log2_alpha_y"].kind == "raw" and outputs["log2_alpha_y"].fill == 0.0
    assert outputs["mu_ntc"].kind == "feature"
    assert outputs["beta_o"].kind == "scalar"


def test_negbinom_n_latent_is_c_plus_one_times_t() -> None:
    family = get_family("negbinom")
    assert family.n_latent(1, 10) == 20
    assert family.n_latent(3, 7) == 28
