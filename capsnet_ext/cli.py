"""``capsnet-ext`` command line: ``capsnet-ext <command> [args]``.

Each command lives in its own module exposing ``main(argv) -> int``; this file only maps
names to modules, so commands load lazily and independently.
"""
from __future__ import annotations

import importlib
import sys
from typing import List, Optional

COMMANDS = {
    "demo": ("capsnet_ext.demo", "short CapsNet training on MNIST (or scikit-learn digits) on the CPU"),
    "backends": ("capsnet_ext.dispatch_cli", "list backends and why any is unavailable"),
    "bench": ("benchmarks.cli", "benchmark routing backends (see benchmarks/README.md)"),
    "train": ("capsnet_ext.training.cli", "train a CapsNet or baseline from a preset or config"),
    "eval": ("capsnet_ext.training.eval_cli", "evaluate checkpoints and draw figures"),
    "analyze": ("capsnet_ext.analysis.cli", "capsule diagnostics of a trained checkpoint"),
    "gpu-plan": ("capsnet_ext.gpu_plan", "experiments sized for one call on a lent GPU; fold their archive"),
}


def _usage() -> str:
    lines = ["usage: capsnet-ext <command> [args]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"capsnet-ext: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        print(f"capsnet-ext {name}: not available in this installation ({exc})", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
