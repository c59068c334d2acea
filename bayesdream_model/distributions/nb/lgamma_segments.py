"""E_t(φ) = Σ_p c_p [lgamma(φ + v_p) - lgamma(φ)] over feature t's large count values, as a
function of s = log φ: Chebyshev interpolants on fixed segments of s, built on first use.

`shifted_lgamma` costs one log1p and a few multiplies a (feature, value) pair at every
likelihood evaluation; a deeply sequenced feature has hundreds of distinct counts (770,000
pairs on a 4,000 x 3,000 screen of median mean 50), and a fit evaluates the likelihood
~500 times (Laplace's Newton steps, then SVI) at dispersions that, after the first few
Newton steps, stay within a few posterior sds of each feature's MAP. So per feature

    E_t(φ) = λ s + D_t(s),   λ = V_t = Σ_p c_p v_p or C_t (below),

and D_t is interpolated on the segment [kW, (k + 1)W) of s that holds it (W = 2, a factor
e^2 in φ), from its values at NODES Chebyshev points. Each pair term is analytic in s in
the strip |Im s| < π (the poles of lgamma(φ + v) and lgamma(φ) lie at φ = -v - j and -j, j
a positive integer or 0 for the first: s = log(v + j) ± iπ; lgamma(φ) ~ -s as φ -> 0 is
analytic), so on a segment of half-width 1 the interpolant converges like 6.4^-n: 16
nodes reach the float64 rounding of the node values (measured: values to 4e-16 of the
sum, gradients to 1e-10 of each feature's own for φ >= 1, 4e-9 at φ ~ 1e-3). A linear part
λ s is taken out first: λ = V_t where the segment centre's φ >= V_t / C_t (C_t = Σ_p c_p),
else C_t (E's slope in s runs from C_t at φ -> 0 to V_t at φ -> oo), so D's slope never
is a large cancelling part of E's: near the Poisson limit D_t ~ Σ c v^2 / φ keeps its relative accuracy, and that is
the part of the gradient that matters there (the v/φ parts cancel against the likelihood's
other terms).

A segment's interpolant is a function of the data and of the segment alone, never of the
order of evaluations, so a fit is reproducible bit for bit however it is interrupted and
resumed. Building one costs NODES evaluations of the feature's pairs; evaluating it costs
O(NODES) per feature, independent of its number of pairs.
"""

from __future__ import annotations

import math

import torch

from bayesdream_model.distributions.nb.shifted_lgamma import (
    PAIR_CHUNK,
    SERIES_MIN,
    ShiftedLgamma,
    lgamma_tail,
)

SEGMENT_WIDTH = 2.0  # in s = log φ
NODES = 16
DIRECT_PAIRS = 12  # pairs a feature below which the series pair by pair is cheaper


def _chebyshev_nodes(dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The NODES points x_j = cos(π (j + 1/2) / n) on [-1, 1], and the matrix [n, n] that
    maps values at them to the coefficients of Σ_m a_m T_m(x)."""
    j = torch.arange(NODES, dtype=dtype, device=device) + 0.5
    angles = math.pi * j / NODES
    to_coef = (2.0 / NODES) * torch.cos(
        angles[:, None] * torch.arange(NODES, dtype=dtype, device=device)
    )
    to_coef[:, 0] *= 0.5
    return torch.cos(angles), to_coef


def node_remainders(phi: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What `pair_remainders` reads of φ [F, n]: w = φ + 16, log1p(16 / φ), S(w), and
    Σ_{i<16} log1p(i / φ) (= Σ_{i<16} log(φ + i) - 16 log φ, each pair's once)."""
    rising = torch.zeros_like(phi)
    for i in range(1, SERIES_MIN):
        rising = rising + torch.log1p(i / phi)
    w = phi + SERIES_MIN
    return w, torch.log1p(SERIES_MIN / phi), lgamma_tail(w), rising


def pair_remainders(w, shift, tail_w, value) -> torch.Tensor:
    """lgamma(φ + v) - lgamma(φ) - v log φ - Σ_{i<16} log1p(i / φ) for v >= SERIES_MIN:
    Stirling's series as in `shifted_lgamma`, with u log w - u log φ = u log1p(16 / φ)
    (no difference of large logs); `w`, `shift`, `tail_w` from `node_remainders`."""
    u = value - SERIES_MIN
    log_ratio = torch.log1p(u / w)
    series = (w - 0.5) * log_ratio + u * (shift + log_ratio - 1.0)
    return series + (lgamma_tail(w + u) - tail_w)


class SegmentedLgamma:
    """Σ_p c_p [lgamma(φ_t(p) + v_p) - lgamma(φ_t(p))] (`shifted_lgamma_sum`'s sum): the
    pairs with v_p >= SERIES_MIN as in the module docstring, the rest (non-integer values
    below) by torch.lgamma; call it with φ [T] (float64).

    Holds the A features that have such pairs (`active`), their pairs by feature, and the
    interpolants built so far: `rows` [K, A] int32 (segment k_low + i of active feature a:
    its row of `coef` [R, NODES], -1 while unbuilt). Where the features have fewer than
    DIRECT_PAIRS pairs each on average (shallow or droplet data), the series pair by pair
    is cheaper than an interpolant's NODES-term sum, and is used instead.
    """

    def __init__(
        self, feature: torch.Tensor, value: torch.Tensor, count: torch.Tensor, n_features: int
    ) -> None:
        large = value >= SERIES_MIN
        rest = ~large  # non-integer values below 16 (ambient-corrected counts): torch.lgamma
        self.rest = feature[rest], value[rest], count[rest]
        self.pairs = feature[large], value[large], count[large]
        feature, value, count = self.pairs
        order = torch.argsort(feature, stable=True)
        feature, self.value, self.count = feature[order], value[order], count[order]
        self.active, local, length = torch.unique_consecutive(
            feature, return_inverse=True, return_counts=True
        )
        self.direct = feature.numel() < DIRECT_PAIRS * self.active.numel()
        n_active = self.active.numel()
        zeros = torch.zeros(n_active, dtype=value.dtype, device=value.device)
        self.linear = zeros.index_add(0, local, self.count * self.value)  # V_t
        self.cells = zeros.index_add(0, local, self.count)  # C_t
        self.start = torch.cumsum(length, 0) - length
        self.length = length
        self.nodes, self.to_coef = _chebyshev_nodes(value.dtype, value.device)
        self.coef = torch.zeros(0, NODES, dtype=value.dtype, device=value.device)
        self.slope = torch.zeros(0, dtype=value.dtype, device=value.device)  # λ of each row
        self.rows = torch.empty(0, n_active, dtype=torch.int32, device=value.device)
        self.k_low = 0
        self.built = 0  # segment interpolants built (features x segments)

    # -- segments ------------------------------------------------------------------------
    def _cover(self, k: torch.Tensor) -> None:
        """Grow `rows` to hold segments k.min() .. k.max()."""
        low, high = int(k.min()), int(k.max())
        if self.rows.shape[0] == 0:
            self.k_low = low
        k_high = self.k_low + self.rows.shape[0] - 1
        below, above = max(0, self.k_low - low), max(0, high - k_high)
        if below or above:
            fresh = self.rows.new_full((1, self.rows.shape[1]), -1)
            self.rows = torch.cat([fresh.expand(below, -1), self.rows, fresh.expand(above, -1)])
            self.k_low -= below

    def _row_of(self, k: torch.Tensor) -> torch.Tensor:
        """Each active feature's row of `coef` for its segment k [A] (-1: not built)."""
        features = torch.arange(k.numel(), device=k.device)
        return self.rows[k - self.k_low, features]

    def _build(self, features: torch.Tensor, k: torch.Tensor) -> None:
        """The interpolants of active `features` on their segments `k`."""
        centers = (k.to(self.value.dtype) + 0.5) * SEGMENT_WIDTH
        s_nodes = centers[:, None] + 0.5 * SEGMENT_WIDTH * self.nodes  # [F, n]
        phi_nodes = torch.exp(s_nodes)
        # λ: E's slope in s tends to C_t as φ -> 0 and to V_t as φ -> oo; the one nearer
        # on this segment is taken out, so D's slope never is a large cancelling part
        cells, linear = self.cells[features], self.linear[features]
        slope = torch.where(torch.exp(centers) * cells >= linear, linear, cells)
        lengths = self.length[features]
        device = features.device
        local = torch.repeat_interleave(torch.arange(features.numel(), device=device), lengths)
        offsets = torch.cumsum(lengths, 0) - lengths
        within = torch.arange(local.numel(), device=device) - offsets[local]
        pairs = self.start[features][local] + within
        w, shift, tail_w, rising = node_remainders(phi_nodes)
        values = cells[:, None] * rising + (linear - slope)[:, None] * s_nodes  # D = E - λ s
        step = max(1, PAIR_CHUNK // NODES)
        for lo in range(0, pairs.numel(), step):
            f, p = local[lo : lo + step], pairs[lo : lo + step]
            terms = pair_remainders(w[f], shift[f], tail_w[f], self.value[p, None])  # [P, n]
            values.index_add_(0, f, self.count[p, None] * terms)
        first = self.coef.shape[0]
        self.coef = torch.cat([self.coef, values @ self.to_coef])
        self.slope = torch.cat([self.slope, slope])
        self.rows[k - self.k_low, features] = torch.arange(
            first, first + features.numel(), dtype=torch.int32, device=k.device
        )
        self.built += features.numel()

    # -- evaluation ----------------------------------------------------------------------
    def value_and_slope(self, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ_t E_t(φ_t) and dE_t/dφ_t [T] (0 where feature t has no pairs)."""
        phi_a = phi.index_select(0, self.active)
        s = torch.log(phi_a)
        k = torch.floor(s / SEGMENT_WIDTH).long()
        self._cover(k)
        row = self._row_of(k)
        missing = row < 0
        if bool(missing.any()):
            features = torch.nonzero(missing).squeeze(1)
            self._build(features, k[features])
            row = self._row_of(k)
        coef = self.coef.index_select(0, row).T.contiguous()  # [n, A]
        t = (s - (k.to(s.dtype) + 0.5) * SEGMENT_WIDTH) / (0.5 * SEGMENT_WIDTH)
        remainder, slope_t = _clenshaw(coef, t)
        linear = self.slope.index_select(0, row)
        value = (linear * s + remainder).sum()
        slope_s = linear + slope_t / (0.5 * SEGMENT_WIDTH)
        return value, torch.zeros_like(phi).index_copy_(0, self.active, slope_s / phi_a)

    def __call__(self, phi: torch.Tensor) -> torch.Tensor:
        """Σ_p c_p [lgamma(φ + v_p) - lgamma(φ)], differentiable in φ [T] (float64); φ
        not finite and positive everywhere: the pairs' exact sum (`shifted_lgamma`)."""
        feature, value, count = self.rest
        phi_rest = phi.index_select(0, feature)
        rest = (count * (torch.lgamma(phi_rest + value) - torch.lgamma(phi_rest))).sum()
        if self.active.numel() == 0:
            return rest
        if self.direct or not bool(torch.isfinite(phi).all() & (phi > 0).all()):
            return ShiftedLgamma.apply(phi, *self.pairs) + rest
        return _Segmented.apply(phi, self) + rest


def _clenshaw(coef: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_m a_m T_m(t) and its derivative Σ_m m a_m U_{m-1}(t), per column of `coef` [n, A]."""
    n = coef.shape[0]
    two_t = 2.0 * t
    b1 = b2 = torch.zeros_like(t)  # the T series
    d1 = d2 = torch.zeros_like(t)  # the U series of the derivative, a'_j = (j + 1) a_{j+1}
    for m in range(n - 1, 0, -1):
        b1, b2 = coef[m] + two_t * b1 - b2, b1
        d1, d2 = m * coef[m] + two_t * d1 - d2, d1
    return coef[0] + t * b1 - b2, d1


class _Segmented(torch.autograd.Function):
    @staticmethod
    def forward(ctx, phi, segments: SegmentedLgamma):  # noqa: D102
        value, slope = segments.value_and_slope(phi)
        ctx.save_for_backward(slope)
        return value

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        (slope,) = ctx.saved_tensors
        return grad_output * slope, None
