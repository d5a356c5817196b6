"""Fully fused ``capsule_routing``: ``dynamic_routing(predict(u, W))`` in Triton without ever
writing the prediction vectors ``u_hat [B, I, J, Dout]`` to memory, forward or backward.

Design (kernels in :mod:`._gemm_kernels`, launchers in :mod:`._gemm_core`)
--------------------------------------------------------------------------
* Every contraction is a batched tensor-core ``tl.dot`` with the output capsule ``j`` as the
  batch axis: logits ``<u_bi, V_j @ W_ij>`` (``[BB x Dout] @ [Dout x IC*Din]``), weighted sums
  ``(c_j * u) @ W_j^T`` over a chunk of input capsules flattened with their ``Din`` entries;
  ``u_hat`` exists neither in memory nor as a tile.
* Forward, ``R + 1`` launches: iteration r is one sweep on grid ``(cdiv(B, BB), n_isplit)``
  writing partial ``s`` per split of the input capsules; the next sweep (or the finishing
  kernel after the last) sums them in a fixed order, adds the bias and squashes.
* Backward, at most ``R + 3`` launches: ``R - 1`` reduction sweeps for the gradient reaching
  ``V^r``, one kernel for the first iteration's ``gs``, then per input capsule the gradient
  sweeps: ``g_u_hat = sum_r c^r gs^r + gl^r V^r`` in registers, ``du = sum_j g_u_hat @ W`` (with
  the prior and bias gradients) and ``dW = g_u_hat^T @ u`` summed over the samples of the
  program (one more launch sums sample splits when the GPU needs them). No atomics.
* Memory kept for backward: ``u``, ``W``, ``prior`` (if given) and ``s^r``, ``V^r`` for every
  iteration: ``B*I*Din + I*J*Dout*Din (+ I*J) + 2*R*B*J*Dout`` elements; autograd over the
  reference keeps ``u_hat`` itself (``B*I*J*Dout``) and per-iteration ``[B, I, J]`` tensors
  besides.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._gemm_core import run_capsule_routing


def capsule_routing(
    u: torch.Tensor,
    W: torch.Tensor,
    iterations: int = 3,
    *,
    bias: Optional[torch.Tensor] = None,
    leaky: bool = False,
    detach_inner: bool = False,
    return_coupling: bool = False,
    prior: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
):
    """``dynamic_routing(predict(u, W), ...)`` as one fused op.

    Args:
        u: input capsules ``[B, I, Din]``.
        W: transformation matrices ``[I, J, Dout, Din]``.
        iterations, bias (``[J, Dout]``), leaky, detach_inner, return_coupling, prior
            (``[I, J]``), temperature: as in :func:`capsnet_ext.reference.dynamic_routing`.
    Returns:
        ``v [B, J, Dout]`` or ``(v, c)`` with ``c [B, I, J]`` (no gradient).
    """
    return run_capsule_routing(u, W, iterations, bias, leaky, detach_inner, return_coupling,
                               prior, temperature)
