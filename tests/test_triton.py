"""The Triton backend against the reference: forward and gradients of predict, dynamic_routing
and capsule_routing for every option (for dynamic_routing the learned prior and the
temperature included here; capsule_routing's are in tests/test_triton_gemm.py), odd sizes, B = 1, 1 to 5 iterations, non-contiguous
inputs, float64 gradcheck, float32/float16/bfloat16 within error-ratio tolerances, and the
same errors as the reference for bad inputs.

Without a GPU these run in Triton's CPU interpreter (``tests/conftest.py`` sets
``TRITON_INTERPRET=1`` before triton is imported); with one, every test also runs on CUDA
tensors. Shapes are tiny so the interpreter stays quick.
"""
import importlib
import itertools

import pytest
import torch

import capsnet_ext as ce
from capsnet_ext import dispatch, reference

triton_ops = pytest.importorskip("capsnet_ext.triton_ops")
from capsnet_ext.triton_ops import _gemm_core  # noqa: E402

SHAPES = [  # B, I, J, Din, Dout: odd, not powers of two, B = 1
    (1, 5, 3, 3, 5),
    (2, 7, 3, 5, 3),
    (3, 13, 5, 3, 7),
]
ROUTING_OPS = ("dynamic_routing", "capsule_routing")


def require_triton(device):
    reason = ce.unavailable_reason("triton", device)
    if reason is not None:
        pytest.skip(f"Triton backend unavailable on {device}: {reason}")


def make_inputs(op, shape, dtype, device, seed, bias=False):
    """Fresh random leaf tensors (never zeros) for ``op``; returns ``(args, bias or None)``."""
    B, I, J, Din, Dout = shape
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale)
    u = rnd(B, I, Din)
    W = rnd(I, J, Dout, Din, scale=0.5)
    b = rnd(J, Dout, scale=0.3) if bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype).requires_grad_()
    if op == "dynamic_routing":
        return [cast(reference.predict(u, W))], cast(b)
    return [cast(u), cast(W)], cast(b)


def make_prior(shape, dtype, device, seed):
    """A random learned prior ``[I, J]`` (a leaf wanting gradient)."""
    _, I, J, _, _ = shape
    g = torch.Generator().manual_seed(seed + 1000)
    prior = torch.randn(I, J, generator=g, dtype=torch.float64) * 0.8
    return prior.to(device=device, dtype=dtype).requires_grad_()


def run(op, backend, args, bias=None, iterations=3, **options):
    fn = getattr(ce, op)
    if op == "predict":
        return fn(*args, backend=backend)
    return fn(*args, iterations, bias=bias, backend=backend, **options)


def outputs_and_grads(op, backend, args, bias, iterations, options, seed=0):
    """Forward outputs and the gradients of a random projection of ``v`` wrt every input
    (``options["prior"]`` included)."""
    out = run(op, backend, args, bias, iterations, **options)
    v = out[0] if isinstance(out, tuple) else out
    g = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(v.shape, generator=g, dtype=torch.float64).to(v)
    inputs = [t for t in args + [bias, options.get("prior")] if t is not None and t.requires_grad]
    grads = torch.autograd.grad(v, inputs, grad_out)
    outs = list(out) if isinstance(out, tuple) else [out]
    return [o.detach() for o in outs], list(grads)


def describe_mismatch(actual, expected):
    diff = (actual.double() - expected.double()).abs()
    worst = diff.flatten().argmax().item()
    return (f"max abs error {diff.max().item():.3e} at flat index {worst}; "
            f"{int((diff > 1e-9).sum())} of {diff.numel()} elements differ; "
            f"non-finite: {int((~torch.isfinite(actual)).sum())}")


def assert_all_close(actual, expected, rtol, atol):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype, (a.shape, e.shape, a.dtype, e.dtype)
        assert torch.allclose(a, e, rtol=rtol, atol=atol), describe_mismatch(a, e)


# ---------------------------------------------------------------- availability and dispatch
def test_availability_follows_the_interpreter_switch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_ops.availability(torch.device("cpu")) is None
    monkeypatch.delenv("TRITON_INTERPRET")
    reason = triton_ops.availability(torch.device("cpu"))
    assert reason and "TRITON_INTERPRET=1" in reason
    with pytest.raises(ce.BackendUnavailableError, match="backend 'triton' is unavailable on cpu"):
        ce.capsule_routing(torch.randn(2, 3, 5), torch.randn(3, 2, 4, 5), backend="triton")
    assert "on meta" in triton_ops.availability(torch.device("meta"))


def test_every_option_is_supported_and_auto_never_picks_the_interpreter():
    for op in ("predict",) + ROUTING_OPS:
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            for flags in itertools.product([False, True], repeat=5):
                options = dict(zip(("bias", "leaky", "detach_inner", "return_coupling", "prior"), flags))
                for temperature in (1.0, 0.37):
                    assert triton_ops.unsupported_reason(op, dtype=dtype, iterations=5,
                                                         temperature=temperature, **options) is None
    assert "unknown op" in triton_ops.unsupported_reason("conv", dtype=torch.float32)
    assert dispatch.select("capsule_routing", "auto", torch.device("cpu"), torch.float32).NAME == "reference"


def test_auto_picks_a_kernel_backend_only_on_cuda(device):
    chosen = dispatch.select("capsule_routing", "auto", torch.device(device), torch.float32,
                             iterations=3, bias=True, leaky=False, detach_inner=False,
                             return_coupling=False).NAME
    if device.type == "cuda":
        assert chosen in ("cuda", "triton")
    else:  # the interpreter is a testing tool, never chosen automatically
        assert chosen == "reference"


def test_dynamic_routing_ignores_tf32_settings(device):
    """dynamic_routing uses no tensor-core dot: allowing TF32 must not change a single bit.
    (predict's and capsule_routing's float32 dots follow the TF32 switch:
    tests/test_triton_predict.py, tests/test_triton_gemm.py.)"""
    require_triton(device)
    (u_hat,), b = make_inputs("dynamic_routing", (2, 7, 3, 5, 3), torch.float32, device, seed=29, bias=True)
    matmul = torch.backends.cuda.matmul
    old_precision = matmul.fp32_precision
    results = []
    try:
        for allow in (False, True):
            matmul.fp32_precision = "tf32" if allow else "ieee"
            results.append(outputs_and_grads("dynamic_routing", "triton", [u_hat], b, 3, {}))
    finally:
        matmul.fp32_precision = old_precision
    flat = [[t for part in r for t in part] for r in results]
    for a, e in zip(flat[1], flat[0]):
        assert torch.equal(a, e)


def test_double_backward_raises_a_clear_error(device):
    require_triton(device)
    (u, W), _ = make_inputs("capsule_routing", (2, 5, 3, 3, 4), torch.float64, device, seed=31)
    v = ce.capsule_routing(u, W, 2, backend="triton")
    (du,) = torch.autograd.grad(v.sum(), [u], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        torch.autograd.grad(du.sum(), [W])


# ---------------------------------------------------------------- float64 against the reference
@pytest.mark.parametrize("shape", SHAPES)
def test_predict_matches_reference(device, shape):
    require_triton(device)
    args, _ = make_inputs("capsule_routing", shape, torch.float64, device, seed=sum(shape))
    expected = outputs_and_grads("predict", "reference", args, None, 0, {})
    actual = outputs_and_grads("predict", "triton", args, None, 0, {})
    assert_all_close(actual[0] + actual[1], expected[0] + expected[1], rtol=1e-12, atol=1e-12)


def test_predict_wide_din_and_single_gradient(device):
    """Din wider than one register chunk (walked in chunks) and gradient wrt one input only."""
    require_triton(device)
    (u, W), _ = make_inputs("capsule_routing", (2, 3, 5, 70, 3), torch.float64, device, seed=7)
    expected = reference.predict(u, W)
    torch.testing.assert_close(ce.predict(u, W, backend="triton"), expected, rtol=1e-12, atol=1e-12)
    W_const = W.detach()
    (du,) = torch.autograd.grad(ce.predict(u, W_const, backend="triton").sum(), [u])
    (du_ref,) = torch.autograd.grad(reference.predict(u, W_const).sum(), [u])
    torch.testing.assert_close(du, du_ref, rtol=1e-12, atol=1e-12)


# Every option at every iteration count: (bias, leaky) x detach_inner; return_coupling
# alternates with the iteration count and the shape cycles, so each appears with every option.
ROUTING_CASES = [
    (iterations, bias, leaky, detach, iterations % 2 == 1, SHAPES[(iterations + bias + 2 * leaky) % 3])
    for iterations in range(1, 6)
    for bias, leaky in [(False, False), (True, False), (False, True), (True, True)]
    for detach in (False, True)
]


@pytest.mark.parametrize("op", ROUTING_OPS)
@pytest.mark.parametrize("iterations,bias,leaky,detach_inner,return_coupling,shape", ROUTING_CASES)
def test_routing_matches_reference(device, op, iterations, bias, leaky, detach_inner, return_coupling, shape):
    require_triton(device)
    args, b = make_inputs(op, shape, torch.float64, device, seed=iterations * 31 + sum(shape), bias=bias)
    options = dict(leaky=leaky, detach_inner=detach_inner, return_coupling=return_coupling)
    expected = outputs_and_grads(op, "reference", args, b, iterations, options)
    actual = outputs_and_grads(op, "triton", args, b, iterations, options)
    assert_all_close(actual[0], expected[0], rtol=1e-10, atol=1e-12)
    assert_all_close(actual[1], expected[1], rtol=1e-10, atol=1e-12)
    if return_coupling:
        out = run(op, "triton", args, b, iterations, **options)
        assert out[1].shape == (shape[0], shape[1], shape[2]) and not out[1].requires_grad


# dynamic_routing with the learned prior and the temperature: every iteration count in (1, 2, 4)
# with every (leaky, detach_inner) pair; the temperature cycles through (1, 0.37, 2.5) and bias
# alternates so each meets every iteration count; the prior is left out of two cases
# (temperature alone).
PRIOR_TEMPERATURE_CASES = [
    (iterations, (1.0, 0.37, 2.5)[k % 3], bias, leaky, detach, k not in (5, 10),
     SHAPES[k % 3])
    for k, (iterations, (leaky, detach), bias) in enumerate(
        (it, ld, (n + it) % 2 == 1)
        for it in (1, 2, 4)
        for n, ld in enumerate(itertools.product((False, True), repeat=2)))
]


@pytest.mark.parametrize("iterations,temperature,bias,leaky,detach_inner,with_prior,shape",
                         PRIOR_TEMPERATURE_CASES)
def test_dynamic_routing_prior_and_temperature_match_reference(
        device, iterations, temperature, bias, leaky, detach_inner, with_prior, shape):
    """Forward, couplings and the gradients wrt u_hat, bias and the prior."""
    require_triton(device)
    seed = iterations * 7 + sum(shape)
    args, b = make_inputs("dynamic_routing", shape, torch.float64, device, seed=seed, bias=bias)
    options = dict(leaky=leaky, detach_inner=detach_inner, return_coupling=True,
                   temperature=temperature)
    if with_prior:
        options["prior"] = make_prior(shape, torch.float64, device, seed)
    expected = outputs_and_grads("dynamic_routing", "reference", args, b, iterations, options)
    actual = outputs_and_grads("dynamic_routing", "triton", args, b, iterations, options)
    assert_all_close(actual[0], expected[0], rtol=1e-10, atol=1e-12)
    assert_all_close(actual[1], expected[1], rtol=1e-10, atol=1e-12)
    if with_prior:
        assert expected[1][-1].abs().max() > 1e-3  # the prior gradient is tested, not zero


def test_prior_cases_cover_every_option():
    cases = PRIOR_TEMPERATURE_CASES
    for iterations in (1, 2, 4):
        mine = [c for c in cases if c[0] == iterations]
        assert {c[1] for c in mine} == {1.0, 0.37, 2.5}
        assert {(c[3], c[4]) for c in mine} == set(itertools.product((False, True), repeat=2))
        assert {c[2] for c in mine} == {False, True}
    assert {c[5] for c in cases if c[1] != 1.0} == {False, True}


def test_dynamic_routing_prior_gradient_alone(device):
    """Gradient wanted for the prior only (u_hat a constant): no u_hat gradient is written."""
    require_triton(device)
    shape = (2, 7, 3, 5, 3)
    (u_hat,), _ = make_inputs("dynamic_routing", shape, torch.float64, device, seed=4)
    prior = make_prior(shape, torch.float64, device, seed=4)
    for detach_inner in (False, True):
        grads = [torch.autograd.grad(fn(u_hat.detach(), 3, prior=prior, temperature=1.7,
                                        detach_inner=detach_inner).sum(), [prior])[0]
                 for fn in (reference.dynamic_routing, triton_ops.dynamic_routing)]
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("op", ROUTING_OPS)
def test_routing_with_non_contiguous_inputs(device, op):
    require_triton(device)
    B, I, J, Din, Dout = 3, 7, 3, 5, 3
    g = torch.Generator().manual_seed(11)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device)
    # Transposed storage: strides that are not those of a contiguous tensor.
    bias = rnd(Dout, J).t().requires_grad_()
    if op == "dynamic_routing":
        args = [rnd(J, B, Dout, I).permute(1, 3, 0, 2).requires_grad_()]
    else:
        args = [rnd(Din, B, I).permute(1, 2, 0).requires_grad_(),
                (rnd(Din, J, I, Dout) * 0.5).permute(2, 1, 3, 0).requires_grad_()]
    assert not any(t.is_contiguous() for t in args + [bias])
    options = dict(leaky=True, return_coupling=True)
    expected = outputs_and_grads(op, "reference", args, bias, 4, options)
    actual = outputs_and_grads(op, "triton", args, bias, 4, options)
    assert_all_close(actual[0] + actual[1], expected[0] + expected[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("op,splits,with_prior", [
    ("dynamic_routing", (2, 2), False), ("dynamic_routing", (3, 3), True),
    ("capsule_routing", (2, 2), False), ("capsule_routing", (3, 3), False),
])
def test_routing_reductions_across_programs(device, op, splits, with_prior, monkeypatch):
    """Small tiles and forced splits: the sums over input capsules (forward and backward) and
    over samples (dW, and the prior gradient of dynamic_routing) cross several programs, as
    they do at real sizes on a GPU. With a prior the whole result is the same bit for bit on a
    second run (no atomics)."""
    require_triton(device)
    shape = (3, 13, 3, 3, 5)
    if op == "dynamic_routing":
        # One sample per tile, so that the prior's and the bias's gradients are summed over
        # sample splits too.
        monkeypatch.setattr(_gemm_core, "GIVEN_TILE_ELEMENTS", 8)
        monkeypatch.setattr(_gemm_core, "FORCE_SPLITS", splits)
        plan = _gemm_core.Plan(3, 13, 3, 5, 0, torch.device(device),
                               _gemm_core.default_given_config(3, 13, 3, 5), given=True)
        assert plan.n_isplit > 1 and plan.n_bsplit > 1 and plan.BB == 1
    else:
        monkeypatch.setattr(_gemm_core, "FORCE_SPLITS", splits)
        plan = _gemm_core.Plan(3, 13, 3, 5, 3, torch.device(device),
                               _gemm_core.default_config(3, 13, 3, 5, 3))
        assert plan.n_isplit > 1 and plan.n_bsplit == 1  # B = 3: one sample tile
    args, b = make_inputs(op, shape, torch.float64, device, seed=5, bias=True)
    options = dict(leaky=False, detach_inner=False, return_coupling=True)
    if with_prior:
        options.update(prior=make_prior(shape, torch.float64, device, seed=5), temperature=0.37)
    expected = outputs_and_grads(op, "reference", args, b, 3, options)
    actual = outputs_and_grads(op, "triton", args, b, 3, options)
    assert_all_close(actual[0] + actual[1], expected[0] + expected[1], rtol=1e-10, atol=1e-12)
    if with_prior:
        again = outputs_and_grads(op, "triton", args, b, 3, options)
        assert all(torch.equal(x, y) for x, y in zip(again[0] + again[1], actual[0] + actual[1]))


def test_capsule_routing_gradient_subsets(device):
    """Gradient wanted for u only, W only, bias only: each path computes just that."""
    require_triton(device)
    shape = (2, 7, 3, 5, 3)
    (u, W), b = make_inputs("capsule_routing", shape, torch.float64, device, seed=3, bias=True)
    for wanted in ([u], [W], [b]):
        leaves = [t if any(t is w for w in wanted) else t.detach() for t in (u, W, b)]
        grads = [torch.autograd.grad(fn(leaves[0], leaves[1], 3, bias=leaves[2]).sum(), wanted)[0]
                 for fn in (reference.capsule_routing, triton_ops.capsule_routing)]
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)


def test_capsule_routing_at_zero_input_is_finite(device):
    require_triton(device)
    u = torch.zeros(2, 5, 3, dtype=torch.float64, device=device, requires_grad=True)
    W = torch.randn(5, 3, 4, 3, dtype=torch.float64, device=device, requires_grad=True)
    v = ce.capsule_routing(u, W, 3, backend="triton")
    v.sum().backward()
    assert torch.equal(v.detach(), torch.zeros_like(v))
    assert torch.isfinite(u.grad).all() and torch.isfinite(W.grad).all()


# ---------------------------------------------------------------- gradcheck (float64)
@pytest.mark.parametrize("op,iterations,options", [
    ("predict", 0, {}),
    ("dynamic_routing", 3, dict(leaky=True)),
    ("capsule_routing", 3, {}),
    ("capsule_routing", 5, dict(leaky=True)),
    ("dynamic_routing", 3, dict(prior=True, temperature=0.37)),
])
def test_gradcheck(device, op, iterations, options):
    """detach_inner is left out: it is a deliberate surrogate gradient (only the last weighted
    sum is differentiated), which no finite difference reproduces; the comparisons with the
    reference above cover it."""
    require_triton(device)
    shape = (2, 3, 3, 2, 3)
    args, b = make_inputs("dynamic_routing" if op == "dynamic_routing" else "capsule_routing",
                          shape, torch.float64, device, seed=13, bias=op != "predict")
    if op == "predict":
        fn = lambda *t: ce.predict(*t, backend="triton")
        inputs = tuple(args)
    elif options.get("prior"):  # the prior is the last input
        rest = {k: v for k, v in options.items() if k != "prior"}
        fn = lambda *t: getattr(ce, op)(*t[:-2], iterations, bias=t[-2], prior=t[-1],
                                        backend="triton", **rest)
        inputs = tuple(args) + (b, make_prior(shape, torch.float64, device, seed=13))
    else:
        fn = lambda *t: getattr(ce, op)(*t[:-1], iterations, bias=t[-1], backend="triton", **options)
        inputs = tuple(args) + (b,)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


# ---------------------------------------------------------------- low precision
# Error of the kernel against the float64 reference may be at most 2x (forward) / 3x (backward)
# the error of the reference itself run in the same dtype, plus a floor of two roundings of the
# result to that dtype (2 * 2^-24, 2^-10, 2^-7 relative to the largest magnitude): the result is
# rounded to the low dtype at the end, however exactly it was accumulated. The kernel
# accumulates in float32 where the reference rounds intermediates (logits, s) to the low
# dtype, so it is usually the more accurate of the two (measured at this shape: kernel error
# within 1.6x of the reference's, both of the order of one output rounding).
LOW_PRECISION = [  # dtype, floor
    (torch.float32, 2.4e-7),
    (torch.float16, 9.8e-4),
    (torch.bfloat16, 7.8e-3),
]


def relative_error(x, exact):
    return ((x.double() - exact).abs().max() / exact.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype,floor", LOW_PRECISION)
@pytest.mark.parametrize("op", ("predict",) + ROUTING_OPS)
def test_low_precision_error_ratio(device, op, dtype, floor):
    require_triton(device)
    shape = (3, 13, 5, 3, 7)
    source_op = "capsule_routing" if op == "predict" else op
    args64, b64 = make_inputs(source_op, shape, torch.float64, device, seed=17, bias=op != "predict")
    args, b = make_inputs(source_op, shape, dtype, device, seed=17, bias=op != "predict")
    options = {} if op == "predict" else dict(leaky=True)
    exact = outputs_and_grads(op, "reference", args64, b64, 3, options)
    low_ref = outputs_and_grads(op, "reference", args, b, 3, options)
    kernel = outputs_and_grads(op, "triton", args, b, 3, options)
    for kind, ratio in ((0, 2.0), (1, 3.0)):  # forward, backward
        for k, l, e in zip(kernel[kind], low_ref[kind], exact[kind]):
            assert k.dtype == dtype
            kernel_err, ref_err = relative_error(k, e), relative_error(l, e)
            assert kernel_err <= ratio * ref_err + floor, (
                f"{'forward' if kind == 0 else 'backward'}: kernel error {kernel_err:.3e}, "
                f"reference-in-{dtype} error {ref_err:.3e}")


# ---------------------------------------------------------------- memory kept for backward
def test_fused_routing_saves_no_prediction_vectors(device):
    """What autograd keeps for backward is exactly u, W and s^r, V^r per iteration:
    ``B*I*Din + I*J*Dout*Din + 2*R*B*J*Dout`` elements, nothing of size ``B*I*J*Dout``."""
    require_triton(device)
    B, I, J, Din, Dout = 3, 13, 5, 2, 7
    R = 4
    (u, W), b = make_inputs("capsule_routing", (B, I, J, Din, Dout), torch.float64, device, seed=2, bias=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        v = ce.capsule_routing(u, W, R, bias=b, backend="triton")
    assert sum(t.numel() for t in saved) == B * I * Din + I * J * Dout * Din + 2 * R * B * J * Dout
    assert sorted(tuple(t.shape) for t in saved) == sorted(
        [(B, I, Din), (I, J, Dout, Din), (R, B, J, Dout), (R, B, J, Dout)])
    v.sum().backward()  # the saved tensors suffice for backward
    assert torch.isfinite(W.grad).all()


def test_dynamic_routing_saves_u_hat_prior_and_per_iteration_state(device):
    """dynamic_routing keeps u_hat and the prior (the caller's tensors, not copies) and
    s^r, V^r per iteration: nothing of size ``I*J`` per iteration."""
    require_triton(device)
    B, I, J, Din, Dout = 3, 13, 5, 2, 7
    R = 4
    (u_hat,), b = make_inputs("dynamic_routing", (B, I, J, Din, Dout), torch.float64, device,
                              seed=2, bias=True)
    prior = make_prior((B, I, J, Din, Dout), torch.float64, device, seed=2)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        v = ce.dynamic_routing(u_hat, R, bias=b, prior=prior, temperature=0.5, backend="triton")
    assert sorted(tuple(t.shape) for t in saved) == sorted(
        [(B, I, J, Dout), (I, J), (R, B, J, Dout), (R, B, J, Dout)])
    assert any(t is prior for t in saved) and any(t is u_hat for t in saved)
    v.sum().backward()  # the saved tensors suffice for backward
    assert torch.isfinite(prior.grad).all() and torch.isfinite(u_hat.grad).all()


# ---------------------------------------------------------------- torch.compile
def test_registered_operators_pass_opcheck(device):
    """Schema, fake tensors, autograd registration and AOT dispatch of the operators that
    torch.compile sees."""
    require_triton(device)
    gemm = importlib.import_module("capsnet_ext.triton_ops._gemm_core")
    predict_module = importlib.import_module("capsnet_ext.triton_ops.predict")
    (u, W), b = make_inputs("capsule_routing", (2, 5, 3, 3, 4), torch.float64, device, seed=19, bias=True)
    (u_hat,), _ = make_inputs("dynamic_routing", (2, 5, 3, 3, 4), torch.float64, device, seed=19)
    prior = torch.randn(5, 3, dtype=torch.float64, device=device, requires_grad=True)
    cases = [
        (gemm.routing_forward_op, (u, W, b, prior, 3, True, False, True, 0.7)),
        (gemm.routing_forward_op, (u.detach(), W, None, None, 2, False, True, False, 1.0)),
        (gemm.given_routing_forward_op, (u_hat, b, None, 3, False, False, True, 1.0)),
        (gemm.given_routing_forward_op, (u_hat, b, prior, 3, True, False, True, 0.37)),
        (predict_module.predict_op, (u, W)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_matches_reference(device):
    require_triton(device)
    torch._dynamo.reset()
    (u, W), b = make_inputs("capsule_routing", (2, 5, 3, 3, 4), torch.float64, device, seed=23, bias=True)
    options = dict(leaky=True, return_coupling=True)
    ce.capsule_routing(u, W, 3, bias=b, backend="triton", **options)  # backend module loaded eagerly
    compiled = torch.compile(
        lambda u, W, b: ce.capsule_routing(u, W, 3, bias=b, backend="triton", **options), fullgraph=True)
    v, c = compiled(u, W, b)
    v_ref, c_ref = ce.capsule_routing(u, W, 3, bias=b, backend="reference", **options)
    grads = torch.autograd.grad((v * v_ref.detach()).sum(), [u, W, b])
    grads_ref = torch.autograd.grad((v_ref * v_ref.detach()).sum(), [u, W, b])
    assert not c.requires_grad
    assert_all_close([v.detach(), c] + list(grads), [v_ref.detach(), c_ref] + list(grads_ref),
                     rtol=1e-10, atol=1e-12)


def test_torch_compile_fullgraph_dynamic_routing_with_prior(device):
    require_triton(device)
    torch._dynamo.reset()
    shape = (2, 5, 3, 3, 4)
    (u_hat,), b = make_inputs("dynamic_routing", shape, torch.float64, device, seed=23, bias=True)
    prior = make_prior(shape, torch.float64, device, seed=23)
    options = dict(leaky=True, return_coupling=True, temperature=0.37)
    ce.dynamic_routing(u_hat, 3, bias=b, prior=prior, backend="triton", **options)  # loaded eagerly
    compiled = torch.compile(
        lambda x, b, p: ce.dynamic_routing(x, 3, bias=b, prior=p, backend="triton", **options),
        fullgraph=True)
    v, c = compiled(u_hat, b, prior)
    v_ref, c_ref = ce.dynamic_routing(u_hat, 3, bias=b, prior=prior, backend="reference", **options)
    grads = torch.autograd.grad((v * v_ref.detach()).sum(), [u_hat, b, prior])
    grads_ref = torch.autograd.grad((v_ref * v_ref.detach()).sum(), [u_hat, b, prior])
    assert not c.requires_grad
    assert_all_close([v.detach(), c] + list(grads), [v_ref.detach(), c_ref] + list(grads_ref),
                     rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- bad input
U = lambda *s: torch.randn(*s)

BAD_CALLS = [
    lambda be: ce.predict(U(2, 3), U(3, 2, 4, 5), backend=be),
    lambda be: ce.predict(U(2, 3, 5), U(4, 2, 4, 5), backend=be),
    lambda be: ce.predict(U(2, 3, 5), U(3, 2, 4, 6), backend=be),
    lambda be: ce.predict(torch.ones(2, 3, 5, dtype=torch.int64), U(3, 2, 4, 5), backend=be),
    lambda be: ce.predict(U(2, 3, 5), U(3, 2, 4, 5).double(), backend=be),
    lambda be: ce.dynamic_routing(U(2, 3, 4), 3, backend=be),
    lambda be: ce.dynamic_routing(U(2, 3, 4, 5), 0, backend=be),
    lambda be: ce.dynamic_routing(U(2, 3, 4, 5), 2.0, backend=be),
    lambda be: ce.dynamic_routing(U(2, 3, 4, 5), 3, bias=U(4, 6), backend=be),
    lambda be: ce.dynamic_routing(U(2, 3, 4, 5), 3, bias=U(4, 5).double(), backend=be),
    lambda be: ce.capsule_routing(U(2, 3, 5), U(3, 2, 4, 5), 3, bias=U(2, 5), backend=be),
    lambda be: ce.capsule_routing(U(2, 3, 5), U(3, 2, 4, 5), -1, backend=be),
    lambda be: ce.capsule_routing(U(0, 3, 5), U(3, 2, 4, 5), 3, backend=be),
    lambda be: ce.capsule_routing(U(2, 3, 5), torch.empty(3, 2, 4, 5, device="meta"), 3, backend=be),
]


@pytest.mark.parametrize("index", range(len(BAD_CALLS)))
def test_bad_inputs_raise_the_reference_errors(index):
    require_triton("cpu")
    errors = []
    for backend in ("reference", "triton"):
        with pytest.raises((TypeError, ValueError)) as info:
            BAD_CALLS[index](backend)
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]


def test_capsule_too_large_for_registers_is_refused_before_launch():
    """The size limit is part of ``unsupported_reason``, so ``auto`` steers around it and an
    explicit request fails with the reason before any kernel runs."""
    import capsnet_ext.triton_ops as triton_backend

    reason = triton_backend.unsupported_reason(
        "capsule_routing", dtype=torch.float32, sizes=dict(J=100, Dout=32, Din=32))
    assert reason and "the limit in float32 is 16384" in reason and "shared memory" in reason
    assert triton_backend.unsupported_reason(
        "capsule_routing", dtype=torch.float32, sizes=dict(J=10, Dout=16, Din=8)) is None
    if triton_backend.availability(torch.device("cpu")) is None:
        u, W = torch.randn(1, 1, 32), torch.randn(1, 100, 32, 32)
        with pytest.raises(NotImplementedError, match="backend 'triton' does not support capsule_routing"):
            ce.capsule_routing(u, W, 1, backend="triton")
