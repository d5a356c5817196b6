"""The correctness gate: each contender's output (and, for forward+backward, its gradients) is
compared with the reference before it is timed; one that disagrees is reported as wrong.

The oracle is the reference run in float64 on the same inputs (the low-precision inputs cast
up, so input rounding is not counted as error). Tolerances are a ratio, not a fixed number: a
contender's relative error ``max|x - oracle| / max|oracle|`` may be at most
``FORWARD_FACTOR`` (outputs) or ``BACKWARD_FACTOR`` (gradients) times the error of the eager
reference run in the contender's dtype, plus a small per-dtype floor. The limit scales with
the problem (a longer sum over ``I`` has more rounding) and still fails a real bug.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

FORWARD_FACTOR = 2.0
BACKWARD_FACTOR = 3.0
ERROR_FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}


def relative_error(x: torch.Tensor, oracle: torch.Tensor) -> float:
    """``max|x - oracle| / max|oracle|`` in float64; ``inf`` for a shape mismatch or any
    NaN/inf in ``x`` that the oracle does not have."""
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != tuple(oracle.shape):
        return float("inf")
    x64 = x.detach().to(device=oracle.device, dtype=torch.float64)
    o64 = oracle.detach().to(torch.float64)
    if x64.numel() == 0:
        return 0.0
    finite = torch.isfinite(o64)
    if not torch.equal(torch.isfinite(x64), finite):
        return float("inf")
    if not bool(finite.all()):
        same = (x64 == o64) | (torch.isnan(x64) & torch.isnan(o64))
        if not bool((same | finite).all()):
            return float("inf")  # an inf of the wrong sign, or inf against NaN
    # Where both are the same non-finite value the difference counts as zero; torch.where
    # rather than boolean indexing keeps the memory at one extra tensor.
    zero = o64.new_zeros(())
    diff = torch.where(finite, (x64 - o64).abs(), zero).max()
    scale = torch.where(finite, o64.abs(), zero).max()
    return float(diff / scale.clamp_min(torch.finfo(torch.float64).tiny))


@dataclass
class GateResult:
    """Errors and limits per checked tensor (``"out"``, ``"grad_u"``, ...)."""
    errors: Dict[str, float] = field(default_factory=dict)
    limits: Dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(self.errors[k] <= self.limits[k] for k in self.errors)

    def failures(self) -> Dict[str, float]:
        return {k: v for k, v in self.errors.items() if not v <= self.limits[k]}

    def describe(self) -> str:
        bad = self.failures()
        return ", ".join(f"{k}: relative error {v:.3g} > limit {self.limits[k]:.3g}" for k, v in bad.items())

    def as_dict(self) -> Dict[str, Dict[str, float]]:
        return dict(errors=dict(self.errors), limits=dict(self.limits))


def limit_for(name: str, baseline_error: float, dtype: torch.dtype) -> float:
    factor = FORWARD_FACTOR if name == "out" else BACKWARD_FACTOR
    return factor * baseline_error + ERROR_FLOOR.get(dtype, 1e-5)


def check(results: Dict[str, torch.Tensor], oracle: Dict[str, torch.Tensor],
          baseline: Dict[str, float], dtype: torch.dtype,
          gate: Optional[GateResult] = None) -> GateResult:
    """Compare ``results`` with ``oracle`` tensor by tensor (keys of ``results``) and add the
    errors and limits to ``gate`` (a new one by default)."""
    gate = gate or GateResult()
    for name, value in results.items():
        gate.errors[name] = relative_error(value, oracle[name])
        gate.limits[name] = limit_for(name, baseline[name], dtype)
    return gate
