"""Gradient flow through stacked routing layers, recorded during training.

:class:`GradientFlowRecorder` is a trainer callback (``on_after_backward(step, model)``,
``on_train_end(out_dir)``). Every ``every`` steps it records, for each routing layer
(every :class:`capsnet_ext.nn.RoutingCapsules` in the model, in module order):

* ``lower_grad_norm [I]``: ``|dL/dW[i]|`` (Frobenius norm of the gradient of the loss with
  respect to lower capsule ``i``'s slice ``W[i] [J, Dout, Din]``): how much learning signal
  reaches each lower capsule's votes;
* ``upper_grad_norm [J]``: ``|dL/dW[:, j]|``: the same per upper capsule;

and, per capsule layer (the input capsules of the first routing layer, then the output of
every routing layer), the mean capsule length on the step's batch and the mean squash slope
``d|v|/d|s| = 2|s| / (1 + |s|^2)^2`` at those lengths (``|s|`` recovered from ``|v|``), the two
quantities that say whether lengths shrink layer by layer and whether the squash still passes
gradient where they sit.

Lengths come from forward hooks installed by ``on_train_start`` (the trainer calls it before the
first step) or else the first time the callback sees the model, in which case that step has no
lengths (NaN). The record is written atomically as
``gradient_flow.npz`` (arrays) and ``gradient_flow.json`` (per-layer summaries) into the
training output folder at the end of training, or wherever :meth:`GradientFlowRecorder.save`
is pointed.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn

from .._atomic import atomic_path, atomic_write
from .metrics import squash_slope_at_length

NPZ_NAME = "gradient_flow.npz"
JSON_NAME = "gradient_flow.json"


def routing_layers(model: nn.Module) -> List[nn.Module]:
    """Every :class:`~capsnet_ext.nn.RoutingCapsules` of ``model``, in module order (for the
    models of this package, also the order data flows through them)."""
    from ..nn import RoutingCapsules

    return [m for m in model.modules() if isinstance(m, RoutingCapsules)]


atomic_write_text = atomic_write  # the name the report and the depth study use


def atomic_write_bytes(path: pathlib.Path, write) -> None:
    """Call ``write(file_object)`` on a temporary file beside ``path``, then move it into
    place, so a reader never sees half a file."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        write(fh)


def _json_safe(x):
    """NaN/inf become None so the JSON is standard."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return _json_safe(x.tolist())
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


class GradientFlowRecorder:
    """Trainer callback recording per-capsule gradient norms and per-layer capsule lengths.

    Args:
        every: record at steps that are multiples of ``every`` (>= 1).
        out_dir: where :meth:`on_train_end` writes if the trainer gives no folder.
    Attributes after training: ``steps`` (list of ints) and ``records`` (one dict per
    recorded step); :meth:`arrays` stacks them.
    """

    def __init__(self, every: int = 50, out_dir: Optional[os.PathLike] = None):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.every = every
        self.out_dir = None if out_dir is None else pathlib.Path(out_dir)
        self.steps: List[int] = []
        self.records: List[Dict[str, object]] = []
        self._layers: Optional[List[nn.Module]] = None
        self._hooks = []
        self._lengths: Dict[int, torch.Tensor] = {}  # capsule layer index -> [2] (mean length, mean slope)

    # -- hooks ---------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Find the routing layers of ``model`` and install the length hooks (done
        automatically on the first callback)."""
        self.detach()
        self._layers = routing_layers(model)
        if not self._layers:
            raise ValueError(f"{type(model).__name__} has no RoutingCapsules layer; "
                             "gradient flow is recorded for capsule models only")
        for k, layer in enumerate(self._layers):
            self._hooks.append(layer.register_forward_hook(self._make_hook(k)))

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _make_hook(self, k: int):
        def hook(module, args, output):
            # Cheap and asynchronous: two small reductions kept on the device; they are copied
            # to the host only on recorded steps.
            with torch.no_grad():
                if k == 0 and args:
                    self._lengths[0] = self._length_stats(args[0])
                v = output[0] if isinstance(output, tuple) else output
                self._lengths[k + 1] = self._length_stats(v)
        return hook

    @staticmethod
    def _length_stats(caps: torch.Tensor) -> torch.Tensor:
        lengths = caps.detach().float().norm(dim=-1)
        return torch.stack([lengths.mean(), squash_slope_at_length(lengths).mean()])

    # -- callback API --------------------------------------------------------------------
    def on_train_start(self, model: nn.Module) -> None:
        """Install the length hooks before the first step (so it, and the first step after a
        resume, has lengths too)."""
        self.attach(model)

    def on_after_backward(self, step: int, model: nn.Module) -> None:
        if self._layers is None:
            self.attach(model)
        if step % self.every:
            return
        record: Dict[str, object] = {}
        for k, layer in enumerate(self._layers):
            g = layer.weight.grad
            if g is None:
                lower = np.full(layer.in_caps, np.nan)
                upper = np.full(layer.out_caps, np.nan)
            else:
                g2 = g.detach().float().pow(2)
                lower = g2.sum(dim=(1, 2, 3)).sqrt().cpu().numpy()
                upper = g2.sum(dim=(0, 2, 3)).sqrt().cpu().numpy()
            record[f"layer{k + 1}_lower_grad_norm"] = lower
            record[f"layer{k + 1}_upper_grad_norm"] = upper
        stats = np.full((len(self._layers) + 1, 2), np.nan)
        for idx, value in self._lengths.items():
            stats[idx] = value.cpu().numpy()
        record["mean_length"] = stats[:, 0]
        record["squash_slope"] = stats[:, 1]
        self.steps.append(int(step))
        self.records.append(record)

    def state_dict(self) -> Dict[str, object]:
        """The record so far (what a checkpoint stores so a resumed run continues it)."""
        return {"every": self.every, "steps": list(self.steps),
                "records": [{k: np.asarray(v).copy() for k, v in r.items()} for r in self.records]}

    def load_state_dict(self, state: Dict[str, object], before_step: Optional[int] = None) -> None:
        """Continue the record of :meth:`state_dict`, keeping only steps ``< before_step``."""
        keep = [k for k, s in enumerate(state["steps"]) if before_step is None or s < before_step]
        self.steps = [int(state["steps"][k]) for k in keep]
        self.records = [dict(state["records"][k]) for k in keep]

    def on_train_end(self, out_dir=None) -> None:
        self.detach()
        target = pathlib.Path(out_dir) if out_dir is not None else self.out_dir
        if target is not None and self.records:
            self.save(target)

    # -- results -------------------------------------------------------------------------
    def arrays(self) -> Dict[str, np.ndarray]:
        """The record stacked over steps: ``steps [T]``, ``layer{k}_lower_grad_norm [T, I_k]``,
        ``layer{k}_upper_grad_norm [T, J_k]``, ``mean_length [T, L+1]``, ``squash_slope [T, L+1]``
        (capsule layer 0 is the input of the first routing layer)."""
        if not self.records:
            raise ValueError("nothing recorded yet: no step was a multiple of every="
                             f"{self.every} or the callback was never called")
        out = {"steps": np.asarray(self.steps, dtype=np.int64)}
        for key in self.records[0]:
            out[key] = np.stack([np.asarray(r[key], dtype=np.float64) for r in self.records])
        return out

    def summary(self) -> Dict[str, object]:
        """Per routing layer, the mean over capsules of the gradient norm at every step, and
        the mean lengths and squash slopes per capsule layer at every step."""
        arrays = self.arrays()
        num_layers = len([k for k in arrays if k.endswith("_lower_grad_norm")])
        return dict(
            steps=arrays["steps"].tolist(),
            num_routing_layers=num_layers,
            lower_grad_norm_mean=[arrays[f"layer{k}_lower_grad_norm"].mean(1).tolist()
                                  for k in range(1, num_layers + 1)],
            upper_grad_norm_mean=[arrays[f"layer{k}_upper_grad_norm"].mean(1).tolist()
                                  for k in range(1, num_layers + 1)],
            mean_length=arrays["mean_length"].tolist(),
            squash_slope=arrays["squash_slope"].tolist(),
        )

    def save(self, out_dir: os.PathLike) -> pathlib.Path:
        """Write ``gradient_flow.npz`` and ``gradient_flow.json`` into ``out_dir`` (each
        atomically); returns the .npz path."""
        out_dir = pathlib.Path(out_dir)
        arrays = self.arrays()
        npz_path = out_dir / NPZ_NAME
        atomic_write_bytes(npz_path, lambda fh: np.savez(fh, **arrays))
        atomic_write_text(out_dir / JSON_NAME, json.dumps(_json_safe(self.summary()), indent=1) + "\n")
        return npz_path


def load_gradient_flow(path: os.PathLike) -> Dict[str, np.ndarray]:
    """Read a ``gradient_flow.npz`` (or the folder holding one) written by
    :meth:`GradientFlowRecorder.save`."""
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / NPZ_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no gradient-flow record at {path}")
    with np.load(path) as data:
        return {k: data[k] for k in data.files}
