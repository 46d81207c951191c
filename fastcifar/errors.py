"""Errors that the command-line tools turn into a one-line message and a non-zero exit."""


class FastCifarError(Exception):
    """Base class: bad input or environment, explained in the message (no traceback needed)."""


class DataError(FastCifarError):
    """Missing, corrupt or unsuitable data files (archives, betons)."""
