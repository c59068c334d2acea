"""What each step's output depends on, as one hash per step (for skipping unchanged work).

A step's fingerprint hashes the fingerprints of the steps it reads, the part of the
config that changes its output, and the code version; the group it writes records it.
A rerun skips a step whose group is complete with the same fingerprint, and a change
anywhere reruns exactly the steps downstream of it.

    cells -> groups ─┐
    cells -> ingest(m) -> filter(m) -> fit(m) -> sample(m)

The groups step hashes `use_all_cells`, `groups_without_ntc` and `baseline_group` (which
group is code 0); every filter, fit and sampling reads the groups, so a change to any of
them reruns those too.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tasks.config import RunConfig

PACKAGES = ("bayesdream_model", "tasks")
CHUNK = 1 << 20


def _hash(*parts: object) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@lru_cache(maxsize=256)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file's content (cached per path, size and mtime within a process)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def content_digest(path: Path | None) -> str | None:
    """sha256 of a file, or of every file of a folder (10x Matrix Market), by content."""
    if path is None:
        return None
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return _hash([(p.name, _digest(str(p), p.stat().st_size, p.stat().st_mtime_ns)) for p in files])


@lru_cache(maxsize=1)
def code_version() -> str:
    """A hash of the source of the packages that compute results."""
    root = Path(__file__).resolve().parent.parent
    files = sorted(f for package in PACKAGES for f in (root / package).rglob("*.py"))
    return _hash([(str(f.relative_to(root)), f.read_text()) for f in files])


@dataclass(frozen=True)
class Fingerprints:
    """One hash per step of one run."""

    cells: str
    groups: str
    ingest: dict[str, str]
    filter: dict[str, str]
    fit: dict[str, str]
    sample: dict[str, str]


def fingerprints(cfg: RunConfig) -> Fingerprints:
    """Every step's fingerprint for `cfg` (hashes input files by content)."""
    code = code_version()
    cells = _hash(
        "cells",
        content_digest(cfg.cells),
        cfg.cells_modality,
        cfg.covariates,
        cfg.sum_factor_col,
        code,
    )
    groups = _hash("groups", cells, cfg.use_all_cells, cfg.groups_without_ntc, cfg.baseline_group)
    fit_options = cfg.fit.model_dump(
        exclude={"nsamples", "minibatch_size", "threads", "checkpoint_seconds"}
    )
    ingest, filters, fits, samples = {}, {}, {}, {}
    for name, mod in cfg.modalities.items():
        files = [content_digest(p) for p in (mod.counts, mod.denominator, mod.features, mod.cells)]
        selection = (mod.layer, mod.modality, mod.denominator_layer)  # AnnData / MuData
        ingest[name] = _hash("ingest", files, selection, mod.distribution, cells, code)
        filters[name] = _hash("filter", ingest[name], groups)
        fits[name] = _hash("fit", filters[name], fit_options)
        samples[name] = _hash(
            "sample", fits[name], cfg.fit.nsamples, cfg.fit.minibatch_size, mod.cis_feature
        )
    return Fingerprints(cells, groups, ingest, filters, fits, samples)
