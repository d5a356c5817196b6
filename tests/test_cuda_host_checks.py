"""The CUDA backend's host code on the CPU: csrc/capsnet_ext_ops.cpp, compiled against the
installed torch (CPU-only is enough) with stub launchers, and the crash tracer of the GPU check.

On the H200 of 2026-12-04 (torch 2.11) ``tests/test_cuda.py::test_gpu_errors_name_the_argument``
killed its worker with SIGSEGV at its first call, a ``capsule_routing_forward`` whose bias has
the wrong shape: a refused call, whose ``TORCH_CHECK`` must raise ``RuntimeError`` naming the
argument. Nothing else of the binding had run on the CPU. Here the binding itself is built
with ``-DCAPSNET_EXT_HOST_TEST`` (CPU tensors stand in for CUDA tensors; its kernels are
registered for CPU as well, so a call takes the GPU tests' path: the package's Python
autograd registration, then a redispatch to the C++ kernel) and linked with stub launchers
that count what reaches them. Each scenario runs in a subprocess, so a crash is a failed test
that names the signal, not a dead pytest worker. Pinned:

* every refused call of every op raises ``RuntimeError`` naming the argument, repeatedly, in
  the same process (no crash, no state left behind), through the autograd path and through a
  direct redispatch to the CUDA kernel;
* a refused call reaches no launcher and no device query (the checks run before the device
  guard, allocations and launches), except the shared-memory refusal, which needs the
  device's limit and still launches nothing;
* a failed launch is reported with the kernel's name; successful calls hand the launchers
  the pointers their options call for (bias, prior, couplings, the gradients of each form);
* ``benchmarks/segv_trace.c`` prints the faulting frame's object and offset, which addr2line
  resolves to the function, with and without Python's faulthandler in front of it.

The build takes about 20 s and is cached (``CAPSNET_EXT_HOST_CHECK_CACHE``, default
``~/.cache/capsnet_ext/host_checks``) by the hash of the sources and the command.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch

from build_cache import build_cache_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")

# Stub launchers: the declarations of csrc/capsnet_kernels.h, counting calls and recording
# which pointers each launch was given; controls and counters through extern "C" functions.
STUB_SOURCE = r"""
#include <cstdint>
#include "capsnet_kernels.h"

namespace {
int g_fail = 0;
int64_t g_smem_limit = 232448;
int64_t g_smem_need = 4096;
int g_launches = 0;
int g_queries = 0;
long long g_flags = 0;
long long g_shape[6] = {0, 0, 0, 0, 0, 0};
int g_lanes = 0;  // the plan's lane_samples of the last routing launcher call
int g_misaligned = 0;  // the saved state of the last routing_backward call was not 16-byte aligned

long long bit(const void* p, int b) { return p != nullptr ? (1LL << b) : 0; }

capsnet::Status launched(long long flags) {
  ++g_launches;
  g_flags = flags;
  if (g_fail) return capsnet::Status{700, "stub_kernel"};
  return capsnet::Status{};
}

void note_shape(const capsnet::RoutingShape& s) {
  g_shape[0] = s.B; g_shape[1] = s.I; g_shape[2] = s.J; g_shape[3] = s.D; g_shape[4] = s.K; g_shape[5] = s.iterations;
}
}  // namespace

extern "C" {
void capsnet_stub_reset(int fail, long long smem_limit, long long smem_need) {
  g_fail = fail; g_smem_limit = smem_limit; g_smem_need = smem_need; g_launches = 0; g_queries = 0; g_flags = 0;
}
int capsnet_stub_launches() { return g_launches; }
int capsnet_stub_queries() { return g_queries; }
long long capsnet_stub_flags() { return g_flags; }
long long capsnet_stub_shape(int i) { return g_shape[i]; }
int capsnet_stub_lanes() { return g_lanes; }
int capsnet_stub_misaligned() { return g_misaligned; }
}

namespace capsnet {
const char* cuda_error_string(int cuda_error) { return cuda_error ? "stub error (injected)" : "no error"; }
int device_sm_count(int) { ++g_queries; return 132; }
int64_t device_smem_optin(int) { ++g_queries; return g_smem_limit; }
int64_t routing_smem_bytes(DType, const RoutingShape&, const RoutingPlan&, bool) { return g_smem_need; }

Status predict_forward(DType, const void* u, const void* W, void* u_hat, int64_t B, int64_t I, int64_t J, int64_t D,
                       int64_t K, void*) {
  g_shape[0] = B; g_shape[1] = I; g_shape[2] = J; g_shape[3] = D; g_shape[4] = K; g_shape[5] = 0;
  return launched(bit(u, 1) | bit(W, 2) | bit(u_hat, 0));
}
Status predict_backward(DType, const void* g, const void* u, const void* W, void* du, void* dW, int64_t B, int64_t I,
                        int64_t J, int64_t D, int64_t K, void*) {
  g_shape[0] = B; g_shape[1] = I; g_shape[2] = J; g_shape[3] = D; g_shape[4] = K; g_shape[5] = 0;
  return launched(bit(g, 11) | bit(u, 1) | bit(W, 2) | bit(du, 8) | bit(dW, 9));
}
Status routing_forward(DType, const RoutingShape& shape, const RoutingPlan& plan, const RoutingOptions&,
                       const void* u_hat, const void* u, const void* W, const void* bias, const void* prior, void* v,
                       void* c, void* s_all, void* V_all, void* ws, unsigned* counters, void*) {
  note_shape(shape);
  g_lanes = plan.lane_samples;
  const bool required = v && s_all && V_all && ws && counters;
  return launched(bit(u_hat, 0) | bit(u, 1) | bit(W, 2) | bit(bias, 3) | bit(prior, 4) | bit(c, 5) |
                  (required ? (1LL << 12) : 0));
}
Status routing_backward(DType, const RoutingShape& shape, const RoutingPlan& plan, const RoutingOptions&,
                        const void* grad_v, const void* u_hat, const void* u, const void* W, const void* prior,
                        const void* s_all, const void* V_all, void* grad_u_hat, void* du, void* dW, void* dbias,
                        void* dprior, void* gs_all, void* G, void* ws, unsigned* counters, void*) {
  note_shape(shape);
  g_lanes = plan.lane_samples;
  g_misaligned = (reinterpret_cast<uintptr_t>(s_all) % 16 != 0) || (reinterpret_cast<uintptr_t>(V_all) % 16 != 0);
  const bool required = grad_v && s_all && V_all && gs_all && G && ws && counters;
  return launched(bit(u_hat, 0) | bit(u, 1) | bit(W, 2) | bit(prior, 4) | bit(dbias, 6) | bit(dprior, 7) |
                  bit(du, 8) | bit(dW, 9) | bit(grad_u_hat, 10) | (required ? (1LL << 12) : 0));
}
}  // namespace capsnet
"""
FLAG_BITS = {"u_hat": 0, "u": 1, "W": 2, "bias": 3, "prior": 4, "c": 5, "dbias": 6, "dprior": 7, "du": 8,
             "dW": 9, "grad_u_hat": 10, "grad": 11, "required": 12}


def _torch_build_flags():
    from torch.utils import cpp_extension

    includes = [f"-isystem{p}" for p in cpp_extension.include_paths()]
    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    return includes, lib, abi


@pytest.fixture(scope="module")
def host_binding():
    """Path of the binding built with -DCAPSNET_EXT_HOST_TEST and the stub launchers (the
    project's binding flags: -O3, C++20, warnings as errors)."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no host C++ compiler ({cxx}) to build the binding")
    includes, lib, abi = _torch_build_flags()
    cache = build_cache_dir("CAPSNET_EXT_HOST_CHECK_CACHE", "host_checks")
    digest = hashlib.sha256(STUB_SOURCE.encode())
    for name in sorted(os.listdir(CSRC)):
        if name.endswith((".cpp", ".h")):
            with open(os.path.join(CSRC, name), "rb") as f:
                digest.update(name.encode() + f.read())
    stub = os.path.join(cache, f"stub_{hashlib.sha256(STUB_SOURCE.encode()).hexdigest()[:16]}.cpp")
    if not os.path.exists(stub):
        with open(stub + ".tmp", "w") as f:
            f.write(STUB_SOURCE)
        os.replace(stub + ".tmp", stub)
    cmd = [cxx, "-std=c++20", "-O3", "-g", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror", abi,
           "-DCAPSNET_EXT_HOST_TEST", *includes, f"-I{CSRC}", os.path.join(CSRC, "capsnet_ext_ops.cpp"), stub,
           f"-L{lib}", "-lc10", "-ltorch", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]
    digest.update(" ".join(cmd).encode() + torch.__version__.encode())
    path = os.path.join(cache, f"capsnet_host_check_{digest.hexdigest()[:16]}.so")
    if not os.path.exists(path):
        fd, partial = tempfile.mkstemp(dir=cache, prefix=".building-", suffix=".so")
        os.close(fd)
        proc = subprocess.run(cmd + ["-o", partial], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            os.unlink(partial)
        assert proc.returncode == 0, f"building the binding failed:\n{proc.stderr[-6000:]}"
        os.replace(partial, path)
    return path


# The scenarios, run by a fresh interpreter: loads the binding, registers the package's fakes
# and autograd for it, and prints one JSON object per line.
SCENARIO = textwrap.dedent(r"""
    import ctypes, json, sys
    import torch
    sys.path.insert(0, sys.argv[3])
    lib_path, scenario = sys.argv[1], sys.argv[2]
    torch.ops.load_library(lib_path)
    stub = ctypes.CDLL(lib_path)
    stub.capsnet_stub_flags.restype = ctypes.c_longlong
    stub.capsnet_stub_shape.restype = ctypes.c_longlong
    stub.capsnet_stub_reset.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    from capsnet_ext.cuda_ops import _schema
    from capsnet_ext.cuda_ops.predict import predict_with
    from capsnet_ext.cuda_ops.routing import capsule_routing_with, dynamic_routing_with
    _schema.register("capsnet_ext")
    ops = torch.ops.capsnet_ext
    CUDA = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)

    class Redispatch:  # the op's CUDA kernel itself, below the autograd registration
        def __getattr__(self, name):
            op = getattr(ops, name).default
            return lambda *args: op.redispatch(CUDA, *args)

    def emit(**kw):
        print(json.dumps(kw), flush=True)

    g = torch.Generator().manual_seed(0)
    def randn(*size, dtype=torch.float32):
        return torch.randn(*size, generator=g, dtype=dtype)

    B, I, J, D, K, R = 2, 5, 3, 4, 3, 3
    u, W, bias, grad_v = randn(B, I, K), randn(I, J, D, K), randn(J, D), randn(B, J, D)
    prior = randn(I, J)
    u_hat = randn(B, I, J, D)

    def refused(o, fwd, fwd_hat):
        # (what the message must contain, the call): every check of every op.
        return [
            # the calls of tests/test_cuda.py::test_gpu_errors_name_the_argument, in its order
            ("bias must have shape", lambda: o.capsule_routing_forward(u, W, bias[:, :2], None, R, False, False, False, 1.0)),
            ("prior must have shape", lambda: o.capsule_routing_forward(u, W, None, bias, R, False, False, False, 1.0)),
            ("temperature must be a positive", lambda: o.capsule_routing_forward(u, W, None, None, R, False, False, False, 0.0)),
            ("expected W of shape", lambda: o.capsule_routing_forward(u, W[:, :, :, :2], None, None, R, False, False, False, 1.0)),
            ("iterations must be >= 1", lambda: o.capsule_routing_forward(u, W, None, None, 0, False, False, False, 1.0)),
            ("same dtype", lambda: o.capsule_routing_forward(u, W.double(), None, None, R, False, False, False, 1.0)),
            ("s_all must have shape", lambda: o.capsule_routing_backward(grad_v, u, W, None, fwd[2][:2], fwd[3], R, False, False, False, 1.0)),
            # the rest of the binding's checks
            ("u must have 3 dimensions", lambda: o.capsule_routing_forward(u[0], W, None, None, R, False, False, False, 1.0)),
            ("W must not be empty", lambda: o.capsule_routing_forward(u, W[:, :0], None, None, R, False, False, False, 1.0)),
            ("u must be float16, bfloat16, float32 or float64", lambda: o.capsule_routing_forward(u.int(), W.int(), None, None, R, False, False, False, 1.0)),
            ("bias must have 2 dimensions", lambda: o.capsule_routing_forward(u, W, bias[0], None, R, False, False, False, 1.0)),
            ("bias has dtype Double", lambda: o.capsule_routing_forward(u, W, bias.double(), None, R, False, False, False, 1.0)),
            ("temperature must be a positive", lambda: o.capsule_routing_forward(u, W, None, None, R, False, False, False, float("nan"))),
            ("iterations must be >= 1", lambda: o.capsule_routing_forward(u, W, None, None, (1 << 20) + 1, False, False, False, 1.0)),
            ("u_hat must have 4 dimensions", lambda: o.routing_forward(u, None, None, R, False, False, False, 1.0)),
            ("bias must have shape", lambda: o.routing_forward(u_hat, bias[:2], None, R, False, False, False, 1.0)),
            ("prior must have shape", lambda: o.routing_forward(u_hat, None, prior[:, :2], R, False, False, False, 1.0)),
            ("temperature must be a positive", lambda: o.routing_forward(u_hat, None, None, R, False, False, False, -1.0)),
            ("grad_v must have shape", lambda: o.routing_backward(grad_v[:1], u_hat, None, fwd_hat[2], fwd_hat[3], R, False, False, False, 1.0)),
            ("V_all must be a Float tensor", lambda: o.routing_backward(grad_v, u_hat, None, fwd_hat[2], fwd_hat[3].double(), R, False, False, False, 1.0)),
            ("prior must have shape", lambda: o.capsule_routing_backward(grad_v, u, W, prior.t(), fwd[2], fwd[3], R, False, False, False, 1.0)),
            ("grad_v has dtype Double", lambda: o.capsule_routing_backward(grad_v.double(), u, W, None, fwd[2], fwd[3], R, False, False, False, 1.0)),
            ("expected W of shape", lambda: o.predict(u, W[:2])),
            ("grad_u_hat must have shape", lambda: o.predict_backward(u_hat[:, :2], u, W)),
            ("grad_u_hat must have 4 dimensions", lambda: o.predict_backward(u, u, W)),
            ("lane_samples must be 0 (the default), 1 or 2", lambda: o.capsule_routing_forward(u, W, None, None, R, False, False, False, 1.0, 3)),
        ]

    def run_refused(o, label):
        stub.capsnet_stub_reset(0, 232448, 4096)
        fwd = o.capsule_routing_forward(u, W, None, None, R, False, False, False, 1.0)
        fwd_hat = o.routing_forward(u_hat, None, None, R, False, False, False, 1.0)
        for expect, call in refused(o, fwd, fwd_hat):
            for attempt in range(3):
                stub.capsnet_stub_reset(0, 232448, 4096)
                try:
                    call()
                    emit(path=label, expect=expect, raised=None)
                except Exception as exc:
                    emit(path=label, expect=expect, raised=type(exc).__name__, message=str(exc).splitlines()[0],
                         launches=stub.capsnet_stub_launches(), queries=stub.capsnet_stub_queries())

    if scenario == "refused":
        run_refused(ops, "autograd")
        run_refused(Redispatch(), "redispatch")
        # and a good call still works after all of them
        stub.capsnet_stub_reset(0, 232448, 4096)
        v = capsule_routing_with(ops, u, W, R, bias=bias)
        emit(path="after", shape=list(v.shape), launches=stub.capsnet_stub_launches())
    elif scenario == "smem":
        stub.capsnet_stub_reset(0, 1024, 4096)
        try:
            capsule_routing_with(ops, u, W, R)
            emit(raised=None)
        except Exception as exc:
            emit(raised=type(exc).__name__, message=str(exc).splitlines()[0], launches=stub.capsnet_stub_launches(),
                 queries=stub.capsnet_stub_queries())
    elif scenario == "kernel-failure":
        for name, call in [("predict", lambda: predict_with(ops, u, W)),
                           ("capsule_routing", lambda: capsule_routing_with(ops, u, W, R)),
                           ("dynamic_routing", lambda: dynamic_routing_with(ops, u_hat, R))]:
            stub.capsnet_stub_reset(1, 232448, 4096)
            try:
                call()
                emit(op=name, raised=None)
            except Exception as exc:
                emit(op=name, raised=type(exc).__name__, message=str(exc).splitlines()[0])
    elif scenario == "launches":
        def record(name, fn):
            stub.capsnet_stub_reset(0, 232448, 4096)
            out = fn()
            emit(name=name, flags=stub.capsnet_stub_flags(), launches=stub.capsnet_stub_launches(),
                 shape=[stub.capsnet_stub_shape(i) for i in range(6)],
                 out=[list(t.shape) for t in (out if isinstance(out, (tuple, list)) else [out])])
        leaf = lambda t: t.detach().clone().requires_grad_(True)
        record("capsule plain", lambda: ops.capsule_routing_forward(u, W, None, None, R, False, False, False, 1.0))
        record("capsule bias prior coupling", lambda: ops.capsule_routing_forward(u, W, bias, prior, R, True, False, True, 0.5))
        record("given plain", lambda: ops.routing_forward(u_hat, None, None, R, False, False, False, 1.0))
        fwd = ops.capsule_routing_forward(u, W, bias, prior, R, False, False, False, 1.0)
        record("capsule backward bias prior", lambda: ops.capsule_routing_backward(grad_v, u, W, prior, fwd[2], fwd[3], R, False, False, True, 1.0))
        record("capsule backward plain", lambda: ops.capsule_routing_backward(grad_v, u, W, None, fwd[2], fwd[3], R, False, True, False, 1.0))
        fwd_hat = ops.routing_forward(u_hat, None, None, R, False, False, False, 1.0)
        record("given backward", lambda: ops.routing_backward(grad_v, u_hat, None, fwd_hat[2], fwd_hat[3], R, False, False, False, 1.0))
        record("predict", lambda: ops.predict(u, W))
        record("predict backward", lambda: ops.predict_backward(u_hat, u, W))
        # through autograd: the registered backward reaches the backward op with the forward's options
        ul, Wl, bl, pl = leaf(u), leaf(W), leaf(bias), leaf(prior)
        v = capsule_routing_with(ops, ul, Wl, R, bias=bl, prior=pl)
        record("autograd backward", lambda: torch.autograd.grad(v, [ul, Wl, bl, pl], grad_v))
        # non-contiguous inputs are accepted (made contiguous after the checks)
        record("non-contiguous", lambda: ops.capsule_routing_forward(u.transpose(0, 1).contiguous().transpose(0, 1), W, bias.t().contiguous().t(), None, R, False, False, False, 1.0))
    elif scenario == "aligned":
        # saved state handed in as contiguous views at a 4-byte offset: the kernels read its rows
        # 128 bits at a time, so the binding must pass aligned copies
        fwd = ops.capsule_routing_forward(u, W, None, None, R, False, False, False, 1.0)

        def shifted(t):
            big = torch.empty(t.numel() + 1, dtype=t.dtype)
            view = big[1:].view(t.shape)
            view.copy_(t)
            return view
        s_view, V_view = shifted(fwd[2]), shifted(fwd[3])
        for name, args in (("views", (s_view, V_view)), ("own", (fwd[2], fwd[3]))):
            stub.capsnet_stub_reset(0, 232448, 4096)
            ops.capsule_routing_backward(grad_v, u, W, None, *args, R, False, False, False, 1.0)
            emit(name=name, offset=args[0].data_ptr() % 16, misaligned=stub.capsnet_stub_misaligned(),
                 launches=stub.capsnet_stub_launches())
    elif scenario == "lanes":
        from capsnet_ext.cuda_ops import tuning

        # the plan's lane_samples as the launchers get it: asked for directly, forced through the
        # Python wrappers and their autograd backward, and at sizes without a two-sample instance
        u8, W8, uh8 = randn(B, I, 8), randn(I, J, 8, 8), randn(B, I, J, 8)
        g8 = randn(B, J, 8)

        def lanes(name, fn):
            stub.capsnet_stub_reset(0, 232448, 4096)
            fn()
            emit(name=name, lanes=stub.capsnet_stub_lanes(), launches=stub.capsnet_stub_launches())
        lanes("default", lambda: ops.capsule_routing_forward(u8, W8, None, None, R, False, False, False, 1.0))
        lanes("asked 1", lambda: ops.capsule_routing_forward(u8, W8, None, None, R, False, False, False, 1.0, 1))
        lanes("asked 2", lambda: ops.capsule_routing_forward(u8, W8, None, None, R, False, False, False, 1.0, 2))
        lanes("asked 2 given", lambda: ops.routing_forward(uh8, None, None, R, False, False, False, 1.0, 2))
        lanes("asked 2 float64", lambda: ops.capsule_routing_forward(u8.double(), W8.double(), None, None, R, False, False, False, 1.0, 2))
        lanes("asked 2 Dout 4", lambda: ops.capsule_routing_forward(u, W, None, None, R, False, False, False, 1.0, 2))
        with tuning.forced(2):
            lanes("forced forward", lambda: capsule_routing_with(ops, u8, W8, R))
            ul, Wl = u8.clone().requires_grad_(True), W8.clone().requires_grad_(True)
            v = capsule_routing_with(ops, ul, Wl, R)
            lanes("forced backward", lambda: torch.autograd.grad(v, [ul, Wl], g8))
            uhl = uh8.clone().requires_grad_(True)
            vh = dynamic_routing_with(ops, uhl, R)
            lanes("forced given backward", lambda: torch.autograd.grad(vh, [uhl], g8))
            ul2, Wl2 = u8.clone().requires_grad_(True), W8.clone().requires_grad_(True)
            v2 = capsule_routing_with(ops, ul2, Wl2, R)
        # outside the context: the backward runs the forward's choice
        lanes("inherited backward", lambda: torch.autograd.grad(v2, [ul2, Wl2], g8))
        with tuning.forced(1):
            ul3, Wl3 = u8.clone().requires_grad_(True), W8.clone().requires_grad_(True)
            v3 = capsule_routing_with(ops, ul3, Wl3, R)
        with tuning.forced(2):
            lanes("forced over inherited", lambda: torch.autograd.grad(v3, [ul3, Wl3], g8))
""")


def _run_scenario(library, scenario):
    """Runs a scenario in a fresh interpreter with the faulthandler on; returns its JSON lines.
    A crash fails with the signal and the output (the native stack, when segv_trace.so is
    preloaded through CAPSNET_EXT_HOST_CHECK_PRELOAD)."""
    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    preload = os.environ.get("CAPSNET_EXT_HOST_CHECK_PRELOAD")
    if preload:
        env["LD_PRELOAD"] = preload
    proc = subprocess.run([sys.executable, "-c", SCENARIO, library, scenario, ROOT], capture_output=True, text=True,
                          env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, (
        f"scenario {scenario!r} ended with {'signal ' + str(-proc.returncode) if proc.returncode < 0 else proc.returncode}:"
        f"\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_every_refused_call_raises_naming_the_argument(host_binding):
    """The calls of test_gpu_errors_name_the_argument and every other check of the binding,
    three times each in one process, through the autograd registration and through a direct
    redispatch to the CUDA kernel: RuntimeError with the argument's name, nothing launched,
    no device queried; a good call still runs after them."""
    rows = _run_scenario(host_binding, "refused")
    refused = [r for r in rows if r["path"] in ("autograd", "redispatch")]
    assert len(refused) == 2 * 3 * 26, len(refused)
    for r in refused:
        assert r["raised"] == "RuntimeError", r
        assert r["expect"] in r["message"] and r["message"].startswith("capsnet_ext: "), r
        assert r["launches"] == 0 and r["queries"] == 0, r  # refused before the device is used
    [after] = [r for r in rows if r["path"] == "after"]
    assert after["shape"] == [2, 3, 4] and after["launches"] == 1


def test_lane_samples_reach_the_plan(host_binding):
    """The ops' lane_samples argument (0: the default, one sample per lane) reaches the launchers'
    plan; tuning.forced sets it for the Python wrappers' forward and their registered backward;
    a backward run outside the context runs the forward's choice, a context around the backward
    overrides it; sizes and dtypes without a two-sample instance (Dout = 4, float64) get one."""
    rows = {r["name"]: r for r in _run_scenario(host_binding, "lanes")}
    expected = {"default": 1, "asked 1": 1, "asked 2": 2, "asked 2 given": 2, "asked 2 float64": 1,
                "asked 2 Dout 4": 1, "forced forward": 2, "forced backward": 2, "forced given backward": 2,
                "inherited backward": 2, "forced over inherited": 2}
    assert {name: r["lanes"] for name, r in rows.items()} == expected
    assert all(r["launches"] == 1 for r in rows.values()), rows


def test_saved_state_reaches_the_kernels_aligned(host_binding):
    """s_all and V_all passed to the backward op as contiguous views at a 4-byte offset reach the
    launcher 16-byte aligned (the kernels read them with 128-bit loads)."""
    rows = {r["name"]: r for r in _run_scenario(host_binding, "aligned")}
    assert rows["views"]["offset"] != 0 and rows["views"]["misaligned"] == 0 and rows["views"]["launches"] == 1
    assert rows["own"]["misaligned"] == 0


def test_capsules_beyond_the_shared_memory_limit_are_refused_before_any_launch(host_binding):
    [row] = _run_scenario(host_binding, "smem")
    assert row["raised"] == "RuntimeError", row
    assert "needs 4096 bytes of shared memory per block, more than the 1024 bytes" in row["message"], row
    assert row["launches"] == 0 and row["queries"] == 1, row


def test_a_failed_launch_is_reported_with_the_kernels_name(host_binding):
    rows = _run_scenario(host_binding, "kernel-failure")
    assert [r["op"] for r in rows] == ["predict", "capsule_routing", "dynamic_routing"]
    for r in rows:
        assert r["raised"] == "RuntimeError", r
        assert r["message"] == "capsnet_ext: CUDA kernel stub_kernel failed: stub error (injected)", r


def _flags(*names):
    return sum(1 << FLAG_BITS[n] for n in names)


def test_launchers_get_the_pointers_the_options_call_for(host_binding):
    rows = {r["name"]: r for r in _run_scenario(host_binding, "launches")}
    expected = {
        "capsule plain": _flags("u", "W", "required"),
        "capsule bias prior coupling": _flags("u", "W", "bias", "prior", "c", "required"),
        "given plain": _flags("u_hat", "required"),
        "capsule backward bias prior": _flags("u", "W", "prior", "dbias", "dprior", "du", "dW", "required"),
        "capsule backward plain": _flags("u", "W", "du", "dW", "required"),
        "given backward": _flags("u_hat", "grad_u_hat", "required"),
        "predict": _flags("u", "W", "u_hat"),
        "predict backward": _flags("grad", "u", "W", "du", "dW"),
        "autograd backward": _flags("u", "W", "prior", "dbias", "dprior", "du", "dW", "required"),
        "non-contiguous": _flags("u", "W", "bias", "required"),
    }
    assert set(rows) == set(expected)
    for name, flags in expected.items():
        assert rows[name]["flags"] == flags, (name, rows[name], flags)
        assert rows[name]["launches"] == 1, rows[name]
    B, I, J, D, K, R = 2, 5, 3, 4, 3, 3
    assert rows["capsule plain"]["shape"] == [B, I, J, D, K, R]
    assert rows["given plain"]["shape"][:4] == [B, I, J, D] and rows["given plain"]["shape"][5] == R
    assert rows["capsule plain"]["out"] == [[B, J, D], [0], [R, B, J, D], [R, B, J, D]]
    assert rows["capsule bias prior coupling"]["out"][1] == [B, I, J]
    assert rows["capsule backward bias prior"]["out"] == [[B, I, K], [I, J, D, K], [J, D], [I, J]]
    assert rows["autograd backward"]["out"] == [[B, I, K], [I, J, D, K], [J, D], [I, J]]


# ---------------------------------------------------------------------------------------------
# benchmarks/segv_trace.c, the GPU check's crash tracer
# ---------------------------------------------------------------------------------------------

CRASH_SOURCE = "int capsnet_crash_here(volatile int* p) { return *p + 1; }\n"


@pytest.fixture(scope="module")
def tracer(tmp_path_factory):
    cc = os.environ.get("CC", "gcc")
    if shutil.which(cc) is None or shutil.which("addr2line") is None:
        pytest.skip(f"needs {cc} and addr2line")
    d = tmp_path_factory.mktemp("segv_trace")
    so = d / "segv_trace.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O0", "-Wall", "-Wextra", "-Werror", "-o", str(so),
                    os.path.join(ROOT, "benchmarks", "segv_trace.c"), "-ldl"], check=True, capture_output=True)
    (d / "crash.c").write_text(CRASH_SOURCE)
    crash = d / "libcrash.so"
    subprocess.run([cc, "-shared", "-fPIC", "-g", "-O0", "-o", str(crash), str(d / "crash.c")], check=True,
                   capture_output=True)
    return so, crash


def _crash(tracer, *python_flags):
    so, crash = tracer
    code = f"import ctypes; ctypes.CDLL({str(crash)!r}).capsnet_crash_here(None)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
    env["LD_PRELOAD"] = str(so)
    proc = subprocess.run([sys.executable, *python_flags, "-c", code], capture_output=True, text=True, env=env,
                          timeout=60)
    return proc, crash


def _resolve(line):
    _, obj, off = line.split()[:3]
    out = subprocess.run(["addr2line", "-f", "-e", obj, off], capture_output=True, text=True, check=True).stdout
    return out.split()[0]


def test_crash_tracer_names_the_faulting_function(tracer):
    """Without faulthandler: the fault's own pc and address, the offset addr2line resolves to
    the function, the runtime libraries; the process still dies by the signal."""
    proc, crash = _crash(tracer)
    assert proc.returncode == -11, (proc.returncode, proc.stderr[-3000:])
    err = proc.stderr
    assert "[native] signal 11 (Segmentation fault): si_code 1, fault address (nil)" in err, err[-3000:]
    [pc] = [line for line in err.splitlines() if line.startswith("[native-pc]")]
    assert str(crash) in pc and "capsnet_crash_here" in pc
    assert _resolve(pc) == "capsnet_crash_here"
    frames = [line for line in err.splitlines() if line.startswith("[native-offset]") and str(crash) in line]
    assert frames and _resolve(frames[0]) == "capsnet_crash_here"
    assert "[native-lib] " in err and err.rstrip().endswith("[native] end of native stack")


def test_crash_tracer_behind_faulthandler(tracer):
    """With Python's faulthandler first (as under -X faulthandler or pytest): both stacks are
    printed, and the native frames still reach the faulting function."""
    proc, crash = _crash(tracer, "-X", "faulthandler")
    assert proc.returncode == -11, (proc.returncode, proc.stderr[-3000:])
    err = proc.stderr
    assert "Fatal Python error: Segmentation fault" in err
    assert "[native] signal 11" in err and "re-raised it" in err
    frames = [line for line in err.splitlines() if line.startswith("[native-offset]") and str(crash) in line]
    assert frames and _resolve(frames[0]) == "capsnet_crash_here", err[-3000:]


# ---------------------------------------------------------------------------------------------
# benchmarks.gpu_check crash-probe: the GPU check's reproducers of the host crash
# ---------------------------------------------------------------------------------------------

def test_crash_probes_are_valid_python_and_expect_a_raise():
    from benchmarks import gpu_check

    assert {"torch-error", "ext-error-cpu-tensors", "ext-error-redispatch", "ext-error-autograd"} <= set(
        gpu_check.CRASH_PROBES)
    for name, (env, code, expected) in gpu_check.CRASH_PROBES.items():
        compile(gpu_check._PROBE_PRELUDE + code, name, "exec")
        assert "attempt(" in code and expected


def test_toolchain_lines_describe_a_built_library(host_binding, monkeypatch):
    """The crash probe's toolchain record, on the binding built here: the compiler recorded in
    the library, its C++ runtime and unwinder loaded from shared objects (no private static
    copy, which would give the process two unwinders)."""
    import importlib.machinery
    import importlib.util

    from benchmarks import gpu_check

    if shutil.which("readelf") is None or shutil.which("nm") is None:
        pytest.skip("needs readelf and nm")
    real = importlib.util.find_spec
    spec = importlib.machinery.ModuleSpec("capsnet_ext._C", None, origin=host_binding)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == "capsnet_ext._C" else real(name, *a))
    lines = gpu_check._toolchain_lines()
    text = "\n".join(lines)
    assert f"library: {host_binding}" in text
    assert "compilers recorded in the library: GCC" in text, text
    needed = next(line for line in lines if line.startswith("NEEDED: "))
    assert "libstdc++.so.6" in needed and "libc10.so" in needed, needed
    assert "(a private static copy): none" in text, text
