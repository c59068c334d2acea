"""Fitting without the whole fit matrix in memory: cells in batches, features in blocks.

A `CellSource` hands out the fit cells' data in two shapes: every cell for a block of
features (the empirical priors and initial values are per feature, so they are computed
block by block, exactly) and every fit feature for a batch of cells (the likelihood).
Families whose likelihood reads only per-group sums and tables (binomial, multinomial,
normal, negbinom) merge the batches' statistics once, exactly, and fit at full speed;
Student-t reads one batch per SVI step, its log-likelihood scaled by the number of
batches: each cell sits in exactly one batch and the batch is drawn uniformly, so the
objective and its gradient stay unbiased. Every pass over the source reads its next
piece in a background thread while the current one is computed on (`read_ahead`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Protocol, TypeVar

import numpy as np
import torch

from bayesdream_model.data import FitArrays, FitTensors
from bayesdream_model.distributions.base import Family
from bayesdream_model.sparse import as_sparse

log = logging.getLogger(__name__)
T = TypeVar("T")
_END = object()


def read_ahead(items: Iterable[T]) -> Iterator[T]:
    """The items of `items` in order, each next one produced in a background thread while
    the caller works on the current one: reading a piece of the store (decompression)
    overlaps computing on the last one, both releasing the GIL for most of their time.
    One piece is held beyond the current one; an error in producing one is raised here."""
    iterator = iter(items)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead") as pool:
        pending = pool.submit(next, iterator, _END)
        while (item := pending.result()) is not _END:
            pending = pool.submit(next, iterator, _END)
            yield item


class CellSource(Protocol):
    """The fit cells' data, never all at once."""

    n_cells: int
    n_features: int
    n_groups: int

    @property
    def n_batches(self) -> int:
        """How many batches of cells partition the fit cells."""

    def read_batch(self, index: int) -> FitArrays:
        """Batch `index`: its cells x every fit feature."""

    def feature_blocks(self) -> Iterator[FitArrays]:
        """Every fit cell x one block of features at a time, in feature order."""


class InMemoryCells:
    """A `CellSource` over arrays already in host memory (tests; a GPU smaller than RAM)."""

    def __init__(self, data: FitArrays, *, batch_cells: int, block_features: int = 512) -> None:
        self.data = data
        self.n_cells, self.n_features, self.n_groups = data.n_cells, data.n_features, data.n_groups
        self.bounds = even_bounds(data.n_cells, batch_cells)
        self.block_features = block_features
        self.sf_range = size_factor_range(data.sum_factor)

    @property
    def n_batches(self) -> int:
        """Number of cell batches."""
        return len(self.bounds) - 1

    def read_batch(self, index: int) -> FitArrays:
        """Contiguous rows."""
        rows = self.data.select_cells(slice(self.bounds[index], self.bounds[index + 1]))
        return replace(rows, sf_range=self.sf_range)

    def feature_blocks(self) -> Iterator[FitArrays]:
        """Contiguous columns."""
        for start in range(0, self.n_features, self.block_features):
            yield self.data.select_features(slice(start, start + self.block_features))


def size_factor_range(sum_factor: np.ndarray | None) -> tuple[float, float] | None:
    """(smallest, largest) size factor of the fit cells (`FitArrays.sf_range`)."""
    if sum_factor is None or len(sum_factor) == 0:
        return None
    return float(np.min(sum_factor)), float(np.max(sum_factor))


def even_bounds(n: int, batch: int) -> np.ndarray:
    """Boundaries of ceil(n / batch) nearly equal parts of range(n)."""
    parts = max(1, -(-n // max(1, batch)))
    return np.linspace(0, n, parts + 1).round().astype(np.int64)


def blockwise_inputs(family: Family, source: CellSource) -> tuple[dict, dict]:
    """Prior inputs and initial values, one feature block at a time (both are per feature,
    so the result equals the whole-matrix computation); scalars are taken once."""
    axis = -2 if family.spec.is_3d else -1
    priors: list[dict] = []
    inits: list[dict] = []
    done, next_report = 0, source.n_features / 10  # progress: about ten lines
    for block in read_ahead(source.feature_blocks()):
        if family.sparse_fit:
            block = replace(block, y=as_sparse(block.y))  # once for both
        block_priors, block_inits = family.fit_inputs(block)
        priors.append(block_priors)
        inits.append(block_inits)
        done += block.n_features
        if done >= next_report or done == source.n_features:
            log.info("priors of features 1-%d of %d computed", done, source.n_features)
            next_report = done + source.n_features / 10
    return _concat(priors, axis), _concat(inits, axis)


def _concat(parts: list[dict[str, torch.Tensor]], axis: int) -> dict[str, torch.Tensor]:
    """Per-feature entries joined along the feature axis; 0-d entries from the first part."""
    if not parts:
        return {}
    return {
        key: value if value.ndim == 0 else torch.cat([p[key] for p in parts], dim=axis)
        for key, value in parts[0].items()
    }


def merged_tensors(family: Family, source: CellSource, device) -> FitTensors | None:
    """The exact likelihood statistics of every fit cell, merged batch by batch, for the
    families whose likelihood reads only per-group sums; None for the others."""
    if not family.mergeable:
        return None
    merged: dict[str, torch.Tensor] | None = None
    every = max(1, source.n_batches // 10)  # progress: about ten lines
    batches = read_ahead(source.read_batch(index) for index in range(source.n_batches))
    for index, batch in enumerate(batches):
        part = family.tensors(batch, "cpu").stats
        merged = part if merged is None else family.merge_stats(merged, part)
        done = index + 1
        if done % every == 0 or done == source.n_batches:
            log.info("statistics of cell batch %d/%d merged", done, source.n_batches)
    return FitTensors(
        y=torch.empty(0, device=device),
        groups=torch.empty(0, dtype=torch.int64, device=device),
        n_groups=source.n_groups,
        stats={k: v.to(device) for k, v in merged.items()},
    )


class CellStream:
    """One batch of cells per SVI step, the next `ahead` batches read in background threads.

    Step s of epoch e = s // B reads batch perm_e[s % B], perm_e a permutation seeded by
    (seed, e): the batch is a function of the step alone, so a resumed fit reads the same
    batches as an uninterrupted one. `scale` (= B) makes the batch's log-likelihood an
    unbiased estimate of the whole. Reading (decompression) and the family's statistics
    release the GIL for most of their time, so two loads in flight use two cores.
    """

    def __init__(
        self, family: Family, source: CellSource, device, *, seed: int = 0, ahead: int = 2
    ) -> None:
        self.family, self.source, self.device, self.seed = family, source, device, seed
        self.ahead = ahead
        self.current: FitTensors | None = None
        self._pool = ThreadPoolExecutor(max_workers=max(1, ahead), thread_name_prefix="cells")
        self._pending: dict[int, Future] = {}

    @property
    def scale(self) -> float:
        """The number of batches."""
        return float(self.source.n_batches)

    def batch_index(self, step: int) -> int:
        """Which batch step `step` reads."""
        n = self.source.n_batches
        epoch, position = divmod(step, n)
        return int(np.random.default_rng([self.seed, epoch]).permutation(n)[position])

    def _load(self, step: int) -> FitTensors:
        return self.family.tensors(self.source.read_batch(self.batch_index(step)), self.device)

    def advance(self, step: int) -> None:
        """Make step `step`'s batch current and keep the next ones on their way."""
        for old in [s for s in self._pending if s < step]:  # after a jump (resume)
            self._pending.pop(old).cancel()
        pending = self._pending.pop(step, None)
        self.current = self._load(step) if pending is None else pending.result()
        for later in range(step + 1, step + 1 + self.ahead):
            if later not in self._pending:
                self._pending[later] = self._pool.submit(self._load, later)

    def each_batch(self) -> Iterator[None]:
        """Make every batch current in turn, in order (a full pass: the Laplace start)."""
        for index in range(self.source.n_batches):
            self.current = self.family.tensors(self.source.read_batch(index), self.device)
            yield
        self.current = None

    def close(self) -> None:
        """Stop reading ahead."""
        for pending in self._pending.values():
            pending.cancel()
        self._pool.shutdown(wait=True)
        self._pending, self.current = {}, None
