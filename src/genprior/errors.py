"""The one base class of errors the user must fix (a file, a config key, a value).

Every layer's user-facing exception class derives from :class:`UserError` as well as from its
usual builtin base (``ValueError``, ``FileNotFoundError``), so ``train.py`` and ``evaluate.py``
catch them all in one place and print one line (``one_line``) instead of a traceback;
``GENPRIOR_DEBUG=1`` in the environment keeps the traceback. The message itself names the file,
key or value at fault and what to do.
"""

from __future__ import annotations

import os
import sys

__all__ = ["DEBUG_ENV", "InvalidSettingError", "MissingFileError", "UserError", "debug_enabled",
           "one_line", "report"]

DEBUG_ENV = "GENPRIOR_DEBUG"


class UserError(Exception):
    """Something the user must fix; the message says what and how."""


class MissingFileError(UserError, FileNotFoundError):
    """A file the run needs is not there; the message says where to get it and where it goes."""


class InvalidSettingError(UserError, ValueError):
    """A config value the chosen prior or method cannot use; the message names the key."""


def one_line(err: BaseException) -> str:
    """The error's message on one line (multi-line messages joined with single spaces)."""
    return " ".join(str(err).split()) or type(err).__name__


def debug_enabled() -> bool:
    """True when ``GENPRIOR_DEBUG`` asks for tracebacks (any value but '', '0', 'false', 'no')."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def report(program: str, err: BaseException) -> int:
    """Print ``<program>: error: <one line>`` on stderr; the exit code for it (2)."""
    print(f"{program}: error: {one_line(err)}", file=sys.stderr)
    return 2
