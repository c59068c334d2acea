"""The learned baseline-mean prior as a Pyro distribution (`baseline_prior` fits it).

log2 mu_ntc[t] = log2 m_t + r, r ~ g (a mixture of normals on a fixed grid). Every feature
shares g, shifted by its own m_t, so log g is tabulated once (values and slopes at nodes
0.02 apart, cubic Hermite between them: ~1e-9 of a nat) and a step costs O(T), where the
mixture itself costs O(T K) exponentials (K = 73 components: 8 ms a step at T = 3,000,
as much as the rest of the step).
"""

from __future__ import annotations

import math

import torch
from pyro.distributions import Gamma, TorchDistribution, constraints

from bayesdream_model.distributions.nb.baseline_prior import (
    SLAB_SCALE,
    SLAB_WEIGHT,
    TABLE_HIGH,
    TABLE_LOW,
    TABLE_STEP,
    slab_log_density,
)

LN2 = math.log(2.0)


class _TableLookup(torch.autograd.Function):
    """log g(r) for r of any shape, from the node table [2, J] (value, slope)."""

    @staticmethod
    def forward(ctx, r, table):  # noqa: D102
        value, slope = _evaluate(r.double(), table)
        ctx.save_for_backward(slope)
        return value.to(r.dtype)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (slope,) = ctx.saved_tensors
        return grad * slope.to(grad.dtype), None


def _evaluate(r: torch.Tensor, table: torch.Tensor):
    """(log g, d log g / dr): cubic Hermite inside the table, the slab outside."""
    n_nodes = table.shape[1]
    position = ((r - TABLE_LOW) / TABLE_STEP).clamp(0.0, n_nodes - 1.0)
    # a NaN r (a diverged step) reads node 0 and stays NaN through t: the loss is not finite
    k = torch.nan_to_num(position.floor(), nan=0.0).clamp(max=n_nodes - 2).long()
    t = position - k
    v0, v1 = table[0][k], table[0][k + 1]
    d0, d1 = table[1][k] * TABLE_STEP, table[1][k + 1] * TABLE_STEP
    t2, t3 = t * t, t * t * t
    value = (2 * t3 - 3 * t2 + 1) * v0 + (t3 - 2 * t2 + t) * d0
    value = value + (-2 * t3 + 3 * t2) * v1 + (t3 - t2) * d1
    slope = (6 * t2 - 6 * t) * v0 + (3 * t2 - 4 * t + 1) * d0
    slope = (slope + (-6 * t2 + 6 * t) * v1 + (3 * t2 - 2 * t) * d1) / TABLE_STEP
    outside = (r < TABLE_LOW) | (r > TABLE_HIGH)
    # the slab only where some r needs it (asked on a CPU only: on a GPU the question is a
    # device-to-host sync that costs more than the slab)
    if r.device.type != "cpu" or bool(outside.any()):
        slab_value, slab_slope = slab_log_density(r)
        value = torch.where(outside, slab_value, value)
        slope = torch.where(outside, slab_slope, slope)
    return value, slope


class BaselineMixture(TorchDistribution):
    """mu_ntc with log2 mu_ntc = log2 `reference` + r, r ~ g; batch shape = reference's.

    g: log weights [K] of normals at `centres` [K] with sd `width` (log2 units), and its
    log density tabulated (`baseline_prior.log_density_table`) in `table` [2, J]."""

    arg_constraints = {"reference": constraints.positive}
    support = constraints.positive
    has_rsample = False

    def __init__(
        self,
        reference: torch.Tensor,
        mixture: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        table: torch.Tensor,
    ) -> None:
        self.reference, self.mixture, self.table = reference, mixture, table
        super().__init__(reference.shape, validate_args=False)

    def expand(self, batch_shape, _instance=None):  # noqa: D102
        return BaselineMixture(self.reference.expand(batch_shape), self.mixture, self.table)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """log g(r) - log(mu ln 2), r = log2(mu / reference)."""
        log_mu = torch.log(value)
        r = (log_mu - torch.log(self.reference)) / LN2
        return _TableLookup.apply(r, self.table.double()) - log_mu - math.log(LN2)

    def sample(self, sample_shape=()) -> torch.Tensor:
        """Component (or the slab), then r from it, then mu."""
        shape = torch.Size(sample_shape) + self.batch_shape
        log_w, centres, width = (m.double() for m in self.mixture)
        k = torch.multinomial(torch.softmax(log_w, -1), shape.numel(), replacement=True)
        noise = torch.randn(shape, dtype=torch.float64, device=log_w.device)
        r = centres[k].reshape(shape) + width * noise
        slab = torch.rand(shape, dtype=torch.float64, device=log_w.device) < SLAB_WEIGHT
        cauchy = torch.distributions.Cauchy(0.0, SLAB_SCALE).sample(shape).to(r)
        r = torch.where(slab, cauchy, r)
        return (self.reference * torch.exp2(r).to(self.reference.dtype)).detach()


def baseline_mean_prior(inputs: dict[str, torch.Tensor]) -> TorchDistribution:
    """The prior of mu_ntc [T]: the learned mixture where the inputs hold one, else
    Gamma(mean mu_mean, sd mu_sd) (the `weak` and `standard_error` priors)."""
    mu_mean = inputs["mu_mean"]
    if "mu_logits" not in inputs:
        mu_sd = inputs["mu_sd"]
        return Gamma(mu_mean**2 / mu_sd**2, mu_mean / mu_sd**2)
    mixture = (inputs["mu_logits"], inputs["mu_centres"], inputs["mu_width"])
    return BaselineMixture(mu_mean, mixture, inputs["mu_table"])
