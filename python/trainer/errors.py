"""The one exception family for problems a user can fix (bad flags, data, files): the CLI prints
these as ``error: ...`` with exit code 2 and no traceback.

    python -m trainer train --data missing/      # error: ... (exit 2)
    TRAINER_DEBUG=1 python -m trainer train ...   # the same, with the traceback

Anything else is a bug and keeps its traceback. The classes subclass the built-in type the code
raised before (ValueError, KeyError, FileNotFoundError), so existing ``except`` clauses still work.
"""
from __future__ import annotations


class UserError(ValueError):
    """A problem the user can fix; the message names it and the fix."""


class UnknownNameError(UserError, KeyError):
    """An unknown model, layer or other name; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class DivergenceError(UserError, FloatingPointError):
    """The loss became NaN or infinite: a training setting (learning rate, clipping) to change."""
