"""Exception classes raised by the model package."""


class ModelError(ValueError):
    """Base class: the model was given inputs it cannot work with."""


class UnknownDistributionError(ModelError):
    """A distribution name that is not in the registry."""


class NoFeaturesLeftError(ModelError):
    """Every feature was excluded by the NTC filters."""


class NonFiniteLikelihoodError(ModelError):
    """A log-likelihood evaluated to NaN or Inf; the message lists every intermediate."""
