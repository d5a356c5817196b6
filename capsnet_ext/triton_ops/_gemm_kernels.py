"""Triton kernels of the fused ``capsule_routing`` written as tensor-core GEMM tiles
(``tl.dot``); the launchers and autograd live in :mod:`._gemm_core`.

Notation: ``u [B, I, Din]``, ``W [I, J, Dout, Din]``, ``V^r = v^1 + ... + v^(r-1)`` (the sum of
the earlier outputs, ``[B, J, Dout]``), ``p [I, J]`` the optional prior logits, ``T`` the
softmax temperature. A tile covers ``BB`` samples and a chunk of ``IC`` input capsules; the
chunk's ``(i, k)`` pairs are flattened into one axis of length ``N = IC * DINP`` (``Din``
padded to a power of two). Every tile is laid out ``[BLOCK_J, BB, ...]``: the output capsule
``j`` is the batch axis of a batched (3-D) ``tl.dot``, so one instruction stream serves all
``j`` and no ``u_hat`` is ever formed:

* logits ``l_bij = <u_bi, T_bij>`` with ``T_j = V_j [BB x Dout] @ W_j [Dout x N]``: one batched
  dot, a product with ``u`` and a sum over each capsule's ``Din`` entries;
* weighted sum ``s_j += (c_j * u) [BB x N] @ W_j^T [N x Dout]`` (``c_bij`` repeated over k);
* backward: ``du_bi = sum_r sum_j c^r_bij (W_ij^T gs^r_bj) + gl^r_bij (W_ij^T V^r_bj)`` (the same
  ``[BB x Dout] @ [Dout x N]`` products as ``T``) and
  ``dW_j = sum_r gs^r_j^T @ (c^r_j * u) + V^r_j^T @ (gl^r_j * u)``, dots over the sample axis.

The softmax couples the output capsules, so every tile holds all ``J`` (padded to a power of
two and masked). Dot operands are in the input dtype for float16/bfloat16 (float32
accumulation), float32 with the ``PRECISION`` the launcher derives from PyTorch's TF32 switch,
float64 in float64. Offsets that can pass 2^31 (``u``, ``W``, the couplings ``c``) are formed
in 64-bit integers (:func:`row_offset`).
"""
from __future__ import annotations

import triton
import triton.language as tl


# --------------------------------------------------------------------------------------------
# Offsets and tile loads
# --------------------------------------------------------------------------------------------
@triton.jit
def row_offset(row, row_elements):
    """``row * row_elements`` in 64-bit integers: the element offset of row ``row`` of a
    contiguous tensor whose rows hold ``row_elements`` elements. The product passes 2^31
    (and would wrap in 32-bit arithmetic) long before the tensor is too large to allocate."""
    return tl.cast(row, tl.int64) * row_elements


@triton.jit
def _op(x, DT: tl.constexpr, DOT_DT: tl.constexpr):
    """A ``tl.dot`` operand: rounded to the operand dtype ``DT``, then given to the dot as
    ``DOT_DT``, which is ``DT`` itself except in Triton's CPU interpreter, whose bfloat16 dot
    is wrong: there the rounded values are multiplied in float32 (exact products of bfloat16
    values, float32 sums, as the tensor cores do)."""
    if DT == DOT_DT:
        return x.to(DT)
    return x.to(DT).to(DOT_DT)


@triton.jit
def _load_w_chunk(w_ptr, i0, I, J, D, Din, DT: tl.constexpr, DOT_DT: tl.constexpr,
                  BLOCK_J: tl.constexpr,
                  BLOCK_D: tl.constexpr, DINP: tl.constexpr, IC: tl.constexpr):
    """``[BLOCK_J, BLOCK_D, IC * DINP]``: element ``(j, d, n)`` is ``W[i0 + n // DINP, j, d,
    n % DINP]``, zero outside the tensor (W contiguous). The chunk's base is a 64-bit scalar
    offset; offsets inside the chunk are 32-bit (fewer registers per element)."""
    j = tl.arange(0, BLOCK_J)[:, None, None]
    d = tl.arange(0, BLOCK_D)[None, :, None]
    n = tl.arange(0, IC * DINP)[None, None, :]
    ic = n // DINP
    k = n % DINP
    offs = ic * (J * D * Din) + (j * D + d) * Din + k
    mask = (j < J) & (d < D) & (ic < I - i0) & (k < Din)
    return _op(tl.load(w_ptr + row_offset(i0, J * D * Din) + offs, mask=mask, other=0.0), DT,
               DOT_DT)


@triton.jit
def _load_u_chunk(u_ptr, b0, b_limit, i0, I, Din, ACC: tl.constexpr, BB: tl.constexpr,
                  DINP: tl.constexpr, IC: tl.constexpr):
    """``[BB, IC * DINP]``: element ``(b, n)`` is ``u[b0 + b, i0 + n // DINP, n % DINP]`` (u
    contiguous), zero outside and for samples from ``b_limit`` on."""
    n = tl.arange(0, IC * DINP)[None, :]
    ic = n // DINP
    k = n % DINP
    b = tl.arange(0, BB)[:, None]
    offs = b * (I * Din) + ic * Din + k
    mask = (b < b_limit - b0) & (ic < I - i0) & (k < Din)
    return tl.load(u_ptr + row_offset(b0, I * Din) + i0 * Din + offs, mask=mask,
                   other=0.0).to(ACC)


@triton.jit
def _jbd_offsets(b0, b_limit, J, D, BB: tl.constexpr, BLOCK_J: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """``(base, offsets, mask)`` of the ``[BLOCK_J, BB, BLOCK_D]`` tile of samples ``b0 ..
    b0 + BB`` (those below ``b_limit``) of a contiguous ``[B, J, D]`` tensor: a 64-bit scalar
    base and 32-bit offsets inside the tile (fewer registers per element)."""
    j = tl.arange(0, BLOCK_J)[:, None, None]
    d = tl.arange(0, BLOCK_D)[None, None, :]
    b = tl.arange(0, BB)[None, :, None]
    return row_offset(b0, J * D), (b * J + j) * D + d, (j < J) & (b < b_limit - b0) & (d < D)


@triton.jit
def _load_jbd(ptr, b0, b_limit, J, D, ACC: tl.constexpr, BB: tl.constexpr,
              BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    base, offs, mask = _jbd_offsets(b0, b_limit, J, D, BB, BLOCK_J, BLOCK_D)
    return tl.load(ptr + base + offs, mask=mask, other=0.0).to(ACC)


@triton.jit
def _store_jbd(ptr, value, b0, b_limit, J, D, BB: tl.constexpr, BLOCK_J: tl.constexpr,
               BLOCK_D: tl.constexpr, enabled):
    """Store a ``[BLOCK_J, BB, BLOCK_D]`` tile; ``enabled`` (an integer scalar, 0 or 1) lets
    exactly one of several programs holding the same values write them."""
    base, offs, mask = _jbd_offsets(b0, b_limit, J, D, BB, BLOCK_J, BLOCK_D)
    # The scalar is broadcast through an integer tensor: Triton's interpreter rejects a mask
    # made of a boolean scalar and a boolean tensor.
    mask = mask & ((offs * 0 + enabled) != 0)
    tl.store(ptr + base + offs, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_jd(ptr, J, D, ACC: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """A contiguous ``[J, D]`` tensor (the bias) as a ``[BLOCK_J, 1, BLOCK_D]`` tile."""
    j = tl.arange(0, BLOCK_J)[:, None, None]
    d = tl.arange(0, BLOCK_D)[None, None, :]
    return tl.load(ptr + j * D + d, mask=(j < J) & (d < D), other=0.0).to(ACC)


@triton.jit
def _sum_partials(part_ptr, n_parts, b0, B, J, D, ACC: tl.constexpr, BB: tl.constexpr,
                  BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """Sum of the ``[n_parts, B, J, D]`` partial sums for samples ``b0 .. b0 + BB``, in a fixed
    order (bitwise reproducible)."""
    base, offs, mask = _jbd_offsets(b0, B, J, D, BB, BLOCK_J, BLOCK_D)
    total = tl.zeros([BLOCK_J, BB, BLOCK_D], dtype=ACC)
    for part in range(0, n_parts):
        total += tl.load(part_ptr + row_offset(part, B * J * D) + base + offs, mask=mask,
                         other=0.0).to(ACC)
    return total


# --------------------------------------------------------------------------------------------
# Squash, softmax
# --------------------------------------------------------------------------------------------
@triton.jit
def _squash(s, TINY: tl.constexpr):
    """``s |s| / (1 + |s|^2)`` along the last axis, ``|s|`` from ``|s|^2`` clamped at the
    smallest normal number ``TINY`` as in the reference."""
    sq_norm = tl.sum(s * s, axis=2)
    norm = tl.sqrt(tl.maximum(sq_norm, TINY))
    return s * (norm / (1.0 + sq_norm))[:, :, None]


@triton.jit
def _squash_backward(s, gv, TINY: tl.constexpr):
    """Gradient wrt ``s`` of ``squash(s)`` given ``gv = dL/dv`` (last axis the capsule's):
    ``gs = h gv + (1 - n^2) / ((1 + n^2)^2 n) <s, gv> s`` with ``h = n / (1 + n^2)``, where ``n``
    is the norm from ``|s|^2`` clamped at ``TINY`` as in the reference's squash (and, below
    ``TINY``, the derivative of the reference's clamped formula). The clamp keeps the division
    finite where the GPU's approximate square root flushes a subnormal ``|s|^2`` to zero."""
    sq_norm = tl.sum(s * s, axis=2)
    norm = tl.sqrt(tl.maximum(sq_norm, TINY))
    one_plus = 1.0 + sq_norm
    # Below TINY the reference's norm is the constant sqrt(TINY): its derivative is that of
    # 1 / (1 + |s|^2) alone.
    radial = tl.where(sq_norm < TINY, -2.0 * norm / (one_plus * one_plus),
                      (1.0 - sq_norm) / (one_plus * one_plus * norm))
    s_dot_gv = tl.sum(s * gv, axis=2)
    return (norm / one_plus)[:, :, None] * gv + (radial * s_dot_gv)[:, :, None] * s


@triton.jit
def _softmax_j(logits, J, LEAKY: tl.constexpr, BLOCK_J: tl.constexpr):
    """Softmax over axis 0 (the output capsules) of ``[BLOCK_J, ...]`` logits; ``LEAKY`` adds a
    constant zero logit whose coefficient is not returned."""
    j_mask = (tl.arange(0, BLOCK_J) < J)[:, None, None]
    logits = tl.where(j_mask, logits, float("-inf"))
    row_max = tl.max(logits, axis=0)
    if LEAKY:
        row_max = tl.maximum(row_max, 0.0)
    e = tl.exp(logits - row_max[None, :, :])
    denom = tl.sum(e, axis=0)
    if LEAKY:
        denom += tl.exp(-row_max)
    return e / denom[None, :, :]


@triton.jit
def _logit_grad(c, gc, INV_T: tl.constexpr, ACC: tl.constexpr):
    """Gradient wrt the logits of the softmax over axis 0 (the output capsules) at temperature
    ``T``, given the couplings ``c`` and the gradient ``gc`` wrt them:
    ``gl = c (gc - sum_j c gc) / T`` (a leaky logit is a constant: no term of its own)."""
    gl = c * (gc - tl.sum(c * gc, axis=0)[None, :, :])
    if INV_T != 1.0:
        gl = gl * tl.full((), INV_T, ACC)
    return gl


@triton.jit
def _prior_and_temperature(logits, prior_ptr, i0, I, J, HAS_PRIOR: tl.constexpr,
                           INV_T: tl.constexpr, ACC: tl.constexpr, BLOCK_J: tl.constexpr,
                           IC: tl.constexpr):
    """``(logits + p_ij) / T`` for the ``[BLOCK_J, BB, IC]`` logits of input capsules
    ``i0 .. i0 + IC``."""
    if HAS_PRIOR:
        j = tl.arange(0, BLOCK_J)[:, None, None]
        i = i0 + tl.arange(0, IC)[None, None, :]
        logits += tl.load(prior_ptr + i * J + j, mask=(j < J) & (i < I), other=0.0).to(ACC)
    if INV_T != 1.0:
        logits = logits * tl.full((), INV_T, ACC)
    return logits


@triton.jit
def _per_capsule_sum(x, BLOCK_J: tl.constexpr, BB: tl.constexpr, IC: tl.constexpr,
                     DINP: tl.constexpr):
    """``[BLOCK_J, BB, IC * DINP]`` -> ``[BLOCK_J, BB, IC]``: sum over each capsule's k."""
    if IC == 1:
        return tl.sum(x, axis=2, keep_dims=True)
    return tl.sum(tl.reshape(x, (BLOCK_J, BB, IC, DINP)), axis=3)


@triton.jit
def _per_element(x, BLOCK_J: tl.constexpr, BB: tl.constexpr, IC: tl.constexpr,
                 DINP: tl.constexpr):
    """``[BLOCK_J, BB, IC]`` -> ``[BLOCK_J, BB, IC * DINP]``: each capsule's value repeated
    over its k."""
    if IC == 1:
        return tl.broadcast_to(x, (BLOCK_J, BB, DINP))
    return tl.reshape(tl.broadcast_to(x[:, :, :, None], (BLOCK_J, BB, IC, DINP)),
                      (BLOCK_J, BB, IC * DINP))


@triton.jit
def _logits(V, Wc, U, prior_ptr, i0, I, J, HAS_V: tl.constexpr, HAS_PRIOR: tl.constexpr,
            INV_T: tl.constexpr, DT: tl.constexpr, DOT_DT: tl.constexpr, ACC: tl.constexpr,
            PRECISION: tl.constexpr,
            BLOCK_J: tl.constexpr, BB: tl.constexpr, IC: tl.constexpr, DINP: tl.constexpr):
    """Routing logits ``(p_ij + <u_bi, V_j @ W_ij>) / T`` of a tile, ``[BLOCK_J, BB, IC]``, and
    ``V_j @ W_j`` itself (``[BLOCK_J, BB, N]``; zeros when ``not HAS_V``, i.e. ``V = 0``)."""
    if HAS_V:
        TV = tl.dot(_op(V, DT, DOT_DT), Wc, input_precision=PRECISION, out_dtype=ACC)
        logits = _per_capsule_sum(TV * U[None, :, :], BLOCK_J, BB, IC, DINP)
    else:
        TV = tl.zeros([BLOCK_J, BB, IC * DINP], dtype=ACC)
        logits = tl.zeros([BLOCK_J, BB, IC], dtype=ACC)
    return _prior_and_temperature(logits, prior_ptr, i0, I, J, HAS_PRIOR, INV_T, ACC, BLOCK_J,
                                  IC), TV


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------
@triton.jit
def _begin_iteration(part_in_ptr, bias_ptr, s_all_ptr, V_all_ptr, r, b0, split, B, J, D,
                     n_isplit, FIRST: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
                     TINY: tl.constexpr, BB: tl.constexpr, BLOCK_J: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """``V^r`` of samples ``b0 .. b0 + BB`` at the start of forward sweep ``r``, finishing
    iteration ``r - 1``: the previous sweep's partials summed in a fixed order, the bias added,
    ``s^(r-1)`` saved and ``V^r = V^(r-1) + squash(s^(r-1))`` formed (every split of the input
    capsules does this; split 0 writes the saved tensors). ``V^0 = 0``."""
    writer = (split == 0).to(tl.int32)
    if FIRST:
        V = tl.zeros([BLOCK_J, BB, BLOCK_D], dtype=ACC)
        _store_jbd(V_all_ptr, V, b0, B, J, D, BB, BLOCK_J, BLOCK_D, writer)
    else:
        s = _sum_partials(part_in_ptr, n_isplit, b0, B, J, D, ACC, BB, BLOCK_J, BLOCK_D)
        if HAS_BIAS:
            s += _load_jd(bias_ptr, J, D, ACC, BLOCK_J, BLOCK_D)
        _store_jbd(s_all_ptr + (r - 1) * B * J * D, s, b0, B, J, D, BB, BLOCK_J, BLOCK_D, writer)
        V = _load_jbd(V_all_ptr + (r - 1) * B * J * D, b0, B, J, D, ACC, BB, BLOCK_J, BLOCK_D)
        V += _squash(s, TINY)
        _store_jbd(V_all_ptr + r * B * J * D, V, b0, B, J, D, BB, BLOCK_J, BLOCK_D, writer)
    return V


@triton.jit
def _fwd_sweep_kernel(
    u_ptr, w_ptr, prior_ptr, bias_ptr,
    part_in_ptr,  # [n_isplit, B, J, D]: the previous sweep's partial sums over i (not FIRST)
    part_out_ptr,  # [n_isplit, B, J, D]: this sweep's partial sums
    s_all_ptr, V_all_ptr,  # [R, B, J, D]: saved s^r and V^r (written by split 0)
    c_ptr,  # [B, I, J] couplings of this iteration (STORE_C)
    r, B, I, J, D, Din, i_per_split, n_isplit,
    FIRST: tl.constexpr, HAS_PRIOR: tl.constexpr, HAS_BIAS: tl.constexpr, LEAKY: tl.constexpr,
    STORE_C: tl.constexpr, INV_T: tl.constexpr, ACC: tl.constexpr, DT: tl.constexpr,
    DOT_DT: tl.constexpr, PRECISION: tl.constexpr, TINY: tl.constexpr, BB: tl.constexpr, BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr, DINP: tl.constexpr, IC: tl.constexpr,
):
    """Iteration ``r`` (0-based) for ``BB`` samples over one split of the input capsules.

    It first finishes iteration ``r - 1`` for its samples: the previous sweep's partials are
    summed in a fixed order, the bias added, ``s^(r-1)`` saved and ``V^r = V^(r-1) +
    squash(s^(r-1))`` formed (every split does this; split 0 writes the saved tensors). Then
    ``partial_j = sum_i c_ij u_hat_ij`` over its input capsules, with ``u_hat`` never formed."""
    b0 = tl.program_id(0) * BB
    split = tl.program_id(1)
    V = _begin_iteration(part_in_ptr, bias_ptr, s_all_ptr, V_all_ptr, r, b0, split, B, J, D,
                         n_isplit, FIRST, HAS_BIAS, ACC, TINY, BB, BLOCK_J, BLOCK_D)
    acc = tl.zeros([BLOCK_J, BB, BLOCK_D], dtype=ACC)
    i_begin = split * i_per_split
    i_end = tl.minimum(i_begin + i_per_split, I)
    for i0 in range(i_begin, i_end, IC):
        Wc = _load_w_chunk(w_ptr, i0, I, J, D, Din, DT, DOT_DT, BLOCK_J, BLOCK_D, DINP, IC)
        U = _load_u_chunk(u_ptr, b0, B, i0, I, Din, ACC, BB, DINP, IC)
        if FIRST and not HAS_PRIOR:
            # All logits zero: uniform couplings (leaky: one more zero logit).
            X = tl.broadcast_to(U[None, :, :] / (J + LEAKY), (BLOCK_J, BB, IC * DINP))
        else:
            logits, _ = _logits(V, Wc, U, prior_ptr, i0, I, J, not FIRST, HAS_PRIOR, INV_T, DT,
                                DOT_DT, ACC, PRECISION, BLOCK_J, BB, IC, DINP)
            c = _softmax_j(logits, J, LEAKY, BLOCK_J)
            X = _per_element(c, BLOCK_J, BB, IC, DINP) * U[None, :, :]
            if STORE_C:
                j = tl.arange(0, BLOCK_J)[:, None, None]
                b = tl.arange(0, BB)[None, :, None]
                ic = tl.arange(0, IC)[None, None, :]
                tl.store(c_ptr + row_offset(b0, I * J) + i0 * J + b * (I * J) + ic * J + j,
                         c.to(c_ptr.dtype.element_ty),
                         mask=(j < J) & (b < B - b0) & (ic < I - i0))
        acc = tl.dot(_op(X, DT, DOT_DT), tl.trans(Wc, (0, 2, 1)), acc, input_precision=PRECISION,
                     out_dtype=ACC)
    _store_jbd(part_out_ptr + split * B * J * D, acc, b0, B, J, D, BB, BLOCK_J, BLOCK_D, 1)


@triton.jit
def _fwd_final_kernel(
    part_ptr, n_isplit, bias_ptr, s_all_ptr, v_ptr, c_ptr,
    r, B, I, J, D,
    HAS_BIAS: tl.constexpr, UNIFORM_C: tl.constexpr, LEAKY: tl.constexpr, ACC: tl.constexpr,
    TINY: tl.constexpr, BB: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    """Last iteration's ``s = sum of partials + bias`` (saved) and the output ``v = squash(s)``.
    ``UNIFORM_C``: a single iteration without prior never formed couplings; write the uniform
    ``1 / J`` (leaky ``1 / (J + 1)``) the caller asked for."""
    b0 = tl.program_id(0) * BB
    s = _sum_partials(part_ptr, n_isplit, b0, B, J, D, ACC, BB, BLOCK_J, BLOCK_D)
    if HAS_BIAS:
        s += _load_jd(bias_ptr, J, D, ACC, BLOCK_J, BLOCK_D)
    _store_jbd(s_all_ptr + r * B * J * D, s, b0, B, J, D, BB, BLOCK_J, BLOCK_D, 1)
    _store_jbd(v_ptr, _squash(s, TINY), b0, B, J, D, BB, BLOCK_J, BLOCK_D, 1)
    if UNIFORM_C:
        b = tl.arange(0, BB)[:, None, None]
        j = tl.arange(0, BLOCK_J)[None, None, :]
        value = tl.full([BB, BLOCK_I, BLOCK_J], 1.0, ACC) / (J + LEAKY)
        for i0 in range(0, I, BLOCK_I):
            i = i0 + tl.arange(0, BLOCK_I)[None, :, None]
            tl.store(c_ptr + row_offset(b0, I * J) + b * (I * J) + i * J + j,
                     value.to(c_ptr.dtype.element_ty), mask=(b < B - b0) & (i < I) & (j < J))


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------
@triton.jit
def _gs_of_iteration(
    part_ptr, n_isplit, G_in_ptr, G_out_ptr, grad_v_ptr, s_ptr, gs_ptr, b0, writer,
    B, J, D, HAS_PART: tl.constexpr, HAS_G_IN: tl.constexpr, HAS_GV: tl.constexpr,
    ACC: tl.constexpr, TINY: tl.constexpr, BB: tl.constexpr, BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``gs = squash-backward(s, gv)`` for samples ``b0 .. b0 + BB`` with ``gv = G + dL/dv``: ``G``
    (gradient reaching ``V`` from later iterations) is the stored ``G_in`` plus the summed
    partials of the later iteration's reduction sweep; it is written to ``G_out`` for the next
    sweep, ``gs`` to ``gs_ptr`` (by ``writer`` only)."""
    gv = tl.zeros([BLOCK_J, BB, BLOCK_D], dtype=ACC)
    if HAS_PART:
        gv = _sum_partials(part_ptr, n_isplit, b0, B, J, D, ACC, BB, BLOCK_J, BLOCK_D)
        if HAS_G_IN:
            gv += _load_jbd(G_in_ptr, b0, B, J, D, ACC, BB, BLOCK_J, BLOCK_D)
        _store_jbd(G_out_ptr, gv, b0, B, J, D, BB, BLOCK_J, BLOCK_D, writer)
    if HAS_GV:
        gv += _load_jbd(grad_v_ptr, b0, B, J, D, ACC, BB, BLOCK_J, BLOCK_D)
    s = _load_jbd(s_ptr, b0, B, J, D, ACC, BB, BLOCK_J, BLOCK_D)
    gs = _squash_backward(s, gv, TINY)
    _store_jbd(gs_ptr, gs, b0, B, J, D, BB, BLOCK_J, BLOCK_D, writer)
    return gs


@triton.jit
def _bwd_sweep_kernel(
    u_ptr, w_ptr, prior_ptr,
    part_in_ptr, part_out_ptr,  # [n_isplit, B, J, D] partial D of the later / this iteration
    G_in_ptr, G_out_ptr,  # [B, J, D] gradient reaching V from the iterations after r
    grad_v_ptr, s_ptr, V_ptr, gs_ptr,  # [B, J, D]: dL/dv, and s^r, V^r, gs^r of iteration r
    B, I, J, D, Din, i_per_split, n_isplit,
    HAS_PART: tl.constexpr, HAS_G_IN: tl.constexpr, HAS_GV: tl.constexpr,
    HAS_PRIOR: tl.constexpr, LEAKY: tl.constexpr, INV_T: tl.constexpr, ACC: tl.constexpr,
    DT: tl.constexpr, DOT_DT: tl.constexpr, PRECISION: tl.constexpr, TINY: tl.constexpr, BB: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, DINP: tl.constexpr, IC: tl.constexpr,
):
    """Reduction sweep of backward iteration ``r > 0``: first ``gs^r`` (squash backward of the
    gradient reaching ``v^r``), then ``D_j = sum_i gl_ij u_hat_ij`` over this split's input
    capsules, the gradient reaching ``V^r`` and so every earlier output, with
    ``gc_ij = <u_bi, gs_j @ W_ij>``, ``gl = c (gc - sum_j c gc) / T``."""
    b0 = tl.program_id(0) * BB
    split = tl.program_id(1)
    gs = _gs_of_iteration(part_in_ptr, n_isplit, G_in_ptr, G_out_ptr, grad_v_ptr, s_ptr, gs_ptr,
                          b0, (split == 0).to(tl.int32), B, J, D, HAS_PART, HAS_G_IN, HAS_GV, ACC, TINY,
                          BB, BLOCK_J, BLOCK_D)
    V = _load_jbd(V_ptr, b0, B, J, D, ACC, BB, BLOCK_J, BLOCK_D)
    acc = tl.zeros([BLOCK_J, BB, BLOCK_D], dtype=ACC)
    i_begin = split * i_per_split
    i_end = tl.minimum(i_begin + i_per_split, I)
    for i0 in range(i_begin, i_end, IC):
        Wc = _load_w_chunk(w_ptr, i0, I, J, D, Din, DT, DOT_DT, BLOCK_J, BLOCK_D, DINP, IC)
        U = _load_u_chunk(u_ptr, b0, B, i0, I, Din, ACC, BB, DINP, IC)
        logits, _ = _logits(V, Wc, U, prior_ptr, i0, I, J, True, HAS_PRIOR, INV_T, DT, DOT_DT, ACC,
                            PRECISION, BLOCK_J, BB, IC, DINP)
        c = _softmax_j(logits, J, LEAKY, BLOCK_J)
        TG = tl.dot(_op(gs, DT, DOT_DT), Wc, input_precision=PRECISION, out_dtype=ACC)
        gc = _per_capsule_sum(TG * U[None, :, :], BLOCK_J, BB, IC, DINP)
        gl = _logit_grad(c, gc, INV_T, ACC)
        X = _per_element(gl, BLOCK_J, BB, IC, DINP) * U[None, :, :]
        acc = tl.dot(_op(X, DT, DOT_DT), tl.trans(Wc, (0, 2, 1)), acc, input_precision=PRECISION,
                     out_dtype=ACC)
    _store_jbd(part_out_ptr + split * B * J * D, acc, b0, B, J, D, BB, BLOCK_J, BLOCK_D, 1)


@triton.jit
def _bwd_first_kernel(
    part_ptr, n_isplit, G_in_ptr, grad_v_ptr, s_ptr, gs_ptr, B, J, D,
    HAS_PART: tl.constexpr, HAS_G_IN: tl.constexpr, HAS_GV: tl.constexpr, ACC: tl.constexpr,
    TINY: tl.constexpr, BB: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``gs`` of the earliest iteration that carries gradient (the first; the last alone under
    ``detach_inner`` or with one iteration), from the last reduction sweep's partials."""
    b0 = tl.program_id(0) * BB
    _gs_of_iteration(part_ptr, n_isplit, G_in_ptr, G_in_ptr, grad_v_ptr, s_ptr, gs_ptr, b0,
                     1, B, J, D, HAS_PART, HAS_G_IN, HAS_GV, ACC, TINY, BB, BLOCK_J, BLOCK_D)


@triton.jit
def _store_prior_bias_grads(dprior_ptr, dbias_ptr, dp, db, i, split, split_stride, J, D,
                            NEED_DPRIOR: tl.constexpr, NEED_DBIAS: tl.constexpr,
                            BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """A gradient-sweep program's share of the prior gradient (``dp [BLOCK_J, 1]``, row ``i``)
    and, from the program of the first input capsule only, of the bias gradient
    (``db [BLOCK_J, BLOCK_D]``), into this split's rows (``split_stride`` apart)."""
    if NEED_DPRIOR:
        j = tl.arange(0, BLOCK_J)[:, None]
        tl.store(dprior_ptr + row_offset(split, split_stride) + i * J + j,
                 dp.to(dprior_ptr.dtype.element_ty), mask=j < J)
    if NEED_DBIAS:
        j = tl.arange(0, BLOCK_J)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        tl.store(dbias_ptr + row_offset(split, split_stride) + j * D + d,
                 db.to(dbias_ptr.dtype.element_ty), mask=(j < J) & (d < D) & ((j * 0 + i) == 0))


@triton.jit
def _grad_sweep_kernel(
    u_ptr, w_ptr, prior_ptr,
    V_all_ptr, gs_all_ptr,  # [R, B, J, D]
    du_ptr,  # [B, I, Din]
    dw_ptr, dprior_ptr, dbias_ptr,  # outputs, or this split's partials (rows split_stride apart)
    split_stride,
    B, I, J, D, Din, R, b_per_split,
    DETACH: tl.constexpr, HAS_PRIOR: tl.constexpr, LEAKY: tl.constexpr, INV_T: tl.constexpr,
    NEED_DU: tl.constexpr, NEED_DW: tl.constexpr, NEED_DPRIOR: tl.constexpr,
    NEED_DBIAS: tl.constexpr, ACC: tl.constexpr, DT: tl.constexpr, DOT_DT: tl.constexpr, PRECISION: tl.constexpr,
    BB: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, DINP: tl.constexpr,
):
    """The final backward sweep, all iterations at once, for one input capsule ``i`` and one
    split of the samples. Per tile of ``BB`` samples, with couplings (and ``gl``) recomputed
    from the saved ``V^r`` and ``gs^r`` (logits and ``gc`` as ``[BB x Dout] @ [Dout x Din]``
    dots),

        g_uhat_bij = sum_r c^r_bij gs^r_bj + gl^r_bij V^r_bj      ([BLOCK_J, BB, Dout], registers)
        du_bi      = sum_j g_uhat_bij @ W_ij                      (a batched dot, summed over j)
        dW_ij     += g_uhat_ij^T @ u_i                            (a batched dot over the samples)
        dp_ij     += sum_b gl^r_bij

    ``DETACH``: the last iteration's ``c gs`` only (``gl`` only for the prior). The W tile and
    the ``dW`` accumulator stay in registers over all the program's samples, so the sum over
    samples needs no atomics; the program of the first capsule also sums ``gs`` for the bias
    gradient."""
    i0 = tl.program_id(0)
    split = tl.program_id(1)
    Wc = _load_w_chunk(w_ptr, i0, I, J, D, Din, DT, DOT_DT, BLOCK_J, BLOCK_D, DINP, 1)
    dW = tl.zeros([BLOCK_J, BLOCK_D, DINP], dtype=ACC)
    dp = tl.zeros([BLOCK_J, 1], dtype=ACC)
    db = tl.zeros([BLOCK_J, BLOCK_D], dtype=ACC)
    if DETACH:
        r_begin = R - 1
    else:
        r_begin = 0
    b_begin = split * b_per_split
    b_end = tl.minimum(b_begin + b_per_split, B)
    for b0 in range(b_begin, b_end, BB):
        # Samples from b_end on belong to the next split: masked.
        U = _load_u_chunk(u_ptr, b0, b_end, i0, I, Din, ACC, BB, DINP, 1)
        g_uhat = tl.zeros([BLOCK_J, BB, BLOCK_D], dtype=ACC)
        for r in range(r_begin, R):
            V = _load_jbd(V_all_ptr + r * B * J * D, b0, b_end, J, D, ACC, BB, BLOCK_J, BLOCK_D)
            gs = _load_jbd(gs_all_ptr + r * B * J * D, b0, b_end, J, D, ACC, BB, BLOCK_J,
                            BLOCK_D)
            if NEED_DBIAS:
                db += tl.sum(gs, axis=1)
            logits, _ = _logits(V, Wc, U, prior_ptr, i0, I, J, True, HAS_PRIOR, INV_T, DT, DOT_DT, ACC,
                                PRECISION, BLOCK_J, BB, 1, DINP)
            c = _softmax_j(logits, J, LEAKY, BLOCK_J)  # [BLOCK_J, BB, 1]
            g_uhat += c * gs
            if (not DETACH) or NEED_DPRIOR:
                TG = tl.dot(_op(gs, DT, DOT_DT), Wc, input_precision=PRECISION, out_dtype=ACC)
                gc = tl.sum(TG * U[None, :, :], axis=2, keep_dims=True)
                gl = _logit_grad(c, gc, INV_T, ACC)
                if NEED_DPRIOR:
                    dp += tl.sum(gl, axis=1)
                if not DETACH:
                    g_uhat += gl * V
        if NEED_DU:
            du = tl.sum(tl.dot(_op(g_uhat, DT, DOT_DT), Wc, input_precision=PRECISION, out_dtype=ACC),
                        axis=0)
            k = tl.arange(0, DINP)[None, :]
            b = tl.arange(0, BB)[:, None]
            tl.store(du_ptr + row_offset(b0, I * Din) + i0 * Din + b * (I * Din) + k,
                     du.to(du_ptr.dtype.element_ty), mask=(b < b_end - b0) & (k < Din))
        if NEED_DW:
            Ub = _op(tl.broadcast_to(U[None, :, :], (BLOCK_J, BB, DINP)), DT, DOT_DT)
            dW = tl.dot(_op(tl.trans(g_uhat, (0, 2, 1)), DT, DOT_DT), Ub, dW, input_precision=PRECISION,
                        out_dtype=ACC)
    if NEED_DW:
        j = tl.arange(0, BLOCK_J)[:, None, None]
        d = tl.arange(0, BLOCK_D)[None, :, None]
        k = tl.arange(0, DINP)[None, None, :]
        tl.store(dw_ptr + row_offset(split, split_stride) + row_offset(i0, J * D * Din)
                 + (j * D + d) * Din + k, dW.to(dw_ptr.dtype.element_ty),
                 mask=(j < J) & (d < D) & (k < Din))
    _store_prior_bias_grads(dprior_ptr, dbias_ptr, dp, db, i0, split, split_stride, J, D,
                            NEED_DPRIOR, NEED_DBIAS, BLOCK_J, BLOCK_D)


@triton.jit
def _sum_splits_kernel(
    part_ptr, n_parts, part_stride,  # [n_parts, part_stride]: dW | dprior | dbias partials
    dw_ptr, n_w, dprior_ptr, n_prior, dbias_ptr, n_bias,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """Sum the per-split partials of the gradient sweep (fixed order) into the three outputs."""
    n = tl.cast(tl.program_id(0), tl.int64) * BLOCK + tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], dtype=ACC)
    mask = n < n_w + n_prior + n_bias
    for part in range(0, n_parts):
        total += tl.load(part_ptr + row_offset(part, part_stride) + n, mask=mask, other=0.0)
    tl.store(dw_ptr + n, total.to(dw_ptr.dtype.element_ty), mask=n < n_w)
    in_prior = (n >= n_w) & (n < n_w + n_prior)
    tl.store(dprior_ptr + tl.where(in_prior, n - n_w, 0), total.to(dprior_ptr.dtype.element_ty),
             mask=in_prior)
    in_bias = (n >= n_w + n_prior) & mask
    tl.store(dbias_ptr + tl.where(in_bias, n - n_w - n_prior, 0),
             total.to(dbias_ptr.dtype.element_ty), mask=in_bias)


# --------------------------------------------------------------------------------------------
# The u_hat-tile design: sweeps over one input capsule's prediction vectors at a time
# --------------------------------------------------------------------------------------------
# The same sweeps, launch plan, partial sums, squash and softmax as above, written on the
# ``[BLOCK_J, BB, BLOCK_D]`` tile of prediction vectors ``u_hat_bij`` of one input capsule
# ``i`` and ``BB`` samples: the logits ``<u_hat_ij, V_j>``, the sums ``sum_i c_ij u_hat_ij`` and
# the backward's ``g_u_hat`` are elementwise products and short sums over that tile. Where the
# tile comes from:
#
# * ``dynamic_routing`` (``FUSED`` false): loaded from the given ``u_hat [B, I, J, Dout]``,
#   read through its strides;
# * ``capsule_routing`` (``FUSED``, the ``"uhat"`` design of :class:`._gemm_core.Config`):
#   formed in registers by one 2-D tensor-core dot per step, ``u_bi [BB x KP] @ W_i^T
#   [KP x BLOCK_J*BLOCK_D]`` (``KP``: Din padded to at least 16), and never stored. The
#   gradient sweep's ``du = g_u_hat @ W_i`` and ``dW_i += g_u_hat^T @ u_i`` are 2-D dots too.
#
# Compared with the batched-dot design above (one small dot per output capsule, several per
# step, and sums over each capsule's Din), each step of the fused sweeps is one dot with
# N = J * Dout, and the gradient sweep forms ``u_hat`` once per sample tile instead of two
# dots per iteration.
@triton.jit
def _load_uhat(src_ptr, s_b, s_i, s_j, s_d, b0, b_limit, i, J, D, ACC: tl.constexpr,
               BB: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """``[BLOCK_J, BB, BLOCK_D]``: element ``(j, b, d)`` is ``u_hat[b0 + b, i, j, d]``, zero
    outside and for samples from ``b_limit`` on. The sample offset is 64-bit."""
    j = tl.arange(0, BLOCK_J)[:, None, None]
    b = tl.arange(0, BB)[None, :, None]
    d = tl.arange(0, BLOCK_D)[None, None, :]
    base = tl.cast(b0, tl.int64) * s_b + tl.cast(i, tl.int64) * s_i
    offs = tl.cast(b, tl.int64) * s_b + j * s_j + d * s_d
    mask = (j < J) & (b < b_limit - b0) & (d < D)
    return tl.load(src_ptr + base + offs, mask=mask, other=0.0).to(ACC)


@triton.jit
def _load_u_capsule(u_ptr, b0, b_limit, i, I, Din, BB: tl.constexpr, KP: tl.constexpr):
    """``[BB, KP]``: ``u[b0 + b, i, k]`` (u contiguous), zero outside."""
    b = tl.arange(0, BB)[:, None]
    k = tl.arange(0, KP)[None, :]
    return tl.load(u_ptr + row_offset(b0, I * Din) + i * Din + b * (I * Din) + k,
                   mask=(b < b_limit - b0) & (k < Din), other=0.0)


@triton.jit
def _load_w_capsule_t(w_ptr, i, J, D, Din, DT: tl.constexpr, DOT_DT: tl.constexpr,
                      KP: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """``[KP, BLOCK_J * BLOCK_D]``: element ``(k, j * BLOCK_D + d)`` is ``W[i, j, d, k]`` (W
    contiguous), zero outside: ``W_i`` transposed, as the right operand of the u_hat dot."""
    k = tl.arange(0, KP)[:, None]
    n = tl.arange(0, BLOCK_J * BLOCK_D)[None, :]
    j = n // BLOCK_D
    d = n % BLOCK_D
    return _op(tl.load(w_ptr + row_offset(i, J * D * Din) + (j * D + d) * Din + k,
                       mask=(j < J) & (d < D) & (k < Din), other=0.0), DT, DOT_DT)


@triton.jit
def _to_jbd(x, BB: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """``[BB, BLOCK_J * BLOCK_D]`` -> ``[BLOCK_J, BB, BLOCK_D]``."""
    return tl.permute(tl.reshape(x, (BB, BLOCK_J, BLOCK_D)), (1, 0, 2))


@triton.jit
def _from_jbd(x, BB: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """``[BLOCK_J, BB, BLOCK_D]`` -> ``[BB, BLOCK_J * BLOCK_D]``."""
    return tl.reshape(tl.permute(x, (1, 0, 2)), (BB, BLOCK_J * BLOCK_D))


@triton.jit
def _uhat_tile(src_ptr, w_ptr, s_b, s_i, s_j, s_d, b0, b_limit, i, I, J, D, Din,
               FUSED: tl.constexpr, ACC: tl.constexpr, DT: tl.constexpr, DOT_DT: tl.constexpr,
               PRECISION: tl.constexpr, BB: tl.constexpr, BLOCK_J: tl.constexpr,
               BLOCK_D: tl.constexpr, KP: tl.constexpr):
    """The ``[BLOCK_J, BB, BLOCK_D]`` prediction vectors of input capsule ``i`` for samples
    ``b0 ..`` (below ``b_limit``): loaded (``dynamic_routing``) or formed by the dot
    ``u_bi @ W_i^T`` (``FUSED``)."""
    if FUSED:
        U = _op(_load_u_capsule(src_ptr, b0, b_limit, i, I, Din, BB, KP), DT, DOT_DT)
        Wt = _load_w_capsule_t(w_ptr, i, J, D, Din, DT, DOT_DT, KP, BLOCK_J, BLOCK_D)
        uh = tl.dot(U, Wt, input_precision=PRECISION, out_dtype=ACC)
        return _to_jbd(uh, BB, BLOCK_J, BLOCK_D)
    return _load_uhat(src_ptr, s_b, s_i, s_j, s_d, b0, b_limit, i, J, D, ACC, BB, BLOCK_J,
                      BLOCK_D)


@triton.jit
def _uhat_logits(Uh, V, prior_ptr, i, I, J, HAS_V: tl.constexpr, HAS_PRIOR: tl.constexpr,
                 INV_T: tl.constexpr, ACC: tl.constexpr, BB: tl.constexpr,
                 BLOCK_J: tl.constexpr):
    """``(p_ij + <u_hat_bij, V_bj>) / T`` of one input capsule, ``[BLOCK_J, BB, 1]``."""
    if HAS_V:
        logits = tl.sum(Uh * V, axis=2, keep_dims=True)
    else:
        logits = tl.zeros([BLOCK_J, BB, 1], dtype=ACC)
    return _prior_and_temperature(logits, prior_ptr, i, I, J, HAS_PRIOR, INV_T, ACC, BLOCK_J, 1)


@triton.jit
def _fwd_uhat_sweep_kernel(
    src_ptr, w_ptr, s_b, s_i, s_j, s_d,  # u_hat [B, I, J, D] and its strides, or u and W
    prior_ptr, bias_ptr, part_in_ptr, part_out_ptr, s_all_ptr, V_all_ptr, c_ptr,
    r, B, I, J, D, Din, i_per_split, n_isplit,
    FUSED: tl.constexpr, FIRST: tl.constexpr, HAS_PRIOR: tl.constexpr, HAS_BIAS: tl.constexpr,
    LEAKY: tl.constexpr, STORE_C: tl.constexpr, INV_T: tl.constexpr, ACC: tl.constexpr,
    DT: tl.constexpr, DOT_DT: tl.constexpr, PRECISION: tl.constexpr, TINY: tl.constexpr,
    BB: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, KP: tl.constexpr,
):
    """:func:`_fwd_sweep_kernel` on u_hat tiles: finish iteration ``r - 1``
    (:func:`_begin_iteration`), then ``partial_j = sum_i c_ij u_hat_ij`` over this split's
    input capsules."""
    b0 = tl.program_id(0) * BB
    split = tl.program_id(1)
    V = _begin_iteration(part_in_ptr, bias_ptr, s_all_ptr, V_all_ptr, r, b0, split, B, J, D,
                         n_isplit, FIRST, HAS_BIAS, ACC, TINY, BB, BLOCK_J, BLOCK_D)
    acc = tl.zeros([BLOCK_J, BB, BLOCK_D], dtype=ACC)
    i_begin = split * i_per_split
    i_end = tl.minimum(i_begin + i_per_split, I)
    for i in range(i_begin, i_end):
        Uh = _uhat_tile(src_ptr, w_ptr, s_b, s_i, s_j, s_d, b0, B, i, I, J, D, Din, FUSED, ACC,
                        DT, DOT_DT, PRECISION, BB, BLOCK_J, BLOCK_D, KP)
        if FIRST and not HAS_PRIOR:
            # All logits zero: uniform couplings (leaky: one more zero logit).
            acc += Uh / (J + LEAKY)
        else:
            logits = _uhat_logits(Uh, V, prior_ptr, i, I, J, not FIRST, HAS_PRIOR, INV_T, ACC, BB,
                                  BLOCK_J)
            c = _softmax_j(logits, J, LEAKY, BLOCK_J)
            if STORE_C:
                j = tl.arange(0, BLOCK_J)[:, None, None]
                b = tl.arange(0, BB)[None, :, None]
                tl.store(c_ptr + row_offset(b0, I * J) + i * J + row_offset(b, I * J) + j,
                         c.to(c_ptr.dtype.element_ty), mask=(j < J) & (b < B - b0))
            acc += c * Uh
    _store_jbd(part_out_ptr + split * B * J * D, acc, b0, B, J, D, BB, BLOCK_J, BLOCK_D, 1)


@triton.jit
def _bwd_uhat_sweep_kernel(
    src_ptr, w_ptr, s_b, s_i, s_j, s_d, prior_ptr,
    part_in_ptr, part_out_ptr, G_in_ptr, G_out_ptr, grad_v_ptr, s_ptr, V_ptr, gs_ptr,
    B, I, J, D, Din, i_per_split, n_isplit,
    FUSED: tl.constexpr, HAS_PART: tl.constexpr, HAS_G_IN: tl.constexpr, HAS_GV: tl.constexpr,
    HAS_PRIOR: tl.constexpr, LEAKY: tl.constexpr, INV_T: tl.constexpr, ACC: tl.constexpr,
    DT: tl.constexpr, DOT_DT: tl.constexpr, PRECISION: tl.constexpr, TINY: tl.constexpr,
    BB: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, KP: tl.constexpr,
):
    """:func:`_bwd_sweep_kernel` on u_hat tiles: ``gs^r``, then
    ``D_j = sum_i gl_ij u_hat_ij`` with ``gc_ij = <gs_j, u_hat_ij>``,
    ``gl = c (gc - sum_j c gc) / T``."""
    b0 = tl.program_id(0) * BB
    split = tl.program_id(1)
    gs = _gs_of_iteration(part_in_ptr, n_isplit, G_in_ptr, G_out_ptr, grad_v_ptr, s_ptr, gs_ptr,
                          b0, (split == 0).to(tl.int32), B, J, D, HAS_PART, HAS_G_IN, HAS_GV,
                          ACC, TINY, BB, BLOCK_J, BLOCK_D)
    V = _load_jbd(V_ptr, b0, B, J, D, ACC, BB, BLOCK_J, BLOCK_D)
    acc = tl.zeros([BLOCK_J, BB, BLOCK_D], dtype=ACC)
    i_begin = split * i_per_split
    i_end = tl.minimum(i_begin + i_per_split, I)
    for i in range(i_begin, i_end):
        Uh = _uhat_tile(src_ptr, w_ptr, s_b, s_i, s_j, s_d, b0, B, i, I, J, D, Din, FUSED, ACC,
                        DT, DOT_DT, PRECISION, BB, BLOCK_J, BLOCK_D, KP)
        logits = _uhat_logits(Uh, V, prior_ptr, i, I, J, True, HAS_PRIOR, INV_T, ACC, BB,
                              BLOCK_J)
        c = _softmax_j(logits, J, LEAKY, BLOCK_J)
        gc = tl.sum(Uh * gs, axis=2, keep_dims=True)
        gl = _logit_grad(c, gc, INV_T, ACC)
        acc += gl * Uh
    _store_jbd(part_out_ptr + split * B * J * D, acc, b0, B, J, D, BB, BLOCK_J, BLOCK_D, 1)


@triton.jit
def _grad_uhat_sweep_kernel(
    src_ptr, w_ptr, s_b, s_i, s_j, s_d, prior_ptr,
    V_all_ptr, gs_all_ptr,  # [R, B, J, D]
    dsrc_ptr,  # [B, I, J, D] contiguous: the gradient wrt u_hat; FUSED: du [B, I, Din]
    dw_ptr, dprior_ptr, dbias_ptr,  # outputs, or this split's partials (rows split_stride apart)
    split_stride,
    B, I, J, D, Din, R, b_per_split,
    FUSED: tl.constexpr, DETACH: tl.constexpr, HAS_PRIOR: tl.constexpr, LEAKY: tl.constexpr,
    INV_T: tl.constexpr, NEED_DSRC: tl.constexpr, NEED_DW: tl.constexpr,
    NEED_DPRIOR: tl.constexpr, NEED_DBIAS: tl.constexpr, ACC: tl.constexpr, DT: tl.constexpr,
    DOT_DT: tl.constexpr, PRECISION: tl.constexpr, BB: tl.constexpr, BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr, KP: tl.constexpr,
):
    """:func:`_grad_sweep_kernel` on u_hat tiles, for input capsule ``program_id(0)`` and one
    split of the samples: per sample tile, with ``u_hat`` loaded or formed once,
    ``g_u_hat_bij = sum_r c^r_bij gs^r_bj + gl^r_bij V^r_bj`` (``DETACH``: the last
    iteration's first term only); ``dp_ij = sum_b sum_r gl^r_bij``; in the program of the
    first capsule ``d bias = sum_b sum_r gs^r_b``. ``FUSED``: ``du_bi = g_u_hat_bi @ W_i`` and
    ``dW_i += g_u_hat_i^T @ u_i`` (2-D dots; the ``dW`` accumulator stays in registers over
    the program's samples), else ``g_u_hat`` itself is the gradient written."""
    i = tl.program_id(0)
    split = tl.program_id(1)
    dp = tl.zeros([BLOCK_J, 1], dtype=ACC)
    db = tl.zeros([BLOCK_J, BLOCK_D], dtype=ACC)
    if FUSED:
        Wt = _load_w_capsule_t(w_ptr, i, J, D, Din, DT, DOT_DT, KP, BLOCK_J, BLOCK_D)
        dWt = tl.zeros([BLOCK_J * BLOCK_D, KP], dtype=ACC)
    if DETACH:
        r_begin = R - 1
    else:
        r_begin = 0
    b_begin = split * b_per_split
    b_end = tl.minimum(b_begin + b_per_split, B)
    for b0 in range(b_begin, b_end, BB):
        if FUSED:
            U = _op(_load_u_capsule(src_ptr, b0, b_end, i, I, Din, BB, KP), DT, DOT_DT)
            Uh = _to_jbd(tl.dot(U, Wt, input_precision=PRECISION, out_dtype=ACC), BB, BLOCK_J,
                         BLOCK_D)
        else:
            Uh = _load_uhat(src_ptr, s_b, s_i, s_j, s_d, b0, b_end, i, J, D, ACC, BB, BLOCK_J,
                            BLOCK_D)
        g = tl.zeros([BLOCK_J, BB, BLOCK_D], dtype=ACC)
        for r in range(r_begin, R):
            V = _load_jbd(V_all_ptr + r * B * J * D, b0, b_end, J, D, ACC, BB, BLOCK_J, BLOCK_D)
            gs = _load_jbd(gs_all_ptr + r * B * J * D, b0, b_end, J, D, ACC, BB, BLOCK_J,
                           BLOCK_D)
            if NEED_DBIAS:
                db += tl.sum(gs, axis=1)
            logits = _uhat_logits(Uh, V, prior_ptr, i, I, J, True, HAS_PRIOR, INV_T, ACC, BB,
                                  BLOCK_J)
            c = _softmax_j(logits, J, LEAKY, BLOCK_J)
            g += c * gs
            if (not DETACH) or NEED_DPRIOR:
                gc = tl.sum(Uh * gs, axis=2, keep_dims=True)
                gl = _logit_grad(c, gc, INV_T, ACC)
                if NEED_DPRIOR:
                    dp += tl.sum(gl, axis=1)
                if not DETACH:
                    g += gl * V
        if FUSED:
            if NEED_DSRC or NEED_DW:
                g2 = _op(_from_jbd(g, BB, BLOCK_J, BLOCK_D), DT, DOT_DT)  # [BB, BLOCK_J*BLOCK_D]
            if NEED_DSRC:
                du = tl.dot(g2, tl.trans(Wt), input_precision=PRECISION, out_dtype=ACC)
                b = tl.arange(0, BB)[:, None]
                k = tl.arange(0, KP)[None, :]
                tl.store(dsrc_ptr + row_offset(b0, I * Din) + i * Din + b * (I * Din) + k,
                         du.to(dsrc_ptr.dtype.element_ty), mask=(b < b_end - b0) & (k < Din))
            if NEED_DW:
                dWt = tl.dot(tl.trans(g2), U, dWt, input_precision=PRECISION, out_dtype=ACC)
        elif NEED_DSRC:
            j = tl.arange(0, BLOCK_J)[:, None, None]
            b = tl.arange(0, BB)[None, :, None]
            d = tl.arange(0, BLOCK_D)[None, None, :]
            base = row_offset(b0, I * J * D) + row_offset(i, J * D)
            tl.store(dsrc_ptr + base + row_offset(b, I * J * D) + j * D + d,
                     g.to(dsrc_ptr.dtype.element_ty), mask=(j < J) & (b < b_end - b0) & (d < D))
    if FUSED:
        if NEED_DW:
            n = tl.arange(0, BLOCK_J * BLOCK_D)[:, None]
            k = tl.arange(0, KP)[None, :]
            j = n // BLOCK_D
            d = n % BLOCK_D
            tl.store(dw_ptr + row_offset(split, split_stride) + row_offset(i, J * D * Din)
                     + (j * D + d) * Din + k, dWt.to(dw_ptr.dtype.element_ty),
                     mask=(j < J) & (d < D) & (k < Din))
    _store_prior_bias_grads(dprior_ptr, dbias_ptr, dp, db, i, split, split_stride, J, D,
                            NEED_DPRIOR, NEED_DBIAS, BLOCK_J, BLOCK_D)
