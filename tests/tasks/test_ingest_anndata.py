"""AnnData and MuData in, as they are: files written by `anndata` and `mudata` themselves."""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections import namedtuple
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from tasks.config import config_from_dict
from tasks.errors import ConfigError, InputDataError, PipelineError
from tasks.ingest import (
    check_modality,
    csr_transpose,
    ingest_modality,
    open_matrix,
    read_cells_table,
    write_cells,
)
from tasks.store import inputs_key, open_root, read_strings

shutil_usage = namedtuple("shutil_usage", "total used free")
N_CELLS, N_FEATURES = 30, 11
RNG = np.random.default_rng(11)
COUNTS = RNG.poisson(1.5, size=(N_CELLS, N_FEATURES)).astype(np.float32)  # cells x features
CELL_IDS = np.array([f"cell{i:02d}" for i in range(N_CELLS)])
GENES = np.array([f"g{t}" for t in range(N_FEATURES)])
LINES = np.array(["K562", "HEL", "TF1"])[np.arange(N_CELLS) % 3]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several feature blocks and store chunks even for this small matrix."""
    monkeypatch.setattr("tasks.ingest.matrix.FEATURE_CHUNK", 4)
    monkeypatch.setattr("tasks.ingest.matrix.CELL_CHUNK", 8)


def _obs(order: np.ndarray | None = None) -> pd.DataFrame:
    """The cells table as an obs: categorical target and cell line, float size factors."""
    obs = pd.DataFrame(
        {
            "target": pd.Categorical(["ntc"] * (N_CELLS - 6) + ["GFI1B"] * 6),
            "cell_line": pd.Categorical(LINES),
            "sum_factor": np.linspace(0.5, 1.5, N_CELLS),
            "n_genes": RNG.integers(100, 200, N_CELLS),  # a column the fit does not read
        },
        index=pd.Index(CELL_IDS, name="barcode"),
    )
    return obs if order is None else obs.iloc[order]


def _adata(layer=sp.csr_matrix, order: np.ndarray | None = None) -> ad.AnnData:
    """Normalised X, raw counts in `layers["counts"]` (encoded by `layer`), and a raw."""
    rows = np.arange(N_CELLS) if order is None else order
    counts = COUNTS[rows]
    adata = ad.AnnData(
        X=np.log1p(counts),
        obs=_obs(order),
        var=pd.DataFrame({"symbol": GENES}, index=GENES),
        layers={"counts": layer(counts)},
    )
    raw = ad.AnnData(
        X=sp.csr_matrix(np.hstack([counts, counts[:, :2] + 1])),
        obs=adata.obs,
        var=pd.DataFrame(index=np.concatenate([GENES, ["extra0", "extra1"]])),
    )
    adata.raw = raw
    return adata


def _write(adata: ad.AnnData, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata: zarr v2 will stop being the default
        if path.suffix == ".zarr":
            adata.write_zarr(path)
        else:
            adata.write_h5ad(path)
    return path


def _config(folder: Path, modalities: dict, **top: object):
    data = {"store": "run.zarr", "covariates": ["cell_line"], "modalities": modalities, **top}
    data.setdefault("cells", "screen.h5ad")
    return config_from_dict(data, folder)


def _ingest(cfg):
    table = read_cells_table(cfg)
    plans = {name: check_modality(cfg, name, table["cell"]) for name in cfg.modalities}
    root = open_root(cfg.store, create=True)
    write_cells(root, table, cfg.covariates, cfg.sum_factor_col)
    for name, plan in plans.items():
        ingest_modality(root, cfg, name, plan)
    return root, table


ENCODINGS = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "dense": np.asarray}


@pytest.mark.parametrize("suffix", [".h5ad", ".zarr"])
@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_anndata_obs_and_counts_layer_as_they_are(
    tmp_path: Path, suffix: str, encoding: str
) -> None:
    """`cells:` and `counts:` name the same AnnData; the store holds the layer, not X."""
    path = _write(_adata(ENCODINGS[encoding]), tmp_path / f"screen{suffix}")
    cfg = _config(
        tmp_path,
        {"gene": {"distribution": "negbinom", "counts": path.name, "layer": "counts"}},
        cells=path.name,
    )
    root, table = _ingest(cfg)
    np.testing.assert_array_equal(table["cell"], CELL_IDS)
    np.testing.assert_array_equal(table["target"], _obs()["target"].astype(str))
    np.testing.assert_array_equal(table["cell_line"], LINES)
    np.testing.assert_allclose(table["sum_factor"], _obs()["sum_factor"])
    group = root[inputs_key("gene")]
    np.testing.assert_array_equal(group["counts"][...], COUNTS.T)
    np.testing.assert_array_equal(read_strings(group, "feature_names"), GENES)
    assert group.attrs["layer"] == "counts"
    np.testing.assert_array_equal(read_strings(root["inputs/cells"], "cell"), CELL_IDS)


@pytest.mark.parametrize(
    ("layer", "expected", "features"),
    [
        (None, np.log1p(COUNTS), GENES),
        ("X", np.log1p(COUNTS), GENES),
        ("raw", np.hstack([COUNTS, COUNTS[:, :2] + 1]), [*GENES, "extra0", "extra1"]),
    ],
)
def test_x_and_raw_layers(tmp_path: Path, layer, expected, features) -> None:
    """X by default; `layer: raw` reads raw.X with raw.var's (longer) feature list."""
    _write(_adata(), tmp_path / "screen.h5ad")
    modality = {"distribution": "normal", "counts": "screen.h5ad"}
    if layer is not None:
        modality["layer"] = layer
    root, _ = _ingest(_config(tmp_path, {"score": modality}))
    group = root[inputs_key("score")]
    np.testing.assert_allclose(group["counts"][...], expected.T.astype(np.float32))
    np.testing.assert_array_equal(read_strings(group, "feature_names"), features)


def test_matrix_cells_matched_to_the_table_by_id(tmp_path: Path) -> None:
    """A counts file with its cells in another order (and one fewer) than the cells table."""
    _write(_adata(), tmp_path / "screen.h5ad")
    order = RNG.permutation(N_CELLS)[:-1]
    _write(_adata(sp.csr_matrix, order=order), tmp_path / "other.h5ad")
    cfg = _config(
        tmp_path, {"gene": {"distribution": "negbinom", "counts": "other.h5ad", "layer": "counts"}}
    )
    root, _ = _ingest(cfg)
    stored = root[inputs_key("gene")]["counts"][...]
    missing = np.setdiff1d(np.arange(N_CELLS), order)
    np.testing.assert_array_equal(stored[:, order], COUNTS[order].T)
    assert np.isnan(stored[:, missing]).all()


def test_csr_layer_read_in_slices_never_whole(tmp_path: Path, monkeypatch) -> None:
    """CSR is cells-major: one pass reads `data`/`indices` a slice at a time, spilling the
    feature buckets to temporary files when they exceed one dense block."""
    path = _write(_adata(sp.csr_matrix), tmp_path / "screen.h5ad")
    monkeypatch.setattr(csr_transpose, "SLICE_ENTRIES", 40)
    spill_root = tmp_path / "tmp"
    spill_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill_root))
    reads: list[int] = []
    real = csr_transpose._bucket_rows

    def spy(group, indptr, rows, *args):
        reads.append(int(indptr[rows[1]] - indptr[rows[0]]))
        return real(group, indptr, rows, *args)

    monkeypatch.setattr(csr_transpose, "_bucket_rows", spy)
    reader = open_matrix(path, layer="counts")
    blocks = list(reader.iter_feature_blocks(3))  # 3 x 30 x 4 B = 360 B < nnz x 10 B: spill
    nnz = int((COUNTS > 0).sum())
    assert sum(reads) == nnz and max(reads) <= 40 + N_FEATURES and len(reads) > 5
    assert [start for start, _ in blocks] == [0, 3, 6, 9]
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), COUNTS.T)
    assert all(b.dtype == np.float32 for _, b in blocks)
    assert list(spill_root.iterdir()) == []  # the temporary buckets are gone


def test_csr_buckets_in_memory_or_spilled_agree(tmp_path: Path, caplog) -> None:
    """Within the budget the buckets stay in memory; beyond it they go to temporary files."""
    path = _write(_adata(sp.csr_matrix), tmp_path / "screen.h5ad")
    with h5py.File(path, "r") as handle, caplog.at_level(logging.INFO):
        layer = handle["layers/counts"]
        kept = list(
            csr_transpose.feature_blocks(
                layer, COUNTS.shape, block_rows=4, budget_bytes=10**6, label="L"
            )
        )
        assert "temporary files" not in caplog.text
        spilled = list(
            csr_transpose.feature_blocks(
                layer, COUNTS.shape, block_rows=4, budget_bytes=0, label="L"
            )
        )
        assert "L is cells-major (CSR)" in caplog.text and "temporary files" in caplog.text
    for (start_a, a), (start_b, b) in zip(kept, spilled, strict=True):
        assert start_a == start_b
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.concatenate([b for _, b in kept]), COUNTS.T)


def test_csr_spill_refused_without_disk(tmp_path: Path, monkeypatch) -> None:
    path = _write(_adata(sp.csr_matrix), tmp_path / "screen.h5ad")
    monkeypatch.setattr(
        csr_transpose.shutil, "disk_usage", lambda _: shutil_usage(total=100, used=90, free=10)
    )
    with pytest.raises(PipelineError, match=r"point TMPDIR at a larger disk"):
        list(open_matrix(path, layer="counts").iter_feature_blocks(2))


def test_mudata_global_obs_feeds_every_modality(tmp_path: Path) -> None:
    """One .h5mu: the global obs is the cells table; two modalities come from the file."""
    import mudata as md

    rna = _adata()
    scores = RNG.normal(size=(N_CELLS, 4)).astype(np.float32)
    prot = ad.AnnData(
        X=scores,
        obs=pd.DataFrame(index=CELL_IDS),
        var=pd.DataFrame(index=[f"p{i}" for i in range(4)]),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # mudata 0.3: pull_on_update
        mdata = md.MuData({"rna": rna, "prot": prot})
        for column in ("target", "cell_line", "sum_factor"):
            mdata.obs[column] = _obs()[column].to_numpy()
        mdata.write(tmp_path / "screen.h5mu")
    cfg = _config(
        tmp_path,
        {
            "gene": {
                "distribution": "negbinom",
                "counts": "screen.h5mu",
                "modality": "rna",
                "layer": "counts",
            },
            "adt": {"distribution": "normal", "counts": "screen.h5mu", "modality": "prot"},
        },
        cells="screen.h5mu",
    )
    root, table = _ingest(cfg)
    np.testing.assert_array_equal(table["cell_line"], LINES)
    np.testing.assert_array_equal(root[inputs_key("gene")]["counts"][...], COUNTS.T)
    np.testing.assert_array_equal(root[inputs_key("adt")]["counts"][...], scores.T)
    np.testing.assert_array_equal(
        read_strings(root[inputs_key("adt")], "feature_names"), ["p0", "p1", "p2", "p3"]
    )


def test_mudata_cells_from_a_modality_obs(tmp_path: Path) -> None:
    import mudata as md

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        md.MuData({"rna": _adata()}).write(tmp_path / "screen.h5mu")
    cfg = _config(
        tmp_path,
        {"gene": {"distribution": "negbinom", "counts": "screen.h5mu", "modality": "rna"}},
        cells="screen.h5mu",
        cells_modality="rna",
    )
    table = read_cells_table(cfg)
    np.testing.assert_array_equal(table["cell"], CELL_IDS)
    np.testing.assert_array_equal(table["cell_line"], LINES)


def test_binomial_counts_and_denominator_layers(tmp_path: Path) -> None:
    total = COUNTS + RNG.poisson(2.0, COUNTS.shape).astype(np.float32)
    adata = ad.AnnData(
        X=sp.csr_matrix(COUNTS),
        obs=_obs(),
        var=pd.DataFrame(index=GENES),
        layers={"junction": sp.csr_matrix(COUNTS), "total": sp.csc_matrix(total)},
    )
    _write(adata, tmp_path / "screen.h5ad")
    sj = {
        "distribution": "binomial",
        "counts": "screen.h5ad",
        "layer": "junction",
        "denominator": "screen.h5ad",
        "denominator_layer": "total",
    }
    root, _ = _ingest(_config(tmp_path, {"sj": sj}))
    np.testing.assert_array_equal(root[inputs_key("sj")]["denominator"][...], total.T)
    np.testing.assert_array_equal(root[inputs_key("sj")]["counts"][...], COUNTS.T)


# --- bad input: a clear error naming the file, key, layer or column, nothing written ----


def test_unknown_layer_lists_the_layers_there(tmp_path: Path) -> None:
    _write(_adata(), tmp_path / "screen.h5ad")
    with pytest.raises(ConfigError) as err:
        _config(
            tmp_path,
            {"gene": {"distribution": "negbinom", "counts": "screen.h5ad", "layer": "count"}},
        )
    message = str(err.value)
    assert "modalities.gene" in message and "no layer 'count'" in message
    assert "['X', 'raw', 'counts']" in message and str(tmp_path / "screen.h5ad") in message
    assert not (tmp_path / "run.zarr").exists()


def test_mudata_modality_required_and_checked(tmp_path: Path) -> None:
    import mudata as md

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mudata 0.3: pull_on_update; shared var names
        md.MuData({"rna": _adata(), "atac": _adata()}).write(tmp_path / "screen.h5mu")
    gene = {"distribution": "negbinom", "counts": "screen.h5mu"}
    with pytest.raises(ConfigError, match=r"MuData file with modalities \['atac', 'rna'\]"):
        _config(tmp_path, {"gene": gene}, cells="screen.h5mu", cells_modality="rna")
    with pytest.raises(ConfigError, match=r"has no modality 'rn'; its modalities are"):
        _config(tmp_path, {"gene": {**gene, "modality": "rn"}}, cells="screen.h5mu")
    with pytest.raises(ConfigError, match=r"cells: .* has no modality 'prot'"):
        _config(
            tmp_path,
            {"gene": {**gene, "modality": "rna"}},
            cells="screen.h5mu",
            cells_modality="prot",
        )


def test_selectors_only_for_anndata_files(tmp_path: Path) -> None:
    pd.DataFrame(COUNTS.T, index=GENES, columns=CELL_IDS).to_csv(tmp_path / "counts.csv")
    _obs().rename_axis("cell").reset_index().to_csv(tmp_path / "cells.csv", index=False)
    gene = {"distribution": "negbinom", "counts": "counts.csv", "layer": "counts"}
    with pytest.raises(ConfigError, match=r"`layer:`/`modality:` select a matrix in AnnData"):
        _config(tmp_path, {"gene": gene}, cells="cells.csv")
    gene.pop("layer")
    with pytest.raises(ConfigError, match=r"`cells_modality: rna` picks a MuData modality"):
        _config(tmp_path, {"gene": gene}, cells="cells.csv", cells_modality="rna")


def test_obs_missing_column_names_the_obs(tmp_path: Path) -> None:
    adata = _adata()
    adata.obs = adata.obs.drop(columns="sum_factor")
    _write(adata, tmp_path / "screen.h5ad")
    cfg = _config(tmp_path, {"gene": {"distribution": "negbinom", "counts": "screen.h5ad"}})
    with pytest.raises(InputDataError) as err:
        read_cells_table(cfg)
    message = str(err.value)
    assert f"'{tmp_path / 'screen.h5ad'}' (obs) is missing column(s) ['sum_factor']" in message
    assert "n_genes" in message and "sum_factor_col" in message


def test_obs_missing_covariate_names_the_cells(tmp_path: Path) -> None:
    adata = _adata()
    lines = adata.obs["cell_line"].astype(object).to_numpy()
    lines[[3, 7]] = np.nan
    adata.obs["cell_line"] = pd.Categorical(lines)
    _write(adata, tmp_path / "screen.h5ad")
    cfg = _config(tmp_path, {"gene": {"distribution": "negbinom", "counts": "screen.h5ad"}})
    with pytest.raises(
        InputDataError,
        match=r"'cell_line' has missing values in 2 cell\(s\) "
        r"\(first in cell\(s\) \['cell03', 'cell07'\]\)",
    ):
        read_cells_table(cfg)


def test_obs_cell_column_must_agree_with_the_index(tmp_path: Path) -> None:
    adata = _adata()
    adata.obs["cell"] = CELL_IDS[::-1]
    _write(adata, tmp_path / "screen.h5ad")
    cfg = _config(tmp_path, {"gene": {"distribution": "negbinom", "counts": "screen.h5ad"}})
    with pytest.raises(InputDataError, match=r"column 'cell' that differs from its index"):
        read_cells_table(cfg)


def test_duplicated_var_names_suggest_the_anndata_fix(tmp_path: Path) -> None:
    adata = _adata()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # anndata: var_names not unique
        adata.var_names = ["g0", "g0", *GENES[2:]]
    _write(adata, tmp_path / "screen.h5ad")
    cfg = _config(tmp_path, {"gene": {"distribution": "negbinom", "counts": "screen.h5ad"}})
    table = read_cells_table(cfg)
    with pytest.raises(InputDataError, match=r"adata.var_names_make_unique\(\)"):
        check_modality(cfg, "gene", table["cell"])


def test_not_an_hdf5_file(tmp_path: Path) -> None:
    (tmp_path / "screen.h5ad").write_text("not hdf5")
    _obs().rename_axis("cell").reset_index().to_csv(tmp_path / "cells.csv", index=False)
    with pytest.raises(ConfigError, match=r"is not an HDF5 file"):
        _config(
            tmp_path,
            {"gene": {"distribution": "negbinom", "counts": "screen.h5ad"}},
            cells="cells.csv",
        )


def test_cells_modality_on_an_anndata_file(tmp_path: Path) -> None:
    _write(_adata(), tmp_path / "screen.h5ad")
    with pytest.raises(ConfigError, match=r"`cells_modality: rna` cannot be read from it"):
        _config(
            tmp_path,
            {"gene": {"distribution": "negbinom", "counts": "screen.h5ad"}},
            cells_modality="rna",
        )


def test_layer_and_modality_are_part_of_the_ingest_fingerprint(tmp_path: Path) -> None:
    """Another layer of the same file is another input: ingestion (and all after) reruns."""
    from tasks.fingerprint import fingerprints

    _write(_adata(), tmp_path / "screen.h5ad")
    gene = {"distribution": "negbinom", "counts": "screen.h5ad"}
    plain = fingerprints(_config(tmp_path, {"gene": gene}))
    counts = fingerprints(_config(tmp_path, {"gene": {**gene, "layer": "counts"}}))
    assert plain.cells == counts.cells
    assert plain.ingest["gene"] != counts.ingest["gene"]
    assert plain.sample["gene"] != counts.sample["gene"]
