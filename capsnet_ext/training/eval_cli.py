"""``capsnet-ext eval CHECKPOINT [CHECKPOINT ...]``: test metrics and figures.

For each checkpoint: test error, per-class accuracy and confusion matrix on its dataset's test
set (MultiMNIST counts an example right only when both labels are right; an ``affnist``
checkpoint is also scored on the untransformed MNIST test digits padded to 40x40, the paper's
pair of numbers). With several checkpoints of the same task, also the ensemble of their
averaged class scores (the CIFAR-10 recipe). ``--figures`` draws reconstructions, the
capsule-dimension perturbation grid, MultiMNIST colour reconstructions, routing-logit
changes per iteration, the confusion matrix and the training curves (from the run folder).

Examples::

    capsnet-ext eval runs/mnist/checkpoints/best.pt --figures
    capsnet-ext eval runs/cifar10-*/checkpoints/best.pt --out runs/cifar10-ensemble
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import List, Optional

import torch

from .._cli import choice, device_option, positive_int, run_command
from .augment import BatchAugmenter
from .checkpoint import atomic_write_text, load_checkpoint, model_from_checkpoint
from .distributed import resolve_device
from .evaluation import ensemble_metrics, evaluate


BACKENDS = ("auto", "reference", "triton", "cuda")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capsnet-ext eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="checkpoint files or run folders")
    parser.add_argument("--data-dir", help="folder searched first for dataset files")
    parser.add_argument("--no-download", action="store_true",
                        help="never download missing data files (docs/data.md: where they come from)")
    parser.add_argument("--device", default="auto", type=device_option,
                        help="auto (a GPU if present, else the CPU), cpu, cuda, cuda:1, ...")
    parser.add_argument("--backend", choices=BACKENDS, type=choice(*BACKENDS),
                        help="routing backend to evaluate with (default: the checkpoint's)")
    parser.add_argument("--iterations", type=positive_int, help="routing iterations at test time")
    parser.add_argument("--batch-size", type=positive_int, default=256)
    parser.add_argument("--test-limit", type=positive_int, help="score the first N test examples")
    parser.add_argument("--precision", choices=("fp32", "bf16"), type=choice("fp32", "bf16"),
                        default="fp32")
    parser.add_argument("--out", help="folder for eval.json and figures (default: the first "
                                      "checkpoint's run folder / eval)")
    parser.add_argument("--figures", action="store_true", help="draw the PNG figures")
    parser.add_argument("--routing-iterations", type=int, default=10,
                        help="iterations shown in the routing-logit figure")
    return parser


def _run_dir(path: pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(path)
    if path.is_dir():
        return path
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def _bundle_for(ckpt: dict, data_dir, test_limit, download: bool = True):
    from ..data import build_datasets

    config = ckpt["config"]
    options = dict(config.get("dataset_options") or {})
    options["download"] = download and options.get("download", True)
    options.pop("train_limit", None)
    options["train_limit"] = 1  # only the test split is needed
    if test_limit is not None:
        options["test_limit"] = test_limit
    return build_datasets(config["dataset"], data_dir or config.get("data_dir"),
                          seed=config.get("seed", 0), **options)


def _padded_mnist_test(data_dir, test_limit, size: int, download: bool = True):
    from ..data import build_datasets, pad_to
    from ..data.base import ImageDataset

    test = build_datasets("mnist", data_dir, train_limit=1, test_limit=test_limit,
                          download=download).test
    return ImageDataset(pad_to(test.images, size), test.labels, name=f"mnist-test-{size}x{size}")


def evaluate_checkpoint(path, *, data_dir=None, device="auto", backend=None, iterations=None,
                        batch_size=256, test_limit=None, precision="fp32", bundle=None,
                        console=None, download: bool = True):
    """Metrics of one checkpoint on its task's test set; returns ``(metrics, model, bundle,
    ckpt)`` with ``metrics["scores"]`` kept for ensembles. ``console`` (a
    :class:`~capsnet_ext.training.logging_utils.Console`) shows progress while scoring;
    ``download=False`` never fetches missing data files."""
    from .evaluation import evaluation_batches

    ckpt = load_checkpoint(path)
    device = resolve_device(device)
    overrides = {}
    arch = ckpt["model_config"].get("arch")
    if backend is not None and arch != "baseline-cnn":
        overrides["backend"] = backend
    if iterations is not None and arch != "baseline-cnn":
        overrides["iterations"] = iterations
    model = model_from_checkpoint(ckpt, **overrides).to(device)
    if bundle is None:
        bundle = _bundle_for(ckpt, data_dir, test_limit, download)
    config = ckpt["config"]
    transform = BatchAugmenter(0, 0, config.get("crop_size")).evaluation
    common = dict(num_classes=bundle.num_classes, multi_label=bundle.multi_label, device=device,
                  batch_size=batch_size, precision=precision,
                  recon_weight=config.get("recon_weight", 0.0005),
                  recon_target=config.get("recon_target", "input"), margin=config.get("margin"),
                  transform=transform)
    def progress_for(dataset):
        if console is None:
            return None
        batches, items = evaluation_batches(dataset, batch_size=batch_size, limit=test_limit)
        return console.eval_progress(batches, items)

    metrics = evaluate(model, bundle.test, return_scores=True, limit=test_limit,
                       progress=progress_for(bundle.test), **common)
    metrics["dataset"] = config["dataset"]
    metrics["step"] = ckpt["step"]
    if config["dataset"] == "affnist":
        mnist = _padded_mnist_test(data_dir or config.get("data_dir"), test_limit,
                                   ckpt["model_config"].get("input_size", 40), download)
        plain = evaluate(model, mnist, progress=progress_for(mnist), **common)
        metrics["affine_accuracy"] = metrics["accuracy"]
        metrics["mnist_padded_accuracy"] = plain["accuracy"]
    if bundle.multi_label:
        metrics["multimnist_accuracy"] = metrics["accuracy"]
    return metrics, model, bundle, ckpt


def draw_figures(model, bundle, ckpt, metrics, out_dir: pathlib.Path, run_dir: pathlib.Path,
                 routing_iterations: int = 10) -> List[str]:
    """Every figure that applies to this model and task; returns the paths written."""
    from . import figures

    written = []
    device = next(model.parameters()).device
    count = min(8, len(bundle.test))
    items = [bundle.test[i] for i in range(count)]
    batch = torch.utils.data.default_collate(items)
    batch = BatchAugmenter(0, 0, ckpt["config"].get("crop_size")).evaluation(batch)
    written.append(figures.plot_confusion(metrics["confusion"], out_dir / "confusion.png"))
    capsule = hasattr(model, "reconstruct") and getattr(model, "decoder", None) is not None
    if capsule:
        if bundle.multi_label:
            written.append(figures.plot_multimnist(model, batch, out_dir / "multimnist_reconstructions.png"))
        else:
            written.append(figures.plot_reconstructions(model, batch["image"], out_dir / "reconstructions.png",
                                                        batch["label"]))
        written.append(figures.plot_perturbation_grid(model, batch["image"][0], out_dir / "perturbation_grid.png"))
    if hasattr(model, "primary_capsules") and hasattr(model, "digits"):
        changes = figures.routing_logit_changes(model, batch["image"].to(device), routing_iterations)
        metrics["routing_logit_changes"] = changes
        written.append(figures.plot_routing_dynamics({f"step {ckpt['step']}": changes},
                                                     out_dir / "routing_logit_changes.png",
                                                     trained_iterations=getattr(model.digits, "iterations", None)))
    if (run_dir / "train_log.csv").is_file():
        written.append(figures.plot_training_curves(run_dir, out_dir / "training_curves.png"))
    return [str(p) for p in written]


def _main(argv: List[str]) -> int:
    from .logging_utils import Console

    args = build_parser().parse_args(argv)
    console = Console(sys.stderr, prefix="")
    results, scores, labels = [], [], None
    multi_label = False
    first_run = _run_dir(args.checkpoints[0])
    out_dir = pathlib.Path(args.out) if args.out else first_run / "eval"
    bundle_cache = {}
    for index, path in enumerate(args.checkpoints):
        ckpt_config = load_checkpoint(path)["config"]
        key = (ckpt_config["dataset"], json.dumps(ckpt_config.get("dataset_options"), sort_keys=True),
               ckpt_config.get("seed"))
        metrics, model, bundle, ckpt = evaluate_checkpoint(
            path, data_dir=args.data_dir, device=args.device, backend=args.backend,
            iterations=args.iterations, batch_size=args.batch_size, test_limit=args.test_limit,
            precision=args.precision, bundle=bundle_cache.get(key), console=console,
            download=not args.no_download)
        bundle_cache[key] = bundle
        multi_label = bundle.multi_label
        scores.append(metrics.pop("scores"))
        labels = metrics.pop("labels")
        metrics["checkpoint"] = str(path)
        line = f"{path}: {metrics['dataset']} test error {100 * metrics['error']:.2f}% " \
               f"({metrics['n']} examples, step {metrics['step']})"
        if "affine_accuracy" in metrics:
            line += (f"; affine accuracy {100 * metrics['affine_accuracy']:.2f}%, "
                     f"padded MNIST accuracy {100 * metrics['mnist_padded_accuracy']:.2f}%")
        print(line, flush=True)
        if args.figures:
            target = out_dir if len(args.checkpoints) == 1 else out_dir / f"model{index}"
            console.line("drawing figures ...")
            metrics["figures"] = draw_figures(model, bundle, ckpt, metrics, target, _run_dir(path),
                                              args.routing_iterations)
            print(f"figures in {target}: " + ", ".join(pathlib.Path(p).name for p in metrics["figures"]))
        results.append(metrics)
    report = {"models": results}
    if len(scores) > 1:
        try:
            report["ensemble"] = ensemble_metrics(scores, labels, multi_label)
        except ValueError as exc:
            print(f"capsnet-ext eval: no ensemble: {exc}", file=sys.stderr)
        else:
            print(f"ensemble of {len(scores)}: test error {100 * report['ensemble']['error']:.2f}%")
    atomic_write_text(out_dir / "eval.json", json.dumps(report, indent=2) + "\n")
    print(f"wrote {out_dir / 'eval.json'}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_command("capsnet-ext eval", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
