"""Errors that carry a message meant for the user (bad input, bad config).

The command line turns any :class:`UserError` into its message on stderr and exit code 2;
everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: a file, a key or a value. The message names it."""


class DataError(UserError):
    """A dataset file or manifest is missing, unreadable or inconsistent."""


class RecordsError(UserError):
    """A per-object records file is malformed."""


class ConfigError(UserError):
    """A search-space / study YAML is invalid."""
