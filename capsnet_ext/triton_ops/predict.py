"""Prediction vectors ``u_hat[b, i, j] = W[i, j] @ u[b, i]`` in Triton, forward and backward,
as tensor-core GEMM tiles (``tl.dot``).

Shapes: ``u [B, I, Din]``, ``W [I, J, Dout, Din]``, ``u_hat [B, I, J, Dout]``. The output
pairs ``(j, d)`` of one input capsule are flattened to ``n = j * Dout + d`` (``N = J * Dout``).

Design
------
One input capsule ``i`` is one small GEMM per direction; every contraction is a 2-D ``tl.dot``.

* Forward ``_predict_fwd_kernel``, grid ``(I, cdiv(N, BLOCK_N), cdiv(B, BLOCK_B))``:
  ``u_hat[:, i, :] = u[:, i, :] [BLOCK_B x BLOCK_K] @ W[i]^T [BLOCK_K x BLOCK_N]``, ``Din``
  walked in chunks of ``BLOCK_K``.
* ``du`` ``_predict_du_kernel``, grid ``(I, cdiv(B, BLOCK_B), cdiv(Din, BLOCK_K))``:
  ``du[:, i, :] = g[:, i, :] [BLOCK_B x BLOCK_N] @ W[i] [BLOCK_N x BLOCK_K]``, ``n`` walked in
  chunks of ``BLOCK_N``.
* ``dW`` ``_predict_dw_kernel``, grid ``(I, cdiv(N, BLOCK_N), cdiv(Din, BLOCK_K))``:
  ``dW[i] = g[:, i, :]^T [BLOCK_N x BLOCK_B] @ u[:, i, :] [BLOCK_B x BLOCK_K]``, all samples
  walked in chunks of ``BLOCK_B`` inside one program: no atomics, the result is deterministic
  (bitwise reproducible from run to run).

Tiles (:class:`PredictConfig`; default :data:`DEFAULT_CONFIG`, 64 x 64 tiles, ``Din`` chunks of
at most 32, 4 warps, no software pipelining): the M of every dot (``BLOCK_B`` of the forward and
``du``, ``BLOCK_N`` of ``dW``) is the config's whatever the shape; the other axes are the
shape's (``N``, ``Din``, ``B``) padded to a power of two of at least 16 (:data:`MIN_DOT`, zeros
under masks) and at most the config's. So every dot has M, N, K >= 16, which Triton 3.6 demands
for every dtype (float32 and float64 included: "K >= 16"). An M of 64 at 4 warps is the tensor
cores' whole tile (4 warps x m16 of ``mma.sync``, or one warpgroup's m64 of ``wgmma``): the
dots' output layouts give each element to exactly one thread, so no store writes an element
from several threads (a racecheck on an H200 found the store of the old broadcast-and-``tl.sum``
forward, whose layout replicated elements across threads, racing with itself). Compiled for
sm_90 with Triton 3.6, no kernel spills at the default in any dtype, float16, bfloat16 and
TF32 dots are tensor-core instructions (HGMMA), float64 dots DMMA, as checked for every
recorded launch by ``python -m benchmarks.kernel_report.compile_check``.

Precision: float16/bfloat16 operands go to the tensor cores with float32 accumulation;
float32 follows PyTorch's switch for float32 matmuls like ``capsule_routing``
(:func:`._gemm_core.dot_precision`: ``"ieee"`` unless TF32 is allowed, then TF32); float64 is
float64 throughout. Multiply-adds are fused (``enable_fp_fusion=True``, passed explicitly).
Offsets that can pass 2^31 (``B * I * J * Dout`` and the rows of every input, read through
their strides) are 64-bit (:func:`._gemm_kernels.row_offset`). Inputs are read through their
strides (non-contiguous inputs need no copy). Saved for backward: ``u`` and ``W`` only.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._gemm_core import device_guard, dot_meta
from ._gemm_kernels import _op, row_offset

# Smallest M, N and K of every dot (Triton 3.6 refuses K < 16 for every dtype; 16 is also the
# M of one tensor-core instruction).
MIN_DOT = 16


class PredictConfig(NamedTuple):
    """Tiles and warps of the three kernels. ``BLOCK_B``: samples per tile (the M of the forward
    and ``du`` dots, the K chunk of the ``dW`` dot); ``BLOCK_N``: flattened ``(j, d)`` outputs
    per tile (the N of the forward dot, the K chunk of ``du``, the M of ``dW``); ``BLOCK_K``: the
    widest chunk of ``Din`` (K of the forward, N of ``du`` and ``dW``). Powers of two, at least
    16; ``BLOCK_B`` and ``BLOCK_N`` at least ``16 * warps`` so that the dot outputs are not
    replicated across warps."""
    BLOCK_B: int = 64
    BLOCK_N: int = 64
    BLOCK_K: int = 32
    warps: int = 4
    stages: int = 1


# Compiled for sm_90 with Triton 3.6, no kernel spills at this config in any dtype (checked for
# the recorded launches by ``python -m benchmarks.kernel_report.compile_check``, and for Din up
# to 70, J up to 32, Dout up to 32 when it was chosen): at most 242 registers per thread (the
# float64 forward; exact float32 at most 194, 16-bit and TF32 at most 167) of the 255 that 4
# warps allow, at most 48 KiB of shared memory. Din chunks of 64 spilled (exact float32
# forward, float64 ``du``), and so did 2 pipeline stages (float64, a few bytes): the loops are
# short (Din, N and B in chunks of 32-64) and many programs share an SM, so occupancy hides the
# load latency that stages would.
DEFAULT_CONFIG = PredictConfig()


def check_config(config: PredictConfig) -> None:
    """Raise ``ValueError`` unless ``config`` satisfies :class:`PredictConfig`'s rules."""
    blocks = (config.BLOCK_B, config.BLOCK_N, config.BLOCK_K)
    if any(b < MIN_DOT or b & (b - 1) for b in blocks):
        raise ValueError(f"tiles must be powers of two of at least {MIN_DOT}, got {config}")
    if min(config.BLOCK_B, config.BLOCK_N) < 16 * config.warps or config.stages < 1:
        raise ValueError(f"BLOCK_B and BLOCK_N must be at least 16 * warps and stages at least "
                         f"1, got {config}")


def _pow2_block(size: int, largest: int) -> int:
    """``size`` padded to a power of two, at least :data:`MIN_DOT`, at most ``largest``."""
    return max(MIN_DOT, min(largest, triton.next_power_of_2(size)))


def _flat_n(stride_j: int, stride_d: int, J: int, D: int) -> bool:
    """Whether ``n = j * D + d`` has the single stride ``stride_d`` (contiguous ``(j, d)``
    axes, or ``J == 1``): the kernel then forms ``n * stride_d`` (contiguous when
    ``stride_d`` is 1: vector loads) instead of ``(n // D) * stride_j + (n % D) * stride_d``."""
    return J == 1 or stride_j == D * stride_d


def _meta(dtype: torch.dtype, config: PredictConfig) -> dict:
    check_config(config)
    return dict(**dot_meta(dtype), num_warps=config.warps, num_stages=config.stages,
                enable_fp_fusion=True)


@triton.jit
def _n_offsets(n, D, s_j, s_d, FLAT: tl.constexpr):
    """Element offsets of the flattened ``n = j * D + d`` along axes of strides ``s_j``, ``s_d``."""
    if FLAT:
        return n * s_d
    return (n // D) * s_j + (n % D) * s_d


@triton.jit
def _predict_fwd_kernel(
    u_ptr, u_b, u_i, u_k,  # u [B, I, Din] and its strides
    w_ptr, w_i, w_j, w_d, w_k,  # W [I, J, D, Din] and its strides
    out_ptr,  # u_hat [B, I, J, D], contiguous
    B, I, D, N, Din,
    W_FLAT: tl.constexpr, ACC: tl.constexpr, DT: tl.constexpr, DOT_DT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``u_hat[b, i, n] = sum_k u[b, i, k] W[i, n, k]``: ``[BLOCK_B x BLOCK_K] @ [BLOCK_K x
    BLOCK_N]`` dots over chunks of ``Din``."""
    i = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
    n_mask = n < N
    b_mask = b < B
    u_rows = u_ptr + row_offset(i, u_i) + row_offset(b, u_b)[:, None]  # [BLOCK_B, 1]
    w_cols = w_ptr + row_offset(i, w_i) + _n_offsets(n, D, w_j, w_d, W_FLAT)[None, :]
    acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=ACC)
    for k0 in range(0, Din, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < Din
        x = tl.load(u_rows + k[None, :] * u_k, mask=b_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_cols + k[:, None] * w_k, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(_op(x, DT, DOT_DT), _op(w, DT, DOT_DT), acc, input_precision=PRECISION,
                     out_dtype=ACC)
    tl.store(out_ptr + row_offset(b, I * N)[:, None] + i * N + n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=b_mask[:, None] & n_mask[None, :])


@triton.jit
def _predict_du_kernel(
    g_ptr, g_b, g_i, g_j, g_d,  # dL/du_hat [B, I, J, D] and its strides
    w_ptr, w_i, w_j, w_d, w_k,  # W [I, J, D, Din] and its strides
    du_ptr,  # du [B, I, Din], contiguous
    B, I, D, N, Din,
    G_FLAT: tl.constexpr, W_FLAT: tl.constexpr, ACC: tl.constexpr, DT: tl.constexpr,
    DOT_DT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``du[b, i, k] = sum_n g[b, i, n] W[i, n, k]``: ``[BLOCK_B x BLOCK_N] @ [BLOCK_N x
    BLOCK_K]`` dots over chunks of ``n``."""
    i = tl.program_id(0)
    b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    k = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    b_mask = b < B
    k_mask = k < Din
    g_rows = g_ptr + row_offset(i, g_i) + row_offset(b, g_b)[:, None]  # [BLOCK_B, 1]
    w_cols = w_ptr + row_offset(i, w_i) + k[None, :] * w_k  # [1, BLOCK_K]
    acc = tl.zeros([BLOCK_B, BLOCK_K], dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < N
        g = tl.load(g_rows + _n_offsets(n, D, g_j, g_d, G_FLAT)[None, :],
                    mask=b_mask[:, None] & n_mask[None, :], other=0.0)
        w = tl.load(w_cols + _n_offsets(n, D, w_j, w_d, W_FLAT)[:, None],
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(_op(g, DT, DOT_DT), _op(w, DT, DOT_DT), acc, input_precision=PRECISION,
                     out_dtype=ACC)
    tl.store(du_ptr + row_offset(b, I * Din)[:, None] + i * Din + k[None, :],
             acc.to(du_ptr.dtype.element_ty), mask=b_mask[:, None] & k_mask[None, :])


@triton.jit
def _predict_dw_kernel(
    g_ptr, g_b, g_i, g_j, g_d,  # dL/du_hat [B, I, J, D] and its strides
    u_ptr, u_b, u_i, u_k,  # u [B, I, Din] and its strides
    dw_ptr,  # dW [I, J, D, Din], contiguous
    B, D, N, Din,
    G_FLAT: tl.constexpr, ACC: tl.constexpr, DT: tl.constexpr, DOT_DT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``dW[i, n, k] = sum_b g[b, i, n] u[b, i, k]``: ``[BLOCK_N x BLOCK_B] @ [BLOCK_B x
    BLOCK_K]`` dots over every chunk of samples, all inside this program (no atomics, a fixed
    order)."""
    i = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = n < N
    k_mask = k < Din
    g_cols = g_ptr + row_offset(i, g_i) + _n_offsets(n, D, g_j, g_d, G_FLAT)[:, None]
    u_cols = u_ptr + row_offset(i, u_i) + k[None, :] * u_k  # [1, BLOCK_K]
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=ACC)
    for b0 in range(0, B, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        b_mask = b < B
        gt = tl.load(g_cols + row_offset(b, g_b)[None, :], mask=n_mask[:, None] & b_mask[None, :],
                     other=0.0)
        x = tl.load(u_cols + row_offset(b, u_b)[:, None], mask=b_mask[:, None] & k_mask[None, :],
                    other=0.0)
        acc = tl.dot(_op(gt, DT, DOT_DT), _op(x, DT, DOT_DT), acc, input_precision=PRECISION,
                     out_dtype=ACC)
    tl.store(dw_ptr + row_offset(i, N * Din) + n[:, None] * Din + k[None, :],
             acc.to(dw_ptr.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])


def _predict_forward(u: torch.Tensor, W: torch.Tensor,
                     config: Optional[PredictConfig] = None) -> torch.Tensor:
    config = config or DEFAULT_CONFIG
    B, I, Din = u.shape
    _, J, D, _ = W.shape
    N = J * D
    out = torch.empty(B, I, J, D, device=u.device, dtype=u.dtype)
    if out.numel() == 0:
        return out
    bn = _pow2_block(N, config.BLOCK_N)
    bk = _pow2_block(Din, config.BLOCK_K)
    grid = (I, triton.cdiv(N, bn), triton.cdiv(B, config.BLOCK_B))
    with device_guard(u):
        _predict_fwd_kernel[grid](
            u, *u.stride(), W, *W.stride(), out, B, I, D, N, Din,
            W_FLAT=_flat_n(W.stride(1), W.stride(2), J, D), BLOCK_B=config.BLOCK_B, BLOCK_N=bn,
            BLOCK_K=bk, **_meta(u.dtype, config))
    return out


def _predict_backward(grad, u, W, need_u: bool, need_w: bool,
                      config: Optional[PredictConfig] = None):
    config = config or DEFAULT_CONFIG
    B, I, Din = u.shape
    _, J, D, _ = W.shape
    N = J * D
    meta = _meta(u.dtype, config)
    kp = _pow2_block(Din, config.BLOCK_K)
    g_flat = _flat_n(grad.stride(2), grad.stride(3), J, D)
    du = dW = None
    if need_u:
        du = torch.empty(B, I, Din, device=u.device, dtype=u.dtype)
        if du.numel() and N:
            grid = (I, triton.cdiv(B, config.BLOCK_B), triton.cdiv(Din, kp))
            with device_guard(u):
                _predict_du_kernel[grid](
                    grad, *grad.stride(), W, *W.stride(), du, B, I, D, N, Din,
                    G_FLAT=g_flat, W_FLAT=_flat_n(W.stride(1), W.stride(2), J, D),
                    BLOCK_B=config.BLOCK_B, BLOCK_N=_pow2_block(N, config.BLOCK_N), BLOCK_K=kp,
                    **meta)
        else:
            du.zero_()
    if need_w:
        dW = torch.empty(I, J, D, Din, device=u.device, dtype=W.dtype)
        if dW.numel() and B:
            grid = (I, triton.cdiv(N, config.BLOCK_N), triton.cdiv(Din, kp))
            with device_guard(u):
                _predict_dw_kernel[grid](
                    grad, *grad.stride(), u, *u.stride(), dW, B, D, N, Din,
                    G_FLAT=g_flat, BLOCK_N=config.BLOCK_N, BLOCK_B=_pow2_block(B, config.BLOCK_B),
                    BLOCK_K=kp, **meta)
        else:
            dW.zero_()
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
