"""Config loading: validation messages name the file and every offending key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tasks.config import FitConfig, RunConfig, config_from_dict, load_config
from tasks.errors import ConfigError


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    """A folder with empty input files the configs can point at."""
    for name in ("cells.csv", "gene.csv", "sj.csv", "sj_total.csv", "m.npy", "f.txt", "c.txt"):
        (tmp_path / name).write_text("")
    return tmp_path


def base(**changes: object) -> dict:
    """A valid config mapping with top-level `changes` applied."""
    data = {
        "store": "out/run.zarr",
        "cells": "cells.csv",
        "covariates": ["cell_line"],
        "modalities": {"gene": {"distribution": "negbinom", "counts": "gene.csv"}},
    }
    data.update(changes)
    return data


def write(folder: Path, data: dict) -> Path:
    """Write `data` as config.yaml in `folder`."""
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_valid_config_resolves_paths_against_its_folder(inputs: Path) -> None:
    cfg = load_config(write(inputs, base()))
    assert isinstance(cfg, RunConfig)
    assert cfg.store == (inputs / "out/run.zarr").resolve()
    assert cfg.cells == (inputs / "cells.csv").resolve()
    assert cfg.modalities["gene"].counts == (inputs / "gene.csv").resolve()
    assert cfg.fit == FitConfig()
    assert cfg.fit.lr == 1e-3 and cfg.fit.nsamples == 1000 and cfg.fit.niters is None


def test_config_is_frozen(inputs: Path) -> None:
    cfg = load_config(write(inputs, base()))
    with pytest.raises(Exception, match="frozen"):
        cfg.fit.lr = 1.0  # type: ignore[misc]


def test_overrides_set_nested_values(inputs: Path) -> None:
    path = write(inputs, base())
    cfg = load_config(
        path,
        [
            "fit.niters=2000",
            "fit.device=cpu",
            "modalities.gene.cis_feature=GFI1B",
            "covariates=[cell_line, lane]",
            "use_all_cells=true",
        ],
    )
    assert cfg.fit.niters == 2000 and cfg.fit.device == "cpu"
    assert cfg.modalities["gene"].cis_feature == "GFI1B"
    assert cfg.covariates == ["cell_line", "lane"]
    assert cfg.use_all_cells is True


def test_override_can_add_a_modality(inputs: Path) -> None:
    cfg = load_config(
        write(inputs, base()),
        ["modalities.sj={distribution: binomial, counts: sj.csv, denominator: sj_total.csv}"],
    )
    assert cfg.modalities["sj"].denominator == (inputs / "sj_total.csv").resolve()


@pytest.mark.parametrize("override", ["fit.niters", "=3", "fit..niters=3"])
def test_malformed_override_is_refused(inputs: Path, override: str) -> None:
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(write(inputs, base()), [override])


def test_override_through_a_scalar_is_refused(inputs: Path) -> None:
    with pytest.raises(ConfigError, match="'store' is .* not a mapping"):
        load_config(write(inputs, base()), ["store.x=1"])


def test_unknown_keys_are_all_named(inputs: Path) -> None:
    data = base(fit={"nitres": 10}, covariate=["x"])
    data["modalities"]["gene"]["count"] = "gene.csv"
    path = write(inputs, data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert "unknown key(s):" in message
    for key in ("fit.nitres", "covariate", "modalities.gene.count"):
        assert key in message
    assert "did you mean fit.niters?" in message


def test_every_bad_value_is_reported_at_once(inputs: Path) -> None:
    path = write(inputs, base(fit={"niters": 0, "lr": -1, "device": "gpu", "tolerance": -1}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    for key in ("fit.niters", "fit.lr", "fit.device", "fit.tolerance"):
        assert f"{key}:" in message
    assert "'gpu'" in message


def test_missing_input_file_names_key_and_path(inputs: Path) -> None:
    data = base()
    data["modalities"]["gene"]["counts"] = "nope.csv"
    with pytest.raises(ConfigError, match=r"modalities\.gene\.counts: file not found: .*nope\.csv"):
        load_config(write(inputs, data))
    with pytest.raises(ConfigError, match=r"cells: file not found: .*absent\.csv"):
        load_config(write(inputs, base(cells="absent.csv")))


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")


def test_config_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(path)


@pytest.mark.parametrize(
    ("modality", "message"),
    [
        ({"distribution": "binomial", "counts": "sj.csv"}, "needs `denominator:`"),
        (
            {"distribution": "negbinom", "counts": "gene.csv", "denominator": "sj.csv"},
            "only used by binomial",
        ),
        ({"distribution": "negbinom", "counts": "m.npy"}, "give `features:` and `cells:`"),
        (
            {"distribution": "negbinom", "counts": "gene.csv", "features": "f.txt"},
            "only read for .npy/.npz",
        ),
        (
            {"distribution": "normal", "counts": "gene.csv", "cis_feature": "GFI1B"},
            "cis feature on a non-negbinom modality",
        ),
        ({"distribution": "poisson", "counts": "gene.csv"}, "distribution: Input should be"),
    ],
)
def test_modality_rules(inputs: Path, modality: dict, message: str) -> None:
    with pytest.raises(ConfigError, match="modalities.bad") as info:
        load_config(write(inputs, base(modalities={"bad": modality})))
    assert message in str(info.value)


def test_npy_with_name_files_is_accepted(inputs: Path) -> None:
    modality = {
        "distribution": "multinomial",
        "counts": "m.npy",
        "features": "f.txt",
        "cells": "c.txt",
    }
    cfg = load_config(write(inputs, base(modalities={"iso": modality})))
    assert cfg.modalities["iso"].features == (inputs / "f.txt").resolve()


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["Gene"], "must match"),
        (["cis"], "reserved"),
        (["gene-x"], "must match"),
        ([], "at least 1"),
    ],
)
def test_modality_names(inputs: Path, names: list[str], message: str) -> None:
    modalities = {n: {"distribution": "negbinom", "counts": "gene.csv"} for n in names}
    with pytest.raises(ConfigError, match=message):
        load_config(write(inputs, base(modalities=modalities)))


def test_only_one_cis_feature(inputs: Path) -> None:
    mod = {"distribution": "negbinom", "counts": "gene.csv", "cis_feature": "A"}
    with pytest.raises(ConfigError, match="only one modality may set cis_feature"):
        load_config(write(inputs, base(modalities={"a": mod, "b": mod})))


def test_repeated_covariate(inputs: Path) -> None:
    with pytest.raises(ConfigError, match=r"covariates listed more than once: \['lane'\]"):
        load_config(write(inputs, base(covariates=["lane", "lane"])))


def test_config_from_dict_uses_base_dir(inputs: Path) -> None:
    cfg = config_from_dict(base(), inputs)
    assert cfg.cells == (inputs / "cells.csv").resolve()
    with pytest.raises(ConfigError, match=r"given as a mapping.*\n.*fit\.seed"):
        config_from_dict(base(fit={"seed": "x"}), inputs)


def test_config_round_trips_through_json(inputs: Path) -> None:
    cfg = load_config(write(inputs, base()))
    again = config_from_dict(cfg.model_dump(mode="json"), Path("/"))
    assert again == cfg


def test_baseline_group_defaults_to_null_and_takes_a_label(inputs: Path) -> None:
    assert load_config(write(inputs, base())).baseline_group is None
    cfg = load_config(write(inputs, base(baseline_group="K562|lane2")))
    assert cfg.baseline_group == "K562|lane2"
    assert load_config(write(inputs, base()), ["baseline_group=HEL"]).baseline_group == "HEL"


def test_number_like_baseline_group_becomes_its_text(inputs: Path) -> None:
    path = write(inputs, base())
    path.write_text(path.read_text() + "baseline_group: 2\n")  # YAML reads an int
    cfg = load_config(path)
    assert cfg.baseline_group == "2" and isinstance(cfg.baseline_group, str)
    assert load_config(write(inputs, base()), ["baseline_group=2.5"]).baseline_group == "2.5"
    assert load_config(write(inputs, base()), ["baseline_group='02'"]).baseline_group == "02"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (True, "baseline_group is the YAML boolean True, not a group label: quote"),
        ("", "baseline_group is empty"),
        (["K562"], r"baseline_group: Input should be a valid string \(got \['K562'\]\)"),
    ],
)
def test_bad_baseline_group_is_refused(inputs: Path, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(inputs, base(baseline_group=value)))
