"""Plain dense per-cell log-likelihoods of every family, written straight from docs/model.md.

These are the references the fast likelihoods (sufficient statistics, sorted cells, a
fused negbinom kernel) are checked against: no statistics, no custom autograd, one
[N, T] tensor of per-cell terms built with torch / pyro distributions, exactly as
docs/model.md ("Likelihoods") words it. Each `dense_log_likelihood_<name>(params, data)` takes the
`params` dict the family's `observe` receives (the return value of its
`sample_latents`) and the fit cells' `FitArrays`, and returns the per-cell
log-likelihood [N, T] (multinomial: summed over K), 0 where a cell contributes nothing.
It computes in the dtype of the parameters (pass float64 for a reference value).

`fast_log_likelihood(family, params, data)` evaluates what the family itself adds to
the model: the log-probability of its observed / factor site "y".
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro import poutine

from bayesdream_model.constants import OBS_SITE
from bayesdream_model.data import FitArrays
from bayesdream_model.distributions.base import Family
from bayesdream_model.plates import Plates

NB_EPS = 1e-8  # logits = log(mu + 1e-8) - log(phi + 1e-8)
P_CLAMP = 1e-6  # mu_ntc clamped to [1e-6, 1 - 1e-6] before the logit
LOG_P_CLAMP = 1e-12  # p clamped to [1e-12, 1 - 1e-12] before the logs
P_FLOOR = 1e-12  # multinomial p floored at 1e-12
STUDENT_DF = 3.0  # Student-t likelihood df


def _like(params: dict, key: str) -> torch.Tensor:
    """The reference tensor whose dtype and device the computation follows."""
    return params[key]


def _as(x, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x, dtype=like.dtype, device=like.device)


def _group_rows(effect: torch.Tensor | None, like: torch.Tensor, groups) -> torch.Tensor:
    """Each cell's group effect [N, T(, K)]: row 0 (the baseline group) is 0."""
    zero = torch.zeros_like(like).unsqueeze(0)  # [1, T(, K)]
    table = zero if effect is None else torch.cat([zero, effect], dim=0)  # [C, T(, K)]
    index = torch.as_tensor(groups, dtype=torch.int64, device=like.device)
    return table[index]


def dense_log_likelihood_negbinom(params: dict, data: FitArrays) -> torch.Tensor:
    """log NB(y; phi, logits = log(mu + 1e-8) - log(phi + 1e-8)) per cell [N, T].

    mu[n, t] = mu_ntc[t] * 2**log2_alpha[g_n, t] * sf[n], phi = 1 / o_y**2.
    """
    mu_ntc = _like(params, "mu_ntc")
    phi = 1.0 / params["o_y"] ** 2  # [T]
    log2_alpha = _group_rows(params.get("log2_alpha_y"), mu_ntc, data.groups)  # [N, T]
    sf = _as(data.sum_factor, mu_ntc)[:, None]  # [N, 1]
    mu = mu_ntc * torch.exp2(log2_alpha) * sf  # [N, T]
    logits = torch.log(mu + NB_EPS) - torch.log(phi + NB_EPS)
    nb = dist.NegativeBinomial(total_count=phi, logits=logits)
    return nb.log_prob(_as(data.y, mu_ntc))


def dense_log_likelihood_binomial(params: dict, data: FitArrays) -> torch.Tensor:
    """y log p + (n - y) log(1 - p) per cell with n > 0, else 0 [N, T].

    logit p = logit(clamp(mu_ntc, 1e-6, 1 - 1e-6)) + alpha[g]; p clamped to
    [1e-12, 1 - 1e-12]. The combinatorial term is dropped, as the model allows.
    """
    mu = _like(params, "mu_ntc").clamp(P_CLAMP, 1 - P_CLAMP)  # [T]
    alpha = _group_rows(params.get("alpha_logit_y"), mu, data.groups)  # [N, T]
    p = torch.sigmoid(torch.log(mu) - torch.log1p(-mu) + alpha)
    p = p.clamp(LOG_P_CLAMP, 1 - LOG_P_CLAMP)
    y, n = _as(data.y, mu), _as(data.denominator, mu)
    log_lik = y * torch.log(p) + (n - y) * torch.log1p(-p)
    return torch.where(n > 0, log_lik, torch.zeros_like(log_lik))


def _dense_continuous(params: dict, data: FitArrays, make) -> torch.Tensor:
    """Per-cell log density at location mu_ntc + delta[g], scale sigma_y; missing -> 0."""
    mu_ntc = _like(params, "mu_ntc")
    loc = mu_ntc + _group_rows(params.get("delta_y"), mu_ntc, data.groups)  # [N, T]
    y = _as(data.y, mu_ntc)
    finite = torch.isfinite(y)
    # Missing values are replaced before the density, not after: a NaN inside the
    # unselected branch of `where` still poisons the gradient (0 * NaN).
    log_lik = make(loc, params["sigma_y"]).log_prob(torch.where(finite, y, loc.detach()))
    return torch.where(finite, log_lik, torch.zeros_like(log_lik))


def dense_log_likelihood_normal(params: dict, data: FitArrays) -> torch.Tensor:
    """log Normal(y; mu_ntc + delta[g], sigma_y) per finite cell, 0 for NaN/Inf [N, T]."""
    return _dense_continuous(params, data, dist.Normal)


def dense_log_likelihood_studentt(params: dict, data: FitArrays) -> torch.Tensor:
    """log StudentT(3; mu_ntc + delta[g], sigma_y) per finite cell, 0 for NaN/Inf [N, T]."""
    return _dense_continuous(params, data, lambda loc, scale: dist.StudentT(STUDENT_DF, loc, scale))


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over unmasked categories (masked ones 0); a fully masked row is uniform."""
    all_masked = mask.all(dim=-1, keepdim=True)
    # a fully masked row gets equal logits (0) everywhere: softmax makes it uniform
    filled = logits.masked_fill(mask, float("-inf")).masked_fill(all_masked, 0.0)
    return torch.softmax(filled, dim=-1)


def dense_log_likelihood_multinomial(params: dict, data: FitArrays) -> torch.Tensor:
    """lgamma(Σy + 1) - Σ lgamma(y + 1) + Σ y log p per cell [N, T].

    p = masked_softmax(log probs_baseline + alpha[g]) floored at 1e-12, alpha = the
    (centred, masked) effects of `params["alpha"]`, baseline row 0.
    """
    probs = _like(params, "probs_baseline")  # [T, K]
    mask = params["mask"].to(torch.bool)  # [T, K]
    # log of the baseline: masked entries are 0 and ignored by the masked softmax; log(1)
    # there keeps their gradient 0 instead of 0 * inf = NaN.
    log_base = torch.log(probs.masked_fill(mask, 1.0))
    alpha = _group_rows(params.get("alpha"), probs, data.groups)  # [N, T, K]
    p = masked_softmax(log_base + alpha, mask).clamp_min(P_FLOOR)  # [N, T, K]
    y = _as(data.y, probs)
    return torch.lgamma(y.sum(-1) + 1) - torch.lgamma(y + 1).sum(-1) + (y * torch.log(p)).sum(-1)


DENSE = {
    "negbinom": dense_log_likelihood_negbinom,
    "binomial": dense_log_likelihood_binomial,
    "multinomial": dense_log_likelihood_multinomial,
    "normal": dense_log_likelihood_normal,
    "studentt": dense_log_likelihood_studentt,
}


def dense_log_likelihood(name: str, params: dict, data: FitArrays) -> torch.Tensor:
    """The dense per-cell log-likelihood of distribution `name` [N, T]."""
    try:
        return DENSE[name](params, data)
    except KeyError:
        raise KeyError(f"No dense baseline for '{name}': expected one of {sorted(DENSE)}") from None


def fast_log_likelihood(
    family: Family, params: dict, data: FitArrays, device: str = "cpu"
) -> torch.Tensor:
    """What `family.observe` adds to the model: Σ log-prob of its site "y" (a scalar)."""
    tensors = family.tensors(data, device)
    plates = Plates.make(data.n_features, data.n_groups)
    trace = poutine.trace(family.observe).get_trace(params, tensors, plates)
    trace.compute_log_prob()
    return trace.nodes[OBS_SITE]["log_prob_sum"]
