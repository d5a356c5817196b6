"""Markdown tables and PNG plots of the capsule diagnostics (``capsnet-ext analyze``).

Every file is written atomically (temporary file, then ``os.replace``).
"""
from __future__ import annotations

import io
import json
import math
import pathlib
from typing import Dict, List, Optional, Sequence

import numpy as np

from .gradient_flow import _json_safe, atomic_write_bytes, atomic_write_text

# (key, column header, description) of the per-layer summary table.
TABLE_COLUMNS = (
    ("dead_rate", "dead (lower)", "fraction of lower capsules whose length has mean and std over inputs < 0.01"),
    ("upper_dead_rate", "dead (upper)", "the same for the upper capsules"),
    ("inactive_rate", "inactive", "mean over lower capsules of pr_l, the fraction of inputs where no coupling exceeds 1.5/J"),
    ("rate_alive", "alive", "1 - dead (lower)"),
    ("rate_active", "active", "mean over lower capsules of 1 - pr_l"),
    ("rate_active_alive", "active | alive", "mean of 1 - pr_l over alive lower capsules"),
    ("bonding", "bonding", "activity-weighted mean of each capsule's largest coupling on the inputs where it is active"),
    ("dynamics", "dynamics", "activity-weighted std over inputs of the couplings, relative to one-hot random routing (1) and fixed routing (0)"),
    ("act_coupling_corr", "act-coupling r", "Pearson r between a lower capsule's largest coupling, thresholded (0 where inactive), and its length (the paper's definition)"),
    ("t_score", "T", "1 - mean normalised entropy of the couplings (Peer et al.)"),
    ("d_score", "D", "largest std over inputs of an upper capsule's length (Peer et al.)"),
    ("lower_mean_length", "mean |u|", "mean lower capsule length"),
    ("upper_mean_length", "mean |v|", "mean upper capsule length"),
    ("upper_squash_slope", "squash slope (upper)", "d|v|/d|s| = 2|s|/(1+|s|^2)^2 at the upper capsules' mean lengths"),
)


def fmt(x, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return str(int(x))
    x = float(x)
    if math.isnan(x):
        return "n/a"
    return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"


def _cell(text: str) -> str:
    """Escape the pipes of |x| notation inside a markdown table cell."""
    return text.replace("|", "\\|")


def summary_table(layers: Sequence[Dict[str, object]]) -> str:
    """One row per routing layer, one column per metric of :data:`TABLE_COLUMNS`."""
    header = ["layer", "I -> J"] + [_cell(title) for _, title, _ in TABLE_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for k, m in enumerate(layers, 1):
        row = [str(k), f"{m['lower_capsules']} -> {m['upper_capsules']}"]
        row += [fmt(m.get(key)) for key, _, _ in TABLE_COLUMNS]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def layer_table(metrics: Dict[str, object]) -> str:
    """Metric | value | meaning, for one routing layer."""
    lines = ["| metric | value | meaning |", "|---|---|---|"]
    for key, title, meaning in TABLE_COLUMNS:
        lines.append(f"| {_cell(title)} (`{key}`) | {fmt(metrics.get(key))} | {_cell(meaning)} |")
    per = metrics.get("per_capsule", {})
    if "pr" in per:
        pr = np.asarray(per["pr"])
        lines.append(f"| never-active lower capsules | {int((pr >= 1).sum())} of {pr.size} | pr_l = 1 |")
    return "\n".join(lines)


# -- plots -------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: pathlib.Path) -> pathlib.Path:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, lambda fh: fh.write(buffer.getvalue()))
    return path


def dead_fractions(layers: Sequence[Dict[str, object]]) -> List[float]:
    """Dead fraction of every capsule layer: primary (lower of routing layer 1), then the
    output of each routing layer."""
    return [float(layers[0]["dead_rate"])] + [float(m["upper_dead_rate"]) for m in layers]


def mean_lengths(layers: Sequence[Dict[str, object]]) -> List[float]:
    return [float(layers[0]["lower_mean_length"])] + [float(m["upper_mean_length"]) for m in layers]


def plot_dead_fraction(layers, path):
    plt = _pyplot()
    values = dead_fractions(layers)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(range(len(values)), values, color="tab:red")
    ax.set_xticks(range(len(values)), ["primary"] + [f"L{k}" for k in range(1, len(values))])
    ax.set_ylim(0, 1)
    ax.set_ylabel("dead capsule fraction")
    ax.set_title("Dead capsules per layer")
    return save_figure(fig, path)


def plot_bonding_dynamics(layers, path):
    plt = _pyplot()
    x = np.arange(1, len(layers) + 1)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key, style in (("bonding", "o-"), ("dynamics", "s-"), ("rate_active", "^--"), ("t_score", "v:")):
        ax.plot(x, [m[key] for m in layers], style, label=key)
    ax.set_xticks(x, [f"L{k}" for k in x])
    ax.set_xlabel("routing layer")
    ax.set_ylim(-0.02, 1.05)
    ax.legend(fontsize=8)
    ax.set_title("Parse-tree measures per routing layer")
    return save_figure(fig, path)


def plot_mean_length(layers, path, gradient_flow: Optional[Dict[str, np.ndarray]] = None):
    plt = _pyplot()
    ncols = 2 if gradient_flow is not None else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5 * ncols, 3.2), squeeze=False)
    values = mean_lengths(layers)
    ax = axes[0, 0]
    ax.plot(range(len(values)), values, "o-")
    ax.set_xticks(range(len(values)), ["primary"] + [f"L{k}" for k in range(1, len(values))])
    ax.set_ylabel("mean capsule length (test set)")
    ax.set_ylim(0, 1)
    ax.set_title("Mean capsule length per layer")
    if gradient_flow is not None:
        ax = axes[0, 1]
        steps, lengths = gradient_flow["steps"], gradient_flow["mean_length"]
        for k in range(lengths.shape[1]):
            ax.plot(steps, lengths[:, k], label="primary" if k == 0 else f"L{k}")
        ax.set_xlabel("training step")
        ax.set_ylabel("mean length (training batch)")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, ncol=2)
        ax.set_title("During training")
    return save_figure(fig, path)


def plot_grad_heatmap(gradient_flow: Dict[str, np.ndarray], path):
    """Per routing layer, ``|dL/dW[i]|`` of every lower capsule ``i`` (rows) over the recorded
    steps (columns), log colour scale."""
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    keys = sorted((k for k in gradient_flow if k.endswith("_lower_grad_norm")),
                  key=lambda k: int(k[len("layer"):].split("_")[0]))
    steps = gradient_flow["steps"]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.4), squeeze=False,
                             constrained_layout=True)
    finite = np.concatenate([gradient_flow[k][np.isfinite(gradient_flow[k]) & (gradient_flow[k] > 0)].ravel()
                             for k in keys])
    if finite.size == 0:  # no gradient reached any capsule: draw on a nominal scale
        finite = np.array([1e-12, 1.0])
    norm = LogNorm(vmin=max(float(np.percentile(finite, 1)), 1e-12), vmax=float(finite.max()))
    for ax, key in zip(axes[0], keys):
        data = np.clip(gradient_flow[key].T, norm.vmin, None)
        im = ax.imshow(data, aspect="auto", norm=norm, cmap="viridis", interpolation="nearest",
                       extent=(float(steps[0]), float(steps[-1]), data.shape[0] - 0.5, -0.5))
        ax.set_title(f"L{key[len('layer'):].split('_')[0]}: |dL/dW[i]|", fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel("lower capsule i")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.9, label="gradient norm")
    return save_figure(fig, path)


# -- the report --------------------------------------------------------------------------
def write_analysis_report(result: Dict[str, object], out_dir, *, meta: Dict[str, object],
                          gradient_flow: Optional[Dict[str, np.ndarray]] = None) -> Dict[str, pathlib.Path]:
    """Write ``report.md``, ``metrics.json`` and the PNG plots into ``out_dir``.

    Args:
        result: what :func:`capsnet_ext.analysis.collect.analyze_model` returns.
        meta: provenance shown at the top of the report (checkpoint, device, versions, date,
            command, ...).
        gradient_flow: arrays of a recorded ``gradient_flow.npz`` (heat map and lengths during
            training), or None.
    Returns: the written paths by name.
    """
    out_dir = pathlib.Path(out_dir)
    layers = result["layers"]
    paths = {
        "dead_fraction": plot_dead_fraction(layers, out_dir / "dead_fraction.png"),
        "bonding_dynamics": plot_bonding_dynamics(layers, out_dir / "bonding_dynamics.png"),
        "mean_length": plot_mean_length(layers, out_dir / "mean_length.png", gradient_flow),
    }
    if gradient_flow is not None:
        paths["grad_heatmap"] = plot_grad_heatmap(gradient_flow, out_dir / "grad_norm_heatmap.png")

    lines = ["# Capsule diagnostics", ""]
    lines += [f"- {key}: {value}" for key, value in meta.items()]
    lines += [f"- inputs analysed: {result['num_inputs']}",
              f"- accuracy on them: {fmt(result['accuracy'])}",
              "- capsule layers: " + ", ".join(f"{s['capsules']}x{s['dim']}D" for s in result["capsule_layers"]),
              "", "Definitions follow Mitterreiter et al., \"Why Capsule Neural Networks Do Not Scale\" "
              "(AAAI 2023), and Peer et al. (T/D scores); see `capsnet_ext/analysis/metrics.py`.", "",
              "## All routing layers", "", summary_table(layers), ""]
    for k, m in enumerate(layers, 1):
        lines += [f"## Routing layer {k} ({m['lower_capsules']} -> {m['upper_capsules']} capsules)", "",
                  layer_table(m), ""]
    if gradient_flow is not None:
        keys = [k for k in gradient_flow if k.endswith("_lower_grad_norm")]
        lines += ["## Gradient flow during training", "",
                  f"Recorded at {len(gradient_flow['steps'])} steps "
                  f"({int(gradient_flow['steps'][0])} to {int(gradient_flow['steps'][-1])}).", "",
                  "| routing layer | mean \\|dL/dW[i]\\| (first step) | (last step) | mean \\|dL/dW[:, j]\\| (last step) |",
                  "|---|---|---|---|"]
        for k in range(1, len(keys) + 1):
            low, up = gradient_flow[f"layer{k}_lower_grad_norm"], gradient_flow[f"layer{k}_upper_grad_norm"]
            lines.append(f"| L{k} | {fmt(np.nanmean(low[0]))} | {fmt(np.nanmean(low[-1]))} | {fmt(np.nanmean(up[-1]))} |")
        lines += ["", "![gradient norms](grad_norm_heatmap.png)", ""]
    else:
        lines += ["No gradient-flow record (`gradient_flow.npz`) was found for this checkpoint; train with "
                  "`capsnet_ext.analysis.GradientFlowRecorder` as a callback to get the heat map.", ""]
    lines += ["## Plots", "", "![dead capsules](dead_fraction.png)", "",
              "![bonding and dynamics](bonding_dynamics.png)", "", "![mean length](mean_length.png)", ""]
    paths["report"] = out_dir / "report.md"
    atomic_write_text(paths["report"], "\n".join(lines))

    layers_json = []
    for m in layers:
        entry = {k: v for k, v in m.items() if k != "per_capsule"}
        entry["per_capsule"] = {k: np.asarray(v).tolist() for k, v in m["per_capsule"].items()}
        layers_json.append(entry)
    payload = dict(meta=meta, num_inputs=result["num_inputs"], accuracy=result["accuracy"],
                   capsule_layers=result["capsule_layers"], layers=layers_json)
    paths["metrics"] = out_dir / "metrics.json"
    atomic_write_text(paths["metrics"], json.dumps(_json_safe(payload), indent=1) + "\n")
    return paths
