"""The fit matrix held as its non-zeros: the container, and negbinom fitting from it.

`SparseCounts` must hand out exactly the dense matrix's columns and rows; negbinom's
filters (one dense block of features at a time), priors and initial values (from the
non-zeros, dense input made sparse first) must equal the dense ones bit for bit, and so
must its likelihood statistics and hence a fit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from factories import negbinom_screen

import bayesdream_model.distributions.negbinom as negbinom
from bayesdream_model import sparse_stats
from bayesdream_model.data import FitArrays
from bayesdream_model.distributions import get_family
from bayesdream_model.errors import ModelError
from bayesdream_model.fit import FitOptions, fit_technical
from bayesdream_model.sparse import SparseCounts
from bayesdream_model.stats import group_sums, robust_sd
from bayesdream_model.streaming import InMemoryCells, blockwise_inputs


def _matrix(seed: int = 0, shape: tuple[int, int] = (37, 11)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y = (rng.random(shape) < 0.3) * rng.poisson(4.0, shape).astype(np.float32)
    y[:, 2] = 0.0  # an empty column
    y[5] = 0.0  # an empty row
    return y.astype(np.float32)


@pytest.mark.parametrize("layout", ["C", "F", "strided"])
def test_entries_in_every_memory_layout(layout: str) -> None:
    """Row-major, column-major (the store's feature-major reads) and strided blocks give
    the same entries, column by column with cells increasing, as the dense matrix."""
    y = _matrix(shape=(37, 40))
    block = {"C": y, "F": np.asfortranarray(y), "strided": np.asfortranarray(y)[:, ::2]}[layout]
    sparse = SparseCounts.from_dense(block)
    cols, cells = np.nonzero(np.ascontiguousarray(block).T)
    np.testing.assert_array_equal(sparse.rows, cells)
    np.testing.assert_array_equal(sparse.column_of_entries(), cols)
    np.testing.assert_array_equal(sparse.dense(), block)


def test_round_trip_and_blocks() -> None:
    y = _matrix()
    sparse = SparseCounts.from_dense(y)
    assert sparse.shape == y.shape and sparse.nnz == np.count_nonzero(y)
    np.testing.assert_array_equal(sparse.dense(), y)
    joined = SparseCounts.from_blocks([y[:, :4], y[:, 4:9], y[:, 9:]], n_rows=y.shape[0])
    for field in ("indptr", "rows", "values"):
        np.testing.assert_array_equal(getattr(joined, field), getattr(sparse, field))
    blocks = [block for _, block in sparse.dense_blocks(4)]
    np.testing.assert_array_equal(np.concatenate(blocks, axis=1), y)


@pytest.mark.parametrize("width", [1, 4, 11, 50])
def test_feature_blocks_are_the_transposed_matrix_with_cells_placed(width: int) -> None:
    """Each block is [features, cells] in float64, cell n at column positions[n]; blocks
    share one buffer, so each is copied before the next is asked for."""
    y = _matrix()
    sparse = SparseCounts.from_dense(y)
    positions = np.random.default_rng(3).permutation(y.shape[0])
    for placed in (None, positions):
        starts, blocks = [], []
        for start, block in sparse.feature_blocks(width, placed):
            assert block.dtype == np.float64 and block.shape[0] <= width
            starts.append(start)
            blocks.append(block.copy())
        assert starts == list(range(0, y.shape[1], width))
        expected = y.T if placed is None else np.zeros_like(y.T)
        if placed is not None:
            expected[:, positions] = y.T
        np.testing.assert_array_equal(np.concatenate(blocks), expected)


@pytest.mark.parametrize(
    "keep",
    [
        slice(2, 9),
        slice(-3, None),
        slice(5, 100),
        slice(9, 2),  # empty
        slice(None, None, 3),
        np.array([7, 1, 2]),
        np.arange(11) % 2 == 0,
    ],
)
def test_select_features_equals_dense(keep) -> None:
    y = _matrix()
    np.testing.assert_array_equal(
        SparseCounts.from_dense(y).select_features(keep).dense(), y[:, keep]
    )


@pytest.mark.parametrize(
    "rows", [slice(3, 20), np.arange(37) % 3 == 0, np.random.default_rng(1).permutation(37)[:15]]
)
def test_select_rows_equals_dense(rows) -> None:
    y = _matrix()
    picked = SparseCounts.from_dense(y).select_rows(rows)
    np.testing.assert_array_equal(picked.dense(), y[rows])
    for lo, hi in zip(picked.indptr[:-1], picked.indptr[1:], strict=True):
        assert (np.diff(picked.rows[lo:hi]) > 0).all()  # rows increasing within a column


def test_blocks_of_the_wrong_shape_are_refused() -> None:
    with pytest.raises(ModelError, match="expected \\[5 cells, features\\]"):
        SparseCounts.from_blocks([np.zeros((4, 3))], n_rows=5)


def _sparse(data: FitArrays) -> FitArrays:
    return FitArrays(
        y=SparseCounts.from_dense(data.y),
        groups=data.groups,
        n_groups=data.n_groups,
        sum_factor=data.sum_factor,
    )


def _screen() -> FitArrays:
    data = negbinom_screen(n_cells=240, n_features=19, n_groups=3, seed=4)[1]
    return FitArrays(
        y=np.asarray(data.y, dtype=np.float32),
        groups=data.groups,
        n_groups=3,
        sum_factor=np.asarray(data.sum_factor, dtype=np.float32),
    )


def test_filters_priors_and_inits_from_sparse_equal_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 4 features (19 = 4 + 4 + 4 + 4 + 3), bit for bit."""
    monkeypatch.setattr(negbinom, "block_width", lambda n_cells: 4)
    family, dense = get_family("negbinom"), _screen()
    sparse = _sparse(dense)
    for name, flag in family.flags(dense).as_dict().items():
        np.testing.assert_array_equal(getattr(family.flags(sparse), name), flag, err_msg=name)
    for method in (family.prior_inputs, family.initial_values):
        want, got = method(dense), method(sparse)
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("n_cells", [40, 41])
def test_column_statistics_from_the_non_zeros_equal_the_dense_ones(
    n_cells: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Robust sd and group sums of y / sf from the entries alone, in pieces of ~30 entries,
    against the dense computation: features all zero, mostly zero (median and MAD 0: the
    plain sd), exactly half zero (the median is half the smallest non-zero), mostly
    non-zero, and constant (MAD 0 again). Equal to float64 round-off (1e-12)."""
    monkeypatch.setattr(sparse_stats, "CHUNK_ENTRIES", 30)
    rng = np.random.default_rng(7)
    shares = [0.0, 0.1, 0.3, 0.5, 0.9, 1.0]
    y = np.zeros((n_cells, len(shares) + 1), dtype=np.float32)
    for t, share in enumerate(shares):
        rows = rng.permutation(n_cells)[: round(share * n_cells) if share != 0.5 else n_cells // 2]
        y[rows, t] = 1 + rng.poisson(3.0, rows.size)
    y[:, -1] = 2.0  # constant
    sf = rng.lognormal(0.0, 0.3, n_cells)
    groups = rng.integers(0, 3, n_cells)
    sparse = SparseCounts.from_dense(y)
    dense = y / sf[:, None]
    np.testing.assert_allclose(
        sparse_stats.scaled_robust_sd(sparse, sf, epsilon=1e-6),
        robust_sd(dense, epsilon=1e-6),
        rtol=1e-12,
        atol=1e-15,
    )
    np.testing.assert_allclose(
        sparse_stats.scaled_group_sums(sparse, sf, groups, 3),
        group_sums(dense, groups, 3),
        rtol=1e-12,
    )


def test_fit_from_sparse_equals_fit_from_dense() -> None:
    dense = _screen()
    options = FitOptions(niters=30, seed=3, guide="feature_mvn")
    family = get_family("negbinom")
    losses = [fit_technical(family, d, options).svi.losses for d in (dense, _sparse(dense))]
    np.testing.assert_array_equal(losses[1], losses[0])


def test_sparse_cells_stream_in_batches() -> None:
    """An in-memory source over a sparse matrix hands out the dense batches and blocks."""
    dense = _screen()
    source = InMemoryCells(_sparse(dense), batch_cells=70, block_features=7)
    joined = np.concatenate([source.read_batch(k).y.dense() for k in range(source.n_batches)])
    np.testing.assert_array_equal(joined, dense.y)
    family = get_family("negbinom")
    priors, _ = blockwise_inputs(family, source)
    torch.testing.assert_close(priors["mu_mean"], family.prior_inputs(dense)["mu_mean"])
