"""``capsnet-ext analyze CHECKPOINT``: capsule diagnostics of a trained model on its test set.

Writes ``report.md`` (a table per routing layer), ``metrics.json`` and PNG plots (dead
fraction, bonding/dynamics, mean length per layer and, when the run recorded one, a heat map
of the per-capsule gradient norms over training) into ``--out`` (default:
``<run folder>/analysis``).

``capsnet-ext analyze depth-study [...]`` runs the depth study instead
(:mod:`capsnet_ext.analysis.depth_study`; ``--help`` there), and ``capsnet-ext analyze
seed-paper collect|report [...]`` collects and reports the runs of the ``seed-paper`` presets
(:mod:`capsnet_ext.analysis.seed_paper`).
"""
from __future__ import annotations

import argparse
import datetime
import pathlib
import platform
import shlex
import sys
from typing import List, Optional

import torch

from .gradient_flow import NPZ_NAME, load_gradient_flow


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def provenance(device: torch.device, command: Optional[str] = None) -> dict:
    """Device, versions, date and command, for the top of every report."""
    import capsnet_ext

    desc = str(device)
    if device.type == "cuda":
        desc += f" ({torch.cuda.get_device_name(device)})"
    else:
        desc += f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return dict(device=desc, torch=torch.__version__, capsnet_ext=capsnet_ext.__version__,
                python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                command=command or "capsnet-ext analyze " + " ".join(shlex.quote(a) for a in sys.argv[2:]))


def find_gradient_flow(checkpoint: pathlib.Path, run_dir: pathlib.Path) -> Optional[pathlib.Path]:
    """The ``gradient_flow.npz`` of a run: in the run folder (the trainer's ``out``, which
    holds ``checkpoints/``) or beside the checkpoint. (The ``out`` of the stored config is not
    searched: it may be a relative path that now names another run.)"""
    for folder in (run_dir, checkpoint.parent if checkpoint.is_file() else checkpoint):
        if (folder / NPZ_NAME).is_file():
            return folder / NPZ_NAME
    return None


def analyze_checkpoint(checkpoint, *, out=None, data_dir=None, device="auto", batch_size: int = 256,
                       limit: Optional[int] = None, gradient_flow=None, command: Optional[str] = None,
                       dataset=None) -> dict:
    """Load a checkpoint, run the metrics on its test set, write the report.

    ``dataset`` (a ``DatasetBundle``, whose ``test`` split is used, or any dataset of
    ``{"image", "label"}`` items) replaces the data set named in the checkpoint's config, e.g.
    for a model trained on in-memory data passed to ``train(..., datasets=...)``.

    Returns ``{"result": analyze_model's dict, "paths": written files, "out": folder}``.
    """
    from ..data import build_datasets
    from ..training import load_checkpoint
    from ..training.checkpoint import model_from_checkpoint
    from .collect import analyze_model
    from .report import write_analysis_report

    checkpoint = pathlib.Path(checkpoint)
    ckpt = load_checkpoint(checkpoint)
    if checkpoint.is_dir():
        run_dir = checkpoint
    else:
        run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    out = pathlib.Path(out) if out is not None else run_dir / "analysis"
    device = resolve_device(device)
    model = model_from_checkpoint(ckpt)
    config = ckpt.get("config") or {}
    if dataset is not None:
        test_set = getattr(dataset, "test", dataset)
        dataset_name = getattr(dataset, "name", None) or getattr(test_set, "name", type(test_set).__name__)
    else:
        dataset_name = config.get("dataset")
        if not dataset_name:
            raise ValueError(f"checkpoint {str(checkpoint)!r} does not name its dataset (config['dataset'])")
        options = dict(config.get("dataset_options") or {})
        options.pop("train_limit", None)  # only the test split is used
        # Generated test sets (MultiMNIST, affine MNIST) depend on the run's seed.
        test_set = build_datasets(dataset_name, data_dir=data_dir or config.get("data_dir"),
                                  seed=config.get("seed", 0), **options).test
    result = analyze_model(model, test_set, batch_size=batch_size, limit=limit, device=device)

    if gradient_flow is None:
        gradient_flow = find_gradient_flow(checkpoint, run_dir)
    flow = load_gradient_flow(gradient_flow) if gradient_flow is not None else None
    meta = dict(checkpoint=str(checkpoint), step=ckpt.get("step"), dataset=f"{dataset_name} (test split)",
                model=ckpt["model_config"].get("arch"))
    meta.update(provenance(device, command))
    if gradient_flow is not None:
        meta["gradient_flow"] = str(gradient_flow)
    paths = write_analysis_report(result, out, meta=meta, gradient_flow=flow)
    return dict(result=result, paths=paths, out=out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="capsnet-ext analyze",
        description="Capsule diagnostics (dead capsules, inactive instances, bonding, dynamics, "
                    "T/D scores, gradient flow) of a trained checkpoint on its test set. "
                    "'capsnet-ext analyze depth-study --help' for the depth study.")
    p.add_argument("checkpoint", help="checkpoint file (or run folder with checkpoints/last.pt)")
    p.add_argument("--data-dir", default=None, help="folder with the data set files (default: $CAPSNET_DATA)")
    p.add_argument("--out", default=None, help="report folder (default: <run folder>/analysis)")
    from .._cli import device_option, positive_int

    p.add_argument("--device", default="auto", type=device_option,
                   help="cpu, cuda, cuda:1, ... (default: a GPU if present)")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--limit", type=positive_int, default=None, help="analyse only the first N test images")
    p.add_argument("--gradient-flow", default=None,
                   help=f"{NPZ_NAME} to plot (default: searched beside the checkpoint)")
    return p


def short_summary(result: dict) -> List[str]:
    """A few lines for the terminal; the full table is in ``report.md``."""
    from .report import fmt

    lines = [f"analysed {result['num_inputs']} test images"
             + (f", accuracy {100 * result['accuracy']:.2f}%" if result["accuracy"] == result["accuracy"] else "")]
    for k, m in enumerate(result["layers"], 1):
        def pct(key):
            value = m.get(key)
            return "n/a" if value is None or value != value else f"{100 * value:.1f}%"
        lines.append(f"routing layer {k} ({m['lower_capsules']} -> {m['upper_capsules']} capsules): "
                     f"dead {pct('dead_rate')}, inactive {pct('inactive_rate')}, bonding "
                     f"{fmt(m.get('bonding'), 3)}, dynamics {fmt(m.get('dynamics'), 3)}, "
                     f"activation-coupling r {fmt(m.get('act_coupling_corr'), 3)}")
    return lines


def _main(argv: List[str]) -> int:
    if argv and argv[0] == "depth-study":
        from .depth_study import main as depth_main

        return depth_main(argv[1:])
    if argv and argv[0] == "seed-paper":
        from .seed_paper import main as seed_paper_main

        return seed_paper_main(argv[1:])
    args = build_parser().parse_args(argv)
    command = "capsnet-ext analyze " + " ".join(shlex.quote(a) for a in argv)
    done = analyze_checkpoint(args.checkpoint, out=args.out, data_dir=args.data_dir, device=args.device,
                              batch_size=args.batch_size, limit=args.limit,
                              gradient_flow=args.gradient_flow, command=command)
    for line in short_summary(done["result"]):
        print(line)
    paths = done["paths"]
    others = [pathlib.Path(p).name for key, p in paths.items() if key != "report" and p]
    print(f"full table and definitions: {paths['report']}"
          + (f"; also {', '.join(others)} in {done['out']}" if others else ""))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from .._cli import run_command

    return run_command("capsnet-ext analyze", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
