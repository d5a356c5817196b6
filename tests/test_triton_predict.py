"""The Triton ``predict`` (tensor-core GEMM tiles, ``capsnet_ext/triton_ops/predict.py``) against
the reference: odd sizes (``Din`` below 16, between 16 and one chunk, wider than a chunk; ``N =
J * Dout`` over one tile; more samples than one tile), float64 gradcheck, float32 under exact
(``"ieee"``) dots, float16/bfloat16 within one rounding of the result, non-contiguous and
zero-stride inputs, deterministic gradients, the float32 TF32 switch, and the registered
operators.

Without a GPU these run in Triton's CPU interpreter (``tests/conftest.py`` sets
``TRITON_INTERPRET=1`` before triton is imported); with one, also on CUDA tensors.
"""
import contextlib
import importlib

import pytest
import torch

import capsnet_ext as ce
from capsnet_ext import reference

pytest.importorskip("capsnet_ext.triton_ops")
P = importlib.import_module("capsnet_ext.triton_ops.predict")

# B, I, J, Dout, Din
ODD_SHAPES = [
    (3, 5, 3, 5, 3),  # Din below the smallest dot K (padded to 16)
    (3, 5, 3, 5, 20),  # Din above 16, inside one chunk
    (2, 3, 5, 3, 70),  # Din over several chunks
    (1, 2, 17, 5, 8),  # N = 85: several n tiles (forward, dW) and n chunks (du)
    (130, 2, 3, 7, 8),  # several sample tiles (forward, du) and sample chunks (dW)
    (2, 3, 1, 4, 1),  # J = 1, Din = 1
]


def require_triton(device):
    reason = ce.unavailable_reason("triton", device)
    if reason is not None:
        pytest.skip(f"Triton backend unavailable on {device}: {reason}")


@contextlib.contextmanager
def fp32_matmul(precision):
    """PyTorch's switch for float32 matmuls, restored afterwards."""
    matmul = torch.backends.cuda.matmul
    old = matmul.fp32_precision
    matmul.fp32_precision = precision
    try:
        yield
    finally:
        matmul.fp32_precision = old


def make(shape, dtype, device, seed):
    """``u``, ``W`` (leaves wanting gradient) and an output gradient ``g``, rounded to ``dtype``."""
    B, I, J, D, Din = shape
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: torch.randn(*s, generator=gen, dtype=torch.float64) * scale
    cast = lambda t: t.to(device=device, dtype=dtype)
    u = cast(rnd(B, I, Din)).requires_grad_()
    W = cast(rnd(I, J, D, Din, scale=0.5)).requires_grad_()
    return u, W, cast(rnd(B, I, J, D))


def triton_and_exact(u, W, g):
    """(kernel forward, du, dW) and the float64 reference of the same (rounded) inputs."""
    out = ce.predict(u, W, backend="triton")
    du, dW = torch.autograd.grad(out, [u, W], g)
    u64 = u.detach().double().requires_grad_()
    W64 = W.detach().double().requires_grad_()
    ref = reference.predict(u64, W64)
    du64, dW64 = torch.autograd.grad(ref, [u64, W64], g.double())
    return [out.detach(), du, dW], [ref.detach(), du64, dW64]


def relative_error(x, exact):
    return ((x.double() - exact).abs().max() / exact.abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_float64_matches_reference(device, shape):
    require_triton(device)
    u, W, g = make(shape, torch.float64, device, seed=sum(shape))
    actual, expected = triton_and_exact(u, W, g)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(3, 5, 3, 5, 3), (2, 2, 3, 2, 20)])
def test_gradcheck_float64(device, shape):
    require_triton(device)
    u, W, _ = make(shape, torch.float64, device, seed=5)
    assert torch.autograd.gradcheck(lambda u, W: ce.predict(u, W, backend="triton"), (u, W),
                                    eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("shape", ODD_SHAPES[:5])
def test_float32_exact_dots_match_reference(device, shape):
    """With TF32 off, float32 dots take float32 inputs: the only errors are float32 sums of at
    most ``max(Din, J * Dout, B)`` terms and the final rounding, about 1e-7 of the largest
    magnitude here."""
    require_triton(device)
    u, W, g = make(shape, torch.float32, device, seed=3 + sum(shape))
    with fp32_matmul("ieee"):
        actual, expected = triton_and_exact(u, W, g)
    for a, e in zip(actual, expected):
        assert a.dtype == torch.float32
        assert relative_error(a, e) < 1e-6, relative_error(a, e)
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-6 * e.abs().max().item())


# One rounding of the result at the largest magnitude: bfloat16 2^-7 (Triton's interpreter
# rounds float32 to bfloat16 toward zero, a whole unit in the last place; the GPU rounds to
# nearest, half that), float16 2^-11 to nearest (2^-10 allowed); plus the float32 accumulation.
LOW = [(torch.bfloat16, 2.0 ** -7), (torch.float16, 2.0 ** -10)]


@pytest.mark.parametrize("dtype,bound", LOW)
@pytest.mark.parametrize("shape", [ODD_SHAPES[0], ODD_SHAPES[2], ODD_SHAPES[4]])
def test_low_precision_within_one_rounding(device, dtype, bound, shape):
    """float16/bfloat16 operands, float32 accumulation: against the float64 reference of the same
    rounded inputs, the error is the final rounding to the low dtype (the reference run in the
    low dtype is no better)."""
    require_triton(device)
    u, W, g = make(shape, dtype, device, seed=11 + sum(shape))
    actual, expected = triton_and_exact(u, W, g)
    for a, e in zip(actual, expected):
        assert a.dtype == dtype
        assert relative_error(a, e) <= bound * 1.01, (dtype, relative_error(a, e))


def test_non_contiguous_and_zero_stride_inputs(device):
    """Inputs read through their strides: permuted ``u``, ``W`` whose ``(j, d)`` axes do not
    flatten to one stride, a permuted output gradient and the zero-stride gradient of ``sum``."""
    require_triton(device)
    B, I, J, D, Din = 3, 5, 3, 5, 20
    gen = torch.Generator().manual_seed(9)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(device)
    u = rnd(Din, B, I).permute(1, 2, 0).requires_grad_()
    W = rnd(I, D, Din, J).permute(0, 3, 1, 2).requires_grad_()
    g = rnd(J, B, D, I).permute(1, 3, 0, 2)
    assert not u.is_contiguous() and not W.is_contiguous() and not g.is_contiguous()
    assert not P._flat_n(W.stride(1), W.stride(2), J, D)
    assert not P._flat_n(g.stride(2), g.stride(3), J, D)
    actual, expected = triton_and_exact(u, W, g)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    # The gradient of sum() reaches the backward as an expanded (zero-stride) tensor.
    (du, dW) = torch.autograd.grad(ce.predict(u, W, backend="triton").sum(), [u, W])
    (du_ref, dW_ref) = torch.autograd.grad(reference.predict(u, W).sum(), [u, W])
    torch.testing.assert_close(du, du_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dW, dW_ref, rtol=1e-12, atol=1e-12)


def test_gradients_are_bitwise_reproducible(device):
    """No atomics: the sum over samples of ``dW`` runs in one program in a fixed order."""
    require_triton(device)
    u, W, g = make((130, 2, 3, 7, 8), torch.float32, device, seed=1)
    first = torch.autograd.grad(ce.predict(u, W, backend="triton"), [u, W], g)
    second = torch.autograd.grad(ce.predict(u, W, backend="triton"), [u, W], g)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_a_single_gradient(device):
    require_triton(device)
    u, W, g = make((3, 5, 3, 5, 20), torch.float64, device, seed=4)
    out = ce.predict(u, W.detach(), backend="triton")
    (du,) = torch.autograd.grad(out, [u], g)
    (dW,) = torch.autograd.grad(ce.predict(u.detach(), W, backend="triton"), [W], g)
    du_ref = torch.einsum("bijd,ijdk->bik", g, W.detach())
    dW_ref = torch.einsum("bijd,bik->ijdk", g, u.detach())
    torch.testing.assert_close(du, du_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dW, dW_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("config", [P.PredictConfig(16, 16, 16, 1), P.PredictConfig(32, 64, 16, 2)])
def test_other_tile_configs(device, config):
    """Smaller tiles walk more chunks on the same shapes (Din 20 over two K chunks, N = 85 over
    six, 40 samples over three)."""
    require_triton(device)
    u, W, g = make((40, 2, 17, 5, 20), torch.float64, device, seed=8)
    out = P._predict_forward(u.detach(), W.detach(), config)
    du, dW = P._predict_backward(g, u.detach(), W.detach(), True, True, config)
    _, expected = triton_and_exact(u, W, g)
    for a, e in zip([out, du, dW], expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_config_rules():
    P.check_config(P.DEFAULT_CONFIG)
    assert P.DEFAULT_CONFIG.BLOCK_B >= 16 * P.DEFAULT_CONFIG.warps
    assert P.DEFAULT_CONFIG.BLOCK_N >= 16 * P.DEFAULT_CONFIG.warps
    for bad in (P.PredictConfig(BLOCK_K=8), P.PredictConfig(BLOCK_B=48),
                P.PredictConfig(BLOCK_B=32, warps=4), P.PredictConfig(stages=0)):
        with pytest.raises(ValueError):
            P.check_config(bad)
    # Every dot axis is a power of two of at least 16, at most the config's block.
    assert [P._pow2_block(n, 64) for n in (1, 3, 16, 17, 70, 1000)] == [16, 16, 16, 32, 64, 64]


def test_float32_follows_the_tf32_switch(device):
    """float32 dots take PyTorch's matmul precision, as ``capsule_routing`` does: exact inputs
    under ``"ieee"``, TF32 (on a GPU: about 1e-3 relative) when TF32 is allowed. The
    interpreter models no TF32, so on the CPU only the precision handed to the kernels is
    checked."""
    require_triton(device)
    with fp32_matmul("ieee"):
        assert P._meta(torch.float32, P.DEFAULT_CONFIG)["PRECISION"] == "ieee"
    with fp32_matmul("tf32"):
        assert P._meta(torch.float32, P.DEFAULT_CONFIG)["PRECISION"] == "tf32"
        for dtype in (torch.float16, torch.bfloat16, torch.float64):
            assert P._meta(dtype, P.DEFAULT_CONFIG)["PRECISION"] == "ieee"
        u, W, g = make((64, 4, 10, 16, 8), torch.float32, device, seed=2)
        actual, expected = triton_and_exact(u, W, g)
    for a, e in zip(actual, expected):
        assert relative_error(a, e) < 4e-3


def test_registered_operators_pass_opcheck(device):
    require_triton(device)
    u, W, g = make((3, 5, 3, 5, 20), torch.float64, device, seed=6)
    torch.library.opcheck(P.predict_op, (u, W))
    for need_u, need_w in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(P.predict_backward_op, (g, u.detach(), W.detach(), need_u, need_w))


def test_torch_compile_fullgraph(device):
    require_triton(device)
    torch._dynamo.reset()
    u, W, g = make((3, 5, 3, 5, 20), torch.float64, device, seed=12)
    compiled = torch.compile(lambda u, W: ce.predict(u, W, backend="triton"), fullgraph=True)
    out = compiled(u, W)
    grads = torch.autograd.grad(out, [u, W], g)
    _, expected = triton_and_exact(u, W, g)
    for a, e in zip([out.detach(), *grads], expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
