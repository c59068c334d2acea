"""The SVI fit: guide choice, loss trace, early stop, and what a diverging fit reports."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from factories import negbinom_screen

import bayesdream_model.fit
import bayesdream_model.guides
from bayesdream_model.distributions import get_family
from bayesdream_model.errors import ModelError
from bayesdream_model.fit import FitOptions, fit_technical
from bayesdream_model.guides import flow_bytes
from bayesdream_model.inference import PlateauDetector, SviSettings

from ._support import GUIDES, fit_negbinom, negbinom_guide_choice

choice = negbinom_guide_choice

GIB = 1024**3
GPU = "cuda"


@pytest.mark.parametrize(("n_groups", "n_features"), [(1, 2500), (3, 1250), (4, 1000), (2, 10)])
def test_cpu_iaf_up_to_5000_latents(n_groups: int, n_features: int) -> None:
    picked = choice(n_groups, n_features)
    assert picked.kind == "iaf" and picked.default_niters == 50_000


@pytest.mark.parametrize(("n_groups", "n_features"), [(1, 2501), (3, 1251), (4, 5000)])
def test_cpu_mean_field_beyond_5000_latents_with_more_iterations(
    n_groups: int, n_features: int
) -> None:
    picked = choice(n_groups, n_features)
    assert picked.kind == "mean_field" and picked.default_niters == 100_000


def test_gpu_rule_compares_flow_memory_with_vram_minus_10_gb() -> None:
    n_latent = 4 * 5000  # C = 3, T = 5000: beyond the CPU limit
    assert flow_bytes(n_latent) == n_latent**2 * 4 * 3 * 1.5  # 7.2 GB
    assert choice(3, 5000, device=GPU, vram=24 * GIB).kind == "iaf"
    assert choice(3, 5000, device=GPU, vram=16 * GIB).kind == "mean_field"  # 16 - 10 GB < 7.2 GB
    assert choice(3, 5000, device=GPU, vram=16 * GIB).default_niters == 100_000
    assert choice(3, 5000, device=GPU, vram=None).kind == "mean_field"  # unknown VRAM: the CPU rule


def test_loss_trace_progress_and_guide() -> None:
    _, data = negbinom_screen(n_groups=2, seed=5)
    seen: list[tuple[int, int, float]] = []
    fitted = fit_technical(
        get_family("negbinom"),
        data,
        FitOptions(niters=25),
        on_progress=lambda step, niters, loss: seen.append((step, niters, loss)),
    )
    assert fitted.guide_kind == "iaf"  # (C + 1) T = 24 latents on the CPU
    assert fitted.svi.niters_run == 25 and fitted.svi.losses.shape == (25,)
    assert np.isfinite(fitted.svi.losses).all()
    assert [s for s, _, _ in seen] == list(range(25)) and {n for _, n, _ in seen} == {25}
    np.testing.assert_allclose([loss for _, _, loss in seen], fitted.svi.losses)
    assert fitted.svi.stop_reason == "reached niters=25"


def test_early_stop_on_a_flat_ewma() -> None:
    _, data = negbinom_screen(n_groups=2, seed=5)
    options = FitOptions(niters=50, tolerance=1e12, convergence="ewma")
    fitted = fit_technical(get_family("negbinom"), data, options)
    assert fitted.svi.niters_run == 2  # the EWMA starts at step 0; step 1 is within tolerance
    assert fitted.svi.stop_reason.startswith("converged")


def test_auto_guide_replaces_mean_field_by_feature_mvn() -> None:
    assert choice(3, 1250, preference="auto").kind == "iaf"
    beyond = choice(3, 1251, preference="auto")
    assert beyond.kind == "feature_mvn" and beyond.default_niters == 100_000
    for forced in ("iaf", "feature_mvn"):
        assert choice(3, 1251, preference=forced).kind == forced
        assert choice(3, 10, preference=forced).kind == forced


def fill_guide_at(monkeypatch, step_to_fill: int, value: float):
    """An on_progress callback that sets every guide parameter to `value` at one step.

    NaN is what a diverging fit produces (lr too high, extreme data), made deterministic;
    the guide is caught on its way out of `build_guide`.
    """
    built = []

    def build_and_keep(*args, **kwargs):
        built.append(bayesdream_model.guides.build_guide(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(bayesdream_model.fit, "build_guide", build_and_keep)

    def callback(step: int, niters: int, loss: float) -> None:
        if step == step_to_fill:
            with torch.no_grad():
                for param in built[-1].parameters():
                    param.fill_(value)

    return callback


NAN_WARNING = pytest.mark.filterwarnings("ignore:Encountered NaN")  # Pyro's, expected here


@NAN_WARNING
@pytest.mark.parametrize("guide", GUIDES)
def test_non_finite_parameters_raise_model_error(guide: str, monkeypatch) -> None:
    """Not Pyro's raw ValueError from validating a NaN distribution (a bug, now fixed)."""
    _, data = negbinom_screen(n_groups=2, seed=0)
    callback = fill_guide_at(monkeypatch, 3, math.nan)
    with pytest.raises(ModelError, match="lower fit.lr") as info:
        fit_negbinom(data, guide, niters=20, on_progress=callback)
    assert "step 4" in str(info.value)


@NAN_WARNING
@pytest.mark.parametrize("guide", ["mean_field", "feature_mvn"])  # the stable IAF stays finite
def test_nan_likelihood_from_extreme_parameters_raises_model_error(guide: str, monkeypatch) -> None:
    """Finite but extreme parameters: a NaN likelihood, not Pyro's raw ValueError (was a bug)."""
    _, data = negbinom_screen(n_groups=2, seed=0)
    callback = fill_guide_at(monkeypatch, 3, 1e3)
    with pytest.raises(ModelError, match="lower fit.lr"):
        fit_negbinom(data, guide, niters=20, on_progress=callback)


@NAN_WARNING
@pytest.mark.parametrize("guide", GUIDES)
def test_diverging_lr_raises_model_error(guide: str) -> None:
    _, data = negbinom_screen(n_groups=2, seed=0)
    with pytest.raises(ModelError, match="lower fit.lr"):
        fit_negbinom(data, guide, niters=300, lr=100.0)


def plateau_stop(losses: np.ndarray, settings: SviSettings) -> int | None:
    """The step at which the plateau rule stops, feeding losses one step at a time."""
    detector = PlateauDetector(settings)
    for step in range(losses.size):
        if detector.update(list(losses[: step + 1])) is not None:
            return step
    return None


def test_plateau_rule_stops_on_flat_noise_only() -> None:
    settings = SviSettings(niters=10_000, window=50, patience=3)
    rng = np.random.default_rng(0)
    flat = 1e6 + rng.normal(0.0, 300.0, size=2000)
    # the first window sets the reference; `patience` flat windows later it stops
    assert plateau_stop(flat, settings) == 4 * 50 - 1
    falling = 1e6 - 100.0 * np.arange(2000) + rng.normal(0.0, 300.0, size=2000)
    assert plateau_stop(falling, settings) is None
