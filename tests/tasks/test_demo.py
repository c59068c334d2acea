"""The demo inputs: a valid config over a simulated screen that ingests cleanly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tasks.config import load_config
from tasks.demo import group_labels, write_demo_inputs
from tasks.ingest import check_modality, ingest_modality, read_cells_table, write_cells
from tasks.store import inputs_key, open_root, read_strings


def test_group_labels_sort_in_code_order() -> None:
    for n in (1, 3, 9, 12):
        labels = group_labels(n)
        assert labels == sorted(labels) and len(set(labels)) == n


def test_demo_inputs_ingest(tmp_path: Path) -> None:
    config = write_demo_inputs(tmp_path / "demo", n_cells=80, n_features=12, n_groups=3)
    cfg = load_config(config)
    assert cfg.store == (tmp_path / "demo/results/run.zarr").resolve()
    assert cfg.modalities["gene"].cis_feature == "GFI1B"
    assert cfg.covariates == ["cell_line"] and cfg.fit.niters and cfg.fit.nsamples
    truth = np.load(tmp_path / "demo/truth.npz")
    labels = list(truth["group_labels"])
    assert labels == ["HEL", "K562", "TF1"] and truth["log2_alpha"].shape == (3, 12)

    table = read_cells_table(cfg)
    codes = table.groupby("cell_line").ngroup().to_numpy()
    np.testing.assert_array_equal(np.asarray(labels)[codes], table["cell_line"])
    assert set(table["target"]) <= {"ntc", "GFI1B", "MYB", "NFE2", "TAL1"}
    assert (table["target"] == "ntc").mean() > 0.5
    assert {"guide", "sum_factor"} <= set(table.columns)

    plan = check_modality(cfg, "gene", table["cell"])
    root = open_root(cfg.store, create=True)
    write_cells(root, table, cfg.covariates, cfg.sum_factor_col)
    group = ingest_modality(root, cfg, "gene", plan)
    counts = group["counts"][...]
    names = list(read_strings(root[inputs_key("gene")], "feature_names"))
    assert names == list(truth["feature_names"]) and "GFI1B" in names
    csv = pd.read_csv(tmp_path / "demo/gene_counts.csv", index_col=0)
    np.testing.assert_array_equal(counts, csv.to_numpy())
    zero, constant = str(truth["zero_feature"]), str(truth["constant_feature"])
    assert counts[names.index(zero)].sum() == 0
    assert np.unique(counts[names.index(constant)]).size == 1
    assert set(truth["filtered_features"]) == {zero, constant}
