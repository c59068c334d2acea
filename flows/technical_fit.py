"""The technical-fit flow: under the store's lock, pre-flight (every input checked, nothing
written), withdraw an earlier run's completion marks, store, groups, ingest and filter every
modality, then one fit -> sample chain per modality.

The chains are submitted to the flow's task runner, so they run side by side when the
runner has room: the default runs one task at a time (torch's global RNG is shared by
threads, so concurrent chains in one process would not be reproducible for a seed);
`technical_fit.with_options(task_runner=...)` (or the CLI's `--workers`) widens it, and
`with_dask(address)` runs the tasks on a Dask cluster (the CLI's `--dask`), one
process per chain.

What a Prefect user sees: a flow run named after its store (`run_name`), task runs named
after their modality (`fit-gene`), the model's and the tasks' own log lines in the run's
logs (`tasks.orchestration.run_logging`), and a run refused because another run holds the store ending
Cancelled, with one message naming that run (its flow run's name and id, pid and host).
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from prefect import Flow, flow
from prefect.runtime import flow_run
from prefect.states import Cancelled, State
from prefect.task_runners import ThreadPoolTaskRunner

from tasks.config import RunConfig
from tasks.errors import ConfigError
from tasks.lock import StoreLockedError, store_lock
from tasks.orchestration.run_logging import send_library_logs
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
    withdraw_completion,
)


def _selected(cfg: RunConfig, modality: str | None) -> list[str]:
    if modality is None:
        return list(cfg.modalities)
    if modality not in cfg.modalities:
        raise ConfigError(
            f"--modality '{modality}' is not in the config; it has {sorted(cfg.modalities)}."
        )
    return [modality]


def run_name(config: str | dict[str, Any], overrides: list[str], modality: str | None) -> str:
    """A flow run's name: its store's path (and the one modality it fits, if given), so
    that runs on different stores are told apart in the UI and in `prefect flow-run ls`.

    A config that cannot be read names the run after the config's path: a name must not
    fail the run; the flow then fails, saying what is wrong with the config."""
    try:
        store = str(resolve_config(config, list(overrides)).store)
    except Exception:  # any error at all: the flow body reports it properly
        store = f"config {config}" if isinstance(config, str) else "config (a mapping)"
    return f"{store} [{modality}]" if modality else store


def _flow_run_name() -> str:
    parameters = flow_run.parameters
    return run_name(
        parameters.get("config", ""), parameters.get("overrides") or [], parameters.get("modality")
    )


@flow(
    name="technical-fit",
    flow_run_name=_flow_run_name,
    log_prints=False,
    task_runner=ThreadPoolTaskRunner(max_workers=1),
)
def technical_fit(
    config: str | dict[str, Any],
    overrides: list[str] | None = None,
    modality: str | None = None,
) -> str | State:
    """Fit the technical model for every modality (or one) and return the store path.

    A store held by another run ends this run Cancelled (it did nothing, and nothing is
    wrong with it), its message naming that run; called in-process, the call still raises
    the `StoreLockedError`."""
    send_library_logs()
    started = time.time()
    cfg = resolve_config(config, list(overrides or []))
    names = _selected(cfg, modality)
    # One writer per store: a second run on it (scheduled or by hand) refuses at once.
    with ExitStack() as stack:
        try:
            stack.enter_context(store_lock(cfg.store))
        except StoreLockedError as err:
            return Cancelled(message=str(err), data=err)
        return _chains(cfg, names, started)


def _chains(cfg: RunConfig, names: list[str], started: float) -> str:
    """The run's tasks, under the store's lock: nothing is written before pre-flight."""
    prints, plans, checked = preflight(cfg, names)
    withdraw_completion(cfg, names, prints)
    # run-level steps under keys with a dash, which no modality name has
    summaries: dict[str, Any] = {"pre-flight": checked}
    summaries["create-store"] = create_store(cfg, names, prints)
    summaries["groups"] = assign_groups(cfg, prints)
    # Every modality's values are checked and filtered before any fit starts: bad input in
    # one modality must not leave another's results behind, claiming to be complete.
    # .result() in dependency order: the first failure is raised, not a skipped task's state
    ingested = {name: ingest.submit(cfg, name, plans[name], prints) for name in names}
    summaries |= {name: {"ingest": ingested[name].result()} for name in names}
    filtered = {name: filter_step.submit(cfg, name, prints) for name in names}
    for name in names:
        summaries[name]["filters"] = filtered[name].result()
    fits = {name: fit.submit(cfg, name, prints) for name in names}
    draws = {name: sample.submit(cfg, name, prints, wait_for=[fits[name]]) for name in names}
    for name in names:
        summaries[name] |= {"fit": fits[name].result(), "sample": draws[name].result()}
    return finalize(cfg, started, summaries)


#: `with_dask`'s address for a cluster of worker processes on this machine
LOCAL_CLUSTER = "local"


def with_dask(address: str, *, n_workers: int = 2) -> Flow:
    """`technical_fit` with its tasks on a Dask cluster: a scheduler `address`
    ("tcp://host:8786"), or `LOCAL_CLUSTER` for a `distributed.LocalCluster` of `n_workers`
    single-threaded processes started (and stopped) by the flow run.

    Worker processes run Prefect tasks, so they must reach the flow's Prefect API: with
    PREFECT_API_URL unset, each would start a temporary server of its own (slow; the task
    runs land in separate databases). Remote workers also need this project installed and
    the store (and input files) at the same paths. The filter statistics then run on the
    cluster too (`tasks.filter.distributed`).
    """
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as err:
        raise ConfigError(
            f"--dask {address} needs the prefect-dask package: pip install prefect-dask"
        ) from err
    from prefect.settings import PREFECT_API_URL

    if address == LOCAL_CLUSTER:
        runner = DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={"n_workers": n_workers, "threads_per_worker": 1, "processes": True},
        )
    else:
        runner = DaskTaskRunner(address=address)
    if not PREFECT_API_URL.value():
        logging.getLogger(__name__).warning(
            "PREFECT_API_URL is not set: every Dask worker process of %s will start its own "
            "temporary Prefect server and keep its task runs there. Start a server "
            "(`prefect server start --host 0.0.0.0`) and set PREFECT_API_URL to it, reachable "
            "from the workers, e.g. export PREFECT_API_URL=http://<host>:4200/api.",
            address,
        )
    return technical_fit.with_options(task_runner=runner)


def run_demo(directory: str | Path) -> str:
    """Write the demo screen into `directory` and run the flow on it."""
    from tasks.demo import write_demo_inputs

    return technical_fit(str(write_demo_inputs(directory)))
