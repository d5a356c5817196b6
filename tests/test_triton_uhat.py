"""The u_hat-tile design of the fused Triton ``capsule_routing`` (``Config.design = "uhat"``,
the second half of ``capsnet_ext/triton_ops/_gemm_kernels.py``; ``dynamic_routing`` runs on the
same kernels with ``u_hat`` loaded): forward and every gradient against the reference for
every option, odd sizes, float64 gradcheck, cross-program sums, gradient subsets, launch
counts, bitwise determinism and the low-precision error, with the design forced the way the
tuning sweep forces a candidate.

Without a GPU these run in Triton's CPU interpreter (tests/conftest.py); shapes are tiny.
"""
import contextlib

import pytest
import torch

import capsnet_ext as ce

triton_ops = pytest.importorskip("capsnet_ext.triton_ops")

from capsnet_ext.triton_ops import _gemm_core, tuning  # noqa: E402

from test_triton_gemm import (PRIOR_CASES, SIZES, count_launches, forward_backward,  # noqa: E402
                              make, require_triton)


@contextlib.contextmanager
def uhat_design(shape, dtype, **changes):
    """Run the fused op with the u_hat-tile design (the default configuration otherwise)."""
    B, I, J, Din, D = shape
    config = _gemm_core.default_config(B, I, J, D, Din, dtype, design="uhat")._replace(**changes)
    with tuning.forced(config):
        yield config


def compare(shape, dtype, device, seed, iterations, rtol=1e-10, atol=1e-12, prior=True,
            **options):
    u, W, b, p = make(shape, dtype, device, seed=seed, prior=prior)
    expected = forward_backward("reference", u, W, b, p, iterations, **options)
    with uhat_design(shape, dtype):
        actual = forward_backward("triton", u, W, b, p, iterations, **options)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol)
    return actual


@pytest.mark.parametrize("shape,iterations,options,has_prior,temperature", PRIOR_CASES)
def test_every_option_matches_reference(device, shape, iterations, options, has_prior,
                                        temperature):
    require_triton(device)
    compare(shape, torch.float64, device, iterations + len(options), iterations,
            prior=has_prior, temperature=temperature, **options)


@pytest.mark.parametrize("shape", SIZES)
def test_sizes(device, shape):
    """J, Dout and Din padded (J * Dout to at least 16 for the dot's N, Din to at least 16 for
    its K) and a partial sample tile, with every option on."""
    require_triton(device)
    B, I, J, Din, D = shape
    dtype = torch.float64
    if _gemm_core.capsule_size_limit_reason(J, D, Din, dtype) is not None:
        dtype = torch.float32
    if dtype == torch.float64:
        compare(shape, dtype, device, sum(shape), 3, leaky=True, temperature=0.9,
                return_coupling=True)
        return
    u, W, b, p = make(shape, dtype, device, seed=sum(shape))
    expected = forward_backward("reference", *(t.detach().double().requires_grad_()
                                               for t in (u, W, b, p)), 3, leaky=True)
    with uhat_design(shape, dtype):
        actual = forward_backward("triton", u, W, b, p, 3, leaky=True)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.double(), e, rtol=2e-3, atol=2e-4)


def test_single_output_capsule_pads_the_dot(device):
    """J = 1, Dout = 2: the u_hat dot's N (J * Dout padded) is raised to 16."""
    require_triton(device)
    shape = (5, 3, 1, 2, 2)
    plan = _gemm_core.Plan(5, 3, 1, 2, 2, torch.device(device),
                           _gemm_core.Config(16, 4, 4, 16, 4, design="uhat"), torch.float64)
    assert plan.uhat and plan.BLOCK_J * plan.BLOCK_D >= 16 and plan.DINP == 16
    compare(shape, torch.float64, device, 3, 3, leaky=True)


# detach_inner is no function's derivative (gradcheck's numerical side sees through it); it is
# covered against the reference above.
@pytest.mark.parametrize("iterations,options", [(1, {}), (3, dict(leaky=True)), (2, {})])
def test_gradcheck(device, iterations, options):
    require_triton(device)
    shape = (3, 4, 3, 3, 4)
    u, W, b, p = make(shape, torch.float64, device, seed=11)

    def fn(u, W, b, p):
        return ce.capsule_routing(u, W, iterations, bias=b, prior=p, temperature=0.8,
                                  backend="triton", **options)

    with uhat_design(shape, torch.float64):
        assert torch.autograd.gradcheck(fn, (u, W, b, p), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("splits", [(2, 2), (3, 3)])
def test_sums_across_programs(device, monkeypatch, splits):
    """Forced splits of the input capsules and of the samples: the partial sums, dW, the prior
    and the bias gradients cross programs; a second run is the same bit for bit."""
    require_triton(device)
    monkeypatch.setattr(_gemm_core, "FORCE_SPLITS", splits)
    shape = (40, 7, 3, 3, 4)
    with uhat_design(shape, torch.float64) as config:
        plan = _gemm_core.Plan(40, 7, 3, 4, 3, torch.device(device), config, torch.float64)
    assert plan.n_isplit > 1 and plan.n_bsplit > 1
    first = compare(shape, torch.float64, device, 5, 3, leaky=True, temperature=0.7,
                    return_coupling=True)
    u, W, b, p = make(shape, torch.float64, device, seed=5)
    with uhat_design(shape, torch.float64):
        again = forward_backward("triton", u, W, b, p, 3, leaky=True, temperature=0.7,
                                 return_coupling=True)
    assert all(torch.equal(x, y) for x, y in zip(first, again))


def test_gradient_subsets(device):
    """Gradient wanted for u only, W only, bias only, prior only."""
    require_triton(device)
    shape = (3, 6, 3, 3, 4)
    u, W, b, p = make(shape, torch.float64, device, seed=3)
    for wanted in ([u], [W], [b], [p]):
        grads = []
        for backend in ("reference", "triton"):
            with (uhat_design(shape, torch.float64) if backend == "triton"
                  else contextlib.nullcontext()):
                v = ce.capsule_routing(u, W, 3, bias=b, prior=p, backend=backend)
                grads.append(torch.autograd.grad(v.sum(), wanted)[0])
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("iterations", [1, 3])
def test_launch_counts(device, monkeypatch, iterations):
    """Forward R + 1 launches; backward R - 1 reduction sweeps, the first ``gs`` and one
    gradient sweep for du, dW, d prior and d bias together (plus the sum over sample splits
    when there are several); no PyTorch kernels."""
    require_triton(device)
    shape = (17, 6, 3, 3, 4)
    u, W, b, p = make(shape, torch.float32, device, seed=iterations)
    grad_v = torch.randn(17, 3, 4, device=device)
    with uhat_design(shape, torch.float32):
        forward_backward("triton", u, W, b, p, iterations)  # compile
        with count_launches(monkeypatch) as (launches, torch_ops):
            v = triton_ops.capsule_routing(u, W, iterations, bias=b, prior=p)
        names = [name for name, _ in launches]
        assert not torch_ops and len(names) == iterations + 1, names
        assert names.count("_fwd_uhat_sweep_kernel") == iterations
        with count_launches(monkeypatch) as (launches, torch_ops):
            torch.autograd.grad(v, [u, W, b, p], grad_v)
    names = [name for name, _ in launches]
    assert not torch_ops
    assert names.count("_grad_uhat_sweep_kernel") == 1
    assert names.count("_bwd_uhat_sweep_kernel") == iterations - 1
    assert len(names) <= iterations + 2, names


@pytest.mark.parametrize("dtype,floor", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_low_precision_error(device, dtype, floor):
    """float32 (exact dots) and bfloat16 (bfloat16 operands, float32 accumulation) against the
    float64 reference: the worst relative error of the output and each gradient."""
    require_triton(device)
    shape = (19, 9, 10, 8, 16)
    u, W, b, p = make(shape, dtype, device, seed=7)
    expected = forward_backward("reference", *(t.detach().double().requires_grad_()
                                               for t in (u, W, b, p)), 3)
    with uhat_design(shape, dtype):
        actual = forward_backward("triton", u, W, b, p, 3)
    for a, e in zip(actual, expected):
        error = (a.double() - e).abs().max() / e.abs().max()
        assert error < floor, (dtype, error.item())


def test_tf32_runs_the_batched_design(device):
    """TF32 float32 takes the batched kernels whatever the design (the u_hat-tile gradient
    sweep spills in TF32 on sm_90); exact float32 and the other dtypes take the u_hat tiles."""
    require_triton(device)
    config = _gemm_core.Config(16, 8, 8, 16, 8, design="uhat")
    matmul = torch.backends.cuda.matmul
    old = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert not _gemm_core.Plan(32, 8, 10, 16, 8, torch.device(device), config,
                                   torch.float32).uhat
        assert _gemm_core.Plan(32, 8, 10, 16, 8, torch.device(device), config,
                               torch.bfloat16).uhat
        matmul.fp32_precision = "ieee"
        assert _gemm_core.Plan(32, 8, 10, 16, 8, torch.device(device), config,
                               torch.float32).uhat
    finally:
        matmul.fp32_precision = old
