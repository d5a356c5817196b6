"""``dynamic_routing`` and ``capsule_routing`` on the CUDA backend.

Kernels: ``csrc/routing.cu``. ``dynamic_routing`` sweeps over a given ``u_hat``;
``capsule_routing`` recomputes ``u_hat`` from ``u`` and ``W`` in every sweep, forward and
backward, and never stores it. Both keep for the backward only the per-iteration ``s^r`` and
running sums ``V^r`` (``[R, B, J, Dout]`` each), plus their inputs. Every option of the
reference is implemented, the learned ``prior`` logits (with gradient) and the softmax
``temperature`` included. Autograd and fakes: :mod:`._schema`; the kernel instance each call
runs (samples per lane, results bitwise the same): :mod:`.tuning`.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import tuning


def dynamic_routing_with(ops, u_hat, iterations=3, *, bias=None, leaky=False, detach_inner=False,
                         return_coupling=False, prior=None, temperature=1.0):
    lanes = tuning.lane_samples_for("fwd", (u_hat,))
    v, c, _, _ = ops.routing_forward(u_hat, bias, prior, iterations, leaky, detach_inner, return_coupling,
                                     float(temperature), lanes)
    return (v, c) if return_coupling else v


def capsule_routing_with(ops, u, W, iterations=3, *, bias=None, leaky=False, detach_inner=False,
                         return_coupling=False, prior=None, temperature=1.0):
    lanes = tuning.lane_samples_for("fwd", (u, W))
    v, c, _, _ = ops.capsule_routing_forward(u, W, bias, prior, iterations, leaky, detach_inner, return_coupling,
                                             float(temperature), lanes)
    return (v, c) if return_coupling else v


def dynamic_routing(u_hat: torch.Tensor, iterations: int = 3, *, bias: Optional[torch.Tensor] = None,
                    leaky: bool = False, detach_inner: bool = False, return_coupling: bool = False,
                    prior: Optional[torch.Tensor] = None, temperature: float = 1.0):
    """Routing over ``u_hat [B, I, J, Dout]`` -> ``v [B, J, Dout]`` (and ``c [B, I, J]``,
    without gradient, when ``return_coupling``); options as in
    :func:`capsnet_ext.reference.dynamic_routing`."""
    return dynamic_routing_with(torch.ops.capsnet_ext, u_hat, iterations, bias=bias, leaky=leaky,
                                detach_inner=detach_inner, return_coupling=return_coupling, prior=prior,
                                temperature=temperature)


def capsule_routing(u: torch.Tensor, W: torch.Tensor, iterations: int = 3, *,
                    bias: Optional[torch.Tensor] = None, leaky: bool = False, detach_inner: bool = False,
                    return_coupling: bool = False, prior: Optional[torch.Tensor] = None,
                    temperature: float = 1.0):
    """Fused prediction and routing: ``u [B, I, Din]``, ``W [I, J, Dout, Din]`` ->
    ``v [B, J, Dout]`` (and ``c [B, I, J]`` when ``return_coupling``)."""
    return capsule_routing_with(torch.ops.capsnet_ext, u, W, iterations, bias=bias, leaky=leaky,
                                detach_inner=detach_inner, return_coupling=return_coupling, prior=prior,
                                temperature=temperature)
