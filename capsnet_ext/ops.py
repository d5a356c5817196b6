"""Public functional ops: check the inputs, choose a backend, run it.

Every op takes ``backend="auto" | "reference" | "triton" | "cuda"``; see
:mod:`capsnet_ext.dispatch` for how ``auto`` chooses.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import reference
from ._validation import (
    check_capsule_routing_inputs,
    check_float_tensor,
    check_predict_inputs,
    check_routing_inputs,
)
from .dispatch import select


def _routing_extras(prior, temperature) -> dict:
    """The Mitterreiter et al. options, passed on only when used, so a backend that does not
    implement them is never handed them (``unsupported_reason`` steers ``auto`` away)."""
    extras = {}
    if prior is not None:
        extras["prior"] = prior
    if float(temperature) != 1.0:
        extras["temperature"] = float(temperature)
    return extras


def squash(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Capsule non-linearity ``v = |s|^2 / (1 + |s|^2) * s / |s|`` along ``dim``.

    Finite value and gradient at ``s = 0``. Elementwise-cheap, so it always runs in PyTorch
    (kernel backends fuse it inside routing instead).
    """
    check_float_tensor("s", s)
    return reference.squash(s, dim)


def predict(u: torch.Tensor, W: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Prediction vectors of every (input, output) capsule pair.

    Args:
        u: input capsules ``[B, I, Din]``.
        W: transformation matrices ``[I, J, Dout, Din]``.
    Returns:
        ``u_hat [B, I, J, Dout]`` with ``u_hat[b, i, j] = W[i, j] @ u[b, i]``.
    """
    check_predict_inputs(u, W)
    sizes = dict(J=W.shape[1], Dout=W.shape[2], Din=W.shape[3])
    return select("predict", backend, u.device, u.dtype, sizes=sizes).predict(u, W)


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
    backend: str = "auto",
):
    """Routing by agreement (Sabour et al. 2017) over given prediction vectors.

    Args:
        u_hat: prediction vectors ``[B, I, J, Dout]``.
        iterations: routing iterations, >= 1.
        bias: optional ``[J, Dout]`` added to ``s`` before the squash in every iteration.
        leaky: add a zero "none of the above" logit to each softmax over ``j``.
        detach_inner: let gradient reach ``u_hat`` only through the last iteration's weighted
            sum (couplings treated as constants); the default backpropagates through every
            iteration, as the official code does.
        return_coupling: also return the last iteration's couplings ``c [B, I, J]``
            (without gradient; the leaky column is left out).
        prior: optional ``[I, J]`` logits shared by all samples, added before every softmax
            (Mitterreiter et al.'s learned prior; with gradient).
        temperature: softmax temperature ``T > 0``: ``c = softmax((prior + agreement) / T)``.
    Returns:
        ``v [B, J, Dout]`` or ``(v, c)``.
    """
    check_routing_inputs(u_hat, iterations, bias, prior, temperature)
    options = dict(iterations=iterations, bias=bias is not None, leaky=leaky,
                   detach_inner=detach_inner, return_coupling=return_coupling,
                   prior=prior is not None, temperature=float(temperature),
                   sizes=dict(J=u_hat.shape[2], Dout=u_hat.shape[3]))
    impl = select("dynamic_routing", backend, u_hat.device, u_hat.dtype, **options)
    return impl.dynamic_routing(u_hat, iterations, bias=bias, leaky=leaky,
                                detach_inner=detach_inner, return_coupling=return_coupling,
                                **_routing_extras(prior, temperature))


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
    backend: str = "auto",
):
    """``dynamic_routing(predict(u, W), ...)`` as one op: the fused entry point.

    Kernel backends recompute ``u_hat`` from ``u [B, I, Din]`` and ``W [I, J, Dout, Din]``
    in every pass instead of storing it, forward and backward. Options as in
    :func:`dynamic_routing`.
    """
    check_capsule_routing_inputs(u, W, iterations, bias, prior, temperature)
    options = dict(iterations=iterations, bias=bias is not None, leaky=leaky,
                   detach_inner=detach_inner, return_coupling=return_coupling,
                   prior=prior is not None, temperature=float(temperature),
                   sizes=dict(J=W.shape[1], Dout=W.shape[2], Din=W.shape[3]))
    impl = select("capsule_routing", backend, u.device, u.dtype, **options)
    return impl.capsule_routing(u, W, iterations, bias=bias, leaky=leaky,
                                detach_inner=detach_inner, return_coupling=return_coupling,
                                **_routing_extras(prior, temperature))
