"""``capsnet-ext backends``: which backends run here, and why the others do not."""
from __future__ import annotations

import argparse

from .dispatch import BACKENDS, unavailable_reason


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="capsnet-ext backends", description=__doc__)
    parser.add_argument("--device", default=None, help="device to ask about (default: cuda if present, else cpu)")
    args = parser.parse_args(argv)
    for name in BACKENDS:
        reason = unavailable_reason(name, args.device)
        print(f"{name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    return 0
