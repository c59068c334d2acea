"""A run killed mid-fit or mid-sampling (SIGKILL of a real child process) resumes, and the
resumed store equals the store of a run that was never interrupted.

The child runs `tests/flows/_run_flow.py` against the session's Prefect API; the rerun
runs in this process, under the same harness, so that spies can count what it redoes.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zarr

import tasks.fingerprint
import tasks.fit.fitting
import tasks.sample.sampling
from flows.technical_fit import technical_fit
from tasks.demo import write_demo_inputs
from tasks.fit.checkpoint import decode_state
from tasks.store import CIS_KEY, COMPLETE, fit_key, results_key

#: the end-to-end tier: runs killed in child processes and resumed
pytestmark = pytest.mark.slow

CHECKPOINT = f"{fit_key('gene')}/{tasks.fit.fitting.CHECKPOINT}"
# SVI that never stops early (|a*(loss-ewma)| < 0 never holds) and checkpoints every
# half second: the child is killed right after its first checkpoint, half a second before
# its next one, so the kill does not land in a checkpoint write.
SVI = [
    "fit.niters=250",
    "fit.convergence=ewma",
    "fit.tolerance=0",
    "fit.checkpoint_seconds=0.5",
    "fit.nsamples=20",
]
# The default plateau rule after the Laplace start, from the started guide (which the
# checkpoint holds): it stops after 60 steps here (~0.3 s), so checkpoints come every
# 0.05 s, the first one early enough for the kill to land mid-SVI.
SVI_LAPLACE = ["fit.niters=250", "fit.checkpoint_seconds=0.05", "fit.nsamples=20"]
# A short fit, then many one-draw batches (tens of ms each): a window to kill in.
SAMPLING_DRAWS = 100
SAMPLING = ["fit.niters=60", f"fit.nsamples={SAMPLING_DRAWS}", "fit.minibatch_size=1"]
TIMING_ATTRS = {"fit_seconds", "sampling_seconds", "laplace_seconds"}


# -- fixtures and helpers ---------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small simulated screen (250 cells x 16 features, GFI1B as the cis feature)."""
    return write_demo_inputs(
        tmp_path_factory.mktemp("resume") / "demo",
        n_cells=250,
        n_features=16,
        niters=100,
        nsamples=20,
    )


def _with_store(overrides: list[str], store: Path) -> list[str]:
    return [*overrides, f"store={store}"]


def _chunks_written(array_dir: Path) -> bool:
    """A chunk of the array is on disk (chunk files are written by atomic rename)."""
    return (array_dir / "c").is_dir() and any(p.is_file() for p in (array_dir / "c").rglob("*"))


def _attrs(store: Path, key: str) -> dict:
    """The attributes of a group, {} while it is absent or being rewritten."""
    try:
        return dict(zarr.open_group(str(store / key), mode="r").attrs)
    except (FileNotFoundError, ValueError, KeyError):
        return {}


def _claims_complete(store: Path) -> list[str]:
    """Every group that says `complete: true` at root or results level."""
    root = zarr.open_group(str(store), mode="r")
    claims = ["/"] if root.attrs.get(COMPLETE) else []
    return claims + [
        key
        for key in (results_key("gene"), CIS_KEY)
        if key in root and root[key].attrs.get(COMPLETE)
    ]


def _arrays(group: zarr.Group, prefix: str = "") -> dict[str, np.ndarray]:
    """Every array under `group`, by path."""
    found = {}
    for name, member in group.members():
        if isinstance(member, zarr.Array):
            found[prefix + name] = member[...]
        else:
            found |= _arrays(member, f"{prefix}{name}/")
    return found


def _assert_same_results(store: Path, reference: Path) -> None:
    """Results, cis results, fitted guide and loss trace equal bit for bit; the attrs too,
    except wall-clock timings."""
    got, want = zarr.open_group(str(store), mode="r"), zarr.open_group(str(reference), mode="r")
    assert got.attrs[COMPLETE] is True
    for key in (fit_key("gene"), results_key("gene"), CIS_KEY):
        arrays, expected = _arrays(got[key]), _arrays(want[key])
        assert sorted(arrays) == sorted(expected), key
        for name, values in expected.items():
            assert arrays[name].dtype == values.dtype, f"{key}/{name}"
            np.testing.assert_array_equal(arrays[name], values, err_msg=f"{key}/{name}")
        attrs = {k: v for k, v in got[key].attrs.items() if k not in TIMING_ATTRS}
        assert attrs == {k: v for k, v in want[key].attrs.items() if k not in TIMING_ATTRS}, key


def _uninterrupted(demo: Path, overrides: list[str], store: Path) -> Path:
    technical_fit(str(demo), _with_store(overrides, store))
    return store


class _Messages(logging.Handler):
    """Collects the messages of a logger (Prefect's task-run logger, the SVI loop's)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def messages() -> Iterator[list[str]]:
    handler = _Messages()
    loggers = [
        logging.getLogger(n)
        for n in ("prefect.task_runs", "bayesdream_model.inference", "tasks.fit.fitting")
    ]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    yield handler.messages
    for logger, level in zip(loggers, levels, strict=True):
        logger.removeHandler(handler)
        logger.setLevel(level)


# -- SVI --------------------------------------------------------------------------------
@pytest.mark.parametrize("svi", [SVI, SVI_LAPLACE], ids=["ewma", "laplace_start"])
def test_fit_killed_mid_svi_resumes_from_its_checkpoint(
    demo: Path, tmp_path: Path, child, messages: list[str], svi: list[str]
) -> None:
    # a finished store of other fit options, rerun with SVI's and killed mid-fit
    store = _uninterrupted(demo, [], tmp_path / "killed.zarr")
    assert _claims_complete(store) == ["/", results_key("gene"), CIS_KEY]
    run = child(demo, _with_store(svi, store))
    run.wait_until(lambda: _chunks_written(store / CHECKPOINT), "SVI checkpoint")
    run.kill()

    # what the kill left: a checkpointed fit of these inputs; the old results are still
    # there, but neither they nor the root claim to be complete any more
    assert _claims_complete(store) == []
    assert "alpha_y" in zarr.open_group(str(store / results_key("gene")), mode="r")
    root = zarr.open_group(str(store), mode="r")
    fit = root[fit_key("gene")]
    assert COMPLETE not in fit.attrs and "loss" not in fit
    state = decode_state(fit[tasks.fit.fitting.CHECKPOINT][...].tobytes())
    steps_done = len(state["losses"])
    assert 0 < steps_done < 250

    # the rerun resumes at the checkpoint's step; ingestion and filters are skipped
    technical_fit(str(demo), _with_store(svi, store))
    assert "Modality 'gene': resuming the fit from its checkpoint" in messages
    assert f"SVI resumed at step {steps_done} of 250" in messages
    assert any("ingestion skipped" in m for m in messages)
    assert tasks.fit.fitting.CHECKPOINT not in zarr.open_group(
        str(store / fit_key("gene")), mode="r"
    )

    reference = _uninterrupted(demo, svi, tmp_path / "uninterrupted.zarr")
    # SVI on the CPU with one thread is deterministic, and the checkpoint holds the whole
    # loop state (guide, Adam moments, one-cycle schedule, losses, EWMA, torch RNG, the
    # Laplace start's summary): the resumed fit takes the very same steps, so everything is
    # equal bit for bit.
    _assert_same_results(store, reference)
    attrs = zarr.open_group(str(store), mode="r")[fit_key("gene")].attrs
    assert attrs["niters_run"] > steps_done  # the kill came mid-SVI
    # ewma: no stop (tolerance 0); after the Laplace start the short schedule stops at 60
    assert attrs["niters_run"] == (250 if svi is SVI else 60)
    assert (attrs["laplace_start"] is None) == (svi is SVI)  # ewma: the reference's start


SHORT = [*SVI, "fit.niters=60", "fit.checkpoint_seconds=0.01"]


def _killed_after_a_checkpoint(demo: Path, store: Path, monkeypatch: pytest.MonkeyPatch) -> list:
    """A short fit of `demo` into `store` that dies right after its first checkpoint;
    returns the overrides of that run."""
    overrides = _with_store(SHORT, store)
    save = tasks.fit.fitting._save_checkpoint

    def save_then_die(group: zarr.Group, state: dict) -> None:
        save(group, state)
        raise RuntimeError("killed after a checkpoint")

    monkeypatch.setattr(tasks.fit.fitting, "_save_checkpoint", save_then_die)
    with pytest.raises(RuntimeError, match="killed after a checkpoint"):
        technical_fit(str(demo), overrides)
    monkeypatch.undo()
    return overrides


def test_unreadable_checkpoint_restarts_the_fit(
    demo: Path, tmp_path: Path, messages: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill between a checkpoint's metadata and its bytes leaves a zero-filled array:
    the rerun fits from the start instead of failing on it forever."""
    store = tmp_path / "crashed.zarr"
    overrides = _killed_after_a_checkpoint(demo, store, monkeypatch)
    group = zarr.open_group(str(store / fit_key("gene")), mode="a")
    group.create_array(tasks.fit.fitting.CHECKPOINT, shape=(64,), dtype="uint8", overwrite=True)

    technical_fit(str(demo), overrides)
    assert "Modality 'gene': resuming the fit from its checkpoint" not in messages
    assert any(m.startswith("Unreadable fit checkpoint") for m in messages)
    reference = _uninterrupted(demo, SHORT, tmp_path / "ref.zarr")
    _assert_same_results(store, reference)


class _Payload:
    """Unpickling this creates `path`: a stand-in for code planted in a store."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_planted_pickle_in_a_checkpoint_is_never_run(
    demo: Path, tmp_path: Path, messages: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone who can write into a store replaces a killed fit's checkpoint by a pickle
    (the format of torch.save): resuming reads the store as data and never runs it."""
    store = tmp_path / "planted.zarr"
    overrides = _killed_after_a_checkpoint(demo, store, monkeypatch)
    # the payload is live: unpickling it runs its code
    probe = tmp_path / "probe-ran"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()
    marker = tmp_path / "payload-ran"
    planted = np.frombuffer(pickle.dumps({"losses": [], "evil": _Payload(marker)}), np.uint8)
    group = zarr.open_group(str(store / fit_key("gene")), mode="a")
    group.create_array(
        tasks.fit.fitting.CHECKPOINT, shape=planted.shape, dtype="uint8", overwrite=True
    )[...] = planted

    technical_fit(str(demo), overrides)
    assert not marker.exists()
    assert any("Unreadable fit checkpoint" in m and "not a bayesdream" in m for m in messages)
    assert "Modality 'gene': resuming the fit from its checkpoint" not in messages
    reference = _uninterrupted(demo, SHORT, tmp_path / "ref.zarr")
    _assert_same_results(store, reference)


# -- sampling ---------------------------------------------------------------------------
def test_sampling_killed_mid_way_resumes_without_redrawing(
    demo: Path, tmp_path: Path, child, messages: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "killed.zarr"
    run = child(demo, _with_store(SAMPLING, store))
    run.wait_until(
        lambda: len(_attrs(store, results_key("gene")).get("batches_done", [])) >= 3,
        "three sampled batches",
    )
    run.kill()

    assert _claims_complete(store) == []
    attrs = _attrs(store, results_key("gene"))
    done = attrs["batches_done"]
    assert attrs["sampling_batch_size"] == 1 and 3 <= len(done) < SAMPLING_DRAWS
    assert zarr.open_group(str(store), mode="r")[fit_key("gene")].attrs[COMPLETE] is True

    # the rerun skips the fit, keeps the written batches and draws only the missing ones
    drawn: list[int] = []
    draw_range = tasks.sample.sampling.draw_range

    def counting_draw_range(fitted, start: int, stop: int, **kwargs):
        drawn.append(start)
        return draw_range(fitted, start, stop, **kwargs)

    def no_fit(*args, **kwargs):
        raise AssertionError("the fit was complete: it must not run again")

    monkeypatch.setattr(tasks.sample.sampling, "draw_range", counting_draw_range)
    monkeypatch.setattr(tasks.fit.fitting, "fit_technical", no_fit)
    technical_fit(str(demo), _with_store(SAMPLING, store))
    monkeypatch.undo()
    assert sorted(drawn) == sorted(set(range(SAMPLING_DRAWS)) - set(done))
    assert any(f"resuming sampling, {len(done)} of {SAMPLING_DRAWS} batches" in m for m in messages)

    reference = _uninterrupted(demo, SAMPLING, tmp_path / "uninterrupted.zarr")
    # each batch is seeded from (seed, start) alone: the batches drawn before the kill and
    # those drawn after it are exactly the uninterrupted run's
    _assert_same_results(store, reference)
    assert _claims_complete(store) == ["/", results_key("gene"), CIS_KEY]
