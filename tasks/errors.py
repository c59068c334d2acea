"""Exception classes for the pipeline's edges (config, input files, store)."""


class PipelineError(Exception):
    """Base class for errors the user can act on."""


class ConfigError(PipelineError):
    """The run configuration is invalid (unknown key, bad value, missing file)."""


class InputDataError(PipelineError):
    """An input file has the wrong shape, ids, columns or values."""


class StoreError(PipelineError):
    """The Zarr store is missing something a step needs, or is incomplete."""
