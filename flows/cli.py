"""The `bayesdream` command line: run, summary, export, demo, deploy."""

from __future__ import annotations

import argparse
import fnmatch
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import yaml

from tasks.errors import ConfigError, PipelineError

log = logging.getLogger("bayesdream")

# Entrypoints in a prefect.yaml (`flows/technical_fit.py:...`) are relative to this folder.
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bayesdream", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_others(sub)
    return parser


def _add_run(sub) -> None:
    """`bayesdream run`: the fit, as a config says."""
    run = sub.add_parser(
        "run",
        help="fit the technical model as a config says (the model: docs/model.md)",
        description="Fit the technical model of bayesDREAM to the NTC cells of each modality "
        "as the config says; docs/model.md describes the model, its priors, guides and stop "
        "rule.",
    )
    run.add_argument("config", type=Path)
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. fit.niters=2000",
    )
    run.add_argument("--modality", help="fit only this modality")
    run.add_argument(
        "--debug",
        action="store_true",
        help="on failure, show the tracebacks (they are always in the Prefect run logs)",
    )
    run.add_argument(
        "--workers",
        type=int,
        default=1,
        help="modality chains run side by side in this many threads (default 1)",
    )
    run.add_argument(
        "--dask",
        metavar="ADDRESS",
        help="run the tasks on a Dask cluster: a scheduler address (tcp://host:8786), or "
        "'local' for a LocalCluster of single-threaded worker processes on this machine. "
        "Worker processes report to Prefect's API: set PREFECT_API_URL to a running server "
        "(`prefect server start`) that the workers can reach, or each worker starts a "
        "temporary server of its own; with 'local' and no PREFECT_API_URL, this process "
        "starts one and shares it. Remote workers need this project installed and the "
        "store and input files at the same paths.",
    )
    run.add_argument(
        "--dask-workers",
        type=int,
        default=2,
        metavar="N",
        help="worker processes of --dask local (default 2)",
    )


def _add_others(sub) -> None:
    """`summary`, `export`, `report`, `demo` and `deploy`."""
    summary = sub.add_parser("summary", help="per feature and group effect summaries as CSV")
    summary.add_argument("store", type=Path)
    summary.add_argument("--modality", required=True)
    summary.add_argument("--out", type=Path, help="CSV path (default: standard output)")
    export = sub.add_parser(
        "export",
        help="a modality's effects as an AnnData (.h5ad: var = features, varm = effect "
        "summaries [features x groups]) or a table (parquet, csv); or, with --to bayesdream "
        "DIR, the posterior draws as the files the reference bayesDREAM's "
        "load_technical_fit(input_dir=DIR) reads",
    )
    export.add_argument("store", type=Path)
    export.add_argument(
        "--modality",
        action="append",
        help="the modality (with --out: one; with --to: repeat it for each to hand off, "
        "default all)",
    )
    where = export.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="e.g. effects.h5ad")
    where.add_argument(
        "--to",
        nargs=2,
        metavar=("bayesdream", "DIR"),
        help="write DIR/alpha_y_prefit_<modality>.pt (negbinom x-fold, others additive) and "
        "alpha_x_prefit.pt (the cis feature) for bayesDREAM's load_technical_fit; groups in "
        "its order (sorted covariate values), re-referenced to its first group when our "
        "baseline_group differs; features without the cis feature and those constant over "
        "all cells (features_<modality>.txt lists them)",
    )
    export.add_argument(
        "--format",
        choices=("h5ad", "parquet", "csv"),
        help="default: from the suffix of --out",
    )
    report = sub.add_parser(
        "report",
        help="(re)write the run's page, <store>.reports/index.html (every run writes it; "
        "this rewrites it, e.g. for a store from an earlier version)",
    )
    report.add_argument("store", type=Path)
    report.add_argument(
        "--modality", action="append", help="repeat for each (default: all with results)"
    )
    demo = sub.add_parser("demo", help="simulate a small screen and run the whole flow on it")
    demo.add_argument("--dir", type=Path, default=Path("demo_run"))
    deploy = sub.add_parser("deploy", help="register a prefect.yaml's deployments with the API")
    deploy.add_argument("prefect_file", type=Path, help="e.g. deployments/prefect.yaml")
    deploy.add_argument(
        "--name",
        dest="names",
        action="append",
        default=[],
        metavar="[FLOW/]DEPLOYMENT",
        help="deploy only this one (repeatable; default: all of them)",
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per API call otherwise
    quiet = None if debug else _QuietFailures()
    if quiet is not None:
        for handler in logging.getLogger().handlers:
            handler.addFilter(quiet)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary local API starts in a subprocess; on a busy laptop 20 s is too short.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    try:
        return _dispatch(args)
    except (PipelineError, ValueError) as err:  # model errors are ValueErrors
        log.error("%s", err, exc_info=debug)
        return 2
    except OSError as err:  # disk full, read-only ... outside a run's store (its own: above)
        from tasks.filesystem import file_system_fault

        fault = file_system_fault(err)
        if fault is None:
            raise
        log.error("%s", fault, exc_info=debug)
        return 2
    finally:
        if quiet is not None:
            for handler in logging.getLogger().handlers:
                handler.removeFilter(quiet)


class _QuietFailures(logging.Filter):
    """Keeps Prefect's report of a failed run (tracebacks of the task and of the flow,
    "Finished in state Failed") off the terminal: the CLI prints the error once. The run
    logs on the Prefect API keep everything; `--debug` shows it here too."""

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: D102
        if not record.name.startswith("prefect"):
            return True
        if record.levelno >= logging.ERROR:
            return False
        return not record.getMessage().startswith(
            ("Finished in state Failed", "Finished in state Crashed")
        )


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "deploy":
        return deploy(args.prefect_file, args.names)
    if args.command == "summary":
        from tasks.results.summary import summarize

        table = summarize(str(args.store), args.modality)
        if args.out is None:
            table.to_csv(sys.stdout, index=False)
        else:
            table.to_csv(args.out, index=False)
            log.info("Wrote %d rows (%s scale) to %s", len(table), table.attrs["scale"], args.out)
        return 0
    if args.command == "export":
        return _export(args)
    if args.command == "report":
        from tasks.results.run_page import rewrite_run_page

        page = rewrite_run_page(str(args.store), args.modality)
        log.info("Open it in a browser: %s", page.resolve().as_uri())
        return 0
    from flows.technical_fit import run_demo, technical_fit

    if args.command == "demo":
        store = run_demo(args.dir)
        log.info("Demo finished: %s", store)
        _log_page(store)
        log.info("Next: bayesdream summary %s --modality gene --out effects.csv", store)
        return 0
    _refuse_early(args)
    if args.dask:
        store = _run_on_dask(args)
        log.info("Finished: %s", store)
        _log_page(store)
        return 0
    flow = technical_fit
    if args.workers > 1:
        from prefect.task_runners import ThreadPoolTaskRunner

        runner = ThreadPoolTaskRunner(max_workers=args.workers)
        flow = technical_fit.with_options(task_runner=runner)
    store = flow(str(args.config), args.overrides, args.modality)
    log.info("Finished: %s", store)
    _log_page(store)
    return 0


def _log_page(store: str) -> None:
    """Where the run's page is, as a link a terminal can open."""
    from tasks.results.run_page import page_path

    page = page_path(store)
    if page.is_file():
        log.info("The run's page: %s", page.resolve().as_uri())


def _export(args: argparse.Namespace) -> int:
    """`export --out FILE` (one modality's summaries) or `export --to bayesdream DIR`."""
    if args.to is not None:
        from tasks.results.export_bayesdream import TARGET, export_bayesdream

        if args.to[0] != TARGET or args.format is not None:
            raise PipelineError(
                f"--to {args.to[0]}: the only target is '{TARGET}' (--to {TARGET} DIR), and "
                "--format is for --out only."
            )
        export_bayesdream(str(args.store), Path(args.to[1]), modalities=args.modality)
        return 0
    from tasks.results.export import export_effects

    if len(args.modality or []) != 1:
        raise PipelineError(
            f"--out writes one modality: give exactly one --modality (got {args.modality})."
        )
    export_effects(str(args.store), args.modality[0], args.out, args.format)
    return 0


def _refuse_early(args: argparse.Namespace) -> None:
    """Before Prefect starts (seconds): a bad config, a store that is not one, a store in
    use by another run. The flow checks all of this again, under the store's lock."""
    from tasks.config import load_config
    from tasks.lock import refuse_if_locked
    from tasks.store import check_store_location

    cfg = load_config(args.config, args.overrides)
    check_store_location(cfg.store)
    refuse_if_locked(cfg.store)


def _run_on_dask(args: argparse.Namespace) -> str:
    """`run --dask`: the flow with a DaskTaskRunner; returns the store path."""
    from prefect.settings import PREFECT_API_URL

    from flows.technical_fit import LOCAL_CLUSTER, with_dask

    if args.workers > 1:
        raise ConfigError(
            f"--workers {args.workers} (threads) and --dask {args.dask} (a Dask cluster) both "
            "choose where the tasks run; give one of them."
        )
    with ExitStack() as stack:
        if args.dask == LOCAL_CLUSTER and not PREFECT_API_URL.value():
            stack.enter_context(_shared_temporary_api())
        flow = with_dask(args.dask, n_workers=args.dask_workers)
        return flow(str(args.config), args.overrides, args.modality)


@contextmanager
def _shared_temporary_api() -> Iterator[None]:
    """Prefect's temporary server, started here and passed to the local Dask workers with
    the task context Prefect sends them: one API and database instead of one per worker.

    It is the one Prefect would start for this process anyway, and stops, as that one
    does, at exit (after the last logs are sent)."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = SubprocessASGIServer()
    server.start()
    log.info("Prefect API for this run and its Dask workers: %s", server.api_url)
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield


def deploy(prefect_file: Path, names: list[str]) -> int:
    """Run Prefect's own `prefect deploy` for `prefect_file` from the project root.

    Returns its exit status. Raises `PipelineError` before running anything when no API
    is configured (deployments would go to a throwaway local database no worker sees),
    or when the file or a requested deployment name is missing.
    """
    api_url = _api_url()
    path = prefect_file.resolve()
    declared = _declared_deployments(path)
    for name in names:
        if not fnmatch.filter(declared, name.rsplit("/", 1)[-1]):
            raise PipelineError(
                f"--name '{name}' matches no deployment in '{path}'; it declares "
                f"{sorted(declared)} (use [FLOW/]DEPLOYMENT, e.g. technical-fit/{declared[0]})."
            )
    command = [_prefect_executable(), "--no-prompt", "deploy", "--prefect-file", str(path)]
    command += [arg for name in names for arg in ("--name", name)] or ["--all"]
    log.info("Deploying from %s to %s: %s", PROJECT_ROOT, api_url, " ".join(command))
    env = os.environ | {"PREFECT_API_URL": api_url}
    return subprocess.run(command, cwd=PROJECT_ROOT, env=env, check=False).returncode


def _api_url() -> str:
    """The Prefect API the deployments go to: PREFECT_API_URL from the env or profile."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise PipelineError(
            "PREFECT_API_URL is not set, so there is no Prefect server to register the "
            "deployments with (Prefect would use a temporary local database that no worker "
            "polls). Start one (`prefect server start`) and set it, e.g. "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api` or "
            "`prefect config set PREFECT_API_URL=...`; see deployments/README.md."
        )
    return str(url)


def _declared_deployments(path: Path) -> list[str]:
    """The deployment names `path` declares; a missing file or empty list is an error."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise PipelineError(f"Cannot read the Prefect deployment file '{path}': {err}") from err
    deployments = data.get("deployments") if isinstance(data, dict) else None
    names = [item.get("name") for item in deployments or [] if isinstance(item, dict)]
    if not names or not all(isinstance(name, str) for name in names):
        raise PipelineError(
            f"'{path}' declares no named deployments; expected a `deployments:` list whose "
            "items each have a `name` (see deployments/prefect.yaml)."
        )
    return names


def _prefect_executable() -> str:
    """The `prefect` next to this interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).with_name("prefect")
    return str(beside) if beside.exists() else "prefect"


if __name__ == "__main__":
    raise SystemExit(main())
