"""An AnnData / MuData object held in memory, handed to the run as the file a config names.

A notebook's object is written once beside the store, in `<store>.inputs/`, under a name
taken from its content (`<sha256 prefix>.h5ad` / `.h5mu`): the run then reads it exactly
as it reads a user's file (same validation, same messages, same fingerprints), the store's
recorded config points at a file that holds what was fitted, and an unchanged object
gives the same file, so a rerun skips every unchanged step. anndata and mudata write
byte-identical files for identical objects, which is what makes the name stable.

This module builds the config mapping (`config_for`); it runs nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.errors import ConfigError

logger = logging.getLogger(__name__)

INPUTS_SUFFIX = ".inputs"
#: what `modalities=` may say about one modality (the config's keys of the same name)
MODALITY_KEYS = ("distribution", "layer", "modality", "denominator_layer", "cis_feature")
DEFAULT_DISTRIBUTION = "negbinom"
DEFAULT_ANNDATA_MODALITY = "gene"


@dataclass(frozen=True)
class WrittenInput:
    """The object's file, and whether this call created it (to remove it on a refusal)."""

    path: Path
    created: bool


def inputs_folder(store: Path) -> Path:
    """`<store>.inputs/`: beside the store, never inside it (the store's layout is fixed)."""
    return store.with_name(store.name + INPUTS_SUFFIX)


def is_mudata_object(data: Any) -> bool:
    """A MuData (has `.mod`), else an AnnData; anything else is refused."""
    if hasattr(data, "mod") and hasattr(data, "obs"):
        return True
    if hasattr(data, "obs") and hasattr(data, "var") and hasattr(data, "write_h5ad"):
        return False
    raise ConfigError(
        f"run() takes an AnnData or a MuData object, got {type(data).__name__}; for files on "
        "disk use technical_fit('config.yaml') or `bayesdream run config.yaml`."
    )


def write_object(data: Any, store: Path) -> WrittenInput:
    """Write `data` to `<store>.inputs/<digest>.h5ad|.h5mu` (kept when already there)."""
    mudata = is_mudata_object(data)
    folder = inputs_folder(store)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".h5mu" if mudata else ".h5ad"
    partial = folder / f".writing-{os.getpid()}{suffix}"
    if mudata:
        data.write(partial)
    else:
        data.write_h5ad(partial)
    target = folder / f"{_digest(partial)}{suffix}"
    if target.exists():
        partial.unlink()
        return WrittenInput(target, created=False)
    partial.replace(target)
    logger.info("Wrote the in-memory %s to %s", type(data).__name__, target)
    return WrittenInput(target, created=True)


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()[:16]


def discard(written: WrittenInput, store: Path) -> None:
    """After a refusal that left no store: remove what this call wrote (nothing remains)."""
    if not written.created or (store / "zarr.json").exists():
        return
    written.path.unlink(missing_ok=True)
    folder = written.path.parent
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def prune(written: WrittenInput) -> None:
    """After a finished run: earlier objects' files go; the store's config names this one."""
    for path in written.path.parent.iterdir():
        if path != written.path and path.suffix in (".h5ad", ".h5mu"):
            path.unlink() if path.is_file() else shutil.rmtree(path)


def modality_entries(
    data: Any, modalities: Mapping[str, Mapping[str, Any]] | None, path: Path
) -> dict[str, dict[str, Any]]:
    """The config's `modalities:` for the object's file. Default: one negbinom modality
    `gene` from X (AnnData), or one negbinom modality per MuData modality, by its name."""
    mudata = is_mudata_object(data)
    if modalities is None:
        names = list(data.mod) if mudata else [DEFAULT_ANNDATA_MODALITY]
        modalities = {name: {} for name in names}
    entries = {}
    for name, spec in modalities.items():
        unknown = sorted(set(spec) - set(MODALITY_KEYS))
        if unknown:
            raise ConfigError(
                f"modalities['{name}'] has unknown key(s) {unknown}; run() takes "
                f"{list(MODALITY_KEYS)} for each modality."
            )
        entry = {"distribution": DEFAULT_DISTRIBUTION, "counts": str(path), **spec}
        if mudata:
            entry.setdefault("modality", name)
        if entry.get("denominator_layer") is not None:
            entry["denominator"] = str(path)
        entries[name] = {k: v for k, v in entry.items() if v is not None}
    return entries
