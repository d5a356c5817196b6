"""Schemas of the ``capsnet_ext`` CUDA ops, and their Python-side registrations.

The schemas are defined in C++ (``TORCH_LIBRARY(capsnet_ext, m)`` in
``csrc/capsnet_ext_ops.cpp``) and mirrored here; a test checks that both say the same. This
module registers, for the ops of a namespace, the fake (meta) implementations that let
``torch.compile`` trace them, and the autograd formulas that tie each forward op to its
backward op. It is written against the namespace as a parameter so the same registrations can
be exercised on the CPU against a test implementation of the ops.

Saved routing state (accumulation dtype: float32, or float64 for float64 inputs):
``s_all [R, B, J, D]`` holds every iteration's ``s^r`` (bias included) and
``V_all [R, B, J, D]`` the running sums ``V^r = v^0 + ... + v^(r-1)`` (``V^0 = 0``). With
``u`` and ``W`` (or ``u_hat``) they are all the backward needs: O(R·B·J·D) numbers instead of
anything of size ``B·I·J·D``.
"""
from __future__ import annotations

import functools
from typing import Dict

import torch

from .. import _routing_autograd
from . import tuning

SCHEMAS: Dict[str, str] = {
    "predict": "predict(Tensor u, Tensor W) -> Tensor",
    "predict_backward": "predict_backward(Tensor grad_u_hat, Tensor u, Tensor W) -> (Tensor, Tensor)",
    "routing_forward": (
        "routing_forward(Tensor u_hat, Tensor? bias, Tensor? prior, int iterations, bool leaky, "
        "bool detach_inner, bool return_coupling, float temperature, int lane_samples=0) "
        "-> (Tensor, Tensor, Tensor, Tensor)"
    ),
    "routing_backward": (
        "routing_backward(Tensor grad_v, Tensor u_hat, Tensor? prior, Tensor s_all, Tensor V_all, "
        "int iterations, bool leaky, bool detach_inner, bool has_bias, float temperature, int lane_samples=0) "
        "-> (Tensor, Tensor, Tensor)"
    ),
    "capsule_routing_forward": (
        "capsule_routing_forward(Tensor u, Tensor W, Tensor? bias, Tensor? prior, int iterations, bool leaky, "
        "bool detach_inner, bool return_coupling, float temperature, int lane_samples=0) "
        "-> (Tensor, Tensor, Tensor, Tensor)"
    ),
    "capsule_routing_backward": (
        "capsule_routing_backward(Tensor grad_v, Tensor u, Tensor W, Tensor? prior, Tensor s_all, "
        "Tensor V_all, int iterations, bool leaky, bool detach_inner, bool has_bias, float temperature, "
        "int lane_samples=0) "
        "-> (Tensor, Tensor, Tensor, Tensor)"
    ),
}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulation dtype, which is also the dtype of the saved routing state."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _routing_outputs(ref: torch.Tensor, B: int, I: int, J: int, D: int, iterations: int,
                     return_coupling: bool):
    v = ref.new_empty((B, J, D))
    c = ref.new_empty((B, I, J)) if return_coupling else ref.new_empty((0,))
    state = dict(dtype=acc_dtype(ref.dtype))
    return v, c, ref.new_empty((iterations, B, J, D), **state), ref.new_empty((iterations, B, J, D), **state)


def register(namespace: str) -> None:
    """Register fakes and autograd for the ops ``namespace::<name>`` (already defined)."""
    ops = getattr(torch.ops, namespace)
    qual = lambda name: f"{namespace}::{name}"  # noqa: E731

    # ---- fakes: output shapes and dtypes only (every output is a fresh contiguous tensor) --
    @torch.library.register_fake(qual("predict"))
    def _predict_fake(u, W):
        return u.new_empty((u.shape[0], u.shape[1], W.shape[1], W.shape[2]))

    @torch.library.register_fake(qual("predict_backward"))
    def _predict_backward_fake(grad_u_hat, u, W):
        return u.new_empty(u.shape), W.new_empty(W.shape)

    @torch.library.register_fake(qual("routing_forward"))
    def _routing_forward_fake(u_hat, bias, prior, iterations, leaky, detach_inner, return_coupling, temperature,
                              lane_samples=0):
        B, I, J, D = u_hat.shape
        return _routing_outputs(u_hat, B, I, J, D, iterations, return_coupling)

    # Gradients of absent bias / prior are [0]-shaped placeholders.
    def _optional_grads(ref, has_bias, prior, J, D):
        grad_bias = ref.new_empty((J, D)) if has_bias else ref.new_empty((0,))
        grad_prior = ref.new_empty(tuple(prior.shape)) if prior is not None else ref.new_empty((0,))
        return grad_bias, grad_prior

    @torch.library.register_fake(qual("routing_backward"))
    def _routing_backward_fake(grad_v, u_hat, prior, s_all, V_all, iterations, leaky, detach_inner, has_bias,
                               temperature, lane_samples=0):
        return (u_hat.new_empty(u_hat.shape),
                *_optional_grads(u_hat, has_bias, prior, u_hat.shape[2], u_hat.shape[3]))

    @torch.library.register_fake(qual("capsule_routing_forward"))
    def _capsule_routing_forward_fake(u, W, bias, prior, iterations, leaky, detach_inner, return_coupling,
                                      temperature, lane_samples=0):
        return _routing_outputs(u, u.shape[0], u.shape[1], W.shape[1], W.shape[2], iterations, return_coupling)

    @torch.library.register_fake(qual("capsule_routing_backward"))
    def _capsule_routing_backward_fake(grad_v, u, W, prior, s_all, V_all, iterations, leaky, detach_inner,
                                       has_bias, temperature, lane_samples=0):
        return (u.new_empty(u.shape), W.new_empty(W.shape),
                *_optional_grads(u, has_bias, prior, W.shape[1], W.shape[2]))

    # ---- autograd -------------------------------------------------------------------------
    # predict: du = sum_jd W^T g, dW = sum_b g u^T.
    def _predict_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _predict_backward(ctx, grad_u_hat):
        u, W = ctx.saved_tensors
        du, dW = ops.predict_backward(grad_u_hat, u, W)
        return du, dW

    torch.library.register_autograd(qual("predict"), _predict_backward, setup_context=_predict_setup)

    # Routing: the couplings and the saved state are outputs without gradient; the backward
    # runs the reverse sweeps and the final gradient sweep (see docs/cuda-backend.md). What is
    # saved and how the gradients map onto the inputs is shared with the Triton backend
    # (capsnet_ext._routing_autograd); the CUDA backward ops compute every gradient.
    def _routing_backward(grad_v, sources, prior, s_all, V_all, options, need):
        o = options
        has_bias = need.bias  # the bias gradient is [0]-shaped when not asked for
        # The backward's own lane_samples (tuning.forced, else the table's "bwd" entry, else the
        # forward's): bitwise the same gradients whichever it is.
        lanes = tuning.lane_samples_for("bwd", sources, default=int(o.extra[0]) if o.extra else 0)
        if len(sources) == 1:
            grad_u_hat, grad_bias, grad_prior = ops.routing_backward(
                grad_v, sources[0], prior, s_all, V_all, o.iterations, o.leaky, o.detach_inner,
                has_bias, o.temperature, lanes)
            return (grad_u_hat,), grad_bias, grad_prior
        du, dW, grad_bias, grad_prior = ops.capsule_routing_backward(
            grad_v, *sources, prior, s_all, V_all, o.iterations, o.leaky, o.detach_inner,
            has_bias, o.temperature, lanes)
        return (du, dW), grad_bias, grad_prior

    # The CUDA forward ops take lane_samples after the shared options.
    setup = functools.partial(_routing_autograd.setup_context, n_options=_routing_autograd.N_OPTIONS + 1)
    for name in ("routing_forward", "capsule_routing_forward"):
        torch.library.register_autograd(qual(name), _routing_autograd.make_backward_formula(
            _routing_backward), setup_context=setup)
