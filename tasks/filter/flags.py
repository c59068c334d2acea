"""The NTC feature filters: computed a block of features at a time (or with Dask over the
store's chunks), written to `prep/<modality>/`, read back by the later steps."""

from __future__ import annotations

import logging

import numpy as np
import zarr

from bayesdream_model.distributions import FilterFlags
from bayesdream_model.errors import NoFeaturesLeftError
from tasks.filter.distributed import dask_flags, on_dask_worker, store_path
from tasks.groups import GroupAssignment
from tasks.selection import read_selection, select_fit
from tasks.store import (
    FEATURE,
    FEATURE_CHUNK,
    fresh_group,
    inputs_key,
    mark_complete,
    prep_key,
    read_strings,
    write_array,
    write_coordinates,
)

logger = logging.getLogger(__name__)


def filter_features(
    root: zarr.Group,
    name: str,
    groups: GroupAssignment,
    log: logging.Logger | None = None,
    *,
    use_dask: bool | None = None,
) -> FilterFlags:
    """The feature filters (docs/model.md, section 4) on the fit cells; writes `prep/<name>/`
    (complete last).

    `use_dask`: compute the flags with Dask over the store's chunks (`tasks.filter.distributed`,
    the same values); None (default) does so when this runs on a Dask worker, i.e. when the
    flow runs with a DaskTaskRunner.
    """
    log = log or logger
    distribution = root[inputs_key(name)].attrs["distribution"]
    if use_dask if use_dask is not None else on_dask_worker():
        log.info("Modality '%s': filter statistics computed with Dask", name)
        flags = dask_flags(store_path(root), name, groups, distribution)
    else:
        flags = block_flags(root, name, groups)
    excluded = flags.ntc_excluded_from_fit
    if excluded.all():
        raise NoFeaturesLeftError(
            f"Modality '{name}': all {len(excluded)} features were excluded by the NTC filters "
            f"({_reasons(flags)}); check that the matrix holds NTC cells with counts."
        )
    group = fresh_group(root, prep_key(name), "bayesdream-filters", distribution=distribution)
    for flag, values in flags.as_dict().items():
        write_array(group, flag, values, dims=(FEATURE,))
    write_coordinates(group, features=read_strings(root[inputs_key(name)], "feature_names"))
    mark_complete(group)
    if excluded.any():
        log.warning(
            "Modality '%s': %d features excluded (%s)", name, excluded.sum(), _reasons(flags)
        )
    return flags


def block_flags(root: zarr.Group, name: str, groups: GroupAssignment) -> FilterFlags:
    """The family's flags, one block of features at a time (every filter is per feature),
    so memory holds [fit cells x FEATURE_CHUNK], never the whole fit matrix."""
    selection = select_fit(root, name, groups)  # the fit cells, read once for every block
    n_features = len(selection.features)
    parts = [
        selection.family.flags(
            read_selection(
                root, selection, features=np.arange(s, min(s + FEATURE_CHUNK, n_features))
            )
        )
        for s in range(0, n_features, FEATURE_CHUNK)
    ]
    return FilterFlags(
        *(
            np.concatenate([getattr(p, f) for p in parts])
            for f in ("ntc_zero_count", "ntc_zero_std", "ntc_single_category")
        )
    )


def _reasons(flags: FilterFlags) -> str:
    """Count each exclusion reason."""
    return ", ".join(
        f"{name}: {int(values.sum())}"
        for name, values in flags.as_dict().items()
        if name.startswith("ntc_") and name != "ntc_excluded_from_fit"
    )


def read_flags(root: zarr.Group, name: str) -> FilterFlags:
    """The flags written by `filter_features`."""
    group = root[prep_key(name)]
    return FilterFlags(
        ntc_zero_count=group["ntc_zero_count"][...],
        ntc_zero_std=group["ntc_zero_std"][...],
        ntc_single_category=group["ntc_single_category"][...],
    )
