"""From a notebook: the technical fit of an AnnData / MuData object in memory.

    from flows.notebook import run
    result = run(adata, store="results/run.zarr", covariates=["cell_line"],
                 modalities={"gene": {"distribution": "negbinom", "layer": "counts"}})
    result.xarray("gene")      # the posterior, labelled (draw, group, feature)
    result.anndata("gene")     # the effects, as `bayesdream export --out effects.h5ad`

`run` writes the object to `<store>.inputs/` (`tasks.ingest.in_memory`), builds the config a
user would have written for that file and runs the same flow, `technical_fit`, on it:
the same validation, the same store, reruns skipping unchanged steps. Errors are the
project's exceptions with the flow's messages, plus a line that says what their file
and config keys are in terms of `run`'s arguments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from flows.technical_fit import technical_fit
from tasks.errors import PipelineError
from tasks.ingest import in_memory
from tasks.results.export import effects_anndata
from tasks.results.run_page import page_path
from tasks.results.summary import effect_summary
from tasks.store import results_key

Guide = Literal["auto", "mean_field", "feature_mvn", "iaf"]


@dataclass(frozen=True)
class RunResult:
    """A finished run's store, opened as xarray or as the exported AnnData on demand."""

    store: Path
    modalities: tuple[str, ...]
    inputs: Path  # the file the run read: the object as it was fitted

    def xarray(self, modality: str) -> Any:
        """`technical/<modality>` as an xarray.Dataset (lazy; dims draw, group, feature)."""
        import xarray as xr

        self._check(modality)
        return xr.open_zarr(self.store, group=results_key(modality), consolidated=False)

    def anndata(self, modality: str) -> Any:
        """The effects as `bayesdream export --out effects.h5ad` writes them, in memory:
        var = features (filter flags), varm = alpha_mean / sd / q05 / q95 [features x groups]."""
        self._check(modality)
        return effects_anndata(effect_summary(str(self.store), modality), store=str(self.store))

    @property
    def page(self) -> Path:
        """The run's page, `<store>.reports/index.html`
        (`webbrowser.open(result.page.as_uri())` opens it)."""
        return page_path(self.store)

    def _check(self, modality: str) -> None:
        if modality not in self.modalities:
            raise PipelineError(
                f"Modality '{modality}' is not in this run's store '{self.store}'; "
                f"it has {list(self.modalities)}."
            )

    def __repr__(self) -> str:
        return f"RunResult(store='{self.store}', modalities={list(self.modalities)})"


def run(
    data: Any,
    *,
    store: str | Path,
    covariates: Sequence[str],
    modalities: Mapping[str, Mapping[str, Any]] | None = None,
    cis_feature: str | None = None,
    baseline_group: str | None = None,
    cells_modality: str | None = None,
    sum_factor_col: str = "sum_factor",
    guide: Guide = "auto",
    fit: Mapping[str, Any] | None = None,
) -> RunResult:
    """Fit the technical model to `data` (AnnData or MuData) and return its results.

    The cells table is `data.obs` (MuData: the global obs, or `data[cells_modality].obs`):
    `target`, the `covariates` and `sum_factor_col` are its columns, its index the cell id.
    `modalities` maps each modality's name to the config's keys for it: `distribution`
    (default negbinom), `layer` (X, raw or a `layers` name), `modality` (MuData; default:
    the name itself), `denominator_layer` (binomial), `cis_feature`. Without it: one negbinom
    modality `gene` from X, or one per MuData modality. `cis_feature` goes to the first
    modality; `fit` holds the config's `fit:` options (`guide` is `fit.guide`).
    """
    store = Path(store).expanduser().resolve()
    written = in_memory.write_object(data, store)
    config = _config(data, written.path, store=store, covariates=covariates, modalities=modalities)
    config |= {"baseline_group": baseline_group, "cells_modality": cells_modality}
    config |= {"sum_factor_col": sum_factor_col, "fit": {"guide": guide, **(fit or {})}}
    if cis_feature is not None:
        first = next(iter(config["modalities"].values()))
        first["cis_feature"] = cis_feature
    try:
        done = technical_fit(config)
    except PipelineError as err:
        in_memory.discard(written, store)
        raise _restated(err, _in_run_terms(data, written.path)) from err
    in_memory.prune(written)
    return RunResult(Path(done), tuple(config["modalities"]), written.path)


def _config(
    data: Any,
    path: Path,
    *,
    store: Path,
    covariates: Sequence[str],
    modalities: Mapping[str, Mapping[str, Any]] | None,
) -> dict[str, Any]:
    """The config a user would write for the object's file."""
    return {
        "store": str(store),
        "cells": str(path),
        "covariates": list(covariates),
        "modalities": in_memory.modality_entries(data, modalities, path),
    }


def _restated(err: PipelineError, note: str) -> PipelineError:
    """The same exception class and message, the note on a line of its own."""
    try:
        return type(err)(f"{err}\n{note}")
    except TypeError:  # a class whose constructor takes more than a message
        return err


def _in_run_terms(data: Any, path: Path) -> str:
    """The line added to a flow error: its file is the object, its keys run()'s arguments."""
    return (
        f"(In run(): '{path.name}' is where run() wrote the {type(data).__name__} it was "
        "given, its obs is data.obs; `covariates:`, `modalities:`, `layer:`, `cis_feature:` "
        "and `fit.*` are run()'s arguments of those names.)"
    )
