"""The one base class of errors the user must fix (a file, a config key, a value).

Every layer's user-facing exception class derives from :class:`UserError` as well as from its
usual builtin base (``ValueError``, ``FileNotFoundError``), so ``train.py`` and ``evaluate.py``
catch them all in one place and print one line (``one_line``) instead of a traceback;
``GENPRIOR_DEBUG=1`` in the environment keeps the traceback. The message itself names the file,
key or value at fault and what to do.

``output_error`` turns an OSError of an output write that the user must fix (ENOSPC, EDQUOT,
EROFS, EACCES) into an ``OutputWriteError`` naming the file and the errno. ``Interrupted`` is
not an error: train.py raises it from its SIGTERM / SIGINT handler to end the fit cleanly.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from collections.abc import Callable

__all__ = ["DEBUG_ENV", "OUTPUT_ERRNOS", "Interrupted", "InvalidSettingError", "MissingFileError",
           "OutputWriteError", "UserError", "debug_enabled", "one_line", "output_error", "report",
           "run_reported"]

DEBUG_ENV = "GENPRIOR_DEBUG"


class UserError(Exception):
    """Something the user must fix; the message says what and how."""


class MissingFileError(UserError, FileNotFoundError):
    """A file the run needs is not there; the message says where to get it and where it goes."""


class InvalidSettingError(UserError, ValueError):
    """A config value the chosen prior or method cannot use; the message names the key."""


class OutputWriteError(UserError, OSError):
    """An output file cannot be written (full disk, quota, read-only or forbidden folder)."""


class Interrupted(BaseException):
    """The run got SIGTERM or SIGINT: raised by train.py's signal handler, so that the fit ends
    through Lightning's ``on_exception`` hooks (the images in flight get an "interrupted" row)
    and train.py exits with 128 + the signal's number. A BaseException, so that no
    ``except Exception`` on the way (a batch's own error handling) swallows it."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(f"interrupted by {signal.Signals(self.signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


#: The errnos of an output write that the user must fix: no space, quota, read-only, forbidden.
OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES})


def output_error(err: OSError, path: str | os.PathLike[str] | None = None) -> OutputWriteError | None:
    """The one-line error for an OSError of ``OUTPUT_ERRNOS`` while writing ``path`` (or the
    error's own file name); None for any other OSError (a bug, left to its traceback)."""
    if err.errno not in OUTPUT_ERRNOS:
        return None
    where = path if path is not None else (err.filename or "an output file")
    meaning = f"{os.strerror(err.errno)} ({errno.errorcode[err.errno]})"
    error = OutputWriteError(f"cannot write {where}: {meaning}; free space or fix the folder's "
                             "permissions, or give another output.dir=<folder>")
    error.errno = err.errno
    return error


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


def run_reported(program: str, run: Callable[[], int]) -> int:
    """``run()``'s exit code, or 2 with one line on stderr (``report``) when it raised a
    UserError or an OSError the user must fix (``output_error``: a full disk, a quota, a
    read-only or forbidden output folder); the traceback with ``GENPRIOR_DEBUG=1``."""
    try:
        return run()
    except UserError as err:
        if debug_enabled():
            raise
        return report(program, err)
    except OSError as err:
        error = output_error(err)
        if error is None or debug_enabled():
            raise
        return report(program, error)
