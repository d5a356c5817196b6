"""Capsule diagnostics: parse-tree, starvation and gradient-flow measures of routing layers.

* :func:`routing_metrics` / :class:`RoutingMetricsAccumulator`: dead capsules, inactive
  instances, vibrance, bonding strength, dynamics, activation-coupling correlation and the
  T-/D-scores of one routing layer over a data set (streaming, float64 sums).
* :class:`GradientFlowRecorder`: a trainer callback recording per-capsule gradient norms,
  mean capsule lengths and squash slopes of every routing layer during training.
* ``capsnet-ext analyze CHECKPOINT`` (:mod:`capsnet_ext.analysis.cli`) and the depth study
  (:mod:`capsnet_ext.analysis.depth_study`).
"""
from .gradient_flow import GradientFlowRecorder, load_gradient_flow
from .metrics import (
    SCALAR_KEYS,
    RoutingMetricsAccumulator,
    routing_metrics,
    squash_input_norm,
    squash_slope,
    squash_slope_at_length,
)

__all__ = ["routing_metrics", "RoutingMetricsAccumulator", "SCALAR_KEYS", "squash_slope",
           "squash_input_norm", "squash_slope_at_length", "GradientFlowRecorder", "load_gradient_flow"]
