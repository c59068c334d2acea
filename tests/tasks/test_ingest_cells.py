"""The cells table: refused before any store is written when the fit cannot use it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.config import RunConfig, config_from_dict
from tasks.errors import InputDataError
from tasks.ingest import read_cells_table, write_cells
from tasks.store import CELLS, is_complete, open_root, read_strings

IDS = np.array([f"cell{i}" for i in range(8)])


def cells_csv(folder: Path, drop: tuple[str, ...] = (), **columns: object) -> None:
    """cells.csv with cell, target, cell_line, sum_factor (edited by `columns`)."""
    data = {
        "cell": IDS,
        "target": ["ntc"] * 6 + ["GFI1B"] * 2,
        "cell_line": ["K562", "HEL"] * 4,
        "sum_factor": np.linspace(0.5, 1.5, len(IDS)),
    }
    data.update(columns)
    pd.DataFrame(data).drop(columns=list(drop)).to_csv(folder / "cells.csv", index=False)


def config(folder: Path, distribution: str = "negbinom", **top: object) -> RunConfig:
    """A config whose one modality file exists (the cells checks never open it)."""
    (folder / "counts.csv").touch()
    data = {
        "store": "run.zarr",
        "cells": "cells.csv",
        "covariates": ["cell_line"],
        "modalities": {"m": {"distribution": distribution, "counts": "counts.csv"}},
        **top,
    }
    return config_from_dict(data, folder)


def test_missing_column_lists_available(tmp_path: Path) -> None:
    cells_csv(tmp_path)
    with pytest.raises(InputDataError) as info:
        read_cells_table(config(tmp_path, covariates=["cell_line", "lane"]))
    message = str(info.value)
    assert "cells.csv' is missing column(s) ['lane']" in message
    assert "available columns: ['cell', 'target', 'cell_line', 'sum_factor']" in message
    assert "check `covariates:`" in message


def test_size_factor_needed_only_for_negbinom(tmp_path: Path) -> None:
    cells_csv(tmp_path, drop=("sum_factor",))
    with pytest.raises(InputDataError, match=r"missing column\(s\) \['sum_factor'\]"):
        read_cells_table(config(tmp_path))
    cfg = config(tmp_path, "normal")
    table = read_cells_table(cfg)
    group = write_cells(open_root(cfg.store, create=True), table, cfg.covariates, "sum_factor")
    assert np.isnan(group["sum_factor"][...]).all()


def test_custom_size_factor_column(tmp_path: Path) -> None:
    cells_csv(tmp_path, drop=("sum_factor",), sf=np.ones(len(IDS)))
    table = read_cells_table(config(tmp_path, sum_factor_col="sf"))
    assert table["sf"].dtype == np.float64


def test_duplicate_cell_ids(tmp_path: Path) -> None:
    cells_csv(tmp_path, cell=[*IDS[:-1], IDS[0]])
    with pytest.raises(InputDataError, match=r"1 duplicated cell id\(s\) .*first: \['cell0'\]"):
        read_cells_table(config(tmp_path))


def test_missing_covariate_values_are_refused(tmp_path: Path) -> None:
    cells_csv(tmp_path, cell_line=["K562", None, "HEL", "", "HEL", "HEL", "K562", "HEL"])
    with pytest.raises(InputDataError) as info:
        read_cells_table(config(tmp_path))
    message = str(info.value)
    assert "cells.csv" in message
    assert "column 'cell_line' has missing values in 2 cell(s) (first at line(s) [3, 5])" in message
    assert "would become its own technical group" in message


@pytest.mark.parametrize("bad", [0.0, -1.0, np.nan, np.inf, "abc"])
def test_bad_size_factors(tmp_path: Path, bad: object) -> None:
    sf: list[object] = list(np.linspace(0.5, 1.5, len(IDS)))
    sf[3] = sf[5] = bad
    cells_csv(tmp_path, sum_factor=sf)
    with pytest.raises(InputDataError) as info:
        read_cells_table(config(tmp_path))
    message = str(info.value)
    assert "size-factor column 'sum_factor' must be finite and > 0" in message
    assert "2 cell(s) are not" in message and "first: ['cell3', 'cell5']" in message


def test_no_rows(tmp_path: Path) -> None:
    (tmp_path / "cells.csv").write_text("cell,target,cell_line,sum_factor\n")
    with pytest.raises(InputDataError, match="has no rows"):
        read_cells_table(config(tmp_path))


def test_write_cells_round_trip(tmp_path: Path) -> None:
    cells_csv(tmp_path, cell_line=["1", "2"] * 4)  # numeric-looking labels stay text
    cfg = config(tmp_path)
    table = read_cells_table(cfg)
    root = open_root(cfg.store, create=True)
    group = write_cells(root, table, cfg.covariates, cfg.sum_factor_col)
    assert is_complete(root, CELLS) and group.attrs["covariates"] == ["cell_line"]
    np.testing.assert_array_equal(read_strings(group, "cell"), IDS)
    np.testing.assert_array_equal(read_strings(group, "target"), table["target"])
    np.testing.assert_allclose(group["sum_factor"][...], np.linspace(0.5, 1.5, len(IDS)))
    np.testing.assert_array_equal(read_strings(group["covariates"], "cell_line"), ["1", "2"] * 4)
