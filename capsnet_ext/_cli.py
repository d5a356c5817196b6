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


# ------------------------------------------------------------------ the --device option
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
# What users type for a device that torch names otherwise.
_DEVICE_ALIASES = {"gpu": "cuda", "nvidia": "cuda", "cuda0": "cuda:0", "cuda1": "cuda:1"}


def closest(value: str, choices, aliases=None) -> Optional[str]:
    """The choice ``value`` most likely misspells (an alias, or a close match), else ``None``."""
    import difflib

    if aliases and value.lower() in aliases:
        return aliases[value.lower()]
    match = difflib.get_close_matches(value.lower(), [str(c) for c in choices], n=1, cutoff=0.6)
    return match[0] if match else None


def parse_device(value: str, option: str = "--device") -> str:
    """Check a device request the way every command does: ``"auto"``, ``"cpu"``, ``"cuda"``,
    ``"cuda:N"`` or ``"mps"``, on a machine that has it. Returns the value; raises ValueError
    naming ``option``, what was expected and the closest valid choice."""
    import torch

    text = str(value).strip()
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        hint = closest(text, ("auto", "cpu", "cuda", "mps"), _DEVICE_ALIASES)
        raise ValueError(f"{option} {text!r} is not a device; expected one of "
                         f"{', '.join(DEVICE_CHOICES)}" + (f" (did you mean {hint!r}?)" if hint else "")) from None
    if device.type == "cpu":
        return text
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this PyTorch build has no CUDA support (torch " + torch.__version__ + ")"
                   if torch.version.cuda is None else "torch sees no CUDA GPU on this machine")
            raise ValueError(f"{option} {text!r}: {why}; use {option} cpu, or {option} auto "
                             "(a GPU when there is one, else the CPU)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"{option} {text!r}: this machine has {count} CUDA GPU"
                             f"{'s' if count != 1 else ''} (cuda:0" + (f" to cuda:{count - 1}" if count > 1 else "")
                             + ")")
        return text
    if device.type == "mps":
        backend = getattr(torch.backends, "mps", None)
        if backend is None or not backend.is_available():
            raise ValueError(f"{option} {text!r}: Apple's MPS is not available here; use {option} cpu")
        return text
    raise ValueError(f"{option} {text!r}: capsnet-ext runs on {', '.join(DEVICE_CHOICES)}, not on "
                     f"{device.type}")


def device_option(value: str) -> str:
    """``type=`` of every command's ``--device``: argparse reports a bad value as a one-line
    usage error (exit 2), naming the option."""
    import argparse

    try:
        return parse_device(value, option="--device")
    except ValueError as exc:  # argparse says "argument --device: " itself
        raise argparse.ArgumentTypeError(str(exc).replace("--device ", "", 1)) from None


# ------------------------------------------------------------------ argparse types
def _int_at_least(value: str, minimum: int, bound: str) -> int:
    import argparse

    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < minimum:
        raise argparse.ArgumentTypeError(f"must be {bound}, got {number}")
    return number


def positive_int(value: str) -> int:
    """``type=`` for counts that must be at least 1 (argparse names the option)."""
    return _int_at_least(value, 1, "at least 1")


def non_negative_int(value: str) -> int:
    """``type=`` for counts that may be 0 (worker processes)."""
    return _int_at_least(value, 0, "0 or more")


def choice(*choices: str):
    """``type=`` for a fixed set of names (pass ``choices=`` too, for the help): a misspelt
    value is refused with the closest valid one."""
    import argparse

    def parse(value: str) -> str:
        if value in choices:
            return value
        hint = closest(value, choices)
        raise argparse.ArgumentTypeError(
            f"invalid choice {value!r} (choose from {', '.join(choices)})"
            + (f"; did you mean {hint!r}?" if hint else ""))

    parse.__name__ = "choice"
    return parse


def unknown_name(kind: str, value: str, known) -> str:
    """``unknown KIND 'x'; expected one of a, b, c (did you mean 'y'?)``."""
    known = sorted(known)
    hint = closest(value, known)
    return (f"unknown {kind} {value!r}; expected one of {', '.join(known)}"
            + (f" (did you mean {hint!r}?)" if hint else ""))
