"""Every input the model cannot take is refused in pre-flight, before anything is written.

Each case starts from a finished store of a good run (one module fixture, copied per
case), breaks one input, and runs the flow again: the error names the file, column,
feature or cell at fault, and the store is byte for byte what it was (a user loses
nothing to a bad input). Store locations that are not a bayesdream store are refused
without writing into them or deleting from them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
import zarr

from flows.technical_fit import technical_fit
from tasks.demo import write_demo_inputs
from tasks.errors import PipelineError, StoreError
from tasks.ingest.preflight import check_run
from tasks.lock import lock_path, store_lock
from tasks.steps import resolve_config
from tasks.store import COMPLETE

N_CELLS, N_FEATURES = 60, 8


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo folder whose store holds a complete earlier run."""
    config = write_demo_inputs(
        tmp_path_factory.mktemp("earlier") / "demo",
        n_cells=N_CELLS,
        n_features=N_FEATURES,
        niters=40,
        nsamples=5,
    )
    technical_fit(str(config))
    return config.parent


@pytest.fixture
def demo(finished: Path, tmp_path: Path) -> Path:
    """A copy of the finished demo (inputs and store) for one case to break."""
    shutil.copytree(finished, tmp_path / "demo")
    return tmp_path / "demo" / "config.yaml"


def tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` with a hash of its content."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def cells(config: Path) -> pd.DataFrame:
    return pd.read_csv(config.parent / "cells.csv", dtype={"cell_line": str})


def save_cells(config: Path, table: pd.DataFrame) -> None:
    table.to_csv(config.parent / "cells.csv", index=False)


def counts(config: Path) -> pd.DataFrame:
    return pd.read_csv(config.parent / "gene_counts.csv", index_col=0)


def edit(config: Path, change: Callable[[dict], None]) -> None:
    data = yaml.safe_load(config.read_text())
    change(data)
    config.write_text(yaml.safe_dump(data, sort_keys=False))


def add_modality(config: Path, name: str, **spec: object) -> None:
    edit(config, lambda d: d["modalities"].__setitem__(name, spec))


def unnamed(config: Path, stem: str, values: np.ndarray) -> dict[str, str]:
    """A .npy matrix with feature and cell name files over the demo's cells."""
    folder = config.parent
    np.save(folder / f"{stem}.npy", values)
    (folder / f"{stem}_features.txt").write_text(
        "\n".join(f"{stem}{t}" for t in range(values.shape[0])) + "\n"
    )
    (folder / f"{stem}_cells.txt").write_text("\n".join(counts(config).columns) + "\n")
    return {
        "counts": f"{stem}.npy",
        "features": f"{stem}_features.txt",
        "cells": f"{stem}_cells.txt",
    }


# -- the cases: each breaks one thing and returns the message it must produce ----------
def missing_column(config: Path) -> str:
    edit(config, lambda d: d.__setitem__("covariates", ["lane"]))
    return r"cells\.csv' is missing column\(s\) \['lane'\]; available columns: \['cell'"


def missing_covariate(config: Path) -> str:
    table = cells(config)
    table.loc[[2, 5], "cell_line"] = np.nan
    save_cells(config, table)
    return r"cells\.csv'.*column 'cell_line' has missing values in 2 cell\(s\) \(first at line\(s\) \[4, 7\]"


def duplicated_cell(config: Path) -> str:
    table = cells(config)
    table.loc[4, "cell"] = table.loc[3, "cell"]
    save_cells(config, table)
    return rf"cells\.csv' has 1 duplicated cell id.*'{table.loc[3, 'cell']}'"


def no_ntc_cells(config: Path) -> str:
    table = cells(config)
    table["target"] = table["target"].replace("ntc", "MYB")
    save_cells(config, table)
    return r"cells\.csv' has no NTC cells: no row of column 'target' is 'ntc' \(most common values: 'MYB'"


def uppercase_ntc(config: Path) -> str:
    table = cells(config)
    table["target"] = table["target"].replace("ntc", "NTC")
    save_cells(config, table)
    return r"has no NTC cells.*Did you mean \['NTC'\]\? The marker is exactly 'ntc'"


def bad_size_factor(config: Path) -> str:
    table = cells(config)
    table["sum_factor"] = table["sum_factor"].astype(object)
    table.loc[3, "sum_factor"], table.loc[6, "sum_factor"] = 0.0, "n/a"
    save_cells(config, table)
    return (
        rf"size-factor column 'sum_factor' must be finite and > 0.*2 cell.*'{table.loc[3, 'cell']}'"
    )


def no_rows(config: Path) -> str:
    save_cells(config, cells(config).iloc[:0])
    return r"cells\.csv' has no rows"


def group_without_ntc(config: Path) -> str:
    table = cells(config)
    table.loc[table["cell_line"] == "TF1", "target"] = "MYB"
    save_cells(config, table)
    edit(config, lambda d: d.__setitem__("groups_without_ntc", "error"))
    return r"Technical groups without NTC cells: \{'TF1': \d+\}"


def unknown_baseline_group(config: Path) -> str:
    edit(config, lambda d: d.__setitem__("baseline_group", "k562"))
    return (
        r"baseline_group 'k562' is not a technical group; the groups are 'HEL', 'K562', 'TF1'\."
        r".*Did you mean 'K562'\?"
    )


def baseline_group_without_ntc(config: Path) -> str:
    table = cells(config)
    table.loc[table["cell_line"] == "TF1", "target"] = "MYB"
    save_cells(config, table)
    edit(config, lambda d: d.__setitem__("baseline_group", "TF1"))
    n_cells = int((table["cell_line"] == "TF1").sum())
    return rf"baseline_group 'TF1' has no NTC cells: its {n_cells} cell\(s\) are dropped"


def group_missing_from_matrix(config: Path) -> str:
    table, matrix = cells(config), counts(config)
    hel_ntc = table.loc[(table["cell_line"] == "HEL") & (table["target"] == "ntc"), "cell"]
    matrix.drop(columns=hel_ntc).to_csv(config.parent / "gene_counts.csv")
    return (
        r"Modality 'gene': '.*gene_counts\.csv' has no NTC cells of technical group\(s\) \['HEL'\]"
    )


def negative_count(config: Path) -> str:
    matrix = counts(config)
    matrix.iloc[1, 4] = -3
    matrix.to_csv(config.parent / "gene_counts.csv")
    return rf"gene_counts\.csv'.*non-negative.*feature '{matrix.index[1]}' in cell '{matrix.columns[4]}' is -3"


def normalised_counts(config: Path) -> str:
    matrix = counts(config)
    (np.log1p(matrix)).to_csv(config.parent / "gene_counts.csv")
    return r"negbinom modality 'gene' needs whole counts, but feature '.*' in cell '.*' is \d+\.\d+"


def missing_count(config: Path) -> str:
    matrix = counts(config).astype(float)
    matrix.iloc[2, 7] = np.nan
    matrix.to_csv(config.parent / "gene_counts.csv")
    return rf"needs finite, non-negative counts, but feature '{matrix.index[2]}' in cell '{matrix.columns[7]}' is nan"


def text_in_counts(config: Path) -> str:
    matrix = counts(config).astype(object)
    matrix.iloc[3, 2] = "many"
    matrix.to_csv(config.parent / "gene_counts.csv")
    return r"Cannot parse '.*gene_counts\.csv' in data rows 1-\d+.*values must be numbers"


def unknown_cells(config: Path) -> str:
    matrix = counts(config)
    matrix.columns = [*matrix.columns[:-2], "ghost_1", "ghost_2"]
    matrix.to_csv(config.parent / "gene_counts.csv")
    return r"gene_counts\.csv' has 2 cell id\(s\) that are not in the cells table.*ghost_1"


def duplicated_feature(config: Path) -> str:
    matrix = counts(config)
    matrix.index = [matrix.index[1], *matrix.index[1:]]
    matrix.to_csv(config.parent / "gene_counts.csv")
    return rf"gene_counts\.csv' has 1 duplicated feature names \(first: \['{matrix.index[1]}'\]\)"


def empty_feature_name(config: Path) -> str:
    matrix = counts(config)
    matrix.index = ["", *matrix.index[1:]]
    matrix.to_csv(config.parent / "gene_counts.csv")
    return r"gene_counts\.csv' has 1 empty feature names \(first at position\(s\) \[0\]"


def absent_cis_feature(config: Path) -> str:
    edit(config, lambda d: d["modalities"]["gene"].__setitem__("cis_feature", "NOTAGENE"))
    return r"cis_feature 'NOTAGENE' of modality 'gene' is not among the \d+ feature names"


def short_feature_list(config: Path) -> str:
    matrix = counts(config)
    spec = unnamed(config, "gene2", matrix.to_numpy())
    lines = (config.parent / spec["features"]).read_text().splitlines()
    (config.parent / spec["features"]).write_text("\n".join(lines[:-1]) + "\n")
    add_modality(config, "gene2", distribution="negbinom", **spec)
    return rf"gene2_features\.txt' lists {len(matrix) - 1} names but matrix '.*gene2\.npy' has {len(matrix)} rows"


def object_npy(config: Path) -> str:
    spec = unnamed(config, "obj", counts(config).to_numpy())
    np.save(config.parent / "obj.npy", counts(config).to_numpy().astype(object), allow_pickle=True)
    add_modality(config, "obj", distribution="negbinom", **spec)
    return r"Cannot read '.*obj\.npy' as a numeric \.npy"


def dense_npz(config: Path) -> str:
    spec = unnamed(config, "dense", counts(config).to_numpy())
    np.savez(config.parent / "dense.npz", x=counts(config).to_numpy())
    add_modality(config, "dense", distribution="negbinom", **(spec | {"counts": "dense.npz"}))
    return r"dense\.npz' is not a scipy\.sparse \.npz"


def count_above_denominator(config: Path) -> str:
    matrix = counts(config).to_numpy()
    spec = unnamed(config, "sj", matrix)
    np.save(config.parent / "sj_den.npy", matrix + 1)
    den = np.load(config.parent / "sj_den.npy")
    den[2, 3] = matrix[2, 3] - 1 if matrix[2, 3] > 0 else 0
    matrix[2, 3] = max(matrix[2, 3], 1)
    np.save(config.parent / "sj.npy", matrix)
    np.save(config.parent / "sj_den.npy", den)
    add_modality(config, "sj", distribution="binomial", denominator="sj_den.npy", **spec)
    return r"binomial modality 'sj' has counts above their denominator .*feature 'sj2' in cell"


def denominator_shape(config: Path) -> str:
    matrix = counts(config).to_numpy()
    spec = unnamed(config, "sj", matrix)
    np.save(config.parent / "sj_den.npy", matrix[:-1])
    add_modality(config, "sj", distribution="binomial", denominator="sj_den.npy", **spec)
    return (
        r"denominator '.*sj_den\.npy' does not match the counts '.*sj\.npy' \(shape \(8, 60\)\);"
        r" they must have exactly the same shape.*has 7 rows"
    )


def one_category(config: Path) -> str:
    spec = unnamed(config, "donor", counts(config).to_numpy()[..., None])
    add_modality(config, "donor", distribution="multinomial", **spec)
    return r"multinomial needs K >= 2 categories on its last axis"


def flat_multinomial(config: Path) -> str:
    spec = unnamed(config, "donor", counts(config).to_numpy())
    add_modality(config, "donor", distribution="multinomial", **spec)
    return r"Modality 'donor' \(multinomial\): '.*donor\.npy' has shape \(\d+, \d+\), expected 3-D"


CASES: dict[str, Callable[[Path], str]] = {
    f.__name__.replace("_", "-"): f
    for f in (
        missing_column,
        missing_covariate,
        duplicated_cell,
        no_ntc_cells,
        uppercase_ntc,
        bad_size_factor,
        no_rows,
        group_without_ntc,
        unknown_baseline_group,
        baseline_group_without_ntc,
        group_missing_from_matrix,
        negative_count,
        normalised_counts,
        missing_count,
        text_in_counts,
        unknown_cells,
        duplicated_feature,
        empty_feature_name,
        absent_cis_feature,
        short_feature_list,
        object_npy,
        dense_npz,
        count_above_denominator,
        denominator_shape,
        one_category,
        flat_multinomial,
    )
}


def pre_flight(config: Path) -> None:
    """What a run does before it writes, in-process and without Prefect (~0.1 s, not the
    ~1.3 s of a flow run): read the config, take the store's lock, run every check."""
    cfg = resolve_config(str(config), [])
    with store_lock(cfg.store):
        check_run(cfg, list(cfg.modalities), logging.getLogger(__name__))


#: cases that run the whole flow as well: a cells-table, a matrix and a config fault (the
#: flow runs the same pre-flight first; these show it does, before anything is written)
THROUGH_THE_FLOW = ("missing-column", "negative-count", "unknown-baseline-group")


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_and_the_store_is_left_as_it_was(demo: Path, case: str) -> None:
    store = demo.parent / "results" / "run.zarr"
    before = tree(store)
    message = CASES[case](demo)
    with pytest.raises(PipelineError, match=message):
        if case in THROUGH_THE_FLOW:
            technical_fit(str(demo))
        else:
            pre_flight(demo)
    assert tree(store) == before
    assert zarr.open_group(str(store), mode="r").attrs[COMPLETE] is True
    assert not lock_path(store).exists()


# -- store locations that are not a bayesdream store -----------------------------------
def _other_files(folder: Path) -> str:
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / "data.csv").write_text("a,b\n1,2\n")
    return r"holds files of its own \('data\.csv', 'notes\.txt'\): it is not a bayesdream store"


def _zarr_v3_of_another_tool(folder: Path) -> str:
    zarr.open_group(str(folder), mode="w", zarr_format=3).create_array("x", shape=(3,), dtype="f4")
    return r"is another tool's Zarr store \(no bayesdream encoding-type"


def _zarr_v2(folder: Path) -> str:
    zarr.open_group(str(folder), mode="w", zarr_format=2).create_array("x", shape=(3,), dtype="f4")
    return r"holds a Zarr v2 store of its own"


def _a_file(folder: Path) -> str:
    folder.write_text("not a folder")
    return r"is a file, not a folder"


@pytest.mark.parametrize("make", [_other_files, _zarr_v3_of_another_tool, _zarr_v2, _a_file])
def test_store_that_is_not_ours_is_never_written_into(
    demo: Path, tmp_path: Path, make: Callable[[Path], str]
) -> None:
    target = tmp_path / "elsewhere"
    message = make(target)
    before = tree(target) if target.is_dir() else target.read_bytes()
    edit(demo, lambda cfg: cfg.update(store=str(target)))
    with pytest.raises(StoreError, match=message):
        if make is _other_files:  # one through the whole flow, the others its pre-flight
            technical_fit(str(demo))
        else:
            pre_flight(demo)
    assert (tree(target) if target.is_dir() else target.read_bytes()) == before


def test_a_failure_after_pre_flight_withdraws_the_completion_marks(demo: Path) -> None:
    """Past pre-flight the run writes: a failure there leaves nothing claiming complete for
    the old inputs, and the earlier results stay readable."""
    store = demo.parent / "results" / "run.zarr"
    matrix = counts(demo)
    matrix.iloc[:] = 7  # whole counts, but every feature constant: no feature left to fit
    matrix.to_csv(demo.parent / "gene_counts.csv")
    with pytest.raises(ValueError, match="excluded"):
        technical_fit(str(demo))
    root = zarr.open_group(str(store), mode="r")
    assert COMPLETE not in root.attrs
    assert not root["technical/gene"].attrs.get(COMPLETE)
    assert "alpha_y" in root["technical/gene"]


# -- what the terminal shows -------------------------------------------------------------
def _cli(config: Path, *extra: str) -> subprocess.CompletedProcess:
    from prefect.settings import get_current_settings

    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    url = get_current_settings().api.url
    if url:
        env["PREFECT_API_URL"] = str(url)  # the session's API: no server start per run
    command = [sys.executable, "-m", "flows.cli", "run", str(config), *extra]
    return subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=300, cwd=Path(__file__).parents[2]
    )


@pytest.mark.slow  # end-to-end: the CLI in child processes
def test_the_terminal_shows_the_one_message_and_debug_shows_tracebacks(demo: Path) -> None:
    cells_table = cells(demo)
    cells_table.loc[[2, 5], "cell_line"] = np.nan
    save_cells(demo, cells_table)
    plain = _cli(demo)
    assert plain.returncode == 2, plain.stderr
    errors = [line for line in plain.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "column 'cell_line' has missing values" in errors[0]
    assert "Traceback" not in plain.stderr and "Finished in state Failed" not in plain.stderr
    debug = _cli(demo, "--debug")
    assert debug.returncode == 2
    assert "Traceback" in debug.stderr and "InputDataError" in debug.stderr


def test_json_read_of_the_store_root_only(tmp_path: Path) -> None:
    """The location check reads the root's zarr.json as JSON: a planted file there is data."""
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "zarr.json").write_text(json.dumps({"attributes": {"encoding-type": "other"}}))
    from tasks.store import check_store_location

    with pytest.raises(StoreError, match=re.escape("encoding-type 'other'")):
        check_store_location(folder)
