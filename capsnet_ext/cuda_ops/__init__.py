"""CUDA backend of capsnet_ext (name ``"cuda"`` in :mod:`capsnet_ext.dispatch`).

* :mod:`.predict`: ``u_hat = W @ u`` and its gradients.
* :mod:`.routing`: ``dynamic_routing`` over a given ``u_hat`` and the fused
  ``capsule_routing``, which recomputes ``u_hat`` in every sweep, forward and backward, and
  never stores it.
* :mod:`._schema`: op schemas, fake implementations, autograd registration.
* :mod:`._build`: loading the built extension or compiling it just in time.

The kernels are C++/CUDA (``csrc/``) registered as ``torch.ops.capsnet_ext.*`` through
``TORCH_LIBRARY``, so ``torch.compile`` traces them without graph breaks. Every option of the
API (the learned ``prior`` and the softmax ``temperature`` included) is supported for float16,
bfloat16, float32 (float32 accumulation) and float64.

Availability needs, in this order: a CUDA tensor and GPU; a record in ``verified.json`` that
the GPU test suite passed on this GPU model (or ``CAPSNET_EXT_CUDA_UNVERIFIED=1``, set by
whoever runs that verification); and the compiled ops (built, or compiled just in time). Only
``benchmarks.fold_gpu_check`` writes ``verified.json``, from a GPU check whose every
verification step passed.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from ._build import load as _load_ops
from .predict import predict
from .routing import capsule_routing, dynamic_routing

NAME = "cuda"
UNVERIFIED_ENV = "CAPSNET_EXT_CUDA_UNVERIFIED"
VERIFIED_RECORDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "verified.json")

_SUPPORTED_OPS = ("predict", "dynamic_routing", "capsule_routing")
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

__all__ = ["NAME", "availability", "unsupported_reason", "predict", "dynamic_routing", "capsule_routing",
           "verification_records", "verification_failures"]


def verification_records() -> list:
    """The GPUs on which the CUDA test suite passed (``verified.json``)."""
    try:
        with open(VERIFIED_RECORDS) as f:
            return list(json.load(f).get("records", []))
    except (OSError, ValueError):
        return []


HOW_TO_VERIFY = ("run `bash benchmarks/gpu_check.sh` on that GPU and fold its archive back with "
                 "`python -m benchmarks.fold_gpu_check ARCHIVE`")


def verification_failures() -> list:
    """GPU checks that failed (``verified.json``'s ``failures``: device, commit, date, and each
    failed step by name), written by ``benchmarks.fold_gpu_check``."""
    try:
        with open(VERIFIED_RECORDS) as f:
            return list(json.load(f).get("failures", []))
    except (OSError, ValueError):
        return []


def _last_failure(name: str) -> str:
    failed = [f for f in verification_failures() if f.get("device") == name]
    if not failed:
        return ""
    last = max(failed, key=lambda f: str(f.get("date", "")))
    return (f"; its last GPU check on {name} ({last.get('date')}, commit {last.get('commit')}) failed: "
            + "; ".join(last.get("failures", [])[:3]))


def _verification_reason(device: torch.device) -> Optional[str]:
    if os.environ.get(UNVERIFIED_ENV) == "1":
        return None
    records = verification_records()
    name = torch.cuda.get_device_name(device)
    if not records:
        return ("its GPU test suite has not passed on any GPU yet (no record in "
                f"capsnet_ext/cuda_ops/verified.json){_last_failure(name)}; {HOW_TO_VERIFY}, or set "
                f"{UNVERIFIED_ENV}=1 to use it unverified")
    if not any(r.get("device") == name for r in records):
        seen = sorted({r.get("device", "?") for r in records})
        return (f"its GPU test suite has passed on {seen} but not on {name!r}{_last_failure(name)}; "
                f"{HOW_TO_VERIFY}, or set {UNVERIFIED_ENV}=1 to use it unverified")
    return None


_availability_cache: dict = {}


def availability(device) -> Optional[str]:
    """``None`` when the CUDA kernels can run on tensors of ``device``, else why not.

    The answer is cached per device (and setting of the override), so that calls from code
    being traced by ``torch.compile`` after the first eager call are a dictionary read."""
    device = torch.device(device)
    key = (str(device), os.environ.get(UNVERIFIED_ENV))
    if key not in _availability_cache:
        _availability_cache[key] = _availability(device)
    return _availability_cache[key]


def _availability(device: torch.device) -> Optional[str]:
    if device.type != "cuda" or not torch.cuda.is_available():
        reason = (f"the CUDA backend runs on CUDA tensors only, got device {device.type!r}"
                  if device.type != "cuda" else "no CUDA GPU is available (torch.cuda.is_available() is False)")
        if not verification_records() and os.environ.get(UNVERIFIED_ENV) != "1":
            reason += "; besides, its GPU test suite has not passed on any GPU yet"
        return reason
    reason = _verification_reason(device)
    if reason is not None:
        return reason
    reason = _load_ops()
    if reason is not None:
        return f"the CUDA ops could not be loaded: {reason}"
    return None


def unsupported_reason(op: str, *, dtype: torch.dtype, iterations: int = 1, bias: bool = False,
                       leaky: bool = False, detach_inner: bool = False,
                       return_coupling: bool = False, prior: bool = False,
                       temperature: float = 1.0,
                       sizes: Optional[dict] = None) -> Optional[str]:
    """``None`` when ``op`` with these options is implemented: every option is, the learned
    ``prior`` and the ``temperature`` included (sizes beyond the device's shared memory are
    refused with the numbers by the op itself)."""
    if op not in _SUPPORTED_OPS:
        return f"unknown op {op!r}; the CUDA backend implements {_SUPPORTED_OPS}"
    if dtype not in _SUPPORTED_DTYPES:
        return f"dtype {dtype} is not supported; expected one of {_SUPPORTED_DTYPES}"
    return None
