"""Depth study: how accuracy, dead capsules, routing dynamics and gradient flow change as
fully connected routing layers are stacked (1 to 6 layers, 1 and 3 routing iterations).

Each configuration is a :class:`~capsnet_ext.nn.DeepCapsNet` with ``depth - 1`` hidden routing
layers of ``width`` capsules of ``dim`` dimensions before the class capsules, trained by
:func:`capsnet_ext.training.train` with a :class:`GradientFlowRecorder`, then analysed on the
test set. Results go to ``<out>/depth_study.md`` (one table), ``depth_study.png`` (one figure),
``depth_study.json``, and per run ``<out>/depth<d>-r<iterations>/`` (checkpoints, logs,
``gradient_flow.npz`` and an ``analysis/`` report). Finished runs are skipped when the study
is started again, so an interrupted study resumes where it stopped.

Command line: ``capsnet-ext analyze depth-study [--depths 1 2 3] [--iterations 1 3]
[--epochs N | --max-steps N] [--train-limit N --test-limit N --conv-channels C ...]``
(the shrinking flags make a CPU-sized version; ``--help`` lists them).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

from .gradient_flow import _json_safe, atomic_write_text

DEPTHS = (1, 2, 3, 4, 5, 6)
ITERATIONS = (1, 3)
ROW_FILE = "study_row.json"


def depth_model(depth: int, *, width: int = 32, dim: int = 8, class_dim: int = 16, num_classes: int = 10,
                **model_kwargs) -> Dict[str, object]:
    """Model dict of a DeepCapsNet with ``depth`` routing layers: ``depth - 1`` hidden layers of
    ``width`` capsules of ``dim`` dimensions, then ``num_classes`` capsules of ``class_dim``.
    ``depth = 1`` is the original CapsNet (PrimaryCaps routed straight to the classes)."""
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive int, got {depth!r}")
    return dict(arch="deep-capsnet", num_classes=num_classes, caps=[width] * (depth - 1) + [num_classes],
                dims=[dim] * (depth - 1) + [class_dim], **model_kwargs)


def _row_from(depth: int, iterations: int, result: dict, analysis: dict, flow: Optional[dict]) -> dict:
    from .report import dead_fractions, mean_lengths

    layers = analysis["layers"]
    row = dict(depth=depth, iterations=iterations, steps=result.get("step"),
               train_seconds=result.get("train_seconds"), test_accuracy=result.get("test_accuracy"),
               analysis_inputs=analysis["num_inputs"], analysis_accuracy=analysis["accuracy"],
               dead_fraction=dead_fractions(layers), mean_length=mean_lengths(layers),
               dynamics=[m["dynamics"] for m in layers], bonding=[m["bonding"] for m in layers],
               rate_active=[m["rate_active"] for m in layers], t_score=[m["t_score"] for m in layers])
    if flow is not None:
        row["grad_norm_lower"] = [float(np.nanmean(flow[f"layer{k}_lower_grad_norm"])) for k in range(1, depth + 1)]
        row["grad_norm_upper"] = [float(np.nanmean(flow[f"layer{k}_upper_grad_norm"])) for k in range(1, depth + 1)]
    else:
        row["grad_norm_lower"] = row["grad_norm_upper"] = [float("nan")] * depth
    return row


def run_one(depth: int, iterations: int, run_dir: pathlib.Path, *, preset: Optional[str], train_overrides: dict,
            model_kwargs: dict, grad_flow_every: int, device: str, analysis_limit: Optional[int],
            eval_batch_size: int, datasets=None, command: Optional[str] = None) -> dict:
    """Train and analyse one configuration; returns its table row (also saved in the run folder)."""
    from ..training import load_config, train
    from .cli import analyze_checkpoint
    from .gradient_flow import GradientFlowRecorder

    cfg = load_config(preset=preset, model=depth_model(depth, **model_kwargs), out=str(run_dir),
                      iterations=iterations, grad_flow_every=grad_flow_every, device=device,
                      **train_overrides)
    recorder = GradientFlowRecorder(every=grad_flow_every)
    # A run folder without its row is an unfinished attempt: it is trained again from scratch.
    result = train(cfg, callbacks=[recorder], datasets=datasets, overwrite=True)
    done = analyze_checkpoint(result["last_checkpoint"], out=run_dir / "analysis", device=device,
                              batch_size=eval_batch_size, limit=analysis_limit, dataset=datasets,
                              command=command)
    flow = recorder.arrays() if recorder.records else None
    row = _row_from(depth, iterations, result, done["result"], flow)
    atomic_write_text(run_dir / ROW_FILE, json.dumps(_json_safe(row), indent=1) + "\n")
    return row


def _nan_list(values) -> List[float]:
    return [float("nan") if v is None else float(v) for v in values]


def _per_layer(values, digits: int = 3) -> str:
    from .report import fmt

    return " / ".join(fmt(v, digits) for v in values)


def study_table(rows: Sequence[dict]) -> str:
    """One markdown row per (depth, iterations)."""
    from .report import fmt

    lines = ["| depth | iters | test acc | steps | dead fraction (primary, L1, ...) | dynamics (L1, ...) | "
             "bonding (L1, ...) | mean grad norm \\|dL/dW[i]\\| (L1, ...) | mean length (primary, L1, ...) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["iterations"], r["depth"])):
        lines.append(f"| {r['depth']} | {r['iterations']} | {fmt(r['test_accuracy'])} | {r['steps']} | "
                     f"{_per_layer(_nan_list(r['dead_fraction']))} | {_per_layer(_nan_list(r['dynamics']))} | "
                     f"{_per_layer(_nan_list(r['bonding']))} | {_per_layer(_nan_list(r['grad_norm_lower']))} | "
                     f"{_per_layer(_nan_list(r['mean_length']))} |")
    return "\n".join(lines)


def plot_study(rows: Sequence[dict], path: pathlib.Path) -> pathlib.Path:
    """One figure: accuracy against depth, and dead fraction, dynamics and gradient norm per
    layer for every depth (colour: depth; line style: routing iterations)."""
    from .report import _pyplot, save_figure

    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), constrained_layout=True)
    iteration_values = sorted({r["iterations"] for r in rows})
    depth_values = sorted({r["depth"] for r in rows})
    cmap = plt.get_cmap("viridis")
    color = {d: cmap(i / max(len(depth_values) - 1, 1)) for i, d in enumerate(depth_values)}
    styles = ["--", "-", ":", "-."]
    style = {it: styles[i % len(styles)] for i, it in enumerate(iteration_values)}

    ax = axes[0, 0]
    for it in iteration_values:
        sel = sorted((r for r in rows if r["iterations"] == it), key=lambda r: r["depth"])
        ax.plot([r["depth"] for r in sel], _nan_list(r["test_accuracy"] for r in sel), "o" + style[it],
                color="k", label=f"{it} routing iteration{'s' if it > 1 else ''}")
    ax.set_xlabel("routing layers (depth)")
    ax.set_ylabel("test accuracy")
    ax.set_xticks(depth_values)
    ax.legend(fontsize=8)
    ax.set_title("Accuracy against depth")

    panels = ((axes[0, 1], "dead_fraction", "dead capsule fraction", True),
              (axes[1, 0], "dynamics", "dynamics (1: one-hot random, 0: static)", False),
              (axes[1, 1], "grad_norm_lower", "mean |dL/dW[i]| over training", False))
    for ax, key, label, from_primary in panels:
        for r in rows:
            values = _nan_list(r[key])
            x = np.arange(0 if from_primary else 1, len(values) + (0 if from_primary else 1))
            ax.plot(x, values, "o" + style[r["iterations"]], color=color[r["depth"]], markersize=3)
        ax.set_xlabel("capsule layer (0: primary)" if from_primary else "routing layer")
        ax.set_ylabel(label)
        ax.set_title(label.split(" (")[0] + " per layer")
        if key == "dead_fraction":
            ax.set_ylim(-0.03, 1.03)
        if key == "grad_norm_lower":
            positive = [v for r in rows for v in _nan_list(r[key]) if v > 0]
            if positive:
                ax.set_yscale("log")
    handles = [plt.Line2D([], [], color=color[d], label=f"depth {d}") for d in depth_values]
    handles += [plt.Line2D([], [], color="k", linestyle=style[it], label=f"{it} iter") for it in iteration_values]
    axes[0, 1].legend(handles=handles, fontsize=7, ncol=2)
    return save_figure(fig, path)


def write_study(rows: Sequence[dict], out: pathlib.Path, meta: dict) -> Dict[str, pathlib.Path]:
    paths = {"figure": plot_study(rows, out / "depth_study.png")}
    lines = ["# Depth study: stacked routing layers", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "Per layer values are listed bottom to top. Dead fraction: capsules whose length has "
              "mean and std over the test inputs below 0.01. Dynamics: 1 for routing that sends each "
              "input one-hot to a random parent, 0 for routing that never changes with the input. "
              "Gradient norm: |dL/dW[i]| averaged over lower capsules and recorded steps. With 1 routing "
              "iteration the couplings are the uniform softmax of zero logits (1/J, below the activity "
              "threshold 1.5/J), so no capsule is active and bonding and dynamics are undefined (n/a). "
              "Definitions: "
              "`capsnet_ext/analysis/metrics.py`.", "", study_table(rows), "",
              "![depth study](depth_study.png)", ""]
    paths["table"] = out / "depth_study.md"
    atomic_write_text(paths["table"], "\n".join(lines))
    paths["json"] = out / "depth_study.json"
    atomic_write_text(paths["json"], json.dumps(_json_safe(dict(meta=meta, rows=list(rows))), indent=1) + "\n")
    return paths


def run_depth_study(out, *, depths: Sequence[int] = DEPTHS, iterations: Sequence[int] = ITERATIONS,
                    preset: Optional[str] = "mnist", train_overrides: Optional[dict] = None,
                    model_kwargs: Optional[dict] = None, grad_flow_every: int = 100, device: str = "auto",
                    analysis_limit: Optional[int] = None, eval_batch_size: int = 256, resume: bool = True,
                    datasets=None, command: Optional[str] = None) -> Dict[str, object]:
    """Train and analyse every (depth, iterations) pair, then write the table and figure.

    Args:
        out: study folder.
        preset: training preset the runs start from (the paper's MNIST recipe by default);
            ``train_overrides`` (``TrainConfig`` fields such as ``epochs``, ``max_steps``,
            ``batch_size``, ``dataset_options``) change it.
        model_kwargs: :func:`depth_model` arguments (``width``, ``dim``, ``conv_channels``, ...).
        grad_flow_every: record gradient norms every N steps.
        analysis_limit: analyse only the first N test images.
        resume: reuse the rows of runs that already finished in ``out``.
        datasets: a ready ``DatasetBundle`` instead of the preset's data set.
    Returns ``{"rows": [...], "paths": {...}}``.
    """
    from .cli import provenance, resolve_device

    out = pathlib.Path(out)
    for name, values in (("depths", depths), ("iterations", iterations)):
        if not values or any(not isinstance(v, int) or v < 1 for v in values):
            raise ValueError(f"{name} must be a non-empty list of positive ints, got {list(values)!r}")
    rows = []
    for it in iterations:
        for depth in depths:
            run_dir = out / f"depth{depth}-r{it}"
            if resume and (run_dir / ROW_FILE).is_file():
                rows.append(json.loads((run_dir / ROW_FILE).read_text()))
                continue
            print(f"depth study: training depth {depth}, {it} routing iteration(s) -> {run_dir}", file=sys.stderr)
            rows.append(run_one(depth, it, run_dir, preset=preset, train_overrides=dict(train_overrides or {}),
                                model_kwargs=dict(model_kwargs or {}), grad_flow_every=grad_flow_every,
                                device=device, analysis_limit=analysis_limit, eval_batch_size=eval_batch_size,
                                datasets=datasets, command=command))
    meta = dict(preset=preset, train_overrides=json.dumps(train_overrides or {}),
                model=json.dumps(model_kwargs or {}), grad_flow_every=grad_flow_every,
                analysis_limit=analysis_limit)
    meta.update(provenance(resolve_device(device), command))
    paths = write_study(rows, out, meta)
    return dict(rows=rows, paths=paths)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="capsnet-ext analyze depth-study",
        description="Train DeepCapsNets of 1..6 routing layers with 1 and 3 routing iterations and "
                    "compare accuracy, dead capsules, dynamics and gradient norms per layer.")
    p.add_argument("--out", default="runs/depth-study")
    p.add_argument("--depths", type=int, nargs="+", default=list(DEPTHS))
    p.add_argument("--iterations", type=int, nargs="+", default=list(ITERATIONS))
    p.add_argument("--preset", default="mnist", help="training preset every run starts from")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--width", type=int, default=32, help="capsules per hidden routing layer")
    p.add_argument("--dim", type=int, default=8, help="dimension of hidden capsules")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--conv-channels", type=int, default=None, help="shrink conv1 (256 in the paper) for the CPU")
    p.add_argument("--primary-channels", type=int, default=None, help="shrink PrimaryCaps (32 channels)")
    p.add_argument("--decoder-hidden", type=int, nargs="+", default=None, help="decoder widths (512 1024)")
    p.add_argument("--grad-flow-every", type=int, default=100)
    p.add_argument("--train-limit", type=int, default=None, help="train on the first N images")
    p.add_argument("--test-limit", type=int, default=None, help="evaluate and analyse the first N test images")
    p.add_argument("--data-dir", default=None)
    from .._cli import device_option

    p.add_argument("--device", default="auto", type=device_option)
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"])
    p.add_argument("--backend", default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-resume", action="store_true", help="retrain runs that already finished")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    dataset_options = {k: v for k, v in (("train_limit", args.train_limit), ("test_limit", args.test_limit))
                       if v is not None}
    train_overrides = dict(epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
                           data_dir=args.data_dir, precision=args.precision, backend=args.backend,
                           seed=args.seed, tensorboard=False, progress=not args.quiet)
    if dataset_options:
        train_overrides["dataset_options"] = dataset_options
    train_overrides = {k: v for k, v in train_overrides.items() if v is not None}
    model_kwargs = dict(width=args.width, dim=args.dim, num_classes=args.num_classes)
    for key in ("conv_channels", "primary_channels", "decoder_hidden"):
        if getattr(args, key) is not None:
            model_kwargs[key] = getattr(args, key)
    command = "capsnet-ext analyze depth-study " + " ".join(shlex.quote(a) for a in argv)
    try:
        done = run_depth_study(args.out, depths=args.depths, iterations=args.iterations, preset=args.preset,
                               train_overrides=train_overrides, model_kwargs=model_kwargs,
                               grad_flow_every=args.grad_flow_every, device=args.device,
                               analysis_limit=args.test_limit, resume=not args.no_resume, command=command)
    except (FileNotFoundError, ValueError) as exc:
        print(f"capsnet-ext analyze depth-study: {exc}", file=sys.stderr)
        return 2
    print(study_table(done["rows"]))
    print(f"table: {done['paths']['table']}\nfigure: {done['paths']['figure']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
