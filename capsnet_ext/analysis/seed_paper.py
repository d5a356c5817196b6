"""Reproduction of Mitterreiter et al., "Why Capsule Neural Networks Do Not Scale" (AAAI 2023)
at its own scale: collection of per-layer metrics from the run folders of the ``seed-paper``
and ``seed-paper-depth-*`` presets, and the report (tables, figures, JSON).

Two steps, both re-runnable from the saved checkpoints:

* **collect** (one run folder): the run's ``checkpoints/last.pt`` is evaluated on the MNIST
  test digits centred on 40x40 and on the generated affNIST-style test set (rotation +-20 deg,
  shear +-0.2, scale 0.8-1.2, translated within the frame; :mod:`capsnet_ext.data.affnist`;
  the same set, seed ``affine_seed``, for every run). On the affine set, with the couplings of
  the last routing iteration and the capsule lengths of every layer, it accumulates
  :class:`~capsnet_ext.analysis.metrics.RoutingMetricsAccumulator` per routing layer (dead
  rate, inactive rate, alive / active / active-of-alive, bonding, dynamics,
  activation-coupling correlation, ...) and the mean, standard deviation and maximum over
  inputs of the thresholded couplings ``Ct = C * (C > 1.5 / J)``. The result goes to
  ``<run>/collected/seed_paper.json`` (atomically).
* **report** (many run folders): groups runs by configuration (hidden layers, routing
  iterations, epochs, training subset), takes mean +- std over seeds, and writes under
  ``--out`` (default ``results/seed-paper``): ``results.json`` (command, versions, date, seeds,
  every run's numbers), ``table.md`` (per-layer table of the ``seed-paper`` configuration),
  ``depth_table.md`` and figures: per-layer capsule activity (mean and std of lengths, dead
  capsules marked), coupling matrices (mean, std, max of the thresholded couplings),
  per-capsule gradient-norm traces, and metrics and accuracy against depth. With ``--doc``
  the generated tables replace the marked section of that markdown file.

Command line: ``capsnet-ext analyze seed-paper collect RUN [RUN ...]`` and
``capsnet-ext analyze seed-paper report RUNS_ROOT [--out results/seed-paper] [--collect]
[--previous results/seed-paper/results.json]``; ``--previous`` keeps the runs of an earlier
report whose folders are on another machine.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import pathlib
import re
import shlex
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .gradient_flow import NPZ_NAME, _json_safe, atomic_write_text, load_gradient_flow
from .metrics import SCALAR_KEYS, TAU_FACTOR, RoutingMetricsAccumulator

COLLECTED = pathlib.Path("collected") / "seed_paper.json"
LAYER_COLUMNS = (("dead_rate", "dead rate"), ("inactive_rate", "inactive rate"), ("rate_alive", "alive"),
                 ("rate_active", "active"), ("rate_active_alive", "active of alive"),
                 ("bonding", "bonding"), ("dynamics", "dynamics"),
                 ("act_coupling_corr", "act.-coupling corr."), ("upper_dead_rate", "upper dead rate"))
DOC_BEGIN = "<!-- BEGIN GENERATED: capsnet-ext analyze seed-paper report -->"
DOC_END = "<!-- END GENERATED -->"


# -- collection ----------------------------------------------------------------------------
class ThresholdedCouplingStats:
    """Mean, standard deviation and maximum over inputs of ``Ct = C * (C > tau)``, ``tau =
    1.5 / J`` (the threshold of :mod:`capsnet_ext.analysis.metrics`), per pair ``(l, h)``."""

    def __init__(self):
        self.n = 0
        self.total = self.total_sq = self.maximum = None

    def update(self, couplings: torch.Tensor) -> None:
        C = couplings.detach().to(torch.float64)
        Ct = torch.where(C > TAU_FACTOR / C.shape[-1], C, torch.zeros_like(C))
        if self.total is None:
            self.total = torch.zeros(C.shape[1:], dtype=torch.float64, device=C.device)
            self.total_sq = torch.zeros_like(self.total)
            self.maximum = torch.zeros_like(self.total)
        self.total += Ct.sum(0)
        self.total_sq += (Ct * Ct).sum(0)
        self.maximum = torch.maximum(self.maximum, Ct.amax(0))
        self.n += C.shape[0]

    def compute(self) -> Dict[str, np.ndarray]:
        mean = self.total / self.n
        std = (self.total_sq / self.n - mean * mean).clamp_min(0).sqrt()
        return dict(mean=mean.cpu().numpy(), std=std.cpu().numpy(), max=self.maximum.cpu().numpy())


def mnist40_test(data_dir=None, limit: Optional[int] = None):
    """The MNIST test digits centred on a 40x40 canvas (uint8 ``ImageDataset``)."""
    from ..data.base import ImageDataset
    from ..data.mnist import load_idx_dataset
    from ..data.transforms import pad_to

    digits, labels = load_idx_dataset("mnist", "test", data_dir)
    images = pad_to(torch.from_numpy(np.array(digits))[:, None], 40)
    return ImageDataset(images, np.array(labels), name="mnist40-test", limit=limit)


def affine_test(data_dir=None, limit: Optional[int] = None, seed: int = 0):
    """The generated affNIST-style test set (:func:`capsnet_ext.data.affnist.build_affnist`)."""
    from ..data import build_datasets

    return build_datasets("affnist", data_dir, seed=seed, test_source="generated", train_limit=1,
                          test_limit=limit).test


def _batches(dataset, batch_size: int, device):
    for start in range(0, len(dataset), batch_size):
        yield dataset.batch(torch.arange(start, min(start + batch_size, len(dataset))), device)


PAPER_INIT = "uniform_fan_in"   # the authors' W initialisation (the presets' default)


def init_label(model: dict) -> str:
    """The routing layers' ``W`` initialisation of a model config, as one label."""
    init = model.get("init", PAPER_INIT)
    if init == "trunc_normal":
        std = model.get("init_std")
        return f"trunc_normal(std={0.1 if std is None else std})"
    return init


def run_summary(run_dir: pathlib.Path) -> Dict[str, object]:
    """What identifies a run's configuration: from its ``config.json``."""
    config = json.loads((run_dir / "config.json").read_text())
    model = config["model"]
    iterations = model.get("iterations")
    return dict(hidden_layers=len(model["caps"]) - 1, iterations=iterations, seed=config["seed"],
                epochs=config["epochs"], max_steps=config.get("max_steps"),
                train_limit=(config.get("dataset_options") or {}).get("train_limit"),
                eval_limit=config.get("eval_limit"), arch=model["arch"], init=init_label(model))


@torch.no_grad()
def collect_run(run_dir, *, data_dir=None, device="cpu", limit: Optional[int] = None,
                affine_seed: int = 0, batch_size: int = 250) -> Dict[str, object]:
    """Evaluate ``<run_dir>/checkpoints/last.pt`` (module docstring) and write
    ``<run_dir>/collected/seed_paper.json``; returns its content."""
    from ..training.checkpoint import load_checkpoint, model_from_checkpoint
    from .cli import provenance
    from .collect import trace_capsules

    run_dir = pathlib.Path(run_dir)
    checkpoint = run_dir / "checkpoints" / "last.pt"
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{run_dir}: no checkpoints/last.pt to collect from")
    device = torch.device(device)
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt).to(device).eval()

    mnist = mnist40_test(data_dir, limit)
    correct = 0
    for batch in _batches(mnist, batch_size, device):
        lengths = trace_capsules(model, batch["image"])[0][-1].norm(dim=-1)
        correct += int((lengths.argmax(1) == batch["label"]).sum())
    mnist_accuracy = correct / len(mnist)

    affine = affine_test(data_dir, limit, affine_seed)
    accumulators, coupling_stats = None, None
    correct = 0
    for batch in _batches(affine, batch_size, device):
        capsules, couplings = trace_capsules(model, batch["image"])
        lengths = [c.float().norm(dim=-1) for c in capsules]
        if accumulators is None:
            accumulators = [RoutingMetricsAccumulator() for _ in couplings]
            coupling_stats = [ThresholdedCouplingStats() for _ in couplings]
        for k, c in enumerate(couplings):
            accumulators[k].update(c, lengths[k], lengths[k + 1])
            coupling_stats[k].update(c)
        correct += int((lengths[-1].argmax(1) == batch["label"]).sum())
    layers = []
    for acc, stats in zip(accumulators, coupling_stats):
        metrics = acc.compute()
        per_capsule = metrics.pop("per_capsule")
        metrics["per_capsule"] = {k: np.asarray(v) for k, v in per_capsule.items()}
        metrics["thresholded_couplings"] = stats.compute()
        layers.append(metrics)
    result = dict(run=str(run_dir), checkpoint=str(checkpoint), step=ckpt.get("step"),
                  run_config=run_summary(run_dir),
                  train_seconds=_train_seconds(run_dir),
                  mnist40_accuracy=mnist_accuracy, mnist40_n=len(mnist),
                  affine_accuracy=correct / len(affine), affine_n=len(affine),
                  affine_test_set=dict(source="generated affNIST-style (capsnet_ext.data.affnist)",
                                       seed=affine_seed, limit=limit),
                  layers=layers, provenance=provenance(device, command=_command()))
    atomic_write_text(run_dir / COLLECTED, json.dumps(_json_safe(result), indent=1) + "\n")
    return result


def run_finished(run_dir: pathlib.Path) -> bool:
    """Whether the run trained to its end: its ``metrics.json`` exists and says it was not
    interrupted (a run stopped by a signal keeps a resumable checkpoint but is not finished)."""
    path = pathlib.Path(run_dir) / "metrics.json"
    if not path.is_file():
        return False
    return json.loads(path.read_text()).get("interrupted") is None


def _train_seconds(run_dir: pathlib.Path) -> Optional[float]:
    path = run_dir / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    return metrics.get("train_seconds")


def _command() -> str:
    return "capsnet-ext analyze " + " ".join(shlex.quote(a) for a in sys.argv[2:])


# -- report --------------------------------------------------------------------------------
def find_runs(roots: Sequence[pathlib.Path]) -> List[pathlib.Path]:
    """Run folders (holding ``config.json`` of a ``mitterreiter-capsnet`` model) under ``roots``."""
    runs = []
    for root in roots:
        root = pathlib.Path(root)
        candidates = [root] if (root / "config.json").is_file() else sorted(p.parent for p in root.rglob("config.json"))
        for run in candidates:
            try:
                arch = json.loads((run / "config.json").read_text())["model"]["arch"]
            except (OSError, ValueError, KeyError):
                continue
            if arch == "mitterreiter-capsnet":
                runs.append(run)
    return runs


def _group_key(summary: dict) -> tuple:
    # Records collected before the initialisation was recorded are of the authors' one.
    return (summary["hidden_layers"], summary["iterations"], summary["epochs"], summary["max_steps"],
            summary["train_limit"], summary.get("init", PAPER_INIT))


def _mean_std(values) -> tuple:
    values = np.asarray([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return math.nan, math.nan, 0
    return float(finite.mean()), float(finite.std(ddof=1)) if finite.size > 1 else math.nan, int(finite.size)


def _fmt(mean: float, std: float, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "n/a"
    if not math.isfinite(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def aggregate(collected: Sequence[dict]) -> List[dict]:
    """Groups of runs with the same configuration, with mean/std over seeds of every number."""
    groups: Dict[tuple, List[dict]] = {}
    for result in collected:
        groups.setdefault(_group_key(result["run_config"]), []).append(result)
    out = []
    for key, results in sorted(groups.items(), key=lambda kv: tuple(-1 if v is None else v for v in kv[0])):
        hidden, iterations, epochs, max_steps, train_limit, init = key
        num_layers = len(results[0]["layers"])
        layers = []
        for k in range(num_layers):
            layer = {}
            for name in SCALAR_KEYS:
                mean, std, n = _mean_std([r["layers"][k].get(name) for r in results])
                layer[name] = dict(mean=mean, std=std, n=n)
            layers.append(layer)
        entry = dict(hidden_layers=hidden, iterations=iterations, epochs=epochs, max_steps=max_steps,
                     train_limit=train_limit, init=init, seeds=sorted(r["run_config"]["seed"] for r in results),
                     steps=sorted({r["step"] for r in results}), runs=[r["run"] for r in results],
                     layers=layers)
        for name in ("mnist40_accuracy", "affine_accuracy", "train_seconds"):
            mean, std, n = _mean_std([r.get(name) for r in results])
            entry[name] = dict(mean=mean, std=std, n=n)
        out.append(entry)
    return out


def layer_table(group: dict) -> str:
    """Per routing layer, mean ± std over seeds (markdown)."""
    head = "| routing layer | " + " | ".join(label for _, label in LAYER_COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(LAYER_COLUMNS) + 1)]
    for k, layer in enumerate(group["layers"]):
        cells = [_fmt(layer[name]["mean"], layer[name]["std"]) for name, _ in LAYER_COLUMNS]
        lines.append(f"| {k + 1} ({'primary' if k == 0 else f'hidden {k}'} → "
                     f"{'class' if k == len(group['layers']) - 1 else f'hidden {k + 1}'}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _describe(group: dict) -> str:
    limit = group["train_limit"]
    data = f"first {limit} training images" if limit else "60,000 training images"
    length = f"{group['max_steps']} steps" if group["max_steps"] else f"{group['epochs']} epochs"
    seconds = group["train_seconds"]
    per_epoch = ""
    if math.isfinite(seconds["mean"]) and not group["max_steps"]:
        per_epoch = f"; {seconds['mean'] / group['epochs']:.0f} s of training per epoch (mean over seeds)"
    init = "" if _init(group) == PAPER_INIT else f", W initialised {_init(group)}"
    return (f"{group['hidden_layers']} hidden layer(s), {group['iterations']} routing iteration(s){init}, {length} "
            f"on the {data}; seeds {group['seeds']}; checkpoint steps {group['steps']}{per_epoch}")


def _init(group: dict) -> str:
    return group.get("init", PAPER_INIT)


def _budget(group: dict) -> tuple:
    """What runs must share to be compared across depths or iteration counts: the training
    budget and the initialisation."""
    return (group["epochs"], group["max_steps"], group["train_limit"], _init(group))


def _budget_label(group: dict) -> str:
    length = f"{group['max_steps']} steps" if group["max_steps"] else f"{group['epochs']} ep."
    return (length + (f", {group['train_limit']} img" if group["train_limit"] else "")
            + ("" if _init(group) == PAPER_INIT else f", init {_init(group)}"))


def main_group(groups: Sequence[dict]) -> Optional[dict]:
    """The ``seed-paper`` configuration (1 hidden layer, 4 iterations) with the most seeds,
    then the longest training."""
    candidates = [g for g in groups if g["hidden_layers"] == 1 and g["iterations"] == 4 and _init(g) == PAPER_INIT]
    if not candidates:
        return None
    return max(candidates, key=lambda g: (len(g["seeds"]), g["epochs"] or 0, g["max_steps"] or 0,
                                          g["train_limit"] or 10 ** 9))


def _layer_mean(group: dict, name: str) -> float:
    values = [layer[name]["mean"] for layer in group["layers"]]
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def claims_table(groups: Sequence[dict]) -> str:
    """The paper's claims against the runs, each with the measure used and a verdict by the
    fixed rule stated in the table (markdown)."""
    rows = []

    def verdict(ok):
        return "n/a" if ok is None else ("agrees" if ok else "does not agree")

    main = main_group(groups)
    if main is not None:
        dead = [layer["dead_rate"]["mean"] for layer in main["layers"]] + [main["layers"][-1]["upper_dead_rate"]["mean"]]
        rows.append(("capsules starve: some capsules are dead in the trained model",
                     "dead rate per capsule layer (primary, hidden, class) > 0 somewhere",
                     " / ".join(f"{d:.2f}" for d in dead), verdict(max(dead) > 0 if all(map(math.isfinite, dead)) else None)))
        dyn = [layer["dynamics"]["mean"] for layer in main["layers"]]
        ok = None if not all(map(math.isfinite, dyn)) else max(dyn) < 0.5
        rows.append(("routing hardly depends on the input (no dynamic parse tree)",
                     "dynamics per routing layer < 0.5 (1 = input-dependent one-hot routing, 0 = static)",
                     " / ".join(f"{d:.2f}" for d in dyn), verdict(ok)))
        corr = [layer["act_coupling_corr"]["mean"] for layer in main["layers"]]
        ok = None if not all(map(math.isfinite, corr)) else max(abs(c) for c in corr) < 0.3
        rows.append(("couplings do not follow the lower capsules' activations",
                     "|activation-coupling correlation| per routing layer < 0.3",
                     " / ".join(f"{c:.2f}" for c in corr), verdict(ok)))
    for iterations, budget in sorted({(g["iterations"], _budget(g)) for g in groups}, key=str):
        sweep = sorted((g for g in groups if g["iterations"] == iterations and _budget(g) == budget),
                       key=lambda g: g["hidden_layers"])
        if len(sweep) < 2:
            continue
        shallow, deep = sweep[0], sweep[-1]
        label = f"{iterations} iteration(s), {_budget_label(shallow)}"
        a, b = _layer_mean(shallow, "dead_rate"), _layer_mean(deep, "dead_rate")
        rows.append((f"starvation grows with depth ({label})",
                     f"dead rate averaged over layers, {shallow['hidden_layers']} vs {deep['hidden_layers']} hidden layers "
                     "(deeper higher)", f"{a:.2f} → {b:.2f}",
                     verdict(b > a if math.isfinite(a) and math.isfinite(b) else None)))
        a, b = shallow["affine_accuracy"]["mean"], deep["affine_accuracy"]["mean"]
        rows.append((f"accuracy falls with depth ({label})",
                     f"affine accuracy, {shallow['hidden_layers']} vs {deep['hidden_layers']} hidden layers (deeper lower)",
                     f"{a:.4f} → {b:.4f}", verdict(b < a if math.isfinite(a) and math.isfinite(b) else None)))
    by_key = {(g["hidden_layers"], g["iterations"], _budget(g)): g for g in groups}
    for (hidden, iterations, budget), g in sorted(by_key.items(), key=lambda kv: str(kv[0])):
        if iterations != 4 or (hidden, 1, budget) not in by_key:
            continue
        one = by_key[(hidden, 1, budget)]
        a, b = one["affine_accuracy"], g["affine_accuracy"]
        spread = max(a["std"] if math.isfinite(a["std"]) else 0.0, b["std"] if math.isfinite(b["std"]) else 0.0)
        ok = None if not (math.isfinite(a["mean"]) and math.isfinite(b["mean"])) else b["mean"] <= a["mean"] + spread
        rows.append((f"more routing iterations do not help ({hidden} hidden, {_budget_label(g)})",
                     "affine accuracy with 4 iterations not above 1 iteration by more than one std over seeds",
                     f"{a['mean']:.4f} (1) vs {b['mean']:.4f} (4)", verdict(ok)))
    lines = ["| claim | measure and rule | runs | verdict |", "|---|---|---|---|"]
    lines += [f"| {c} | {m} | {v} | {w} |" for c, m, v, w in rows]
    return "\n".join(lines)


def accuracy_line(group: dict) -> str:
    m, a = group["mnist40_accuracy"], group["affine_accuracy"]
    return (f"MNIST 40x40 test accuracy {_fmt(m['mean'], m['std'], 4)}, affine test accuracy "
            f"{_fmt(a['mean'], a['std'], 4)} (n = {a['n']} seeds)")


def depth_table(groups: Sequence[dict]) -> str:
    """One row per (hidden layers, iterations): accuracies and per-layer means over seeds."""
    def per_layer(group, name):
        return " / ".join("n/a" if not math.isfinite(layer[name]["mean"]) else f"{layer[name]['mean']:.2f}"
                          for layer in group["layers"])

    lines = ["| training | hidden layers | iterations | seeds | MNIST acc | affine acc | dead rate (L1 / L2 / ...) | "
             "inactive rate | bonding | dynamics | act.-coupling corr. |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in sorted(groups, key=lambda g: (str(_budget(g)), g["iterations"], g["hidden_layers"])):
        lines.append(f"| {_budget_label(g)} | {g['hidden_layers']} | {g['iterations']} | {len(g['seeds'])} | "
                     f"{_fmt(g['mnist40_accuracy']['mean'], g['mnist40_accuracy']['std'], 4)} | "
                     f"{_fmt(g['affine_accuracy']['mean'], g['affine_accuracy']['std'], 4)} | "
                     f"{per_layer(g, 'dead_rate')} | {per_layer(g, 'inactive_rate')} | {per_layer(g, 'bonding')} | "
                     f"{per_layer(g, 'dynamics')} | {per_layer(g, 'act_coupling_corr')} |")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: pathlib.Path) -> pathlib.Path:
    from .report import save_figure

    return save_figure(fig, path)


def plot_activity(result: dict, path: pathlib.Path) -> pathlib.Path:
    """Per capsule layer: mean capsule length over the affine set with its std, dead capsules
    (mean and std of the length below 0.01) in red."""
    plt = _pyplot()
    layers = result["layers"]
    stats = [(layers[0]["per_capsule"].get("lower_mean_length"), layers[0]["per_capsule"].get("lower_std_length"),
              layers[0]["per_capsule"].get("lower_dead"))]
    stats += [(l["per_capsule"].get("upper_mean_length"), l["per_capsule"].get("upper_std_length"),
               l["per_capsule"].get("upper_dead")) for l in layers]
    fig, axes = plt.subplots(1, len(stats), figsize=(3.2 * len(stats), 3), squeeze=False)
    for k, (ax, (mean, std, dead)) in enumerate(zip(axes[0], stats)):
        mean, std = np.asarray(mean, float), np.asarray(std, float)
        dead = np.asarray(dead, bool)
        colors = np.where(dead, "tab:red", "tab:blue")
        ax.bar(np.arange(mean.size), mean, yerr=std, color=colors, capsize=1.5)
        ax.set_title(("primary" if k == 0 else ("class" if k == len(stats) - 1 else f"hidden {k}"))
                     + f" ({int(dead.sum())}/{dead.size} dead)", fontsize=9)
        ax.set_xlabel("capsule")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("length (mean ± std over inputs)")
    fig.suptitle(f"capsule activity, {pathlib.Path(result['run']).name} (dead in red)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_couplings(result: dict, path: pathlib.Path) -> pathlib.Path:
    """Per routing layer: mean, std and max over the affine set of the thresholded couplings."""
    plt = _pyplot()
    layers = result["layers"]
    fig, axes = plt.subplots(len(layers), 3, figsize=(9, 2.8 * len(layers)), squeeze=False)
    for k, layer in enumerate(layers):
        stats = layer["thresholded_couplings"]
        for j, name in enumerate(("mean", "std", "max")):
            ax = axes[k][j]
            image = ax.imshow(np.asarray(stats[name], float), vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_title(f"layer {k + 1}: {name} of thresholded c", fontsize=9)
            ax.set_xlabel("upper capsule h")
            ax.set_ylabel("lower capsule l")
            fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return _save(fig, path)


def plot_gradient_norms(flow: Dict[str, np.ndarray], path: pathlib.Path, title: str) -> pathlib.Path:
    """Per routing layer: ``|dL/dW[l]|`` per lower capsule ("from") and ``|dL/dW[:, h]|`` per
    upper capsule ("to") at every recorded step, one line per capsule."""
    plt = _pyplot()
    num_layers = len([k for k in flow if k.endswith("_lower_grad_norm")])
    fig, axes = plt.subplots(num_layers, 2, figsize=(10, 2.6 * num_layers), squeeze=False)
    steps = flow["steps"]
    for k in range(1, num_layers + 1):
        for j, (kind, label) in enumerate((("lower", "from lower capsule l"), ("upper", "to upper capsule h"))):
            ax = axes[k - 1][j]
            values = np.asarray(flow[f"layer{k}_{kind}_grad_norm"], float)
            ax.plot(steps, np.where(values > 0, values, np.nan), linewidth=0.6)
            ax.set_yscale("log")
            ax.set_title(f"layer {k}: |dL/dW| {label}", fontsize=9)
            ax.set_xlabel("step")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_depth(groups: Sequence[dict], path: pathlib.Path) -> pathlib.Path:
    """Accuracy and the per-layer metrics (averaged over layers) against the number of hidden
    layers, one line per routing-iteration count, error bars = std over seeds."""
    plt = _pyplot()
    panels = [("affine_accuracy", "affine test accuracy", None), ("mnist40_accuracy", "MNIST 40x40 accuracy", None),
              ("dead_rate", "dead rate (mean over layers)", "layer"), ("inactive_rate", "inactive rate", "layer"),
              ("bonding", "bonding", "layer"), ("dynamics", "dynamics", "layer"),
              ("act_coupling_corr", "act.-coupling corr.", "layer"), ("upper_dead_rate", "class-layer dead rate", "last")]
    fig, axes = plt.subplots(2, 4, figsize=(14, 6))
    for ax, (name, label, kind) in zip(axes.flat, panels):
        for iterations, budget in sorted({(g["iterations"], _budget(g)) for g in groups}, key=str):
            rows = sorted((g for g in groups if g["iterations"] == iterations and _budget(g) == budget),
                          key=lambda g: g["hidden_layers"])
            xs, ys, es = [], [], []
            for g in rows:
                if kind is None:
                    mean, std = g[name]["mean"], g[name]["std"]
                elif kind == "last":
                    mean, std = g["layers"][-1][name]["mean"], g["layers"][-1][name]["std"]
                else:
                    means = [layer[name]["mean"] for layer in g["layers"]]
                    mean, std = float(np.nanmean(means)) if np.isfinite(means).any() else math.nan, math.nan
                xs.append(g["hidden_layers"])
                ys.append(mean)
                es.append(std if math.isfinite(std) else 0.0)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3,
                        label=f"{iterations} iteration(s), {_budget_label(rows[0])}")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("hidden capsule layers")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _shown(path: pathlib.Path) -> str:
    """``path`` as the docs name it: relative to the current folder when inside it."""
    path = pathlib.Path(path)
    try:
        return path.resolve().relative_to(pathlib.Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def replace_generated(doc: pathlib.Path, text: str, begin: str = DOC_BEGIN) -> None:
    """Replace the section between the generated-section markers ``begin`` and
    :data:`DOC_END` of ``doc`` (atomically)."""
    content = doc.read_text()
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(DOC_END), re.S)
    if not pattern.search(content):
        raise ValueError(f"{doc} has no section between {begin!r} and {DOC_END!r}")
    atomic_write_text(doc, pattern.sub(lambda _: f"{begin}\n{text}\n{DOC_END}", content))


def _run_identity(result: dict) -> tuple:
    """A run's configuration and seed: two records with the same identity are the same run."""
    return _group_key(result["run_config"]) + (result["run_config"]["seed"],)


def load_previous(path: pathlib.Path) -> List[dict]:
    """The per-run records of an earlier ``results.json`` (each marked with where it came from).

    They carry every scalar metric but not the per-capsule arrays, so they enter the tables and
    the depth figure but get no per-run figure of their own."""
    path = pathlib.Path(path)
    try:
        earlier = json.loads(path.read_text())
        records = earlier["runs"]
        for record in records:
            _run_identity(record)
    except OSError as exc:
        raise FileNotFoundError(f"--previous {path}: cannot read it ({exc.strerror})") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--previous {path}: expected the results.json written by "
                         f"'capsnet-ext analyze seed-paper report' ({exc!r})") from exc
    source = f"{path} (generated {earlier.get('generated_utc', 'at an unknown date')})"
    return [dict(record, source=record.get("source", source)) for record in records]


def write_report(runs: Sequence[pathlib.Path], out, *, command: Optional[str] = None,
                 doc: Optional[pathlib.Path] = None, previous: Sequence[dict] = (),
                 doc_begin: str = DOC_BEGIN) -> Dict[str, pathlib.Path]:
    """Aggregate the collected runs (module docstring) into ``out``.

    ``previous``: records of :func:`load_previous` for runs whose folders are not at hand (an
    earlier machine's runs); a run collected now with the same configuration and seed
    replaces its earlier record."""
    from .cli import provenance

    out = pathlib.Path(out)
    collected = []
    missing, unfinished = [], []
    for run in runs:
        path = pathlib.Path(run) / COLLECTED
        if not run_finished(run):
            unfinished.append(str(run))   # partial training never mixes with finished runs
        elif path.is_file():
            result = json.loads(path.read_text())
            metrics = pathlib.Path(run) / "metrics.json"
            # The training command, versions and date, as the trainer recorded them.
            result["train_environment"] = (json.loads(metrics.read_text()).get("environment")
                                           if metrics.is_file() else None)
            collected.append(result)
        else:
            missing.append(str(run))
    present = {_run_identity(r) for r in collected}
    collected += [r for r in previous if _run_identity(r) not in present]
    if not collected:
        raise FileNotFoundError(f"no collected run ({COLLECTED}) among {len(runs)} run folder(s); "
                                "run 'capsnet-ext analyze seed-paper collect RUN' (or report --collect) first")
    groups = aggregate(collected)
    chosen = main_group(groups)
    main = [chosen] if chosen is not None else []
    paths: Dict[str, pathlib.Path] = {}
    sections = []
    for g in main:
        sections.append(f"**Mitterreiter et al.'s CapsNet (ns = [16, 16, 10]), {_describe(g)}.** "
                        f"{accuracy_line(g)}.\n\nPer routing layer on the affine test set (mean ± std over "
                        f"seeds):\n\n{layer_table(g)}")
    table = "\n\n".join(sections) if sections else "(no run of the seed-paper configuration collected yet)"
    claims = "Claims against the runs (rules fixed in capsnet_ext/analysis/seed_paper.py):\n\n" + claims_table(groups)
    paths["claims"] = atomic_write_text(out / "claims.md", claims + "\n")
    depth = ("Depth study (means over seeds; per-layer values are layer 1 / layer 2 / ...):\n\n"
             + depth_table(groups) + "\n\nConfigurations:\n\n" + "\n".join(f"- {_describe(g)}" for g in groups))
    paths["table"] = atomic_write_text(out / "table.md", table + "\n")
    paths["depth_table"] = atomic_write_text(out / "depth_table.md", depth + "\n")
    figures = out / "figures"
    for result in collected:
        rc = result["run_config"]
        if not (rc["hidden_layers"] == 1 and rc["iterations"] == 4) and rc["seed"] != min(
                r["run_config"]["seed"] for r in collected):
            continue  # figures for every seed of the main configuration, one seed of the others
        if "per_capsule" not in result["layers"][0]:
            continue  # a record of an earlier results.json: its figures were made from its folder
        name = pathlib.Path(result["run"]).name
        tag = f"h{rc['hidden_layers']}-r{rc['iterations']}-{name}" if not name.startswith("h") else name
        if rc.get("init", PAPER_INIT) != PAPER_INIT:
            tag += "-" + re.sub(r"[^A-Za-z0-9.]+", "-", rc["init"]).strip("-")
        paths[f"activity_{tag}"] = plot_activity(result, figures / f"activity_{tag}.png")
        paths[f"couplings_{tag}"] = plot_couplings(result, figures / f"couplings_{tag}.png")
        flow_path = pathlib.Path(result["run"]) / NPZ_NAME
        if flow_path.is_file():
            paths[f"gradients_{tag}"] = plot_gradient_norms(load_gradient_flow(flow_path),
                                                            figures / f"gradient_norms_{tag}.png",
                                                            f"per-capsule W gradient norms, {tag}")
    if len({g["hidden_layers"] for g in groups}) > 1:
        paths["depth_figure"] = plot_depth(groups, figures / "depth_study.png")
    device = torch.device("cpu")
    results = dict(provenance=provenance(device, command=command or _command()),
                   seeds=sorted({r["run_config"]["seed"] for r in collected}),
                   generated_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   runs_not_collected=missing, runs_unfinished=unfinished, groups=groups,
                   runs=[{k: v for k, v in r.items() if k != "layers"} | {
                       "layers": [{k: v for k, v in layer.items() if k not in ("per_capsule", "thresholded_couplings")}
                                  for layer in r["layers"]]} for r in collected])
    atomic_write_text(out / "results.json", json.dumps(_json_safe(results), indent=1) + "\n")
    paths["results"] = out / "results.json"
    if doc is not None:
        init = out / "init_table.md"   # written by 'analyze seed-paper init' (initial_state)
        init_text = init.read_text().strip() + "\n\n" if init.is_file() else ""
        shown = _shown(out)
        replace_generated(pathlib.Path(doc), begin=doc_begin,
                          text=table + "\n\n" + claims + "\n\n" + depth + "\n\n" + init_text
                          + f"Figures: `{shown}/figures/`; numbers: `{shown}/results.json`"
                          + (f", `{shown}/init_state.json`." if init_text else "."))
    return paths


# -- the state at initialisation -----------------------------------------------------------
ADAM_EPS = 1e-8   # torch.optim.Adam's default, which the presets use


def parse_init(text: str) -> dict:
    """``"uniform_fan_in"``, ``"trunc_normal"`` or ``"trunc_normal:STD"`` (STD a number or
    ``auto``) as model-config keys."""
    init, _, std = text.partition(":")
    if init not in ("uniform_fan_in", "trunc_normal") or (std and init != "trunc_normal"):
        raise ValueError(f"expected uniform_fan_in, trunc_normal or trunc_normal:STD (a number or auto), got {text!r}")
    if not std:
        return dict(init=init)
    if std != "auto":
        try:
            std = float(std)
        except ValueError:
            raise ValueError(f"expected trunc_normal:STD with STD a number or auto, got {text!r}") from None
    return dict(init=init, init_std=std)


def initial_state(preset: str, seed: int, batch: dict, *, device="cpu",
                  model: Optional[dict] = None) -> Dict[str, object]:
    """Capsule lengths and gradients of a preset's model *as its training run starts*.

    The model is built as ``capsnet-ext train --preset PRESET --seed SEED`` builds it
    (``torch.manual_seed(seed)``, then the model), so the weights are that run's initial weights;
    one training loss (margin + reconstruction, the label masking the decoder) is taken on
    ``batch`` and differentiated (``model``: model-config keys that override the preset's, e.g.
    ``parse_init("trunc_normal:auto")``). Returned: the mean capsule length of every capsule layer, and
    for every routing layer's ``W``, the backbone (everything before the primary capsules'
    squash) and the decoder, the root-mean-square gradient entry and the fraction of entries
    whose gradient is below Adam's ``eps`` (1e-8): Adam's first update is ``lr * g / (|g| + eps)``,
    so such entries start with a step shorter than ``lr / 2``.
    """
    from ..nn import build_model
    from ..training.config import load_config
    from ..training.evaluation import forward_and_loss
    from ..training.trainer import _fill_model_config
    from .collect import trace_capsules

    cfg = load_config(preset=preset, model=model or None)
    images = batch["image"]

    class _Shape:  # what _fill_model_config reads from a dataset bundle
        input_size, in_channels, num_classes = images.shape[-1], images.shape[1], 10

    device = torch.device(device)
    torch.manual_seed(seed)
    model = build_model(_fill_model_config(cfg.model_config(), _Shape, cfg.crop_size)).to(device).train()
    with torch.no_grad():
        capsules, _ = trace_capsules(model, images.to(device))
    lengths = [float(c.float().norm(dim=-1).mean()) for c in capsules]
    loss, _, _ = forward_and_loss(model, batch, recon_weight=cfg.recon_weight, recon_target=cfg.recon_target,
                                  margin=cfg.margin, multi_label=False, device=device)
    loss.backward()

    def stats(params):
        grads = torch.cat([p.grad.detach().double().flatten() for p in params if p.grad is not None])
        return dict(rms=float(grads.pow(2).mean().sqrt()),
                    below_eps=float((grads.abs() < ADAM_EPS).double().mean()), entries=int(grads.numel()))

    routing = [stats([layer.weight]) for layer in model.routing]
    decoder = list(model.decoder.parameters()) if model.decoder is not None else []
    elsewhere = {id(p) for layer in model.routing for p in layer.parameters()} | {id(p) for p in decoder}
    backbone = [p for p in model.parameters() if id(p) not in elsewhere]
    return dict(preset=preset, seed=seed, init=init_label(cfg.model), hidden_layers=len(model.routing) - 1,
                iterations=model.routing[0].iterations, loss=float(loss.detach()), mean_lengths=lengths,
                routing_w=routing, backbone=stats(backbone), decoder=stats(decoder) if decoder else None)


def initial_state_table(states: Sequence[dict]) -> str:
    """Markdown: one row per (hidden layers, iterations), means over seeds."""
    groups: Dict[tuple, List[dict]] = {}
    for st in states:
        init = st.get("init", PAPER_INIT)
        groups.setdefault((init != PAPER_INIT, init, st["hidden_layers"], st["iterations"]), []).append(st)

    def sci(values):
        return f"{float(np.mean(values)):.1e}"

    rows = ["| W initialisation | hidden layers | iterations | seeds | mean capsule length (primary / hidden ... / class) "
            "| W gradient RMS per routing layer | W entries below Adam eps per routing layer "
            "| backbone gradient RMS | backbone entries below eps |",
            "|---|---|---|---|---|---|---|---|---|"]
    for (_, init, hidden, iterations), group in sorted(groups.items()):
        layers = len(group[0]["mean_lengths"])
        lengths = " / ".join(sci([g["mean_lengths"][k] for g in group]) for k in range(layers))
        rms = " / ".join(sci([g["routing_w"][k]["rms"] for g in group]) for k in range(layers - 1))
        below = " / ".join(f"{float(np.mean([g['routing_w'][k]['below_eps'] for g in group])):.2f}"
                           for k in range(layers - 1))
        label = "±1/sqrt(n_l) (theirs)" if init == PAPER_INIT else init
        rows.append(f"| {label} | {hidden} | {iterations} | {len(group)} | {lengths} | {rms} | {below} | "
                    f"{sci([g['backbone']['rms'] for g in group])} | "
                    f"{float(np.mean([g['backbone']['below_eps'] for g in group])):.2f} |")
    return "\n".join(rows)


def write_initial_state(out, *, depths=(1, 2, 3, 4, 5), iterations=(1, 4), seeds=(0, 1, 2), images: int = 128,
                        inits=("uniform_fan_in",), data_dir=None, device="cpu",
                        command: Optional[str] = None) -> Dict[str, pathlib.Path]:
    """:func:`initial_state` of every ``seed-paper-depth-h<H>-r<R>`` preset, seed and
    initialisation (:func:`parse_init` texts) on the first ``images`` MNIST test digits on 40x40
    (one batch): ``init_state.json`` and ``init_table.md``."""
    from .cli import provenance

    overrides = [parse_init(text) for text in inits]   # a bad value is named before any data or model

    out = pathlib.Path(out)
    batch = mnist40_test(data_dir, images).batch(torch.arange(images), torch.device("cpu"))
    states = [initial_state(f"seed-paper-depth-h{h}-r{r}", seed, batch, device=device, model=model)
              for model in overrides for h in depths for r in iterations for seed in seeds]
    table = (f"At initialisation (the first training step's weights of each run, one batch of {images} MNIST "
             "test digits on 40x40; means over seeds):\n\n" + initial_state_table(states))
    result = dict(provenance=provenance(torch.device(device), command=command or _command()), images=images,
                  adam_eps=ADAM_EPS, states=states)
    paths = dict(init_state=atomic_write_text(out / "init_state.json", json.dumps(_json_safe(result), indent=1) + "\n"),
                 init_table=atomic_write_text(out / "init_table.md", table + "\n"))
    return paths


# -- command line --------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="capsnet-ext analyze seed-paper", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    c = sub.add_parser("collect", help="evaluate run folders' last checkpoints (writes <run>/collected/)")
    r = sub.add_parser("report", help="tables, figures and results.json from collected run folders")
    i = sub.add_parser("init", help="capsule lengths and gradients at initialisation of every depth-study preset")
    i.add_argument("--out", default="results/seed-paper")
    i.add_argument("--data-dir", default=None)
    from .._cli import device_option

    i.add_argument("--device", default="cpu", type=device_option)
    i.add_argument("--images", type=int, default=128, help="MNIST test digits in the one batch (default 128)")
    i.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    i.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="hidden layers")
    i.add_argument("--inits", nargs="+", default=["uniform_fan_in"],
                   help="W initialisations: uniform_fan_in (theirs), trunc_normal, trunc_normal:STD (STD a number "
                        "or auto: lengths kept near 0.5)")
    for q in (c, r):
        q.add_argument("runs", nargs="+", help="run folders, or folders searched for run folders")
        q.add_argument("--data-dir", default=None)
        q.add_argument("--device", default="cpu", type=device_option)
        q.add_argument("--limit", type=int, default=None,
                       help="use the first N images of each test set (default: all 10,000)")
        q.add_argument("--affine-seed", type=int, default=0, help="seed of the generated affine test set")
        q.add_argument("--force", action="store_true", help="collect again even when already collected")
    r.add_argument("--collect", action="store_true", help="collect the runs not collected yet first")
    r.add_argument("--out", default="results/seed-paper")
    r.add_argument("--doc", default=None, help="markdown file whose generated section gets the tables")
    r.add_argument("--previous", default=None, metavar="RESULTS_JSON",
                   help="also report the runs of an earlier results.json whose folders are not here "
                        "(a run found now with the same configuration and seed replaces its record)")
    return p


def _collect_all(runs, args) -> None:
    for run in runs:
        if not run_finished(run):
            print(f"skip {run}: training not finished (no metrics.json, or interrupted)", file=sys.stderr)
            continue
        if (run / COLLECTED).is_file() and not args.force:
            stamp = (run / COLLECTED).stat().st_mtime
            if stamp >= (run / "checkpoints" / "last.pt").stat().st_mtime:
                continue
        result = collect_run(run, data_dir=args.data_dir, device=args.device, limit=args.limit,
                             affine_seed=args.affine_seed)
        print(f"collected {run}: step {result['step']}, MNIST {result['mnist40_accuracy']:.4f}, "
              f"affine {result['affine_accuracy']:.4f}")


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    command = "capsnet-ext analyze seed-paper " + " ".join(shlex.quote(a) for a in (argv or sys.argv[3:]))
    try:
        if args.step == "init":
            if args.images < 1:
                raise ValueError(f"--images must be a positive number of images, got {args.images}")
            paths = write_initial_state(args.out, depths=args.depths, seeds=args.seeds, images=args.images,
                                        inits=args.inits, data_dir=args.data_dir, device=args.device,
                                        command=command)
            print("\n".join(f"{k}: {v}" for k, v in paths.items()))
            return 0
        runs = find_runs([pathlib.Path(r) for r in args.runs])
        if not runs:
            raise FileNotFoundError(f"no mitterreiter-capsnet run folder under {args.runs}")
        if args.step == "collect" or args.collect:
            _collect_all(runs, args)
        if args.step == "report":
            previous = load_previous(pathlib.Path(args.previous)) if args.previous else ()
            paths = write_report(runs, args.out, command=command, doc=args.doc, previous=previous)
            print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    except (FileNotFoundError, ValueError) as exc:
        print(f"capsnet-ext analyze seed-paper: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
