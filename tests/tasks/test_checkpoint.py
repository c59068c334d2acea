"""SVI checkpoints are plain data: they round-trip exactly and refuse anything else."""

from __future__ import annotations

import json
import pickle
import struct

import numpy as np
import pytest
import torch

from bayesdream_model.optim import Adam, OneCycle
from tasks.fit.checkpoint import MAGIC, CheckpointError, decode_state, encode_state


def _loop_like_state() -> dict:
    """What the SVI loop saves: module and optimiser state dicts (int keys, tuples, None),
    a schedule, floats, a loss list, the torch RNG."""
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    optimizer = Adam(params, lr=1e-3)
    scheduler = OneCycle(
        optimizer,
        max_lr=1e-2,
        total_steps=100,
        pct_start=0.3,
        div_factor=25.0,
        final_div_factor=1e4,
    )
    (params[0].sum() + params[1].pow(2).sum()).backward()
    optimizer.step()
    scheduler.step()
    return {
        "guide": {"loc": params[0].detach().clone(), "scale": params[1].detach().clone()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "losses": [1.5e7, 1.25e7, float("inf")],
        "plateau": ((1.0, 2.0), 3),
        "anneal": None,
        "rng": torch.get_rng_state(),
        "flags": np.array([True, False]),
    }


def _equal(a, b) -> None:
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            _equal(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _equal(x, y)
    else:
        assert a == b


def test_round_trip_is_exact_and_restores_an_optimizer() -> None:
    state = _loop_like_state()
    back = decode_state(encode_state(state))
    _equal(dict(state), back)
    assert isinstance(next(iter(back["optimizer"]["state"])), int)
    params = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(4))]
    optimizer = Adam(params, lr=1e-3)
    optimizer.load_state_dict(back["optimizer"])
    assert torch.equal(
        optimizer.state[params[0]]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"]
    )
    torch.set_rng_state(back["rng"])


def test_pickles_and_foreign_bytes_are_refused() -> None:
    for data in (pickle.dumps({"a": 1}), b"", MAGIC, b"PK\x03\x04 a zip file"):
        with pytest.raises(CheckpointError):
            decode_state(data)


def _with_header(header: dict, body: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return MAGIC + struct.pack("<Q", len(text)) + text + body


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "|O", "shape": [1], "offset": 0, "nbytes": 8, "torch": False},
        {"dtype": "<U4", "shape": [1], "offset": 0, "nbytes": 16, "torch": False},
        {"dtype": "<f4", "shape": [4], "offset": 0, "nbytes": 16, "torch": False},  # beyond
        {"dtype": "<f4", "shape": [1], "offset": 0, "nbytes": 8, "torch": False},  # size
        {"dtype": "<f4", "shape": [-1], "offset": 0, "nbytes": 4, "torch": False},
    ],
)
def test_array_entries_other_than_plain_numbers_are_refused(entry: dict) -> None:
    data = _with_header({"tree": {"array": 0}, "arrays": [entry]}, b"\0" * 8)
    with pytest.raises(CheckpointError):
        decode_state(data)


@pytest.mark.parametrize(
    "tree",
    [
        {"function": "os.system"},
        {"value": {"nested": 1}},
        {"array": 3},
        {"dict": [[1.5, {"value": 1}]]},
    ],
)
def test_unknown_nodes_are_refused(tree: dict) -> None:
    with pytest.raises(CheckpointError):
        decode_state(_with_header({"tree": tree, "arrays": []}))


def test_values_that_are_not_data_cannot_be_written() -> None:
    with pytest.raises(CheckpointError, match="function"):
        encode_state({"f": len})
    with pytest.raises(CheckpointError, match="dtype object"):
        encode_state({"a": np.array(["x", 1], dtype=object)})
