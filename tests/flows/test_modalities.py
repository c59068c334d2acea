"""One config with every distribution: each modality gets its own complete results."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml
import zarr
from PIL import Image

from bayesdream_model.simulate import (
    simulate_binomial,
    simulate_continuous,
    simulate_multinomial,
    simulate_negbinom_screen,
)
from flows.cli import main
from flows.technical_fit import technical_fit
from tasks.store import COMPLETE, results_key

N_CELLS, N_GROUPS, SEED = 240, 3, 4
LINES = ["HEL", "K562", "TF1"]  # sorted: code order


def _write_inputs(folder: Path) -> Path:
    """cells.csv plus gene (CSV), sj (CSR .npz + denominator), donor (.npy [T, N, K]),
    spliz (CSV with NaN) on the same cells, and a config naming all four."""
    gene = simulate_negbinom_screen(n_cells=N_CELLS, n_features=8, n_groups=N_GROUPS, seed=SEED)
    groups, cells = gene.groups, gene.cell_ids
    pd.DataFrame(
        {
            "cell": cells,
            "target": "ntc",
            "cell_line": np.array(LINES)[groups],
            "sum_factor": gene.sum_factor,
        }
    ).to_csv(folder / "cells.csv", index=False)
    pd.DataFrame(gene.counts, index=gene.feature_names, columns=cells).to_csv(folder / "gene.csv")
    names = {"sj": 6, "donor": 5, "spliz": 7}
    (folder / "cells.txt").write_text("\n".join(cells) + "\n")
    for name, count in names.items():
        (folder / f"{name}_names.txt").write_text(
            "\n".join(f"{name}{i}" for i in range(count)) + "\n"
        )
    sj = simulate_binomial(n_cells=N_CELLS, n_features=6, n_groups=N_GROUPS, seed=SEED)
    sj_y = _regroup(sj.y, sj.groups, groups)
    sj_n = np.maximum(_regroup(sj.denominator, sj.groups, groups), sj_y)
    sp.save_npz(folder / "sj.npz", sp.csr_matrix(sj_y))
    sp.save_npz(folder / "sj_den.npz", sp.csr_matrix(sj_n))
    donor = simulate_multinomial(n_cells=N_CELLS, n_features=5, n_groups=N_GROUPS, seed=SEED)
    np.save(folder / "donor.npy", _regroup(donor.y, donor.groups, groups))
    spliz = simulate_continuous(n_cells=N_CELLS, n_features=7, n_groups=N_GROUPS, seed=SEED)
    pd.DataFrame(
        _regroup(spliz.y, spliz.groups, groups),
        index=[f"spliz{i}" for i in range(7)],
        columns=cells,
    ).to_csv(folder / "spliz.csv")
    unnamed = {"cells": "cells.txt"}
    config = {
        "store": "run.zarr",
        "cells": "cells.csv",
        "covariates": ["cell_line"],
        "modalities": {
            "gene": {"distribution": "negbinom", "counts": "gene.csv"},
            "sj": {
                "distribution": "binomial",
                "counts": "sj.npz",
                "denominator": "sj_den.npz",
                "features": "sj_names.txt",
                **unnamed,
            },
            "donor": {
                "distribution": "multinomial",
                "counts": "donor.npy",
                "features": "donor_names.txt",
                **unnamed,
            },
            "spliz": {"distribution": "studentt", "counts": "spliz.csv"},
        },
        "fit": {"niters": 150, "nsamples": 20, "lr": 0.01},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _regroup(values: np.ndarray, own: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Columns reassigned so that cell n's column was simulated in group target[n]."""
    out = np.empty_like(values)
    for g in range(N_GROUPS):
        source = np.flatnonzero(own == g)
        dest = np.flatnonzero(target == g)
        out[:, dest] = values[:, np.resize(source, len(dest))]
    return out


@pytest.mark.slow  # end-to-end: five families in one run
def test_every_distribution_in_one_run(tmp_path: Path) -> None:
    config = _write_inputs(tmp_path)
    store = Path(technical_fit(str(config)))
    root = zarr.open_group(str(store), mode="r")
    assert root.attrs[COMPLETE] is True
    expected = {"gene": "negbinom", "sj": "binomial", "donor": "multinomial", "spliz": "studentt"}
    for name, distribution in expected.items():
        group = root[results_key(name)]
        assert group.attrs[COMPLETE] is True and group.attrs["distribution"] == distribution
        effects = group["alpha_y_add"][...]
        assert effects.shape[:2] == (20, N_GROUPS)
        assert np.isfinite(effects).all()
        assert (effects[:, 0] == 0).all()  # the baseline group is fixed
    assert root[results_key("donor")]["alpha_y"].ndim == 4  # [S, C, T, K]
    assert "alpha_y_mult" not in root[results_key("donor")]
    assert "sigma_y" in root[results_key("spliz")]
    # The CLI summary covers every distribution (per category for multinomial).
    out = tmp_path / "donor.csv"
    assert main(["summary", str(store), "--modality", "donor", "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert {"category", "mean", "q05", "q95", "excluded"} <= set(table.columns)
    assert len(table) == 5 * N_GROUPS * 4
    # The run's page: a loss trace and a figure per non-baseline group for every family,
    # each a PNG that decodes at its stated size
    page = (store.parent / f"{store.name}.reports" / "index.html").read_text()
    sources = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="([^"]+)"', page)
    assert sorted(alt for _, alt in sources) == sorted(
        f"{kind} {name}"
        for name in expected
        for kind in ("SVI loss of", "effects of K562 in", "effects of TF1 in")
    )
    for data, alt in sources:
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            image.load()
            assert image.format == "PNG" and min(image.size) > 100, alt


def test_one_modality_only(tmp_path: Path) -> None:
    config = _write_inputs(tmp_path)
    store = Path(technical_fit(str(config), modality="sj"))
    root = zarr.open_group(str(store), mode="r")
    assert root[results_key("sj")].attrs[COMPLETE] is True
    assert "technical" in root and "gene" not in root["technical"]
