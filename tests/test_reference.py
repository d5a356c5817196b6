"""The reference path against the naive loop implementation, in float64, plus gradcheck."""
import pytest
import torch

import capsnet_ext as ce
from capsnet_ext import reference
from naive import naive_predict, naive_routing, naive_squash

SHAPES = [  # B, I, J, Din, Dout: odd, not powers of two, B = 1
    (1, 3, 2, 4, 5),
    (2, 7, 3, 5, 3),
    (3, 5, 5, 3, 7),
]


def rand(*shape, scale=1.0, seed=None, requires_grad=False):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    x = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale)
    return x.requires_grad_(requires_grad)


@pytest.mark.parametrize("shape", SHAPES)
def test_predict_matches_naive(shape):
    B, I, J, Din, Dout = shape
    u, W = rand(B, I, Din), rand(I, J, Dout, Din)
    torch.testing.assert_close(ce.predict(u, W, backend="reference"), naive_predict(u, W))


def test_squash_matches_naive_and_is_short():
    s = rand(6, 9, scale=3.0)
    v = ce.squash(s)
    for row_s, row_v in zip(s, v):
        torch.testing.assert_close(row_v, naive_squash(row_s))
    assert bool((v.norm(dim=-1) < 1).all())


def test_squash_at_zero_is_finite_with_finite_gradient():
    for dtype in (torch.float32, torch.float64):
        s = torch.zeros(4, 16, dtype=dtype, requires_grad=True)
        v = ce.squash(s)
        v.sum().backward()
        assert torch.equal(v.detach(), torch.zeros_like(v))
        assert torch.isfinite(s.grad).all()
        assert s.grad.abs().max() < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_squash_half_precision_at_zero_and_small(dtype):
    s = torch.tensor([[0.0, 0.0], [1e-3, -2e-3], [3.0, 4.0]], dtype=dtype)
    v = ce.squash(s)
    assert v.dtype == dtype and torch.isfinite(v).all()
    expected = reference.squash(s.double())
    torch.testing.assert_close(v.double(), expected, rtol=1e-2, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("iterations", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("with_bias,leaky", [(False, False), (True, False), (False, True), (True, True)])
def test_dynamic_routing_forward_matches_naive(shape, iterations, with_bias, leaky):
    B, I, J, _, D = shape
    u_hat = rand(B, I, J, D, scale=0.5)
    bias = rand(J, D, scale=0.3) if with_bias else None
    for detach_inner in (False, True):
        v, c = ce.dynamic_routing(u_hat, iterations, bias=bias, leaky=leaky,
                                  detach_inner=detach_inner, return_coupling=True,
                                  backend="reference")
        v_naive, c_naive = naive_routing(u_hat, iterations, bias, leaky, detach_inner)
        torch.testing.assert_close(v, v_naive)
        torch.testing.assert_close(c, c_naive)
        assert c.shape == (B, I, J) and not c.requires_grad
        sums = c.sum(-1)
        if leaky:
            assert bool((sums < 1).all())
        else:
            torch.testing.assert_close(sums, torch.ones_like(sums))


@pytest.mark.parametrize("iterations", [1, 2, 3, 5])
@pytest.mark.parametrize("detach_inner", [False, True])
@pytest.mark.parametrize("leaky", [False, True])
def test_dynamic_routing_gradients_match_naive(iterations, detach_inner, leaky):
    B, I, J, D = 2, 5, 3, 3
    u_hat = rand(B, I, J, D, scale=0.6, requires_grad=True)
    bias = rand(J, D, scale=0.3, requires_grad=True)
    weight = rand(B, J, D)  # a random upstream gradient, not a plain sum
    v = ce.dynamic_routing(u_hat, iterations, bias=bias, leaky=leaky,
                           detach_inner=detach_inner, backend="reference")
    g_u, g_b = torch.autograd.grad((v * weight).sum(), (u_hat, bias))
    v_naive, _ = naive_routing(u_hat, iterations, bias, leaky, detach_inner)
    n_u, n_b = torch.autograd.grad((v_naive * weight).sum(), (u_hat, bias))
    torch.testing.assert_close(g_u, n_u)
    torch.testing.assert_close(g_b, n_b)


def test_detach_inner_changes_gradient_but_not_value():
    u_hat = rand(2, 6, 4, 3, scale=0.8, requires_grad=True)
    full = ce.dynamic_routing(u_hat, 3)
    detached = ce.dynamic_routing(u_hat, 3, detach_inner=True)
    torch.testing.assert_close(full, detached)
    g_full, = torch.autograd.grad(full.sum(), u_hat)
    g_det, = torch.autograd.grad(detached.sum(), u_hat)
    assert (g_full - g_det).abs().max() > 1e-6


def test_logits_start_at_zero_per_sample():
    """One iteration is a uniform average: nothing is learned or shared across the batch."""
    u_hat = rand(3, 4, 5, 2)
    v = ce.dynamic_routing(u_hat, 1)
    torch.testing.assert_close(v, reference.squash(u_hat.mean(dim=1) * 4 / 5))
    # Each sample's output depends on that sample alone.
    torch.testing.assert_close(ce.dynamic_routing(u_hat[1:2], 3), ce.dynamic_routing(u_hat, 3)[1:2])


@pytest.mark.parametrize("with_bias,leaky", [(False, False), (True, True)])
def test_capsule_routing_equals_routing_of_predict(with_bias, leaky):
    u, W = rand(2, 7, 5), rand(7, 3, 4, 5, scale=0.4)
    bias = rand(3, 4) if with_bias else None
    v, c = ce.capsule_routing(u, W, 3, bias=bias, leaky=leaky, return_coupling=True)
    v2, c2 = ce.dynamic_routing(ce.predict(u, W), 3, bias=bias, leaky=leaky, return_coupling=True)
    torch.testing.assert_close(v, v2)
    torch.testing.assert_close(c, c2)


def test_gradcheck_squash_and_predict():
    s = rand(3, 5, requires_grad=True)
    assert torch.autograd.gradcheck(ce.squash, (s,))
    u, W = rand(2, 3, 5, requires_grad=True), rand(3, 2, 4, 5, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ce.predict(a, b, backend="reference"), (u, W))


@pytest.mark.parametrize("leaky", [False, True])
def test_gradcheck_dynamic_routing(leaky):
    u_hat = rand(2, 4, 3, 3, scale=0.7, requires_grad=True)
    bias = rand(3, 3, scale=0.2, requires_grad=True)
    fn = lambda x, b: ce.dynamic_routing(x, 3, bias=b, leaky=leaky, backend="reference")
    assert torch.autograd.gradcheck(fn, (u_hat, bias))


def test_gradcheck_capsule_routing():
    u = rand(2, 5, 3, requires_grad=True)
    W = rand(5, 3, 4, 3, scale=0.5, requires_grad=True)
    bias = rand(3, 4, scale=0.2, requires_grad=True)
    fn = lambda a, w, b: ce.capsule_routing(a, w, 3, bias=b, backend="reference")
    assert torch.autograd.gradcheck(fn, (u, W, bias))


@pytest.mark.parametrize("leaky", [False, True])
def test_gradcheck_dynamic_routing_detach_inner(leaky):
    """``detach_inner`` returns a surrogate gradient, not the derivative of its output (the
    couplings move with the input but are treated as constants), so gradcheck cannot test it
    directly. Instead the couplings are frozen at their value at the test point; that frozen
    function is gradchecked, and its Jacobian must equal the one ``detach_inner`` gives."""
    u_hat = rand(2, 4, 3, 3, scale=0.7, requires_grad=True)
    bias = rand(3, 3, scale=0.2, requires_grad=True)
    _, c0 = ce.dynamic_routing(u_hat, 3, bias=bias, leaky=leaky, return_coupling=True)
    frozen = lambda x, b: reference.squash(torch.einsum("bij,bijd->bjd", c0, x) + b)
    assert torch.autograd.gradcheck(frozen, (u_hat, bias))
    routed = lambda x, b: ce.dynamic_routing(x, 3, bias=b, leaky=leaky, detach_inner=True,
                                             backend="reference")
    for got, want in zip(torch.autograd.functional.jacobian(routed, (u_hat, bias)),
                         torch.autograd.functional.jacobian(frozen, (u_hat, bias))):
        torch.testing.assert_close(got, want)


def test_gradcheck_capsule_routing_detach_inner():
    u = rand(2, 5, 3, requires_grad=True)
    W = rand(5, 3, 4, 3, scale=0.5, requires_grad=True)
    bias = rand(3, 4, scale=0.2, requires_grad=True)
    _, c0 = ce.capsule_routing(u, W, 3, bias=bias, return_coupling=True)
    frozen = lambda a, w, b: reference.squash(
        torch.einsum("bij,bijd->bjd", c0, reference.predict(a, w)) + b)
    assert torch.autograd.gradcheck(frozen, (u, W, bias))
    routed = lambda a, w, b: ce.capsule_routing(a, w, 3, bias=b, detach_inner=True,
                                                backend="reference")
    for got, want in zip(torch.autograd.functional.jacobian(routed, (u, W, bias)),
                         torch.autograd.functional.jacobian(frozen, (u, W, bias))):
        torch.testing.assert_close(got, want)


def test_float32_and_half_inputs_run_in_their_dtype():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        u, W = torch.randn(2, 5, 4, dtype=dtype), (0.3 * torch.randn(5, 3, 6, 4)).to(dtype)
        v = ce.capsule_routing(u, W, 3, backend="reference")
        assert v.dtype == dtype and v.shape == (2, 3, 6) and torch.isfinite(v).all()
        ref = ce.capsule_routing(u.double(), W.double(), 3)
        tol = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 6e-2}[dtype]
        torch.testing.assert_close(v.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("iterations", [1, 2, 4])
@pytest.mark.parametrize("temperature", [1.0, 0.37, 2.5])
@pytest.mark.parametrize("leaky", [False, True])
@pytest.mark.parametrize("detach_inner", [False, True])
def test_prior_and_temperature_match_naive(iterations, temperature, leaky, detach_inner):
    """The learned prior logit and the softmax temperature (Mitterreiter et al.'s
    AgreementRouting), forward, couplings and every gradient, prior's included."""
    B, I, J, D = 2, 5, 3, 4
    u_hat = rand(B, I, J, D, scale=0.6, seed=1, requires_grad=True)
    bias = rand(J, D, scale=0.3, seed=2, requires_grad=True)
    prior = rand(I, J, scale=0.8, seed=3, requires_grad=True)
    weight = rand(B, J, D, seed=4)
    v, c = ce.dynamic_routing(u_hat, iterations, bias=bias, leaky=leaky, detach_inner=detach_inner,
                              prior=prior, temperature=temperature, return_coupling=True,
                              backend="reference")
    v_n, c_n = naive_routing(u_hat, iterations, bias, leaky, detach_inner, prior, temperature)
    torch.testing.assert_close(v, v_n)
    torch.testing.assert_close(c, c_n)
    got = torch.autograd.grad((v * weight).sum(), (u_hat, bias, prior))
    want = torch.autograd.grad((v_n * weight).sum(), (u_hat, bias, prior))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert got[2].abs().max() > 0  # the prior learns, also under detach_inner


def test_prior_sets_first_coupling_and_is_shared_by_samples():
    u_hat = rand(3, 4, 5, 2, seed=5)
    prior = rand(4, 5, seed=6)
    _, c = ce.dynamic_routing(u_hat, 1, prior=prior, temperature=0.5, return_coupling=True)
    torch.testing.assert_close(c, torch.softmax(prior / 0.5, dim=-1).expand(3, 4, 5))
    # Without a prior, temperature 1 is the default behaviour exactly.
    torch.testing.assert_close(ce.dynamic_routing(u_hat, 3, temperature=1.0), ce.dynamic_routing(u_hat, 3))


def test_gradcheck_capsule_routing_prior_temperature():
    u = rand(2, 5, 3, seed=7, requires_grad=True)
    W = rand(5, 3, 4, 3, scale=0.5, seed=8, requires_grad=True)
    prior = rand(5, 3, scale=0.5, seed=9, requires_grad=True)
    fn = lambda a, w, p: ce.capsule_routing(a, w, 4, prior=p, temperature=0.7, leaky=True,
                                            backend="reference")
    assert torch.autograd.gradcheck(fn, (u, W, prior))


@pytest.mark.parametrize("kwargs,match", [
    (dict(prior=torch.zeros(4, 3)), r"prior must have shape \[I, J\] = \[5, 3\]"),
    (dict(prior=torch.zeros(5, 3, dtype=torch.float32)), "prior has dtype"),
    (dict(temperature=0.0), "temperature must be a positive finite number"),
    (dict(temperature=float("inf")), "temperature must be a positive finite number"),
    (dict(temperature="1"), "temperature must be a float"),
])
def test_prior_temperature_bad_input(kwargs, match):
    u_hat = rand(2, 5, 3, 4)
    with pytest.raises((ValueError, TypeError), match=match):
        ce.dynamic_routing(u_hat, 3, **kwargs)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_kernel_backends_report_prior_temperature_support(backend):
    """Each kernel backend either implements prior/temperature or says so; ``auto`` never
    hands the options to a backend that refuses them."""
    from capsnet_ext.dispatch import _load
    module = _load(backend)
    if module is None:
        pytest.skip(f"{backend} backend does not import here")
    reason = module.unsupported_reason("capsule_routing", dtype=torch.float32, iterations=3,
                                       prior=True, temperature=0.5, sizes=dict(J=3, Dout=4, Din=3))
    assert reason is None or "prior" in reason or "temperature" in reason
    if backend == "triton":  # implemented there (tests/test_triton.py checks it against this file)
        assert reason is None
