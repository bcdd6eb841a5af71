"""Errors a user can act on. The CLI prints them as one clear message, never as a traceback."""


class AugrelError(Exception):
    """Base of every error augrel reports to its user."""

    exit_code = 2


class ConfigError(AugrelError):
    """A configuration key is unknown or its value is invalid; the message names the key."""


class DataError(AugrelError):
    """Input data is missing or unreadable; the message names the file (and line or column)."""


class ValidationFailed(AugrelError):
    """A table breaks its schema; the message names the column and the first bad row."""

    exit_code = 1
