"""Errors users see. Each says what was wrong and what to do, in one line where possible."""


class VelotuneError(Exception):
    """Base class: anything velotune raises on purpose."""


class ConfigError(VelotuneError, ValueError):
    """A bad YAML/CLI configuration (names the bad key)."""


class DataError(VelotuneError, ValueError):
    """A data set that cannot be used as given (names the rows and the reason)."""


class ModelLoadError(VelotuneError, OSError):
    """A model that cannot be loaded (missing folder, offline hub id, unsafe weights)."""
