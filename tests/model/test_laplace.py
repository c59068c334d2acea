"""The Laplace start (`bayesdream_model.laplace`): each feature's MAP and inverse Hessian.

The reference is computed independently of the package's model, guide and likelihood
code: every feature's log joint in the guide's unconstrained coordinates (effects,
then log sigma / log o_y, then mu / log mu; docs/model.md sections 5-6) written with
torch.distributions in float64, its MAP found by scipy's exact-Hessian trust region (torch's float64 derivatives)
and its Hessian there inverted. The package's start, float32 throughout, must match it:

- loc: Newton stops when the decrement g^T H^-1 g < 1e-4, i.e. ~0.01 posterior sd from
  the MAP, and float32 gradients of ~600 cells are exact to ~1e-6: |loc - MAP| / sd <=
  0.05 (observed <= 0.0033 from starts 1-35 sd away).
- covariance: the normal family's Hessian is autograd's, exact up to float32 (observed:
  sds within 3e-7); Student-t's and negbinom's are central differences of the gradient
  with steps of 0.1 posterior sd, whose truncation and float32 rounding errors were
  <= 0.35 % on these features. Each posterior sd within 2 % and each correlation within
  0.02 leave a factor ~6; a Hessian from a wrong step size or a wrong sign is off by far
  more.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pytest
import torch
import torch.distributions as td
from factories import negbinom_screen
from scipy.optimize import minimize

import bayesdream_model.fit
from bayesdream_model.data import FitArrays
from bayesdream_model.distributions import get_family
from bayesdream_model.fit import FitOptions, fit_technical, svi_settings
from bayesdream_model.guides import build_guide
from bayesdream_model.inference import Checkpointing
from bayesdream_model.laplace import LaplaceSettings, laplace_start
from bayesdream_model.model import TechnicalModel
from bayesdream_model.simulate import simulate_continuous
from bayesdream_model.streaming import CellStream, InMemoryCells
from tasks.fit.checkpoint import decode_state, encode_state

N_CELLS, N_FEATURES, N_GROUPS = 600, 6, 3
LOC_SDS = 0.05
SD_RELATIVE = 0.02
CORRELATION = 0.02
DEFAULT = LaplaceSettings()


def continuous_data(name: str) -> FitArrays:
    df = 3.0 if name == "studentt" else None
    sim = simulate_continuous(
        n_cells=N_CELLS, n_features=N_FEATURES, n_groups=N_GROUPS, student_df=df, seed=11
    )
    return FitArrays(y=sim.y.T.astype(np.float64), groups=sim.groups, n_groups=N_GROUPS)


def negbinom_data() -> FitArrays:
    _, data = negbinom_screen(n_cells=N_CELLS, n_features=N_FEATURES, n_groups=N_GROUPS, seed=11)
    return data


def plain_guide(name: str, data: FitArrays, stream: CellStream | None = None):
    """The model (reading `stream` if given) and its per-feature guide at the initial
    values (scales 0.1)."""
    pyro.set_rng_seed(0)  # sites without initial values start at a median of prior draws
    family = get_family(name)
    tensors = None if stream is not None else family.tensors(data, "cpu")
    model = TechnicalModel(family, family.prior_inputs(data), N_GROUPS, tensors, stream)
    guide = build_guide(model, "feature_mvn", family.initial_values(data))
    guide(observe=False)
    return model, guide


def started_guide(
    name: str,
    data: FitArrays,
    settings: LaplaceSettings = DEFAULT,
    stream: CellStream | None = None,
):
    """The model, its guide after the Laplace start (no SVI), the initial locs [T, D]."""
    model, guide = plain_guide(name, data, stream)
    z0 = guide.loc.detach().clone()
    second = get_family(name).second_derivatives
    passes = None if stream is None else stream.each_batch
    result = laplace_start(
        model, guide, second_derivatives=second, passes=passes, settings=settings
    )
    return model, guide, result, z0


# -- the independent reference ---------------------------------------------------------------
def _continuous_log_joint(name: str, data: FitArrays, inputs: dict, t: int):
    """z = (delta_1 .. delta_{C-1}, log sigma, mu) of feature t."""
    y = torch.as_tensor(data.y[:, t], dtype=torch.float64)
    finite = torch.isfinite(y)
    y, groups = y[finite], torch.as_tensor(data.groups)[finite]
    s = float(inputs["mu_sd"][t])
    m, sigma_hat = float(inputs["mu_mean"][t]), float(inputs["sigma_hat"][t])

    def log_joint(z: torch.Tensor) -> torch.Tensor:
        delta, log_sigma, mu = z[: N_GROUPS - 1], z[N_GROUPS - 1], z[N_GROUPS]
        sigma = log_sigma.exp()
        loc = mu + torch.cat([z.new_zeros(1), delta])[groups]
        lik = (
            td.StudentT(3.0, loc, sigma).log_prob(y)
            if name == "studentt"
            else td.Normal(loc, sigma).log_prob(y)
        )
        return (
            td.StudentT(3.0, 0.0, s).log_prob(delta).sum()
            + td.HalfNormal(2.0 * sigma_hat).log_prob(sigma)
            + log_sigma  # the Jacobian of sigma = exp(z)
            + td.Normal(m, s).log_prob(mu)
            + lik.sum()
        )

    return log_joint


def _negbinom_log_joint(data: FitArrays, inputs: dict, beta_o: float, t: int):
    """z = (log2 alpha_1 .. log2 alpha_{C-1}, log o_y, log mu_ntc) of feature t, beta_o held."""
    y = torch.as_tensor(data.y[:, t], dtype=torch.float64)
    groups = torch.as_tensor(data.groups)
    sf = torch.as_tensor(data.sum_factor, dtype=torch.float64)
    mean, sd = float(inputs["mu_mean"][t]), float(inputs["mu_sd"][t])

    def log_joint(z: torch.Tensor) -> torch.Tensor:
        log2_alpha, log_o, log_mu = z[: N_GROUPS - 1], z[N_GROUPS - 1], z[N_GROUPS]
        o, mu = log_o.exp(), log_mu.exp()
        phi = 1.0 / o**2
        mu_cell = mu * torch.exp2(torch.cat([z.new_zeros(1), log2_alpha]))[groups] * sf
        logits = torch.log(mu_cell + 1e-8) - torch.log(phi + 1e-8)
        return (
            td.StudentT(3.0, 0.0, 20.0).log_prob(log2_alpha).sum()
            + td.Exponential(beta_o).log_prob(o)
            + log_o
            + td.Gamma(mean**2 / sd**2, mean / sd**2).log_prob(mu)
            + log_mu
            + td.NegativeBinomial(phi, logits=logits).log_prob(y).sum()
        )

    return log_joint


def reference_laplace(log_joint, z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(MAP, H^-1 there): scipy's exact-Hessian trust region in float64, from z0."""

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        z = torch.as_tensor(x)
        return -float(log_joint(z)), -torch.func.grad(log_joint)(z).numpy()

    def hess(x: np.ndarray) -> np.ndarray:
        return -torch.func.hessian(log_joint)(torch.as_tensor(x)).numpy()

    found = minimize(
        fun, z0.double().numpy(), jac=True, hess=hess, method="trust-exact", options={"gtol": 1e-9}
    )
    z = torch.as_tensor(found.x)
    return z, torch.linalg.inv(-torch.func.hessian(log_joint)(z))


def assert_matches(guide, log_joints: list, z0: torch.Tensor) -> None:
    chol = guide.scale_tril().detach().double()
    covariance = chol @ chol.transpose(-1, -2)
    for t, log_joint in enumerate(log_joints):
        z_map, cov = reference_laplace(log_joint, z0[t])
        sd = cov.diagonal().sqrt()
        loc = guide.loc.detach()[t].double()
        assert ((loc - z_map).abs() / sd).max() <= LOC_SDS, (t, loc, z_map, sd)
        got_sd = covariance[t].diagonal().sqrt()
        assert ((got_sd / sd - 1).abs()).max() <= SD_RELATIVE, (t, got_sd, sd)
        corr = cov / torch.outer(sd, sd)
        got_corr = covariance[t] / torch.outer(got_sd, got_sd)
        assert (got_corr - corr).abs().max() <= CORRELATION, (t, got_corr, corr)


@pytest.mark.parametrize("name", ["normal", "studentt"])
def test_laplace_start_is_each_features_map_and_inverse_hessian(name: str) -> None:
    """Normal: autograd Hessians; Student-t: central differences of the gradient."""
    data = continuous_data(name)
    model, guide, result, z0 = started_guide(name, data)
    assert result.features_converged == N_FEATURES and result.features_kept_start == 0
    assert [block.name for block in guide._layout] == ["delta_y", "sigma_y", "mu_ntc"]
    log_joints = [_continuous_log_joint(name, data, model.inputs, t) for t in range(N_FEATURES)]
    assert_matches(guide, log_joints, z0)


def test_negbinom_laplace_start_given_beta_o() -> None:
    """Finite differences through the hand-written NB gradient; each feature's MAP given
    beta_o where the start left it."""
    data = negbinom_data()
    model, guide, result, z0 = started_guide("negbinom", data)
    assert result.features_converged == N_FEATURES
    assert [block.name for block in guide._layout] == ["log2_alpha_y", "o_y", "mu_ntc"]
    beta_o = float(guide.global_transform("beta_o")(guide.global_locs()["beta_o"]))
    log_joints = [_negbinom_log_joint(data, model.inputs, beta_o, t) for t in range(N_FEATURES)]
    assert_matches(guide, log_joints, z0)


def test_features_that_do_not_converge_keep_the_initial_start() -> None:
    data = continuous_data("normal")
    _, plain = plain_guide("normal", data)
    _, guide, result, _ = started_guide("normal", data, LaplaceSettings(max_iters=0))
    assert result.features_converged == 0 and result.features_kept_start == N_FEATURES
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(guide.state_dict()[key], value, rtol=0, atol=0)


def test_init_option_picks_the_start_and_the_schedule() -> None:
    """Laplace (default): a start summary and the short plateau rule; prior: neither; the
    reference's guides never take the Laplace start."""
    data = continuous_data("normal")
    family = get_family("normal")
    laplace = fit_technical(family, data, FitOptions(niters=30))
    assert laplace.svi.start["features_converged"] == N_FEATURES
    prior = fit_technical(family, data, FitOptions(niters=30, init="prior"))
    assert prior.svi.start is None
    reference = fit_technical(family, data, FitOptions(niters=30, guide="mean_field"))
    assert reference.guide_kind == "mean_field" and reference.svi.start is None
    assert math.isfinite(laplace.svi.losses[0]) and laplace.svi.losses[0] < prior.svi.losses[0]


def sd_and_correlation(guide) -> tuple[torch.Tensor, torch.Tensor]:
    """The guide's per-feature sds [T, D] and correlation matrices [T, D, D]."""
    chol = guide.scale_tril().detach().double()
    cov = chol @ chol.transpose(-1, -2)
    sd = cov.diagonal(dim1=-2, dim2=-1).sqrt()
    return sd, cov / (sd.unsqueeze(-1) * sd.unsqueeze(-2))


def data_for(name: str) -> FitArrays:
    return negbinom_data() if name == "negbinom" else continuous_data(name)


@pytest.mark.parametrize("name", ["negbinom", "studentt"])
def test_streamed_cells_give_the_in_memory_start(name: str) -> None:
    """A full pass over the batches per gradient: the whole data's start, up to float32
    sums in another order (locs within 1e-3 posterior sd; the covariances within the
    finite-difference noise the reference test allows)."""
    data = data_for(name)
    _, whole, _, _ = started_guide(name, data)
    stream = CellStream(get_family(name), InMemoryCells(data, batch_cells=130), "cpu")
    try:
        _, streamed, result, _ = started_guide(name, data, stream=stream)
    finally:
        stream.close()
    assert result.features_converged == N_FEATURES
    sd = whole.scale.detach()
    torch.testing.assert_close(streamed.loc / sd, whole.loc / sd, rtol=0, atol=1e-3)
    (sd_s, corr_s), (sd_w, corr_w) = (sd_and_correlation(g) for g in (streamed, whole))
    assert ((sd_s / sd_w - 1).abs()).max() <= SD_RELATIVE
    assert (corr_s - corr_w).abs().max() <= CORRELATION


@pytest.mark.parametrize(("name", "batch_cells"), [("studentt", None), ("negbinom", 150)])
def test_a_fit_resumed_after_the_laplace_start_is_exact(
    name: str, batch_cells: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint holds the started guide and the start's summary: a resumed fit does
    not start again and ends bit for bit where the uninterrupted one did."""
    data = data_for(name)
    cells = data if batch_cells is None else InMemoryCells(data, batch_cells=batch_cells)
    family, options = get_family(name), FitOptions(niters=60)
    saved: list[bytes] = []

    def save(state: dict) -> None:
        if len(state["losses"]) == 25:
            saved.append(encode_state(state))  # the store's plain-data checkpoint format

    full = fit_technical(family, cells, options, checkpointing=Checkpointing(save, every_s=0.0))
    assert full.svi.start["features_converged"] == N_FEATURES and len(saved) == 1
    monkeypatch.setattr(bayesdream_model.fit, "laplace_start", None)  # must not be called
    state = decode_state(saved[0])
    resumed = fit_technical(
        family, cells, options, checkpointing=Checkpointing(lambda s: None, state, 0.0)
    )
    np.testing.assert_array_equal(resumed.svi.losses, full.svi.losses)
    assert resumed.svi.start == full.svi.start
    for key, value in full.params().items():
        np.testing.assert_array_equal(resumed.params()[key], value, err_msg=key)


def test_the_short_schedule_only_after_a_start_every_feature_took() -> None:
    """A feature that kept the initial values needs the reference's schedule."""
    options = FitOptions()
    took = {"features_converged": 5, "features_kept_start": 0}
    short = svi_settings(options, 50_000, start=took)
    assert (short.window, short.patience, short.peak_factor) == (10, 2, 1.0)
    assert short.warmup_steps == 10 and short.noise_factor == 2.0
    for start in (None, {"features_converged": 4, "features_kept_start": 1}):
        reference = svi_settings(options, 50_000, start=start)
        assert (reference.window, reference.patience, reference.peak_factor) == (250, 3, 10.0)
        assert reference.warmup_steps is None and reference.noise_factor == 1.0
