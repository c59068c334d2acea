"""The negbinom baseline-mean prior learned from the screen (empirical Bayes).

Effects are relative to the baseline group, so a feature with few or no counts in the
baseline has an effect bounded by the data from one side only: how far below the other
groups its baseline mean may lie is decided by the prior. A fixed prior cannot get that
right: an exponential at the feature's mean (the `weak` prior) gives a baseline 2^-8 of
the others' mean a prior mass of ~0.4 %, while cell-line panels hold such genes (off in
one line) by the hundreds. So the prior is taken from the screen itself. Per feature t,

    r_t = log2(mu_ntc[t] / m_t),   m_t = the mean of the non-baseline cells (size-factor
                                         normalised; half a count where they have none),

and the r_t of all features are drawn from one distribution g, a mixture of normals on a
fixed grid of centres (`CENTRES`, width `WIDTH`) whose weights are the maximum-likelihood
estimate given every feature's baseline total, Y_t ~ Poisson(E m_t 2^r_t) (E the baseline
cells' summed size factors), by EM over the features: a deconvolution in which features
with many baseline counts locate g precisely and features with none bound r_t from above.
The prior of mu_ntc[t] is then log2 mu_ntc[t] = log2 m_t + r, r ~ g. A screen whose
baseline lacks genes the other groups express learns a component where those genes lie,
and a feature with no baseline count gets the share of g below what its zeros allow: an
interval as wide as the screen says such genes are spread, not the prior's guess.

(Poisson, not NB, for the baseline total: summed over the baseline cells the dispersion
of a total is ~phi x the cells' count, so at the few counts where the prior matters the
two agree; where they do not, the feature's own data decide its baseline anyway.)
"""

from __future__ import annotations

import logging
import math

import numpy as np

log = logging.getLogger(__name__)

#: centres of the mixture's components in r (log2 of baseline over reference mean) and
#: their common sd: a baseline from 2^-24 to 2^12 of the other groups' mean
CENTRES = np.arange(-24.0, 12.01, 0.5)
WIDTH = 0.5
NODES = 8  # Gauss-Hermite nodes per component for its Poisson likelihood
BLOCK = 2048  # features per block of the [T, K, NODES] likelihood evaluation
#: the penalty on the log weights' second differences: the maximum-likelihood mixing
#: distribution is spiky (a few nodes; a silent group's genes, spread over 2^-10 to 2^-6,
#: came out on three nodes, and intervals missed both ends); the penalty makes log g
#: smooth, with tails that fall off exponentially rather than stop
SMOOTHING = 10.0
OPTIMISER_STEPS = 500
#: a heavy-tailed slab under the mixture: a share SLAB_WEIGHT of a Cauchy in r (scale
#: SLAB_SCALE log2 units). It changes no interval (a zero-count feature's posterior gets
#: ~0.05 % of its mass from it, against ~5 % from a screen's silent genes), but where g
#: has no component the prior's log density falls like -2 log |r| rather than -2 r²: a
#: guide draw far out in a flat direction then costs a few nats, not thousands (on a
#: 600-cell screen such draws made SVI's loss jump 3.5x and the fit roll back)
SLAB_WEIGHT = 1e-3
SLAB_SCALE = 8.0
#: a defensive share of g spread evenly over baselines 2^PLATEAU_LOW to 2^0 of the other
#: groups' mean. Where a feature's counts cannot tell a low gene from one off in the
#: baseline (no baseline count, ~1 expected), the fitted g alone gave the off mode the
#: share of the screen's identified off genes (~4 %), and the 90 % interval's far end fell
#: inside that mode: 0.69 of such genes' effects covered. The plateau (3 % of g) reaches
#: the interval down to where off genes lie (0.88) and moves no interval of a feature
#: with baseline counts: the data, not g's tail, bound those.
PLATEAU_WEIGHT = 0.03
PLATEAU_LOW = -16.0


def empirical_inputs(
    totals: np.ndarray, groups: np.ndarray, n_groups: int, sum_factor: np.ndarray
) -> dict[str, np.ndarray]:
    """Per feature, what the learned prior needs, from the raw group totals [C, T]: the
    reference mean m_t (as `mu_mean`), the baseline total `base_count`; and the baseline
    cells' summed size factors `base_exposure` (0-d). `mu_sd` = m_t too: inputs not yet
    finished with g (`learned_mixture`) describe an exponential at m_t, so a model built
    from them alone still has a proper prior."""
    exposure = np.bincount(groups, weights=sum_factor, minlength=n_groups)
    reference = reference_means(totals, exposure)
    return {
        "mu_mean": reference,
        "mu_sd": reference,
        "base_count": totals[0],
        "base_exposure": np.asarray(exposure[0]),
    }


def learned_mixture(
    *, base_count: np.ndarray, base_exposure: np.ndarray, reference: np.ndarray
) -> dict[str, np.ndarray]:
    """g fitted to every feature (`fit_mixture`): its log weights `mu_logits`, centres
    `mu_centres`, width `mu_width` and log-density table `mu_table` (float64)."""
    log_w = with_plateau(fit_mixture(base_count, float(base_exposure), reference))
    log.info(
        "baseline-mean prior learned from %d features: %.1f %% of baseline means below 2^-4 "
        "of the other groups' mean",
        reference.shape[-1],
        100 * float(np.exp(log_w[CENTRES <= -4.0]).sum()),
    )
    return {
        "mu_logits": log_w,
        "mu_centres": CENTRES.copy(),
        "mu_width": np.asarray(WIDTH),
        "mu_table": log_density_table(log_w),
    }


def with_plateau(log_w: np.ndarray) -> np.ndarray:
    """g's log weights with PLATEAU_WEIGHT of it moved to an even spread over the centres
    from PLATEAU_LOW to 0."""
    plateau = ((CENTRES >= PLATEAU_LOW) & (CENTRES <= 0.0)).astype(np.float64)
    weights = (1.0 - PLATEAU_WEIGHT) * np.exp(log_w) + PLATEAU_WEIGHT * plateau / plateau.sum()
    return np.log(weights)


def reference_means(group_totals: np.ndarray, group_exposure: np.ndarray) -> np.ndarray:
    """m_t [T]: the non-baseline cells' total over their summed size factors, half a count
    where they have none (group_totals [C, T] raw counts, group_exposure [C] Σ sf)."""
    total = np.maximum(group_totals[1:].sum(axis=0), 0.5)
    return total / max(float(group_exposure[1:].sum()), 1e-300)


def fit_mixture(base_count: np.ndarray, base_exposure: float, reference: np.ndarray) -> np.ndarray:
    """The mixture's log weights [K] over `CENTRES` (natural log): the penalised maximum
    of the features' marginal likelihood (`SMOOTHING`).

    base_count [T]: each feature's total over the baseline cells; base_exposure: their
    summed size factors; reference [T]: m_t."""
    count = np.asarray(base_count, np.float64)
    reference = np.asarray(reference, np.float64)
    log_lik = np.concatenate(
        [
            _component_log_likelihoods(
                count[lo : lo + BLOCK], float(base_exposure), reference[lo : lo + BLOCK]
            )
            for lo in range(0, count.size, BLOCK)
        ]
    )  # [T, K]
    return _penalised_weights(log_lik)


def _penalised_weights(log_lik: np.ndarray) -> np.ndarray:
    """argmax_a Σ_t log Σ_k softmax(a)_k L_tk - SMOOTHING Σ_k (Δ² a_k)², by BFGS.

    Each row of L is scaled by its largest entry, so the marginal likelihoods are one
    matrix-vector product [T, K] @ [K]; with w = softmax(a) and G_k = Σ_t L_tk / (L w)_t,
    the gradient of the first sum is w (G - T). (torch.optim's L-BFGS is not used: its
    first construction imports torch._dynamo, ~1 s.)"""
    scaled = np.exp(log_lik - log_lik.max(axis=1, keepdims=True))  # [T, K]
    n_features, n_components = scaled.shape
    second = np.diff(np.eye(n_components), n=2, axis=0)  # [K-2, K]: Δ² a = second @ a
    penalty = SMOOTHING * second.T @ second

    def objective(a: np.ndarray) -> tuple[float, np.ndarray]:
        w = np.exp(a - a.max())
        w /= w.sum()
        p = np.maximum(scaled @ w, 1e-300)  # a trial step may starve a feature: finite
        spread = scaled.T @ (1.0 / p)  # G [K]
        value = -np.log(p).sum() + a @ penalty @ a + a.mean() ** 2  # the mean: a's gauge
        grad = -w * (spread - n_features) + 2 * penalty @ a + 2 * a.mean() / n_components
        return value, grad

    a = _bfgs(objective, np.zeros(n_components))
    return a - a.max() - np.log(np.exp(a - a.max()).sum())


def _bfgs(objective, x: np.ndarray) -> np.ndarray:
    """Minimise `objective` (value, gradient) from x: BFGS with a backtracking line search."""
    value, grad = objective(x)
    inverse = np.eye(x.size)
    for _ in range(OPTIMISER_STEPS):
        direction = -inverse @ grad
        if grad @ direction >= 0:  # not a descent direction: start the curvature afresh
            inverse, direction = np.eye(x.size), -grad
        step = 1.0
        while True:
            trial = x + step * direction
            new_value, new_grad = objective(trial)
            if new_value <= value + 1e-4 * step * (grad @ direction) or step < 1e-10:
                break
            step *= 0.5
        s, y = trial - x, new_grad - grad
        if s @ y > 1e-12:
            rho = 1.0 / (s @ y)
            v = np.eye(x.size) - rho * np.outer(s, y)
            inverse = v @ inverse @ v.T + rho * np.outer(s, s)
        converged = abs(value - new_value) <= 1e-10 * max(abs(value), 1.0)
        x, value, grad = trial, new_value, new_grad
        if converged or np.abs(grad).max() < 1e-8:
            break
    return x


def _component_log_likelihoods(
    count: np.ndarray, exposure: float, reference: np.ndarray
) -> np.ndarray:
    """log ∫ Poisson(Y_t; E m_t 2^r) N(r; c_k, WIDTH²) dr [T, K], by Gauss-Hermite."""
    nodes, weights = np.polynomial.hermite.hermgauss(NODES)
    r = CENTRES[:, None] + math.sqrt(2.0) * WIDTH * nodes[None, :]  # [K, Q]
    log_rate = math.log(max(exposure, 1e-300)) + np.log(reference)[:, None, None]
    log_rate = log_rate + math.log(2.0) * r[None]  # [T, K, Q]
    log_pois = count[:, None, None] * log_rate - np.exp(log_rate)  # lgamma(Y + 1): constant
    log_pois += np.log(weights / math.sqrt(math.pi))[None, None, :]
    top = log_pois.max(axis=2, keepdims=True)
    return top[..., 0] + np.log(np.exp(log_pois - top).sum(axis=2))


#: the table of log g: nodes from TABLE_LOW to TABLE_HIGH (log2 units), TABLE_STEP apart;
#: beyond them g is the slab alone (the components are > 30 sds away)
TABLE_LOW, TABLE_HIGH, TABLE_STEP = -40.0, 28.0, 0.02


def log_density_table(log_w: np.ndarray) -> np.ndarray:
    """log g and its derivative at the table's nodes [2, J] (float64): g is the mixture
    with log weights `log_w` over `CENTRES`, times 1 - SLAB_WEIGHT, plus the slab."""
    r = np.arange(TABLE_LOW, TABLE_HIGH + TABLE_STEP / 2, TABLE_STEP)
    z = (r[:, None] - CENTRES[None, :]) / WIDTH  # [J, K]
    log_terms = log_w[None, :] - 0.5 * z**2 - math.log(WIDTH * math.sqrt(2 * math.pi))
    log_terms += math.log1p(-SLAB_WEIGHT)
    slab_value, slab_slope = slab_log_density(r)
    log_terms = np.concatenate([log_terms, slab_value[:, None]], axis=1)
    slopes = np.concatenate([-z / WIDTH, slab_slope[:, None]], axis=1)
    top = log_terms.max(axis=1, keepdims=True)
    share = np.exp(log_terms - top)
    value = top[:, 0] + np.log(share.sum(axis=1))
    slope = (share * slopes).sum(axis=1) / share.sum(axis=1)
    return np.stack([value, slope])


def slab_log_density(r):
    """log(SLAB_WEIGHT · Cauchy(r; 0, SLAB_SCALE)) and its derivative (numpy or torch)."""
    scaled = r / SLAB_SCALE
    value = math.log(SLAB_WEIGHT / (math.pi * SLAB_SCALE)) - _log1p(scaled * scaled)
    return value, -2.0 * r / (SLAB_SCALE**2 + r * r)


def _log1p(x):
    return np.log1p(x) if isinstance(x, np.ndarray) else x.log1p()
