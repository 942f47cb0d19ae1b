"""One exception type for problems the user can fix, and a `main` wrapper that reports them.

Every command-line entry point runs through :func:`run_cli`, so bad input ends with a single line
``error: <what is wrong>`` on stderr and exit status 2 instead of a traceback.
"""
import argparse
import contextlib
import os
import sys


class UserError(Exception):
    """A problem with the user's input (file, value, option) described in one line."""


class StoppedBySignal(Exception):
    """A run that stopped on a signal after saving what it needs to continue; the process exits with
    128 + the signal's number (the shell's convention: 143 for SIGTERM), so a scheduler sees it unfinished."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose usage errors end as one ``error: …`` line, like any bad input."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def run_cli(main, *args, **kwargs):
    """Call ``main``; turn :class:`UserError` (and missing files) into one line and exit 2, and
    :class:`StoppedBySignal` into one line and exit 128 + signal."""
    rank = os.environ.get("RANK")
    try:
        return main(*args, **kwargs)
    except StoppedBySignal as exc:
        if rank in (None, "0"):
            print(f"stopped: {exc}", file=sys.stderr, flush=True)
        sys.exit(128 + exc.signum)
    except UserError as exc:
        message = str(exc)
    except FileNotFoundError as exc:
        message = f"file not found: {exc.filename or exc}"
    except PermissionError as exc:
        message = f"permission denied: {exc.filename or exc}"
    except KeyboardInterrupt:
        message = "interrupted"
    prefix = f"error (rank {rank})" if rank not in (None, "0") else "error"
    print(f"{prefix}: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def require(condition, message):
    """Raise :class:`UserError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise UserError(message)


@contextlib.contextmanager
def about_file(path):
    """Prefix a :class:`UserError` raised inside with the file (or folder) it concerns."""
    try:
        yield
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
