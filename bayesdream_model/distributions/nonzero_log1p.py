"""Σ over the non-zero counts of y_nt log1p(sf_n x_gt): the negbinom pass that reads entries.

Zeros add nothing to it, so a step costs O(non-zeros) where the dense pass cost O(N T).
Each entry carries its count, its cell's size factor and one code t * C + g; entries are
sorted by code (by feature, then group, then cell) and each run of one code is padded
with entries of count 0 (which add nothing to any sum) to a multiple of CHUNK entries.
So every aligned chunk of CHUNK entries belongs to one (g, t): a step gathers x by code,
sums each chunk with a vectorised float32 sum, and adds the chunk sums (CHUNK x fewer) to
their (g, t) in float64; there is no per-entry scatter, and on a GPU no atomics on the C
addresses a column shares. Blocks are a few hundred kB on a CPU (cache) and a few M
entries on a GPU (few kernel launches).

Precision. The entries are float32 (as the fit runs); a chunk sum of positive terms is
exact to float32 rounding of itself, and chunk sums are added in float64. The gradient
is W / x with W = Σ y a/(1 + a), a = sf x; for large a what matters is Y - W =
Σ y/(1 + a), of order Y / a, which terms y a/(1 + a) would drown in their rounding (u y
each), so both Σ y a/(1 + a) and Σ y/(1 + a) are accumulated and W is taken from the
smaller. The pass evaluates at x32 = float32(x), a rounding shared by all entries of a
(g, t), and returns the value and gradient at x to first order: V(x) = V(x32) + W ρ and
dV/dx = W / x32 (1 - ρ κ), ρ = x / x32 - 1, κ = W / Y (the y-weighted mean of
a/(1 + a)); the remainder is O(ρ²) ~ 4e-15.
"""

from __future__ import annotations

import numpy as np
import torch

#: entries per block: cache-sized on a CPU; on a GPU, large enough for few kernel launches
BLOCK_ENTRIES = {"cpu": 1 << 17}
DEVICE_BLOCK_ENTRIES = 1 << 22
#: entries per chunk (runs are padded to a multiple): the longest power of two <= a
#: quarter of the median run, within these bounds (padding adds <= 1/8 on average)
CHUNK_RANGE = (8, 64)


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


def chunk_width(codes: np.ndarray) -> int:
    """CHUNK for entries sorted by code: a power of two near a quarter of the median run."""
    runs = np.diff(np.flatnonzero(np.diff(codes, prepend=-1, append=-1)))
    quarter = max(1.0, float(np.median(runs)) / 4) if runs.size else 1.0
    lo, hi = CHUNK_RANGE
    return int(min(hi, max(lo, 2 ** int(np.log2(quarter)))))


def padded(arrays: dict[str, np.ndarray], width: int) -> dict[str, np.ndarray]:
    """`values`, `entry_sf`, `codes` (sorted by code) with each run padded by entries of
    count 0 and size factor 1 to a multiple of `width`; `chunk_codes` [chunks] int64."""
    codes = arrays["codes"]
    starts = np.flatnonzero(np.diff(codes, prepend=-1)) if codes.size else np.zeros(0, int)
    lengths = np.diff(np.append(starts, codes.size))
    room = -(-lengths // width) * width
    new_starts = np.concatenate([[0], np.cumsum(room)[:-1]]).astype(np.int64)
    where = np.repeat(new_starts - starts, lengths) + np.arange(codes.size)
    out = {
        "values": np.zeros(int(room.sum()), dtype=np.float32),
        "entry_sf": np.ones(int(room.sum()), dtype=np.float32),
        "codes": np.repeat(codes[starts], room).astype(codes.dtype),
    }
    out["values"][where] = arrays["values"]
    out["entry_sf"][where] = arrays["entry_sf"]
    out["chunk_codes"] = out["codes"][::width].astype(np.int64)
    return out


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
    values, sf, codes, chunk_codes = (
        stats[k] for k in ("values", "entry_sf", "codes", "chunk_codes")
    )
    width, block = int(stats["chunk_width"]), int(stats["block_size"])
    total = torch.zeros((), dtype=torch.float64, device=x32.device)
    below, above = (torch.zeros(x32.shape, dtype=torch.float64, device=x32.device) for _ in "ab")
    for start in range(0, values.shape[0], block):
        span = slice(start, start + block)
        y = values[span]
        a = x32.index_select(0, codes[span]).mul_(sf[span])
        total += _chunk_sums(torch.log1p(a).mul_(y), width).sum(dtype=torch.float64)
        q = torch.div(y, a + 1.0)  # y/(1 + a)
        chunks = chunk_codes[start // width : (start + y.shape[0]) // width]
        below.index_add_(0, chunks, _chunk_sums(a.mul_(q), width).double())  # y a/(1 + a)
        above.index_add_(0, chunks, _chunk_sums(q, width).double())
    return total, below, above


def _chunk_sums(terms: torch.Tensor, width: int) -> torch.Tensor:
    """Sums of consecutive chunks of `width` terms (float32, vectorised)."""
    return terms.view(-1, width).sum(1)
