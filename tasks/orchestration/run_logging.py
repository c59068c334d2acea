"""The project's own log lines in the Prefect run's logs, not only on a terminal.

Prefect sends only its run loggers (`get_run_logger()`) to the API. The model and the
tasks log with `logging.getLogger(__name__)` (the model package knows nothing of Prefect),
so without this their lines ("Laplace start: ...", "SVI stopped after ...", the anneal
warning) reach the console of whatever process runs the flow (a worker's terminal, with no
run attached) and never the flow run's logs in the server or UI.

`send_library_logs()` gives each package logger (`LIBRARY_LOGGERS`) Prefect's own
`APILogHandler`, which files a record under the flow or task run that emitted it (from the
run context of the emitting thread), and lowers the package loggers' level to INFO where
nobody set one (a flow-run process started by a worker leaves the root logger at WARNING,
which would drop the INFO lines before any handler saw them).

Why in code and not only `PREFECT_LOGGING_EXTRA_LOGGERS`: that setting is read when Prefect
configures logging, so it has to be in the environment of every process that runs the flow
or its tasks (a worker's flow-run subprocess, Dask workers, the CLI); called from the flow
and the tasks, this works wherever they run, with nothing to configure. It is idempotent,
and it adds nothing to a logger that already has an API handler (e.g. a user who did set
that variable), so no line is sent twice. The handler only sends; the console output stays
with the handlers already there (the CLI's, or Prefect's), so no line is printed twice.
A line emitted outside any run (a library call in a test, a thread without a run context)
is skipped by the handler's filter instead of raising Prefect's "without a flow run id"
warning; it still reaches the console.
"""

from __future__ import annotations

import logging
import sys
import threading

#: The project's packages; their modules log with `logging.getLogger(__name__)`.
LIBRARY_LOGGERS = ("bayesdream_model", "tasks", "flows")
_ATTACHING = threading.Lock()  # tasks in threads start at once: one handler per logger


class _InRun(logging.Filter):
    """Passes records emitted inside a Prefect flow or task run (the only ones the API
    handler can file under a run)."""

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: D102
        if "prefect" not in sys.modules:
            return False
        from prefect.context import FlowRunContext, TaskRunContext

        return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def send_library_logs(names: tuple[str, ...] = LIBRARY_LOGGERS) -> None:
    """Send the records of the loggers `names` (and their children) to the Prefect run
    that emits them; idempotent, cheap enough to call at the start of every task."""
    from prefect.logging.handlers import APILogHandler

    with _ATTACHING:
        for name in names:
            logger = logging.getLogger(name)
            if logger.level == logging.NOTSET:
                logger.setLevel(logging.INFO)
            if any(isinstance(handler, APILogHandler) for handler in logger.handlers):
                continue
            handler = APILogHandler()
            handler.addFilter(_InRun())
            logger.addHandler(handler)
