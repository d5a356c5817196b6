"""What every ``capsnet-ext`` command does with errors a user can cause.

Missing or corrupt data, an unreadable checkpoint, a bad config value, a backend that cannot
run, a run folder that would be overwritten: these are expected, and their messages already
say what is wrong and how to fix it. A command prints such a message on stderr, prefixed with
its name, and exits with status 2, without a traceback. Anything else is a bug and keeps its
traceback. ``CAPSNET_EXT_TRACEBACK=1`` shows the traceback of expected errors too.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, List, Optional

TRACEBACK_ENV = "CAPSNET_EXT_TRACEBACK"
EXIT_USER_ERROR = 2


def expected_errors() -> tuple:
    """The exception types a command reports as a message: file and data errors (``OSError``
    covers missing files, ``FileExistsError`` and permissions), bad values (``ValueError``
    covers corrupt data, bad configs and checkpoints) and unavailable backends."""
    from .dispatch import BackendUnavailableError

    return (OSError, ValueError, BackendUnavailableError)


def run_command(prog: str, body: Callable[[List[str]], Optional[int]],
                argv: Optional[List[str]] = None) -> int:
    """Call ``body(argv)``; an expected error becomes ``prog: error: message`` and exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return int(body(argv) or 0)
    except expected_errors() as exc:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        message = str(exc) or type(exc).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
