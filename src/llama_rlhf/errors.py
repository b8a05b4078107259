"""The one error type for bad input: a flag, a file, a record, a checkpoint the user gave.

`cli.run_cli` turns a `UsageError` into one line and exit 2. Anything else is a bug and keeps
its traceback (exit 1). It subclasses ValueError so library callers can catch either.
"""
from __future__ import annotations


class UsageError(ValueError):
    """The user's input is wrong; the message names the flag, file or record."""


class MissingPathError(UsageError, FileNotFoundError):
    """A path the user named does not exist."""
