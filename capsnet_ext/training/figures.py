"""PNG figures of a trained capsule network (matplotlib, drawn off-screen with the Agg
canvas so no global backend is touched).

* :func:`plot_reconstructions`: inputs beside their reconstructions;
* :func:`plot_perturbation_grid`: each capsule dimension swept from -0.25 to 0.25 in steps of
  0.05 and decoded (the paper's Figure 4);
* :func:`plot_multimnist`: MultiMNIST inputs with the two digits' reconstructions in their own
  colours (the paper's Figure 5);
* :func:`routing_logit_changes` / :func:`plot_routing_dynamics`: mean change of the routing
  logits at every iteration (the paper's appendix on the number of iterations), computed with
  the reference ops from the model's primary capsules and weights;
* :func:`plot_training_curves`: loss, accuracy and test error from a run's CSV logs;
* :func:`plot_confusion`: the confusion matrix of an evaluation.

Every function writes its file atomically and returns its path.
"""
from __future__ import annotations

import os
import pathlib
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .. import reference
from .evaluation import is_capsule_output, unwrap
from .._atomic import atomic_path
from .logging_utils import read_csv

PERTURBATIONS = np.round(np.arange(-0.25, 0.25 + 1e-9, 0.05), 2)  # 11 values


def _save(fig: Figure, path: os.PathLike, dpi: int = 100) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    return path


def _image_shape(model) -> tuple:
    config = getattr(unwrap(model), "config", {})
    size = config.get("input_size", 28)
    return config.get("in_channels", 1), size, size


def _to_display(image: torch.Tensor) -> np.ndarray:
    """``[C, H, W]`` in [0, 1] -> an array imshow takes (grey or RGB)."""
    image = image.detach().float().clamp(0, 1).cpu()
    if image.shape[0] == 1:
        return image[0].numpy()
    return image.permute(1, 2, 0).numpy()


def _show(ax, image: torch.Tensor) -> None:
    array = _to_display(image)
    ax.imshow(array, cmap="gray" if array.ndim == 2 else None, vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])


def _capsule_model(model):
    model = unwrap(model)
    if not hasattr(model, "reconstruct") or getattr(model, "decoder", None) is None:
        raise ValueError(f"{type(model).__name__} has no reconstruction decoder; this figure needs a "
                         "capsule model with a decoder (e.g. arch 'capsnet' with decoder=True)")
    return model


@torch.no_grad()
def plot_reconstructions(model, images: torch.Tensor, path: os.PathLike,
                         labels: Optional[torch.Tensor] = None) -> pathlib.Path:
    """Top row: ``images [N, C, H, W]``; bottom row: the reconstructions from the longest
    capsule, titled with the predicted (and true) class."""
    model = _capsule_model(model)
    device = next(model.parameters()).device
    model.eval()
    out = model(images.to(device))
    if not is_capsule_output(out):
        raise ValueError("plot_reconstructions needs a model returning CapsNetOutput")
    recons = out.reconstructions.view(images.shape[0], *_image_shape(model))
    predicted = out.lengths.argmax(dim=1).cpu()
    n = images.shape[0]
    fig = Figure(figsize=(1.2 * n, 2.8))
    axes = fig.subplots(2, n, squeeze=False)
    for k in range(n):
        _show(axes[0, k], images[k])
        _show(axes[1, k], recons[k])
        title = f"pred {int(predicted[k])}"
        if labels is not None:
            title = f"true {int(labels[k])}\n" + title
        axes[0, k].set_title(title, fontsize=8)
    axes[0, 0].set_ylabel("input")
    axes[1, 0].set_ylabel("reconstruction")
    return _save(fig, path)


@torch.no_grad()
def perturbation_images(model, image: torch.Tensor, deltas: Sequence[float] = PERTURBATIONS):
    """Decode the predicted class's capsule with each dimension ``d`` shifted by each delta.

    Returns ``(images [D, len(deltas), C, H, W], predicted_class)``.
    """
    model = _capsule_model(model)
    device = next(model.parameters()).device
    model.eval()
    out = model(image.unsqueeze(0).to(device))
    cls = int(out.lengths.argmax(dim=1))
    capsules = out.capsules[0]                                    # [J, D]
    J, D = capsules.shape
    deltas_t = torch.as_tensor(np.asarray(deltas), dtype=capsules.dtype, device=device)
    perturbed = capsules.expand(D, len(deltas_t), J, D).clone()   # [D, K, J, D]
    dims = torch.arange(D, device=device)
    perturbed[dims, :, cls, dims] += deltas_t                     # dimension d of row d
    mask = torch.zeros(J, device=device, dtype=capsules.dtype)
    mask[cls] = 1
    flat = perturbed.view(D * len(deltas_t), J, D)
    decoded = model.reconstruct(flat, mask.expand(flat.shape[0], J))
    return decoded.view(D, len(deltas_t), *_image_shape(model)).cpu(), cls


def plot_perturbation_grid(model, image: torch.Tensor, path: os.PathLike,
                           deltas: Sequence[float] = PERTURBATIONS) -> pathlib.Path:
    """One row per capsule dimension, one column per perturbation (-0.25 ... 0.25)."""
    grid, cls = perturbation_images(model, image, deltas)
    D, K = grid.shape[:2]
    # Constrained layout places the title right above the column labels (a fixed figure
    # margin left a gap under it that grew with the number of dimensions).
    fig = Figure(figsize=(0.75 * K + 1, 0.75 * D + 0.6), layout="constrained")
    axes = fig.subplots(D, K, squeeze=False)
    for d in range(D):
        for k in range(K):
            _show(axes[d, k], grid[d, k])
            if d == 0:
                axes[d, k].set_title(f"{float(deltas[k]) + 0.0:+.2f}", fontsize=7)  # + 0.0: no "-0.00"
        axes[d, 0].set_ylabel(f"dim {d}", fontsize=7)
    fig.suptitle(f"capsule of class {cls}: each dimension perturbed")
    return _save(fig, path)


@torch.no_grad()
def plot_multimnist(model, batch: Dict[str, torch.Tensor], path: os.PathLike,
                    count: int = 8) -> pathlib.Path:
    """MultiMNIST: each input (grey) above its two reconstructions overlaid in red and green,
    decoded from the two longest capsules (titles: true and predicted label pairs)."""
    model = _capsule_model(model)
    device = next(model.parameters()).device
    model.eval()
    images = batch["image"][:count]
    out = model(images.to(device))
    n, J = out.lengths.shape
    top2 = out.lengths.topk(2, dim=1).indices
    C, H, W = _image_shape(model)
    layers = []
    for k in range(2):
        mask = torch.nn.functional.one_hot(top2[:, k], J).to(out.capsules.dtype)
        layers.append(model.reconstruct(out.capsules, mask).view(n, C, H, W)[:, 0].cpu())
    fig = Figure(figsize=(1.4 * n, 3.0))
    axes = fig.subplots(2, n, squeeze=False)
    for b in range(n):
        _show(axes[0, b], images[b])
        rgb = torch.stack([layers[0][b], layers[1][b], torch.zeros(H, W)], dim=-1).clamp(0, 1)
        axes[1, b].imshow(rgb.numpy())
        axes[1, b].set_xticks([])
        axes[1, b].set_yticks([])
        truth = batch.get("labels")
        title = f"pred {int(top2[b, 0])} (red), {int(top2[b, 1])} (green)"
        if truth is not None:
            title = f"true {int(truth[b, 0])},{int(truth[b, 1])}\n" + title
        axes[0, b].set_title(title, fontsize=6)
    axes[0, 0].set_ylabel("input")
    axes[1, 0].set_ylabel("reconstructions")
    return _save(fig, path)


@torch.no_grad()
def routing_logit_changes(model, images: torch.Tensor, iterations: int = 10) -> List[float]:
    """Mean absolute change of the routing logits ``b_ij`` made by each routing iteration.

    Runs :mod:`capsnet_ext.reference`'s routing step by step on the model's primary capsules
    and DigitCaps weights (so it works whatever kernel backend trained the model). Entry
    ``r`` is ``mean |<u_hat_ij, v_j>|`` after iteration ``r + 1``: how much another iteration
    would still move the couplings.
    """
    model = unwrap(model)
    if not hasattr(model, "primary_capsules") or not hasattr(model, "digits"):
        raise ValueError(f"{type(model).__name__} has no primary_capsules()/digits routing layer")
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    device = next(model.parameters()).device
    model.eval()
    layer = model.digits
    u = model.primary_capsules(images.to(device)).float()
    u_hat = reference.predict(u, layer.weight.float())
    B, I, J, _ = u_hat.shape
    logits = u_hat.new_zeros(B, I, J)
    changes = []
    for _ in range(iterations):
        c = reference.coupling(logits, layer.leaky)
        s = torch.einsum("bij,bijd->bjd", c, u_hat)
        if layer.bias is not None:
            s = s + layer.bias.float()
        v = reference.squash(s)
        delta = torch.einsum("bijd,bjd->bij", u_hat, v)
        changes.append(float(delta.abs().mean()))
        logits = logits + delta
    return changes


def plot_routing_dynamics(changes: Dict[str, List[float]], path: os.PathLike,
                          trained_iterations: Optional[int] = None) -> pathlib.Path:
    """``changes``: label -> per-iteration mean logit change (e.g. one curve per checkpoint).

    The curves may run past the number of iterations the model routes with, to show whether
    more iterations would still move the couplings; ``trained_iterations`` marks that number
    with a dashed line and says so in the title."""
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    for label, values in changes.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", label=label)
    shown = max((len(v) for v in changes.values()), default=0)
    if trained_iterations is not None:
        ax.axvline(trained_iterations, color="grey", linestyle="--", linewidth=1,
                   label=f"the model's {trained_iterations} iteration{'s' if trained_iterations != 1 else ''}")
    ax.set_xlabel("routing iteration")
    ax.set_ylabel("mean |change of routing logit|")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    if len(changes) > 1 or trained_iterations is not None:
        ax.legend(fontsize=8)
    title = "Routing logit change per iteration"
    if trained_iterations is not None and shown > trained_iterations:
        title += (f"\nthe model routes with {trained_iterations}; iterations {trained_iterations + 1}-"
                  f"{shown} show whether routing has settled")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_training_curves(run_dir: os.PathLike, path: Optional[os.PathLike] = None) -> pathlib.Path:
    """Training loss and accuracy, and test error, against the step, from ``train_log.csv``
    and ``eval_log.csv`` in ``run_dir``."""
    run_dir = pathlib.Path(run_dir)
    train_csv = run_dir / "train_log.csv"
    if not train_csv.is_file():
        raise FileNotFoundError(f"no training log {str(train_csv)!r}")
    train = read_csv(train_csv)
    fig = Figure(figsize=(11, 3.4))
    ax_loss, ax_acc, ax_err = fig.subplots(1, 3)
    ax_loss.plot(train["step"], train["loss"], label="total")
    for key in ("margin", "ce"):
        if key in train and not all(np.isnan(train[key])):
            ax_loss.plot(train["step"], train[key], label=key)
    ax_loss.set_yscale("log")
    ax_loss.set_title("training loss")
    ax_loss.legend(fontsize=8)
    ax_acc.plot(train["step"], train["accuracy"])
    ax_acc.set_title("training accuracy (window mean)")
    eval_csv = run_dir / "eval_log.csv"
    if eval_csv.is_file():
        evals = read_csv(eval_csv)
        if evals.get("step"):
            ax_err.plot(evals["step"], [100 * e for e in evals["test_error"]], marker="o")
    ax_err.set_title("test error (%)")
    for ax in (ax_loss, ax_acc, ax_err):
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    return _save(fig, path or run_dir / "figures" / "training_curves.png")


def plot_confusion(confusion: Sequence[Sequence[int]], path: os.PathLike,
                   class_names: Optional[Sequence[str]] = None,
                   title: Optional[str] = None) -> pathlib.Path:
    """Counts in the cells; colour is the fraction of each true class (row) predicted as each
    class, so the diagonal is the per-class accuracy."""
    matrix = np.asarray(confusion, dtype=np.float64)
    J = matrix.shape[0]
    names = list(class_names) if class_names is not None else [str(j) for j in range(J)]
    fig = Figure(figsize=(0.5 * J + 2, 0.5 * J + 1.5))
    ax = fig.subplots()
    shown = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1)
    for i in range(J):
        for j in range(J):
            if matrix[i, j]:
                ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=6,
                        color="white" if shown[i, j] > 0.5 else "black")
    ax.set_xticks(range(J), names, fontsize=7)
    ax.set_yticks(range(J), names, fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    total = int(matrix.sum())
    correct = int(np.trace(matrix))
    ax.set_title(title or f"Confusion matrix: {total} test examples, "
                 f"{100 * correct / max(total, 1):.2f}% correct", fontsize=10)
    bar = fig.colorbar(image, ax=ax, fraction=0.046)
    bar.set_label("fraction of the true class (row)")
    return _save(fig, path)
