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

import itertools
import os
import re
import shutil
import subprocess

import numpy as np

import pytest
import torch

from capsnet_ext import dispatch, ops, reference
from capsnet_ext.cuda_ops import _build, _schema
from capsnet_ext.cuda_ops import availability as cuda_availability
from capsnet_ext.cuda_ops.routing import capsule_routing_with, dynamic_routing_with

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTION_GRID = [dict(bias=b, leaky=l, detach_inner=d) for b, l, d in itertools.product((False, True), repeat=3)]


def _option_id(o):
    return "-".join(k for k, v in o.items() if v) or "plain"


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


def _emul_forward(uh, bias, iterations, leaky, return_coupling, dtype):
    B, I, J, D = uh.shape
    V = uh.new_zeros(B, J, D)
    s_all, V_all = [], []
    for _ in range(iterations):
        V_all.append(V)
        c = reference.coupling(torch.einsum("bijd,bjd->bij", uh, V), leaky)
        s = torch.einsum("bij,bijd->bjd", c, uh)
        if bias is not None:
            s = s + bias.to(uh.dtype)
        s_all.append(s)
        v = _squash_acc(s)
        V = V + v
    coupling = c.to(dtype) if return_coupling else uh.new_empty((0,), dtype=dtype)
    return v.to(dtype), coupling, torch.stack(s_all), torch.stack(V_all)


def _emul_backward(grad_v, uh, s_all, V_all, iterations, leaky, detach_inner):
    R = iterations
    r_begin = R - 1 if detach_inner else 0
    g = grad_v.to(uh.dtype)
    G = torch.zeros_like(g)
    gs_all = torch.zeros_like(s_all)
    for r in range(R - 1, r_begin - 1, -1):  # reverse sweeps
        gs_all[r] = _squash_backward(s_all[r], G + (g if r == R - 1 else 0))
        if not detach_inner and r > 0:
            c = reference.coupling(torch.einsum("bijd,bjd->bij", uh, V_all[r]), leaky)
            gc = torch.einsum("bijd,bjd->bij", uh, gs_all[r])
            gl = c * (gc - (c * gc).sum(-1, keepdim=True))
            G = G + torch.einsum("bij,bijd->bjd", gl, uh)
    gu = torch.zeros_like(uh)
    for r in range(r_begin, R):  # the final gradient sweep
        c = reference.coupling(torch.einsum("bijd,bjd->bij", uh, V_all[r]), leaky)
        gu = gu + c[..., None] * gs_all[r][:, None]
        if not detach_inner and r > 0:
            gc = torch.einsum("bijd,bjd->bij", uh, gs_all[r])
            gl = c * (gc - (c * gc).sum(-1, keepdim=True))
            gu = gu + gl[..., None] * V_all[r][:, None]
    return gu, gs_all[r_begin:].sum((0, 1))


def _emulated_impls():
    def predict(u, W):
        return torch.einsum("ijdk,bik->bijd", W, u)

    def predict_backward(g, u, W):
        return torch.einsum("ijdk,bijd->bik", W, g), torch.einsum("bijd,bik->ijdk", g, u)

    def routing_forward(u_hat, bias, iterations, leaky, detach_inner, return_coupling):
        uh = u_hat.to(_schema.acc_dtype(u_hat.dtype))
        return _emul_forward(uh, bias, iterations, leaky, return_coupling, u_hat.dtype)

    def routing_backward(grad_v, u_hat, s_all, V_all, iterations, leaky, detach_inner):
        uh = u_hat.to(s_all.dtype)
        gu, gb = _emul_backward(grad_v, uh, s_all, V_all, iterations, leaky, detach_inner)
        return gu.to(u_hat.dtype), gb.to(u_hat.dtype)

    def capsule_routing_forward(u, W, bias, iterations, leaky, detach_inner, return_coupling):
        acc = _schema.acc_dtype(u.dtype)
        uh = torch.einsum("ijdk,bik->bijd", W.to(acc), u.to(acc))
        return _emul_forward(uh, bias, iterations, leaky, return_coupling, u.dtype)

    def capsule_routing_backward(grad_v, u, W, s_all, V_all, iterations, leaky, detach_inner):
        acc = s_all.dtype
        uh = torch.einsum("ijdk,bik->bijd", W.to(acc), u.to(acc))
        gu, gb = _emul_backward(grad_v, uh, s_all, V_all, iterations, leaky, detach_inner)
        du = torch.einsum("ijdk,bijd->bik", W.to(acc), gu)
        dW = torch.einsum("bijd,bik->ijdk", gu, u.to(acc))
        return du.to(u.dtype), dW.to(u.dtype), gb.to(u.dtype)

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


@pytest.mark.parametrize("opts", OPTION_GRID, ids=_option_id)
@pytest.mark.parametrize("iterations", [1, 3])
def test_emulated_capsule_routing_matches_reference(emulated, opts, iterations):
    for shape in SHAPES_CPU:
        u, W, bias, grad_v = _inputs(*shape)
        b = bias if opts["bias"] else None
        leaves = [u, W] + ([b] if b is not None else [])
        for x in leaves:
            x.requires_grad_(True)
        kw = dict(bias=b, leaky=opts["leaky"], detach_inner=opts["detach_inner"], return_coupling=True)
        v, c = capsule_routing_with(emulated, u, W, iterations, **kw)
        v_ref, c_ref = reference.capsule_routing(u, W, iterations, **kw)
        _assert_close(v, v_ref, 1e-12, 1e-10, f"v {shape}")
        _assert_close(c, c_ref, 1e-12, 1e-10, f"c {shape}")
        assert not c.requires_grad
        grads = torch.autograd.grad(v, leaves, grad_v)
        grads_ref = torch.autograd.grad(v_ref, leaves, grad_v)
        for name, g, g_ref in zip(("u", "W", "bias"), grads, grads_ref):
            _assert_close(g, g_ref, 1e-11, 1e-9, f"grad {name} {shape}")


@pytest.mark.parametrize("opts", OPTION_GRID, ids=_option_id)
def test_emulated_dynamic_routing_matches_reference(emulated, opts):
    u, W, bias, grad_v = _inputs(3, 9, 4, 5, 2)
    u_hat = reference.predict(u, W).detach().requires_grad_(True)
    b = bias.requires_grad_(True) if opts["bias"] else None
    kw = dict(bias=b, leaky=opts["leaky"], detach_inner=opts["detach_inner"])
    v = dynamic_routing_with(emulated, u_hat, 4, **kw)
    v_ref = reference.dynamic_routing(u_hat, 4, **kw)
    _assert_close(v, v_ref, 1e-12, 1e-10, "v")
    leaves = [u_hat] + ([b] if b is not None else [])
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
    assert torch.autograd.gradcheck(lambda u, W: emulated.predict(u, W), args[:2])


def test_emulated_opcheck(emulated):
    u, W, bias, grad_v = _inputs(2, 5, 3, 4, 3)
    u.requires_grad_(True), W.requires_grad_(True), bias.requires_grad_(True)
    u_hat = reference.predict(u, W).detach().requires_grad_(True)
    fwd = emulated.capsule_routing_forward(u.detach(), W.detach(), bias.detach(), 2, False, False, False)
    cases = [
        (emulated.predict, (u, W)),
        (emulated.predict_backward, (reference.predict(u, W).detach(), u.detach(), W.detach())),
        (emulated.routing_forward, (u_hat, bias, 3, True, False, True)),
        (emulated.routing_forward, (u_hat, None, 2, False, True, False)),
        (emulated.capsule_routing_forward, (u, W, bias, 3, False, False, True)),
        (emulated.capsule_routing_forward, (u, W, None, 1, True, True, False)),
        (emulated.capsule_routing_backward, (grad_v, u.detach(), W.detach(), fwd[2], fwd[3], 2, False, False)),
        (emulated.routing_backward, (grad_v, u_hat.detach(), fwd[2], fwd[3], 2, False, False)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_emulated_compiles_without_graph_breaks(emulated):
    u, W, bias, grad_v = _inputs(3, 6, 4, 5, 2, torch.float32)
    W.requires_grad_(True)

    def step(u, W, bias):
        return capsule_routing_with(emulated, u, W, 3, bias=bias, leaky=True)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    v = compiled(u, W, bias)
    (gW,) = torch.autograd.grad(v, [W], grad_v)
    v_ref = step(u, W, bias)
    (gW_ref,) = torch.autograd.grad(v_ref, [W], grad_v)
    torch.testing.assert_close(v, v_ref)
    torch.testing.assert_close(gW, gW_ref)


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
def emulated_kernels(tmp_path_factory):
    """Path of the driver executable built from the kernel sources (skips without g++)."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no host C++ compiler ({cxx}) to build the kernels' host emulation")
    exe = str(tmp_path_factory.mktemp("emulation") / "capsnet_emulated")
    csrc = os.path.join(ROOT, "csrc")
    cmd = [cxx, "-std=c++20", "-O1", "-g", "-pthread", "-DCAPSNET_HOST_EMULATION", f"-I{csrc}",
           *_sanitizer_flags(cxx), "-x", "c++", os.path.join(csrc, "routing.cu"), os.path.join(csrc, "predict.cu"),
           "-x", "none", os.path.join(csrc, "emulation", "driver.cpp"), "-o", exe]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, f"building the kernels' host emulation failed:\n{build.stderr[-4000:]}"
    return exe


def _run_emulated(exe, workdir, arrays, meta, dtype):
    """Write the inputs, run the kernels, return the outputs by name (as float64 tensors)."""
    np_dtype = {torch.float32: np.float32, torch.float64: np.float64}[dtype]
    for name, t in arrays.items():
        t.detach().to(dtype).numpy().astype(np_dtype).tofile(workdir / f"{name}.bin")
    meta = dict(meta, dtype=str(dtype).split(".")[-1])
    (workdir / "meta.txt").write_text("\n".join(f"{k} {int(v) if isinstance(v, bool) else v}" for k, v in meta.items()))
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0", UBSAN_OPTIONS="halt_on_error=1",
               TSAN_OPTIONS="halt_on_error=1")
    result = subprocess.run([exe, str(workdir)], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, f"emulated kernels failed ({result.returncode}):\n{result.stderr[-4000:]}"
    assert "runtime error" not in result.stderr and "ThreadSanitizer" not in result.stderr, result.stderr[-4000:]
    return {p.stem: torch.from_numpy(np.fromfile(p, dtype=np_dtype)).double()
            for p in workdir.glob("*.bin") if p.stem not in arrays}


EMULATION_CASES = [
    # (B, I, J, D, K), iterations, fused, options, dtype
    ((9, 6, 33, 3, 2), 3, True, dict(bias=True, leaky=True, detach_inner=False), torch.float64),
    ((4, 5, 10, 16, 8), 3, True, dict(bias=False, leaky=False, detach_inner=True), torch.float64),
    ((11, 3, 2, 5, 9), 2, True, dict(bias=True, leaky=False, detach_inner=False), torch.float32),
    ((3, 7, 5, 4, 3), 3, False, dict(bias=True, leaky=True, detach_inner=False), torch.float64),
    ((2, 1, 1, 1, 1), 1, False, dict(bias=False, leaky=True, detach_inner=True), torch.float64),
]


@pytest.mark.parametrize("shape,iterations,fused,opts,dtype", EMULATION_CASES,
                         ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else None)
def test_kernel_sources_in_host_emulation(emulated_kernels, tmp_path, shape, iterations, fused, opts, dtype):
    B, I, J, D, K = shape
    u, W, bias, grad_v = _inputs(*shape, seed=B + I)
    u_hat = reference.predict(u, W)
    arrays = dict(grad_v=grad_v, **(dict(u=u, W=W) if fused else dict(u_hat=u_hat)))
    if opts["bias"]:
        arrays["bias"] = bias
    meta = dict(op="routing", B=B, I=I, J=J, D=D, K=K, R=iterations, fused=fused, leaky=opts["leaky"],
                detach_inner=opts["detach_inner"], bias=opts["bias"], return_coupling=True, sm_count=3)
    out = _run_emulated(emulated_kernels, tmp_path, arrays, meta, dtype)

    leaves = [u.requires_grad_(True), W.requires_grad_(True)] if fused else [u_hat.detach().requires_grad_(True)]
    b = bias.requires_grad_(True) if opts["bias"] else None
    uh = reference.predict(*leaves) if fused else leaves[0]
    v_ref, c_ref = reference.dynamic_routing(uh, iterations, bias=b, leaky=opts["leaky"],
                                             detach_inner=opts["detach_inner"], return_coupling=True)
    grads = torch.autograd.grad(v_ref, leaves + ([b] if b is not None else []), grad_v)
    tol = (1e-13, 1e-11) if dtype == torch.float64 else (2e-6, 1e-5)
    _assert_close(out["v"].view(B, J, D), v_ref, *tol, "v")
    _assert_close(out["c"].view(B, I, J), c_ref, *tol, "c")
    names = ["du", "dW"] if fused else ["grad_u_hat"]
    if opts["bias"]:
        names.append("dbias")
    for name, g in zip(names, grads):
        _assert_close(out[name].view(g.shape), g, tol[0] * 10, tol[1] * 10, name)


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
    (3, 59, 5, 7, 3),
    (5, 97, 10, 16, 8),
    (4, 123, 33, 5, 9),      # J > 32: lanes loop over the outputs
    (9, 1025, 3, 17, 2),     # B not a multiple of the 8 samples per block
    (16, 1152, 10, 16, 8),   # the MNIST layer, small batch
]


def _run(fn_ops, form, u, W, bias, iterations, opts, grad_v):
    """Forward and gradients of one routing form; returns (v, c, grads)."""
    kw = dict(bias=bias, leaky=opts["leaky"], detach_inner=opts["detach_inner"], return_coupling=True)
    if form == "capsule":
        leaves = [u, W] + ([bias] if bias is not None else [])
        v, c = fn_ops(u, W, iterations, **kw)
    else:
        u_hat = reference.predict(u, W).detach().requires_grad_(True)
        leaves = [u_hat] + ([bias] if bias is not None else [])
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
@pytest.mark.parametrize("opts", OPTION_GRID, ids=_option_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_gpu_routing_matches_reference(cuda_ops_loaded, form, opts, dtype):
    fn, ref_fn = _forms(cuda_ops_loaded)[form]
    tol = {torch.float32: (2e-5, 1e-4), torch.float64: (1e-12, 1e-10)}[dtype]
    for shape in SHAPES_GPU:
        for iterations in (1, 3):
            u, W, bias, grad_v = _inputs(*shape, dtype=torch.float64, device="cuda", seed=sum(shape))
            b = bias.requires_grad_(True) if opts["bias"] else None
            u.requires_grad_(True), W.requires_grad_(True)
            v_ref, c_ref, g_ref = _run(ref_fn, form, u, W, b, iterations, opts, grad_v)
            cast = lambda x: None if x is None else x.detach().to(dtype).requires_grad_(True)  # noqa: E731
            v, c, grads = _run(fn, form, cast(u), cast(W), cast(b), iterations, opts, grad_v.to(dtype))
            assert v.dtype == dtype and c.dtype == dtype and not c.requires_grad
            what = f"{form} {shape} R={iterations} {dtype}"
            _assert_close(v, v_ref, *tol, f"v {what}")
            _assert_close(c, c_ref, *tol, f"c {what}")
            for g, gr in zip(grads, g_ref):
                scale = max(gr.abs().max().item(), 1e-30)
                _assert_close(g / scale, gr / scale, tol[0] * 10, tol[1] * 10, f"grad {what}")


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


@gpu
def test_gpu_opcheck(cuda_ops_loaded):
    cuda = cuda_ops_loaded
    for dtype in (torch.float32, torch.float64, torch.float16):
        u, W, bias, grad_v = _inputs(3, 17, 5, 6, 4, dtype=dtype, device="cuda")
        u.requires_grad_(True), W.requires_grad_(True), bias.requires_grad_(True)
        u_hat = reference.predict(u, W).detach().requires_grad_(True)
        fwd = cuda.capsule_routing_forward(u.detach(), W.detach(), bias.detach(), 3, False, False, False)
        cases = [
            (cuda.predict, (u, W)),
            (cuda.predict_backward, (u_hat.detach(), u.detach(), W.detach())),
            (cuda.routing_forward, (u_hat, bias, 3, True, False, True)),
            (cuda.routing_forward, (u_hat, None, 1, False, True, False)),
            (cuda.capsule_routing_forward, (u, W, bias, 3, False, False, True)),
            (cuda.capsule_routing_forward, (u, W, None, 2, True, True, False)),
            (cuda.capsule_routing_backward, (grad_v, u.detach(), W.detach(), fwd[2], fwd[3], 3, False, False)),
            (cuda.routing_backward, (grad_v, u_hat.detach(), fwd[2], fwd[3], 3, False, False)),
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
    with pytest.raises(RuntimeError, match="bias must have shape"):
        cuda_ops_loaded.capsule_routing_forward(u, W, bias[:, :2], 3, False, False, False)
    with pytest.raises(RuntimeError, match="expected W of shape"):
        cuda_ops_loaded.capsule_routing_forward(u, W[:, :, :, :2], None, 3, False, False, False)
    with pytest.raises(RuntimeError, match="iterations must be >= 1"):
        cuda_ops_loaded.capsule_routing_forward(u, W, None, 0, False, False, False)
    with pytest.raises(RuntimeError, match="same dtype"):
        cuda_ops_loaded.capsule_routing_forward(u, W.double(), None, 3, False, False, False)
    fwd = cuda_ops_loaded.capsule_routing_forward(u, W, None, 3, False, False, False)
    with pytest.raises(RuntimeError, match="s_all must have shape"):
        cuda_ops_loaded.capsule_routing_backward(grad_v, u, W, fwd[2][:2], fwd[3], 3, False, False)


@gpu
def test_gpu_noncontiguous_inputs(cuda_ops_loaded):
    u, W, bias, _ = _inputs(4, 21, 5, 6, 3, dtype=torch.float64, device="cuda")
    u_t = u.transpose(0, 1).contiguous().transpose(0, 1)
    W_t = W.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    assert not u_t.is_contiguous() and not W_t.is_contiguous()
    v = capsule_routing_with(cuda_ops_loaded, u_t, W_t, 3, bias=bias)
    _assert_close(v, reference.capsule_routing(u, W, 3, bias=bias), 1e-12, 1e-10, "v")
