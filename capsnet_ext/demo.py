"""``capsnet-ext demo``: train a small CapsNet on the CPU in a few minutes and report its test
accuracy.

Uses MNIST when its files are found. A data folder named with ``--data-dir`` or
``$CAPSNET_DATA`` must hold MNIST (``<folder>/mnist/*.gz``): if it does not, that is an error.
When no folder is named and MNIST is not in the user cache
(``~/.cache/capsnet_ext/data/mnist``), the demo downloads it there (about 12 MB, saying so;
``--no-download`` skips this); only when that fails (offline) does it train on scikit-learn's
8x8 digits scaled to 28x28 instead, saying why. A failed download leaves nothing behind.
docs/data.md says where the files come from.
Everything goes to the run folder ``runs/demo`` (under the current folder; git-ignored in the
project), replaced on every demo run; ``--out`` names another (which must be empty, or
``--overwrite``).
The network is the paper's CapsNet with fewer channels (conv1 64 instead of 256, 8 primary
capsule channels instead of 32, so 288 primary capsules instead of 1152), trained with the
paper's recipe (Adam, margin + 0.0005 x reconstruction loss, 3 routing iterations, shifts of
up to 2 pixels) through the same trainer as ``capsnet-ext train``.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from typing import List, Optional

from ._cli import choice, device_option, positive_int, run_command

DEFAULT_OUT = pathlib.Path("runs") / "demo"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capsnet-ext demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="folder holding mnist/ (else $CAPSNET_DATA, user cache); "
                                           "a named folder without MNIST is an error")
    parser.add_argument("--no-download", action="store_true",
                        help="do not download MNIST into the user cache when it is not found "
                             "(train on the scikit-learn digits instead)")
    parser.add_argument("--dataset", choices=("auto", "mnist", "digits"),
                        type=choice("auto", "mnist", "digits"), default="auto")
    parser.add_argument("--train-limit", type=positive_int, default=12000, help="MNIST training images used")
    parser.add_argument("--test-limit", type=positive_int, default=None, help="MNIST test images (default all)")
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help="epochs (default 2 on MNIST, 40 on digits)")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--backend", default="auto", choices=("auto", "reference", "triton", "cuda"),
                        type=choice("auto", "reference", "triton", "cuda"))
    parser.add_argument("--device", default="auto", type=device_option,
                        help="auto (a GPU if present, else the CPU), cpu, cuda, cuda:1, ...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads for PyTorch (default: PyTorch's choice; 1 is often "
                             "faster on a busy machine)")
    parser.add_argument("--out", help=f"run folder (default: {DEFAULT_OUT}, replaced on every demo run)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier run in --out (the default folder is always replaced)")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def _download_failure(exc: Exception) -> str:
    """One line saying why a download failed: each mirror host and its error (hosts that
    failed the same way share one entry)."""
    from urllib.parse import urlsplit

    hosts_by_reason = {}
    for url, reason in getattr(exc, "attempts", ()):
        hosts = hosts_by_reason.setdefault(reason, [])
        host = urlsplit(url).netloc or url
        if host not in hosts:
            hosts.append(host)
    if not hosts_by_reason:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return "; ".join(f"{', '.join(hosts)}: {reason}" for reason, hosts in hosts_by_reason.items())


def _load_data(args):
    """MNIST if its files are present, else downloaded into the user cache (unless
    ``--no-download``); scikit-learn digits only when no data folder was named and MNIST is
    neither in the user cache nor downloadable (or with ``--dataset digits``)."""
    from .data import DATA_ENV, DataNotFoundError, build_datasets, data_roots, user_cache_dir

    named = args.data_dir is not None or bool(os.environ.get(DATA_ENV))
    options = dict(seed=args.seed, train_limit=args.train_limit, test_limit=args.test_limit)

    def describe(bundle):
        return f"MNIST ({len(bundle.train)} training / {len(bundle.test)} test images)"

    if args.dataset in ("auto", "mnist"):
        try:
            bundle = build_datasets("mnist", args.data_dir, download=False, **options)
            return bundle, "mnist", describe(bundle)
        except FileNotFoundError as exc:
            if named:
                source = "--data-dir" if args.data_dir is not None else f"${DATA_ENV}"
                raise FileNotFoundError(
                    f"MNIST was not found in the data folder named by {source} (the demo "
                    f"downloads MNIST, or falls back to the scikit-learn digits, only when no "
                    f"data folder is named).\n{exc}") from None
            if args.dataset == "mnist" and args.no_download:
                raise
        looked = ", ".join(str(root / "mnist") for root in data_roots(None))
        cache = user_cache_dir() / "mnist"
        how = (f"to train on MNIST, put its IDX .gz files in <folder>/mnist/ and pass --data-dir "
               f"<folder> or set {DATA_ENV}=<folder> (see docs/data.md)")
        if args.no_download:
            reason = f"MNIST not found in {looked} and --no-download given; {how}"
        else:
            from .data.mnist import SPECS
            print(f"capsnet-ext demo: MNIST not found in {looked}; downloading it (about 12 MB) "
                  f"from {SPECS['mnist'].mirrors[0]} into {cache} (--no-download to skip) ...",
                  flush=True)
            try:
                bundle = build_datasets("mnist", args.data_dir, download=True, **options)
                return bundle, "mnist", describe(bundle) + f", downloaded into {cache}"
            except DataNotFoundError as exc:
                if args.dataset == "mnist":
                    raise
                reason = (f"MNIST not found in {looked} and its download failed "
                          f"({_download_failure(exc)}); nothing partial was left behind; {how}")
    else:
        reason = "--dataset digits"
    bundle = build_datasets("digits", seed=args.seed)
    return bundle, "digits", (f"scikit-learn digits scaled to 28x28 ({len(bundle.train)} training / "
                              f"{len(bundle.test)} test images). {reason}")


def _main(argv: List[str]) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from .training import load_config, train
    from .training.logging_utils import Console

    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    bundle, name, description = _load_data(args)
    print(f"capsnet-ext demo: data: {description}")
    out = pathlib.Path(args.out) if args.out else DEFAULT_OUT
    epochs = args.epochs or (2 if name == "mnist" else 40)
    cfg = load_config(
        preset="mnist", dataset=name, out=str(out), epochs=epochs, batch_size=args.batch_size,
        backend=args.backend, device=args.device, seed=args.seed, progress=not args.no_progress,
        model=dict(conv_channels=64, primary_channels=8), log_every=20,
        eval_every=None, checkpoint_every=10 ** 9, tensorboard=False,
        # ~0.96 per 2000 steps is for 300k-step runs; a demo of a few hundred steps decays
        # faster so the last steps refine instead of jumping around.
        lr_decay=0.5, lr_decay_steps=max(1, epochs * (len(bundle.train) // args.batch_size) // 2),
    )
    start = time.perf_counter()
    result = train(cfg, datasets=bundle, overwrite=args.overwrite or not args.out,
                   console=Console(bar=not args.no_progress, prefix="capsnet-ext demo", summary=False))
    elapsed = time.perf_counter() - start
    print(f"capsnet-ext demo: routing backend: {result['backend']} "
          f"(device {result['environment']['device']})")
    print(f"capsnet-ext demo: {result['step']} steps, {epochs} epochs in {elapsed:.0f} s "
          f"({result['images_per_sec']:.0f} training images/s)")
    print(f"capsnet-ext demo: test accuracy {100 * result['test_accuracy']:.2f}% "
          f"(error {100 * result['test_error']:.2f}%) on {result['metrics']['n']} {name} test images")
    if not args.no_figures:
        print("capsnet-ext demo: drawing figures ...", flush=True)
        from .training.checkpoint import load_checkpoint, model_from_checkpoint
        from .training.eval_cli import draw_figures

        ckpt = load_checkpoint(result["last_checkpoint"])
        model = model_from_checkpoint(ckpt)
        paths = draw_figures(model, bundle, ckpt, dict(result["metrics"]), out / "figures", out,
                             routing_iterations=6)
        print("capsnet-ext demo: figures: " + ", ".join(pathlib.Path(p).name for p in paths)
              + f" in {out / 'figures'}")
    kept = "" if args.out else "; replaced on every demo run (--out keeps one)"
    print(f"capsnet-ext demo: run folder {out}: metrics.json, train_log.csv, checkpoints/"
          f"{'' if args.no_figures else ', figures/'}{kept}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_command("capsnet-ext demo", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
