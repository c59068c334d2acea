"""Prefect artifacts of a run, and the terminal progress bar.

Every key ends with the store's slug (`store_slug`: its last folder names and a hash of
its path), so that runs on different stores keep apart: Prefect shows the latest artifact
of a key as that key's latest, whichever run wrote it.

- `Progress`: the progress artifact of a loop (`fit-progress-<modality>-<slug>` for the
  SVI steps, `sample-progress-<modality>-<slug>` for the posterior draws) and, when stderr
  is a terminal, a tqdm bar (tqdm comes with pyro-ppl).
- `publish_exclusions`: table artifact `excluded-features-<modality>-<slug>`, one row per
  feature the NTC filters excluded, one column per reason.
- `publish_reports`: markdown artifact `report-<modality>-<slug>` with the loss curve and
  the posterior-mean effects embedded as PNGs (also written to `<store>.reports/`); it and
  its description name the baseline group ("baseline: K562 (named by baseline_group)"),
  and it links the run's page.
- `publish_run_page`: writes the run's page, `<store>.reports/index.html`
  (`tasks.results.run_page`), in a run or not, and in a run a link artifact
  `run-page-<slug>` to it.

Outside a Prefect run (a test calling a task's `.fn` or a library function directly)
the artifact calls are skipped, with a debug log. A failing artifact call logs a warning
and never fails the step: artifacts are a view of the run; the store is its result.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import zarr

from tasks.results.report import (
    REASONS,
    ModalityReport,
    baseline_text,
    exclusion_table,
    feature_counts,
    write_report,
)
from tasks.results.run_page import write_run_page
from tasks.store import results_key

logger = logging.getLogger(__name__)
T = TypeVar("T")
MAX_TABLE_ROWS = 5000  # an artifact is for reading; the store's flags hold every feature
SLUG_CHARS = 24  # of a store's folder names in its artifact keys


def in_run() -> bool:
    """True inside a Prefect flow or task run (False when Prefect is not even imported)."""
    if "prefect" not in sys.modules:
        return False
    from prefect.context import FlowRunContext, TaskRunContext

    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


def artifact_key(kind: str, name: str, *, store: str | Path | zarr.Group) -> str:
    """`<kind>-<name>-<store slug>`, as Prefect accepts keys: lowercase letters, digits and
    dashes. `store` is the store's path, or the store opened from it."""
    return _key_text(f"{kind}-{name}-{store_slug(store)}")


def page_artifact_key(store: str | Path | zarr.Group) -> str:
    """`run-page-<store slug>`: the link to the run's page (one per store, not per modality)."""
    return _key_text(f"run-page-{store_slug(store)}")


def store_slug(store: str | Path | zarr.Group) -> str:
    """A store's short, key-safe name: up to `SLUG_CHARS` of its last folder names (for
    the reader) and 8 hex digits of its absolute path's hash (for uniqueness), e.g.
    '/data/screen-a/results/run.zarr' -> 'screen-a-results-run-' + 8 hex digits."""
    if isinstance(store, zarr.Group):
        store = _store_location(store)
    path = Path(store).expanduser().resolve()  # one slug however the path is spelt
    parts = list(path.parts[-3:])
    parts[-1] = parts[-1].removesuffix(".zarr")
    readable = _key_text("-".join(parts))[-SLUG_CHARS:].strip("-")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    return f"{readable}-{digest}" if readable else digest


def _store_location(root: zarr.Group) -> str:
    """The path a store was opened from (its repr for a store that is not a folder)."""
    location = getattr(root.store, "root", None)
    return str(location) if location is not None else str(root.store)


def _key_text(text: str) -> str:
    key = re.sub(r"[^a-z0-9-]+", "-", text.lower())
    return re.sub(r"-{2,}", "-", key).strip("-")


def _attempt(what: str, call: Callable[[], T], log: logging.Logger) -> T | None:
    """`call()`, or None with a warning when it fails."""
    try:
        return call()
    except Exception as err:  # an artifact is a view of the run, never a reason to fail it
        log.warning(
            "Could not write the %s artifact (%s: %s); the run goes on.",
            what,
            type(err).__name__,
            err,
        )
        return None


class Progress:
    """A loop's progress: a Prefect progress artifact (in a run) and a bar (on a terminal).

    An artifact update costs ~10 ms, so updates are throttled: at most one every
    `MIN_SECONDS`, and only once the percentage moved by `MIN_PERCENT` (so at most ~100
    per loop, however fast its steps). Reaching the total, or `finish` (a loop that
    stopped early, e.g. converged), always sends 100 %.

    `update(done, total)` has the signature of `sample_modality`'s `on_batch`.
    """

    MIN_SECONDS = 2.0
    MIN_PERCENT = 1.0

    def __init__(
        self, key: str, description: str, *, unit: str = "it", log: logging.Logger | None = None
    ) -> None:
        self.key, self.description, self.unit = key, description, unit
        self.log = log or logger
        self._artifact: UUID | None = None
        if in_run():
            from prefect.artifacts import create_progress_artifact

            self._artifact = _attempt(
                key,
                lambda: create_progress_artifact(0.0, key=key, description=description),
                self.log,
            )
        self._tty = sys.stderr.isatty()
        self._bar: Any = None
        self._sent, self._sent_at = 0.0, time.monotonic()
        self._done, self._total = 0, 0

    def update(self, done: int, total: int) -> None:
        """`done` of `total` units finished (counts, not increments)."""
        self._done, self._total = done, max(int(total), 1)
        if self._tty:
            self._advance_bar()
        if self._artifact is None:
            return
        percent = min(100.0, 100.0 * done / self._total)
        now = time.monotonic()
        due = percent - self._sent >= self.MIN_PERCENT and now - self._sent_at >= self.MIN_SECONDS
        if due or (percent == 100.0 and self._sent < 100.0):
            self._send(percent, now)

    def finish(self) -> None:
        """The loop ended (perhaps early, e.g. converged): 100 %, bar closed."""
        if self._bar is not None:
            self._bar.total = self._bar.n  # an early stop is complete too
            self._bar.refresh()
            self._bar.close()
            self._bar = None
        if self._artifact is not None and self._sent < 100.0:
            self._send(100.0, time.monotonic())

    def _send(self, percent: float, now: float) -> None:
        from prefect.artifacts import update_progress_artifact

        artifact = self._artifact
        if _attempt(self.key, lambda: update_progress_artifact(artifact, percent), self.log):
            self._sent, self._sent_at = percent, now
        else:  # warned once; the loop goes on without its artifact
            self._artifact = None

    def _advance_bar(self) -> None:
        if self._bar is None:
            try:
                from tqdm import tqdm
            except ImportError:  # no bar; the progress log lines remain
                self._tty = False
                return
            self._bar = tqdm(
                total=self._total,
                desc=self.description,
                unit=self.unit,
                file=sys.stderr,
                dynamic_ncols=True,
                mininterval=0.5,
            )
        self._bar.total = self._total
        self._bar.update(self._done - self._bar.n)


def publish_exclusions(root: zarr.Group, name: str, log: logging.Logger | None = None) -> None:
    """Table artifact of the features excluded from `name`'s fit, with every reason."""
    log = log or logger
    if not in_run():
        log.debug("Not in a Prefect run: no excluded-features artifact for '%s'.", name)
        return
    from prefect.artifacts import create_table_artifact

    table = exclusion_table(root, name)
    counts = feature_counts(root, name)
    shown = {column: values[:MAX_TABLE_ROWS] for column, values in table.items()}
    reasons = ", ".join(f"{reason}: {counts[reason]}" for reason in REASONS)
    description = (
        f"Modality '{name}': {len(table['feature'])} of {counts['total']} features excluded "
        f"from the fit ({reasons})"
        + (
            f"; the first {MAX_TABLE_ROWS} shown."
            if len(table["feature"]) > MAX_TABLE_ROWS
            else "."
        )
    )
    key = artifact_key("excluded-features", name, store=root)
    _attempt(key, lambda: create_table_artifact(shown, key=key, description=description), log)


def publish_run_page(
    root: zarr.Group,
    store: str | Path,
    names: list[str],
    *,
    flow_run: str | None = None,
    log: logging.Logger | None = None,
) -> Path | None:
    """Write the run's page and, in a run, link it from artifact `run-page-<slug>`. A page
    that cannot be written is a warning: the store is the run's result, the page a view."""
    log = log or logger
    page = _attempt("run page", lambda: write_run_page(root, store, names, flow_run=flow_run), log)
    if page is None or not in_run():
        return page
    from prefect.artifacts import create_link_artifact

    key = page_artifact_key(store)
    description = f"The run's page ({', '.join(names)}): {page}"
    _attempt(
        key,
        lambda: create_link_artifact(
            page.resolve().as_uri(), link_text=str(page), key=key, description=description
        ),
        log,
    )
    return page


def publish_reports(
    root: zarr.Group,
    store: str | Path,
    names: list[str],
    log: logging.Logger | None = None,
    *,
    page: Path | None = None,
) -> list[ModalityReport]:
    """Markdown report artifact per modality (plots also written to `<store>.reports/`),
    each linking the run's `page` when there is one."""
    log = log or logger
    if not in_run():
        log.debug("Not in a Prefect run: no report artifacts for %s.", names)
        return []
    reports = [_publish_report(root, store, name, log, page) for name in names]
    return [report for report in reports if report is not None]


def _publish_report(
    root: zarr.Group, store: str | Path, name: str, log: logging.Logger, page: Path | None
) -> ModalityReport | None:
    from prefect.artifacts import create_markdown_artifact

    key = artifact_key("report", name, store=store)
    report = _attempt(key, lambda: write_report(root, store, name), log)
    if report is not None:
        if page is not None:
            uri = page.resolve().as_uri()
            link = f"The run's page, every modality on one page: [{page}]({uri})"
            report = ModalityReport(f"{report.markdown}\n\n{link}", report.files)
        description = (
            f"Modality '{name}': loss curve, posterior-mean effects, run summary; "
            f"baseline: {baseline_text(root[results_key(name)])}"
        )
        _attempt(
            key,
            lambda: create_markdown_artifact(report.markdown, key=key, description=description),
            log,
        )
    return report
