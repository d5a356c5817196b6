"""Run a capsule model over a data set and accumulate :func:`routing_metrics` for every
routing layer in one pass (nothing but the per-layer float64 sums stays in memory)."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .metrics import RoutingMetricsAccumulator


def trace_capsules(model: nn.Module, x: torch.Tensor) -> Tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]:
    """Capsules of every layer ``(primary [B, I0, D0], ..., class capsules [B, J, D])`` and the
    couplings of every routing layer ``([B, I0, I1], ...)`` for images ``x``.

    Works for any model with a ``routing_trace(x)`` method (:class:`~capsnet_ext.nn.DeepCapsNet`)
    and for :class:`~capsnet_ext.nn.CapsNet` (PrimaryCaps then one routing layer).
    """
    if hasattr(model, "routing_trace"):
        trace = model.routing_trace(x)
        return trace.capsules, trace.couplings
    if hasattr(model, "primary_capsules") and hasattr(model, "digits"):
        u = model.primary_capsules(x)
        v, c = model.digits(u, return_coupling=True)
        return (u, v), (c,)
    raise TypeError(f"{type(model).__name__} is not a capsule model this analysis understands: it needs a "
                    "routing_trace(x) method (DeepCapsNet) or primary_capsules(x) and digits (CapsNet)")


def _batches(dataset, batch_size: int, limit: Optional[int], device: torch.device):
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n == 0:
        raise ValueError("the data set is empty (or limit=0): nothing to analyse")
    if hasattr(dataset, "batch"):  # capsnet_ext.data.ImageDataset: in-memory, batched indexing
        for start in range(0, n, batch_size):
            yield dataset.batch(torch.arange(start, min(start + batch_size, n)), device)
        return
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size)
    for batch in loader:
        yield {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def analyze_model(model: nn.Module, dataset, *, batch_size: int = 256, limit: Optional[int] = None,
                  device="cpu") -> Dict[str, object]:
    """Routing metrics of every routing layer of ``model`` over ``dataset``.

    Args:
        model: a capsule model (see :func:`trace_capsules`); put in eval mode here.
        dataset: items ``{"image": [C, H, W], "label": ...}`` (a ``capsnet_ext.data``
            dataset is batched directly, anything else through a DataLoader).
        limit: analyse only the first ``limit`` items.
    Returns:
        ``{"num_inputs", "accuracy" (NaN for multi-hot labels), "layers": [metrics of routing
        layer 1, 2, ...], "capsule_layers": [{"capsules", "dim"} of primary, layer 1, ...]}``.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    device = torch.device(device)
    model = model.to(device).eval()
    accumulators: Optional[List[RoutingMetricsAccumulator]] = None
    shapes = None
    correct = total = 0
    single_label = True
    for batch in _batches(dataset, batch_size, limit, device):
        images, labels = batch["image"].float(), batch["label"]
        capsules, couplings = trace_capsules(model, images)
        lengths = [c.float().norm(dim=-1) for c in capsules]
        if accumulators is None:
            accumulators = [RoutingMetricsAccumulator() for _ in couplings]
            shapes = [dict(capsules=int(c.shape[1]), dim=int(c.shape[2])) for c in capsules]
        for k, (acc, c) in enumerate(zip(accumulators, couplings)):
            acc.update(c, lengths[k], lengths[k + 1])
        if labels.dim() == 1 and not labels.dtype.is_floating_point:
            correct += int((lengths[-1].argmax(dim=1) == labels).sum())
            total += labels.shape[0]
        else:
            single_label = False
    return dict(
        num_inputs=accumulators[0].num_inputs,
        accuracy=correct / total if single_label and total else math.nan,
        layers=[acc.compute() for acc in accumulators],
        capsule_layers=shapes,
    )
