"""Fused routing by agreement in Triton: the kernels and the autograd.Function shared by
:mod:`.routing` (``u_hat`` given) and :mod:`.capsule_routing` (``u_hat`` recomputed from
``u`` and ``W`` in every pass, never written to memory).

Math (per sample; see the derivation in the module docstrings of the two wrappers): after r
agreement updates the logits are ``l_ij = prior_ij + <u_hat_ij, V_j>`` with
``V = v^1 + ... + v^r`` (``prior`` optional, zero otherwise), and ``c_i = softmax(l_i / T)``,
so iteration r needs only ``V^r`` (J*Dout numbers per sample) and is one sweep over the input
capsules producing ``s^r_j = sum_i c_ij u_hat_ij``. Backward, the logit gradient is
``gl_ij = c_ij (gc_ij - sum_k c_ik gc_ik) / T`` with ``gc_ij = <gs_j, u_hat_ij>``; it reaches
``u_hat`` through the agreement and the prior directly: ``dprior_ij = sum_b sum_r gl^r_bij``
(only the last iteration under ``detach_inner``, whose earlier logits are constants).

Design
------
Tiles: a sweep program holds prediction vectors for a block of samples and input capsules,
``[BLOCK_B, BLOCK_I, BLOCK_J, BLOCK_D]`` (all output capsules; J and Dout padded to powers of
two and masked). In the fused op the tile is recomputed in registers as
``sum_k W[i, j, d, k] * u[b, i, k]``: each ``[BLOCK_I, J, Dout]`` slice of W read from L2 serves
all ``BLOCK_B`` samples of the program. No tensor core instruction (``tl.dot``) is used, so
float32 math is exact IEEE float32 whatever the TF32 settings say; float16 and bfloat16 are
loaded and upcast to float32, float64 stays float64.

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
* ``_input_grad_kernel``, grid ``(cdiv(I, GRAD_BLOCK_I), n_bsplit)``: the final backward sweep.
  Program ``(tile, split)`` keeps its ``[GRAD_BLOCK_I, J, Dout, Din]`` W tile in registers,
  loops over its samples and, for each, accumulates
  ``g_u_hat_ij = sum_r c^r_ij gs^r_j + gl^r_ij V^r_j`` (all iterations, couplings recomputed
  from the saved ``V^r``), then writes ``du`` and accumulates ``dW`` over its samples in
  registers; ``n_bsplit > 1`` partial ``dW`` are summed afterwards. Without fusion it writes
  ``g_u_hat`` instead. With a prior wanting gradient it also sums ``gl^r`` over its samples
  and iterations in registers into ``[n_bsplit, I, J]`` partials, summed afterwards (no
  atomics: deterministic).

Launches: ``2R`` forward, ``2R`` backward (``R - 1`` sweeps, ``R`` finalizes, one input-gradient
sweep; ``detach_inner`` needs one finalize and the input-gradient sweep).

Saved for backward: the inputs (``u`` and ``W``, or ``u_hat``; the prior) and, per iteration,
``s^r`` and ``V^r`` (``[R, B, J, Dout]`` each, float32 or float64). Memory kept for backward by
the fused op: ``B*I*Din + I*J*Dout*Din + 2*R*B*J*Dout`` elements (``+ I*J`` with a prior).
Autograd over the reference keeps ``u_hat`` (``B*I*J*Dout``) and per-iteration ``[B, I, J]``
tensors besides: at the MNIST shape (B=128, I=1152, J=10, Din=8, Dout=16, R=3, float32)
118.6 MiB of activations beyond ``u`` and ``W``, against 0.47 MiB here (counted with
saved-tensor hooks, storages deduplicated).
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

# Elements of the largest register tile one program holds (W tile in the fused backward). Larger
# tiles mean fewer chunk iterations; this keeps GPU register use moderate.
TILE_ELEMENTS = 8192
# The widest [J, Dout, Din] slice of a single input capsule the kernels accept.
MAX_CAPSULE_ELEMENTS = 1 << 16
# Tests set this to (n_isplit, n_bsplit) to force the multi-program reductions on small shapes.
FORCE_SPLITS: Optional[tuple] = None


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


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
    """About 32 elements of the largest tile per thread: no register spills at the MNIST and
    large shapes (checked by tests/_triton_compile_check.py for sm_90)."""
    return min(16, max(4, triton.next_power_of_2(tile_elements) // 1024))


def capsule_size_limit_reason(J: int, D: int, Din: Optional[int] = None) -> Optional[str]:
    """Why one input capsule's ``[J, Dout(, Din)]`` slice is too large for the routing kernels
    (they hold it in registers, padded to powers of two), or ``None`` if it fits. ``Din`` is
    given for the fused op, which also holds that capsule's W tile."""
    per_capsule = triton.next_power_of_2(J) * triton.next_power_of_2(D)
    if Din is not None:
        per_capsule *= triton.next_power_of_2(Din)
    if per_capsule <= MAX_CAPSULE_ELEMENTS:
        return None
    return (f"the Triton routing kernels hold one input capsule's [J, Dout{', Din' if Din else ''}] "
            f"slice in registers, padded to {per_capsule} elements; the limit is "
            f"{MAX_CAPSULE_ELEMENTS} (got J={J}, Dout={D}{f', Din={Din}' if Din else ''})")


class _Plan:
    """Block sizes and grid splits for one call (one helper, fails clearly at its limit).

    Sweeps: tiles of ``SWEEP_BLOCK_B`` samples x ``SWEEP_BLOCK_I`` input capsules, so a W
    slice read from L2 serves a whole block of samples. Input-gradient sweep: ``GRAD_BLOCK_I``
    input capsules whose ``[J, Dout, Din]`` W tile stays in registers for all the samples of
    the program.
    """

    def __init__(self, B: int, I: int, J: int, D: int, Din: int, fused: bool, device: torch.device):
        reason = capsule_size_limit_reason(J, D, Din if fused else None)
        if reason is not None:
            raise NotImplementedError(reason + "; use backend='reference'")
        self.BLOCK_J = triton.next_power_of_2(J)
        self.BLOCK_D = triton.next_power_of_2(D)
        self.BLOCK_K = triton.next_power_of_2(Din) if fused else 1
        per_capsule = self.BLOCK_J * self.BLOCK_D * self.BLOCK_K
        target = _target_programs(device)
        jd = self.BLOCK_J * self.BLOCK_D
        # Sweeps.
        self.SWEEP_BLOCK_B = min(triton.next_power_of_2(B), 16, _pow2_floor(TILE_ELEMENTS // jd))
        self.SWEEP_BLOCK_I = min(triton.next_power_of_2(I),
                                 _pow2_floor(TILE_ELEMENTS // (self.SWEEP_BLOCK_B * jd)))
        self.n_bblocks = triton.cdiv(B, self.SWEEP_BLOCK_B)
        n_chunks = triton.cdiv(I, self.SWEEP_BLOCK_I)
        n_isplit = FORCE_SPLITS[0] if FORCE_SPLITS is not None else triton.cdiv(target, self.n_bblocks)
        n_isplit = max(1, min(n_isplit, n_chunks))
        # Every split covers a whole number of chunks.
        self.i_per_split = triton.cdiv(n_chunks, n_isplit) * self.SWEEP_BLOCK_I
        self.n_isplit = triton.cdiv(I, self.i_per_split)
        self.sweep_warps = _warps(self.SWEEP_BLOCK_B * self.SWEEP_BLOCK_I * jd)
        # Input-gradient sweep.
        self.GRAD_BLOCK_I = min(triton.next_power_of_2(I), _pow2_floor(TILE_ELEMENTS // per_capsule))
        self.n_itiles = triton.cdiv(I, self.GRAD_BLOCK_I)
        n_bsplit = FORCE_SPLITS[1] if FORCE_SPLITS is not None else triton.cdiv(target, self.n_itiles)
        n_bsplit = max(1, min(n_bsplit, B))
        self.b_per_split = triton.cdiv(B, n_bsplit)
        self.n_bsplit = triton.cdiv(B, self.b_per_split)
        self.grad_warps = _warps(self.GRAD_BLOCK_I * per_capsule)


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _u_hat_block(
    b_offs, b_mask, i_offs, i_mask,
    src_ptr, s_b, s_i, s_j, s_d,  # u_hat [B, I, J, D], or u [B, I, Din] (s_j is Din's stride)
    w_ptr, w_i, w_j, w_d, w_k,  # W [I, J, D, Din] (fused only)
    J, D, Din,
    FUSED: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Prediction vectors of samples ``b_offs`` and input capsules ``i_offs``:
    [BLOCK_B, BLOCK_I, BLOCK_J, BLOCK_D], zero outside the valid range."""
    j_offs = tl.arange(0, BLOCK_J)
    d_offs = tl.arange(0, BLOCK_D)
    i3 = i_offs[:, None, None]
    j3 = j_offs[None, :, None]
    d3 = d_offs[None, None, :]
    mask3 = i_mask[:, None, None] & (j3 < J) & (d3 < D)
    bi_mask = b_mask[:, None] & i_mask[None, :]
    if FUSED:
        # One [BLOCK_I, J, D] slice of W per k, applied to every sample of the block.
        u_hat = tl.zeros([BLOCK_B, BLOCK_I, BLOCK_J, BLOCK_D], dtype=ACC)
        for k in range(0, Din):
            w_slice = tl.load(w_ptr + i3 * w_i + j3 * w_j + d3 * w_d + k * w_k, mask=mask3,
                              other=0.0).to(ACC)
            u_slice = tl.load(src_ptr + b_offs[:, None] * s_b + i_offs[None, :] * s_i + k * s_j,
                              mask=bi_mask, other=0.0).to(ACC)
            u_hat += u_slice[:, :, None, None] * w_slice[None, :, :, :]
        return u_hat
    else:
        offs = b_offs[:, None, None, None] * s_b + (i3 * s_i + j3 * s_j + d3 * s_d)[None, :, :, :]
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
def _store_bjd(ptr, value, b_offs, b_mask, J, D, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    j = tl.arange(0, BLOCK_J)[None, :, None]
    d = tl.arange(0, BLOCK_D)[None, None, :]
    mask = b_mask[:, None, None] & (j < J) & (d < D)
    tl.store(ptr + (b_offs[:, None, None] * J + j) * D + d, value.to(ptr.dtype.element_ty), mask=mask)


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


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _sweep_kernel(
    src_ptr, s_b, s_i, s_j, s_d,  # u_hat, or u (fused)
    w_ptr, w_i, w_j, w_d, w_k,  # W (fused only)
    V_ptr,  # [B, J, D] running sum of earlier outputs, this iteration's slice of V_all
    gs_ptr,  # [B, J, D] gradient wrt s of this iteration (BACKWARD only)
    partial_ptr,  # [n_isplit, B, J, D] output: this program's share of the sum over i
    c_ptr,  # [B, I, J] output couplings (STORE_C only)
    prior_ptr,  # [I, J] contiguous prior logits (HAS_PRIOR only)
    inv_t_ptr,  # [1] 1 / temperature in the accumulation dtype (HAS_TEMPERATURE only)
    B, I, J, D, Din, i_per_split,
    FUSED: tl.constexpr, BACKWARD: tl.constexpr, LEAKY: tl.constexpr, STORE_C: tl.constexpr,
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
        u_hat = _u_hat_block(b_offs, b_mask, i_offs, i_mask, src_ptr, s_b, s_i, s_j, s_d,
                             w_ptr, w_i, w_j, w_d, w_k, J, D, Din, FUSED, ACC, BLOCK_B, BLOCK_I,
                             BLOCK_J, BLOCK_D)
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
                tl.store(c_ptr + (b_offs[:, None, None] * I + i_offs[None, :, None]) * J + j_offs[None, None, :],
                         c.to(c_ptr.dtype.element_ty),
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
    HAS_BIAS: tl.constexpr, LAST: tl.constexpr, ACC: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``s = sum of partials + bias``, ``v = squash(s) = s |s| / (1 + |s|^2)``."""
    b = tl.program_id(0)
    s = tl.zeros([BLOCK_J, BLOCK_D], dtype=ACC)
    for split in range(0, n_isplit):
        s += _load_jd(partial_ptr + (split * B + b) * J * D, J, D, BLOCK_J, BLOCK_D, ACC)
    if HAS_BIAS:
        s += _load_jd(bias_ptr, J, D, BLOCK_J, BLOCK_D, ACC)
    _store_jd(s_ptr + b * J * D, s, J, D, BLOCK_J, BLOCK_D)
    sq_norm = tl.sum(s * s, axis=1)
    v = s * (tl.sqrt(sq_norm) / (1.0 + sq_norm))[:, None]
    if LAST:
        _store_jd(v_ptr + b * J * D, v, J, D, BLOCK_J, BLOCK_D)
    else:
        V = _load_jd(V_ptr + b * J * D, J, D, BLOCK_J, BLOCK_D, ACC)
        _store_jd(V_next_ptr + b * J * D, V + v, J, D, BLOCK_J, BLOCK_D)


@triton.jit
def _finalize_bwd_kernel(
    partial_ptr, n_isplit,  # [n_isplit, B, J, D] partial D_j of the later iteration (HAS_PARTIAL)
    G_ptr,  # [B, J, D] in/out: gradient reaching V from later iterations
    gv_last_ptr,  # [B, J, D] dL/dv of the output (LAST only)
    s_ptr,  # [B, J, D] saved s of this iteration
    gs_ptr,  # [B, J, D] output: dL/ds of this iteration
    B, J, D,
    HAS_PARTIAL: tl.constexpr, LAST: tl.constexpr, ACC: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Squash backward. With ``n = |s|`` and ``h(n) = n / (1 + n^2)``:
    ``gs = h(n) gv + (1 - n^2) / ((1 + n^2)^2 n) <s, gv> s``; the second term vanishes like
    ``n`` as ``s -> 0``, so it is set to zero at ``s = 0``."""
    b = tl.program_id(0)
    G = _load_jd(G_ptr + b * J * D, J, D, BLOCK_J, BLOCK_D, ACC)
    if HAS_PARTIAL:
        for split in range(0, n_isplit):
            G += _load_jd(partial_ptr + (split * B + b) * J * D, J, D, BLOCK_J, BLOCK_D, ACC)
        _store_jd(G_ptr + b * J * D, G, J, D, BLOCK_J, BLOCK_D)
    gv = G
    if LAST:
        gv += _load_jd(gv_last_ptr + b * J * D, J, D, BLOCK_J, BLOCK_D, ACC)
    s = _load_jd(s_ptr + b * J * D, J, D, BLOCK_J, BLOCK_D, ACC)
    sq_norm = tl.sum(s * s, axis=1)
    norm = tl.sqrt(sq_norm)
    one_plus = 1.0 + sq_norm
    safe_norm = tl.where(sq_norm > 0, norm, 1.0)  # no division by zero, even in a dead branch
    radial = tl.where(sq_norm > 0, (1.0 - sq_norm) / (one_plus * one_plus * safe_norm), 0.0)
    s_dot_gv = tl.sum(s * gv, axis=1)
    gs = (norm / one_plus)[:, None] * gv + (radial * s_dot_gv)[:, None] * s
    _store_jd(gs_ptr + b * J * D, gs, J, D, BLOCK_J, BLOCK_D)


@triton.jit
def _input_grad_kernel(
    src_ptr, s_b, s_i, s_j, s_d,  # u_hat, or u (fused)
    w_ptr, w_i, w_j, w_d, w_k,  # W (fused only)
    V_all_ptr, gs_all_ptr,  # [R, B, J, D] saved V^r and the gradients gs^r
    g_src_ptr,  # output: g_u_hat [B, I, J, D] contiguous, or du [B, I, Din] contiguous (fused)
    g_w_ptr,  # output (fused, NEED_DW): dW partials [n_bsplit, I, J, D, Din] contiguous
    prior_ptr,  # [I, J] contiguous prior logits (HAS_PRIOR only)
    inv_t_ptr,  # [1] 1 / temperature in the accumulation dtype (HAS_TEMPERATURE only)
    g_prior_ptr,  # output (NEED_DPRIOR): prior gradient partials [n_bsplit, I, J] contiguous
    B, I, J, D, Din, R, b_per_split,
    FUSED: tl.constexpr, LEAKY: tl.constexpr, DETACH: tl.constexpr,
    NEED_DSRC: tl.constexpr, NEED_DW: tl.constexpr,
    HAS_PRIOR: tl.constexpr, HAS_TEMPERATURE: tl.constexpr, NEED_DPRIOR: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``g_u_hat_ij = sum_r c^r_ij gs^r_j + gl^r_ij V^r_j`` (only the last iteration's first term
    with ``DETACH``), then ``du_i = sum_j W_ij^T g_u_hat_ij`` and
    ``dW_ij = sum_b g_u_hat_ij u_i^T`` (fused), or ``g_u_hat`` itself. The logit gradients
    ``gl^r`` are also the prior's: ``dprior_ij = sum_b sum_r gl^r_ij`` (only the last
    iteration with ``DETACH``), summed over this program's samples in registers."""
    tile = tl.program_id(0)
    split = tl.program_id(1)
    i_offs = tile * BLOCK_I + tl.arange(0, BLOCK_I)
    i_mask = i_offs < I
    j_offs = tl.arange(0, BLOCK_J)
    j_mask = j_offs < J
    d_offs = tl.arange(0, BLOCK_D)
    i3 = i_offs[:, None, None]
    j3 = j_offs[None, :, None]
    d3 = d_offs[None, None, :]
    mask3 = i_mask[:, None, None] & (j3 < J) & (d3 < D)
    if FUSED:
        # The W tile stays in registers for all the samples of this program.
        k_offs = tl.arange(0, BLOCK_K)
        k4 = k_offs[None, None, None, :]
        mask4 = mask3[:, :, :, None] & (k4 < Din)
        w_tile = tl.load(w_ptr + i3[:, :, :, None] * w_i + j3[:, :, :, None] * w_j
                         + d3[:, :, :, None] * w_d + k4 * w_k, mask=mask4, other=0.0).to(ACC)
        if NEED_DW:
            dW = tl.zeros([BLOCK_I, BLOCK_J, BLOCK_D, BLOCK_K], dtype=ACC)
    if HAS_PRIOR:
        prior = _load_prior(prior_ptr, i_offs, i_mask, J, BLOCK_J, ACC)
    if HAS_TEMPERATURE:
        inv_t = tl.load(inv_t_ptr)
    if NEED_DPRIOR:
        d_prior = tl.zeros([BLOCK_I, BLOCK_J], dtype=ACC)
    if DETACH:
        r_begin = R - 1
    else:
        r_begin = 0
    b_begin = split * b_per_split
    b_end = tl.minimum(b_begin + b_per_split, B)
    for b in range(b_begin, b_end):
        if FUSED:
            u_tile = tl.load(src_ptr + b * s_b + i_offs[:, None] * s_i + k_offs[None, :] * s_j,
                             mask=i_mask[:, None] & (k_offs[None, :] < Din), other=0.0).to(ACC)
            u_hat = tl.sum(w_tile * u_tile[:, None, None, :], axis=3)
        else:
            u_hat = tl.load(src_ptr + b * s_b + i3 * s_i + j3 * s_j + d3 * s_d, mask=mask3,
                            other=0.0).to(ACC)
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
                gc = tl.sum(u_hat * gs[None, :, :], axis=2)
                gl = c * (gc - tl.sum(c * gc, axis=1)[:, None])
                if HAS_TEMPERATURE:
                    gl *= inv_t
                d_prior += gl
                if not DETACH:
                    # Through the logits' agreement <u_hat, V^r> (zero for r = 0: V^1 = 0).
                    g_u_hat += gl[:, :, None] * V[None, :, :]
            elif not DETACH:
                # Through the logits <u_hat, V^r>; V^1 = 0, so the first iteration adds nothing.
                if r > 0:
                    gc = tl.sum(u_hat * gs[None, :, :], axis=2)
                    gl = c * (gc - tl.sum(c * gc, axis=1)[:, None])
                    if HAS_TEMPERATURE:
                        gl *= inv_t
                    g_u_hat += gl[:, :, None] * V[None, :, :]
        if FUSED:
            if NEED_DSRC:
                du = tl.sum(tl.sum(w_tile * g_u_hat[:, :, :, None], axis=2), axis=1)
                tl.store(g_src_ptr + b * I * Din + i_offs[:, None] * Din + k_offs[None, :],
                         du.to(g_src_ptr.dtype.element_ty),
                         mask=i_mask[:, None] & (k_offs[None, :] < Din))
            if NEED_DW:
                dW += g_u_hat[:, :, :, None] * u_tile[:, None, None, :]
        else:
            if NEED_DSRC:
                tl.store(g_src_ptr + ((b * I + i3) * J + j3) * D + d3,
                         g_u_hat.to(g_src_ptr.dtype.element_ty), mask=mask3)
    if FUSED:
        if NEED_DW:
            tl.store(g_w_ptr + split * I * J * D * Din
                     + ((i3[:, :, :, None] * J + j3[:, :, :, None]) * D + d3[:, :, :, None]) * Din + k4,
                     dW.to(g_w_ptr.dtype.element_ty), mask=mask4)
    if NEED_DPRIOR:
        tl.store(g_prior_ptr + (split * I + i_offs[:, None]) * J + j_offs[None, :],
                 d_prior.to(g_prior_ptr.dtype.element_ty), mask=i_mask[:, None] & j_mask[None, :])


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def _source_args(src: torch.Tensor, W: Optional[torch.Tensor]):
    """(src, 4 strides, W, 4 strides) as the kernels take them; u has 3 strides, padded."""
    if W is None:
        return (src, *src.stride(), src, 0, 0, 0, 0)
    return (src, *src.stride(), 0, W, *W.stride())


def _routing_shape(src, W):
    """``(fused, B, I, J, D, Din)`` of a routing call: ``src`` is ``u_hat [B, I, J, D]`` when
    ``W is None`` (``Din`` is then 1), else ``u [B, I, Din]`` fused with ``W [I, J, D, Din]``."""
    if W is None:
        B, I, J, D = src.shape
        return False, B, I, J, D, 1
    B, I, Din = src.shape
    return True, B, I, W.shape[1], W.shape[2], Din


def _logit_args(prior, temperature, acc, device):
    """``(prior, inv_t, HAS_PRIOR, HAS_TEMPERATURE)`` kernel arguments. ``1 / temperature``
    travels as a one-element tensor in the accumulation dtype: a Python float argument would
    reach the kernels rounded to float32."""
    has_temperature = float(temperature) != 1.0
    inv_t = torch.full((1,), 1.0 / float(temperature), dtype=acc, device=device) if has_temperature else None
    prior_arg = prior.contiguous() if prior is not None else None
    return prior_arg, inv_t, prior is not None, has_temperature


def routing_forward(src, W, iterations, bias, leaky, return_coupling, prior=None, temperature=1.0):
    """Run the R forward sweeps. ``src`` is ``u_hat [B, I, J, D]`` (``W is None``) or
    ``u [B, I, Din]`` (fused with ``W [I, J, D, Din]``); ``prior [I, J]`` optional, added to
    the logits before every softmax, and ``temperature`` dividing them.

    Returns ``v [B, J, D]`` (src's dtype), the saved ``s_all`` and ``V_all`` (``[R, B, J, D]``,
    accumulation dtype) and the last couplings ``c [B, I, J]`` or ``None``.
    """
    fused, B, I, J, D, Din = _routing_shape(src, W)
    plan = _Plan(B, I, J, D, Din, fused, src.device)
    acc = acc_dtype(src.dtype)
    R = iterations
    s_all = torch.empty(R, B, J, D, device=src.device, dtype=acc)
    V_all = torch.empty(R, B, J, D, device=src.device, dtype=acc)
    V_all[0].zero_()
    partial = torch.empty(plan.n_isplit, B, J, D, device=src.device, dtype=acc)
    v = torch.empty(B, J, D, device=src.device, dtype=src.dtype)
    c = torch.empty(B, I, J, device=src.device, dtype=src.dtype) if return_coupling else partial
    bias_arg = bias.contiguous() if bias is not None else partial
    prior_arg, inv_t, has_prior, has_temperature = _logit_args(prior, temperature, acc, src.device)
    src_args = _source_args(src, W)
    meta = dict(ACC=_tl_acc(src.dtype), BLOCK_J=plan.BLOCK_J, BLOCK_D=plan.BLOCK_D)
    for r in range(R):
        last = r == R - 1
        _sweep_kernel[(plan.n_bblocks, plan.n_isplit)](
            *src_args, V_all[r], partial, partial, c,
            prior_arg if has_prior else partial, inv_t if has_temperature else partial,
            B, I, J, D, Din, plan.i_per_split,
            FUSED=fused, BACKWARD=False, LEAKY=leaky, STORE_C=return_coupling and last,
            HAS_PRIOR=has_prior, HAS_TEMPERATURE=has_temperature,
            BLOCK_B=plan.SWEEP_BLOCK_B, BLOCK_I=plan.SWEEP_BLOCK_I, num_warps=plan.sweep_warps, **meta,
        )
        _finalize_fwd_kernel[(B,)](
            partial, plan.n_isplit, bias_arg, s_all[r], V_all[r], V_all[r + 1] if not last else v, v,
            B, J, D, HAS_BIAS=bias is not None, LAST=last, **meta,
        )
    return v, s_all, V_all, (c if return_coupling else None)


def routing_backward(src, W, grad_v, s_all, V_all, leaky, detach_inner, need_src, need_w,
                     prior=None, temperature=1.0, need_prior=False):
    """Gradients ``(d_src, dW, gs_all, d_prior)`` of the routing output wrt ``src`` (``u_hat``,
    or ``u`` when fused), ``W`` (fused only; ``None`` otherwise), every iteration's ``s``
    (``gs_all [R, B, J, D]``; ``dL/dbias = gs_all.sum((0, 1))``) and ``prior`` (``None``
    unless ``need_prior``).

    The prior is added to every iteration's logits, so its gradient is the sum over samples
    and iterations of the logit gradients: with ``c^r = softmax((prior + A^r) / T)`` and
    ``gc^r_ij = <gs^r_j, u_hat_ij>``, ``dprior_ij = sum_b sum_r c^r_ij (gc^r_ij -
    sum_k c^r_ik gc^r_ik) / T`` (only ``r = R`` under ``detach_inner``). Each input-gradient
    program sums its samples in registers; the ``n_bsplit`` partials are summed after, so the
    result is deterministic."""
    fused, B, I, J, D, Din = _routing_shape(src, W)
    R = s_all.shape[0]
    plan = _Plan(B, I, J, D, Din, fused, src.device)
    acc = s_all.dtype
    need_prior = need_prior and prior is not None
    prior_arg, inv_t, has_prior, has_temperature = _logit_args(prior, temperature, acc, src.device)
    logit_meta = dict(HAS_PRIOR=has_prior, HAS_TEMPERATURE=has_temperature)
    meta = dict(ACC=_tl_acc(src.dtype), BLOCK_J=plan.BLOCK_J, BLOCK_D=plan.BLOCK_D)
    grad_v = grad_v.contiguous()
    gs_all = torch.zeros(R, B, J, D, device=src.device, dtype=acc)
    G = torch.zeros(B, J, D, device=src.device, dtype=acc)
    partial = torch.empty(plan.n_isplit, B, J, D, device=src.device, dtype=acc)
    src_args = _source_args(src, W)
    has_partial = False
    for r in range(R - 1, -1, -1):
        _finalize_bwd_kernel[(B,)](
            partial, plan.n_isplit, G, grad_v, s_all[r], gs_all[r], B, J, D,
            HAS_PARTIAL=has_partial, LAST=r == R - 1, **meta,
        )
        if detach_inner or r == 0:
            break
        # D^r = dL/dV^r, a sum over i: it reaches every earlier iteration's v.
        _sweep_kernel[(plan.n_bblocks, plan.n_isplit)](
            *src_args, V_all[r], gs_all[r], partial, partial,
            prior_arg if has_prior else partial, inv_t if has_temperature else partial,
            B, I, J, D, Din, plan.i_per_split,
            FUSED=fused, BACKWARD=True, LEAKY=leaky, STORE_C=False, **logit_meta,
            BLOCK_B=plan.SWEEP_BLOCK_B, BLOCK_I=plan.SWEEP_BLOCK_I, num_warps=plan.sweep_warps, **meta,
        )
        has_partial = True

    d_src = dW = None
    need_dw = fused and need_w
    if fused:
        d_src = torch.empty(B, I, Din, device=src.device, dtype=src.dtype) if need_src else None
        if need_dw:
            dw_dtype = W.dtype if plan.n_bsplit == 1 else acc
            dW = torch.empty(plan.n_bsplit, I, J, D, Din, device=src.device, dtype=dw_dtype)
    elif need_src:
        d_src = torch.empty(B, I, J, D, device=src.device, dtype=src.dtype)
    d_prior = None
    if need_prior:
        d_prior = torch.empty(plan.n_bsplit, I, J, device=src.device,
                              dtype=prior.dtype if plan.n_bsplit == 1 else acc)
    if need_src or need_dw or need_prior:
        _input_grad_kernel[(plan.n_itiles, plan.n_bsplit)](
            *src_args, V_all, gs_all,
            d_src if d_src is not None else gs_all, dW if dW is not None else gs_all,
            prior_arg if has_prior else gs_all, inv_t if has_temperature else gs_all,
            d_prior if d_prior is not None else gs_all,
            B, I, J, D, Din, R, plan.b_per_split,
            FUSED=fused, LEAKY=leaky, DETACH=detach_inner, NEED_DSRC=need_src, NEED_DW=need_dw,
            NEED_DPRIOR=need_prior, **logit_meta,
            BLOCK_I=plan.GRAD_BLOCK_I, BLOCK_K=plan.BLOCK_K, num_warps=plan.grad_warps, **meta,
        )
    if dW is not None:
        dW = dW[0] if plan.n_bsplit == 1 else dW.sum(0).to(W.dtype)
    if d_prior is not None:
        d_prior = d_prior[0] if plan.n_bsplit == 1 else d_prior.sum(0).to(prior.dtype)
    return d_src, dW, gs_all, d_prior


class RoutingFunction(torch.autograd.Function):
    """Autograd over the fused routing kernels. ``W is None``: routing over given ``u_hat``
    (``src``); otherwise ``src`` is ``u`` and ``u_hat`` is recomputed in every pass."""

    @staticmethod
    def forward(ctx, src, W, bias, prior, iterations, leaky, detach_inner, return_coupling,
                temperature):
        v, s_all, V_all, c = routing_forward(src, W, iterations, bias, leaky, return_coupling,
                                             prior, temperature)
        ctx.save_for_backward(src, W, prior, s_all, V_all)
        ctx.leaky = leaky
        ctx.detach_inner = detach_inner
        ctx.temperature = temperature
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        if c is not None:
            ctx.mark_non_differentiable(c)
            return v, c
        return v

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_v, grad_c=None):
        src, W, prior, s_all, V_all = ctx.saved_tensors
        need_src = ctx.needs_input_grad[0]
        need_w = W is not None and ctx.needs_input_grad[1]
        need_prior = prior is not None and ctx.needs_input_grad[3]
        d_src, dW, gs_all, d_prior = routing_backward(
            src, W, grad_v, s_all, V_all, ctx.leaky, ctx.detach_inner, need_src, need_w,
            prior, ctx.temperature, need_prior)
        d_bias = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            d_bias = gs_all.sum((0, 1)).to(ctx.bias_dtype)
        return d_src if need_src else None, dW, d_bias, d_prior, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# The same launchers as registered operators, for torch.compile: Dynamo cannot trace into a
# Triton launch on every setup (the CPU interpreter in particular), but it keeps an opaque
# custom op in the graph, with the fake implementations below giving output shapes.
# --------------------------------------------------------------------------------------------
def _empty_like_none(ref: torch.Tensor) -> torch.Tensor:
    """An operator must return tensors: an empty one stands for "not computed"."""
    return ref.new_empty(0)


def _routing_shapes(src, W):
    if W is not None:
        B, I, _ = src.shape
        _, J, D, _ = W.shape
    else:
        B, I, J, D = src.shape
    return B, I, J, D


@torch.library.custom_op("capsnet_ext_triton::routing_forward", mutates_args=())
def routing_forward_op(src: torch.Tensor, W: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                       iterations: int, leaky: bool, detach_inner: bool, return_coupling: bool,
                       prior: Optional[torch.Tensor] = None, temperature: float = 1.0
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(v, s_all, V_all, c)``; ``c`` is empty unless ``return_coupling``. ``detach_inner``
    only matters to the backward registered below."""
    v, s_all, V_all, c = routing_forward(src, W, iterations, bias, leaky, return_coupling,
                                         prior, temperature)
    return v, s_all, V_all, (c if c is not None else _empty_like_none(src))


@routing_forward_op.register_fake
def _(src, W, bias, iterations, leaky, detach_inner, return_coupling, prior=None, temperature=1.0):
    B, I, J, D = _routing_shapes(src, W)
    acc = acc_dtype(src.dtype)
    c = src.new_empty(B, I, J) if return_coupling else src.new_empty(0)
    return (src.new_empty(B, J, D), src.new_empty(iterations, B, J, D, dtype=acc),
            src.new_empty(iterations, B, J, D, dtype=acc), c)


@torch.library.custom_op("capsnet_ext_triton::routing_backward", mutates_args=())
def routing_backward_op(grad_v: torch.Tensor, src: torch.Tensor, W: Optional[torch.Tensor],
                        s_all: torch.Tensor, V_all: torch.Tensor, leaky: bool, detach_inner: bool,
                        need_src: bool, need_w: bool, prior: Optional[torch.Tensor] = None,
                        temperature: float = 1.0, need_prior: bool = False
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d_src, dW, gs_all, d_prior)``; gradients not asked for are empty."""
    d_src, dW, gs_all, d_prior = routing_backward(src, W, grad_v, s_all, V_all, leaky,
                                                  detach_inner, need_src, need_w, prior,
                                                  temperature, need_prior)
    return (d_src if d_src is not None else _empty_like_none(src),
            dW if dW is not None else _empty_like_none(src), gs_all,
            d_prior if d_prior is not None else _empty_like_none(src))


@routing_backward_op.register_fake
def _(grad_v, src, W, s_all, V_all, leaky, detach_inner, need_src, need_w, prior=None,
      temperature=1.0, need_prior=False):
    d_src = src.new_empty(src.shape) if need_src else src.new_empty(0)
    dW = W.new_empty(W.shape) if (W is not None and need_w) else src.new_empty(0)
    d_prior = prior.new_empty(prior.shape) if (prior is not None and need_prior) else src.new_empty(0)
    return d_src, dW, s_all.new_empty(s_all.shape), d_prior


def _routing_setup_context(ctx, inputs, output):
    src, W, bias, iterations, leaky, detach_inner, return_coupling, prior, temperature = inputs
    _, s_all, V_all, c = output
    ctx.save_for_backward(src, W, prior, s_all, V_all)
    ctx.leaky = leaky
    ctx.detach_inner = detach_inner
    ctx.temperature = temperature
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(s_all, V_all, c)


def _routing_backward_formula(ctx, grad_v, grad_s_all, grad_V_all, grad_c):
    src, W, prior, s_all, V_all = ctx.saved_tensors
    need_src = ctx.needs_input_grad[0]
    need_w = W is not None and ctx.needs_input_grad[1]
    need_prior = prior is not None and ctx.needs_input_grad[7]
    d_src, dW, gs_all, d_prior = routing_backward_op(
        grad_v, src, W, s_all, V_all, ctx.leaky, ctx.detach_inner, need_src, need_w,
        prior, ctx.temperature, need_prior)
    d_bias = None
    if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
        d_bias = gs_all.sum((0, 1)).to(ctx.bias_dtype)
    return (d_src if need_src else None, dW if need_w else None, d_bias,
            None, None, None, None, d_prior if need_prior else None, None)


routing_forward_op.register_autograd(_routing_backward_formula, setup_context=_routing_setup_context)


def run_routing(src, W, iterations, bias, leaky, detach_inner, return_coupling, prior=None,
                temperature=1.0):
    """Shared entry of the two public wrappers: make the small inputs contiguous (``u`` and
    ``W`` are re-read in every pass; ``u_hat`` is read through its strides) and apply.

    Eager calls go through :class:`RoutingFunction` (the least per-call overhead); under
    ``torch.compile`` the registered operator is used, with the same launchers."""
    if W is not None:
        src = src.contiguous()
        W = W.contiguous()
    if torch.compiler.is_compiling():
        v, _, _, c = routing_forward_op(src, W, bias, iterations, leaky, detach_inner,
                                        return_coupling, prior, float(temperature))
        return (v, c) if return_coupling else v
    return RoutingFunction.apply(src, W, bias, prior, iterations, leaky, detach_inner,
                                 return_coupling, float(temperature))
