"""The SVI fit: guide choice, loss trace, early stop, and what a diverging fit reports."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from factories import negbinom_screen

import bayesdream_model.fit
import bayesdream_model.guides
from bayesdream_model.distributions import get_family
from bayesdream_model.fit import LAPLACE_SCHEDULE, FitOptions, fit_technical
from bayesdream_model.guides import flow_bytes
from bayesdream_model.inference import (
    RISE_SE,
    Anneal,
    Checkpointing,
    PlateauDetector,
    SviSettings,
    ewma_converged,
)
from bayesdream_model.recovery import DivergenceError
from tasks.fit.checkpoint import decode_state, encode_state

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
    assert fitted.guide_kind == "feature_mvn"  # auto, at any size
    assert fitted.svi.niters_run == 25 and fitted.svi.losses.shape == (25,)
    assert np.isfinite(fitted.svi.losses).all()
    assert [s for s, _, _ in seen] == list(range(25)) and {n for _, n, _ in seen} == {25}
    np.testing.assert_allclose([loss for _, _, loss in seen], fitted.svi.losses)
    assert fitted.svi.stop_reason == "reached niters=25"


def test_early_stop_on_a_flat_ewma() -> None:
    _, data = negbinom_screen(n_groups=2, seed=5)
    options = FitOptions(niters=50, tolerance=1e12, convergence="ewma")
    fitted = fit_technical(get_family("negbinom"), data, options)
    # every step is within this tolerance, but a loss above its EWMA (rising) never stops
    # the fit: the stop is the first step whose loss is at or below the EWMA
    losses, smoothed = fitted.svi.losses, fitted.svi.losses[0]
    for step in range(1, losses.size):
        if losses[step] <= smoothed:
            break
        smoothed = 0.05 * losses[step] + 0.95 * smoothed
    assert fitted.svi.niters_run == step + 1
    assert fitted.svi.stop_reason.startswith("converged")


def test_ewma_rule_never_stops_on_a_rising_loss() -> None:
    settings = SviSettings(niters=10, tolerance=1.0)  # |0.05 (loss - ewma)| < 1: within 20
    assert ewma_converged(1000.0, 1005.0, settings)
    assert not ewma_converged(1005.0, 1000.0, settings)  # as close, but above its average
    assert not ewma_converged(900.0, 1000.0, settings)  # far below: still falling fast


def test_plateau_rule_never_fires_on_a_rising_loss() -> None:
    settings = SviSettings(niters=10_000, window=50, patience=3)
    rng = np.random.default_rng(1)
    # window means rise by ~2x the noise of their difference (~60): the old rule counted
    # every window that did not improve as flat and stopped here at step 199
    rising = 1e6 + 120.0 * np.arange(1500) / 50 + rng.normal(0.0, 300.0, size=1500)
    assert plateau_stop(rising, settings) is None
    worse = 1e6 + np.where(np.arange(1500) < 200, 0.0, 5000.0) + rng.normal(0.0, 300.0, 1500)
    stop = plateau_stop(worse, settings)  # a jump up resets the count: flat again later
    assert stop is not None and stop >= 200 + 3 * 50 - 1


def test_auto_guide_is_the_per_feature_guide_at_every_size() -> None:
    small = choice(3, 10, preference="auto")  # where the reference would take the IAF
    assert small.kind == "feature_mvn" and small.default_niters == 50_000
    assert "IAF diverged or mis-covered" in small.reason
    assert choice(3, 1250, preference="auto").kind == "feature_mvn"
    beyond = choice(3, 1251, preference="auto")
    assert beyond.kind == "feature_mvn" and beyond.default_niters == 100_000
    for forced in ("iaf", "feature_mvn"):
        assert choice(3, 1251, preference=forced).kind == forced
        assert choice(3, 10, preference=forced).kind == forced


def fill_guide_at(monkeypatch, step_to_fill: int, value: float, *, every_step: bool = False):
    """An on_progress callback that sets every guide parameter to `value` at one step (or
    at every step from it on: a fit that diverges however it is restarted).

    NaN is what a diverging fit produces (lr too high, extreme data), made deterministic;
    the guide is caught on its way out of `build_guide`.
    """
    built = []

    def build_and_keep(*args, **kwargs):
        built.append(bayesdream_model.guides.build_guide(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(bayesdream_model.fit, "build_guide", build_and_keep)
    fired: list[int] = []

    def callback(step: int, niters: int, loss: float) -> None:
        # once only, unless every_step: a rolled-back fit passes `step_to_fill` again
        if (step == step_to_fill and not fired) or (every_step and step >= step_to_fill):
            fired.append(step)
            with torch.no_grad():
                for param in built[-1].parameters():
                    param.fill_(value)

    return callback


NAN_WARNING = pytest.mark.filterwarnings("ignore:Encountered NaN")  # Pyro's, expected here


@NAN_WARNING
@pytest.mark.parametrize("guide", GUIDES)
def test_non_finite_parameters_are_rolled_back(guide: str, monkeypatch) -> None:
    """Parameters turned NaN after step 3: the next loss is non-finite, the fit returns to
    its state at step 0 with lower learning rates and runs to the end."""
    _, data = negbinom_screen(n_groups=2, seed=0)
    callback = fill_guide_at(monkeypatch, 3, math.nan)
    fitted = fit_negbinom(data, guide, niters=20, on_progress=callback)
    assert fitted.svi.niters_run == 20 and np.isfinite(fitted.svi.losses).all()
    (recovery,) = fitted.svi.recoveries
    assert (recovery.step, recovery.restored_to) == (4, 0)
    assert recovery.reason.startswith("non-finite")
    # the peak: 10 lr on the reference's schedule, lr itself after a Laplace start
    peak = LAPLACE_SCHEDULE["peak_factor"] if fitted.svi.start is not None else 10
    assert recovery.lr_peak == pytest.approx(1e-3 * peak * 0.2)
    assert "after 1 divergence recovery (step 4 (non-finite" in fitted.svi.stop_reason


@NAN_WARNING
@pytest.mark.parametrize("guide", GUIDES)
def test_a_fit_that_keeps_diverging_stops_naming_step_and_tries(guide: str, monkeypatch) -> None:
    _, data = negbinom_screen(n_groups=2, seed=0)
    callback = fill_guide_at(monkeypatch, 3, math.nan, every_step=True)
    options = FitOptions(niters=20, guide=guide, label="modality 'gene'")
    limit = 0 if guide == "mean_field" else bayesdream_model.guides.CPU_FLOW_MAX_LATENT
    monkeypatch.setattr(bayesdream_model.guides, "CPU_FLOW_MAX_LATENT", limit)
    with pytest.raises(DivergenceError) as info:
        fit_technical(get_family("negbinom"), data, options, on_progress=callback)
    message = str(info.value)
    assert message.startswith("SVI diverged for modality 'gene' at step 4 (non-finite")
    assert "after 4 recoveries" in message and message.count("-> step 0, peak lr") == 4
    assert "Lower fit.lr" in message


@NAN_WARNING
@pytest.mark.parametrize("guide", ["mean_field", "feature_mvn"])  # the stable IAF stays finite
def test_nan_likelihood_from_extreme_parameters_is_rolled_back(guide: str, monkeypatch) -> None:
    """Finite but extreme parameters: a NaN likelihood, recovered like any divergence."""
    _, data = negbinom_screen(n_groups=2, seed=0)
    callback = fill_guide_at(monkeypatch, 3, 1e3)
    fitted = fit_negbinom(data, guide, niters=20, on_progress=callback)
    assert len(fitted.svi.recoveries) == 1 and np.isfinite(fitted.svi.losses).all()


@NAN_WARNING
@pytest.mark.parametrize("guide", GUIDES)
def test_an_absurd_learning_rate_still_diverging_after_recoveries_is_an_error(guide: str) -> None:
    _, data = negbinom_screen(n_groups=2, seed=0)
    with pytest.raises(DivergenceError, match="Lower fit.lr"):
        fit_negbinom(data, guide, niters=300, lr=1e4)


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


def _toy_svi(settings: SviSettings, checkpointing=None, optimizers: list | None = None):
    """A 1-D Normal-mean model that converges within a few hundred steps."""
    import pyro
    import pyro.distributions as dist
    from pyro.infer import Trace_ELBO
    from pyro.infer.autoguide import AutoNormal

    import bayesdream_model.inference as inference

    data = torch.linspace(-1.0, 3.0, 50)

    def model():
        loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
        with pyro.plate("n", data.numel()):
            pyro.sample("y", dist.Normal(loc, 1.0), obs=data)

    pyro.set_rng_seed(0)
    guide = AutoNormal(model)
    guide()
    original = inference.make_optimizer

    def keep(params, s):
        made = original(params, s)
        if optimizers is not None:
            optimizers.append(made[0])
        return made

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(inference, "make_optimizer", keep)
        return inference.run_svi(model, guide, Trace_ELBO(), settings, checkpointing=checkpointing)


ANNEAL = SviSettings(niters=20_000, lr=0.01, window=20, patience=3)


def test_plateau_then_annealed_learning_rate_before_stopping() -> None:
    optimizers: list = []
    result = _toy_svi(ANNEAL, optimizers=optimizers)
    assert "annealed for" in result.stop_reason and result.stop_reason.startswith("converged")
    plateau_step = int(result.stop_reason.split("(step ")[1].split(")")[0])
    extra = max(4 * ANNEAL.window, int(0.25 * (plateau_step + 1)))
    assert result.niters_run == plateau_step + 1 + extra < ANNEAL.niters
    # the last step ran at the floor (1e-3) of the learning rate the plateau found, which
    # the one-cycle warm-up (2,000 steps to 10 lr) had brought above lr: without the
    # anneal the rate would still be rising
    final_lr = optimizers[0].param_groups[0]["lr"]
    assert final_lr < 1e-3 * ANNEAL.lr * ANNEAL.peak_factor


def test_no_annealing_when_asked_and_resume_inside_the_anneal() -> None:
    plain = _toy_svi(replace(ANNEAL, anneal_windows=0, anneal_fraction=0.0))
    assert "annealed" not in plain.stop_reason
    full = _toy_svi(ANNEAL)
    assert full.niters_run > plain.niters_run
    saved: list[bytes] = []
    middle = plain.niters_run + 10  # a kill inside the annealing phase

    def save(state: dict) -> None:
        if len(state["losses"]) == middle:
            assert state["anneal"] is not None
            saved.append(encode_state(state))  # the store's plain-data checkpoint format

    _toy_svi(ANNEAL, Checkpointing(save, every_s=0.0))
    state = decode_state(saved[0])
    resumed = _toy_svi(ANNEAL, Checkpointing(lambda s: None, state, 0.0))
    np.testing.assert_array_equal(resumed.losses, full.losses)
    assert resumed.stop_reason == full.stop_reason


def _annealed(rise_in_se: float, *, seed: int = 0) -> str:
    """The anneal's outcome for a plateau of pure noise (sd 1, windows of 20) followed by
    an annealed window that is `rise_in_se` standard errors of their difference higher."""
    rng = np.random.default_rng(seed)
    plateau, recent = rng.normal(0.0, 1.0, 20), rng.normal(0.0, 1.0, 20)
    level = (float(plateau.mean()), float(plateau.var(ddof=1)))
    se = math.sqrt((level[1] + recent.var(ddof=1)) / 20)
    recent += level[0] - recent.mean() + rise_in_se * se  # the rise, exactly
    anneal = Anneal(start=20, stop=40, lrs=[0.01], reason="converged: flat", level=level)
    return anneal.outcome([*plateau, *recent], window=20)


def test_the_anneal_tells_a_noise_sized_rise_from_a_real_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A rise within RISE_SE standard errors is noise: converged, no warning (two standard
    errors were called a failure before, and the demo ended in that warning); beyond it
    the fit is not converged."""
    with caplog.at_level("WARNING"):
        assert _annealed(0.95 * RISE_SE).startswith("converged")
        assert _annealed(2.0).startswith("converged")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    risen = _annealed(1.05 * RISE_SE)
    assert risen.startswith("not converged: the loss rose by") and "annealed for 20" in risen
    assert [r for r in caplog.records if "rose by" in r.getMessage()]
