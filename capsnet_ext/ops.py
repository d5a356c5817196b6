"""Public functional ops: check the inputs, choose a backend, run it.

``squash`` runs in PyTorch; ``predict``, ``dynamic_routing`` and ``capsule_routing`` take
``backend="auto" | "reference" | "triton" | "cuda"`` (see :mod:`capsnet_ext.dispatch` for how
``"auto"`` chooses). Inputs are checked here, before dispatch, so every backend raises the same
``TypeError`` / ``ValueError`` for the same bad input, naming the argument.
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

    Keeps the direction of each vector and maps its length ``|s|`` to ``|s|^2 / (1 + |s|^2)``,
    in ``[0, 1)``. The value and the gradient are finite at ``s = 0`` (``|s|^2`` is clamped at
    the dtype's smallest normal number before the square root). float16/bfloat16 inputs are
    squashed in float32 and cast back. Elementwise-cheap, so it always runs in PyTorch (the
    kernel backends fuse it inside routing instead); there is no ``backend`` argument.

    Args:
        s (Tensor): floating-point tensor of any shape with at least one element.
        dim (int, optional): the dimension holding the capsule vectors. Default: ``-1``.

    Returns:
        Tensor: ``v``, the same shape, dtype and device as ``s``.

    Raises:
        TypeError: ``s`` is not a floating-point ``torch.Tensor``.
        ValueError: ``s`` is empty.

    Example::

        >>> import torch, capsnet_ext
        >>> v = capsnet_ext.squash(torch.randn(2, 10, 16))
        >>> v.shape
        torch.Size([2, 10, 16])
        >>> bool((v.norm(dim=-1) < 1).all())
        True
    """
    check_float_tensor("s", s)
    return reference.squash(s, dim)


def predict(u: torch.Tensor, W: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Prediction vectors of every (input capsule, output capsule) pair.

    Computes ``u_hat[b, i, j] = W[i, j] @ u[b, i]``: each of the ``I`` input capsules has its
    own ``Dout x Din`` matrix for each of the ``J`` output capsules. This is the first half of
    :func:`capsule_routing`; use that op to route, since the kernel backends then never store
    ``u_hat``. Differentiable with respect to ``u`` and ``W`` on every backend.

    Args:
        u (Tensor): input capsules ``[B, I, Din]``, float16, bfloat16, float32 or float64.
        W (Tensor): transformation matrices ``[I, J, Dout, Din]``, with the dtype and device
            of ``u``.
        backend (str, optional): the implementation, keyword only. Default: ``"auto"``.

            * ``"auto"``: the backend ``$CAPSNET_EXT_BACKEND`` names, when set (as if
              passed here); otherwise, for CUDA tensors, the first of ``"cuda"``,
              ``"triton"``, ``"reference"`` that is available and supports the call, and for
              CPU tensors ``"reference"``: then it never fails for want of a kernel.
            * ``"reference"``: pure PyTorch (``einsum``), any device, autograd backward.
            * ``"triton"``: a Triton kernel with a custom backward; CUDA GPUs (on the CPU
              only inside Triton's interpreter, ``TRITON_INTERPRET=1``, a testing tool).
            * ``"cuda"``: the compiled CUDA extension (``torch.ops.capsnet_ext``); CUDA GPUs
              whose model has passed the project's GPU check (see
              :func:`capsnet_ext.backend_status`).

    Returns:
        Tensor: ``u_hat`` of shape ``[B, I, J, Dout]``, with the dtype and device of ``u``.

    Raises:
        TypeError: ``u`` or ``W`` is not a floating-point tensor, or their dtypes differ.
        ValueError: a wrong number of dimensions, an empty tensor, ``W.shape[0] != I`` or
            ``W.shape[3] != Din``, tensors on different devices, or an unknown ``backend``
            name.
        BackendUnavailableError: (a ``RuntimeError``) the named ``backend`` cannot run on
            ``u``'s device (the message says why).
        NotImplementedError: the named ``backend`` does not support this call (e.g. the
            dtype).

    Example::

        >>> import torch, capsnet_ext
        >>> u = torch.randn(2, 6, 4)        # B=2, I=6 input capsules of Din=4
        >>> W = torch.randn(6, 3, 8, 4)     # J=3 output capsules of Dout=8
        >>> capsnet_ext.predict(u, W).shape
        torch.Size([2, 6, 3, 8])
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
    """Routing by agreement (Sabour, Frosst & Hinton 2017) over given prediction vectors.

    The routing logits start at zero (or at ``prior``) for every sample. Each iteration takes
    the couplings ``c = softmax over j of (prior + agreement) / temperature``, the weighted
    sums ``s_j = sum_i c_ij u_hat_ij (+ bias_j)`` and the output capsules
    ``v_j = squash(s_j)``; after every iteration but the last the agreement
    ``<u_hat_ij, v_j>`` is added to the logits. Semantics follow the official TensorFlow code.
    Differentiable with respect to ``u_hat``, ``bias`` and ``prior`` on every backend. To
    route from input capsules and weights, prefer :func:`capsule_routing`, which the kernel
    backends fuse without storing ``u_hat``.

    Args:
        u_hat (Tensor): prediction vectors ``[B, I, J, Dout]`` (e.g. from :func:`predict`),
            float16, bfloat16, float32 or float64.
        iterations (int, optional): number of routing iterations (weighted sums), ``>= 1``.
            Default: ``3``. (Mitterreiter et al.'s ``n_iter = 3`` is ``iterations=4``.)
        bias (Tensor, optional): ``[J, Dout]``, added to ``s`` before the squash in every
            iteration; same dtype and device as ``u_hat``. Default: ``None``.
        leaky (bool, optional): add a zero "none of the above" logit to each softmax over
            ``j``; its coupling is dropped, so each row of ``c`` sums to less than 1.
            Default: ``False``.
        detach_inner (bool, optional): let gradient reach ``u_hat`` (and ``bias``) only
            through the last iteration's weighted sum, the couplings treated as constants
            (``prior`` then gets gradient only through the last coupling). The default
            backpropagates through every iteration, as the official code does.
            Default: ``False``.
        return_coupling (bool, optional): also return the last iteration's couplings.
            Default: ``False``.
        prior (Tensor, optional): ``[I, J]`` logits shared by all samples, added to the logits
            before every softmax (Mitterreiter et al.'s learned prior; it receives gradient).
            Same dtype and device as ``u_hat``. Default: ``None`` (zero).
        temperature (float, optional): softmax temperature ``T``, a finite number ``> 0``:
            ``c = softmax((prior + agreement) / T)``. Default: ``1.0``.
        backend (str, optional): the implementation, keyword only. Default: ``"auto"``.

            * ``"auto"``: the backend ``$CAPSNET_EXT_BACKEND`` names, when set (as if
              passed here); otherwise, for CUDA tensors, the first of ``"cuda"``,
              ``"triton"``, ``"reference"`` that is available and supports the call, and for
              CPU tensors ``"reference"``: then it never fails for want of a kernel.
            * ``"reference"``: pure PyTorch (:mod:`capsnet_ext.reference`), any device,
              autograd backward; the specification the other backends are tested against.
            * ``"triton"``: Triton kernels with a custom backward, every option; CUDA GPUs (on
              the CPU only inside Triton's interpreter, ``TRITON_INTERPRET=1``, a testing
              tool). float16/bfloat16 are computed in float32, float64 in float64; TF32
              settings do not apply (no matrix products). Refuses ``J, Dout`` whose padded
              per-capsule ``[J, Dout]`` slice does not fit the kernels' registers
              (``"auto"`` then falls back).
            * ``"cuda"``: the compiled CUDA extension (``torch.ops.capsnet_ext``), every
              option; CUDA GPUs whose model has passed the project's GPU check (see
              :func:`capsnet_ext.backend_status`). Accumulates float16/bfloat16/float32 in
              float32, float64 in float64.

    Returns:
        Tensor or tuple: ``v`` of shape ``[B, J, Dout]`` (each capsule's length in
        ``[0, 1)``), with the dtype and device of ``u_hat``; with ``return_coupling=True``
        the tuple ``(v, c)``, ``c`` of shape ``[B, I, J]``: the last iteration's couplings,
        detached (for inspection), without the leaky column.

    Raises:
        TypeError: a tensor argument is not a floating-point tensor or has another dtype than
            ``u_hat``; ``iterations`` is not an int; ``temperature`` is not a number.
        ValueError: a wrong shape (``u_hat`` not 4-D, ``bias`` not ``[J, Dout]``, ``prior``
            not ``[I, J]``), an empty tensor, tensors on different devices,
            ``iterations < 1``, ``temperature`` not finite and ``> 0``, or an unknown
            ``backend`` name (also from a bad ``$CAPSNET_EXT_BACKEND``).
        BackendUnavailableError: (a ``RuntimeError``) the named ``backend`` cannot run on
            ``u_hat``'s device (the message says why).
        NotImplementedError: the named ``backend`` does not support this call (dtype or
            capsule sizes; the message says why).
        RuntimeError: from the ``"cuda"`` backend (named, or chosen by ``"auto"``) when the
            capsule sizes need more shared memory than the GPU allows (the message gives the
            numbers and suggests another backend).

    Example::

        >>> import torch, capsnet_ext
        >>> u_hat = torch.randn(2, 6, 3, 8)   # B=2, I=6, J=3, Dout=8
        >>> v = capsnet_ext.dynamic_routing(u_hat, 3)
        >>> v.shape
        torch.Size([2, 3, 8])
        >>> v, c = capsnet_ext.dynamic_routing(u_hat, 3, leaky=True, return_coupling=True,
        ...                                    backend="reference")
        >>> c.shape
        torch.Size([2, 6, 3])
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
    """A fully connected capsule layer: prediction and routing by agreement as one fused op.

    Equal to ``dynamic_routing(predict(u, W), iterations, ...)``: each input capsule predicts
    each output capsule, ``u_hat[b, i, j] = W[i, j] @ u[b, i]``, and :func:`dynamic_routing`
    routes those predictions. The kernel backends recompute ``u_hat`` from ``u`` and ``W`` in
    every pass instead of storing it, forward and backward; the reference materialises it.
    Differentiable with respect to ``u``, ``W``, ``bias`` and ``prior`` on every backend.
    :class:`capsnet_ext.nn.RoutingCapsules` is this op as a module.

    Args:
        u (Tensor): input capsules ``[B, I, Din]``, float16, bfloat16, float32 or float64.
        W (Tensor): transformation matrices ``[I, J, Dout, Din]``, with the dtype and device
            of ``u``.
        iterations (int, optional): number of routing iterations (weighted sums), ``>= 1``.
            Default: ``3``. (Mitterreiter et al.'s ``n_iter = 3`` is ``iterations=4``.)
        bias (Tensor, optional): ``[J, Dout]``, added to ``s`` before the squash in every
            iteration; same dtype and device as ``u``. Default: ``None``.
        leaky (bool, optional): add a zero "none of the above" logit to each softmax over
            ``j``; its coupling is dropped, so each row of ``c`` sums to less than 1.
            Default: ``False``.
        detach_inner (bool, optional): let gradient reach ``u``, ``W`` (and ``bias``) only
            through the last iteration's weighted sum, the couplings treated as constants
            (``prior`` then gets gradient only through the last coupling). The default
            backpropagates through every iteration, as the official code does.
            Default: ``False``.
        return_coupling (bool, optional): also return the last iteration's couplings.
            Default: ``False``.
        prior (Tensor, optional): ``[I, J]`` logits shared by all samples, added to the logits
            before every softmax (Mitterreiter et al.'s learned prior; it receives gradient).
            Same dtype and device as ``u``. Default: ``None`` (zero).
        temperature (float, optional): softmax temperature ``T``, a finite number ``> 0``:
            ``c = softmax((prior + agreement) / T)``. Default: ``1.0``.
        backend (str, optional): the implementation, keyword only. Default: ``"auto"``.

            * ``"auto"``: the backend ``$CAPSNET_EXT_BACKEND`` names, when set (as if
              passed here); otherwise, for CUDA tensors, the first of ``"cuda"``,
              ``"triton"``, ``"reference"`` that is available and supports the call, and for
              CPU tensors ``"reference"``: then it never fails for want of a kernel.
            * ``"reference"``: pure PyTorch (:mod:`capsnet_ext.reference`), any device,
              autograd backward; stores ``u_hat``. The specification the other backends are
              tested against.
            * ``"triton"``: fused Triton kernels (tensor-core GEMM tiles, ``u_hat`` never
              formed) with a custom backward, every option; CUDA GPUs (on the CPU only inside
              Triton's interpreter, ``TRITON_INTERPRET=1``, a testing tool). float16/bfloat16
              run on tensor cores with float32 accumulation; float32 products use IEEE
              precision unless PyTorch allows TF32 for float32 matmuls
              (``torch.backends.cuda.matmul.fp32_precision = "tf32"`` or ``allow_tf32``),
              then TF32; float64 runs in float64. Refuses capsules whose padded
              ``[J, Dout, Din]`` slice of ``W`` does not fit the kernels' shared memory
              (``"auto"`` then falls back).
            * ``"cuda"``: the compiled CUDA extension (``torch.ops.capsnet_ext``), every
              option; CUDA GPUs whose model has passed the project's GPU check (see
              :func:`capsnet_ext.backend_status`). Accumulates float16/bfloat16/float32 in
              float32, float64 in float64.

    Returns:
        Tensor or tuple: ``v`` of shape ``[B, J, Dout]`` (each capsule's length in
        ``[0, 1)``), with the dtype and device of ``u``; with ``return_coupling=True`` the
        tuple ``(v, c)``, ``c`` of shape ``[B, I, J]``: the last iteration's couplings,
        detached (for inspection), without the leaky column.

    Raises:
        TypeError: a tensor argument is not a floating-point tensor or has another dtype than
            ``u``; ``iterations`` is not an int; ``temperature`` is not a number.
        ValueError: a wrong shape (``u`` not ``[B, I, Din]``, ``W`` not ``[I, J, Dout, Din]``
            with ``u``'s ``I`` and ``Din``, ``bias`` not ``[J, Dout]``, ``prior`` not
            ``[I, J]``), an empty tensor, tensors on different devices, ``iterations < 1``,
            ``temperature`` not finite and ``> 0``, or an unknown ``backend`` name (also from
            a bad ``$CAPSNET_EXT_BACKEND``).
        BackendUnavailableError: (a ``RuntimeError``) the named ``backend`` cannot run on
            ``u``'s device (the message says why).
        NotImplementedError: the named ``backend`` does not support this call (dtype or
            capsule sizes; the message says why).
        RuntimeError: from the ``"cuda"`` backend (named, or chosen by ``"auto"``) when the
            capsule sizes need more shared memory than the GPU allows (the message gives the
            numbers and suggests another backend).

    Example::

        >>> import torch, capsnet_ext
        >>> u = torch.randn(2, 6, 4)              # B=2, I=6 input capsules of Din=4
        >>> W = 0.1 * torch.randn(6, 3, 8, 4)     # J=3 output capsules of Dout=8
        >>> v = capsnet_ext.capsule_routing(u, W, 3, bias=torch.zeros(3, 8))
        >>> v.shape
        torch.Size([2, 3, 8])
        >>> v, c = capsnet_ext.capsule_routing(u, W, 3, return_coupling=True,
        ...                                    prior=torch.zeros(6, 3), temperature=0.5,
        ...                                    backend="reference")
        >>> c.shape
        torch.Size([2, 6, 3])
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
