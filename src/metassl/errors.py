"""Errors the CLI reports as one line (``metassl: error: ...``) instead of a traceback."""


class MetasslError(Exception):
    """Base of every user-facing error: the message alone must name the problem and the fix."""


class ConfigError(MetasslError, ValueError):
    """A configuration problem (unknown key or preset, wrong type or value)."""


class DataError(MetasslError):
    """A dataset problem (missing files, no network for a download, corrupt image)."""


class DivergenceError(MetasslError, FloatingPointError):
    """Training produced a non-finite loss (too high a learning rate for the method, mostly)."""
