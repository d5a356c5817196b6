"""Loading the compiled CUDA ops: the extension built by ``pip install`` (``capsnet_ext._C``),
or else a just-in-time build with ``torch.utils.cpp_extension.load`` (ninja) into a cache.

Loading never raises: it returns why the ops are unavailable, and the rest of the package keeps
working. The shared library only registers the ``torch.ops.capsnet_ext`` ops with the
dispatcher (it has no Python module API), so it is loaded with ``torch.ops.load_library``.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import shutil
import threading
from typing import List, Optional

import torch

from . import _schema

NAMESPACE = "capsnet_ext"
_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")

_lock = threading.Lock()
_state = {"done": False, "reason": None, "how": None}


def sources(csrc: str = _CSRC) -> List[str]:
    """The extension's source files: the torch binding and the torch-free kernels."""
    return sorted(glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "*.cu")))


def _registered() -> bool:
    """Whether every op of the namespace has a CUDA kernel registered with the dispatcher.

    torch raises ``RuntimeError: operator ... does not exist`` when asked about an operator
    that no library has defined yet, which is the state before the extension is loaded."""
    for name in _schema.SCHEMAS:
        try:
            if not torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", "CUDA"):
                return False
        except RuntimeError:
            return False
    return True


def _load_built() -> Optional[str]:
    spec = importlib.util.find_spec("capsnet_ext._C")
    if spec is None or not spec.origin or not os.path.exists(spec.origin):
        return "the installed package has no built extension capsnet_ext._C"
    try:
        torch.ops.load_library(spec.origin)
    except Exception as exc:
        return f"loading {spec.origin} failed: {type(exc).__name__}: {exc}"
    return None


def _cache_dir(srcs: List[str]) -> str:
    digest = hashlib.sha256()
    for path in srcs:
        with open(path, "rb") as f:
            digest.update(f.read())
    tag = f"torch{torch.__version__}-cuda{torch.version.cuda}-{digest.hexdigest()[:12]}".replace("+", "_")
    root = os.environ.get("CAPSNET_EXT_CUDA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "capsnet_ext")
    return os.path.join(root, tag)


def _load_jit() -> Optional[str]:
    from torch.utils import cpp_extension

    nvcc = shutil.which("nvcc") or (cpp_extension.CUDA_HOME and os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    if not nvcc or not os.path.exists(nvcc):
        return "no nvcc was found (set CUDA_HOME or put nvcc on PATH) for a just-in-time build"
    if shutil.which("ninja") is None:
        return "ninja is not installed (pip install ninja), which the just-in-time build needs"
    srcs = sources()
    if not srcs:
        return f"the CUDA sources are not present (looked in {_CSRC})"
    build_dir = _cache_dir(srcs)
    os.makedirs(build_dir, exist_ok=True)
    try:
        cpp_extension.load(
            name="capsnet_ext_cuda",
            sources=srcs,
            extra_include_paths=[_CSRC],
            # torch's libstdc++ ABI stated explicitly, as in setup.py
            extra_cflags=["-O3", "-std=c++20", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"],
            extra_cuda_cflags=["-O3", "-std=c++17", "-lineinfo"],
            build_directory=build_dir,
            is_python_module=False,
            verbose=os.environ.get("CAPSNET_EXT_CUDA_VERBOSE") == "1",
        )
    except Exception as exc:
        return f"the just-in-time build in {build_dir} failed: {type(exc).__name__}: {exc}"
    return None


def load() -> Optional[str]:
    """Load the ops once; ``None`` when ``torch.ops.capsnet_ext`` is ready, else why not.

    After the first call this is a plain dictionary read, which ``torch.compile`` traces
    without a graph break (the dispatcher asks for availability inside compiled code)."""
    if _state["done"]:
        return _state["reason"]
    with _lock:
        if _state["done"]:
            return _state["reason"]
        try:
            reason = _load()
            if reason is None:
                _schema.register(NAMESPACE)
        except Exception as exc:  # loading must answer with a reason, never raise
            reason = f"loading the CUDA ops raised {type(exc).__name__}: {exc}"
        _state["reason"] = reason
        _state["done"] = True
        return reason


def _load() -> Optional[str]:
    if torch.version.cuda is None:
        return "the installed torch is a CPU-only build (torch.version.cuda is None)"
    if _registered():
        _state["how"] = "already registered"
        return None
    built_reason = _load_built()
    if built_reason is None and _registered():
        _state["how"] = "built extension capsnet_ext._C"
        return None
    if os.environ.get("CAPSNET_EXT_NO_JIT") == "1":
        return f"{built_reason}, and CAPSNET_EXT_NO_JIT=1 forbids a just-in-time build"
    jit_reason = _load_jit()
    if jit_reason is None and _registered():
        _state["how"] = "just-in-time build"
        return None
    return f"{built_reason}; {jit_reason or 'the just-in-time build registered no CUDA kernels'}"


def how_loaded() -> Optional[str]:
    """Where the ops came from, once loaded."""
    return _state["how"]
