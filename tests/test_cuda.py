"""Tests of the CUDA backend (``capsnet_ext.cuda_ops``, kernels in ``csrc/``).

Two parts:

* CPU-runnable (always run): the backend reports itself unavailable with a reason, the
  dispatcher falls back or raises as documented, the C++ schemas match the Python ones, and
  the Python side of the ops (fake implementations, autograd registration, the saved routing
  state and the reverse-sweep backward the kernels implement) is checked against the reference
  through a CPU implementation of the same op schemas that follows the kernels' algorithm
  step by step (``_emulated``). ``torch.library.opcheck`` and ``torch.compile`` run on it.
* GPU (skipped with the reason when no GPU is present or the ops cannot be loaded): the
  kernels against the reference on odd shapes, every option, float32/float64 and
  float16/bfloat16 by the ratio method, float64 gradcheck, opcheck on the real ops,
  ``torch.compile(fullgraph=True)`` of a ``RoutingCapsules(backend="cuda")`` model.

Between the two, the kernel sources themselves run on the CPU in a host emulation of CUDA
(``csrc/emulation/``) under AddressSanitizer and UndefinedBehaviorSanitizer, against the
reference. The nvcc compile check of the kernels is done by ``.ci/compile_cuda.sh`` (not
repeated here).
"""
from __future__ import annotations

import glob
import itertools
import json
import os
import re
import shutil
import subprocess

import numpy as np

import pytest
import torch

from build_cache import build_cache_dir
from capsnet_ext import dispatch, ops, reference
from capsnet_ext.cuda_ops import _build, _schema
from capsnet_ext.cuda_ops import availability as cuda_availability
from capsnet_ext.cuda_ops.routing import capsule_routing_with, dynamic_routing_with

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTION_GRID = [dict(bias=b, leaky=l, detach_inner=d) for b, l, d in itertools.product((False, True), repeat=3)]
# The Mitterreiter et al. routing options: a learned prior logit [I, J] and a softmax temperature.
EXTRAS = [dict(prior=False, temperature=1.0), dict(prior=True, temperature=0.7)]


def _option_id(o):
    shown = [k if v is True else f"{k}{v}" for k, v in o.items() if v and not (k == "temperature" and v == 1.0)]
    return "-".join(shown) or "plain"


def _max_err(x, y):
    return (x.double() - y.double()).abs().max().item()


def _assert_close(actual, expected, atol, rtol, what):
    actual, expected = actual.double(), expected.double()
    bad = ~torch.isclose(actual, expected, atol=atol, rtol=rtol)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements differ (atol={atol}, rtol={rtol}); "
            f"first at {idx}; max abs error {_max_err(actual, expected):.3g}; "
            f"nan in result: {bool(torch.isnan(actual).any())}, inf: {bool(torch.isinf(actual).any())}")


# =============================================================================================
# CPU implementation of the op schemas, following the kernels' algorithm (forward sweeps with
# V^r; backward: reverse sweeps accumulating dL/dV^r, then one gradient sweep over all
# iterations). It exercises the Python registrations and pins the saved-state contract.
# =============================================================================================

def _squash_acc(s):
    sq = (s * s).sum(-1, keepdim=True)
    return s * (sq.clamp_min(torch.finfo(s.dtype).tiny).sqrt() / (1 + sq))


def _squash_backward(s, gv):
    tiny = torch.finfo(s.dtype).tiny
    sq = (s * s).sum(-1, keepdim=True)
    norm = sq.clamp_min(tiny).sqrt()
    denom = 1 + sq
    coef = torch.where(sq >= tiny, (1 - sq) / (norm * denom * denom), -2 * norm / (denom * denom))
    return norm / denom * gv + coef * (s * gv).sum(-1, keepdim=True) * s


def _coupling_at(uh, V, prior, leaky, temperature):
    logits = torch.einsum("bijd,bjd->bij", uh, V)
    if prior is not None:
        logits = logits + prior.to(uh.dtype)
    return reference.coupling(logits, leaky, temperature)


def _emul_forward(uh, bias, prior, iterations, leaky, temperature, return_coupling, dtype):
    B, I, J, D = uh.shape
    V = uh.new_zeros(B, J, D)
    s_all, V_all = [], []
    for _ in range(iterations):
        V_all.append(V)
        c = _coupling_at(uh, V, prior, leaky, temperature)
        s = torch.einsum("bij,bijd->bjd", c, uh)
        if bias is not None:
            s = s + bias.to(uh.dtype)
        s_all.append(s)
        v = _squash_acc(s)
        V = V + v
    coupling = c.to(dtype) if return_coupling else uh.new_empty((0,), dtype=dtype)
    return v.to(dtype), coupling, torch.stack(s_all), torch.stack(V_all)


def _emul_backward(grad_v, uh, prior, s_all, V_all, iterations, leaky, detach_inner, temperature):
    """(grad u_hat, grad bias, grad prior) by the kernels' reverse sweeps and gradient sweep."""
    R = iterations
    r_begin = R - 1 if detach_inner else 0
    through_logits = not detach_inner and R > 1
    g = grad_v.to(uh.dtype)
    G = torch.zeros_like(g)
    gs_all = torch.zeros_like(s_all)

    def logit_grad(c, gs):
        gc = torch.einsum("bijd,bjd->bij", uh, gs)
        return c * (gc - (c * gc).sum(-1, keepdim=True)) / temperature

    for r in range(R - 1, r_begin - 1, -1):  # reverse sweeps
        gs_all[r] = _squash_backward(s_all[r], G + (g if r == R - 1 else 0))
        if through_logits and r > 0:
            gl = logit_grad(_coupling_at(uh, V_all[r], prior, leaky, temperature), gs_all[r])
            G = G + torch.einsum("bij,bijd->bjd", gl, uh)
    gu = torch.zeros_like(uh)
    gprior = uh.new_zeros(uh.shape[1:3])
    for r in range(r_begin, R):  # the final gradient sweep
        c = _coupling_at(uh, V_all[r], prior, leaky, temperature)
        gu = gu + c[..., None] * gs_all[r][:, None]
        if (through_logits and r > 0) or prior is not None:
            gl = logit_grad(c, gs_all[r])
            if through_logits and r > 0:
                gu = gu + gl[..., None] * V_all[r][:, None]
            gprior = gprior + gl.sum(0)
    return gu, gs_all[r_begin:].sum((0, 1)), gprior


def _emulated_impls():
    def predict(u, W):
        return torch.einsum("ijdk,bik->bijd", W, u)

    def predict_backward(g, u, W):
        return torch.einsum("ijdk,bijd->bik", W, g), torch.einsum("bijd,bik->ijdk", g, u)

    # lane_samples chooses a kernel instance with bitwise equal results: nothing to emulate.
    def routing_forward(u_hat, bias, prior, iterations, leaky, detach_inner, return_coupling, temperature,
                        lane_samples=0):
        uh = u_hat.to(_schema.acc_dtype(u_hat.dtype))
        return _emul_forward(uh, bias, prior, iterations, leaky, temperature, return_coupling, u_hat.dtype)

    def _optional(ref, has_bias, gb, prior, gp):
        return (gb.to(ref.dtype) if has_bias else ref.new_empty((0,)),
                gp.to(ref.dtype) if prior is not None else ref.new_empty((0,)))

    def routing_backward(grad_v, u_hat, prior, s_all, V_all, iterations, leaky, detach_inner, has_bias,
                         temperature, lane_samples=0):
        uh = u_hat.to(s_all.dtype)
        gu, gb, gp = _emul_backward(grad_v, uh, prior, s_all, V_all, iterations, leaky, detach_inner, temperature)
        return (gu.to(u_hat.dtype), *_optional(u_hat, has_bias, gb, prior, gp))

    def capsule_routing_forward(u, W, bias, prior, iterations, leaky, detach_inner, return_coupling, temperature,
                                lane_samples=0):
        acc = _schema.acc_dtype(u.dtype)
        uh = torch.einsum("ijdk,bik->bijd", W.to(acc), u.to(acc))
        return _emul_forward(uh, bias, prior, iterations, leaky, temperature, return_coupling, u.dtype)

    def capsule_routing_backward(grad_v, u, W, prior, s_all, V_all, iterations, leaky, detach_inner, has_bias,
                                 temperature, lane_samples=0):
        acc = s_all.dtype
        uh = torch.einsum("ijdk,bik->bijd", W.to(acc), u.to(acc))
        gu, gb, gp = _emul_backward(grad_v, uh, prior, s_all, V_all, iterations, leaky, detach_inner, temperature)
        du = torch.einsum("ijdk,bijd->bik", W.to(acc), gu)
        dW = torch.einsum("bijd,bik->ijdk", gu, u.to(acc))
        return (du.to(u.dtype), dW.to(u.dtype), *_optional(u, has_bias, gb, prior, gp))

    return locals()


def _contiguous_outputs(fn):
    """The CUDA ops return fresh contiguous tensors; so does their CPU stand-in."""
    def wrapped(*args):
        out = fn(*args)
        return tuple(t.contiguous() for t in out) if isinstance(out, tuple) else out.contiguous()
    return wrapped


EMULATED_NS = "capsnet_ext_emulated"
_emulated_lib = None


@pytest.fixture(scope="module")
def emulated():
    """``torch.ops.capsnet_ext_emulated``: the op schemas with CPU implementations above and
    the package's fake and autograd registrations."""
    global _emulated_lib
    if _emulated_lib is None:
        lib = torch.library.Library(EMULATED_NS, "DEF")
        for name, schema in _schema.SCHEMAS.items():
            lib.define(schema)
        for name, fn in _emulated_impls().items():
            if name in _schema.SCHEMAS:
                lib.impl(name, _contiguous_outputs(fn), "CPU")
        _schema.register(EMULATED_NS)
        _emulated_lib = lib
    return getattr(torch.ops, EMULATED_NS)


def _inputs(B, I, J, D, K, dtype=torch.float64, device="cpu", seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    u = reference.squash(torch.randn(B, I, K, generator=gen, dtype=torch.float64)).to(device, dtype)
    W = (torch.randn(I, J, D, K, generator=gen, dtype=torch.float64) * (1.5 / (I * K) ** 0.5 * J ** 0.5)).to(device, dtype)
    bias = (0.1 * torch.randn(J, D, generator=gen, dtype=torch.float64)).to(device, dtype)
    grad_v = torch.randn(B, J, D, generator=gen, dtype=torch.float64).to(device, dtype)
    return u, W, bias, grad_v


def _prior(I, J, dtype=torch.float64, device="cpu", seed=1):
    """Learned prior logits [I, J] of a plausible size (fresh random, never zeros)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return (0.5 * torch.randn(I, J, generator=gen, dtype=torch.float64)).to(device, dtype)


# ---------------------------------------------------------------------------------------------
# CPU-runnable tests
# ---------------------------------------------------------------------------------------------

def test_backend_reports_unavailable_with_reason_without_gpu():
    if torch.cuda.is_available() and _build.load() is None:
        pytest.skip("a GPU and the compiled ops are present: availability is covered by the GPU tests")
    reason = dispatch.unavailable_reason("cuda", "cpu")
    assert reason is not None and "CUDA tensors only" in reason
    assert dispatch.backend_status("cpu")["cuda"] == reason
    assert "cuda" not in dispatch.available_backends("cpu")
    if not torch.cuda.is_available():
        reason = dispatch.unavailable_reason("cuda", "cuda")
        assert reason is not None and "no CUDA GPU" in reason


def test_unverified_backend_is_unavailable_on_any_device(monkeypatch):
    """Without a verification record (the shipped state) the backend never reports itself
    available, even where a GPU would be present; with a record for another GPU model neither."""
    from capsnet_ext import cuda_ops

    monkeypatch.delenv(cuda_ops.UNVERIFIED_ENV, raising=False)
    monkeypatch.setattr(cuda_ops, "_availability_cache", {})
    if not cuda_ops.verification_records():
        for device in ("cpu", "cuda"):
            reason = cuda_availability(device)
            assert reason is not None and "test suite has not passed" in reason
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Imaginary GPU")
    cases = [
        ([], "has not passed on any GPU"),
        ([{"device": "Other GPU"}], "has passed on ['Other GPU'] but not on 'Imaginary GPU'"),
    ]
    if torch.version.cuda is None:  # verified model, but this torch cannot load the ops
        cases.append(([{"device": "Imaginary GPU"}], "could not be loaded: the installed torch is a CPU-only"))
    for records, expected in cases:
        monkeypatch.setattr(cuda_ops, "_availability_cache", {})
        monkeypatch.setattr(cuda_ops, "verification_records", lambda records=records: records)
        reason = cuda_availability("cuda")
        assert reason is not None and expected in reason, reason


def test_cpu_torch_loading_gives_reason():
    if torch.version.cuda is not None:
        pytest.skip("this torch has CUDA; loading is exercised by the GPU tests")
    reason = _build.load()
    assert reason is not None and "CPU-only" in reason


def test_auto_falls_back_to_reference_on_cpu():
    u, W, bias, _ = _inputs(2, 5, 3, 4, 3, torch.float32)
    assert dispatch.select("capsule_routing", "auto", u.device, u.dtype) is reference
    got = ops.capsule_routing(u, W, 3, bias=bias, backend="auto")
    torch.testing.assert_close(got, reference.capsule_routing(u, W, 3, bias=bias))


@pytest.mark.parametrize("op", ["predict", "dynamic_routing", "capsule_routing"])
def test_explicit_cuda_backend_raises_with_reason(op):
    u, W, bias, _ = _inputs(2, 5, 3, 4, 3, torch.float32)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the backend's availability depends on the verification record")
    with pytest.raises(dispatch.BackendUnavailableError, match="backend 'cuda' is unavailable.*CUDA tensors only"):
        if op == "predict":
            ops.predict(u, W, backend="cuda")
        elif op == "dynamic_routing":
            ops.dynamic_routing(reference.predict(u, W), backend="cuda")
        else:
            ops.capsule_routing(u, W, backend="cuda")


def test_cpp_schemas_match_python():
    with open(os.path.join(ROOT, "csrc", "capsnet_ext_ops.cpp")) as f:
        text = f.read()
    defined = dict(
        (s.split("(", 1)[0], s) for s in re.findall(r'm\.def\("([^"]+)"\)', text)
    )
    assert defined == _schema.SCHEMAS


def test_kernels_include_no_torch_headers():
    """The .cu files compile without torch (so CI can compile-check them with a CPU torch)."""
    for path in _build.sources():
        if path.endswith(".cu"):
            with open(path) as f:
                includes = re.findall(r'#include\s*[<"]([^>"]+)[>"]', f.read())
            assert not [i for i in includes if i.split("/")[0] in ("torch", "ATen", "c10")], path


SHAPES_CPU = [(3, 7, 5, 4, 3), (2, 1, 1, 1, 1), (4, 11, 2, 3, 5)]


@pytest.mark.parametrize("extras", EXTRAS, ids=_option_id)
@pytest.mark.parametrize("opts", OPTION_GRID, ids=_option_id)
@pytest.mark.parametrize("iterations", [1, 3])
def test_emulated_capsule_routing_matches_reference(emulated, opts, extras, iterations):
    for shape in SHAPES_CPU:
        u, W, bias, grad_v = _inputs(*shape)
        b = bias if opts["bias"] else None
        p = _prior(shape[1], shape[2]) if extras["prior"] else None
        leaves = [u, W] + [x for x in (b, p) if x is not None]
        for x in leaves:
            x.requires_grad_(True)
        kw = dict(bias=b, leaky=opts["leaky"], detach_inner=opts["detach_inner"], return_coupling=True, prior=p,
                  temperature=extras["temperature"])
        v, c = capsule_routing_with(emulated, u, W, iterations, **kw)
        v_ref, c_ref = reference.capsule_routing(u, W, iterations, **kw)
        _assert_close(v, v_ref, 1e-12, 1e-10, f"v {shape}")
        _assert_close(c, c_ref, 1e-12, 1e-10, f"c {shape}")
        assert not c.requires_grad
        grads = torch.autograd.grad(v, leaves, grad_v)
        grads_ref = torch.autograd.grad(v_ref, leaves, grad_v)
        for name, g, g_ref in zip(("u", "W", "bias/prior", "prior"), grads, grads_ref):
            _assert_close(g, g_ref, 1e-11, 1e-9, f"grad {name} {shape}")


@pytest.mark.parametrize("extras", EXTRAS, ids=_option_id)
@pytest.mark.parametrize("opts", OPTION_GRID, ids=_option_id)
def test_emulated_dynamic_routing_matches_reference(emulated, opts, extras):
    u, W, bias, grad_v = _inputs(3, 9, 4, 5, 2)
    u_hat = reference.predict(u, W).detach().requires_grad_(True)
    b = bias.requires_grad_(True) if opts["bias"] else None
    p = _prior(9, 4).requires_grad_(True) if extras["prior"] else None
    kw = dict(bias=b, leaky=opts["leaky"], detach_inner=opts["detach_inner"], prior=p,
              temperature=extras["temperature"])
    v = dynamic_routing_with(emulated, u_hat, 4, **kw)
    v_ref = reference.dynamic_routing(u_hat, 4, **kw)
    _assert_close(v, v_ref, 1e-12, 1e-10, "v")
    leaves = [u_hat] + [x for x in (b, p) if x is not None]
    for g, g_ref in zip(torch.autograd.grad(v, leaves, grad_v), torch.autograd.grad(v_ref, leaves, grad_v)):
        _assert_close(g, g_ref, 1e-11, 1e-9, "grad")


def test_emulated_gradcheck(emulated):
    u, W, bias, _ = _inputs(2, 5, 3, 3, 2)
    args = [x.requires_grad_(True) for x in (u, W, bias)]
    # detach_inner deliberately drops gradient terms, so finite differences cannot check it;
    # it is compared with the reference's autograd above.
    for leaky in (False, True):
        assert torch.autograd.gradcheck(
            lambda u, W, b: capsule_routing_with(emulated, u, W, 3, bias=b, leaky=leaky), args)
    prior = _prior(5, 3).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda u, W, b, p: capsule_routing_with(emulated, u, W, 3, bias=b, prior=p, temperature=0.6, leaky=True),
        args + [prior])
    assert torch.autograd.gradcheck(
        lambda uh, p: dynamic_routing_with(emulated, uh, 2, prior=p, temperature=1.7),
        [reference.predict(u, W).detach().requires_grad_(True), prior])
    assert torch.autograd.gradcheck(lambda u, W: emulated.predict(u, W), args[:2])


def test_emulated_opcheck(emulated):
    u, W, bias, grad_v = _inputs(2, 5, 3, 4, 3)
    u.requires_grad_(True), W.requires_grad_(True), bias.requires_grad_(True)
    u_hat = reference.predict(u, W).detach().requires_grad_(True)
    prior = _prior(5, 3).requires_grad_(True)
    fwd = emulated.capsule_routing_forward(u.detach(), W.detach(), bias.detach(), None, 2, False, False, False, 1.0)
    cases = [
        (emulated.predict, (u, W)),
        (emulated.predict_backward, (reference.predict(u, W).detach(), u.detach(), W.detach())),
        (emulated.routing_forward, (u_hat, bias, None, 3, True, False, True, 1.0)),
        (emulated.routing_forward, (u_hat, None, prior, 2, False, True, False, 0.5)),
        (emulated.capsule_routing_forward, (u, W, bias, prior, 3, False, False, True, 2.0)),
        (emulated.capsule_routing_forward, (u, W, None, None, 1, True, True, False, 1.0)),
        (emulated.capsule_routing_backward,
         (grad_v, u.detach(), W.detach(), None, fwd[2], fwd[3], 2, False, False, True, 1.0)),
        (emulated.capsule_routing_backward,
         (grad_v, u.detach(), W.detach(), prior.detach(), fwd[2], fwd[3], 2, False, False, False, 1.0)),
        (emulated.routing_backward, (grad_v, u_hat.detach(), None, fwd[2], fwd[3], 2, False, False, True, 1.0)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_emulated_compiles_without_graph_breaks(emulated):
    u, W, bias, grad_v = _inputs(3, 6, 4, 5, 2, torch.float32)
    W.requires_grad_(True)

    prior = _prior(6, 4, torch.float32).requires_grad_(True)

    def step(u, W, bias, prior):
        return capsule_routing_with(emulated, u, W, 3, bias=bias, leaky=True, prior=prior, temperature=0.8)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    v = compiled(u, W, bias, prior)
    gW, gp = torch.autograd.grad(v, [W, prior], grad_v)
    v_ref = step(u, W, bias, prior)
    gW_ref, gp_ref = torch.autograd.grad(v_ref, [W, prior], grad_v)
    torch.testing.assert_close(v, v_ref)
    torch.testing.assert_close(gW, gW_ref)
    torch.testing.assert_close(gp, gp_ref)


def test_emulated_saves_no_u_hat_sized_tensor(emulated):
    """What autograd keeps for the backward: u, W and the O(R·B·J·D) routing state."""
    B, I, J, D, K, R = 32, 50, 10, 16, 8, 3
    u, W, bias, _ = _inputs(B, I, J, D, K, torch.float32)
    W.requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        capsule_routing_with(emulated, u, W, R, bias=bias)
    saved_bytes = sum(t.numel() * t.element_size() for t in saved)
    assert saved_bytes <= u.nbytes + W.nbytes + 2 * R * B * J * D * 4
    assert saved_bytes < B * I * J * D * 4  # less than u_hat alone


# ---------------------------------------------------------------------------------------------
# The real kernel sources on the CPU: csrc/*.cu built by the host compiler against
# csrc/emulation/cuda_emulation.h (each CUDA thread a host thread, barriers for
# __syncthreads/__syncwarp, shuffles through a buffer), under AddressSanitizer and
# UndefinedBehaviorSanitizer, driven by csrc/emulation/driver.cpp. This checks indexing,
# bounds, synchronisation and the math of the kernels as written; it cannot check what only a
# GPU shows (launch limits, occupancy, real warp scheduling, speed).
# ---------------------------------------------------------------------------------------------

EMULATION_SANITIZER = os.environ.get("CAPSNET_EXT_EMULATION_SANITIZER", "address")


def _sanitizer_flags(cxx):
    """AddressSanitizer + UBSan by default; CAPSNET_EXT_EMULATION_SANITIZER=thread runs the
    same tests under ThreadSanitizer instead (a race check of the shared-memory protocol,
    a few minutes), =none without either."""
    if EMULATION_SANITIZER == "none":
        return []
    lib = "libtsan.so" if EMULATION_SANITIZER == "thread" else "libasan.so"
    probe = subprocess.run([cxx, f"-print-file-name={lib}"], capture_output=True, text=True)
    if not (probe.returncode == 0 and os.path.isabs(probe.stdout.strip())):
        return []
    if EMULATION_SANITIZER == "thread":
        return ["-fsanitize=thread"]
    return ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]


@pytest.fixture(scope="module")
def emulated_kernels():
    """Paths of the driver executables built from the kernel sources, by dtype: one build per
    accumulation type, compiled in parallel (skips without g++). -O0 keeps the build of the
    many kernel instances short; the sanitizers check the same at any optimisation level.
    Builds are cached by the hash of the sources and the command (CAPSNET_EXT_EMULATION_CACHE,
    default ~/.cache/capsnet_ext/emulation), so a rerun on unchanged sources builds nothing."""
    import hashlib
    import tempfile

    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no host C++ compiler ({cxx}) to build the kernels' host emulation")
    csrc = os.path.join(ROOT, "csrc")
    sources = sorted(glob.glob(os.path.join(csrc, "*.cu")) + glob.glob(os.path.join(csrc, "*.cuh"))
                     + glob.glob(os.path.join(csrc, "*.h")) + glob.glob(os.path.join(csrc, "emulation", "*")))
    cache = build_cache_dir("CAPSNET_EXT_EMULATION_CACHE", "emulation")
    builds, exes = {}, {}
    for dtype, bits in ((torch.float32, 32), (torch.float64, 64)):
        cmd = [cxx, "-std=c++20", "-O0", "-g", "-pthread", "-DCAPSNET_HOST_EMULATION",
               f"-DCAPSNET_EMULATION_DTYPE={bits}", f"-I{csrc}", *_sanitizer_flags(cxx), "-x", "c++",
               os.path.join(csrc, "routing.cu"), os.path.join(csrc, "routing_lanes2.cu"),
               os.path.join(csrc, "predict.cu"), "-x", "none",
               os.path.join(csrc, "emulation", "driver.cpp")]
        digest = hashlib.sha256(" ".join(cmd).encode())
        for path in sources:
            with open(path, "rb") as f:
                digest.update(path.encode() + f.read())
        exe = os.path.join(cache, f"capsnet_emulated_{bits}_{digest.hexdigest()[:16]}")
        exes[dtype] = exe
        if not os.path.exists(exe):
            fd, partial = tempfile.mkstemp(dir=cache, prefix=".building-")
            os.close(fd)
            proc = subprocess.Popen(cmd + ["-o", partial], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            builds[dtype] = (exe, partial, proc)
    for dtype, (exe, partial, proc) in builds.items():
        _, err = proc.communicate()
        if proc.returncode != 0:
            os.unlink(partial)
        assert proc.returncode == 0, f"building the kernels' host emulation failed:\n{err[-4000:]}"
        os.replace(partial, exe)  # complete executables only
    return exes


def _emulation_env(block_order="forward"):
    return dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0", UBSAN_OPTIONS="halt_on_error=1",
                TSAN_OPTIONS="halt_on_error=1", CAPSNET_EMULATION_BLOCK_ORDER=block_order)


def _write_problem(workdir, arrays, meta, dtype):
    np_dtype = {torch.float32: np.float32, torch.float64: np.float64}[dtype]
    workdir.mkdir(parents=True, exist_ok=True)
    for name, t in arrays.items():
        t.detach().to(dtype).numpy().astype(np_dtype).tofile(workdir / f"{name}.bin")
    meta = dict(meta, dtype=str(dtype).split(".")[-1])
    (workdir / "meta.txt").write_text("\n".join(f"{k} {int(v) if isinstance(v, bool) else v}" for k, v in meta.items()))


def _read_outputs(workdir, inputs, dtype):
    np_dtype = {torch.float32: np.float32, torch.float64: np.float64}[dtype]
    return {p.stem: torch.from_numpy(np.fromfile(p, dtype=np_dtype)).double()
            for p in workdir.glob("*.bin") if p.stem not in inputs}


def _run_driver(exe, workdirs, block_order="forward"):
    """Runs the kernels on every problem directory in one process."""
    result = subprocess.run([exe, *map(str, workdirs)], capture_output=True, text=True, env=_emulation_env(block_order),
                            timeout=900)
    assert result.returncode == 0, f"emulated kernels failed ({result.returncode}):\n{result.stderr[-4000:]}"
    assert "runtime error" not in result.stderr and "ThreadSanitizer" not in result.stderr, result.stderr[-4000:]


def _run_emulated(exes, workdir, arrays, meta, dtype):
    """Write the inputs, run the kernels, return the outputs by name (as float64 tensors)."""
    _write_problem(workdir, arrays, meta, dtype)
    _run_driver(exes[dtype], [workdir])
    return _read_outputs(workdir, arrays, dtype)


def _case(shape, R, fused, dtype=torch.float64, bias=False, leaky=False, detach_inner=False, prior=False,
          temperature=1.0):
    return dict(shape=shape, R=R, fused=fused, dtype=dtype, bias=bias, leaky=leaky, detach_inner=detach_inner,
                prior=prior, temperature=temperature)


def _template_cases():
    """One case per compile-time instance (Din x Dout x lanes per sample, fused; Dout x lanes,
    given u_hat), with the options cycled through them, float32 for every Din (the 128-bit
    shared-memory path), plus the generic kernel (J > 32, odd Din / Dout) and a reduction tree
    of two levels (an intermediate node summed by one block, the root by another) over 12
    chunks and two sample tiles."""
    option_cycle = [dict(bias=True), dict(leaky=True, prior=True, temperature=0.7), dict(detach_inner=True, bias=True),
                    dict(prior=True, detach_inner=True), dict(leaky=True, bias=True, temperature=1.6), dict()]
    cases = []
    n = 0
    for K in (4, 8, 16):
        for D in (8, 16, 32):
            for J in (10, 23) if (K + D) % 3 else (16, 32):  # group of 16 lanes (J <= 16) or of 32
                opts = option_cycle[n % len(option_cycle)]
                dtype = torch.float32 if D == 8 else torch.float64
                cases.append(_case((3, 2, J, D, K), 2 + n % 2, True, dtype, **opts))
                n += 1
    for D in (8, 16, 32):
        for J in (7, 32):
            cases.append(_case((3, 3, J, D, 1), 3, False, **option_cycle[n % len(option_cycle)]))
            n += 1
    cases += [
        _case((9, 6, 33, 3, 2), 3, True, bias=True, leaky=True, prior=True, temperature=0.8),  # J > 32: two slots
        _case((11, 3, 2, 5, 9), 2, True, torch.float32, bias=True),
        _case((4, 5, 10, 16, 7), 3, True, detach_inner=True),  # Din outside the instances
        _case((3, 7, 5, 4, 3), 3, False, bias=True, leaky=True, prior=True),
        _case((2, 1, 1, 1, 1), 1, False, leaky=True, detach_inner=True),
        _case((40, 12, 3, 2, 2), 2, True, bias=True, prior=True),  # 12 chunks, 2 tiles: 2-level tree
    ]
    return cases


EMULATION_CASES = _template_cases()


def _case_id(case):
    B, I, J, D, K = case["shape"]
    flags = [k for k in ("bias", "leaky", "detach_inner", "prior") if case[k]]
    if case["temperature"] != 1.0:
        flags.append(f"T{case['temperature']}")
    kind = f"K{K}" if case["fused"] else "given"
    return f"{kind}-B{B}I{I}J{J}D{D}-R{case['R']}-{str(case['dtype'])[6:]}-{'-'.join(flags) or 'plain'}"


def _case_inputs(case, index):
    B, I, J, D, K = case["shape"]
    u, W, bias, grad_v = _inputs(B, I, J, D, K, seed=100 + index)
    prior = _prior(I, J, seed=200 + index)
    u_hat = reference.predict(u, W)
    arrays = dict(grad_v=grad_v, **(dict(u=u, W=W) if case["fused"] else dict(u_hat=u_hat)))
    if case["bias"]:
        arrays["bias"] = bias
    if case["prior"]:
        arrays["prior"] = prior
    meta = dict(op="routing", B=B, I=I, J=J, D=D, K=K, R=case["R"], fused=case["fused"], leaky=case["leaky"],
                detach_inner=case["detach_inner"], bias=case["bias"], prior=case["prior"],
                temperature=case["temperature"], return_coupling=True)
    return arrays, meta


@pytest.fixture(scope="module")
def emulation_runs(emulated_kernels, tmp_path_factory):
    """Every case of EMULATION_CASES run once (one driver process per dtype), in the default
    block order and, for the determinism test, in reversed and shuffled block orders."""
    root = tmp_path_factory.mktemp("emulation_cases")
    runs = {}
    for order in ("forward", "reverse", "shuffle:7"):
        dirs = {torch.float32: [], torch.float64: []}
        for index, case in enumerate(EMULATION_CASES):
            if order != "forward" and index % 3:  # every third case is rerun in the other orders
                continue
            workdir = root / order.replace(":", "_") / str(index)
            arrays, meta = _case_inputs(case, index)
            _write_problem(workdir, arrays, meta, case["dtype"])
            dirs[case["dtype"]].append((index, workdir, set(arrays)))
        for dtype, entries in dirs.items():
            if entries:
                _run_driver(emulated_kernels[dtype], [w for _, w, _ in entries], order)
            for index, workdir, inputs in entries:
                launches = dict(line.split() for line in (workdir / "launches.txt").read_text().splitlines())
                runs[order, index] = (_read_outputs(workdir, inputs, dtype), {k: int(v) for k, v in launches.items()})
    return runs


@pytest.mark.parametrize("index", range(len(EMULATION_CASES)), ids=[_case_id(c) for c in EMULATION_CASES])
def test_kernel_sources_in_host_emulation(emulation_runs, index):
    case = EMULATION_CASES[index]
    B, I, J, D, K = case["shape"]
    out, plan = emulation_runs["forward", index]
    expect_specialised = J <= 32 and D in (8, 16, 32) and (not case["fused"] or K in (4, 8, 16))
    assert plan["specialised"] == int(expect_specialised)
    if expect_specialised:
        assert plan["group"] == (16 if J <= 16 else 32)
    _assert_case_matches_reference(case, index, out)


def _assert_case_matches_reference(case, index, out):
    """The emulated kernels' outputs of an emulation case (inputs of _case_inputs) against the
    float64 reference: values, couplings and every gradient (gradients at 10x the tolerance,
    relative to their largest entry)."""
    B, I, J, D, K = case["shape"]
    u, W, bias, grad_v = _inputs(B, I, J, D, K, seed=100 + index)
    prior = _prior(I, J, seed=200 + index)
    leaves = [u.requires_grad_(True), W.requires_grad_(True)] if case["fused"] else \
        [reference.predict(u, W).detach().requires_grad_(True)]
    b = bias.requires_grad_(True) if case["bias"] else None
    p = prior.requires_grad_(True) if case["prior"] else None
    uh = reference.predict(*leaves) if case["fused"] else leaves[0]
    v_ref, c_ref = reference.dynamic_routing(uh, case["R"], bias=b, leaky=case["leaky"],
                                             detach_inner=case["detach_inner"], return_coupling=True, prior=p,
                                             temperature=case["temperature"])
    extra = [x for x in (b, p) if x is not None]
    grads = torch.autograd.grad(v_ref, leaves + extra, grad_v)
    tol = (1e-13, 1e-11) if case["dtype"] == torch.float64 else (2e-6, 1e-5)
    _assert_close(out["v"].view(B, J, D), v_ref, *tol, "v")
    _assert_close(out["c"].view(B, I, J), c_ref, *tol, "c")
    names = (["du", "dW"] if case["fused"] else ["grad_u_hat"]) + (["dbias"] if b is not None else []) + \
        (["dprior"] if p is not None else [])
    assert set(names) <= set(out) and ("dbias" in out) == case["bias"] and ("dprior" in out) == case["prior"]
    for name, g in zip(names, grads):
        scale = max(g.abs().max().item(), 1.0)
        _assert_close(out[name].view(g.shape) / scale, g / scale, tol[0] * 10, tol[1] * 10, name)


def test_launch_plan_in_host_emulation(emulation_runs):
    """Launches (kernels and memsets) per op call: forward 1 + R; backward 1 + (R - 1) reverse
    sweeps (none with detach_inner) + the gradient sweep + the bias gradient (only with a
    bias). At 3 iterations: forward 4, backward at most 5."""
    checked = 0
    for index, case in enumerate(EMULATION_CASES):
        _, plan = emulation_runs["forward", index]
        R = case["R"]
        reverse = 0 if case["detach_inner"] else R - 1
        assert plan["forward"] == 1 + R, (index, plan)
        assert plan["backward"] == 1 + reverse + 1 + int(case["bias"]), (index, plan)
        if R == 3:
            assert plan["forward"] <= 4 and plan["backward"] <= 6
            checked += 1
    assert checked >= 3
    tree_case = next(i for i, c in enumerate(EMULATION_CASES) if c["shape"][:2] == (40, 12))
    _, plan = emulation_runs["forward", tree_case]
    assert plan["chunks"] == 12 and plan["tiles"] == 2 and plan["tree_levels"] == 2, plan


def test_results_are_bitwise_independent_of_block_order(emulation_runs):
    """The reductions across blocks are summed in a fixed order whichever block arrives last,
    and the split depends on the shape only: the outputs of reversed and shuffled block orders
    equal the default order's bit for bit (forward and every gradient)."""
    compared = 0
    for (order, index), (out, _) in emulation_runs.items():
        if order == "forward":
            continue
        reference_out, _ = emulation_runs["forward", index]
        assert out.keys() == reference_out.keys()
        for name, x in out.items():
            assert torch.equal(x, reference_out[name]), f"{order} case {index} {name} differs"
        compared += 1
    assert compared >= 2 * (len(EMULATION_CASES) // 3)


def _lane_sample_cases():
    """float32 versions of the emulation cases (two samples per lane needs float accumulation),
    plus sizes where a group's second sample falls outside the tile or the batch: J = 20 (a
    group of 32 lanes, 8 groups) at B = 20 and 19 makes tiles of 24 samples, so the second pass
    of groups 4-7 has no rows to stage."""
    cases = [dict(c, dtype=torch.float32) for c in EMULATION_CASES]
    cases += [_case((20, 3, 20, 16, 8), 3, True, torch.float32, bias=True, prior=True),
              _case((19, 3, 20, 16, 8), 2, True, torch.float32, leaky=True),
              _case((19, 4, 20, 8, 1), 3, False, torch.float32, prior=True, temperature=0.9),
              _case((5, 4, 10, 16, 8), 3, True, torch.float32, bias=True, leaky=True, prior=True)]
    return cases


LANE_SAMPLE_CASES = _lane_sample_cases()


@pytest.fixture(scope="module")
def lane_sample_runs(emulated_kernels, tmp_path_factory):
    """Every LANE_SAMPLE_CASES case run with one and with two samples per lane (plan request)."""
    root = tmp_path_factory.mktemp("lane_samples")
    runs = {}
    for lanes in (1, 2):
        entries = []
        for index, case in enumerate(LANE_SAMPLE_CASES):
            workdir = root / f"lanes{lanes}" / str(index)
            arrays, meta = _case_inputs(case, index)
            _write_problem(workdir, arrays, dict(meta, lane_samples=lanes), torch.float32)
            entries.append((index, workdir, set(arrays)))
        _run_driver(emulated_kernels[torch.float32], [w for _, w, _ in entries], "shuffle:3")
        for index, workdir, inputs in entries:
            plan = dict(line.split() for line in (workdir / "launches.txt").read_text().splitlines())
            runs[lanes, index] = (_read_outputs(workdir, inputs, torch.float32), {k: int(v) for k, v in plan.items()})
    return runs


def test_two_samples_per_lane_are_bitwise_equal(lane_sample_runs):
    """RoutingPlan::lane_samples = 2 (each lane carries two samples, reading every staged W element
    once for both) runs the same operations per sample: values, couplings and every gradient
    equal the one-sample kernels' bit for bit, at every instance with Dout <= 16 and at tiles
    whose last group pass is half outside the tile. Sizes without a two-sample instance (the
    generic kernel, Dout = 32) fall back to one sample per lane."""
    two = 0
    for index, case in enumerate(LANE_SAMPLE_CASES):
        B, I, J, D, K = case["shape"]
        one_out, one_plan = lane_sample_runs[1, index]
        out, plan = lane_sample_runs[2, index]
        expect = 2 if plan["specialised"] and D <= 16 else 1
        assert one_plan["lane_samples"] == 1 and plan["lane_samples"] == expect, (index, plan)
        two += expect == 2
        assert out.keys() == one_out.keys() and {"v", "c", "s_all", "V_all"} <= set(out)
        for name, x in out.items():
            assert not torch.isnan(x).any(), f"case {index} {name}: unwritten entries"
            assert torch.equal(x, one_out[name]), f"case {index} ({_case_id(case)}) {name} differs"
    assert two >= 20


def test_two_samples_per_lane_match_the_reference(lane_sample_runs):
    """The added cases (not covered by the float64 runs) against the float64 reference."""
    first = len(EMULATION_CASES)
    for index in range(first, len(LANE_SAMPLE_CASES)):
        case = LANE_SAMPLE_CASES[index]
        out, plan = lane_sample_runs[2, index]
        assert plan["lane_samples"] == 2
        _assert_case_matches_reference(case, index, out)


@pytest.mark.parametrize("inject,expected", [("pending", "earlier work (error pending before routing_forward)"),
                                             ("grid", "routing_forward_sweep_kernel")])
def test_launch_errors_name_the_kernel_and_stay_pending(emulated_kernels, tmp_path, inject, expected):
    """An error pending before the launcher is reported as earlier work's, a failed launch by
    the kernel's name; neither is cleared (cudaPeekAtLastError), so torch still sees it."""
    case = _case((3, 2, 10, 16, 8), 3, True)
    arrays, meta = _case_inputs(case, 0)
    _write_problem(tmp_path, arrays, dict(meta, inject=inject), torch.float64)
    _run_driver(emulated_kernels[torch.float64], [tmp_path])
    code, kernel, still_pending = (tmp_path / "error.txt").read_text().splitlines()
    assert int(code) != 0 and kernel == expected and still_pending == "1"


def test_prior_and_temperature_are_supported():
    from capsnet_ext import cuda_ops

    for op in ("dynamic_routing", "capsule_routing"):
        assert cuda_ops.unsupported_reason(op, dtype=torch.float32, iterations=3, bias=True, leaky=True,
                                           prior=True, temperature=0.5) is None


def test_predict_kernels_in_host_emulation(emulated_kernels, tmp_path):
    B, I, J, D, K = 3, 5, 4, 7, 6
    u, W, _, _ = _inputs(B, I, J, D, K)
    g = torch.randn(B, I, J, D, dtype=torch.float64)
    meta = dict(op="predict", B=B, I=I, J=J, D=D, K=K)
    out = _run_emulated(emulated_kernels, tmp_path, dict(u=u, W=W, grad_u_hat=g), meta, torch.float64)
    u.requires_grad_(True), W.requires_grad_(True)
    ref = reference.predict(u, W)
    du, dW = torch.autograd.grad(ref, [u, W], g)
    _assert_close(out["u_hat"].view(ref.shape), ref, 1e-13, 1e-12, "u_hat")
    _assert_close(out["du"].view(du.shape), du, 1e-13, 1e-12, "du")
    _assert_close(out["dW"].view(dW.shape), dW, 1e-13, 1e-12, "dW")


# ---------------------------------------------------------------------------------------------
# GPU tests: the CUDA kernels themselves
# ---------------------------------------------------------------------------------------------

def _gpu_skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA GPU is available"
    reason = _build.load()
    return None if reason is None else f"the CUDA ops could not be loaded: {reason}"


_GPU_REASON = None


@pytest.fixture(scope="module")
def cuda_ops_loaded():
    """``torch.ops.capsnet_ext`` with the compiled kernels (skips with the reason otherwise)."""
    global _GPU_REASON
    _GPU_REASON = _gpu_skip_reason()
    if _GPU_REASON is not None:
        pytest.skip(_GPU_REASON)
    return torch.ops.capsnet_ext


gpu = pytest.mark.gpu
SHAPES_GPU = [
    (2, 1, 1, 1, 1),
    (3, 59, 5, 7, 3),        # generic kernel (Dout 7)
    (5, 97, 10, 16, 8),      # specialised, 16 lanes per sample
    (4, 123, 33, 5, 9),      # generic, J > 32: two output capsules per lane
    (9, 1025, 3, 17, 2),     # generic, B not a multiple of the groups per block
    (37, 300, 24, 32, 16),   # specialised, 32 lanes per sample, two sample tiles
    (70, 1152, 10, 16, 8),   # the MNIST layer: three sample tiles, a two-level reduction tree
]


def _run(fn_ops, form, u, W, bias, iterations, opts, grad_v, prior=None, temperature=1.0):
    """Forward and gradients of one routing form; returns (v, c, grads)."""
    kw = dict(bias=bias, leaky=opts["leaky"], detach_inner=opts["detach_inner"], return_coupling=True, prior=prior,
              temperature=temperature)
    extra = [x for x in (bias, prior) if x is not None]
    if form == "capsule":
        leaves = [u, W] + extra
        v, c = fn_ops(u, W, iterations, **kw)
    else:
        u_hat = reference.predict(u, W).detach().requires_grad_(True)
        leaves = [u_hat] + extra
        v, c = fn_ops(u_hat, iterations, **kw)
    grads = torch.autograd.grad(v, leaves, grad_v)
    return v, c, grads


def _forms(cuda):
    return {
        "capsule": (lambda *a, **k: capsule_routing_with(cuda, *a, **k), reference.capsule_routing),
        "given_u_hat": (lambda *a, **k: dynamic_routing_with(cuda, *a, **k), reference.dynamic_routing),
    }


@gpu
@pytest.mark.parametrize("form", ["capsule", "given_u_hat"])
@pytest.mark.parametrize("extras", EXTRAS, ids=_option_id)
@pytest.mark.parametrize("opts", OPTION_GRID, ids=_option_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_gpu_routing_matches_reference(cuda_ops_loaded, form, opts, extras, dtype):
    fn, ref_fn = _forms(cuda_ops_loaded)[form]
    tol = {torch.float32: (2e-5, 1e-4), torch.float64: (1e-12, 1e-10)}[dtype]
    for shape in SHAPES_GPU:
        for iterations in (1, 3):
            u, W, bias, grad_v = _inputs(*shape, dtype=torch.float64, device="cuda", seed=sum(shape))
            b = bias.requires_grad_(True) if opts["bias"] else None
            p = _prior(shape[1], shape[2], device="cuda").requires_grad_(True) if extras["prior"] else None
            T = extras["temperature"]
            u.requires_grad_(True), W.requires_grad_(True)
            v_ref, c_ref, g_ref = _run(ref_fn, form, u, W, b, iterations, opts, grad_v, p, T)
            cast = lambda x: None if x is None else x.detach().to(dtype).requires_grad_(True)  # noqa: E731
            v, c, grads = _run(fn, form, cast(u), cast(W), cast(b), iterations, opts, grad_v.to(dtype), cast(p), T)
            assert v.dtype == dtype and c.dtype == dtype and not c.requires_grad
            what = f"{form} {shape} R={iterations} {dtype}"
            _assert_close(v, v_ref, *tol, f"v {what}")
            _assert_close(c, c_ref, *tol, f"c {what}")
            for g, gr in zip(grads, g_ref):
                scale = max(gr.abs().max().item(), 1e-30)
                _assert_close(g / scale, gr / scale, tol[0] * 10, tol[1] * 10, f"grad {what}")


@gpu
@pytest.mark.parametrize("form", ["capsule", "given_u_hat"])
def test_gpu_results_are_bitwise_reproducible(cuda_ops_loaded, form):
    """The split plan depends on the shape only and the cross-block sums run in a fixed order:
    repeated runs give the same bits (and so would any other GPU)."""
    fn, _ = _forms(cuda_ops_loaded)[form]
    for shape in SHAPES_GPU[2:]:
        u, W, bias, grad_v = _inputs(*shape, dtype=torch.float32, device="cuda", seed=3)
        p = _prior(shape[1], shape[2], torch.float32, "cuda")
        runs = []
        for _ in range(3):
            leaves = [x.detach().requires_grad_(True) for x in (u, W, bias, p)]
            v, _, grads = _run(fn, form, leaves[0], leaves[1], leaves[2], 3, OPTION_GRID[0], grad_v, leaves[3])
            runs.append([v, *grads])
        for later in runs[1:]:
            for x, y in zip(runs[0], later):
                assert torch.equal(x, y), shape


@gpu
@pytest.mark.parametrize("form", ["capsule", "given_u_hat"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_gpu_two_samples_per_lane_are_bitwise_equal(cuda_ops_loaded, form, dtype):
    """On the device: the instances with two samples per lane (tuning.forced(2)) give the
    one-sample instances' values, couplings and gradients bit for bit, at the MNIST shape (the
    instance the tuning sweep times) and at odd batch sizes (a tile's last pass half empty)."""
    from capsnet_ext.cuda_ops import tuning

    fn, _ = _forms(cuda_ops_loaded)[form]
    opts = dict(bias=True, leaky=False, detach_inner=False)
    for shape in ((128, 1152, 10, 16, 8), (19, 37, 20, 16, 8), (5, 40, 7, 8, 4)):
        u, W, bias, grad_v = _inputs(*shape, dtype=dtype, device="cuda", seed=11)
        p = _prior(shape[1], shape[2], dtype, "cuda")
        runs = {}
        for lanes in (1, 2):
            leaves = [x.detach().requires_grad_(True) for x in (u, W, bias, p)]
            with tuning.forced(lanes):
                v, c, grads = _run(fn, form, leaves[0], leaves[1], leaves[2], 3, opts, grad_v, leaves[3], 0.8)
            runs[lanes] = [v, c, *grads]
        for x, y in zip(runs[1], runs[2]):
            assert torch.equal(x, y), (form, shape, dtype)


@gpu
@pytest.mark.parametrize("form", ["capsule", "given_u_hat"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("opts", [OPTION_GRID[0], OPTION_GRID[-1], dict(bias=True, leaky=False, detach_inner=False)],
                         ids=_option_id)
def test_gpu_low_precision_by_error_ratio(cuda_ops_loaded, form, dtype, opts):
    """The kernel's error against a float64 reference is at most 2x (forward) / 3x (backward)
    the error of the reference computed in the low dtype itself, plus a small floor."""
    fn, ref_fn = _forms(cuda_ops_loaded)[form]
    floor = {torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    for shape in SHAPES_GPU[1:]:
        u, W, bias, grad_v = _inputs(*shape, dtype=torch.float64, device="cuda", seed=7)
        b64 = bias.requires_grad_(True) if opts["bias"] else None
        u.requires_grad_(True), W.requires_grad_(True)
        v64, _, g64 = _run(ref_fn, form, u, W, b64, 3, opts, grad_v)
        cast = lambda x: None if x is None else x.detach().to(dtype).requires_grad_(True)  # noqa: E731
        v_low, _, g_low = _run(ref_fn, form, cast(u), cast(W), cast(b64), 3, opts, grad_v.to(dtype))
        v, _, g = _run(fn, form, cast(u), cast(W), cast(b64), 3, opts, grad_v.to(dtype))
        assert torch.isfinite(v).all()
        assert _max_err(v, v64) <= 2 * _max_err(v_low, v64) + floor, f"v {shape}"
        for name, gk, gl, gr in zip(("first", "second", "bias"), g, g_low, g64):
            scale = gr.abs().max().item()
            assert _max_err(gk, gr) <= 3 * _max_err(gl, gr) + floor * scale, f"grad {name} {shape}"


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_gpu_predict_matches_reference(cuda_ops_loaded, dtype):
    for shape in SHAPES_GPU:
        B, I, J, D, K = shape
        u, W, _, _ = _inputs(*shape, dtype=dtype, device="cuda")
        u.requires_grad_(True), W.requires_grad_(True)
        g = torch.randn(B, I, J, D, device="cuda", dtype=dtype)
        out = cuda_ops_loaded.predict(u, W)
        ref = reference.predict(u, W)
        tol = (1e-5, 1e-5) if dtype == torch.float32 else (1e-12, 1e-12)
        _assert_close(out, ref, *tol, f"u_hat {shape}")
        for a, r in zip(torch.autograd.grad(out, [u, W], g), torch.autograd.grad(ref, [u, W], g)):
            _assert_close(a, r, tol[0] * 100, tol[1] * 10, f"predict grad {shape}")


@gpu
def test_gpu_gradcheck_float64(cuda_ops_loaded):
    u, W, bias, _ = _inputs(3, 13, 4, 5, 3, device="cuda")
    args = [x.requires_grad_(True) for x in (u, W, bias)]
    for opts in [o for o in OPTION_GRID if not o["detach_inner"]]:  # detach_inner: see the reference test
        b_used = opts["bias"]

        def f(u, W, b):
            return capsule_routing_with(cuda_ops_loaded, u, W, 3, bias=b if b_used else None,
                                        leaky=opts["leaky"], detach_inner=opts["detach_inner"])

        def g(u, W, b):
            return dynamic_routing_with(cuda_ops_loaded, torch.einsum("ijdk,bik->bijd", W, u), 3,
                                        bias=b if b_used else None, leaky=opts["leaky"],
                                        detach_inner=opts["detach_inner"])

        assert torch.autograd.gradcheck(f, args), opts
        assert torch.autograd.gradcheck(g, args), opts
    assert torch.autograd.gradcheck(lambda u, W: cuda_ops_loaded.predict(u, W), args[:2])
    # prior and temperature, on a generic (Dout = 5) and a specialised (Din 4, Dout 8) size
    for shape in ((3, 13, 4, 5, 3), (2, 5, 10, 8, 4)):
        u, W, bias, _ = _inputs(*shape, device="cuda")
        prior = _prior(shape[1], shape[2], device="cuda")
        args = [x.requires_grad_(True) for x in (u, W, bias, prior)]
        assert torch.autograd.gradcheck(
            lambda u, W, b, p: capsule_routing_with(cuda_ops_loaded, u, W, 3, bias=b, prior=p, temperature=0.6,
                                                    leaky=True), args), shape
        assert torch.autograd.gradcheck(
            lambda u, W, p: dynamic_routing_with(cuda_ops_loaded, torch.einsum("ijdk,bik->bijd", W, u), 2,
                                                 prior=p, temperature=1.7), [args[0], args[1], args[3]]), shape


@gpu
def test_gpu_opcheck(cuda_ops_loaded):
    cuda = cuda_ops_loaded
    for dtype in (torch.float32, torch.float64, torch.float16):
        u, W, bias, grad_v = _inputs(3, 17, 5, 6, 4, dtype=dtype, device="cuda")
        u.requires_grad_(True), W.requires_grad_(True), bias.requires_grad_(True)
        u_hat = reference.predict(u, W).detach().requires_grad_(True)
        prior = _prior(17, 5, dtype, "cuda").requires_grad_(True)
        fwd = cuda.capsule_routing_forward(u.detach(), W.detach(), bias.detach(), None, 3, False, False, False, 1.0)
        cases = [
            (cuda.predict, (u, W)),
            (cuda.predict_backward, (u_hat.detach(), u.detach(), W.detach())),
            (cuda.routing_forward, (u_hat, bias, None, 3, True, False, True, 1.0)),
            (cuda.routing_forward, (u_hat, None, prior, 1, False, True, False, 0.5)),
            (cuda.capsule_routing_forward, (u, W, bias, prior, 3, False, False, True, 2.0)),
            (cuda.capsule_routing_forward, (u, W, None, None, 2, True, True, False, 1.0)),
            (cuda.capsule_routing_backward,
             (grad_v, u.detach(), W.detach(), None, fwd[2], fwd[3], 3, False, False, True, 1.0)),
            (cuda.capsule_routing_backward,
             (grad_v, u.detach(), W.detach(), prior.detach(), fwd[2], fwd[3], 3, True, False, False, 0.7)),
            (cuda.routing_backward, (grad_v, u_hat.detach(), None, fwd[2], fwd[3], 3, False, False, True, 1.0)),
        ]
        for op, args in cases:
            torch.library.opcheck(op, args)


@gpu
def test_gpu_compiled_model_fullgraph(cuda_ops_loaded, monkeypatch):
    from capsnet_ext import cuda_ops
    from capsnet_ext.nn import RoutingCapsules

    monkeypatch.setenv(cuda_ops.UNVERIFIED_ENV, "1")  # the test suite itself is the verification
    torch.manual_seed(0)
    layer = RoutingCapsules(1152, 10, 8, 16, iterations=3, bias=True, backend="cuda").cuda()
    u = reference.squash(torch.randn(8, 1152, 8, device="cuda"))
    torch._dynamo.reset()
    layer(u)  # eager first: availability and loading are settled before tracing
    compiled = torch.compile(layer, fullgraph=True)
    v = compiled(u)
    v.pow(2).sum().backward()
    g_compiled = layer.weight.grad.clone()
    layer.weight.grad = None
    v_ref = reference.capsule_routing(u, layer.weight, 3, bias=layer.bias)
    v_ref.pow(2).sum().backward()
    torch.testing.assert_close(v, v_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(g_compiled, layer.weight.grad, atol=2e-5, rtol=1e-4)


@gpu
def test_gpu_errors_name_the_argument(cuda_ops_loaded):
    u, W, bias, grad_v = _inputs(2, 5, 3, 4, 3, dtype=torch.float32, device="cuda")
    ops_ = cuda_ops_loaded
    with pytest.raises(RuntimeError, match="bias must have shape"):
        ops_.capsule_routing_forward(u, W, bias[:, :2], None, 3, False, False, False, 1.0)
    with pytest.raises(RuntimeError, match="prior must have shape"):
        ops_.capsule_routing_forward(u, W, None, bias, 3, False, False, False, 1.0)
    with pytest.raises(RuntimeError, match="temperature must be a positive"):
        ops_.capsule_routing_forward(u, W, None, None, 3, False, False, False, 0.0)
    with pytest.raises(RuntimeError, match="expected W of shape"):
        ops_.capsule_routing_forward(u, W[:, :, :, :2], None, None, 3, False, False, False, 1.0)
    with pytest.raises(RuntimeError, match="iterations must be >= 1"):
        ops_.capsule_routing_forward(u, W, None, None, 0, False, False, False, 1.0)
    with pytest.raises(RuntimeError, match="same dtype"):
        ops_.capsule_routing_forward(u, W.double(), None, None, 3, False, False, False, 1.0)
    fwd = ops_.capsule_routing_forward(u, W, None, None, 3, False, False, False, 1.0)
    with pytest.raises(RuntimeError, match="s_all must have shape"):
        ops_.capsule_routing_backward(grad_v, u, W, None, fwd[2][:2], fwd[3], 3, False, False, False, 1.0)


@gpu
def test_gpu_noncontiguous_inputs(cuda_ops_loaded):
    u, W, bias, _ = _inputs(4, 21, 5, 6, 3, dtype=torch.float64, device="cuda")
    u_t = u.transpose(0, 1).contiguous().transpose(0, 1)
    W_t = W.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    assert not u_t.is_contiguous() and not W_t.is_contiguous()
    v = capsule_routing_with(cuda_ops_loaded, u_t, W_t, 3, bias=bias)
    _assert_close(v, reference.capsule_routing(u, W, 3, bias=bias), 1e-12, 1e-10, "v")


# ---------------------------------------------------------------------------------------------
# The kernel instance a call runs (capsnet_ext.cuda_ops.tuning) and the CUDA tuning sweep
# ---------------------------------------------------------------------------------------------

def _cuda_table(tmp_path, monkeypatch, entries):
    from capsnet_ext.cuda_ops import tuning

    path = tmp_path / "cuda_table.json"
    path.write_text(json.dumps({"version": 1, "entries": entries}))
    monkeypatch.setenv(tuning.TABLE_ENV, str(path))
    return tuning


def _cuda_entry(direction, shape, lanes, dtype="float32", gpu="NVIDIA H200"):
    return dict(gpu=gpu, direction=direction, dtype=dtype, precision="ieee", shape=list(shape),
                config=dict(lane_samples=lanes))


def test_cuda_tuning_lookup_rules(tmp_path, monkeypatch):
    """Same GPU, direction and dtype; the same J, Dout and Din (0: given u_hat); the nearest B and
    I within a factor of 4 of both."""
    tuning = _cuda_table(tmp_path, monkeypatch, [
        _cuda_entry("fwd", (128, 1152, 10, 16, 8), 2), _cuda_entry("fwd", (1024, 4608, 10, 16, 8), 1),
        _cuda_entry("bwd", (128, 1152, 10, 16, 8), 1), _cuda_entry("fwd", (128, 1152, 10, 16, 0), 2),
        _cuda_entry("fwd", (128, 1152, 10, 16, 8), 1, dtype="bfloat16")])
    look = lambda *a, gpu="NVIDIA H200": tuning.lookup(gpu, *a)  # noqa: E731
    assert look("fwd", torch.float32, 128, 1152, 10, 16, 8)["config"] == {"lane_samples": 2}
    assert look("fwd", torch.float32, 256, 1152, 10, 16, 8)["config"] == {"lane_samples": 2}
    assert look("fwd", torch.float32, 1024, 4608, 10, 16, 8)["config"] == {"lane_samples": 1}
    assert look("bwd", torch.float32, 128, 1152, 10, 16, 8)["config"] == {"lane_samples": 1}
    assert look("fwd", torch.bfloat16, 128, 1152, 10, 16, 8)["config"] == {"lane_samples": 1}
    assert look("fwd", torch.float32, 128, 1152, 10, 16, 0)["config"] == {"lane_samples": 2}
    assert look("fwd", torch.float32, 8, 1152, 10, 16, 8) is None          # B 16x away
    assert look("fwd", torch.float32, 128, 1152, 10, 16, 4) is None        # another Din
    assert look("fwd", torch.float32, 128, 1152, 12, 16, 8) is None        # another J
    assert look("fwd", torch.float16, 128, 1152, 10, 16, 8) is None        # another dtype
    assert look("fwd", torch.float32, 128, 1152, 10, 16, 8, gpu="NVIDIA H100 80GB HBM3") is None


def test_cuda_tuning_forced_and_defaults(tmp_path, monkeypatch):
    tuning = _cuda_table(tmp_path, monkeypatch, [_cuda_entry("fwd", (4, 6, 3, 8, 8), 2, gpu="cpu")])
    u, W = torch.randn(4, 6, 8), torch.randn(6, 3, 8, 8)
    assert tuning.lane_samples_for("fwd", (u, W)) == 0  # not a CUDA tensor: the kernels' default
    with tuning.forced(2):
        assert tuning.lane_samples_for("fwd", (u, W)) == 2
        with tuning.forced(1):
            assert tuning.lane_samples_for("bwd", (u, W)) == 1
        assert tuning.lane_samples_for("bwd", (torch.randn(4, 6, 3, 8),)) == 2
    assert tuning.forced_lane_samples() is None
    with pytest.raises(ValueError, match="lane_samples must be one of"):
        with tuning.forced(3):
            pass
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": 1, "entries": [_cuda_entry("fwd", (4, 6, 3, 8, 8), 4)]}))
    with pytest.raises(ValueError, match="entry 0 has config"):
        tuning.read_table(bad)
    monkeypatch.setenv(tuning.TABLE_ENV, "none")
    assert tuning.read_table()["entries"] == []


def test_cuda_tuning_sweep_dry_run_and_fold(emulated, tmp_path, monkeypatch):
    """The sweep end to end on the CPU stand-in of the CUDA ops (lane_samples is accepted and has
    nothing to change there): both instances timed per direction, the check, one archive, and
    fold merging the checked entries into a table that the lookup then serves."""
    import tarfile

    from benchmarks import tune_cuda

    tuning = _cuda_table(tmp_path, monkeypatch, [])
    out = tmp_path / "out"
    assert tune_cuda.main(["--dry-run", "--dtypes", "float32", "--out", str(out)], ops=emulated, device="cpu") == 0
    [archive] = out.glob("tune-cuda-dryrun-*.tar.gz")
    with tarfile.open(archive) as tar:
        data = json.load(tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("/tune.json"))))
    [row] = data["results"]
    assert row["shape"] == "tiny" and set(row["times_us"]) == {"fwd", "bwd"}
    assert all(set(t) == {"1", "2"} and min(t.values()) > 0 for t in row["times_us"].values())
    assert row["check"]["passed"] and all(row["check"]["bitwise_equal"].values()), row["check"]
    assert row["check"]["worst"] < 1e-4
    assert sorted(e["direction"] for e in data["entries"]) == ["bwd", "fwd"]
    table = tmp_path / "cuda_table.json"
    assert tune_cuda.main(["fold", str(archive), "--table", str(table), "--results", str(tmp_path / "kept")]) == 0
    entries = tuning.read_table(table)["entries"]
    assert len(entries) == 2 and {e["config"]["lane_samples"] for e in entries} <= {1, 2}
    B, I, J, D, K = tune_cuda.SHAPES["tiny"]
    hit = tuning.lookup(data["gpu"], "fwd", torch.float32, B, I, J, D, K)
    assert hit is not None and hit["archive"] == archive.name[:-len(".tar.gz")]
    assert (tmp_path / "kept" / archive.name).exists()


def test_cuda_tuning_lookup_under_torch_compile(tmp_path, monkeypatch):
    """fullgraph=True traces the choice: the forced value and the CPU early exit are plain
    Python, and the table is read once by table_lane_samples (torch.compiler.
    assume_constant_result), whose result the graph keeps as a constant."""
    tuning = _cuda_table(tmp_path, monkeypatch, [_cuda_entry("fwd", (4, 6, 3, 8, 8), 2, gpu="Test GPU")])
    monkeypatch.setattr(tuning, "_gpu_name", lambda index: "Test GPU")
    calls = []
    real = tuning._entries

    def counted():
        calls.append(1)
        return real()
    monkeypatch.setattr(tuning, "_entries", counted)

    def scaled(x):
        lanes = tuning.table_lane_samples(0, "fwd", "float32", 4, 6, 3, 8, 8)
        other = tuning.table_lane_samples(0, "bwd", "float32", 4, 6, 3, 8, 8)
        return x * lanes + other

    torch._dynamo.reset()
    compiled = torch.compile(scaled, fullgraph=True, backend="eager")
    x = torch.ones(3)
    assert torch.equal(compiled(x), torch.full((3,), 2.0))
    traced_reads = len(calls)
    assert torch.equal(compiled(x), torch.full((3,), 2.0)) and len(calls) == traced_reads  # a constant now

    u, W = torch.randn(4, 6, 8), torch.randn(6, 3, 8, 8)

    def choice(u, W):
        return u.sum() * tuning.lane_samples_for("fwd", (u, W), default=1)

    compiled_choice = torch.compile(choice, fullgraph=True, backend="eager")
    assert compiled_choice(u, W).item() == pytest.approx(u.sum().item())  # CPU tensors: the default
    with tuning.forced(2):
        assert compiled_choice(u, W).item() == pytest.approx(2 * u.sum().item())
    assert tuning._table_key("fwd", (u, W)) is None
    torch._dynamo.reset()
