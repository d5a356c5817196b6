"""Routing by agreement over given prediction vectors ``u_hat [B, I, J, Dout]`` in Triton: the
kernels and the autograd.Function of :mod:`.routing` (``dynamic_routing``). The fused
``capsule_routing``, which never forms ``u_hat``, has its own GEMM-tile design in
:mod:`._gemm_core`; here ``u_hat`` is an input, so the logits ``<u_hat_ij, V_j>`` are
elementwise products, not matrix products, and no ``tl.dot`` is used.

Math (per sample): after r agreement updates the logits are ``l_ij = prior_ij + <u_hat_ij, V_j>``
with ``V = v^1 + ... + v^r`` (the learned ``prior [I, J]`` optional, zero otherwise) and the
couplings ``c_i = softmax(l_i / T)``, so iteration r needs only ``V^r`` (J*Dout numbers per
sample) and is one sweep over the input capsules producing ``s^r_j = sum_i c_ij u_hat_ij``.
Backward, the logit gradient is ``gl_ij = c_ij (gc_ij - sum_k c_ik gc_ik) / T`` with
``gc_ij = <gs_j, u_hat_ij>``; it reaches ``u_hat`` through the agreement, and the prior
directly: ``dprior_ij = sum_b sum_r gl^r_bij`` (only ``r = R`` under ``detach_inner``, whose
earlier logits are constants). The prior and the temperature are compile-time options
(``HAS_PRIOR``, ``HAS_TEMPERATURE``, ``NEED_DPRIOR``): without them the kernels are the ones
compiled before the options existed.

Design
------
Tiles: a sweep program holds prediction vectors for a block of samples and input capsules,
``[BLOCK_B, BLOCK_I, BLOCK_J, BLOCK_D]`` (all output capsules; J and Dout padded to powers of
two and masked). Float32 math is float32 on CUDA cores (``exp`` and ``sqrt`` compile to the
GPU's approximate instructions, multiply-adds are fused: ``enable_fp_fusion=True`` is passed
explicitly); float16 and bfloat16 are loaded and upcast to float32, float64 stays float64.

Kernels and grids (``n_isplit`` splits of the input capsules, chosen to fill the GPU):

* ``_sweep_kernel``, grid ``(cdiv(B, BLOCK_B), n_isplit)``: program ``(samples, split)`` holds
  ``V^r`` of its samples and a ``[BLOCK_B, J, Dout]`` accumulator and walks its range of input
  capsules in ``BLOCK_I`` chunks. Forward it accumulates ``sum_i c_ij u_hat_ij``; backward
  (``BACKWARD``) ``D_j = sum_i gl_ij u_hat_ij``, the gradient reaching ``V^r``. Each program
  writes its partial sums to a workspace ``[n_isplit, B, J, Dout]``: the sum over i crosses
  programs there, deterministically (no atomics).
* ``_finalize_fwd_kernel``, grid ``(B,)``: sums the partials, adds the bias, squashes, saves
  ``s^r``, writes ``V^(r+1) = V^r + v^r`` (or the output ``v`` after the last iteration).
* ``_finalize_bwd_kernel``, grid ``(B,)``: sums the backward partials into ``G`` (gradient
  reaching ``V``), forms ``gv^r = G (+ dL/dv on the last iteration)`` and applies the squash
  backward to get ``gs^r``.
* ``_input_grad_kernel``, grid ``(cdiv(I, GRAD_BLOCK_I), B)``: writes
  ``g_u_hat_ij = sum_r c^r_ij gs^r_j + gl^r_ij V^r_j`` (all iterations, couplings recomputed
  from the saved ``V^r``). With a prior wanting gradient it also writes its sample's
  ``sum_r gl^r_ij`` to a ``[B, I, J]`` workspace, summed over samples afterwards (no atomics:
  deterministic).

Offsets of ``u_hat`` and its gradient are 64-bit (``B*I*J*Dout`` passes 2^31 at realistic
sizes). Saved for backward: ``u_hat`` and the prior (the caller's tensors, no copies) and, per
iteration, ``s^r`` and ``V^r`` (``[R, B, J, Dout]`` each, float32 or float64). The 1 / T of
the temperature reaches the kernels as a one-element tensor in the accumulation dtype (a Python
float argument would arrive rounded to float32).
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._gemm_core import device_guard

# Elements of the largest register tile one program holds. Larger tiles mean fewer chunk
# iterations; this keeps GPU register use moderate.
TILE_ELEMENTS = 8192
# The widest [J, Dout] slice of a single input capsule the kernels accept.
MAX_CAPSULE_ELEMENTS = 1 << 16
# Tests set this to n_isplit to force the multi-program reductions on small shapes.
FORCE_SPLITS: Optional[int] = None


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _tiny(dtype: torch.dtype) -> float:
    """The smallest normal number of the accumulation dtype: the squash clamps ``|s|^2`` there."""
    return torch.finfo(acc_dtype(dtype)).tiny


@functools.lru_cache(maxsize=None)
def _target_programs(device: torch.device) -> int:
    """Programs per grid worth aiming for: a few per streaming multiprocessor."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return 4 * torch.cuda.get_device_properties(index).multi_processor_count
    return 1  # the interpreter runs programs one after another: fewer is faster


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


def _warps(tile_elements: int) -> int:
    """About 32 elements of the largest tile per thread."""
    return min(16, max(4, triton.next_power_of_2(tile_elements) // 1024))


def capsule_size_limit_reason(J: int, D: int) -> Optional[str]:
    """Why one input capsule's ``[J, Dout]`` slice is too large for the routing kernels (they
    hold it in registers, padded to powers of two), or ``None`` if it fits."""
    per_capsule = triton.next_power_of_2(J) * triton.next_power_of_2(D)
    if per_capsule <= MAX_CAPSULE_ELEMENTS:
        return None
    return (f"the Triton routing kernels hold one input capsule's [J, Dout] slice in registers, "
            f"padded to {per_capsule} elements; the limit is {MAX_CAPSULE_ELEMENTS} "
            f"(got J={J}, Dout={D})")


class _Plan:
    """Block sizes and grid splits for one call: sweeps over tiles of ``SWEEP_BLOCK_B`` samples
    x ``SWEEP_BLOCK_I`` input capsules; the input-gradient kernel over ``GRAD_BLOCK_I``
    input capsules of one sample."""

    def __init__(self, B: int, I: int, J: int, D: int, device: torch.device):
        reason = capsule_size_limit_reason(J, D)
        if reason is not None:
            raise NotImplementedError(reason + "; use backend='reference'")
        self.BLOCK_J = triton.next_power_of_2(J)
        self.BLOCK_D = triton.next_power_of_2(D)
        target = _target_programs(device)
        jd = self.BLOCK_J * self.BLOCK_D
        self.SWEEP_BLOCK_B = min(triton.next_power_of_2(B), 16, _pow2_floor(TILE_ELEMENTS // jd))
        self.SWEEP_BLOCK_I = min(triton.next_power_of_2(I),
                                 _pow2_floor(TILE_ELEMENTS // (self.SWEEP_BLOCK_B * jd)))
        self.n_bblocks = triton.cdiv(B, self.SWEEP_BLOCK_B)
        n_chunks = triton.cdiv(I, self.SWEEP_BLOCK_I)
        n_isplit = FORCE_SPLITS if FORCE_SPLITS is not None else triton.cdiv(target, self.n_bblocks)
        n_isplit = max(1, min(n_isplit, n_chunks))
        # Every split covers a whole number of chunks.
        self.i_per_split = triton.cdiv(n_chunks, n_isplit) * self.SWEEP_BLOCK_I
        self.n_isplit = triton.cdiv(I, self.i_per_split)
        self.sweep_warps = _warps(self.SWEEP_BLOCK_B * self.SWEEP_BLOCK_I * jd)
        self.GRAD_BLOCK_I = min(triton.next_power_of_2(I), _pow2_floor(TILE_ELEMENTS // jd))
        self.n_itiles = triton.cdiv(I, self.GRAD_BLOCK_I)
        self.grad_warps = _warps(self.GRAD_BLOCK_I * jd)


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _u_hat_block(b_offs, b_mask, i_offs, i_mask, src_ptr, s_b, s_i, s_j, s_d, J, D,
                 ACC: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """Prediction vectors of samples ``b_offs`` and input capsules ``i_offs``:
    [BLOCK_B, BLOCK_I, BLOCK_J, BLOCK_D], zero outside the valid range. The sample offset is
    64-bit: ``B * I * J * Dout`` passes 2^31 at realistic sizes."""
    j3 = tl.arange(0, BLOCK_J)[None, :, None]
    d3 = tl.arange(0, BLOCK_D)[None, None, :]
    i3 = i_offs[:, None, None]
    mask3 = i_mask[:, None, None] & (j3 < J) & (d3 < D)
    offs = (tl.cast(b_offs, tl.int64) * s_b)[:, None, None, None] + (i3 * s_i + j3 * s_j + d3 * s_d)[None, :, :, :]
    return tl.load(src_ptr + offs, mask=b_mask[:, None, None, None] & mask3[None, :, :, :],
                   other=0.0).to(ACC)


@triton.jit
def _coupling(logits, j_mask, LEAKY: tl.constexpr):
    """Couplings ``softmax_j`` of routing logits whose last axis is j. ``leaky`` adds a
    constant zero logit to each softmax (its coefficient is not returned)."""
    logits = tl.where(j_mask, logits, float("-inf"))
    row_max = tl.max(logits, axis=-1)
    if LEAKY:
        row_max = tl.maximum(row_max, 0.0)
    e = tl.exp(logits - tl.expand_dims(row_max, -1))
    denom = tl.sum(e, axis=-1)
    if LEAKY:
        denom += tl.exp(-row_max)
    return e / tl.expand_dims(denom, -1)


@triton.jit
def _load_prior(prior_ptr, i_offs, i_mask, J, BLOCK_J: tl.constexpr, ACC: tl.constexpr):
    """Rows ``i_offs`` of the contiguous [I, J] prior as a zero-padded [BLOCK_I, BLOCK_J] tile."""
    j = tl.arange(0, BLOCK_J)[None, :]
    return tl.load(prior_ptr + i_offs[:, None] * J + j, mask=i_mask[:, None] & (j < J),
                   other=0.0).to(ACC)


@triton.jit
def _load_bjd(ptr, b_offs, b_mask, J, D, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """Rows ``b_offs`` of a contiguous [B, J, D] tensor as a zero-padded [BLOCK_B, BLOCK_J, BLOCK_D] tile."""
    j = tl.arange(0, BLOCK_J)[None, :, None]
    d = tl.arange(0, BLOCK_D)[None, None, :]
    mask = b_mask[:, None, None] & (j < J) & (d < D)
    return tl.load(ptr + (b_offs[:, None, None] * J + j) * D + d, mask=mask, other=0.0).to(ACC)


@triton.jit
def _load_jd(ptr, J, D, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """A contiguous [J, D] block as a zero-padded [BLOCK_J, BLOCK_D] tile."""
    j = tl.arange(0, BLOCK_J)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    return tl.load(ptr + j * D + d, mask=(j < J) & (d < D), other=0.0).to(ACC)


@triton.jit
def _store_jd(ptr, value, J, D, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    j = tl.arange(0, BLOCK_J)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    tl.store(ptr + j * D + d, value.to(ptr.dtype.element_ty), mask=(j < J) & (d < D))


@triton.jit
def _store_bjd(ptr, value, b_offs, b_mask, J, D, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    j = tl.arange(0, BLOCK_J)[None, :, None]
    d = tl.arange(0, BLOCK_D)[None, None, :]
    mask = b_mask[:, None, None] & (j < J) & (d < D)
    tl.store(ptr + (b_offs[:, None, None] * J + j) * D + d, value.to(ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _sweep_kernel(
    src_ptr, s_b, s_i, s_j, s_d,  # u_hat [B, I, J, D] and its strides
    V_ptr,  # [B, J, D] running sum of earlier outputs, this iteration's slice of V_all
    gs_ptr,  # [B, J, D] gradient wrt s of this iteration (BACKWARD only)
    partial_ptr,  # [n_isplit, B, J, D] output: this program's share of the sum over i
    c_ptr,  # [B, I, J] output couplings (STORE_C only)
    prior_ptr,  # [I, J] contiguous prior logits (HAS_PRIOR only)
    inv_t_ptr,  # [1] 1 / temperature in the accumulation dtype (HAS_TEMPERATURE only)
    B, I, J, D, i_per_split,
    BACKWARD: tl.constexpr, LEAKY: tl.constexpr, STORE_C: tl.constexpr,
    HAS_PRIOR: tl.constexpr, HAS_TEMPERATURE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Forward: ``partial_j = sum_i c_ij u_hat_ij`` over this program's input capsules, for
    each of its samples, with ``c_i = softmax((prior_i + <u_hat_i, V>) / T)``. Backward:
    ``partial_j = sum_i gl_ij u_hat_ij`` with ``gc_ij = <gs_j, u_hat_ij>`` and the softmax
    backward ``gl_ij = c_ij (gc_ij - sum_k c_ik gc_ik) / T`` (sum over the real outputs only:
    a leaky logit is a constant)."""
    b_offs = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_mask = b_offs < B
    split = tl.program_id(1)
    j_offs = tl.arange(0, BLOCK_J)
    j_mask = (j_offs < J)[None, None, :]
    V = _load_bjd(V_ptr, b_offs, b_mask, J, D, BLOCK_J, BLOCK_D, ACC)[:, None, :, :]
    if BACKWARD:
        gs = _load_bjd(gs_ptr, b_offs, b_mask, J, D, BLOCK_J, BLOCK_D, ACC)[:, None, :, :]
    if HAS_TEMPERATURE:
        inv_t = tl.load(inv_t_ptr)
    acc = tl.zeros([BLOCK_B, BLOCK_J, BLOCK_D], dtype=ACC)
    i_begin = split * i_per_split
    i_end = tl.minimum(i_begin + i_per_split, I)
    for i0 in range(i_begin, i_end, BLOCK_I):
        i_offs = i0 + tl.arange(0, BLOCK_I)
        i_mask = i_offs < I
        u_hat = _u_hat_block(b_offs, b_mask, i_offs, i_mask, src_ptr, s_b, s_i, s_j, s_d, J, D,
                             ACC, BLOCK_J, BLOCK_D)
        logits = tl.sum(u_hat * V, axis=3)  # [BLOCK_B, BLOCK_I, BLOCK_J]
        if HAS_PRIOR:
            logits += _load_prior(prior_ptr, i_offs, i_mask, J, BLOCK_J, ACC)[None, :, :]
        if HAS_TEMPERATURE:
            logits *= inv_t
        c = _coupling(logits, j_mask, LEAKY)
        if BACKWARD:
            gc = tl.sum(u_hat * gs, axis=3)
            weight = c * (gc - tl.sum(c * gc, axis=2)[:, :, None])
            if HAS_TEMPERATURE:
                weight *= inv_t
        else:
            weight = c
            if STORE_C:
                tl.store(c_ptr + (tl.cast(b_offs, tl.int64)[:, None, None] * I + i_offs[None, :, None]) * J
                         + j_offs[None, None, :], c.to(c_ptr.dtype.element_ty),
                         mask=b_mask[:, None, None] & i_mask[None, :, None] & j_mask)
        acc += tl.sum(weight[:, :, :, None] * u_hat, axis=1)
    _store_bjd(partial_ptr + split * B * J * D, acc, b_offs, b_mask, J, D, BLOCK_J, BLOCK_D)


@triton.jit
def _finalize_fwd_kernel(
    partial_ptr, n_isplit,  # [n_isplit, B, J, D] partial sums over i
    bias_ptr,  # [J, D] (HAS_BIAS only)
    s_ptr,  # [B, J, D] output: s of this iteration (saved for backward)
    V_ptr,  # [B, J, D] V of this iteration
    V_next_ptr,  # [B, J, D] output: V + v (not LAST)
    v_ptr,  # [B, J, D] output: v, in the caller's dtype (LAST only)
    B, J, D,
    HAS_BIAS: tl.constexpr, LAST: tl.constexpr, FIRST: tl.constexpr, ACC: tl.constexpr,
    TINY: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``s = sum of partials + bias``, ``v = squash(s) = s |s| / (1 + |s|^2)`` with ``|s|^2``
    clamped at the smallest normal number ``TINY`` before the square root, as in the
    reference. ``FIRST``: ``V`` is zero (not read)."""
    b = tl.program_id(0)
    s = tl.zeros([BLOCK_J, BLOCK_D], dtype=ACC)
    for split in range(0, n_isplit):
        s += _load_jd(partial_ptr + (split * B + b) * J * D, J, D, BLOCK_J, BLOCK_D, ACC)
    if HAS_BIAS:
        s += _load_jd(bias_ptr, J, D, BLOCK_J, BLOCK_D, ACC)
    _store_jd(s_ptr + b * J * D, s, J, D, BLOCK_J, BLOCK_D)
    sq_norm = tl.sum(s * s, axis=1)
    v = s * (tl.sqrt(tl.maximum(sq_norm, TINY)) / (1.0 + sq_norm))[:, None]
    if LAST:
        _store_jd(v_ptr + b * J * D, v, J, D, BLOCK_J, BLOCK_D)
    else:
        if not FIRST:
            v += _load_jd(V_ptr + b * J * D, J, D, BLOCK_J, BLOCK_D, ACC)
        _store_jd(V_next_ptr + b * J * D, v, J, D, BLOCK_J, BLOCK_D)


@triton.jit
def _finalize_bwd_kernel(
    partial_ptr, n_isplit,  # [n_isplit, B, J, D] partial D_j of the later iteration (HAS_PARTIAL)
    G_ptr,  # [B, J, D] in/out: gradient reaching V from later iterations
    gv_last_ptr,  # [B, J, D] dL/dv of the output (LAST only)
    s_ptr,  # [B, J, D] saved s of this iteration
    gs_ptr,  # [B, J, D] output: dL/ds of this iteration
    B, J, D,
    HAS_PARTIAL: tl.constexpr, HAS_G: tl.constexpr, LAST: tl.constexpr, ACC: tl.constexpr,
    TINY: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Squash backward. With ``n = |s|`` (from ``|s|^2`` clamped at ``TINY`` as the reference
    does; without the clamp the GPU's approximate square root flushes a subnormal ``|s|^2`` to
    0 and the division gives inf/NaN) and ``h(n) = n / (1 + n^2)``:
    ``gs = h(n) gv + (1 - n^2) / ((1 + n^2)^2 n) <s, gv> s``. ``HAS_G``: ``G`` holds earlier
    partial sums (otherwise it is only written)."""
    b = tl.program_id(0)
    G = tl.zeros([BLOCK_J, BLOCK_D], dtype=ACC)
    if HAS_G:
        G += _load_jd(G_ptr + b * J * D, J, D, BLOCK_J, BLOCK_D, ACC)
    if HAS_PARTIAL:
        for split in range(0, n_isplit):
            G += _load_jd(partial_ptr + (split * B + b) * J * D, J, D, BLOCK_J, BLOCK_D, ACC)
        _store_jd(G_ptr + b * J * D, G, J, D, BLOCK_J, BLOCK_D)
    gv = G
    if LAST:
        gv += _load_jd(gv_last_ptr + b * J * D, J, D, BLOCK_J, BLOCK_D, ACC)
    s = _load_jd(s_ptr + b * J * D, J, D, BLOCK_J, BLOCK_D, ACC)
    sq_norm = tl.sum(s * s, axis=1)
    norm = tl.sqrt(tl.maximum(sq_norm, TINY))
    one_plus = 1.0 + sq_norm
    # Below TINY the reference's norm is the constant sqrt(TINY): its derivative is that of
    # 1 / (1 + |s|^2) alone.
    radial = tl.where(sq_norm < TINY, -2.0 * norm / (one_plus * one_plus),
                      (1.0 - sq_norm) / (one_plus * one_plus * norm))
    s_dot_gv = tl.sum(s * gv, axis=1)
    gs = (norm / one_plus)[:, None] * gv + (radial * s_dot_gv)[:, None] * s
    _store_jd(gs_ptr + b * J * D, gs, J, D, BLOCK_J, BLOCK_D)


@triton.jit
def _input_grad_kernel(
    src_ptr, s_b, s_i, s_j, s_d,  # u_hat and its strides
    V_all_ptr, gs_all_ptr,  # [R, B, J, D] saved V^r and the gradients gs^r
    g_src_ptr,  # output: g_u_hat [B, I, J, D] contiguous (NEED_DSRC only)
    prior_ptr,  # [I, J] contiguous prior logits (HAS_PRIOR only)
    inv_t_ptr,  # [1] 1 / temperature in the accumulation dtype (HAS_TEMPERATURE only)
    g_prior_ptr,  # output: per-sample prior gradients [B, I, J] contiguous (NEED_DPRIOR only)
    B, I, J, D, R,
    LEAKY: tl.constexpr, DETACH: tl.constexpr, ACC: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_PRIOR: tl.constexpr, HAS_TEMPERATURE: tl.constexpr, NEED_DPRIOR: tl.constexpr,
    NEED_DSRC: tl.constexpr,
):
    """``g_u_hat_ij = sum_r c^r_ij gs^r_j + gl^r_ij V^r_j`` for sample ``program_id(1)`` (only
    the last iteration's first term with ``DETACH``). The logit gradients ``gl^r`` are also the
    prior's: ``NEED_DPRIOR`` writes this sample's ``sum_r gl^r_ij`` (only ``r = R`` with
    ``DETACH``)."""
    i_offs = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    b = tl.program_id(1)
    i_mask = i_offs < I
    j_offs = tl.arange(0, BLOCK_J)
    j_mask = j_offs < J
    i3 = i_offs[:, None, None]
    j3 = j_offs[None, :, None]
    d3 = tl.arange(0, BLOCK_D)[None, None, :]
    mask3 = i_mask[:, None, None] & (j3 < J) & (d3 < D)
    if DETACH:
        r_begin = R - 1
    else:
        r_begin = 0
    b64 = tl.cast(b, tl.int64)
    u_hat = tl.load(src_ptr + b64 * s_b + i3 * s_i + j3 * s_j + d3 * s_d, mask=mask3,
                    other=0.0).to(ACC)
    if HAS_PRIOR:
        prior = _load_prior(prior_ptr, i_offs, i_mask, J, BLOCK_J, ACC)
    if HAS_TEMPERATURE:
        inv_t = tl.load(inv_t_ptr)
    if NEED_DPRIOR:
        d_prior = tl.zeros([BLOCK_I, BLOCK_J], dtype=ACC)
    g_u_hat = tl.zeros([BLOCK_I, BLOCK_J, BLOCK_D], dtype=ACC)
    for r in range(r_begin, R):
        V = _load_jd(V_all_ptr + (r * B + b) * J * D, J, D, BLOCK_J, BLOCK_D, ACC)
        gs = _load_jd(gs_all_ptr + (r * B + b) * J * D, J, D, BLOCK_J, BLOCK_D, ACC)
        logits = tl.sum(u_hat * V[None, :, :], axis=2)
        if HAS_PRIOR:
            logits += prior
        if HAS_TEMPERATURE:
            logits *= inv_t
        c = _coupling(logits, j_mask[None, :], LEAKY)
        g_u_hat += c[:, :, None] * gs[None, :, :]
        if NEED_DPRIOR:
            # The prior's gradient is gl^r at every iteration, the first included.
            gc = tl.sum(u_hat * gs[None, :, :], axis=2)
            gl = c * (gc - tl.sum(c * gc, axis=1)[:, None])
            if HAS_TEMPERATURE:
                gl *= inv_t
            d_prior += gl
            if not DETACH:
                # Through the logits' agreement <u_hat, V^r> (zero at r = 0: V^1 = 0).
                g_u_hat += gl[:, :, None] * V[None, :, :]
        elif not DETACH:
            # Through the logits <u_hat, V^r>; V^1 = 0, so the first iteration adds nothing.
            if r > 0:
                gc = tl.sum(u_hat * gs[None, :, :], axis=2)
                gl = c * (gc - tl.sum(c * gc, axis=1)[:, None])
                if HAS_TEMPERATURE:
                    gl *= inv_t
                g_u_hat += gl[:, :, None] * V[None, :, :]
    if NEED_DSRC:
        tl.store(g_src_ptr + ((b64 * I + i3) * J + j3) * D + d3,
                 g_u_hat.to(g_src_ptr.dtype.element_ty), mask=mask3)
    if NEED_DPRIOR:
        tl.store(g_prior_ptr + (b64 * I + i_offs[:, None]) * J + j_offs[None, :],
                 d_prior.to(g_prior_ptr.dtype.element_ty), mask=i_mask[:, None] & j_mask[None, :])


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def _logit_args(prior, temperature, acc, device):
    """``(prior, inv_t, HAS_PRIOR, HAS_TEMPERATURE)`` kernel arguments. ``1 / temperature``
    travels as a one-element tensor in the accumulation dtype: a Python float argument would
    reach the kernels rounded to float32."""
    has_temperature = float(temperature) != 1.0
    inv_t = (torch.full((1,), 1.0 / float(temperature), dtype=acc, device=device)
             if has_temperature else None)
    prior_arg = prior.contiguous() if prior is not None else None
    return prior_arg, inv_t, prior is not None, has_temperature


def routing_forward(u_hat, iterations, bias, leaky, return_coupling, prior=None, temperature=1.0):
    """Run the R forward sweeps over ``u_hat [B, I, J, D]``; ``prior [I, J]`` optional, added
    to the logits before every softmax, and ``temperature`` dividing them.

    Returns ``v [B, J, D]`` (u_hat's dtype), the saved ``s_all`` and ``V_all`` (``[R, B, J, D]``,
    accumulation dtype) and the last couplings ``c [B, I, J]`` or ``None``.
    """
    B, I, J, D = u_hat.shape
    plan = _Plan(B, I, J, D, u_hat.device)
    acc = acc_dtype(u_hat.dtype)
    R = iterations
    s_all = torch.empty(R, B, J, D, device=u_hat.device, dtype=acc)
    V_all = torch.empty(R, B, J, D, device=u_hat.device, dtype=acc)
    partial = torch.empty(plan.n_isplit, B, J, D, device=u_hat.device, dtype=acc)
    v = torch.empty(B, J, D, device=u_hat.device, dtype=u_hat.dtype)
    c = torch.empty(B, I, J, device=u_hat.device, dtype=u_hat.dtype) if return_coupling else partial
    bias_arg = bias.contiguous() if bias is not None else partial
    prior_arg, inv_t, has_prior, has_temperature = _logit_args(prior, temperature, acc,
                                                               u_hat.device)
    meta = dict(ACC=_tl_acc(u_hat.dtype), BLOCK_J=plan.BLOCK_J, BLOCK_D=plan.BLOCK_D,
                enable_fp_fusion=True)
    with device_guard(u_hat):
        V_all[0].zero_()  # V^1 = 0: read by the first sweep and by the backward
        for r in range(R):
            last = r == R - 1
            _sweep_kernel[(plan.n_bblocks, plan.n_isplit)](
                u_hat, *u_hat.stride(), V_all[r], partial, partial, c,
                prior_arg if has_prior else partial, inv_t if has_temperature else partial,
                B, I, J, D, plan.i_per_split,
                BACKWARD=False, LEAKY=leaky, STORE_C=return_coupling and last,
                HAS_PRIOR=has_prior, HAS_TEMPERATURE=has_temperature,
                BLOCK_B=plan.SWEEP_BLOCK_B, BLOCK_I=plan.SWEEP_BLOCK_I, num_warps=plan.sweep_warps,
                **meta,
            )
            _finalize_fwd_kernel[(B,)](
                partial, plan.n_isplit, bias_arg, s_all[r], V_all[r],
                V_all[r + 1] if not last else v, v, B, J, D,
                HAS_BIAS=bias is not None, LAST=last, FIRST=r == 0, TINY=_tiny(u_hat.dtype), **meta,
            )
    return v, s_all, V_all, (c if return_coupling else None)


def routing_backward(u_hat, grad_v, s_all, V_all, leaky, detach_inner, prior=None,
                     temperature=1.0, need_src=True, need_prior=False):
    """``(g_u_hat, gs_all, d_prior)``: the gradient wrt ``u_hat`` (``None`` unless
    ``need_src``), ``gs_all [R, B, J, D]``, the gradient wrt every iteration's ``s``
    (``dL/dbias = gs_all.sum((0, 1))``), and the gradient wrt ``prior`` (``None`` unless
    ``need_prior``).

    The prior is added to every iteration's logits, so its gradient is the sum over samples
    and iterations of the logit gradients: with ``c^r = softmax((prior + A^r) / T)`` and
    ``gc^r_ij = <gs^r_j, u_hat_ij>``, ``dprior_ij = sum_b sum_r c^r_ij (gc^r_ij -
    sum_k c^r_ik gc^r_ik) / T`` (only ``r = R`` under ``detach_inner``). Each input-gradient
    program writes its sample's sum over iterations; the ``[B, I, J]`` workspace is summed over
    samples afterwards, so the result is deterministic."""
    B, I, J, D = u_hat.shape
    R = s_all.shape[0]
    plan = _Plan(B, I, J, D, u_hat.device)
    acc = s_all.dtype
    need_prior = need_prior and prior is not None
    prior_arg, inv_t, has_prior, has_temperature = _logit_args(prior, temperature, acc,
                                                               u_hat.device)
    logit_meta = dict(HAS_PRIOR=has_prior, HAS_TEMPERATURE=has_temperature)
    meta = dict(ACC=_tl_acc(u_hat.dtype), BLOCK_J=plan.BLOCK_J, BLOCK_D=plan.BLOCK_D,
                enable_fp_fusion=True)
    grad_v = grad_v.contiguous()
    gs_all = torch.zeros(R, B, J, D, device=u_hat.device, dtype=acc)
    G = torch.empty(B, J, D, device=u_hat.device, dtype=acc)
    partial = torch.empty(plan.n_isplit, B, J, D, device=u_hat.device, dtype=acc)
    g_u_hat = torch.empty(B, I, J, D, device=u_hat.device, dtype=u_hat.dtype) if need_src else None
    d_prior = torch.empty(B, I, J, device=u_hat.device, dtype=acc) if need_prior else None
    with device_guard(u_hat):
        n_partials = 0
        for r in range(R - 1, -1, -1):
            _finalize_bwd_kernel[(B,)](
                partial, plan.n_isplit, G, grad_v, s_all[r], gs_all[r], B, J, D,
                HAS_PARTIAL=n_partials > 0, HAS_G=n_partials > 1, LAST=r == R - 1,
                TINY=_tiny(u_hat.dtype), **meta,
            )
            if detach_inner or r == 0:
                break
            # D^r = dL/dV^r, a sum over i: it reaches every earlier iteration's v.
            _sweep_kernel[(plan.n_bblocks, plan.n_isplit)](
                u_hat, *u_hat.stride(), V_all[r], gs_all[r], partial, partial,
                prior_arg if has_prior else partial, inv_t if has_temperature else partial,
                B, I, J, D, plan.i_per_split, BACKWARD=True, LEAKY=leaky, STORE_C=False,
                **logit_meta,
                BLOCK_B=plan.SWEEP_BLOCK_B, BLOCK_I=plan.SWEEP_BLOCK_I, num_warps=plan.sweep_warps,
                **meta,
            )
            n_partials += 1
        if need_src or need_prior:
            _input_grad_kernel[(plan.n_itiles, B)](
                u_hat, *u_hat.stride(), V_all, gs_all,
                g_u_hat if need_src else gs_all,
                prior_arg if has_prior else gs_all, inv_t if has_temperature else gs_all,
                d_prior if need_prior else gs_all, B, I, J, D, R,
                LEAKY=leaky, DETACH=detach_inner, NEED_DPRIOR=need_prior, NEED_DSRC=need_src,
                **logit_meta, BLOCK_I=plan.GRAD_BLOCK_I, num_warps=plan.grad_warps, **meta,
            )
    if d_prior is not None:
        d_prior = d_prior.sum(0).to(prior.dtype)
    return g_u_hat, gs_all, d_prior


class RoutingFunction(torch.autograd.Function):
    """Autograd over the routing kernels, on a given ``u_hat``."""

    @staticmethod
    def forward(ctx, u_hat, bias, prior, iterations, leaky, detach_inner, return_coupling,
                temperature):
        v, s_all, V_all, c = routing_forward(u_hat, iterations, bias, leaky, return_coupling,
                                             prior, temperature)
        ctx.save_for_backward(u_hat, prior, s_all, V_all)
        ctx.leaky = leaky
        ctx.detach_inner = detach_inner
        ctx.temperature = temperature
        ctx.bias_dtype = None if bias is None else bias.dtype
        if c is not None:
            ctx.mark_non_differentiable(c)
            return v, c
        return v

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_v, grad_c=None):
        u_hat, prior, s_all, V_all = ctx.saved_tensors
        need_prior = prior is not None and ctx.needs_input_grad[2]
        g_u_hat, gs_all, d_prior = routing_backward(
            u_hat, grad_v, s_all, V_all, ctx.leaky, ctx.detach_inner, prior, ctx.temperature,
            ctx.needs_input_grad[0], need_prior)
        d_bias = None
        if ctx.bias_dtype is not None and ctx.needs_input_grad[1]:
            d_bias = gs_all.sum((0, 1)).to(ctx.bias_dtype)
        return g_u_hat, d_bias, d_prior, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# The same launchers as registered operators, for torch.compile: Dynamo cannot trace into a
# Triton launch on every setup (the CPU interpreter in particular), but it keeps an opaque
# custom op in the graph, with the fake implementations below giving output shapes.
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("capsnet_ext_triton::routing_forward", mutates_args=())
def routing_forward_op(u_hat: torch.Tensor, bias: Optional[torch.Tensor], iterations: int,
                       leaky: bool, detach_inner: bool, return_coupling: bool,
                       prior: Optional[torch.Tensor] = None, temperature: float = 1.0
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(v, s_all, V_all, c)``; ``c`` is empty unless ``return_coupling``. ``detach_inner``
    only matters to the backward registered below."""
    v, s_all, V_all, c = routing_forward(u_hat, iterations, bias, leaky, return_coupling,
                                         prior, temperature)
    return v, s_all, V_all, (c if c is not None else u_hat.new_empty(0))


@routing_forward_op.register_fake
def _(u_hat, bias, iterations, leaky, detach_inner, return_coupling, prior=None,
      temperature=1.0):
    B, I, J, D = u_hat.shape
    acc = acc_dtype(u_hat.dtype)
    c = u_hat.new_empty(B, I, J) if return_coupling else u_hat.new_empty(0)
    return (u_hat.new_empty(B, J, D), u_hat.new_empty(iterations, B, J, D, dtype=acc),
            u_hat.new_empty(iterations, B, J, D, dtype=acc), c)


@torch.library.custom_op("capsnet_ext_triton::routing_backward", mutates_args=())
def routing_backward_op(grad_v: torch.Tensor, u_hat: torch.Tensor, s_all: torch.Tensor,
                        V_all: torch.Tensor, leaky: bool, detach_inner: bool,
                        prior: Optional[torch.Tensor] = None, temperature: float = 1.0,
                        need_src: bool = True, need_prior: bool = False
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(g_u_hat, gs_all, d_prior)``; gradients not asked for are empty."""
    g_u_hat, gs_all, d_prior = routing_backward(u_hat, grad_v, s_all, V_all, leaky,
                                                detach_inner, prior, temperature, need_src,
                                                need_prior)
    return (g_u_hat if g_u_hat is not None else u_hat.new_empty(0), gs_all,
            d_prior if d_prior is not None else u_hat.new_empty(0))


@routing_backward_op.register_fake
def _(grad_v, u_hat, s_all, V_all, leaky, detach_inner, prior=None, temperature=1.0,
      need_src=True, need_prior=False):
    g_u_hat = u_hat.new_empty(u_hat.shape) if need_src else u_hat.new_empty(0)
    d_prior = (prior.new_empty(prior.shape) if (prior is not None and need_prior)
               else u_hat.new_empty(0))
    return g_u_hat, s_all.new_empty(s_all.shape), d_prior


def _routing_setup_context(ctx, inputs, output):
    u_hat, bias, iterations, leaky, detach_inner, return_coupling, prior, temperature = inputs
    _, s_all, V_all, c = output
    ctx.save_for_backward(u_hat, prior, s_all, V_all)
    ctx.leaky = leaky
    ctx.detach_inner = detach_inner
    ctx.temperature = temperature
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(s_all, V_all, c)


def _routing_backward_formula(ctx, grad_v, grad_s_all, grad_V_all, grad_c):
    u_hat, prior, s_all, V_all = ctx.saved_tensors
    need_src = ctx.needs_input_grad[0]
    need_prior = prior is not None and ctx.needs_input_grad[6]
    g_u_hat, gs_all, d_prior = routing_backward_op(grad_v, u_hat, s_all, V_all, ctx.leaky,
                                                   ctx.detach_inner, prior, ctx.temperature,
                                                   need_src, need_prior)
    d_bias = None
    if ctx.bias_dtype is not None and ctx.needs_input_grad[1]:
        d_bias = gs_all.sum((0, 1)).to(ctx.bias_dtype)
    return (g_u_hat if need_src else None, d_bias, None, None, None, None,
            d_prior if need_prior else None, None)


routing_forward_op.register_autograd(_routing_backward_formula, setup_context=_routing_setup_context)


def run_routing(u_hat, iterations, bias, leaky, detach_inner, return_coupling, prior=None,
                temperature=1.0):
    """Entry of :func:`capsnet_ext.triton_ops.dynamic_routing` (``u_hat`` is read through its
    strides). Eager calls go through :class:`RoutingFunction` (the least per-call overhead);
    under ``torch.compile`` the registered operator is used, with the same launchers."""
    if torch.compiler.is_compiling():
        v, _, _, c = routing_forward_op(u_hat, bias, iterations, leaky, detach_inner,
                                        return_coupling, prior, float(temperature))
        return (v, c) if return_coupling else v
    return RoutingFunction.apply(u_hat, bias, prior, iterations, leaky, detach_inner,
                                 return_coupling, float(temperature))
