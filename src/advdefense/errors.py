"""Exceptions for mistakes a user can fix.

The CLI turns every :class:`UserError` into a one-line message and exit code 2; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, files or environment, with the fix in its message."""


class InputError(UserError, ValueError):
    """A tensor or argument handed to a public function is malformed."""


class DatasetNotFoundError(UserError, FileNotFoundError):
    """Dataset files are missing and could not be downloaded."""


class CorruptFileError(UserError, ValueError):
    """A file exists but is truncated, has the wrong checksum or is not in the expected format."""


class CheckpointError(UserError, ValueError):
    """A saved model directory cannot be loaded safely."""
