"""A fit that diverges mid-way recovers: the run ends complete, the roll-back is recorded,
and the effects are as well recovered as by an undisturbed run of the same screen."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import bayesdream_model.inference as inference
from bayesdream_model.fit import LAPLACE_SCHEDULE
from flows.technical_fit import technical_fit
from tasks.demo import write_demo_inputs
from tasks.store import COMPLETE, fit_key, results_key

#: the statistical tier: two demo fits, one broken mid-way, compared
pytestmark = pytest.mark.slow

#: the default fit starts at the Laplace approximation and polishes on windows of 10
#: steps: breaking it at step 35, after the copies of steps 20 and 30, returns it to 20
WINDOW = LAPLACE_SCHEDULE["window"]
BROKEN_AT = 3 * WINDOW + WINDOW // 2


def _recovery(store: Path, truth: dict) -> tuple[np.ndarray, float, float]:
    """Posterior means of the non-baseline log2 effects, their correlation with the truth
    and the 90 % coverage, over the features that were fit."""
    group = zarr.open_group(str(store / results_key("gene")), mode="r")
    names = [str(n) for n in group["feature_names"][...]]
    fitted = group["technical_correction_applied"][...]
    draws = group["alpha_y_add"][...][:, 1:, fitted]  # [S, C-1, T_fit]
    all_names = [str(n) for n in truth["feature_names"]]
    columns = [all_names.index(n) for n, keep in zip(names, fitted, strict=True) if keep]
    expected = truth["log2_alpha"][1:, columns]
    mean = draws.mean(axis=0)
    low, high = np.quantile(draws, [0.05, 0.95], axis=0)
    covered = float(((expected >= low) & (expected <= high)).mean())
    return mean, float(np.corrcoef(mean.ravel(), expected.ravel())[0, 1]), covered


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_a_diverging_fit_rolls_back_and_the_run_ends_complete_and_calibrated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_demo_inputs(tmp_path / "demo", niters=1500, nsamples=300)
    truth = dict(np.load(config.parent / "truth.npz"))
    calm = technical_fit(str(config), [f"store={tmp_path / 'calm.zarr'}"])

    real_step, calls = inference._step, []

    def breaking_step(loss_fn, optimizer, params, clip_norm):
        result = real_step(loss_fn, optimizer, params, clip_norm)
        calls.append(1)
        if len(calls) == BROKEN_AT:  # what a step too large does: parameters gone to NaN
            with torch.no_grad():
                for p in params:
                    p.fill_(math.nan)
        return result

    monkeypatch.setattr(inference, "_step", breaking_step)
    broken = technical_fit(str(config), [f"store={tmp_path / 'broken.zarr'}"])
    monkeypatch.undo()

    root = zarr.open_group(broken, mode="r")
    assert root.attrs[COMPLETE] is True and root[results_key("gene")].attrs[COMPLETE] is True
    fit = root[fit_key("gene")].attrs
    assert fit["laplace_start"]["features_kept_start"] == 0  # the default, short schedule
    (recovery,) = fit["recoveries"]
    assert (recovery["step"], recovery["restored_to"]) == (BROKEN_AT, 2 * WINDOW)
    assert recovery["reason"].startswith("non-finite")
    assert recovery["lr_peak"] == pytest.approx(0.2 * LAPLACE_SCHEDULE["peak_factor"] * 1e-3)
    assert "after 1 divergence recovery" in fit["stop_reason"]
    assert np.isfinite(root[fit_key("gene")]["loss"][...]).all()

    calm_mean, calm_corr, calm_cover = _recovery(Path(calm), truth)
    mean, corr, cover = _recovery(Path(broken), truth)
    # the same screen and budget: the recovered fit finds the same posterior (its means
    # agree with the undisturbed fit's far better than either with the truth) and covers
    # as well, up to the noise of ~110 effects (sd of a coverage ~0.03)
    assert np.corrcoef(mean.ravel(), calm_mean.ravel())[0, 1] > 0.99
    assert corr > calm_corr - 0.01 and corr > 0.95
    assert cover > calm_cover - 0.08 and cover > 0.75
