"""Errors that reach the user as one line and a non-zero exit code."""


class KvbenchError(Exception):
    """Base of every error the CLI reports as a one-line message."""


class DataError(KvbenchError):
    """A dataset cannot be found, loaded or validated."""


class ConfigError(KvbenchError):
    """A malformed option, dataset config or grid."""
