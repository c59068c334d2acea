"""Σ over the non-zero counts of y_nt log1p(sf_n x_gt): the negbinom pass that reads entries.

Zeros add nothing to it, so a step costs O(non-zeros) where the dense pass cost O(N T).
Each entry carries its count, its cell's size factor and one code t * C + g; entries are
sorted by code (by feature, then group, then cell), so that the entries of one (g, t)
are a contiguous run: a step gathers x by code and sums each run from a float64 running
sum of the block (two gathers per run), with no per-entry scatter. Blocks are a few
hundred kB on a CPU (cache) and a few M entries on a GPU (few kernel launches; a scan
instead of atomics on the C addresses a column shares).

Precision. The entries are float32 (as the fit runs); sums are float64. The gradient is
W / x with W = Σ y a/(1 + a), a = sf x; for large a what matters is Y - W = Σ y/(1 + a),
of order Y / a, which float32 terms y a/(1 + a) would drown in their rounding (u y each),
so both Σ y a/(1 + a) and Σ y/(1 + a) are accumulated and W is taken from the smaller.
The pass evaluates at x32 = float32(x), a rounding shared by all entries of a (g, t), and
returns the value and gradient at x to first order: V(x) = V(x32) + W ρ and
dV/dx = W / x32 (1 - ρ κ), ρ = x / x32 - 1, κ = W / Y (the y-weighted mean of a/(1 + a));
the remainder is O(ρ²) ~ 4e-15.
"""

from __future__ import annotations

import numpy as np
import torch

#: entries per block: cache-sized on a CPU; on a GPU, large enough for few kernel launches
BLOCK_ENTRIES = {"cpu": 1 << 17}
DEVICE_BLOCK_ENTRIES = 1 << 22


def block_entries(device: torch.device | str) -> int:
    """Entries per block of the pass on `device`."""
    return BLOCK_ENTRIES.get(torch.device(device).type, DEVICE_BLOCK_ENTRIES)


def code_dtype(n_features: int, n_groups: int) -> np.dtype:
    """int32 codes t * C + g while they fit, else int64."""
    return np.dtype(np.int32 if n_features * n_groups < np.iinfo(np.int32).max else np.int64)


def sorted_by_code(local_columns: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """The order of a run of columns' entries by (column, group), cells kept in order."""
    keys = local_columns.astype(np.int64) * n_groups + groups
    if keys.size and keys.max() < np.iinfo(np.int32).max:
        keys = keys.astype(np.int32)  # a narrower stable sort is faster
    return np.argsort(keys, kind="stable")


def run_layout(codes: np.ndarray, block: int) -> dict[str, np.ndarray]:
    """Where each run of equal codes ends within its block: `run_ends` [R] (entry
    positions, each block's last entry included), `run_codes` [R], and `block_runs`
    [blocks + 1] (each block's slice of the runs)."""
    n = len(codes)
    last = np.ones(n, dtype=bool)
    last[:-1] = codes[1:] != codes[:-1]
    last[block - 1 :: block] = True  # a run split by a block boundary ends in both blocks
    ends = np.flatnonzero(last)
    starts = np.arange(0, n, block)
    return {
        "run_ends": ends,
        "run_codes": codes[ends].astype(np.int64),
        "block_runs": np.searchsorted(ends, np.append(starts, n)),
    }


class NonzeroLog1p(torch.autograd.Function):
    """Σ_e y_e log1p(sf_e x[code_e]) for x [T C] (flattened [T, C]; float64) given the
    totals Y [T C] of y per code, with its gradient computed in the same pass and kept for
    backward (no per-entry tensor)."""

    @staticmethod
    def forward(ctx, x, totals, stats):  # noqa: D102
        x32 = x.detach().float()
        value, below, above = _pass(x32, stats)
        # W = Σ y a/(1+a) = Y - Σ y/(1+a): the smaller sum carries the smaller rounding
        weight = torch.where(below <= above, below, totals - above)
        rho = x.detach() / x32.double() - 1.0  # float32 rounding of x, per (g, t)
        kappa = torch.where(totals > 0, weight / totals.clamp(min=1e-300), 0.0)
        ctx.save_for_backward(weight / x32.double() * (1.0 - rho * kappa))
        return value + (weight * rho).sum()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (slope,) = ctx.saved_tensors
        return grad * slope, None, None


def _pass(x32: torch.Tensor, stats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Σ y log1p(a), and per code Σ y a/(1+a) and Σ y/(1+a), a = sf x32[code]; float64."""
    values, sf, codes = stats["values"], stats["entry_sf"], stats["codes"]
    ends, run_codes = stats["run_ends"], stats["run_codes"]
    bounds = stats["block_runs"].tolist()
    block = int(stats["block_size"])
    total = torch.zeros((), dtype=torch.float64, device=x32.device)
    below, above = (torch.zeros(x32.shape, dtype=torch.float64, device=x32.device) for _ in "ab")
    for index, start in enumerate(range(0, values.shape[0], block)):
        span = slice(start, start + block)
        y = values[span]
        a = x32.index_select(0, codes[span]).mul_(sf[span])
        total += torch.mul(y, torch.log1p(a)).sum(dtype=torch.float64)
        q = torch.div(y, a + 1.0)  # y/(1 + a)
        lo, hi = bounds[index], bounds[index + 1]
        local = ends[lo:hi] - start
        for sums, terms in ((below, a.mul_(q)), (above, q)):  # y a/(1 + a), y/(1 + a)
            at_ends = torch.cumsum(terms, 0, dtype=torch.float64).index_select(0, local)
            sums.index_add_(0, run_codes[lo:hi], torch.diff(at_ends, prepend=at_ends[:1] * 0))
    return total, below, above
