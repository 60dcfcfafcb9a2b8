"""Exceptions the user can cause and fix (bad file, unknown name, impossible setting).

The CLI turns a :class:`UserError` into one line on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: the message alone must say what is wrong and where."""


class DivergedError(UserError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""
