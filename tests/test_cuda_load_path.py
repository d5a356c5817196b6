"""The CUDA backend's load path, walked on the CPU as a CUDA build of torch walks it.

A CPU-only torch returns from ``_build._load()`` at its first line (``torch.version.cuda is
None``), so nothing after it ever ran here; on the GPU of 2026-12-04 the next line raised
(``torch._C._dispatch_has_kernel_for_dispatch_key`` raises ``RuntimeError: operator ... does
not exist`` for an operator that no library has defined yet) and every CUDA test, sanitizer and
benchmark stopped there. These tests make torch look like a CUDA build with a GPU present and
take each way the load can go: no library and no just-in-time build, a library that fails to
load, a library that loads but registers no CUDA kernels, a library that loads, and a loader
that raises. Each time ``backend_status()`` and ``unavailable_reason("cuda", ...)`` answer with
a reason (or ``"available"``) and never raise.
"""
import importlib.machinery
import itertools
import os
import shutil

import pytest
import torch

from capsnet_ext import cuda_ops, dispatch
from capsnet_ext.cuda_ops import _build, _schema

_namespaces = itertools.count()
_LIBRARIES = []  # kept alive: the dispatcher drops a library's registrations with the object


def _raise_like_torch(name, key):
    """The dispatch query as torch 2.11 answers it before the library is loaded."""
    raise RuntimeError(f"operator {name} does not exist")


@pytest.fixture(params=["this torch", "stand-in"])
def cuda_torch(request, monkeypatch, tmp_path):
    """torch looking like a CUDA build with one GPU, the load state fresh, the verification
    override set (so availability goes on to load the ops) and a namespace no library has
    defined. ``this torch``: the installed torch's own dispatch query (it raises for an
    undefined operator, as 2.11 and 2.13 do); ``stand-in``: a query that raises whatever it is
    asked until a test library registers the ops."""
    namespace = f"capsnet_ext_loadpath{next(_namespaces)}"
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(_build, "NAMESPACE", namespace)
    monkeypatch.setattr(_build, "_state", {"done": False, "reason": None, "how": None})
    monkeypatch.setattr(cuda_ops, "_availability_cache", {})
    monkeypatch.setenv(cuda_ops.UNVERIFIED_ENV, "1")
    monkeypatch.setenv("CAPSNET_EXT_CUDA_CACHE", str(tmp_path / "jit-cache"))
    defined = set()
    if request.param == "stand-in":
        real = torch._C._dispatch_has_kernel_for_dispatch_key

        def query(name, key):
            if name.split("::")[0] not in defined:
                _raise_like_torch(name, key)
            return real(name, key)

        monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", query)
    return namespace, defined


def _no_built_extension(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "capsnet_ext._C" else real(name, *a))


def _built_extension_at(monkeypatch, path):
    real = importlib.util.find_spec
    spec = importlib.machinery.ModuleSpec("capsnet_ext._C", None, origin=str(path))
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: spec if name == "capsnet_ext._C" else real(name, *a))


def _library_loader(namespace, defined, with_cuda_kernels=True):
    """A stand-in for ``torch.ops.load_library`` that does what the built extension's
    ``TORCH_LIBRARY`` does: defines every op of the schema in ``namespace``, with a CUDA
    kernel each (or none, as a CPU-only build of the extension would)."""
    def load_library(path):
        library = torch.library.Library(namespace, "DEF")
        for schema in _schema.SCHEMAS.values():
            library.define(schema)
            if with_cuda_kernels:
                library.impl(schema.split("(")[0], lambda *args: None, "CUDA")
        _LIBRARIES.append(library)
        defined.add(namespace)
    return load_library


def _answers(expected_fragment=None):
    """``backend_status`` and ``unavailable_reason`` for a CUDA device, twice (the second
    answer comes from the caches): equal, and a reason containing ``expected_fragment``, or
    ``"available"`` when it is None."""
    answers = []
    for _ in range(2):
        status = dispatch.backend_status("cuda")
        reason = dispatch.unavailable_reason("cuda", "cuda")
        assert status["cuda"] == (reason or "available")
        assert status["reference"] == "available"
        answers.append(reason)
    assert answers[0] == answers[1]
    if expected_fragment is None:
        assert answers[0] is None
    else:
        assert answers[0] is not None and expected_fragment in answers[0], answers[0]
        assert answers[0].startswith("the CUDA ops could not be loaded: ")
    return answers[0]


def test_the_dispatch_query_raises_for_an_undefined_operator(cuda_torch):
    """What the GPU run hit, asked directly: an operator no library defined."""
    namespace, _ = cuda_torch
    with pytest.raises(RuntimeError, match="does not exist"):
        torch._C._dispatch_has_kernel_for_dispatch_key(f"{namespace}::capsule_routing_forward", "CUDA")
    assert _build._registered() is False


def test_no_library_and_no_jit_build(cuda_torch, monkeypatch):
    _no_built_extension(monkeypatch)
    monkeypatch.setenv("CAPSNET_EXT_NO_JIT", "1")
    reason = _answers("CAPSNET_EXT_NO_JIT=1 forbids a just-in-time build")
    assert "the installed package has no built extension capsnet_ext._C" in reason


def test_no_library_and_no_nvcc(cuda_torch, monkeypatch):
    from torch.utils import cpp_extension

    _no_built_extension(monkeypatch)
    monkeypatch.delenv("CAPSNET_EXT_NO_JIT", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    _answers("no nvcc was found")


def test_library_that_fails_to_load(cuda_torch, monkeypatch, tmp_path):
    broken = tmp_path / "_C.so"
    broken.write_bytes(b"not a shared library")
    _built_extension_at(monkeypatch, broken)
    monkeypatch.setenv("CAPSNET_EXT_NO_JIT", "1")
    reason = _answers(f"loading {broken} failed")
    assert "CAPSNET_EXT_NO_JIT=1" in reason


def test_library_that_registers_no_cuda_kernels(cuda_torch, monkeypatch, tmp_path):
    namespace, defined = cuda_torch
    library = tmp_path / "_C.so"
    library.write_bytes(b"")
    _built_extension_at(monkeypatch, library)
    monkeypatch.setattr(torch.ops, "load_library", _library_loader(namespace, defined, False))
    monkeypatch.setenv("CAPSNET_EXT_NO_JIT", "1")
    _answers("CAPSNET_EXT_NO_JIT=1 forbids a just-in-time build")
    assert _build.how_loaded() is None


def test_library_that_loads(cuda_torch, monkeypatch, tmp_path):
    namespace, defined = cuda_torch
    library = tmp_path / "_C.so"
    library.write_bytes(b"")
    _built_extension_at(monkeypatch, library)
    monkeypatch.setattr(torch.ops, "load_library", _library_loader(namespace, defined))
    _answers(None)
    assert _build.how_loaded() == "built extension capsnet_ext._C"
    assert _build._registered()
    # The package's fake implementations were registered for the loaded ops.
    u = torch.empty(2, 3, 4, device="meta")
    W = torch.empty(3, 5, 6, 4, device="meta")
    v, c, s_all, V_all = getattr(torch.ops, namespace).capsule_routing_forward(
        u, W, None, None, 3, False, False, True, 1.0)
    assert v.shape == (2, 5, 6) and c.shape == (2, 3, 5) and s_all.shape == (3, 2, 5, 6)


def test_ops_already_registered(cuda_torch, monkeypatch, tmp_path):
    """A library loaded before the package asks (by the user, or a second import path)."""
    namespace, defined = cuda_torch
    _library_loader(namespace, defined)(None)
    _answers(None)
    assert _build.how_loaded() == "already registered"


def test_a_loader_that_raises_gives_a_reason_every_time(cuda_torch, monkeypatch):
    def find_spec(name, *a):
        raise ImportError("a broken import system")

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    _answers("loading the CUDA ops raised ImportError: a broken import system")
    assert _build.load() is not None  # not "loaded" the second time


def test_availability_that_raises_is_a_reason(monkeypatch):
    """Whatever a backend's availability check raises, the dispatcher answers with it."""
    monkeypatch.setattr(cuda_ops, "_availability_cache", {})

    def broken(device):
        raise RuntimeError("CUDA driver initialization failed")

    monkeypatch.setattr(cuda_ops, "_availability", broken)
    reason = dispatch.unavailable_reason("cuda", "cuda")
    assert reason == ("checking the cuda backend's availability raised RuntimeError: "
                      "CUDA driver initialization failed")
    assert dispatch.backend_status("cuda")["cuda"] == reason
    assert "cuda" not in dispatch.available_backends("cuda")
    with pytest.raises(dispatch.BackendUnavailableError, match="CUDA driver initialization failed"):
        dispatch.select("capsule_routing", "cuda", torch.device("cuda"), torch.float32)


def test_without_the_override_an_unverified_gpu_is_refused_before_loading(cuda_torch, monkeypatch):
    monkeypatch.delenv(cuda_ops.UNVERIFIED_ENV)
    monkeypatch.setattr(cuda_ops, "verification_records", lambda: [])
    reason = dispatch.unavailable_reason("cuda", "cuda")
    assert reason is not None and "has not passed on any GPU" in reason
    assert _build._state["done"] is False  # nothing was loaded to answer
