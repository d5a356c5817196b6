"""Fully fused ``capsule_routing``: ``dynamic_routing(predict(u, W))`` in Triton without ever
writing the prediction vectors ``u_hat [B, I, J, Dout]`` to memory, forward or backward.

Design (details in :mod:`._routing_core`)
-----------------------------------------
* Every pass recomputes its tile of ``u_hat`` in registers as
  ``sum_k W[i, j, d, k] u[b, i, k]``; a slice of ``W`` read once serves a block of samples.
* Forward, per iteration r: grid ``(cdiv(B, BLOCK_B), n_isplit)``; a program holds ``V^r``
  (the sum of the earlier outputs, [J, Dout]) and a partial ``s`` for each of its
  ``BLOCK_B`` samples and walks ``[BLOCK_B, BLOCK_I, J, Dout]`` tiles; logits are
  ``prior_ij + <u_hat_ij, V^r_j>``, divided by the temperature before the softmax. Partials
  cross programs through a ``[n_isplit, B, J, Dout]`` workspace, reduced with bias and squash
  by a ``(B,)`` grid. ``2R`` launches.
* Backward, iterations in reverse from the saved ``s^r`` and ``V^r``: squash backward
  (grid ``(B,)``), and for ``r > 1`` one reduction sweep for the gradient reaching ``V^r``;
  then one sweep on grid ``(cdiv(I, BLOCK_I), n_bsplit)`` whose programs keep their W tile in
  registers across their samples, rebuild ``g_u_hat`` for all iterations and turn it into
  ``du`` (written per sample), ``dW`` and the prior's gradient (both summed over the
  program's samples in registers; ``n_bsplit`` partials summed after: no atomics).
* Memory kept for backward: ``u``, ``W`` (and the prior) and ``s^r``, ``V^r`` for every
  iteration: ``B*I*Din + I*J*Dout*Din + 2*R*B*J*Dout`` elements (``+ I*J`` for a prior);
  autograd over the reference keeps ``u_hat`` itself (``B*I*J*Dout``) and per-iteration
  ``[B, I, J]`` tensors besides.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._routing_core import run_routing


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
    return run_routing(u, W, iterations, bias, leaky, detach_inner, return_coupling,
                       prior, temperature)
