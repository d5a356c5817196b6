"""The GEMM-tile design of the Triton ``capsule_routing`` (``capsnet_ext/triton_ops/_gemm_*``):
the learned prior and the softmax temperature against the reference (float64, every gradient,
gradcheck), launch counts (every Triton kernel and every PyTorch kernel counted), bitwise
determinism, the squash clamp at tiny ``|s|^2``, 64-bit offsets, the float32 dot precision
policy, the autotuning cache and the device guard.

Without a GPU these run in Triton's CPU interpreter (tests/conftest.py); shapes are tiny.
"""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import capsnet_ext as ce
from capsnet_ext import reference

triton_ops = pytest.importorskip("capsnet_ext.triton_ops")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from capsnet_ext.triton_ops import _gemm_core, _gemm_kernels  # noqa: E402


def require_triton(device):
    reason = ce.unavailable_reason("triton", device)
    if reason is not None:
        pytest.skip(f"Triton backend unavailable on {device}: {reason}")


def make(shape, dtype, device, seed, bias=True, prior=True):
    B, I, J, Din, Dout = shape
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * scale
    leaf = lambda t: t.to(device=device, dtype=dtype).requires_grad_()
    u, W = leaf(rnd(B, I, Din)), leaf(rnd(I, J, Dout, Din, scale=0.5))
    b = leaf(rnd(J, Dout, scale=0.3)) if bias else None
    p = leaf(rnd(I, J)) if prior else None
    return u, W, b, p


def forward_backward(backend, u, W, b, p, iterations, seed=0, **options):
    out = ce.capsule_routing(u, W, iterations, bias=b, prior=p, backend=backend, **options)
    v = out[0] if isinstance(out, tuple) else out
    g = torch.Generator().manual_seed(seed + 1)
    grad_v = torch.randn(v.shape, generator=g, dtype=torch.float64).to(v)
    inputs = [t for t in (u, W, b, p) if t is not None]
    grads = torch.autograd.grad(v, inputs, grad_v)
    outs = list(out) if isinstance(out, tuple) else [out]
    return [o.detach() for o in outs] + list(grads)


# ---------------------------------------------------------------- prior and temperature
PRIOR_CASES = [  # shape (B, I, J, Din, Dout), iterations, options, prior, temperature
    ((2, 5, 3, 3, 4), 1, dict(), True, 1.0),
    ((2, 5, 3, 3, 4), 3, dict(return_coupling=True), True, 1.0),
    ((3, 7, 3, 5, 3), 3, dict(leaky=True), False, 0.6),
    ((3, 7, 4, 2, 5), 4, dict(leaky=True, return_coupling=True), True, 1.7),
    ((2, 6, 3, 3, 4), 3, dict(detach_inner=True), True, 0.8),
    ((2, 6, 3, 3, 4), 2, dict(detach_inner=True, leaky=True, return_coupling=True), True, 1.0),
]


@pytest.mark.parametrize("shape,iterations,options,has_prior,temperature", PRIOR_CASES)
def test_prior_and_temperature_match_reference(device, shape, iterations, options, has_prior,
                                               temperature):
    require_triton(device)
    u, W, b, p = make(shape, torch.float64, device, seed=iterations + len(options),
                      prior=has_prior)
    options = dict(options, temperature=temperature)
    expected = forward_backward("reference", u, W, b, p, iterations, **options)
    actual = forward_backward("triton", u, W, b, p, iterations, **options)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


SIZES = [  # B, I, J, Din, Dout: J 3/10/17, Dout 4/16/24, Din 5/8; B not a multiple of the tile
    (17, 4, 3, 5, 4),
    (19, 3, 10, 8, 16),
    (3, 3, 17, 5, 24),
    (2, 3, 10, 8, 4),
]


@pytest.mark.parametrize("shape", SIZES)
def test_sizes_with_every_option(device, shape):
    """Masks and padding: J, Dout and Din padded to powers of two (Dout to at least 16), and a
    partial sample tile, with bias, leaky, prior, temperature and the couplings returned."""
    require_triton(device)
    B, I, J, Din, D = shape
    options = dict(leaky=True, temperature=0.9, return_coupling=True)
    if _gemm_core.capsule_size_limit_reason(J, D, Din, torch.float64) is not None:
        # float64 tiles this large exceed the GPU's shared memory (the H200 refused J=17,
        # Dout=24 at 294,912 bytes): refused up front by name, and checked in float32 instead.
        u, W, b, p = make(shape, torch.float64, device, seed=sum(shape))
        with pytest.raises(NotImplementedError, match="shared memory"):
            forward_backward("triton", u, W, b, p, 3, **options)
        u, W, b, p = make(shape, torch.float32, device, seed=sum(shape))
        expected = forward_backward("reference", *(None if t is None else t.detach().double()
                                                   .requires_grad_() for t in (u, W, b, p)), 3,
                                    **options)
        actual = forward_backward("triton", u, W, b, p, 3, **options)
        tolerance = dict(rtol=2e-3, atol=2e-4) if device.type == "cuda" else dict(rtol=1e-4,
                                                                                  atol=1e-5)
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a.double(), e, **tolerance)
        return
    u, W, b, p = make(shape, torch.float64, device, seed=sum(shape))
    expected = forward_backward("reference", u, W, b, p, 3, **options)
    actual = forward_backward("triton", u, W, b, p, 3, **options)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_prior_gradient_alone(device):
    """Gradient wanted for the prior only (u, W, bias constants): the prior path runs alone."""
    require_triton(device)
    u, W, b, p = make((2, 5, 3, 3, 4), torch.float64, device, seed=8)
    grads = []
    for backend in ("reference", "triton"):
        v = ce.capsule_routing(u.detach(), W.detach(), 3, bias=b.detach(), prior=p,
                               temperature=0.9, backend=backend)
        grads.append(torch.autograd.grad((v * v).sum(), [p])[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("iterations,options", [(3, dict(temperature=0.7)),
                                                (2, dict(leaky=True, temperature=1.3))])
def test_gradcheck_with_prior(device, iterations, options):
    require_triton(device)
    u, W, b, p = make((2, 3, 3, 2, 3), torch.float64, device, seed=21)
    fn = lambda u, W, b, p: ce.capsule_routing(u, W, iterations, bias=b, prior=p,
                                               backend="triton", **options)
    assert torch.autograd.gradcheck(fn, (u, W, b, p), eps=1e-6, atol=1e-7, rtol=1e-5,
                                    fast_mode=True)


def test_prior_across_programs(device, monkeypatch):
    """Forced splits: the sums over input capsules and over samples (dW, d prior, d bias)
    cross programs and go through the split-summing kernel."""
    require_triton(device)
    monkeypatch.setattr(_gemm_core, "FORCE_SPLITS", (3, 2))
    u, W, b, p = make((33, 9, 3, 3, 4), torch.float64, device, seed=4)
    plan = _gemm_core.Plan(33, 9, 3, 4, 3, u.device,
                           _gemm_core.default_config(33, 9, 3, 4, 3))
    assert plan.n_isplit == 3 and plan.n_bsplit == 2
    options = dict(temperature=0.8, return_coupling=True)
    expected = forward_backward("reference", u, W, b, p, 3, **options)
    actual = forward_backward("triton", u, W, b, p, 3, **options)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- launch counts
# Operators that allocate or make views: no kernel runs.
NO_KERNEL_OPS = {"empty", "empty_strided", "select", "slice", "view", "alias", "as_strided",
                 "detach", "t", "transpose", "permute", "unsqueeze", "squeeze", "expand",
                 "_reshape_alias", "_unsafe_view", "unbind", "split", "lift_fresh"}


class TorchKernelCounter(TorchDispatchMode):
    """Counts the PyTorch operators that run a kernel (anything but allocation and views),
    outside Triton launches (the interpreter moves tensors with PyTorch operators of its own)."""

    def __init__(self):
        super().__init__()
        self.ops = []
        self.in_launch = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.in_launch and func.overloadpacket.__name__ not in NO_KERNEL_OPS:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_launches(monkeypatch):
    """Records every launch of a Triton kernel of capsnet_ext (the interpreter's or the JIT's
    ``run``) with its constexpr arguments, and every PyTorch kernel."""
    launches = []
    kernel_class = type(_gemm_kernels._fwd_sweep_kernel)
    original = kernel_class.run
    counter = TorchKernelCounter()

    def run(self, *args, **kwargs):
        if self.fn.__module__.startswith("capsnet_ext"):
            launches.append((self.fn.__name__, kwargs))
        counter.in_launch += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            counter.in_launch -= 1

    monkeypatch.setattr(kernel_class, "run", run)
    with counter:
        yield launches, counter.ops


@pytest.mark.parametrize("iterations", [1, 3])
@pytest.mark.parametrize("splits", [None, (2, 2)])
def test_launch_counts(device, monkeypatch, iterations, splits):
    """Forward at most R + 1 launches, backward at most R + 3, counting PyTorch kernels."""
    require_triton(device)
    monkeypatch.setattr(_gemm_core, "FORCE_SPLITS", splits)
    u, W, b, p = make((17, 6, 3, 3, 4), torch.float32, device, seed=iterations)
    grad_v = torch.randn(17, 3, 4, device=device)
    forward_backward("triton", u, W, b, p, iterations)  # compile, tune, cache
    with count_launches(monkeypatch) as (launches, torch_ops):
        v = triton_ops.capsule_routing(u, W, iterations, bias=b, prior=p)
    forward = len(launches) + len(torch_ops)
    assert forward <= iterations + 1, (launches, torch_ops)
    assert [name for name, _ in launches].count("_fwd_sweep_kernel") == iterations
    with count_launches(monkeypatch) as (launches, torch_ops):
        torch.autograd.grad(v, [u, W, b, p], grad_v)
    backward = len(launches) + len(torch_ops)
    assert backward <= iterations + 3, (launches, torch_ops)
    names = [name for name, _ in launches]
    if "_sum_splits_kernel" not in names:  # no sample splits: the gradient sweeps write the outputs
        assert backward <= iterations + 2
    if splits is None and device.type == "cpu":  # the interpreter's plan splits nothing
        assert "_sum_splits_kernel" not in names


def test_no_atomics_in_the_kernels():
    source = open(_gemm_kernels.__file__).read()
    assert "atomic_" not in source


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_deterministic(device, monkeypatch, dtype):
    """Every cross-program sum runs in a fixed order: repeated runs agree bit for bit."""
    require_triton(device)
    monkeypatch.setattr(_gemm_core, "FORCE_SPLITS", (3, 2))
    u, W, b, p = make((19, 9, 3, 3, 4), dtype, device, seed=2)
    runs = [forward_backward("triton", u, W, b, p, 3, leaky=True, temperature=0.9)
            for _ in range(2)]
    for a, e in zip(*runs):
        assert torch.equal(a, e)


# ---------------------------------------------------------------- squash clamp
@pytest.mark.parametrize("dtype,scale", [(torch.float64, 1e-160), (torch.float32, 1e-21)])
@pytest.mark.parametrize("op", ["capsule_routing", "dynamic_routing"])
def test_squash_backward_clamps_tiny_norms(device, op, dtype, scale):
    """``0 < |s|^2 <`` the smallest normal number: the reference clamps ``|s|^2`` there before
    the square root, so ``|s|`` is ``sqrt(tiny)``; the kernels must do the same (on a GPU the
    approximate square root would otherwise flush the subnormal to 0 and divide by it). The
    interpreter has no flush, so this checks the clamp itself: without it the gradient is
    ``|s| / sqrt(tiny)`` times too small."""
    require_triton(device)
    g = torch.Generator().manual_seed(3)
    u = (torch.rand(2, 4, 3, generator=g, dtype=torch.float64) + 0.5) * scale
    W = torch.rand(4, 3, 5, 3, generator=g, dtype=torch.float64) + 0.5
    u = u.to(device=device, dtype=dtype).requires_grad_()
    W = W.to(device=device, dtype=dtype)
    grads = []
    for backend in ("reference", "triton"):
        if op == "capsule_routing":
            v = ce.capsule_routing(u, W, 1, backend=backend)
        else:
            v = ce.dynamic_routing(reference.predict(u, W), 1, backend=backend)
        grads.append(torch.autograd.grad(v.sum(), [u])[0])
        assert torch.isfinite(grads[-1]).all()
    assert (grads[0] > 0).all()
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=0)


# ---------------------------------------------------------------- 64-bit offsets
@triton.jit
def _offsets_probe(rows_ptr, out_ptr, row_elements, N: tl.constexpr):
    rows = tl.load(rows_ptr + tl.arange(0, N))
    tl.store(out_ptr + tl.arange(0, N), _gemm_kernels.row_offset(rows, row_elements))


def test_row_offsets_pass_two_to_the_31(device):
    """Offsets of u, W and the couplings are formed by ``row_offset``: products past 2^31
    (e.g. sample 70000 of a [B, I, J] coupling tensor with I*J = 40000) must not wrap."""
    require_triton(device)
    rows = torch.tensor([0, 1, 53687, 70000, 2**20, 2**31 - 1, 5, 7], dtype=torch.int32,
                        device=device)
    out = torch.empty(8, dtype=torch.int64, device=device)
    _offsets_probe[(1,)](rows, out, 40000, N=8)
    assert out.tolist() == [r * 40000 for r in rows.tolist()]
    assert max(out.tolist()) > 2**31


# ---------------------------------------------------------------- precision policy
@pytest.fixture
def restore_tf32():
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    yield matmul
    matmul.fp32_precision = saved


def test_fp32_dot_precision_follows_pytorch(restore_tf32, monkeypatch):
    matmul = restore_tf32
    matmul.fp32_precision = "ieee"
    assert _gemm_core.fp32_dot_precision() == "ieee"
    matmul.fp32_precision = "tf32"
    assert _gemm_core.fp32_dot_precision() == "tf32"
    monkeypatch.setattr(_gemm_core, "TF32_INPUT_PRECISION", "tf32x3")
    assert _gemm_core.fp32_dot_precision() == "tf32x3"
    assert _gemm_core.dot_precision(torch.float64) == "ieee"
    assert _gemm_core.dot_precision(torch.bfloat16) == "ieee"


@pytest.mark.parametrize("allow", [False, True])
def test_float32_launches_follow_the_tf32_switch(device, monkeypatch, restore_tf32, allow):
    """Every float32 dot gets ``input_precision="tf32"`` exactly when PyTorch allows TF32 for
    float32 matmuls, and "ieee" otherwise. The interpreter computes float32 dots exactly
    either way; on a GPU the TF32 result must stay within TF32 rounding of the reference."""
    require_triton(device)
    restore_tf32.fp32_precision = "tf32" if allow else "ieee"
    u, W, b, p = make((3, 7, 3, 5, 3), torch.float32, device, seed=29)
    with count_launches(monkeypatch) as (launches, _):
        got = forward_backward("triton", u, W, b, p, 3)
    precisions = {kw["PRECISION"] for _, kw in launches if "PRECISION" in kw}
    assert precisions == {"tf32" if allow else "ieee"}
    exact = forward_backward("reference", *(None if t is None else t.detach().double()
                                            .requires_grad_() for t in (u, W, b, p)), 3)
    # TF32 rounds the dot inputs to 11 significant bits (unit roundoff 2^-11 = 4.9e-4); three
    # routing iterations and the gradient sweeps chain several such products (the H200 measured
    # 2.3e-3 here).
    tolerance = 5e-3 if (allow and device.type == "cuda") else 1e-5
    for a, e in zip(got, exact):
        err = ((a.double() - e).abs().max() / e.abs().max()).item()
        assert err <= tolerance, err


# ---------------------------------------------------------------- autotuning, device guard
def test_tuned_config_is_measured_once_and_cached(monkeypatch):
    monkeypatch.setattr(_gemm_core, "_TUNED", {})
    candidates = [_gemm_core.Config(16, 16, 16, 16, 16), _gemm_core.Config(32, 16, 16, 16, 16)]
    runs = []
    timer = lambda fn: (fn(), 1.0 if runs[-1].BB == 16 else 0.5)[1]
    chosen = _gemm_core.tuned_config("key", candidates, runs.append, timer)
    assert chosen.BB == 32 and len(runs) == 2
    assert _gemm_core.tuned_config("key", candidates, runs.append, timer) is chosen
    assert len(runs) == 2  # cached: nothing measured again
    assert _gemm_core.tuned_config("other", candidates, runs.append, None) == candidates[0]
    assert len(runs) == 2  # without a timer (the interpreter) the heuristic default


def test_device_guard():
    assert isinstance(_gemm_core.device_guard(torch.zeros(1)), contextlib.nullcontext)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_runs_on_the_inputs_gpu_not_the_current_one():
    u, W, b, p = make((2, 5, 3, 3, 4), torch.float32, torch.device("cuda:1"), seed=5)
    with torch.cuda.device(0):
        got = forward_backward("triton", u, W, b, p, 3)
    expected = forward_backward("reference", u, W, b, p, 3)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


# Launch options a compiled Triton launch accepts besides the kernel's own parameters.
_LAUNCH_OPTIONS = {"num_warps", "num_stages", "num_ctas", "enable_fp_fusion", "maxnreg",
                   "launch_cooperative_grid", "debug"}


@pytest.mark.parametrize("op", ["capsule_routing", "dynamic_routing", "predict"])
def test_every_launch_passes_only_the_kernels_own_arguments(op, monkeypatch):
    """On a GPU, ``JITFunction.run`` rejects a keyword that is neither a parameter of the
    kernel nor a launch option ("Keyword argument X was specified but unrecognised"); the
    interpreter does not check, so this test does, for every launch of forward and backward
    with every option on."""
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run
    seen = []

    def checked_run(self, *args, grid, warmup, **kwargs):
        unknown = set(kwargs) - set(self.arg_names) - _LAUNCH_OPTIONS
        assert not unknown, f"{self.fn.__name__} launched with unknown keywords {sorted(unknown)}"
        seen.append(self.fn.__name__)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", checked_run)
    g = torch.Generator().manual_seed(11)
    B, I, J, Din, D = 3, 5, 3, 4, 5
    u = torch.randn(B, I, Din, generator=g, requires_grad=True)
    W = (0.5 * torch.randn(I, J, D, Din, generator=g)).requires_grad_()
    bias = (0.1 * torch.randn(J, D, generator=g)).requires_grad_()
    prior = (0.3 * torch.randn(I, J, generator=g)).requires_grad_()
    if op == "predict":
        out = ce.predict(u, W, backend="triton")
        out.backward(torch.randn_like(out))
    else:
        for detach_inner in (False, True):
            if op == "capsule_routing":
                v = ce.capsule_routing(u, W, 3, bias=bias, prior=prior, temperature=0.7, leaky=True,
                                       detach_inner=detach_inner, backend="triton")
            else:
                u_hat = reference.predict(u, W).detach().requires_grad_()
                v = ce.dynamic_routing(u_hat, 3, bias=bias, prior=prior, temperature=0.7, leaky=True,
                                       detach_inner=detach_inner, backend="triton")
            v.backward(torch.randn_like(v))
    assert seen  # the op ran through Triton launches
