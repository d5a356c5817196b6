"""Triton backend of capsnet_ext (name ``"triton"`` in :mod:`capsnet_ext.dispatch`).

* :mod:`.predict`: ``u_hat = W @ u`` forward, ``du`` and ``dW``, as 2-D tensor-core dots per
  input capsule.
* :mod:`.routing`: the routing loop over given ``u_hat`` fused into sweeps over the input
  capsules, with a custom backward: the same sweeps, plan and launchers as the fused op
  (:mod:`._gemm_core`), with elementwise products where the fused op has dots.
* :mod:`.capsule_routing`: prediction and routing fused as tensor-core GEMM tiles; ``u_hat`` is
  never formed (kernels in :mod:`._gemm_kernels`, launchers and autograd in :mod:`._gemm_core`).
  ``R + 1`` launches forward, at most ``R + 3`` backward, no atomics.

Runs on CUDA tensors, and on CPU tensors only under Triton's interpreter
(``TRITON_INTERPRET=1`` set before triton is imported), a testing tool. Every option of the API
is supported for float16, bfloat16, float32 and float64 (the learned ``prior`` and the softmax
``temperature`` included). Precision: ``capsule_routing`` and ``predict`` feed
float16 and bfloat16 operands to tensor cores with float32 accumulation; their float32 dots are
exact-input (``"ieee"``) unless PyTorch allows TF32 for float32 matmuls, then TF32.
``dynamic_routing`` uses no ``tl.dot`` (its products are elementwise). float32 math elsewhere is the GPU's, not IEEE-exact: ``exp`` and
``sqrt`` compile to approximate instructions, divisions to ``div.full``, multiply-adds are fused
(``enable_fp_fusion=True``, passed explicitly). float64 is float64 throughout. The
interpreter models none of TF32, approximate math or fused multiply-adds.

Eager calls run ``torch.autograd.Function``s over the kernels. Under ``torch.compile`` the same
launchers are used through registered operators (``torch.ops.capsnet_ext_triton.*``, with fake
implementations and autograd formulas), so ``fullgraph=True`` works. Gradients are first
order only (the backward passes are not themselves differentiable).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

NAME = "triton"

_SUPPORTED_OPS = ("predict", "dynamic_routing", "capsule_routing")
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

try:
    import triton  # noqa: F401

    _IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # the package must import without triton
    _IMPORT_ERROR = f"triton is not importable ({type(exc).__name__}: {exc}); pip install triton"

if _IMPORT_ERROR is None:
    from .capsule_routing import capsule_routing
    from .predict import predict
    from .routing import dynamic_routing
else:
    def _missing(*args, **kwargs):
        raise RuntimeError(f"the Triton backend is unavailable: {_IMPORT_ERROR}")

    predict = dynamic_routing = capsule_routing = _missing


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def availability(device) -> Optional[str]:
    """``None`` when the Triton kernels can run on tensors of ``device``, else why not."""
    device = torch.device(device)
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if device.type == "cuda":
        if interpreter_enabled():
            return ("TRITON_INTERPRET=1 is set, so Triton runs kernels in its CPU interpreter, "
                    "which cannot take CUDA tensors; unset it before triton is imported")
        if not torch.cuda.is_available():
            return "no CUDA GPU is available to this PyTorch build"
        return None
    if device.type == "cpu":
        if interpreter_enabled():
            return None
        return ("Triton kernels need a CUDA GPU; on the CPU they run only in Triton's "
                "interpreter, a testing tool: set TRITON_INTERPRET=1 before triton is imported")
    return f"Triton kernels run on CUDA devices, not on {device.type}"


def unsupported_reason(op: str, *, dtype: torch.dtype, iterations: int = 1, bias: bool = False,
                       leaky: bool = False, detach_inner: bool = False,
                       return_coupling: bool = False, prior: bool = False,
                       temperature: float = 1.0,
                       sizes: Optional[dict] = None) -> Optional[str]:
    """``None`` when ``op`` with these options is implemented: every option of
    ``dynamic_routing`` and ``capsule_routing`` (prior and temperature included), for capsules
    whose padded ``[J, Dout(, Din)]`` slice fits the kernels' registers (``sizes`` gives J,
    Dout and, for ``capsule_routing``, Din)."""
    if op not in _SUPPORTED_OPS:
        return f"unknown op {op!r}; the Triton backend implements {_SUPPORTED_OPS}"
    if dtype not in _SUPPORTED_DTYPES:
        return f"dtype {dtype} is not supported; expected one of {_SUPPORTED_DTYPES}"
    if sizes is not None and op != "predict" and _IMPORT_ERROR is None:
        if op == "capsule_routing":
            from ._gemm_core import capsule_size_limit_reason

            return capsule_size_limit_reason(sizes["J"], sizes["Dout"], sizes["Din"], dtype)
        from ._gemm_core import given_size_limit_reason

        return given_size_limit_reason(sizes["J"], sizes["Dout"])
    return None


__all__ = ["availability", "unsupported_reason", "predict", "dynamic_routing", "capsule_routing"]
