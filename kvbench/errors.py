"""Errors that reach the user as one line and a non-zero exit code."""


class KvbenchError(Exception):
    """Base of every error the CLI reports as a one-line message."""


class DataError(KvbenchError):
    """A dataset cannot be found, loaded or validated."""


class ConfigError(KvbenchError):
    """A malformed option, dataset config or grid."""


class StoreError(KvbenchError):
    """The store cannot be read or written."""


#: What to do with a file inside a store that kvbench did not write.
MOVE_ASIDE = "move it out of the store directory"
