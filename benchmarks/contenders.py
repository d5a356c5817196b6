"""What is benchmarked: the eager reference, ``torch.compile`` of the reference, and every
kernel backend that :func:`capsnet_ext.available_backends` reports for the device.

A :class:`Contender` maps op names to callables with the reference's signatures::

    predict(u, W)
    dynamic_routing(u_hat, iterations, *, bias, leaky, detach_inner)
    capsule_routing(u, W, iterations, *, bias, leaky, detach_inner)

Extra contenders (a new kernel under development, or a deliberately wrong one in the tests)
are passed to :func:`benchmarks.suite.run_suite` the same way.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import capsnet_ext
from capsnet_ext import reference

from .floors import OPS

REFERENCE = "reference"
COMPILED = "reference-compiled"
# The CUDA backend with two samples per lane (capsnet_ext.cuda_ops.tuning): the same results bit
# for bit, a different kernel instance, timed beside the default one.
CUDA_LANES2 = "cuda-lanes2"


@dataclass
class Contender:
    """A named implementation of some of the ops.

    Attributes:
        name: how it appears in tables, JSON and plots.
        kind: ``"eager"``, ``"compiled"``, ``"backend"`` or ``"custom"``.
        ops: ``{op name: callable}`` with the reference's signatures; ops left out are
            recorded as unsupported.
        note: one line shown with the results (e.g. the compile mode).
    """
    name: str
    kind: str
    ops: Dict[str, Callable] = field(default_factory=dict)
    note: str = ""


def _public_op(op: str, backend: str) -> Callable:
    # Through the public op: validation and dispatch are part of what a user pays for.
    return functools.partial(getattr(capsnet_ext, op), backend=backend)


def eager_reference() -> Contender:
    return Contender(REFERENCE, "eager", {op: _public_op(op, "reference") for op in OPS},
                     "capsnet_ext reference, eager PyTorch")


def _raise_recompile_limit(limit: int = 4096) -> None:
    """Dynamo stops recompiling a function after a few shapes and silently runs it eagerly;
    a sweep compiles once per shape, so lift the limit (its name changed across releases)."""
    import torch._dynamo.config as dynamo_config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), limit))
    if hasattr(dynamo_config, "fail_on_recompile_limit_hit"):
        # Should the limit still be hit, fail (recorded as an error) rather than time eager code
        # under the compiled contender's name.
        dynamo_config.fail_on_recompile_limit_hit = True


def _on_first_call(setup: Callable[[], None], fn: Callable) -> Callable:
    """``fn`` that runs ``setup()`` once before its first call (so that building the
    contender list changes no global setting until a compiled contender actually runs)."""
    done = False

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal done
        if not done:
            setup()
            done = True
        return fn(*args, **kwargs)
    return wrapper


def compiled_reference(mode: Optional[str] = None) -> Contender:
    """``torch.compile`` of :mod:`capsnet_ext.reference` ops, static shapes (one compilation
    per shape, as a user with a fixed model gets)."""
    ops = {op: _on_first_call(_raise_recompile_limit,
                              torch.compile(getattr(reference, op), dynamic=False, mode=mode))
           for op in OPS}
    return Contender(COMPILED, "compiled", ops, f"torch.compile(reference, mode={mode or 'default'})")


def backend_contender(name: str) -> Contender:
    return Contender(name, "backend", {op: _public_op(op, name) for op in OPS}, f"backend={name!r}")


def cuda_lanes2() -> Contender:
    """The CUDA backend's public ops with every forward run under ``tuning.forced(2)``; the
    registered backward runs the forward's choice, so forward and backward both take the
    two-sample instances."""
    from capsnet_ext.cuda_ops import tuning

    def forced(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with tuning.forced(2):
                return fn(*args, **kwargs)
        return wrapper

    routing = [op for op in OPS if op != "predict"]  # predict has one instance
    return Contender(CUDA_LANES2, "backend", {op: forced(_public_op(op, "cuda")) for op in routing},
                     "backend='cuda', two samples per lane (cuda_ops.tuning.forced(2))")


def backend_status(device: torch.device) -> Dict[str, str]:
    """:func:`capsnet_ext.backend_status`, asked backend by backend so that one backend whose
    availability check itself fails is reported as unavailable (with the error) instead of
    stopping the benchmark."""
    status: Dict[str, str] = {}
    for name in capsnet_ext.BACKENDS:
        try:
            status[name] = capsnet_ext.unavailable_reason(name, device) or "available"
        except Exception as exc:  # noqa: BLE001 - a broken backend must not stop the others
            status[name] = f"checking availability failed: {type(exc).__name__}: {exc}"
    return status


def interpreter_in_use(name: str, device: torch.device) -> bool:
    """The Triton backend on the CPU is Triton's interpreter: a testing tool, not a contender."""
    return name == "triton" and device.type == "cpu"


def discover(device: torch.device, names: Optional[Sequence[str]] = None, *,
             include_interpreter: bool = False, compile_mode: Optional[str] = None,
             ) -> Tuple[List[Contender], Dict[str, str]]:
    """The contenders to run on ``device`` and ``{name: why not}`` for those left out.

    ``names`` selects among ``"reference"``, ``"reference-compiled"``, the backend names and
    ``"cuda-lanes2"`` (default: all). Kernel backends are found only through
    :func:`capsnet_ext.backend_status`.
    """
    status = backend_status(device)
    known = [REFERENCE, COMPILED] + [b for b in status if b != REFERENCE] + [CUDA_LANES2]
    wanted = list(known) if names is None else list(names)
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"unknown contender(s) {unknown}; expected names from {known}")
    contenders: List[Contender] = []
    left_out: Dict[str, str] = {}
    for name in wanted:
        if name == REFERENCE:
            contenders.append(eager_reference())
        elif name == COMPILED:
            contenders.append(compiled_reference(compile_mode))
        elif name == CUDA_LANES2:
            if status.get("cuda") != "available":
                left_out[name] = f"unavailable: {status.get('cuda')}"
            else:
                contenders.append(cuda_lanes2())
        elif status[name] != "available":
            left_out[name] = f"unavailable: {status[name]}"
        elif interpreter_in_use(name, device) and not include_interpreter:
            why = "the Triton backend on the CPU is Triton's interpreter (a testing tool)"
            if os.environ.get("TRITON_INTERPRET") == "1":
                why += "; TRITON_INTERPRET=1 is set"
            left_out[name] = f"skipped: {why}; pass --include-interpreter to bench it"
        else:
            contenders.append(backend_contender(name))
    return contenders, left_out
