"""Σ_{n in g} log1p(sf_n x): a per-group function of one number, tabulated once.

The negbinom log1p term Σ_n φ_t log1p(sf_n m_gt / (φ_t + 2ε)) depends on every cell only
through its size factor, so for each group it is φ_t F_g(x_gt) with

    F_g(x) = Σ_{n in g} log1p(sf_n x),   x = m_gt / (φ_t + 2ε),

a smooth increasing function of one variable, the same for every feature. It is evaluated
in float64 on the [C, T] parameters instead of on every cell, three ways:

- x sf_max <= SERIES_BELOW (every a = sf x is small): the power series of log1p to a^8,
  from the group's power sums Σ sf^k (truncation below 1e-16 relative);
- x sf_min >= ASYMPTOTIC_ABOVE (every a is large): log a + log1p(1/a), the series in 1/a
  to the 4th power, from Σ log sf and Σ sf^-k (truncation below 1e-15 relative);
- in between: G(s) = F(e^s) interpolated by quintic Hermite polynomials in s = log x
  between nodes spaced STEP apart, with G, G' = x F' and G'' exact at the nodes.

The interpolation error is O(STEP^6) relative (~1e-13 at STEP = 0.05; tested). Near the
Poisson limit the dispersion gradient reads F - x F' = G - G', of order a² where F is of
order a: the series branch takes a up to 1e-2 so that the table's error, relative to that
difference, stays below ~1e-10 as well. `GroupLog1p`
returns F and keeps dF/dx for its backward pass; everything per step is torch.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SERIES_BELOW = 1e-2
ASYMPTOTIC_ABOVE = 1e3
STEP = 0.05  # node spacing in log x
POWERS = 8  # power sums Σ sf^k, k = 1..8
INVERSE_POWERS = 4  # Σ sf^-k, k = 1..4
CELL_CHUNK = 4096  # cells per pass while tabulating: [chunk, nodes] float64 temporaries


def log1p_table(
    sum_factor: np.ndarray, bounds: np.ndarray, sf_range: tuple[float, float] | None = None
) -> dict[str, np.ndarray]:
    """The tables of every group, from the size factors sorted by group ([N], float64) and
    the groups' row bounds [C + 1]; the grid spans `sf_range` (smallest, largest) when
    given (a batch of the fit cells: every batch's tables then share one grid), else
    these size factors' own range.

    Returns `sf_grid` [4] (first node s0, spacing h, x below which the power series is
    used, x above which the asymptotic one is), `sf_coef` [C, K - 1, 6] (G's polynomial on
    each interval, in powers of s - s_k) and `sf_moments` [C, 2 + POWERS + INVERSE_POWERS]
    (cell count, Σ log sf, Σ sf^k, Σ sf^-k).
    """
    sf = np.asarray(sum_factor, dtype=np.float64)
    bottom, top = sf_range or ((sf.min(), sf.max()) if sf.size else (1.0, 1.0))
    x_low, x_high = SERIES_BELOW / top, ASYMPTOTIC_ABOVE / bottom
    start, stop = math.log(x_low), math.log(x_high)
    intervals = max(1, math.ceil((stop - start) / STEP))
    step = (stop - start) / intervals
    nodes = np.exp(start + step * np.arange(intervals + 1))  # x at the nodes [K]
    coef, moments = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        group = sf[lo:hi]
        coef.append(np.stack(_hermite_coefficients(*_log1p_sums(group, nodes), step), axis=1))
        moments.append(_moments(group))
    return {
        "sf_grid": np.array([start, step, x_low, x_high]),
        "sf_coef": np.stack(coef),
        "sf_moments": np.stack(moments),
    }


def _log1p_sums(group: np.ndarray, nodes: np.ndarray) -> tuple[np.ndarray, ...]:
    """G, dG/ds, d²G/ds² at the nodes, G = Σ log1p(a), a = sf x, s = log x:
    dG/ds = Σ a/(1 + a), d²G/ds² = Σ a/(1 + a)²."""
    value, first, second = (np.zeros_like(nodes) for _ in range(3))
    for start in range(0, len(group), CELL_CHUNK):
        a = group[start : start + CELL_CHUNK, None] * nodes[None]  # [cells, K]
        ratio = a / (1.0 + a)
        value += np.log1p(a).sum(0)
        first += ratio.sum(0)
        second += (ratio / (1.0 + a)).sum(0)
    return value, first, second


def _hermite_coefficients(value, first, second, step: float) -> tuple:
    """On each interval the quintic in r = s - s_k that matches value, first and second
    derivative at both ends (c0..c5, lowest power first), from G, G', G'' at the nodes [K]
    (numpy or torch)."""
    f0, f1, d0, d1, e0, e1 = value[:-1], value[1:], first[:-1], first[1:], second[:-1], second[1:]
    return hermite_between(f0, f1, d0, d1, e0, e1, step)


def hermite_between(f0, f1, d0, d1, e0, e1, step) -> tuple:
    """The six coefficients of the quintic from G, G', G'' at the left (0) and right (1)
    end of an interval of length `step`."""
    gap = f1 - f0 - d0 * step - e0 * step**2 / 2  # what c3..c5 must add at r = h
    slope = (d1 - d0 - e0 * step) * step
    bend = (e1 - e0) * step**2
    a = 10 * gap - 4 * slope + bend / 2  # c3 h^3
    b = -15 * gap + 7 * slope - bend  # c4 h^4
    c = 6 * gap - 3 * slope + bend / 2  # c5 h^5
    return f0, d0, e0 / 2, a / step**3, b / step**4, c / step**5


def _moments(group: np.ndarray) -> np.ndarray:
    """Cell count, Σ log sf, Σ sf^k (k = 1..POWERS), Σ sf^-k (k = 1..INVERSE_POWERS)."""
    powers = [np.sum(group**k) for k in range(1, POWERS + 1)]
    inverse = [np.sum(group ** (-k)) for k in range(1, INVERSE_POWERS + 1)]
    return np.array([len(group), np.log(group).sum(), *powers, *inverse], dtype=np.float64)


def evaluate(x: torch.Tensor, stats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """F_g(x) and dF_g/dx for x [C, T] > 0 (float64), group g = row."""
    start, step, x_low, x_high = stats["sf_grid"].unbind()
    inside = _interpolated(x.clamp(x_low, x_high), stats["sf_coef"], start, step)
    return with_series(x, inside, x_low, x_high, stats["sf_moments"].unsqueeze(-1))


def with_series(
    x: torch.Tensor, inside: tuple[torch.Tensor, torch.Tensor], x_low, x_high, moments
) -> tuple[torch.Tensor, torch.Tensor]:
    """(value, slope) of the table `inside` [x_low, x_high], replaced below x_low by the
    power series and above x_high by the asymptotic one, from `moments` [C, M, T or 1]
    (count, Σ log sf, Σ sf^k for k = 1..POWERS, Σ sf^-k for k = 1..INVERSE_POWERS, each
    weighted alike)."""
    count, log_sf = moments[:, 0], moments[:, 1]
    power = moments[:, 2 : 2 + POWERS]
    inverse = moments[:, 2 + POWERS : 2 + POWERS + INVERSE_POWERS]
    value, slope = inside
    below, above = x <= x_low, x >= x_high
    # a series only where some x needs it (asked on a CPU only: on a GPU the question is a
    # device-to-host sync, and evaluating both series costs less than it)
    on_gpu = x.device.type != "cpu"
    if on_gpu or bool(below.any()):
        low = _power_series(x.clamp(max=x_low), power)
        value, slope = (
            torch.where(below, lo, mid) for lo, mid in zip(low, (value, slope), strict=True)
        )
    if on_gpu or bool(above.any()):
        high = _asymptotic_series(x.clamp(min=x_high), count, log_sf, inverse)
        value, slope = (
            torch.where(above, hi, mid) for hi, mid in zip(high, (value, slope), strict=True)
        )
    return value, slope


def _interpolated(x, coef, start, step):
    """G(log x) and the x-derivative G'(log x) / x, from the table."""
    s = torch.log(x)
    # a NaN x (diverging parameters) stays NaN through r, but must not become an index
    k = ((s - start) / step).floor().nan_to_num(0.0).clamp(0, coef.shape[1] - 1)
    r = s - (start + k * step)
    c = node_rows(coef, k.long()).unbind(-1)  # six [C, T]
    value = c[0] + r * (c[1] + r * (c[2] + r * (c[3] + r * (c[4] + r * c[5]))))
    slope = c[1] + r * (2 * c[2] + r * (3 * c[3] + r * (4 * c[4] + r * 5 * c[5])))
    return value, slope / x


def node_rows(table: torch.Tensor, k: torch.Tensor, count: int = 1) -> torch.Tensor:
    """table[i, ..., k[i, j] + c, :] for c < `count`, a table [C, (T,) K, W] and node
    indices k [C, T]: [count, C, T, W] (squeezed when count is 1) from one row gather of
    the table flattened to [rows, W] (a `gather` along K with an expanded index costs ~3x
    more on a CPU)."""
    n_groups, n_nodes, width = table.shape[0], table.shape[-2], table.shape[-1]
    if table.dim() == 3:  # per group: the same K nodes for every feature
        offset = torch.arange(n_groups, device=k.device)[:, None] * n_nodes
    else:  # per (group, feature)
        offset = torch.arange(k.numel(), device=k.device).view(k.shape) * n_nodes
    rows = (offset + k).reshape(-1)
    rows = torch.cat([rows + c for c in range(count)]) if count > 1 else rows
    out = table.reshape(-1, width).index_select(0, rows).view(count, *k.shape, width)
    return out[0] if count == 1 else out


def _power_series(x, power):
    """Σ_k (-1)^(k+1) x^k Σ sf^k / k and its derivative (k = 1..POWERS), by Horner."""
    value = torch.zeros_like(x)
    slope = torch.zeros_like(x)
    for k in range(POWERS, 0, -1):
        sign = 1.0 if k % 2 else -1.0
        value = x * (sign * power[:, k - 1] / k + value)
        slope = sign * power[:, k - 1] + x * slope
    return value, slope


def _asymptotic_series(x, count, log_sf, inverse):
    """N log x + Σ log sf + Σ_k (-1)^(k+1) Σ sf^-k / (k x^k) and its derivative."""
    z = 1.0 / x
    tail = torch.zeros_like(x)
    tail_slope = torch.zeros_like(x)
    for k in range(INVERSE_POWERS, 0, -1):
        sign = 1.0 if k % 2 else -1.0
        tail = z * (sign * inverse[:, k - 1] / k + tail)
        tail_slope = z * (sign * inverse[:, k - 1] + tail_slope)
    return count * torch.log(x) + log_sf + tail, count * z - z * tail_slope


class GroupLog1p(torch.autograd.Function):
    """F_g(x_gt) [C, T] with dF/dx kept from the forward pass for the backward."""

    @staticmethod
    def forward(ctx, x, sf_grid, sf_coef, sf_moments):  # noqa: D102
        stats = {"sf_grid": sf_grid, "sf_coef": sf_coef, "sf_moments": sf_moments}
        value, slope = evaluate(x, stats)
        ctx.save_for_backward(slope)
        return value

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (slope,) = ctx.saved_tensors
        return grad * slope, None, None, None
