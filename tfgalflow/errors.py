"""The package's exceptions: every user-facing failure names the problem
(and the file, when there is one).

``InputError`` is a ``ValueError`` and ``FileError`` an ``OSError``, so callers that already catch
the builtin types keep working; the CLI turns any ``TfgalflowError`` into a one-line message and
exit code 2.
"""
from __future__ import annotations


class TfgalflowError(Exception):
    """Base class of all errors raised deliberately by tfgalflow."""


class InputError(TfgalflowError, ValueError):
    """Bad data or arguments: wrong shape or width, NaN/inf, missing labels, unknown option,
    n <= 0.
    """


class FileError(TfgalflowError, OSError):
    """A file or directory that is missing, unreadable, corrupt or from an incompatible version."""
