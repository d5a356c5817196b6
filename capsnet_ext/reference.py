"""Pure-PyTorch reference path: the readable specification of every op and the oracle that
every kernel backend is tested against (forward and gradients).

Semantics follow the official TensorFlow CapsNet code (Sabour, Frosst & Hinton 2017):

* ``predict``: ``u_hat[b, i, j] = W[i, j] @ u[b, i]``.
* ``dynamic_routing``: routing logits start at zero for every sample; the coupling
  coefficients are a softmax over the output capsules ``j``; ``s_j = sum_i c_ij u_hat_ij``
  (+ ``bias_j``), ``v_j = squash(s_j)``; the agreement ``<u_hat_ij, v_j>`` is added to the
  logits after every iteration but the last. Gradients flow through every iteration unless
  ``detach_inner`` is set.
* Options of Mitterreiter et al. (AAAI 2023, ``AgreementRouting`` in their code): a learned
  ``prior`` logit ``[I, J]`` shared by all samples, added to the logits before every softmax
  (so the first coupling is ``softmax(prior / T)`` instead of uniform), and a softmax
  ``temperature`` ``T``: ``c = softmax((prior + agreement) / T)``. Their ``n_iter = 3``
  agreement updates make 4 weighted sums, i.e. ``iterations=4`` here.

This module does no argument checking; the public functions in :mod:`capsnet_ext.ops` check
their inputs and then dispatch here or to a kernel backend with the same signatures.
"""
from __future__ import annotations

from typing import Optional

import torch

NAME = "reference"


def availability(device: torch.device) -> Optional[str]:
    """The reference runs wherever PyTorch runs."""
    return None


def unsupported_reason(op: str, *, dtype: torch.dtype, **options) -> Optional[str]:
    """The reference implements every op with every option and dtype: always ``None``."""
    return None


def squash(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``v = |s|^2 / (1 + |s|^2) * s / |s|``, written as ``s * |s| / (1 + |s|^2)``.

    ``|s|`` is computed from a squared norm clamped at the dtype's smallest normal number,
    so the value and the gradient at ``s = 0`` are finite (the exact limit is 0 for both;
    the clamp changes the result only for ``|s|^2`` below that number). Half-precision
    inputs are squashed in float32 and cast back.

    Args:
        s: any floating-point tensor.
        dim: the dimension of the capsule vectors.

    Returns:
        ``v``, shaped and typed like ``s``.
    """
    work = s.float() if s.dtype in (torch.float16, torch.bfloat16) else s
    sq_norm = (work * work).sum(dim=dim, keepdim=True)
    norm = sq_norm.clamp_min(torch.finfo(work.dtype).tiny).sqrt()
    return (work * (norm / (1.0 + sq_norm))).to(s.dtype)


def predict(u: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Prediction vectors ``u_hat [B, I, J, Dout]`` from ``u [B, I, Din]`` and
    ``W [I, J, Dout, Din]``: ``u_hat[b, i, j] = W[i, j] @ u[b, i]``.

    Returns:
        ``u_hat [B, I, J, Dout]``.
    """
    return torch.einsum("ijdk,bik->bijd", W, u)


def coupling(logits: torch.Tensor, leaky: bool = False, temperature: float = 1.0) -> torch.Tensor:
    """Softmax of the routing logits ``[B, I, J]`` over the output capsules ``j``, at
    ``temperature`` (``softmax(logits / temperature)``).

    ``leaky`` adds a constant zero "none of the above" logit to each softmax and leaves its
    coefficient out of the result, so each row then sums to less than 1 (the zero logit is
    zero at any temperature).

    Returns:
        the couplings ``c [B, I, J]``.
    """
    if temperature != 1.0:
        logits = logits / temperature
    if not leaky:
        return torch.softmax(logits, dim=-1)
    padded = torch.cat([logits, logits.new_zeros(logits.shape[:-1] + (1,))], dim=-1)
    return torch.softmax(padded, dim=-1)[..., :-1]


def _weighted_sum(c: torch.Tensor, u_hat: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    s = torch.einsum("bij,bijd->bjd", c, u_hat)
    return s if bias is None else s + bias


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
    """Routing by agreement over prediction vectors ``u_hat [B, I, J, Dout]``, with
    ``iterations`` weighted sums, an optional ``bias [J, Dout]`` added to ``s`` before every
    squash and the ``leaky`` "none of the above" logit (see :func:`coupling`). The public,
    checked version is :func:`capsnet_ext.ops.dynamic_routing`.

    ``prior`` (``[I, J]``, optional) is added to the logits before every softmax and
    ``temperature`` divides them: ``c = softmax((prior + agreement) / temperature)``.

    ``detach_inner=True`` runs every iteration but the last without gradient and uses the
    agreement as a constant in the last, so gradient reaches ``u_hat`` (and ``bias``) only
    through the last iteration's weighted sum, and ``prior`` only through the last coupling.

    Returns:
        ``v [B, J, Dout]``, or ``(v, c)`` with the last iteration's coupling coefficients
        ``c [B, I, J]`` (detached: they are for inspection) when ``return_coupling`` is set.
    """
    B, I, J, _ = u_hat.shape
    agreement = u_hat.new_zeros(B, I, J)  # sum over earlier iterations of <u_hat_ij, v_j>

    def logits():
        return agreement if prior is None else prior + agreement

    for r in range(iterations):
        last = r == iterations - 1
        if detach_inner and not last:
            with torch.no_grad():
                c = coupling(logits(), leaky, temperature)
                v = squash(_weighted_sum(c, u_hat, bias))
                agreement = agreement + torch.einsum("bijd,bjd->bij", u_hat, v)
        else:
            # Under detach_inner the agreement here carries no gradient: the last coupling
            # depends on the prior alone.
            c = coupling(logits(), leaky, temperature)
            v = squash(_weighted_sum(c, u_hat, bias))
            if not last:
                agreement = agreement + torch.einsum("bijd,bjd->bij", u_hat, v)
    if return_coupling:
        return v, c.detach()
    return v


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
    """``dynamic_routing(predict(u, W), ...)`` for ``u [B, I, Din]`` and
    ``W [I, J, Dout, Din]``, with the options ``iterations``, ``bias``, ``leaky``,
    ``detach_inner``, ``return_coupling``, ``prior`` and ``temperature`` of
    :func:`dynamic_routing`. The reference materialises ``u_hat``; kernel backends recompute
    it instead of storing it.

    Returns:
        ``v [B, J, Dout]`` or ``(v, c)``, as :func:`dynamic_routing`.
    """
    return dynamic_routing(
        predict(u, W),
        iterations,
        bias=bias,
        leaky=leaky,
        detach_inner=detach_inner,
        return_coupling=return_coupling,
        prior=prior,
        temperature=temperature,
    )
