"""Routing by agreement over given prediction vectors ``u_hat [B, I, J, Dout]`` in Triton.

Every iteration (softmax over j, weighted sum over i, bias, squash, agreement) runs in the
fused kernels of :mod:`._routing_core`; this file is the functional wrapper.

Design (details in :mod:`._routing_core`)
-----------------------------------------
* Forward: per iteration r, ``_sweep_kernel`` on grid ``(cdiv(B, BLOCK_B), n_isplit)``:
  a program holds ``V^r = v^1 + ... + v^(r-1)`` of its ``BLOCK_B`` samples ([J, Dout] each)
  and walks its input capsules in ``[BLOCK_B, BLOCK_I, J, Dout]`` tiles of ``u_hat``: logits
  ``prior_ij + <u_hat_ij, V^r_j>``, softmax over j of the logits divided by the temperature,
  partial ``s_j``. The sum over i crosses programs through a ``[n_isplit, B, J, Dout]``
  workspace, reduced (with bias and squash) by ``_finalize_fwd_kernel`` on grid ``(B,)``.
  The logits are never stored: the identity
  ``l^r_ij = prior_ij + <u_hat_ij, V^r_j>`` recomputes them.
* Backward: iterations in reverse. The squash backward gives ``gs^r``; for ``r > 1`` one sweep
  computes ``D_j = sum_i gl_ij u_hat_ij`` (gradient reaching ``V^r``, hence every earlier
  ``v``); a last kernel on grid ``(cdiv(I, GRAD_BLOCK_I), B)`` writes
  ``g_u_hat_ij = sum_r c^r_ij gs^r_j + gl^r_ij V^r_j`` and, with a prior, each sample's
  ``sum_r gl^r_ij``, summed over samples afterwards (no atomics: deterministic).
  ``detach_inner``: only the last iteration's ``c^R_ij gs^R_j`` (and ``gl^R`` for the prior).
* Saved for backward: ``u_hat`` and the prior (the caller's tensors, no copies) and ``s^r``, ``V^r``
  (``2*R*B*J*Dout`` elements in the accumulation dtype): nothing of size ``I*J`` per iteration.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._routing_core import run_routing


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
