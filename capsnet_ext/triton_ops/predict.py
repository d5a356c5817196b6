"""Prediction vectors ``u_hat[b, i, j] = W[i, j] @ u[b, i]`` in Triton, forward and backward.

Shapes: ``u [B, I, Din]``, ``W [I, J, Dout, Din]``, ``u_hat [B, I, J, Dout]``. The output
pairs ``(j, d)`` of one input capsule are flattened to ``n = j * Dout + d`` (``N = J * Dout``).

Design
------
* Forward ``_predict_fwd_kernel``, grid ``(I, cdiv(N, BLOCK_N), cdiv(B, BLOCK_B))``: a program
  loads a ``[BLOCK_N, BLOCK_K]`` slice of ``W[i]`` once and applies it to ``BLOCK_B`` samples,
  ``u_hat[b, i, n] = sum_k W[i, n, k] u[b, i, k]`` as a broadcast product summed over k (the
  reduction is short, Din is typically 8); ``Din`` wider than ``BLOCK_K`` is walked in chunks.
* ``du`` ``_predict_du_kernel``, grid ``(I, cdiv(B, BLOCK_B), cdiv(Din, BLOCK_K))``:
  ``du[b, i, k] = sum_n g[b, i, n] W[i, n, k]``, walking n in chunks.
* ``dW`` ``_predict_dw_kernel``, grid ``(I, cdiv(N, BLOCK_N), cdiv(Din, BLOCK_K))``:
  ``dW[i, n, k] = sum_b g[b, i, n] u[b, i, k]``, walking the batch in chunks: the sum over
  samples stays inside one program, so there are no atomics and the result is deterministic.

No ``tl.dot`` (the reduction over ``Din``, typically 8, is a broadcast product): float32 is
computed in float32 on CUDA cores whatever the TF32 settings say (with fused multiply-adds,
``enable_fp_fusion=True`` passed explicitly); float16 and bfloat16 are accumulated in float32,
float64 in float64. Offsets along the sample axis are 64-bit (``B * I * J * Dout`` passes 2^31
at realistic sizes). Inputs are read through their strides
(non-contiguous inputs need no copy). Saved for backward: ``u`` and ``W`` only.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ._gemm_core import device_guard
from ._routing_core import _tl_acc

# Elements of the 3-D register tile of one program.
TILE_ELEMENTS = 8192


def _blocks(B: int, N: int, Din: int):
    """(BLOCK_B, BLOCK_N, BLOCK_K): powers of two whose product is at most TILE_ELEMENTS."""
    block_k = min(triton.next_power_of_2(Din), 64)
    block_n = min(triton.next_power_of_2(N), max(1, TILE_ELEMENTS // (block_k * 2)))
    block_b = min(triton.next_power_of_2(B), max(1, TILE_ELEMENTS // (block_k * block_n)))
    return block_b, block_n, block_k


@triton.jit
def _predict_fwd_kernel(
    u_ptr, u_b, u_i, u_k,  # u [B, I, Din] and its strides
    w_ptr, w_i, w_j, w_d, w_k,  # W [I, J, D, Din] and its strides
    out_ptr,  # u_hat [B, I, J, D], contiguous
    B, I, D, N, Din,
    ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    i = tl.program_id(0)
    n_offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    b_offs = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
    n_mask = n_offs < N
    b_mask = b_offs < B
    b64 = tl.cast(b_offs, tl.int64)  # B * I * N passes 2^31 at realistic sizes
    w_row = (n_offs // D) * w_j + (n_offs % D) * w_d
    acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=ACC)
    for k0 in range(0, Din, BLOCK_K):
        k_offs = k0 + tl.arange(0, BLOCK_K)
        k_mask = k_offs < Din
        w = tl.load(w_ptr + i * w_i + w_row[:, None] + k_offs[None, :] * w_k,
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(ACC)
        x = tl.load(u_ptr + b_offs[:, None] * u_b + i * u_i + k_offs[None, :] * u_k,
                    mask=b_mask[:, None] & k_mask[None, :], other=0.0).to(ACC)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    tl.store(out_ptr + (b64[:, None] * I + i) * N + n_offs[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=b_mask[:, None] & n_mask[None, :])


@triton.jit
def _predict_du_kernel(
    g_ptr, g_b, g_i, g_j, g_d,  # dL/du_hat [B, I, J, D] and its strides
    w_ptr, w_i, w_j, w_d, w_k,  # W [I, J, D, Din] and its strides
    du_ptr,  # du [B, I, Din], contiguous
    B, I, D, N, Din,
    ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``du[b, i, k] = sum_n g[b, i, n] W[i, n, k]``."""
    i = tl.program_id(0)
    b_offs = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    k_offs = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    b_mask = b_offs < B
    b64 = tl.cast(b_offs, tl.int64)  # B * I * N passes 2^31 at realistic sizes
    k_mask = k_offs < Din
    acc = tl.zeros([BLOCK_B, BLOCK_K], dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        n_offs = n0 + tl.arange(0, BLOCK_N)
        n_mask = n_offs < N
        j = n_offs // D
        d = n_offs % D
        w = tl.load(w_ptr + i * w_i + (j * w_j + d * w_d)[:, None] + k_offs[None, :] * w_k,
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(ACC)
        g = tl.load(g_ptr + b64[:, None] * g_b + i * g_i + (j * g_j + d * g_d)[None, :],
                    mask=b_mask[:, None] & n_mask[None, :], other=0.0).to(ACC)
        acc += tl.sum(g[:, :, None] * w[None, :, :], axis=1)
    tl.store(du_ptr + (b64[:, None] * I + i) * Din + k_offs[None, :],
             acc.to(du_ptr.dtype.element_ty), mask=b_mask[:, None] & k_mask[None, :])


@triton.jit
def _predict_dw_kernel(
    g_ptr, g_b, g_i, g_j, g_d,  # dL/du_hat [B, I, J, D] and its strides
    u_ptr, u_b, u_i, u_k,  # u [B, I, Din] and its strides
    dw_ptr,  # dW [I, J, D, Din], contiguous
    B, D, N, Din,
    ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``dW[i, n, k] = sum_b g[b, i, n] u[b, i, k]``."""
    i = tl.program_id(0)
    n_offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_offs = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = n_offs < N
    k_mask = k_offs < Din
    g_col = (n_offs // D) * g_j + (n_offs % D) * g_d
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=ACC)
    for b0 in range(0, B, BLOCK_B):
        b_offs = b0 + tl.arange(0, BLOCK_B)
        b_mask = b_offs < B
        g = tl.load(g_ptr + tl.cast(b_offs, tl.int64)[:, None] * g_b + i * g_i + g_col[None, :],
                    mask=b_mask[:, None] & n_mask[None, :], other=0.0).to(ACC)
        x = tl.load(u_ptr + b_offs[:, None] * u_b + i * u_i + k_offs[None, :] * u_k,
                    mask=b_mask[:, None] & k_mask[None, :], other=0.0).to(ACC)
        acc += tl.sum(g[:, :, None] * x[:, None, :], axis=0)
    tl.store(dw_ptr + (i * N + n_offs[:, None]) * Din + k_offs[None, :],
             acc.to(dw_ptr.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])


def _predict_forward(u: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    B, I, Din = u.shape
    _, J, D, _ = W.shape
    N = J * D
    out = torch.empty(B, I, J, D, device=u.device, dtype=u.dtype)
    block_b, block_n, block_k = _blocks(B, N, Din)
    grid = (I, triton.cdiv(N, block_n), triton.cdiv(B, block_b))
    with device_guard(u):
        _predict_fwd_kernel[grid](u, *u.stride(), W, *W.stride(), out, B, I, D, N, Din,
                                  ACC=_tl_acc(u.dtype), BLOCK_B=block_b, BLOCK_N=block_n,
                                  BLOCK_K=block_k, enable_fp_fusion=True)
    return out


def _predict_backward(grad, u, W, need_u: bool, need_w: bool):
    B, I, Din = u.shape
    _, J, D, _ = W.shape
    N = J * D
    block_b, block_n, block_k = _blocks(B, N, Din)
    acc = _tl_acc(u.dtype)
    du = dW = None
    if need_u:
        du = torch.empty(B, I, Din, device=u.device, dtype=u.dtype)
        grid = (I, triton.cdiv(B, block_b), triton.cdiv(Din, block_k))
        with device_guard(u):
            _predict_du_kernel[grid](grad, *grad.stride(), W, *W.stride(), du, B, I, D, N, Din,
                                     ACC=acc, BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_K=block_k,
                                     enable_fp_fusion=True)
    if need_w:
        dW = torch.empty(I, J, D, Din, device=u.device, dtype=W.dtype)
        grid = (I, triton.cdiv(N, block_n), triton.cdiv(Din, block_k))
        with device_guard(u):
            _predict_dw_kernel[grid](grad, *grad.stride(), u, *u.stride(), dW, B, D, N, Din,
                                     ACC=acc, BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_K=block_k,
                                     enable_fp_fusion=True)
    return du, dW


class PredictFunction(torch.autograd.Function):
    """``u_hat = predict(u, W)`` with Triton kernels for the forward and both gradients."""

    @staticmethod
    def forward(ctx, u, W):
        ctx.save_for_backward(u, W)
        return _predict_forward(u, W)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        u, W = ctx.saved_tensors
        return _predict_backward(grad, u, W, ctx.needs_input_grad[0], ctx.needs_input_grad[1])


@torch.library.custom_op("capsnet_ext_triton::predict", mutates_args=())
def predict_op(u: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """The forward as a registered operator, so torch.compile keeps it in the graph."""
    return _predict_forward(u, W)


@predict_op.register_fake
def _(u, W):
    return u.new_empty(u.shape[0], u.shape[1], W.shape[1], W.shape[2])


@torch.library.custom_op("capsnet_ext_triton::predict_backward", mutates_args=())
def predict_backward_op(grad: torch.Tensor, u: torch.Tensor, W: torch.Tensor, need_u: bool,
                        need_w: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(du, dW)``; a gradient not asked for is empty."""
    du, dW = _predict_backward(grad, u, W, need_u, need_w)
    return (du if du is not None else u.new_empty(0)), (dW if dW is not None else W.new_empty(0))


@predict_backward_op.register_fake
def _(grad, u, W, need_u, need_w):
    return (u.new_empty(u.shape) if need_u else u.new_empty(0),
            W.new_empty(W.shape) if need_w else W.new_empty(0))


def _predict_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _predict_backward_formula(ctx, grad):
    u, W = ctx.saved_tensors
    need_u, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    du, dW = predict_backward_op(grad, u, W, need_u, need_w)
    return (du if need_u else None), (dW if need_w else None)


predict_op.register_autograd(_predict_backward_formula, setup_context=_predict_setup_context)


def predict(u: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Prediction vectors ``u_hat [B, I, J, Dout]`` from ``u [B, I, Din]`` and
    ``W [I, J, Dout, Din]``: ``u_hat[b, i, j] = W[i, j] @ u[b, i]``. Inputs are checked by
    :func:`capsnet_ext.ops.predict`. Eager calls use :class:`PredictFunction`; under
    torch.compile the registered operator (same launchers) is used."""
    if torch.compiler.is_compiling():
        return predict_op(u, W)
    return PredictFunction.apply(u, W)
