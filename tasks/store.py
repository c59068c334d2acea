"""The one module that owns the Zarr store layout.

```
<store>/                          attrs: encoding-type, encoding-version, config
  inputs/cells/                   cell, target, sum_factor [N]; covariates/<col> [N]
  inputs/<modality>/              counts [T, N(, K)] float32, chunked (features, cells)
                                  denominator (binomial), feature_names [T], present [N]
  prep/groups/                    code [N] int64 (-1 = not fit), labels [C]
  prep/<modality>/                flags/<flag> [T] bool
  fit/<modality>/                 params/<pyro param name>, loss; attrs: guide, niters_run …
  technical/<modality>/           results (see the README), attr complete: true written last
  technical/cis/                  the cis feature's results
```
Every group carries `encoding-type` / `encoding-version`; a step counts as finished only
when its group has `complete: true`, written after every array.
"""

from __future__ import annotations

import shutil
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


def open_root(store: str | Path, *, create: bool = False) -> zarr.Group:
    """Open the run store; with `create`, make it (and mark its encoding) if absent."""
    path = Path(store)
    if not create and not (path / "zarr.json").exists():
        raise StoreError(
            f"No bayesdream store at '{path}': run `bayesdream run <config>` first, "
            "or check the `store:` path in the config."
        )
    root = zarr.open_group(str(path), mode="a", zarr_format=3)
    if create and "encoding-type" not in root.attrs:
        root.attrs.update({"encoding-type": "bayesdream-run", "encoding-version": ENCODING_VERSION})
    return root


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


def write_strings(group: zarr.Group, name: str, values: Any) -> zarr.Array:
    """A variable-length UTF-8 string array (portable across zarr-v3 readers)."""
    values = np.asarray(values, dtype=str)
    arr = group.create_array(name, shape=values.shape, dtype=str, overwrite=True)
    if values.size:
        arr[...] = values
    return arr


def write_array(group: zarr.Group, name: str, values: np.ndarray, **kwargs: Any) -> zarr.Array:
    """A whole small array (flags, labels, loss) in one write."""
    values = np.asarray(values)
    fill = np.nan if values.dtype.kind == "f" else None
    arr = group.create_array(
        name, shape=values.shape, dtype=values.dtype, fill_value=fill, overwrite=True, **kwargs
    )
    if values.size:
        arr[...] = values
    return arr


def read_strings(group: zarr.Group, name: str) -> np.ndarray:
    """A string array as a numpy array of Python str."""
    return np.asarray(group[name][...], dtype=object).astype(str)


def remove_path(path: str | Path) -> None:
    """Delete a store (or part of one) left by an interrupted step."""
    shutil.rmtree(path, ignore_errors=True)
