"""The one warning about the baseline group, after a fit (`tasks.fit.fitting`)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np

from tasks.fit.fitting import _warn_of_baseline
from tasks.groups import GroupAssignment

LOG = logging.getLogger("test_baseline_warning")


def _groups(labels: list[str]) -> GroupAssignment:
    n = len(labels)
    return GroupAssignment(code=np.arange(n), fit=np.ones(n, bool), labels=labels, dropped={})


def _fitted(none: np.ndarray, silent: np.ndarray) -> SimpleNamespace:
    return SimpleNamespace(flags={"baseline_no_counts": none, "baseline_silent": silent})


def test_a_small_baseline_lacking_expressed_genes_is_warned_of_once(caplog) -> None:
    codes = np.repeat([0, 1, 2], [45, 300, 155])  # the baseline holds 9 % of the fit cells
    none = np.zeros(200, bool)
    none[:30] = True
    silent = np.zeros(200, bool)
    silent[:12] = True
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        _warn_of_baseline(
            LOG, "gene", _groups(["HEL", "K562", "TF1"]), codes, _fitted(none, silent)
        )
    assert len(caplog.records) == 1
    text = caplog.records[0].getMessage()
    assert "baseline group 'HEL' holds 45 of 500 fit cells (9.0%)" in text
    assert "no count of 12 of 200 fit features" in text and "30 are flagged" in text
    assert "`baseline_group:`" in text and "K562 300, TF1 155, HEL 45" in text


def test_chance_zeros_of_a_large_baseline_are_not_warned_of(caplog) -> None:
    """Low genes with no baseline count by chance are flagged, but the baseline is the
    largest group and no gene is off in it: nothing for the user to do."""
    codes = np.repeat([0, 1, 2], [300, 150, 50])
    none = np.zeros(200, bool)
    none[:30] = True
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        _warn_of_baseline(
            LOG, "gene", _groups(["K562", "TF1", "HEL"]), codes, _fitted(none, np.zeros(200, bool))
        )
    assert caplog.records == []


def test_one_group_has_no_baseline_to_warn_of(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        _warn_of_baseline(LOG, "gene", _groups(["all"]), np.zeros(10, int), _fitted(None, None))
    assert caplog.records == []
