"""Memory planning for posterior sampling (docs/model.md, section 9) and for the fit's
data (in memory, dense or sparse, or streamed): arithmetic only.

The tasks layer reads the environment (SLURM variables, psutil, CUDA) and passes numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

BYTES_PER_FLOAT = 4
SLURM_SAFETY = 0.7
SHARED_SAFETY = 0.35
MIN_BATCH, MAX_BATCH = 10, 100
MIB = 1024**2


@dataclass(frozen=True)
class MemoryBudget:
    """Usable bytes, where the number came from, and the safety factor that goes with it."""

    usable_bytes: int
    source: str
    safety: float

    @property
    def safe_bytes(self) -> float:
        """What planning may use."""
        return self.usable_bytes * self.safety


def slurm_bytes(environ: Mapping[str, str]) -> int | None:
    """The SLURM allocation: SLURM_MEM_PER_NODE, else SLURM_MEM_PER_CPU x CPUs (MB units)."""
    found = None
    try:
        if "SLURM_MEM_PER_NODE" in environ:
            found = int(environ["SLURM_MEM_PER_NODE"]) * MIB
        elif "SLURM_MEM_PER_CPU" in environ:
            for key in ("SLURM_CPUS_ON_NODE", "SLURM_CPUS_PER_TASK", "SLURM_JOB_CPUS_PER_NODE"):
                if key in environ:
                    found = int(environ["SLURM_MEM_PER_CPU"]) * int(environ[key]) * MIB
                    break
    except ValueError:
        return None
    # --mem=0 means "all of the node's memory": no usable number, fall back to psutil
    return found if found is not None and found > 0 else None


def memory_budget(
    environ: Mapping[str, str], *, available_ram: int, cuda_free: int | None = None
) -> MemoryBudget:
    """CUDA free memory when sampling on a GPU; else SLURM's allocation; else available RAM."""
    if cuda_free is not None:
        return MemoryBudget(cuda_free, "cuda free memory", SHARED_SAFETY)
    slurm = slurm_bytes(environ)
    if slurm is not None:
        return MemoryBudget(slurm, "SLURM allocation", SLURM_SAFETY)
    return MemoryBudget(available_ram, "available RAM (psutil)", SHARED_SAFETY)


@dataclass(frozen=True)
class SamplingPlan:
    """How many posterior draws per batch, and whether a batch is drawn vectorised."""

    nsamples: int
    batch_size: int
    parallel: bool
    bytes_per_sample: int
    reason: str

    @property
    def n_batches(self) -> int:
        """Batches needed for all draws."""
        return -(-self.nsamples // self.batch_size)

    def batches(self) -> list[tuple[int, int]]:
        """(start, stop) of every batch."""
        return [
            (s, min(s + self.batch_size, self.nsamples))
            for s in range(0, self.nsamples, self.batch_size)
        ]


#: floats per (group + 1, feature) of one draw besides its parameters: the result arrays
#: derived from it (up to 8 of [C, T] for negbinom) and the guide's temporaries (its
#: per-feature noise, the affine map's [T, D, D] product), with room to spare
DRAW_FLOATS_PER_ENTRY = 16


def bytes_per_sample(n_cells: int, n_features: int, n_groups: int) -> int:
    """(2CT + 3T) floats of parameters + 16 (C + 1) T floats of results and temporaries.

    Nothing of size N: a draw never evaluates the likelihood, and the fit data is not
    loaded while sampling (the guide is restored from its stored parameters). Counting
    the reference's 4 NT floats of per-cell temporaries (6.4 GB a draw at 20,000 x
    20,000) made a genome-scale screen draw one sample at a time. `n_cells` is kept for
    the callers' shape (N, T, C) and does not enter.
    """
    params = (2 * n_groups * n_features + 3 * n_features) * BYTES_PER_FLOAT
    return params + DRAW_FLOATS_PER_ENTRY * (n_groups + 1) * n_features * BYTES_PER_FLOAT


def plan_sampling(
    *,
    nsamples: int,
    shape: tuple[int, int, int],
    budget: MemoryBudget,
    user_batch: int | None = None,
    max_batch: int | None = MAX_BATCH,
) -> SamplingPlan:
    """One vectorised draw when it fits; else batches of 10-100, parallel off.

    `shape` is (N cells, T features, C groups). A user-given batch size wins. Even when
    the whole draw fits, batches hold at most `max_batch` draws (None: no cap), so that
    sampling memory does not grow with nsamples (drawing in batches changes nothing else:
    the results are written batch by batch into preallocated arrays either way).
    """
    n_cells, n_features, n_groups = shape
    per_sample = bytes_per_sample(n_cells, n_features, n_groups)
    if user_batch is not None:
        batch = min(user_batch, nsamples)
        return SamplingPlan(nsamples, batch, True, per_sample, "batch size given by the user")
    at_once = int(budget.safe_bytes // per_sample)
    if at_once >= nsamples:
        reason = f"all {nsamples} draws fit in {budget.safe_bytes / 1e9:.2f} GB ({budget.source})"
        batch = nsamples if max_batch is None else min(nsamples, max_batch)
        if batch < nsamples:
            reason += f"; drawn {batch} at a time so memory does not grow with nsamples"
        return SamplingPlan(nsamples, batch, True, per_sample, reason)
    batch = max(MIN_BATCH, min(MAX_BATCH, at_once)) if at_once >= MIN_BATCH else max(1, at_once)
    reason = (
        f"{at_once} draws fit in {budget.safe_bytes / 1e9:.2f} GB ({budget.source}): "
        f"batches of {batch}, parallel off"
    )
    return SamplingPlan(nsamples, batch, False, per_sample, reason)


#: bytes per fit-matrix entry while fitting in memory: the float32 matrix as read, the
#: family's sorted working copy, and its masks / index arrays
FIT_BYTES_PER_ENTRY = 3 * BYTES_PER_FLOAT
#: a streamed fit holds the current batch, two read ahead, and a read buffer
STREAM_BUFFERS = 4
#: bytes per non-zero entry of a fit matrix held sparse (negbinom): the int32 row and
#: float32 value kept as the fit matrix, and ~4 more of temporaries while the likelihood's
#: statistics are built (in runs of columns); the statistics themselves are per (group,
#: feature), not per entry
SPARSE_BYTES_PER_NONZERO = 3 * BYTES_PER_FLOAT
#: per fit cell of a sparse fit matrix: its size factor and group code, and per cell
#: and feature of one block of SPARSE_BLOCK_FEATURES: the dense blocks the store is read
#: in and the priors are computed on (the block and its temporaries)
SPARSE_BYTES_PER_CELL = 4 * BYTES_PER_FLOAT
SPARSE_BLOCK_FEATURES = 512
SPARSE_BYTES_PER_BLOCK_ENTRY = 4 * BYTES_PER_FLOAT


@dataclass(frozen=True)
class FitPlan:
    """Whether the fit reads all fit cells at once or streams them in batches."""

    stream: bool
    batch_cells: int
    dense_bytes: int
    reason: str
    sparse: bool = False  # held in memory as its non-zeros


def sparse_bytes(nonzero: int, n_cells: int, n_features: int) -> int:
    """Bytes of a fit held in memory as its non-zeros (see SPARSE_BYTES_PER_NONZERO)."""
    block = n_cells * min(n_features, SPARSE_BLOCK_FEATURES) * SPARSE_BYTES_PER_BLOCK_ENTRY
    return nonzero * SPARSE_BYTES_PER_NONZERO + n_cells * SPARSE_BYTES_PER_CELL + block


def max_sparse_nonzero(budget: MemoryBudget, n_cells: int, n_features: int) -> int:
    """The most non-zeros whose sparse form fits `budget` (0 when not even the cells do)."""
    spare = budget.safe_bytes - sparse_bytes(0, n_cells, n_features)
    return max(0, int(spare // SPARSE_BYTES_PER_NONZERO))


def plan_fit(
    *,
    n_cells: int,
    entries_per_cell: int,
    budget: MemoryBudget,
    mode: str = "auto",
    batch_cells: int | None = None,
    nonzero: int | None = None,
) -> FitPlan:
    """Stream cells when the fit matrix does not fit the device's budget (`mode` auto), or
    always / never; `batch_cells` (when streaming) overrides the planned batch size.
    `entries_per_cell`: T (x K; x 2 with a denominator). `nonzero`: the fit matrix's
    non-zero entries, for a family that holds it sparse (negbinom): then what must fit is
    the sparse form (~12 B a non-zero instead of 12 B an entry); streamed batches are
    still read dense."""
    per_cell = entries_per_cell * FIT_BYTES_PER_ENTRY
    dense = n_cells * per_cell
    held = dense if nonzero is None else sparse_bytes(nonzero, n_cells, entries_per_cell)
    fits = held <= budget.safe_bytes
    where = f"{budget.safe_bytes / 1e9:.2f} GB ({budget.source})"
    if mode == "never" or (mode == "auto" and fits):
        form = "" if nonzero is None else f" as {nonzero:,} non-zeros"
        reason = f"{held / 1e9:.2f} GB fit in memory{form}; {where}"
        return FitPlan(False, n_cells, dense, reason, sparse=nonzero is not None)
    if batch_cells is not None:
        batch, why = batch_cells, "cells per batch given by the user"
    else:
        batch = int(budget.safe_bytes // (STREAM_BUFFERS * per_cell))
        why = f"{STREAM_BUFFERS} batches of {batch} cells fit in {where}"
    batch = max(1, min(batch, n_cells))
    needed = (
        "streaming asked for" if mode == "always" or fits else f"{held / 1e9:.2f} GB do not fit"
    )
    return FitPlan(True, batch, dense, f"{needed}: {why}")
