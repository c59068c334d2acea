"""The technical-fit flow: pre-flight, store, groups, then per modality ingest -> filter ->
fit -> sample, each modality its own chain of tasks."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow

from tasks.config import RunConfig
from tasks.errors import ConfigError
from tasks.steps import (
    assign_groups,
    create_store,
    filter_step,
    finalize,
    fit,
    ingest,
    preflight,
    resolve_config,
    sample,
)


def _selected(cfg: RunConfig, modality: str | None) -> list[str]:
    if modality is None:
        return list(cfg.modalities)
    if modality not in cfg.modalities:
        raise ConfigError(
            f"--modality '{modality}' is not in the config; it has {sorted(cfg.modalities)}."
        )
    return [modality]


@flow(name="technical-fit", log_prints=False)
def technical_fit(
    config: str | dict[str, Any],
    overrides: list[str] | None = None,
    modality: str | None = None,
) -> str:
    """Fit the technical model for every modality (or one) and return the store path."""
    started = time.time()
    cfg = resolve_config(config, list(overrides or []))
    names = _selected(cfg, modality)
    plans = preflight(cfg, names)
    create_store(cfg, names)
    summaries: dict[str, Any] = {"groups": assign_groups(cfg)}
    for name in names:
        ingest(cfg, name, plans[name])
        summaries[name] = {
            "filters": filter_step(cfg, name),
            "fit": fit(cfg, name),
            "sample": sample(cfg, name),
        }
    return finalize(cfg, started, summaries)


def run_demo(directory: str | Path) -> str:
    """Write the demo screen into `directory` and run the flow on it."""
    from tasks.demo import write_demo_inputs

    return technical_fit(str(write_demo_inputs(directory)))
