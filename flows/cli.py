"""The `bayesdream` command line: run, summary, demo."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from tasks.errors import PipelineError

log = logging.getLogger("bayesdream")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bayesdream", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="fit the technical model as a config says")
    run.add_argument("config", type=Path)
    run.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY=VALUE", help="override a config value, e.g. fit.niters=2000")
    run.add_argument("--modality", help="fit only this modality")
    run.add_argument("--workers", type=int, default=1,
                     help="modality chains run side by side in this many threads (default 1)")
    summary = sub.add_parser("summary", help="per feature and group effect summaries as CSV")
    summary.add_argument("store", type=Path)
    summary.add_argument("--modality", required=True)
    summary.add_argument("--out", type=Path, help="CSV path (default: standard output)")
    demo = sub.add_parser("demo", help="simulate a small screen and run the whole flow on it")
    demo.add_argument("--dir", type=Path, default=Path("demo_run"))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        return _dispatch(args)
    except PipelineError as err:
        log.error("%s", err)
        return 2
    except ValueError as err:  # model errors (bayesdream_model.errors) are ValueErrors
        log.error("%s", err)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "summary":
        from tasks.summary import summarize

        table = summarize(str(args.store), args.modality)
        if args.out is None:
            table.to_csv(sys.stdout, index=False)
        else:
            table.to_csv(args.out, index=False)
            log.info("Wrote %d rows (%s scale) to %s", len(table), table.attrs["scale"], args.out)
        return 0
    from flows.technical_fit import run_demo, technical_fit

    if args.command == "demo":
        store = run_demo(args.dir)
        log.info("Demo finished: %s", store)
        log.info("Next: bayesdream summary %s --modality gene --out effects.csv", store)
        return 0
    flow = technical_fit
    if args.workers > 1:
        from prefect.task_runners import ThreadPoolTaskRunner

        flow = technical_fit.with_options(task_runner=ThreadPoolTaskRunner(max_workers=args.workers))
    store = flow(str(args.config), args.overrides, args.modality)
    log.info("Finished: %s", store)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
