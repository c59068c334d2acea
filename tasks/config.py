"""The run configuration: a YAML file validated by pydantic at the flow boundary.

```yaml
store: results/run.zarr          # relative paths are resolved against this file's folder
cells: cells.csv                 # one row per cell: cell, target, covariates, sum_factor
covariates: [cell_line]
modalities:
  gene: {distribution: negbinom, counts: gene_counts.csv, cis_feature: GFI1B}
fit: {niters: 2000, nsamples: 500}
```

AnnData and MuData files are read as they are: `cells: screen.h5mu` (the global obs, or
a modality's with `cells_modality:`), `counts: screen.h5mu` with `modality: rna` and
`layer: counts` (X by default, `raw` for raw.X). The file is opened at validation to
check that the modality and layer exist.

What each `fit:` option changes in the model is described in docs/model.md.

`load_config(path, overrides)` reads the file, applies `--set key.path=value` overrides
and returns a frozen `RunConfig`; every problem (unknown key, bad value, missing file)
is reported at once in a `ConfigError` that names the file and each offending key.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from bayesdream_model.distributions import DISTRIBUTIONS, get_spec
from tasks.anndata_files import (
    check_obs_source,
    check_selection,
    is_anndata_path,
    is_mudata_file,
)
from tasks.errors import ConfigError, InputDataError
from tasks.store import FIXED_GROUPS, reserved_modality_names

Distribution = Literal[DISTRIBUTIONS]  # type: ignore[valid-type]  # from the registry

# Suffixes whose files carry no feature names or cell ids of their own.
UNNAMED_SUFFIXES = (".npy", ".npz")
MODALITY_NAME = re.compile(r"[a-z0-9_]+")
# {name: fixed store group}: a modality of that name would write into that group
RESERVED_MODALITY_NAMES = reserved_modality_names()
_FROZEN = ConfigDict(extra="forbid", frozen=True)


def _resolve(path: Path, info: ValidationInfo) -> Path:
    """Make `path` absolute against the config file's folder (from the validation context)."""
    path = path.expanduser()
    base = (info.context or {}).get("base_dir")
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return path.resolve() if base is not None else path


class ModalityConfig(BaseModel):
    """One measured modality: a features x cells (x K) matrix and its distribution."""

    model_config = _FROZEN

    distribution: Distribution
    counts: Path
    denominator: Path | None = None
    features: Path | None = None
    cells: Path | None = None
    cis_feature: str | None = None
    # AnnData / MuData counts: the matrix (X, raw, or a layers/ name) and the modality
    layer: str | None = None
    modality: str | None = None
    denominator_layer: str | None = None  # binomial: the denominator's layer (default X)

    @field_validator("counts", "denominator", "features", "cells", mode="after")
    @classmethod
    def _input_file_exists(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        """Resolve relative paths and refuse files that are not there."""
        if value is None:
            return None
        path = _resolve(value, info)
        if not path.exists():
            raise ValueError(f"file not found: '{path}'")
        return path

    @model_validator(mode="after")
    def _consistent(self) -> ModalityConfig:
        """Cross-field rules that depend on the distribution and the counts format."""
        problems = []
        spec = get_spec(self.distribution)
        if spec.needs_denominator and self.denominator is None:
            problems.append(
                f"a {self.distribution} modality needs `denominator:` (a matrix of the same shape)"
            )
        if not spec.needs_denominator and self.denominator is not None:
            problems.append(
                f"`denominator:` is only used by binomial modalities, not {self.distribution}"
            )
        unnamed = _has_unnamed_suffix(self.counts)
        if unnamed and (self.features is None or self.cells is None):
            problems.append(
                f"'{self.counts.name}' carries no names: give `features:` and `cells:` "
                "(text files, one name per line)"
            )
        if not unnamed and (self.features is not None or self.cells is not None):
            problems.append(
                f"`features:`/`cells:` are only read for .npy/.npz counts; "
                f"'{self.counts.name}' carries its own feature names and cell ids"
            )
        if self.cis_feature is not None and not spec.supports_cis:
            problems.append(
                f"cis feature on a non-negbinom modality ({self.distribution}): "
                "the cis feature must be on a negbinom modality"
            )
        problems += self._anndata_problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _anndata_problems(self) -> list[str]:
        """`layer:`/`modality:` only for AnnData/MuData files, naming what exists there."""
        problems = []
        for key, path, layer in [
            ("counts", self.counts, self.layer),
            ("denominator", self.denominator, self.denominator_layer),
        ]:
            if path is not None and is_anndata_path(path):
                try:
                    # The denominator's file is read in the same modality when it is MuData.
                    modality = self.modality if key == "counts" else denominator_modality(self)
                    check_selection(path, modality=modality, layer=layer)
                except InputDataError as err:
                    problems.append(f"{key}: {err}")
                continue
            selectors = [layer] + ([self.modality] if key == "counts" else [])
            if any(v is not None for v in selectors):
                given = "`layer:`/`modality:`" if key == "counts" else "`denominator_layer:`"
                shown = "not given" if path is None else f"'{path.name}'"
                problems.append(
                    f"{given} select a matrix in AnnData/MuData files (.h5ad, .h5mu, .zarr), "
                    f"but `{key}:` is {shown}"
                )
        return problems


def denominator_modality(mod: ModalityConfig) -> str | None:
    """The modality the denominator is read from: the counts' one when its file is MuData."""
    if mod.denominator is None or mod.modality is None:
        return None
    return mod.modality if is_mudata_file(mod.denominator) else None


def _has_unnamed_suffix(path: Path) -> bool:
    """True for `.npy` / `.npz` matrices, which need separate name lists."""
    return path.suffix.lower() in UNNAMED_SUFFIXES


class FitConfig(BaseModel):
    """Options for the SVI fit and the posterior draw."""

    model_config = _FROZEN

    niters: int | None = Field(default=None, gt=0)  # None: the distribution's default
    lr: float = Field(default=1e-3, gt=0)
    tolerance: float = Field(default=1e-4, ge=0)
    nsamples: int = Field(default=1000, gt=0)
    minibatch_size: int | None = Field(default=None, gt=0)  # None: planned from memory
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = Field(default=0, ge=0, lt=2**32)  # torch's and numpy's seeds are 32-bit
    # auto: a full covariance per feature, for every family and size; mean_field: the
    # reference bayesDREAM's choice exactly (docs/model.md, section 7)
    guide: Literal["auto", "mean_field", "feature_mvn", "iaf"] = "auto"
    # plateau: stop when the loss no longer improves beyond its noise; ewma: the
    # reference's rule (docs/model.md, section 8)
    convergence: Literal["plateau", "ewma"] = "plateau"
    # laplace: the per-feature guide starts at each feature's MAP and Laplace covariance
    # and SVI polishes it on a short schedule; prior: the initial values and the
    # reference's schedule (docs/model.md, sections 7-8)
    init: Literal["laplace", "prior"] = "laplace"
    threads: int | None = Field(default=None, gt=0)  # torch CPU threads; None = 1
    checkpoint_seconds: float = Field(default=30.0, gt=0)  # SVI state saved this often
    # auto: stream the fit cells from the store in batches when they do not fit the device
    stream_cells: Literal["auto", "always", "never"] = "auto"
    cell_batch: int | None = Field(default=None, gt=0)  # cells per batch; None: planned
    # multinomial baseline prior: flat = Dirichlet(1), calibrated (default);
    # baseline_counts = Dirichlet(baseline counts + 1), the reference bayesDREAM's
    multinomial_baseline_prior: Literal["flat", "baseline_counts"] = "flat"
    # negbinom baseline-mean prior: empirical = learned from the screen's baseline counts,
    # calibrated also for genes off in the baseline group (default); weak = an exponential
    # at the feature's mean over all fit cells; standard_error = sd the robust standard
    # error floored at 10 % of the mean, the reference bayesDREAM's, which counts the
    # baseline cells twice at low depth
    negbinom_baseline_prior: Literal["empirical", "weak", "standard_error"] = "empirical"
    # normal / studentt priors: weak = the effects' scale and the baseline mean's sd at the
    # feature's own spread, calibrated (default); standard_error = the standard error of a
    # mean, the reference bayesDREAM's, which shrinks real shifts between groups
    continuous_prior: Literal["weak", "standard_error"] = "weak"


class RunConfig(BaseModel):
    """A whole run: the store, the cells table, the modalities and the fit options."""

    model_config = _FROZEN

    store: Path
    cells: Path
    cells_modality: str | None = None  # MuData cells: this modality's obs (None: global obs)
    covariates: list[str] = Field(default_factory=list)
    # the baseline technical group (code 0, effect fixed) by its label: the covariate
    # values joined by "|" in covariate order ("all" without covariates); the others keep
    # their sorted order. None: the first in sorted order (docs/model.md, section 2)
    baseline_group: str | None = None
    sum_factor_col: str = "sum_factor"
    use_all_cells: bool = False
    groups_without_ntc: Literal["drop", "error"] = "drop"
    modalities: dict[str, ModalityConfig] = Field(min_length=1)
    fit: FitConfig = FitConfig()

    @field_validator("store", mode="after")
    @classmethod
    def _resolve_store(cls, value: Path, info: ValidationInfo) -> Path:
        """The store need not exist yet; only its path is resolved."""
        return _resolve(value, info)

    @field_validator("cells", mode="after")
    @classmethod
    def _cells_exist(cls, value: Path, info: ValidationInfo) -> Path:
        """The cells table must exist (a file, or an AnnData Zarr folder)."""
        path = _resolve(value, info)
        if not (path.is_file() or (is_anndata_path(path) and path.is_dir())):
            raise ValueError(f"file not found: '{path}'")
        return path

    @model_validator(mode="after")
    def _cells_source(self) -> RunConfig:
        """`cells_modality:` only for MuData cells; the obs it names must exist."""
        if not is_anndata_path(self.cells):
            if self.cells_modality is not None:
                raise ValueError(
                    f"`cells_modality: {self.cells_modality}` picks a MuData modality's obs, "
                    f"but `cells:` is '{self.cells.name}', not a MuData file (.h5mu)"
                )
            return self
        try:
            check_obs_source(self.cells, modality=self.cells_modality)
        except InputDataError as err:
            raise ValueError(f"cells: {err}") from None
        return self

    @field_validator("covariates", mode="after")
    @classmethod
    def _unique_covariates(cls, value: list[str]) -> list[str]:
        """A covariate listed twice is a typo, not a wish."""
        repeated = sorted({c for c in value if value.count(c) > 1})
        if repeated:
            raise ValueError(f"covariates listed more than once: {repeated}")
        return value

    @field_validator("baseline_group", mode="before")
    @classmethod
    def _baseline_label(cls, value: Any) -> Any:
        """A label is text, matched exactly against the group labels; YAML reads
        `baseline_group: 2` as a number, so numbers become their text ("2"). A YAML
        boolean (true, yes, on …) is refused: quote a label that reads like one."""
        if isinstance(value, bool):
            raise ValueError(
                f"baseline_group is the YAML boolean {value}, not a group label: quote the "
                "label (baseline_group: 'yes'), or use null for the first group in sorted order"
            )
        if isinstance(value, int | float):
            return str(value)
        if isinstance(value, str) and not value:
            raise ValueError(
                "baseline_group is empty: give a group's label (covariate values joined by "
                "'|'), or null for the first group in sorted order"
            )
        return value

    @field_validator("modalities", mode="before")
    @classmethod
    def _modality_names(cls, value: Any) -> Any:
        """Names become store keys: lowercase letters, digits and `_`, not reserved."""
        if not isinstance(value, Mapping):
            return value  # pydantic reports the type
        bad = [n for n in value if not MODALITY_NAME.fullmatch(str(n))]
        reserved = [n for n in value if n in RESERVED_MODALITY_NAMES]
        problems = []
        if bad:
            problems.append(f"modality names must match [a-z0-9_]+, got {bad}")
        for name in reserved:
            key = RESERVED_MODALITY_NAMES[name]
            problems.append(
                f"modality name '{name}' is reserved: its groups would collide with the "
                f"store's fixed group '{key}' ({FIXED_GROUPS[key]}); rename the modality "
                f"(reserved names: {', '.join(RESERVED_MODALITY_NAMES)})"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @model_validator(mode="after")
    def _one_cis_feature(self) -> RunConfig:
        """The cis results group holds one feature: at most one modality may name one."""
        with_cis = [n for n, m in self.modalities.items() if m.cis_feature is not None]
        if len(with_cis) > 1:
            raise ValueError(f"only one modality may set cis_feature, got {with_cis}")
        return self


def config_from_dict(
    data: Mapping[str, Any], base_dir: Path, *, source: str | Path | None = None
) -> RunConfig:
    """Validate a config mapping; relative paths are resolved against `base_dir`."""
    origin = f"'{source}'" if source is not None else "(given as a mapping)"
    if not isinstance(data, Mapping):
        raise ConfigError(f"Config {origin} must be a mapping of keys, got {type(data).__name__}.")
    try:
        return RunConfig.model_validate(dict(data), context={"base_dir": Path(base_dir)})
    except ValidationError as err:
        raise ConfigError(_describe(err, origin)) from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML config, apply `key.path=value` overrides and validate it."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"Config file '{path}' does not exist.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"Config file '{path}' is not valid YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"Config file '{path}' must hold a mapping of keys, got {type(data).__name__}."
        )
    for override in overrides:
        data = apply_override(data, override, source=path)
    return config_from_dict(data, path.parent, source=path)


def apply_override(data: dict[str, Any], override: str, *, source: Path | None = None) -> dict:
    """Return a copy of `data` with `a.b.c=value` set (value parsed as YAML)."""
    key, sep, raw = override.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(
            f"Override '{override}' for config '{source}' must look like key.path=value, "
            "e.g. fit.niters=2000."
        )
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"Override '{override}': value is not valid YAML: {err}") from None
    result = dict(data)
    node = result
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(
                f"Override '{override}' for config '{source}': '{where}' is "
                f"{child!r}, not a mapping, so it has no key '{parts[depth + 1]}'."
            )
        node[part] = dict(child)
        node = node[part]
    node[parts[-1]] = value
    return result


def _describe(err: ValidationError, origin: str) -> str:
    """A readable, complete account of pydantic's errors with dotted key locations."""
    unknown, lines = [], []
    for item in err.errors(include_url=False):
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            unknown.append(where + _suggestion(item["loc"]))
            continue
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] not in ("value_error", "missing"):
            message += f" (got {item['input']!r})"
        lines.append(f"  - {where}: {message}")
    if unknown:
        lines.insert(0, f"  - unknown key(s): {', '.join(unknown)}")
    return f"Invalid config {origin}:\n" + "\n".join(lines)


def _suggestion(loc: tuple[str | int, ...]) -> str:
    """' (did you mean fit.niters?)' for a misspelt key, else ''."""
    parent = tuple(str(part) for part in loc[:-1])
    if not parent:
        model: type[BaseModel] = RunConfig
    elif parent == ("fit",):
        model = FitConfig
    elif len(parent) == 2 and parent[0] == "modalities":
        model = ModalityConfig
    else:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean {'.'.join((*parent, close[0]))}?)" if close else ""
