"""The one module that owns the Zarr store layout.

```
<store>/                          attrs: encoding-type, encoding-version, config
  inputs/cells/                   cell, target, sum_factor [N]; covariates/<col> [N]
  inputs/<modality>/              counts [T, N(, K)] float32, chunked (features, cells)
                                  denominator (binomial), feature_names [T], present [N]
  prep/groups/                    code, fit [N] (code -1 = not fit), labels [C]
  prep/<modality>/                <flag> [T] bool (ntc_zero_count, ntc_zero_std, ...),
                                  feature [T]
  fit/<modality>/                 params/<pyro param name>, loss; attrs: guide, niters_run …
  technical/<modality>/           results (see the README), attr complete: true written last
  technical/cis/                  the cis feature's results
```
Every group carries `encoding-type` / `encoding-version`; a step counts as finished only
when its group has `complete: true`, written after every array.

Every array records Zarr v3 `dimension_names` (`draw`, `group`, `feature`, `category`,
`cell`, ...), and the groups that hold results also hold 1-D coordinate arrays named like
their dimension (`feature` = feature names, `group` = group labels, `category`, `draw`),
so that `xarray.open_zarr(store, group="technical/<m>", consolidated=False)` reads a
group as a Dataset with labelled dimensions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from tasks.errors import StoreError

ENCODING_VERSION = "0.1.0"
FEATURE_CHUNK = 512
CELL_CHUNK = 8192

INPUTS = "inputs"
CELLS = f"{INPUTS}/cells"
GROUPS = "prep/groups"
COMPLETE = "complete"

# Dimension names (Zarr v3 `dimension_names`; xarray's dims).
DRAW = "draw"  # posterior draw, S
#: per-feature flags of the fit (in fit/<m>/flags over fit features, in technical/<m> over
#: all): no count in the baseline group while other groups have some (the data bound its
#: effects from one side only); kept the initial values at the Laplace start
FIT_FLAGS = ("baseline_no_counts", "start_not_converged")
GROUP = "group"  # technical group, C (code order, group 0 = baseline)
NONBASELINE_GROUP = "nonbaseline_group"  # groups 1..C-1: the raw effect sites
FEATURE = "feature"  # T
CATEGORY = "category"  # K (multinomial)
CELL = "cell"  # cells of the cells table, N
STEP = "step"  # SVI step (loss traces)
FIT_FEATURE = "fit_feature"  # features that are fit (indices into the modality's)
# Coordinate arrays: 1-D, named like the dimension they label.
COORDINATES = frozenset({DRAW, GROUP, NONBASELINE_GROUP, FEATURE, CATEGORY, CELL})


def inputs_key(modality: str) -> str:
    """Group holding a modality's ingested matrix."""
    return f"{INPUTS}/{modality}"


def prep_key(modality: str) -> str:
    """Group holding a modality's filter flags."""
    return f"prep/{modality}"


def fit_key(modality: str) -> str:
    """Group holding a modality's fitted guide parameters and loss trace."""
    return f"fit/{modality}"


def results_key(modality: str) -> str:
    """Group holding a modality's posterior results."""
    return f"technical/{modality}"


CIS_KEY = "technical/cis"

#: the groups every modality has, by store key
MODALITY_GROUPS = (inputs_key, prep_key, fit_key, results_key)
#: groups at fixed keys, beside the modalities' own: what each holds
FIXED_GROUPS = {
    CELLS: "the cells table",
    GROUPS: "the technical group assignment",
    CIS_KEY: "the cis feature's results",
}


def reserved_modality_names() -> dict[str, str]:
    """Modality names whose own group would be a fixed group, or hold one: {name: key}.

    A modality's groups are `<parent>/<name>` (`inputs/<name>`, `prep/<name>`, ...), so a
    modality named `groups` would write its filter flags into `prep/groups`, the group
    assignment; derived from the layout, so that a fixed group added later is reserved too.
    """
    reserved = {}
    for group_key in MODALITY_GROUPS:
        parent = group_key("_").rpartition("/")[0] + "/"
        for key in FIXED_GROUPS:
            if key.startswith(parent):
                reserved[key.removeprefix(parent).split("/")[0]] = key
    return dict(sorted(reserved.items()))


RUN_ENCODING = "bayesdream-run"
SHOW = 5  # entries of a folder quoted in a message


def open_root(store: str | Path, *, create: bool = False) -> zarr.Group:
    """Open the run store; with `create`, make it (marked with its encoding) if absent.

    Only a folder that is a bayesdream store, or an empty or new one (with `create`), is
    opened: `check_store_location` refuses anything else, so that nothing is ever written
    into, or deleted from, a folder of someone else's files or another tool's store.
    """
    path = Path(store)
    if not create and not (path / "zarr.json").exists():
        raise StoreError(
            f"No bayesdream store at '{path}': run `bayesdream run <config>` first, "
            "or check the `store:` path in the config."
        )
    check_store_location(path)
    if not (path / "zarr.json").exists():
        # one write: a kill cannot leave a root without its encoding (which would then
        # be refused as another tool's store)
        attributes = {"encoding-type": RUN_ENCODING, "encoding-version": ENCODING_VERSION}
        return zarr.create_group(str(path), zarr_format=3, attributes=attributes)
    return zarr.open_group(str(path), mode="a", zarr_format=3)


def check_store_location(path: Path) -> None:
    """`path` is new, an empty folder, or a bayesdream store; else a `StoreError` that says
    what is there. Reads only the root's `zarr.json` (as JSON) and the folder's listing."""
    if not path.exists():
        return
    if not path.is_dir():
        raise StoreError(
            f"Store '{path}' is a file, not a folder: `store:` must name a new or empty "
            "folder, or an earlier run's store (e.g. results/run.zarr)."
        )
    entries = sorted(entry.name for entry in os.scandir(path))
    if not entries:
        return
    if "zarr.json" not in entries:
        kind = "a Zarr v2 store" if {".zgroup", ".zarray"} & set(entries) else "files"
        raise _foreign(path, f"holds {kind} of its own ({_quote(entries)})")
    try:
        meta = json.loads((path / "zarr.json").read_text())
        attrs = meta.get("attributes", {}) if isinstance(meta, dict) else {}
    except (OSError, ValueError) as err:
        raise _foreign(path, f"has an unreadable zarr.json ({err})") from None
    if not isinstance(attrs, dict) or attrs.get("encoding-type") != RUN_ENCODING:
        found = attrs.get("encoding-type") if isinstance(attrs, dict) else None
        what = f"encoding-type '{found}'" if found else "no bayesdream encoding-type"
        raise _foreign(path, f"is another tool's Zarr store ({what}; holds {_quote(entries)})")
    version = str(attrs.get("encoding-version", ""))
    if version.split(".")[:2] != ENCODING_VERSION.split(".")[:2]:
        raise StoreError(
            f"Store '{path}' was written by a bayesdream-pipeline of store encoding "
            f"{version or 'unknown'}, this one writes {ENCODING_VERSION}; give this run a new "
            "`store:` (the old store is left as it is)."
        )


def _foreign(path: Path, what: str) -> StoreError:
    return StoreError(
        f"Store '{path}' {what}: it is not a bayesdream store, and a run never writes into "
        "or deletes from such a folder. Give `store:` a new or empty folder, e.g. "
        f"'{path / 'bayesdream.zarr'}'."
    )


def _quote(entries: list[str]) -> str:
    shown = ", ".join(f"'{e}'" for e in entries[:SHOW])
    return shown + (f" and {len(entries) - SHOW} more" if len(entries) > SHOW else "")


def fresh_group(root: zarr.Group, key: str, encoding: str, **attrs: Any) -> zarr.Group:
    """Replace `key` by an empty group that records its encoding (never marked complete)."""
    if key in root:
        del root[key]
    group = root.require_group(key)
    group.attrs.update({"encoding-type": encoding, "encoding-version": ENCODING_VERSION, **attrs})
    return group


def is_complete(root: zarr.Group, key: str) -> bool:
    """True when `key` exists and its `complete` attribute was written."""
    return key in root and bool(root[key].attrs.get(COMPLETE, False))


def is_unchanged(root: zarr.Group, key: str, fingerprint: str) -> bool:
    """The group is complete and was written from the same inputs: its step can be skipped."""
    return is_complete(root, key) and root[key].attrs.get("fingerprint") == fingerprint


def mark_complete(group: zarr.Group) -> None:
    """Written last: the group's arrays are all there."""
    group.attrs[COMPLETE] = True


def require_complete(root: zarr.Group, key: str, step: str) -> zarr.Group:
    """Return the group at `key`, or explain which step must run first."""
    if not is_complete(root, key):
        raise StoreError(
            f"Store key '{key}' in '{root.store}' is missing or incomplete; "
            f"the {step} step must finish first."
        )
    return root[key]


def generic_dims(name: str, ndim: int) -> tuple[str, ...]:
    """Dimension names for an array with no named axes: `<name>_dim_0`, ... (as xarray's
    `dim_0`), unique to the array so that unrelated arrays never share a dimension."""
    return tuple(f"{name}_dim_{i}" for i in range(ndim))


def _checked_dims(name: str, dims: Sequence[str], shape: tuple[int, ...]) -> tuple[str, ...]:
    """One name per axis: a mismatch is a bug in the caller, caught before writing."""
    dims = tuple(dims)
    if len(dims) != len(shape):
        raise ValueError(f"array '{name}' has shape {shape} but dimension names {dims}")
    return dims


def write_strings(group: zarr.Group, name: str, values: Any, *, dims: Sequence[str]) -> zarr.Array:
    """A variable-length UTF-8 string array (portable across zarr-v3 readers)."""
    values = np.asarray(values, dtype=str)
    arr = group.create_array(
        name,
        shape=values.shape,
        dtype=str,
        overwrite=True,
        dimension_names=_checked_dims(name, dims, values.shape),
    )
    if values.size:
        arr[...] = values
    return arr


def write_array(
    group: zarr.Group, name: str, values: np.ndarray, *, dims: Sequence[str], **kwargs: Any
) -> zarr.Array:
    """A whole small array (flags, labels, loss) in one write."""
    values = np.asarray(values)
    fill = np.nan if values.dtype.kind == "f" else None
    arr = group.create_array(
        name,
        shape=values.shape,
        dtype=values.dtype,
        fill_value=fill,
        overwrite=True,
        dimension_names=_checked_dims(name, dims, values.shape),
        **kwargs,
    )
    if values.size:
        arr[...] = values
    return arr


def write_coordinates(
    group: zarr.Group,
    *,
    features: Any = None,
    groups: Any = None,
    nonbaseline: bool = False,
    n_categories: int | None = None,
    n_draws: int | None = None,
) -> None:
    """1-D coordinate arrays named like their dimension (xarray reads them as the labels):
    `feature`, `group` (and with `nonbaseline`, `nonbaseline_group` = groups 1..C-1, the
    raw effect sites' axis), `category` and `draw` (0, 1, ...)."""
    if features is not None:
        write_strings(group, FEATURE, features, dims=(FEATURE,))
    if groups is not None:
        labels = np.asarray(groups, dtype=str)
        write_strings(group, GROUP, labels, dims=(GROUP,))
        if nonbaseline:
            write_strings(group, NONBASELINE_GROUP, labels[1:], dims=(NONBASELINE_GROUP,))
    if n_categories is not None:
        write_array(group, CATEGORY, np.arange(n_categories, dtype=np.int64), dims=(CATEGORY,))
    if n_draws is not None:
        write_array(group, DRAW, np.arange(n_draws, dtype=np.int64), dims=(DRAW,))


def data_arrays(group: zarr.Group) -> dict[str, zarr.Array]:
    """The group's arrays except its coordinate arrays (`feature`, `group`, ...)."""
    return {name: array for name, array in group.arrays() if name not in COORDINATES}


def read_strings(group: zarr.Group, name: str) -> np.ndarray:
    """A string array as a numpy array of Python str."""
    return np.asarray(group[name][...], dtype=object).astype(str)
