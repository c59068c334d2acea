"""The store layout and what depends on it: the modality names that would collide with a
fixed group are refused, and the module's layout says where the filter flags are."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from stores import npy_store

import tasks.store
from tasks.config import config_from_dict
from tasks.errors import ConfigError
from tasks.filter.flags import read_flags
from tasks.store import CELLS, CIS_KEY, GROUPS, MODALITY_GROUPS, prep_key


def _config(folder: Path, names: list[str]) -> dict:
    (folder / "cells.csv").write_text("cell,target,sum_factor\nc0,ntc,1.0\n")
    (folder / "gene.csv").write_text("feature,c0\nA,1\n")
    modality = {"distribution": "negbinom", "counts": "gene.csv"}
    return {"store": "run.zarr", "cells": "cells.csv", "modalities": dict.fromkeys(names, modality)}


@pytest.mark.parametrize(("name", "key"), [("groups", GROUPS), ("cells", CELLS), ("cis", CIS_KEY)])
def test_a_modality_named_like_a_fixed_group_is_refused(
    tmp_path: Path, name: str, key: str
) -> None:
    """`groups` would write its filter flags into `prep/groups`, the group assignment."""
    with pytest.raises(ConfigError) as caught:
        config_from_dict(_config(tmp_path, ["gene", name]), tmp_path, source="run.yaml")
    message = str(caught.value)
    assert f"modality name '{name}' is reserved" in message
    assert f"fixed group '{key}'" in message
    assert "reserved names: cells, cis, groups" in message
    assert "'gene'" not in message  # an ordinary name passes


def test_every_fixed_group_reserves_the_name_that_reaches_it() -> None:
    """A modality called like a reserved name has a group at the fixed key; any other
    name's groups are all its own."""
    reserved = tasks.store.reserved_modality_names()
    for name, key in reserved.items():
        assert key in {group_key(name) for group_key in MODALITY_GROUPS}
    fixed = set(tasks.store.FIXED_GROUPS)
    for name in ("gene", "guide", "atac", "groups_2"):
        assert not {group_key(name) for group_key in MODALITY_GROUPS} & fixed


def _layout_line(prefix: str) -> str:
    """The text that the module's layout gives beside `prefix` (e.g. `prep/<modality>/`)."""
    for line in (tasks.store.__doc__ or "").splitlines():
        if line.strip().startswith(prefix):
            return line.strip().removeprefix(prefix).strip()
    raise AssertionError(f"no layout line for {prefix}")


def test_layout_places_the_filter_flags_where_they_are_written(tmp_path: Path) -> None:
    root, _ = npy_store(tmp_path, "negbinom", n_groups=2)
    group = root[prep_key("m")]
    written = {name for name, _ in group.arrays()}
    flags = set(read_flags(root, "m").as_dict())
    assert flags <= written and list(group.group_keys()) == []  # no flags/ subgroup
    line = _layout_line("prep/<modality>/")
    assert re.match(r"<flag> \[T\] bool", line), line
    assert "flags/" not in line
