"""The one place that chooses a backend.

A backend is a module that mirrors the functions of :mod:`capsnet_ext.reference`
(``predict``, ``dynamic_routing``, ``capsule_routing``) and provides two questions:

* ``availability(device) -> Optional[str]``: ``None`` when the backend can run on tensors of
  that device, otherwise the reason it cannot;
* ``unsupported_reason(op, *, dtype, **options) -> Optional[str]``: ``None`` when it implements
  that op with those options (``iterations``, ``bias``, ``leaky``, ``detach_inner``,
  ``return_coupling``, ``prior``, ``temperature``, and ``sizes``: a dict of ``J``, ``Dout``
  and ``Din`` where known), otherwise why not.

The backends: ``"reference"`` (pure PyTorch, any device), ``"triton"`` (CUDA GPUs; on the
CPU only in Triton's interpreter, ``TRITON_INTERPRET=1``) and ``"cuda"`` (the compiled
extension; CUDA GPUs whose model has passed the project's GPU check).

``backend="auto"`` uses the backend ``$CAPSNET_EXT_BACKEND`` names when that is set (as if it
were named explicitly); otherwise it tries the backends ranked for the device (``AUTO_ORDER``:
``"cuda"``, ``"triton"``, ``"reference"`` for CUDA tensors, ``"reference"`` alone for CPU
tensors) and takes the first that is available and supports the call, falling back to the
reference silently. Naming a backend explicitly raises :class:`BackendUnavailableError` (or
``NotImplementedError`` for an unsupported option) that says why.
"""
from __future__ import annotations

import importlib
import os
from typing import Dict, List, Optional

import torch

BACKENDS = ("reference", "triton", "cuda")

_MODULES = {
    "reference": "capsnet_ext.reference",
    "triton": "capsnet_ext.triton_ops",
    "cuda": "capsnet_ext.cuda_ops",
}

# Fastest first, per device type. The Triton interpreter on the CPU is a testing tool and far
# slower than the reference, so ``auto`` never picks it there.
AUTO_ORDER = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("reference",),
}


class BackendUnavailableError(RuntimeError):
    """Raised when a backend named explicitly (``backend="triton"`` or ``"cuda"``, or through
    ``$CAPSNET_EXT_BACKEND``) cannot run on the tensors' device; the message says why. A
    subclass of ``RuntimeError``."""


_loaded: Dict[str, object] = {}
_import_errors: Dict[str, str] = {}


def _load(name: str):
    """Import a backend module once; remember why it failed."""
    if name in _loaded:
        return _loaded[name]
    if name in _import_errors:
        return None
    try:
        module = importlib.import_module(_MODULES[name])
    except Exception as exc:  # any import failure makes the backend unavailable, not the package
        _import_errors[name] = f"importing {_MODULES[name]} failed: {type(exc).__name__}: {exc}"
        return None
    _loaded[name] = module
    return module


def preload(backend: str = "auto") -> None:
    """Import ``backend`` (or, for ``"auto"``, every backend ``auto`` may choose) now.

    ``select`` imports a backend on its first use; under ``torch.compile`` that import would
    break the graph, so modules call this at construction, outside any traced code. An import
    that fails is remembered as the reason the backend is unavailable, not raised.

    Args:
        backend (str, optional): ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``.
            Default: ``"auto"``.

    Returns:
        None.

    Raises:
        ValueError: ``backend`` is not one of those names.
    """
    _check_name(backend)
    names = {n for order in AUTO_ORDER.values() for n in order} if backend == "auto" else {backend}
    for name in sorted(names):
        _load(name)


def _check_name(backend: str) -> None:
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")


BACKEND_ENV = "CAPSNET_EXT_BACKEND"


def env_backend() -> str:
    """The backend ``$CAPSNET_EXT_BACKEND`` names (``"auto"`` when unset or empty); a value
    that is not a backend name raises ``ValueError`` naming the variable.

    Returns:
        str: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``.
    """
    value = os.environ.get(BACKEND_ENV, "").strip() or "auto"
    if value != "auto" and value not in BACKENDS:
        raise ValueError(f"the environment variable {BACKEND_ENV}={value!r} names no backend; set it "
                         f"to 'auto' or one of {BACKENDS}, or unset it")
    return value


def _as_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)


def _availability(name: str, module, device: torch.device) -> Optional[str]:
    """``module.availability(device)``, with anything it raises turned into the reason: asking
    whether a backend can run must answer, never fail (the question is asked by ``auto`` on
    every call and by ``backend_status`` in tools that only report)."""
    try:
        return module.availability(device)
    except Exception as exc:
        return f"checking the {name} backend's availability raised {type(exc).__name__}: {exc}"


def unavailable_reason(backend: str, device=None) -> Optional[str]:
    """Why ``backend`` cannot run on ``device`` (default: the current CUDA device if there is
    one, else the CPU), or ``None`` if it can. Never raises for a valid backend name.

    Args:
        backend (str): ``"auto"`` (always ``None``: it falls back to the reference),
            ``"reference"``, ``"triton"`` or ``"cuda"``.
        device (torch.device or str, optional): where the tensors would be. Default: ``None``.

    Returns:
        str or None: the reason (e.g. a failed import, no GPU, or an unverified GPU model for
        ``"cuda"``), or ``None``.

    Raises:
        ValueError: ``backend`` is not one of those names.

    Example::

        >>> import capsnet_ext
        >>> capsnet_ext.unavailable_reason("reference", "cpu") is None
        True
        >>> capsnet_ext.unavailable_reason("cuda", "cpu") is None
        False
    """
    _check_name(backend)
    if backend == "auto":
        return None
    module = _load(backend)
    if module is None:
        return _import_errors[backend]
    return _availability(backend, module, _as_device(device))


def backend_status(device=None) -> Dict[str, str]:
    """``{backend: "available" or the reason it is not}`` for ``device``.

    Args:
        device (torch.device or str, optional): default: the current CUDA device if there is
            one, else the CPU.

    Returns:
        dict: one entry for each of ``"reference"``, ``"triton"`` and ``"cuda"`` (``"auto"``
        is not a backend: it picks among these; see :mod:`capsnet_ext.dispatch`).

    Example::

        >>> import capsnet_ext
        >>> status = capsnet_ext.backend_status("cpu")
        >>> sorted(status), status["reference"]
        (['cuda', 'reference', 'triton'], 'available')
    """
    return {name: unavailable_reason(name, device) or "available" for name in BACKENDS}


def available_backends(device=None) -> List[str]:
    """Names of the backends that can run on ``device`` (default: CUDA if present, else CPU).

    Args:
        device (torch.device or str, optional): where the tensors would be. Default: ``None``.

    Returns:
        list of str: a subset of ``["reference", "triton", "cuda"]``, in that order; always
        includes ``"reference"``. Any of them may be passed as ``backend=``, as may
        ``"auto"``.

    Example::

        >>> import capsnet_ext
        >>> "reference" in capsnet_ext.available_backends("cpu")
        True
    """
    return [name for name in BACKENDS if unavailable_reason(name, device) is None]


def select(op: str, backend: str, device: torch.device, dtype: torch.dtype, **options):
    """Return the backend module that will run ``op``.

    The environment variable ``CAPSNET_EXT_BACKEND`` replaces ``"auto"`` when set (useful to
    force a backend across a whole program without editing it).

    Args:
        op (str): ``"predict"``, ``"dynamic_routing"`` or ``"capsule_routing"``.
        backend (str): ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``.
        device (torch.device): the device of the inputs.
        dtype (torch.dtype): the dtype of the inputs.
        **options: the call's options, passed to each backend's ``unsupported_reason``.

    Returns:
        module: the backend module; call ``getattr(module, op)``.

    Raises:
        ValueError: an unknown ``backend`` name, or a bad ``$CAPSNET_EXT_BACKEND``.
        BackendUnavailableError: the named backend cannot run on ``device``.
        NotImplementedError: the named backend does not support ``op`` with these options.
    """
    _check_name(backend)
    if backend == "auto":
        backend = env_backend()
    if backend != "auto":
        module = _load(backend)
        reason = _import_errors.get(backend) if module is None else _availability(backend, module, device)
        if reason is not None:
            raise BackendUnavailableError(f"backend {backend!r} is unavailable on {device}: {reason}")
        reason = module.unsupported_reason(op, dtype=dtype, **options)
        if reason is not None:
            raise NotImplementedError(f"backend {backend!r} does not support {op} here: {reason}")
        return module
    for name in AUTO_ORDER.get(device.type, ("reference",)):
        module = _load(name)
        if module is None or _availability(name, module, device) is not None:
            continue
        if module.unsupported_reason(op, dtype=dtype, **options) is None:
            return module
    return _load("reference")
