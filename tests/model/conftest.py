"""Model-test settings: `slow` tests run only when a marker expression asks for them."""

from __future__ import annotations

from pathlib import Path

import pyro
import pytest
import torch

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip this directory's slow tests unless `-m` was given (e.g. `-m slow`)."""
    if config.getoption("markexpr"):
        return
    skip = pytest.mark.skip(reason="slow: run with `-m slow`")
    for item in items:
        if "slow" in item.keywords and HERE in item.path.parents:
            item.add_marker(skip)


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    """Tiny tensors: intra-op threads only add overhead (5-8x slower on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def fresh_param_store():
    """Each test starts with an empty Pyro param store (no state shared through it by name)."""
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()
