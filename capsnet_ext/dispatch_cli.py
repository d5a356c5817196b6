"""``capsnet-ext backends``: which backends run here, and why the others do not."""
from __future__ import annotations

import argparse

from .dispatch import BACKEND_ENV, BACKENDS, env_backend, unavailable_reason


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="capsnet-ext backends", description=__doc__)
    parser.add_argument("--device", default=None, help="device to ask about (default: cuda if present, else cpu)")
    args = parser.parse_args(argv)
    for name in BACKENDS:
        reason = unavailable_reason(name, args.device)
        print(f"{name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    try:
        forced = env_backend()
    except ValueError as exc:
        print(f"problem: {exc}; every op with backend='auto' will fail until it is fixed")
        return 1
    if forced != "auto":
        reason = unavailable_reason(forced, args.device)
        state = "available here" if reason is None else f"NOT available here: {reason}"
        print(f"{BACKEND_ENV}={forced}: replaces backend='auto' everywhere ({state})")
    return 0
