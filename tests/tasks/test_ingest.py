"""Ingestion: every reader stores the same counts, matched to the cells table by id."""

from __future__ import annotations

import gzip
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
import zarr

from tasks.config import RunConfig, config_from_dict
from tasks.errors import InputDataError
from tasks.ingest import check_modality, ingest_modality, open_matrix, read_cells_table, write_cells
from tasks.ingest.readers import ArrayReader
from tasks.store import CELLS, inputs_key, is_complete, open_root, read_strings

FEATURES = np.array(["f0", "NA", "f2", "f3", "f4", "f5", "GFI1B"])  # "NA" must stay a name
CELL_IDS = np.array([f"c{i}" for i in range(9)])
RNG = np.random.default_rng(7)
COUNTS = RNG.poisson(2.0, size=(len(FEATURES), len(CELL_IDS))).astype(np.float32)  # [T, N]
MATRIX_ORDER = RNG.permutation(len(CELL_IDS))  # column order in the matrix files
TABLE_IDS = np.concatenate([CELL_IDS[RNG.permutation(len(CELL_IDS))], ["c_extra"]])


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several blocks and chunks even for this tiny matrix."""
    monkeypatch.setattr("tasks.ingest.matrix.FEATURE_CHUNK", 3)
    monkeypatch.setattr("tasks.ingest.matrix.CELL_CHUNK", 4)


def expected_in_table_order(values: np.ndarray = COUNTS) -> np.ndarray:
    """The truth [T, N_table(, K)]: table column j holds cell TABLE_IDS[j]; c_extra is NaN."""
    out = np.full((values.shape[0], len(TABLE_IDS), *values.shape[2:]), np.nan, np.float32)
    for j, cell in enumerate(TABLE_IDS):
        if cell in CELL_IDS:
            out[:, j] = values[:, list(CELL_IDS).index(cell)]
    return out


def write_cells_csv(folder: Path, **columns: object) -> Path:
    """The cells table (TABLE_IDS order) with covariate and size factor."""
    n = len(TABLE_IDS)
    data = {
        "cell": TABLE_IDS,
        "target": ["ntc"] * (n - 2) + ["GFI1B"] * 2,
        "cell_line": ["K562", "HEL"] * (n // 2) + ["K562"] * (n % 2),
        "sum_factor": np.linspace(0.5, 1.5, n),
    }
    data.update(columns)
    path = folder / "cells.csv"
    pd.DataFrame(data).to_csv(path, index=False)
    return path


def make_config(folder: Path, modalities: dict, **top: object) -> RunConfig:
    """A RunConfig over files in `folder` (cells.csv written unless it exists)."""
    if not (folder / "cells.csv").exists():
        write_cells_csv(folder)
    data = {
        "store": "run.zarr",
        "cells": "cells.csv",
        "covariates": ["cell_line"],
        "modalities": modalities,
        **top,
    }
    return config_from_dict(data, folder)


def ingest_all(cfg: RunConfig) -> zarr.Group:
    """The whole ingestion, as the flow runs it: pre-flight first, then the writes."""
    table = read_cells_table(cfg)
    plans = {name: check_modality(cfg, name, table["cell"]) for name in cfg.modalities}
    root = open_root(cfg.store, create=True)
    write_cells(root, table, cfg.covariates, cfg.sum_factor_col)
    for name, plan in plans.items():
        ingest_modality(root, cfg, name, plan)
    return root


# --- writers: the same matrix (columns in MATRIX_ORDER) in every format ----------------


def _ordered(values: np.ndarray = COUNTS) -> tuple[np.ndarray, np.ndarray]:
    return values[:, MATRIX_ORDER], CELL_IDS[MATRIX_ORDER]


def _name_files(folder: Path, cells: np.ndarray) -> dict:
    (folder / "features.txt").write_text("\n".join(FEATURES) + "\n")
    (folder / "cells.txt").write_text("\n".join(cells) + "\n")
    return {"features": "features.txt", "cells": "cells.txt"}


def write_csv(folder: Path, name: str = "counts.csv", values: np.ndarray = COUNTS) -> dict:
    matrix, cells = _ordered(values)
    sep = "\t" if ".tsv" in name else ","
    pd.DataFrame(matrix, index=FEATURES, columns=cells).to_csv(folder / name, sep=sep)
    return {"counts": name}


def write_npy(folder: Path, values: np.ndarray = COUNTS) -> dict:
    matrix, cells = _ordered(values)
    np.save(folder / "counts.npy", matrix)
    return {"counts": "counts.npy", **_name_files(folder, cells)}


def _write_npz(kind: Callable) -> Callable[[Path], dict]:
    def write(folder: Path) -> dict:
        matrix, cells = _ordered()
        sp.save_npz(folder / "counts.npz", kind(matrix))
        return {"counts": "counts.npz", **_name_files(folder, cells)}

    return write


def write_mtx(folder: Path, *, gz: bool = False) -> dict:
    matrix, cells = _ordered()
    out = folder / "tenx"
    out.mkdir()
    scipy.io.mmwrite(out / "matrix.mtx", sp.coo_matrix(matrix))
    ids = [f"ENSG{i:05d}" for i in range(len(FEATURES))]
    rows = [f"{i}\t{n}\tGene Expression" for i, n in zip(ids, FEATURES, strict=True)]
    (out / "features.tsv").write_text("\n".join(rows) + "\n")
    (out / "barcodes.tsv").write_text("\n".join(cells) + "\n")
    if gz:
        for name in ("matrix.mtx", "features.tsv", "barcodes.tsv"):
            with open(out / name, "rb") as src, gzip.open(out / f"{name}.gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
            (out / name).unlink()
    return {"counts": "tenx"}


def _write_h5ad(kind: Callable | None) -> Callable[[Path], dict]:
    def write(folder: Path) -> dict:
        import anndata

        matrix, cells = _ordered()
        x = matrix.T if kind is None else kind(matrix.T)  # h5ad is cells x features
        adata = anndata.AnnData(
            X=x, obs=pd.DataFrame(index=pd.Index(cells)), var=pd.DataFrame(index=FEATURES)
        )
        adata.write_h5ad(folder / "counts.h5ad")
        return {"counts": "counts.h5ad"}

    return write


WRITERS = {
    "csv": write_csv,
    "tsv.gz": lambda folder: write_csv(folder, "counts.tsv.gz"),
    "npy": write_npy,
    "npz-csr": _write_npz(sp.csr_matrix),
    "npz-coo": _write_npz(sp.coo_matrix),
    "npz-csc-array": _write_npz(sp.csc_array),
    "mtx": write_mtx,
    "mtx.gz": lambda folder: write_mtx(folder, gz=True),
    "h5ad-dense": _write_h5ad(None),
    "h5ad-csr": _write_h5ad(sp.csr_matrix),
    "h5ad-csc": _write_h5ad(sp.csc_matrix),
}


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_every_format_stores_the_same_counts(tmp_path: Path, fmt: str) -> None:
    files = WRITERS[fmt](tmp_path)
    cfg = make_config(tmp_path, {"gene": {"distribution": "negbinom", **files}})
    root = ingest_all(cfg)
    group = root[inputs_key("gene")]
    np.testing.assert_array_equal(group["counts"][...], expected_in_table_order())
    np.testing.assert_array_equal(read_strings(group, "feature_names"), FEATURES)
    np.testing.assert_array_equal(group["present"][...], TABLE_IDS != "c_extra")
    assert group["counts"].chunks == (3, 4)
    assert group.attrs["distribution"] == "negbinom"
    assert group.attrs["source"] == str(tmp_path / files["counts"])
    assert is_complete(root, inputs_key("gene")) and is_complete(root, CELLS)


def test_default_chunks_follow_the_store_layout(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.undo()
    cfg = make_config(tmp_path, {"gene": {"distribution": "negbinom", **write_csv(tmp_path)}})
    counts = ingest_all(cfg)[inputs_key("gene")]["counts"]
    assert counts.chunks == (512, 8192)
    np.testing.assert_array_equal(counts[...], expected_in_table_order())


def test_readers_densify_one_block_at_a_time(tmp_path: Path) -> None:
    files = _write_npz(sp.coo_matrix)(tmp_path)
    reader = open_matrix(
        tmp_path / files["counts"], features=tmp_path / "features.txt", cells=tmp_path / "cells.txt"
    )
    blocks = list(reader.iter_feature_blocks(2))
    assert [start for start, _ in blocks] == [0, 2, 4, 6]
    assert [b.shape for _, b in blocks] == [(2, 9)] * 3 + [(1, 9)]
    assert all(b.dtype == np.float32 for _, b in blocks)


def test_missing_table_cells_are_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = make_config(tmp_path, {"gene": {"distribution": "negbinom", **write_csv(tmp_path)}})
    table = read_cells_table(cfg)
    with caplog.at_level(logging.WARNING):
        plan = check_modality(cfg, "gene", table["cell"])
    assert "1 of 10 cells in the cells table are absent" in caplog.text
    assert "c_extra" in caplog.text
    assert plan.present.sum() == 9


def test_multinomial_3d_npy(tmp_path: Path) -> None:
    values = RNG.poisson(3.0, size=(len(FEATURES), len(CELL_IDS), 3)).astype(np.float32)
    files = write_npy(tmp_path, values)
    cfg = make_config(tmp_path, {"iso": {"distribution": "multinomial", **files}})
    counts = ingest_all(cfg)[inputs_key("iso")]["counts"]
    assert counts.shape == (len(FEATURES), len(TABLE_IDS), 3)
    assert counts.chunks == (3, 4, 3)
    np.testing.assert_array_equal(counts[...], expected_in_table_order(values))


def test_binomial_with_denominator(tmp_path: Path) -> None:
    total = COUNTS + RNG.integers(0, 3, size=COUNTS.shape)
    files = write_csv(tmp_path)
    write_csv(tmp_path, "total.csv", total)
    cfg = make_config(
        tmp_path, {"sj": {"distribution": "binomial", **files, "denominator": "total.csv"}}
    )
    group = ingest_all(cfg)[inputs_key("sj")]
    np.testing.assert_array_equal(group["counts"][...], expected_in_table_order())
    np.testing.assert_array_equal(group["denominator"][...], expected_in_table_order(total))


def test_normal_keeps_missing_values(tmp_path: Path) -> None:
    values = COUNTS - 2.5
    values[1, 2] = np.nan
    values[3, 4] = -np.inf
    cfg = make_config(tmp_path, {"splz": {"distribution": "normal", **write_npy(tmp_path, values)}})
    counts = ingest_all(cfg)[inputs_key("splz")]["counts"][...]
    np.testing.assert_array_equal(counts, expected_in_table_order(values))


# --- bad matrices: a clear error, and nothing half-written -----------------------------


def assert_nothing_written(cfg: RunConfig, name: str) -> None:
    """Either no store at all (pre-flight) or no group for the modality."""
    if cfg.store.exists():
        root = open_root(cfg.store)
        assert inputs_key(name) not in root
        assert not is_complete(root, inputs_key(name))


def test_name_file_length_mismatch(tmp_path: Path) -> None:
    files = write_npy(tmp_path)
    (tmp_path / "features.txt").write_text("\n".join(FEATURES[:-1]))
    cfg = make_config(tmp_path, {"gene": {"distribution": "negbinom", **files}})
    with pytest.raises(InputDataError, match=r"features\.txt' lists 6 names .* has 7 rows"):
        ingest_all(cfg)
    (tmp_path / "features.txt").write_text("\n".join(FEATURES))
    (tmp_path / "cells.txt").write_text("\n".join(CELL_IDS[:5]))
    with pytest.raises(InputDataError, match=r"cells\.txt' lists 5 names .* has 9 columns"):
        ingest_all(cfg)
    assert_nothing_written(cfg, "gene")


def test_denominator_shape_mismatch_names_both(tmp_path: Path) -> None:
    files = write_csv(tmp_path)
    matrix, cells = _ordered()
    pd.DataFrame(matrix[:, :8], index=FEATURES, columns=cells[:8]).to_csv(tmp_path / "total.csv")
    cfg = make_config(
        tmp_path, {"sj": {"distribution": "binomial", **files, "denominator": "total.csv"}}
    )
    with pytest.raises(InputDataError) as info:
        ingest_all(cfg)
    message = str(info.value)
    assert "total.csv' has shape (7, 8)" in message and "counts.csv' have shape (7, 9)" in message
    assert_nothing_written(cfg, "sj")


def test_denominator_with_other_cell_order(tmp_path: Path) -> None:
    files = write_csv(tmp_path)
    pd.DataFrame(COUNTS, index=FEATURES, columns=CELL_IDS).to_csv(tmp_path / "total.csv")
    cfg = make_config(
        tmp_path, {"sj": {"distribution": "binomial", **files, "denominator": "total.csv"}}
    )
    with pytest.raises(InputDataError, match="cell ids of denominator .* differ from counts"):
        ingest_all(cfg)


def test_matrix_cells_missing_from_table(tmp_path: Path) -> None:
    write_cells_csv(tmp_path, cell=[*TABLE_IDS[:-3], "x1", "x2", "c_extra"])
    cfg = make_config(tmp_path, {"gene": {"distribution": "negbinom", **write_csv(tmp_path)}})
    with pytest.raises(InputDataError) as info:
        ingest_all(cfg)
    message = str(info.value)
    assert "counts.csv' has 2 cell id(s) that are not in the cells table" in message
    assert f"(first: ['{TABLE_IDS[-3]}', '{TABLE_IDS[-2]}'])" in message
    assert not cfg.store.exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda n: n.__setitem__(2, "f0"), r"1 duplicated feature names \(first: \['f0'\]\)"),
        (lambda n: None, r"cis_feature 'MYB' of modality 'gene' is not among the 7 feature"),
    ],
)
def test_feature_name_problems(tmp_path: Path, edit: Callable, message: str) -> None:
    files = write_npy(tmp_path)
    names = list(FEATURES)
    edit(names)
    (tmp_path / "features.txt").write_text("\n".join(names))
    cfg = make_config(
        tmp_path, {"gene": {"distribution": "negbinom", **files, "cis_feature": "MYB"}}
    )
    with pytest.raises(InputDataError, match=message):
        ingest_all(cfg)
    assert not cfg.store.exists()


def test_duplicate_matrix_cells(tmp_path: Path) -> None:
    files = write_npy(tmp_path)
    cells = list(CELL_IDS[MATRIX_ORDER])
    cells[1] = cells[0]
    (tmp_path / "cells.txt").write_text("\n".join(cells))
    cfg = make_config(tmp_path, {"gene": {"distribution": "negbinom", **files}})
    with pytest.raises(InputDataError, match="1 duplicated cell ids"):
        ingest_all(cfg)


def test_multinomial_needs_3d(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, {"iso": {"distribution": "multinomial", **write_npy(tmp_path)}})
    with pytest.raises(InputDataError, match=r"counts\.npy' has shape \(7, 9\), expected 3-D"):
        ingest_all(cfg)


@pytest.mark.parametrize(("value", "shown"), [(-1.0, "-1.0"), (np.nan, "nan"), (np.inf, "inf")])
def test_bad_count_values_name_the_entry(tmp_path: Path, value: float, shown: str) -> None:
    values = COUNTS.copy()
    values[4, 3] = value  # feature f4 in cell c3; in the second block of features
    cfg = make_config(
        tmp_path, {"gene": {"distribution": "negbinom", **write_npy(tmp_path, values)}}
    )
    with pytest.raises(InputDataError) as info:
        ingest_all(cfg)
    message = str(info.value)
    assert "counts.npy" in message and "non-negative counts" in message
    assert f"feature 'f4' in cell 'c3' is {shown}" in message
    assert_nothing_written(cfg, "gene")
    assert is_complete(open_root(cfg.store), CELLS)  # the cells group is not affected


def test_binomial_counts_above_denominator(tmp_path: Path) -> None:
    total = COUNTS.copy()
    total[6, 8] = COUNTS[6, 8] - 1 if COUNTS[6, 8] > 0 else -1
    total[6, 8] = max(total[6, 8], 0)
    values = COUNTS.copy()
    values[6, 8] = total[6, 8] + 2
    files = write_csv(tmp_path, "counts.csv", values)
    write_csv(tmp_path, "total.csv", total)
    cfg = make_config(
        tmp_path, {"sj": {"distribution": "binomial", **files, "denominator": "total.csv"}}
    )
    with pytest.raises(InputDataError) as info:
        ingest_all(cfg)
    message = str(info.value)
    assert "counts above their denominator ('" in message and "total.csv" in message
    assert f"feature 'GFI1B' in cell 'c8' is {values[6, 8]} > {total[6, 8]}" in message
    assert_nothing_written(cfg, "sj")


def test_non_numeric_csv_value(tmp_path: Path) -> None:
    write_csv(tmp_path)
    text = (tmp_path / "counts.csv").read_text().splitlines()
    text[5] = text[5].rsplit(",", 1)[0] + ",abc"
    (tmp_path / "counts.csv").write_text("\n".join(text) + "\n")
    cfg = make_config(tmp_path, {"gene": {"distribution": "negbinom", "counts": "counts.csv"}})
    with pytest.raises(InputDataError, match=r"Cannot parse '.*counts\.csv' in data rows"):
        ingest_all(cfg)
    assert_nothing_written(cfg, "gene")


def test_unsupported_or_dense_npz(tmp_path: Path) -> None:
    (tmp_path / "counts.parquet").write_text("")
    with pytest.raises(InputDataError, match="Unsupported matrix format 'counts.parquet'"):
        open_matrix(tmp_path / "counts.parquet")
    np.savez(tmp_path / "counts.npz", x=COUNTS)
    with pytest.raises(InputDataError, match="not a scipy.sparse .npz"):
        open_matrix(tmp_path / "counts.npz", features=FEATURES, cells=CELL_IDS)


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_numpy_matrix_is_converted(tmp_path: Path) -> None:
    matrix = np.asmatrix(COUNTS)
    reader = ArrayReader(matrix, path=tmp_path, feature_names=FEATURES, cell_ids=CELL_IDS)
    (_, block), *_ = reader.iter_feature_blocks(100)
    assert type(block) is np.ndarray and block.shape == COUNTS.shape
