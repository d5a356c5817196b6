"""Routing by agreement over given prediction vectors ``u_hat [B, I, J, Dout]`` in Triton.

The same design as the fused :mod:`.capsule_routing` (kernels in :mod:`._gemm_kernels`,
launchers, plan, tuning and autograd in :mod:`._gemm_core`), with ``u_hat`` read instead of
formed from ``u`` and ``W``:

* Forward, ``R + 1`` launches: sweep ``r`` on grid ``(cdiv(B, BB), n_isplit)`` first finishes
  iteration ``r - 1`` for its samples (partials of the previous sweep summed in a fixed order,
  bias, squash, ``V^r``), then walks its input capsules: logits ``prior_ij + <u_hat_ij, V^r_j>``
  divided by the temperature, softmax over j, partial ``s_j = sum_i c_ij u_hat_ij``. A last
  kernel finishes the last iteration.
* Backward, at most ``R + 2`` launches: ``R - 1`` reduction sweeps for the gradient reaching
  ``V^r`` (``D_j = sum_i gl_ij u_hat_ij``), one kernel for the first iteration's ``gs``, then
  one gradient sweep per input capsule and split of the samples writing
  ``g_u_hat_ij = sum_r c^r_ij gs^r_j + gl^r_ij V^r_j`` (with the prior's and the bias's
  gradients), and a kernel summing the prior/bias partials over sample splits when there are
  several. ``detach_inner``: only the last iteration's ``c^R_ij gs^R_j`` (and ``gl^R`` for the
  prior). No atomics: bitwise reproducible.
* The tiles are one input capsule's ``[J, Dout]`` slice for ``BB`` samples; the products are
  elementwise (no contraction for a tensor core), in float32 for float16/bfloat16/float32
  inputs and float64 for float64.
* Saved for backward: ``u_hat`` and the prior (the caller's tensors, no copies) and ``s^r``,
  ``V^r`` (``2*R*B*J*Dout`` elements in the accumulation dtype): nothing of size ``I*J`` per
  iteration.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._gemm_core import run_routing


def dynamic_routing(
    u_hat: torch.Tensor,
    iterations: int = 3,
    *,
    bias: Optional[torch.Tensor] = None,
    leaky: bool = False,
    detach_inner: bool = False,
    return_coupling: bool = False,
    prior: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
):
    """Routing by agreement over ``u_hat [B, I, J, Dout]``; ``bias [J, Dout]`` and the learned
    ``prior`` logits ``[I, J]`` optional, softmax at ``temperature``.

    Returns ``v [B, J, Dout]``, or ``(v, c)`` with the last couplings ``c [B, I, J]`` (no
    gradient; the leaky column left out). Semantics of every option as in
    :func:`capsnet_ext.reference.dynamic_routing`; inputs are checked by
    :func:`capsnet_ext.ops.dynamic_routing`.
    """
    return run_routing(u_hat, iterations, bias, leaky, detach_inner, return_coupling, prior,
                       temperature)
