"""``capsnet-ext train``: train a CapsNet or the baseline CNN from a preset or a config file.

Examples::

    capsnet-ext train --preset mnist --out runs/mnist
    capsnet-ext train --out runs/quick --max-steps 200 --train-limit 2000 --test-limit 1000
                                                                # a short CPU run
    capsnet-ext train --resume runs/mnist                       # continue where it stopped
    capsnet-ext train --preset mnist --out runs/mnist --overwrite   # start again from scratch
    torchrun --nproc_per_node=8 -m capsnet_ext.cli train --preset mnist --batch-size 1024
    capsnet-ext train --list-presets

A new run refuses a run folder that is not empty: continue it with --resume or replace it
with --overwrite. The test set is scored every --eval-every steps (default: once per epoch,
but never more test images than training images in between) and after the last step;
--test-limit N scores only the first N test images, the quickest way to shorten a CPU run.

Values of --set are JSON (numbers, true/false, null, "strings", [lists], {objects}); a value
that is not valid JSON is taken as a plain string (--set dataset=fashion-mnist). Every value is
checked against the config field's type, and model.* keys against the model's arguments.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import List, Optional

from .._cli import choice, device_option, non_negative_int, positive_int, run_command
from .config import PRESETS, RESUME_CHANGEABLE, TrainConfig, describe_preset, load_config


def _parse_set(values: List[str]) -> dict:
    """``--set a.b=JSON`` pairs as a nested dict (``--set model.conv_channels=128``); a value
    that is not valid JSON is kept as a string (the config's type checks then decide)."""
    result: dict = {}
    for item in values:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise ValueError(f"--set expects KEY=VALUE with KEY a field name or field.key, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return result


BACKENDS = ("auto", "reference", "triton", "cuda")
PRECISIONS = ("fp32", "bf16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capsnet-ext train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", help=f"named experiment ({', '.join(sorted(PRESETS))})")
    parser.add_argument("--config", help="JSON file of TrainConfig fields (may name a 'preset')")
    parser.add_argument("--data-dir", help="folder searched first for dataset files")
    parser.add_argument("--no-download", action="store_true",
                        help="never download missing data files (docs/data.md: where they come from)")
    parser.add_argument("--out", help="run folder: logs, checkpoints, metrics.json")
    parser.add_argument("--epochs", type=positive_int)
    parser.add_argument("--max-steps", type=positive_int, help="train this many optimizer steps (replaces --epochs)")
    parser.add_argument("--batch-size", type=positive_int, help="global batch (split across DDP ranks)")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--backend", choices=BACKENDS, type=choice(*BACKENDS))
    parser.add_argument("--iterations", type=positive_int, help="routing iterations")
    parser.add_argument("--precision", choices=PRECISIONS, type=choice(*PRECISIONS))
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", type=device_option, help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--resume", nargs="?", const="__out__",
                        help="checkpoint file or run folder to continue from (no value: --out)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in --out even if it holds an earlier run (which is removed)")
    parser.add_argument("--num-workers", type=non_negative_int)
    parser.add_argument("--log-every", type=positive_int)
    parser.add_argument("--eval-every", type=positive_int,
                        help="score the test set every N steps (default: once per epoch, but never "
                             "more test images than training images in between; always at the end)")
    parser.add_argument("--checkpoint-every", type=positive_int)
    parser.add_argument("--train-limit", type=positive_int, help="use the first N training examples")
    parser.add_argument("--test-limit", type=positive_int,
                        help="use the first N test examples (evaluation is quicker; the numbers "
                             "are then on N images)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="any config field, nested with dots: --set model.conv_channels=128 "
                             "(JSON; a non-JSON value is a string)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (the start-up, evaluation and summary lines stay)")
    parser.add_argument("--json", action="store_true",
                        help="print the final metrics as JSON on stdout (the other lines go to stderr)")
    parser.add_argument("--no-tensorboard", action="store_true")
    parser.add_argument("--list-presets", action="store_true")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def config_from_args(args) -> TrainConfig:
    overrides = dict(data_dir=args.data_dir, out=args.out, epochs=args.epochs,
                     max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
                     backend=args.backend, iterations=args.iterations, precision=args.precision,
                     seed=args.seed, device=args.device, num_workers=args.num_workers,
                     log_every=args.log_every, eval_every=args.eval_every,
                     checkpoint_every=args.checkpoint_every)
    options = {}
    if args.train_limit is not None:
        options["train_limit"] = args.train_limit
    if args.test_limit is not None:
        options["test_limit"] = args.test_limit
    if args.no_download:
        options["download"] = False
    if options:
        overrides["dataset_options"] = options
    if args.no_progress:
        overrides["progress"] = False
    if args.no_tensorboard:
        overrides["tensorboard"] = False
    extra = _parse_set(args.set)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(overrides.get(key), dict):
            overrides[key].update(value)
        else:
            overrides[key] = value
    if args.resume is not None:
        # Continue the saved run: its config, changed only by the options that may change.
        from .checkpoint import load_checkpoint
        from .config import TrainConfig, _merge

        if args.preset is not None or args.config is not None:
            raise ValueError("--resume continues the saved run with its own config; --preset and "
                             "--config cannot be given with it (start a new run with --out, or "
                             "replace the run with --overwrite)")
        path = resume_path(args)
        saved = load_checkpoint(path)["config"]
        given = {k: v for k, v in overrides.items() if v is not None}
        check_resume_overrides(saved, given)
        if args.out is None:
            given["out"] = str(run_dir_of(path))
        return TrainConfig(**_merge(saved, given))
    preset = args.preset
    if preset is None and args.config is None:
        preset = "mnist"
    return load_config(preset=preset, path=args.config, **overrides)


# The command-line spelling of config fields, for messages.
OPTION_OF = dict(data_dir="--data-dir", max_steps="--max-steps", batch_size="--batch-size",
                 lr="--lr", backend="--backend", iterations="--iterations",
                 precision="--precision", seed="--seed", device="--device",
                 num_workers="--num-workers", log_every="--log-every", eval_every="--eval-every",
                 checkpoint_every="--checkpoint-every", epochs="--epochs", out="--out",
                 progress="--no-progress", tensorboard="--no-tensorboard",
                 device_data="--set device_data")
_DATASET_OPTION = dict(train_limit="--train-limit", test_limit="--test-limit")
# Dataset options a resumed run may change: they decide how files are found, not the data.
_DATASET_CHANGEABLE = ("download",)


def _changed(saved, given, prefix=""):
    """``(dotted key, saved value, given value)`` for every leaf of ``given`` that differs."""
    out = []
    for key, value in given.items():
        old = saved.get(key) if isinstance(saved, dict) else None
        if isinstance(value, dict) and isinstance(old, dict):
            out += _changed(old, value, f"{prefix}{key}.")
        elif value != old:
            out.append((f"{prefix}{key}", old, value))
    return out


def check_resume_overrides(saved: dict, given: dict) -> None:
    """Refuse, in one line naming each option, values given with --resume that a resumed run
    cannot take (the saved run's own values are accepted as they are)."""
    refused = []
    for key, old, new in _changed(saved, {k: v for k, v in given.items()
                                          if k not in RESUME_CHANGEABLE}):
        top, _, rest = key.partition(".")
        if top == "dataset_options" and rest in _DATASET_CHANGEABLE:
            continue
        if top == "dataset_options" and rest in _DATASET_OPTION:
            option = _DATASET_OPTION[rest]
        else:
            option = OPTION_OF.get(key) or f"--set {key}"
        refused.append(f"{option} {json.dumps(new)} (the run has {json.dumps(old)})")
    if refused:
        changeable = ", ".join([OPTION_OF.get(k, k) for k in RESUME_CHANGEABLE if k != "out"]
                               + ["--no-download"])
        raise ValueError(f"--resume: {'; '.join(refused)}: a resumed run keeps its model, data, "
                         f"optimiser and seed; it can change only {changeable} (start a new run "
                         f"with another --out, or --overwrite this one)")


def resume_path(args) -> pathlib.Path:
    if args.resume == "__out__":
        if args.out is None:
            raise ValueError("--resume without a value needs --out (the run folder)")
        path = pathlib.Path(args.out)
    else:
        path = pathlib.Path(args.resume)
    if not path.exists():
        raise FileNotFoundError(f"--resume: {str(path)!r} does not exist (give a run folder or a "
                                "checkpoint file)")
    if path.is_dir() and not any((path / sub).is_file() for sub in ("checkpoints/last.pt", "last.pt")):
        raise FileNotFoundError(f"--resume: the run folder {str(path)!r} holds no checkpoints/last.pt, "
                                "so there is nothing to resume (start a new run there with --overwrite)")
    return path


def run_dir_of(path: pathlib.Path) -> pathlib.Path:
    """The run folder of a checkpoint file (``<run>/checkpoints/last.pt``) or folder."""
    path = pathlib.Path(path)
    if path.is_dir():
        return path
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


SUMMARY_KEYS = ("out", "step", "epoch", "test_error", "best_error", "best_step",
                "seconds_per_epoch", "images_per_sec", "backend", "best_checkpoint",
                "last_checkpoint", "interrupted", "finished")


def list_presets(stream=None) -> None:
    stream = stream or sys.stdout
    width = max(map(len, PRESETS)) + 2
    for name in sorted(PRESETS):
        print(f"{name:<{width}}{describe_preset(name)}", file=stream)


def _main(argv: List[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.list_presets:
        list_presets()
        return 0
    if args.resume is not None and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the run, or replace it")
    cfg = config_from_args(args)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    resume = str(resume_path(args)) if args.resume is not None else None
    from .logging_utils import Console
    from .trainer import train

    console = Console(sys.stderr if args.json else sys.stdout, bar=cfg.progress)
    result = train(cfg, resume=resume, overwrite=args.overwrite, console=console)
    if args.json:
        summary = {k: result.get(k) for k in SUMMARY_KEYS}
        summary["finished"] = bool(summary["finished"])
        print(json.dumps(summary, indent=2))
    return 130 if result["interrupted"] else 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_command("capsnet-ext train", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
