"""Exception classes for the pipeline's edges (config, input files, store)."""


class PipelineError(Exception):
    """Base class for errors the user can act on."""


class ConfigError(PipelineError):
    """The run configuration is invalid (unknown key, bad value, missing file)."""


class InputDataError(PipelineError):
    """An input file has the wrong shape, ids, columns or values."""


class StoreError(PipelineError):
    """The Zarr store is missing something a step needs, or is incomplete."""


class StoreWriteError(StoreError):
    """The file system refused a write of the store: the disk is full or the quota used
    up, the location is read-only or not writable by the user."""


class InsufficientSpaceError(StoreError):
    """The disk under the store has less free space than the run's results need."""
