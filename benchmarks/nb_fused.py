"""The negbinom likelihood as it was before issue 11: one fused pass over every cell.

Kept (verbatim but for the names) as the "before" of `bench_nb_step.py` and as a second
reference in the tests: Σ_{n,t} (φ_t + y_nt) log1p(sf_n m̃_gt + ẽ_t) over the dense,
group-sorted [N, T] float32 matrix, block by block, with its gradient in the same pass;
everything else (group totals, value histograms) as now. Its cost grows with N x T.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from bayesdream_model.constants import LOG_EPS
from bayesdream_model.data import FitArrays
from bayesdream_model.distributions.effects import with_baseline
from bayesdream_model.distributions.nb.value_histogram import _value_histogram
from bayesdream_model.distributions.negbinom import EFFECT_SITE


def fused_statistics(data: FitArrays, device: torch.device | str) -> dict[str, torch.Tensor]:
    """What `fused_log_likelihood` reads, computed once before SVI.

    Cells are sorted by group, so each group's block of means is an outer product
    sf[n] * m[g, t] (no gather); the y log(mu) terms need only per-group totals; the lgamma
    terms only each feature's histogram of non-zero values.
    """
    order = np.argsort(data.groups, kind="stable")
    y = np.ascontiguousarray(data.y[order], dtype=np.float32)
    groups, sf = data.groups[order], data.sum_factor[order].astype(np.float64)
    bounds = np.searchsorted(groups, np.arange(data.n_groups + 1))
    spans = list(zip(bounds[:-1], bounds[1:], strict=True))  # each group's rows, sorted
    rows, cols = np.nonzero(y)
    pairs, counts = _value_histogram(cols, y[rows, cols].astype(np.float64), y.shape[1])
    # parameter-free: -Σ lgamma(y + 1) (over the histogram) + Σ_n log sf_n Σ_t y_nt (the
    # part of y log mu that sf carries)
    lgamma_y1 = torch.lgamma(torch.as_tensor(pairs[1]) + 1).numpy()
    constant = -float(counts @ lgamma_y1) + float(y.sum(axis=1, dtype=np.float64) @ np.log(sf))

    def t(x, dtype=torch.float32):
        return torch.as_tensor(np.asarray(x), dtype=dtype, device=device)

    return {
        "y": t(y),
        "sum_factor": t(sf),
        "bounds": t(bounds, torch.int64),
        "group_totals": t(np.stack([y[lo:hi].sum(0, dtype=np.float64) for lo, hi in spans])),
        "pair_feature": t(pairs[0], torch.int64),
        "pair_value": t(pairs[1]),
        "pair_count": t(counts),
        "constant": t(constant),
    }


class _Log1pTerm(torch.autograd.Function):
    """Σ_{n,t} (φ_t + y_nt) · log1p(sf_n · m̃_gt + ẽ_t), with its gradient in the same pass.

    One pass over the cells, block by block, keeping no [N, T] tensor for backward:
    with u = sf·m̃ + ẽ and w = φ + y, d/dm̃_gt = Σ_n w·sf/(1+u), d/dẽ_t = Σ_n w/(1+u),
    and d/dφ_t (through w) = Σ_n log1p(u).
    """

    @staticmethod
    def forward(ctx, m_tilde, e_tilde, phi, y, sum_factor, bounds):  # noqa: D102
        total = torch.zeros((), dtype=torch.float64, device=m_tilde.device)
        grad_m = torch.zeros_like(m_tilde)
        grad_e, grad_phi = torch.zeros_like(e_tilde), torch.zeros_like(phi)
        for g, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            for start in range(lo, hi, BLOCK_CELLS):
                stop = min(start + BLOCK_CELLS, hi)
                sf = sum_factor[start:stop]
                u = torch.addcmul(e_tilde, sf[:, None], m_tilde[g])
                log1p_u = torch.log1p(u)
                w = y[start:stop] + phi
                total += torch.dot(w.reshape(-1), log1p_u.reshape(-1)).double()
                ratio = w.div_(u.add_(1.0))
                grad_m[g] += sf @ ratio
                grad_e += ratio.sum(0)
                grad_phi += log1p_u.sum(0)
        ctx.save_for_backward(grad_m, grad_e, grad_phi)
        return total.to(m_tilde.dtype)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        grad_m, grad_e, grad_phi = ctx.saved_tensors
        return grad * grad_m, grad * grad_e, grad * grad_phi, None, None, None


BLOCK_CELLS = 256  # cells per block: ~3 MB at T = 3000, stays in cache


def fused_log_likelihood(params: dict, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ_{n,t} log NB(y; φ, logits = log(μ + ε) - log(φ + ε)), μ = m[g,t]·sf[n], m = mu·alpha.

    log NB = φ log(φ+ε) + y log(μ+ε) - (φ+y) log(μ+φ+2ε) + lgamma(φ+y) - lgamma(φ) - lgamma(y+1)
           = -(φ+y) log1p((μ+ε)/(φ+ε)) - y log(φ+ε) + y log(μ+ε) + lgammas,
    the second form staying finite as φ grows. Zeros add nothing to the y terms; y log μ
    splits into per-group totals of y times log m plus a constant; the lgamma terms need
    only value histograms: only the log1p term is a pass over all cells. One deviation,
    far below float32 resolution: y log(μ+ε) is taken as y log μ (relative change ε/μ).
    """
    phi = 1.0 / params["o_y"] ** 2  # [T]
    log_m = torch.log(params["mu_ntc"]) + math.log(2.0) * with_baseline(
        params.get(EFFECT_SITE), params["mu_ntc"], 0.0
    )  # [C, T]
    inv = 1.0 / (phi + LOG_EPS)
    dense = _Log1pTerm.apply(
        torch.exp(log_m) * inv,
        LOG_EPS * inv,
        phi,
        stats["y"],
        stats["sum_factor"],
        stats["bounds"].tolist(),
    )
    # float64: near the Poisson limit (phi ~ 1e5) lgamma(phi + y) - lgamma(phi) cancels to
    # below float32 resolution and the dispersion gradient would be mostly rounding error
    phi_pair = phi.double().index_select(0, stats["pair_feature"])
    pair_value = stats["pair_value"].double()
    lgammas = (torch.lgamma(phi_pair + pair_value) - torch.lgamma(phi_pair)).to(phi.dtype)
    return (
        -dense
        - (stats["group_totals"].sum(0) * torch.log(phi + LOG_EPS)).sum()
        + (stats["group_totals"] * log_m).sum()
        + (stats["pair_count"] * lgammas).sum()
        + stats["constant"]
    )
