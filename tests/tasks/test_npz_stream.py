"""The CSR .npz reader streams row blocks and matches scipy exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from tasks.ingest.npz_stream import StreamingCSRReader, is_streamable
from tasks.ingest.readers import open_matrix


def _matrix(seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = rng.poisson(0.3, size=(37, 53)).astype(np.int32)
    return sp.csr_matrix(dense)


@pytest.mark.parametrize("block", [1, 5, 37, 100])
def test_blocks_equal_scipy(tmp_path: Path, block: int) -> None:
    matrix = _matrix()
    path = tmp_path / "m.npz"
    sp.save_npz(path, matrix)
    reader = StreamingCSRReader(
        path, feature_names=np.arange(37).astype(str), cell_ids=np.arange(53).astype(str)
    )
    blocks = dict(reader.iter_feature_blocks(block))
    assert sorted(blocks) == list(range(0, 37, block))
    np.testing.assert_array_equal(np.concatenate(list(blocks.values())), matrix.toarray())


def test_duplicate_entries_are_summed_like_scipy(tmp_path: Path) -> None:
    rows, cols, vals = np.array([0, 0, 1]), np.array([2, 2, 0]), np.array([1.0, 2.0, 5.0])
    matrix = sp.csr_matrix((vals, (rows, cols)), shape=(2, 3))
    matrix = sp.csr_matrix((matrix.data, matrix.indices, matrix.indptr), shape=(2, 3))
    path = tmp_path / "dup.npz"
    sp.save_npz(path, matrix, compressed=False)
    reader = StreamingCSRReader(
        path, feature_names=np.array(["a", "b"]), cell_ids=np.array(["x", "y", "z"])
    )
    np.testing.assert_array_equal(next(reader.iter_feature_blocks(2))[1], matrix.toarray())


def test_only_csr_is_streamed(tmp_path: Path) -> None:
    matrix = _matrix()
    for kind, converted in [("csr", matrix), ("csc", matrix.tocsc()), ("coo", matrix.tocoo())]:
        path = tmp_path / f"{kind}.npz"
        sp.save_npz(path, converted)
        assert is_streamable(path) is (kind == "csr")


def test_open_matrix_streams_csr(tmp_path: Path) -> None:
    matrix = _matrix(1)
    path = tmp_path / "counts.npz"
    sp.save_npz(path, matrix)
    reader = open_matrix(
        path, features=[f"g{i}" for i in range(37)], cells=[f"c{j}" for j in range(53)]
    )
    assert isinstance(reader, StreamingCSRReader)
    dense = np.concatenate([b for _, b in reader.iter_feature_blocks(8)])
    np.testing.assert_array_equal(dense, matrix.toarray())


def test_version_2_headers_are_read(tmp_path: Path) -> None:
    """Archives written by other tools may use .npy format 2.0 headers."""
    import zipfile

    matrix = _matrix(2)
    path = tmp_path / "v2.npz"
    members = {
        "data": matrix.data,
        "indices": matrix.indices,
        "indptr": matrix.indptr,
        "format": np.array(b"csr"),
        "shape": np.array(matrix.shape),
    }
    with zipfile.ZipFile(path, "w") as archive:
        for name, value in members.items():
            with archive.open(f"{name}.npy", "w") as handle:
                np.lib.format.write_array(handle, value, version=(2, 0))
    assert is_streamable(path)
    reader = open_matrix(
        path, features=[f"g{i}" for i in range(37)], cells=[f"c{j}" for j in range(53)]
    )
    dense = np.concatenate([b for _, b in reader.iter_feature_blocks(10)])
    np.testing.assert_array_equal(dense, matrix.toarray())
