"""Public API: losses, bad-input errors, backend selection, modules, torch.compile."""
import pytest
import torch

import capsnet_ext as ce
from capsnet_ext import dispatch
from capsnet_ext.nn import BaselineCNN, CapsNet, PrimaryCaps, RoutingCapsules, build_model
from naive import naive_margin_loss


# ---------------------------------------------------------------- losses
def test_margin_loss_hand_computed():
    lengths = torch.tensor([[0.95, 0.30, 0.05], [0.50, 0.05, 0.80]], dtype=torch.float64)
    # sample 0, target 0: pos 0 (0.95 > 0.9); neg 0.5*(0.3-0.1)^2 = 0.02; neg 0 (0.05 < 0.1)
    # sample 1, target 2: pos (0.9-0.8)^2 = 0.01; neg 0.5*(0.5-0.1)^2 = 0.08; neg 0
    targets = torch.tensor([0, 2])
    per_sample = ce.margin_loss(lengths, targets, reduction="none")
    torch.testing.assert_close(per_sample, torch.tensor([0.02, 0.09], dtype=torch.float64))
    torch.testing.assert_close(ce.margin_loss(lengths, targets), torch.tensor(0.055, dtype=torch.float64))
    torch.testing.assert_close(ce.margin_loss(lengths, targets, reduction="sum"),
                               torch.tensor(0.11, dtype=torch.float64))


def test_margin_loss_multi_hot_and_options_match_naive():
    g = torch.Generator().manual_seed(3)
    lengths = torch.rand(5, 7, generator=g, dtype=torch.float64)
    multi_hot = torch.zeros(5, 7, dtype=torch.float64)
    sets = [{0, 3}, {1, 2}, {6, 5}, {4, 0}, {2, 3}]
    for b, classes in enumerate(sets):
        multi_hot[b, list(classes)] = 1
    got = ce.margin_loss(lengths, multi_hot, m_pos=0.8, m_neg=0.2, lam=0.3, reduction="none")
    want = naive_margin_loss(lengths, sets, m_pos=0.8, m_neg=0.2, lam=0.3)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))


def test_reconstruction_loss_is_sum_of_squares_per_image():
    recon = torch.full((2, 784), 0.5)
    images = torch.zeros(2, 1, 28, 28)
    images[1] = 1.0
    torch.testing.assert_close(ce.reconstruction_loss(recon, images, reduction="none"),
                               torch.tensor([196.0, 196.0]))
    torch.testing.assert_close(ce.reconstruction_loss(recon, images), torch.tensor(196.0))


def test_loss_errors():
    with pytest.raises(ValueError, match="reduction"):
        ce.margin_loss(torch.rand(2, 3), torch.tensor([0, 1]), reduction="avg")
    with pytest.raises(ValueError, match="multi-hot"):
        ce.margin_loss(torch.rand(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="class indices"):
        ce.margin_loss(torch.rand(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="pixels per sample"):
        ce.reconstruction_loss(torch.rand(2, 10), torch.rand(2, 11))


# ---------------------------------------------------------------- bad input
U = lambda *s: torch.randn(*s)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: ce.predict(U(2, 3), U(3, 2, 4, 5)), ValueError, r"u must have 3 dimensions .*\[B, I, Din\]"),
    (lambda: ce.predict(U(2, 3, 5), U(3, 2, 4)), ValueError, r"W must have 4 dimensions .*\[I, J, Dout, Din\]"),
    (lambda: ce.predict(U(2, 3, 5), U(4, 2, 4, 5)), ValueError, r"W has 4 input capsules .*u has 3"),
    (lambda: ce.predict(U(2, 3, 5), U(3, 2, 4, 6)), ValueError, r"W has input dimension 6 .*u has 5"),
    (lambda: ce.predict(torch.ones(2, 3, 5, dtype=torch.int64), U(3, 2, 4, 5)), TypeError, "u must be a floating-point"),
    (lambda: ce.predict(U(2, 3, 5), U(3, 2, 4, 5).double()), TypeError, "W has dtype torch.float64"),
    (lambda: ce.predict(U(2, 3, 5), torch.empty(3, 2, 4, 5, device="meta")), ValueError, "W is on meta"),
    (lambda: ce.predict([1.0], U(3, 2, 4, 5)), TypeError, "u must be a torch.Tensor"),
    (lambda: ce.dynamic_routing(U(2, 3, 4), 3), ValueError, r"u_hat must have 4 dimensions .*\[B, I, J, Dout\]"),
    (lambda: ce.dynamic_routing(U(2, 3, 4, 5), 0), ValueError, "iterations must be >= 1, got 0"),
    (lambda: ce.dynamic_routing(U(2, 3, 4, 5), 2.0), TypeError, "iterations must be an int"),
    (lambda: ce.dynamic_routing(U(2, 3, 4, 5), 3, bias=U(4, 6)), ValueError, r"bias must have shape \[J, Dout\] = \[4, 5\], got \(4, 6\)"),
    (lambda: ce.dynamic_routing(U(2, 3, 4, 5), 3, bias=U(4, 5).double()), TypeError, "bias has dtype"),
    (lambda: ce.capsule_routing(U(2, 3, 5), U(3, 2, 4, 5), 3, bias=U(2, 5)), ValueError, r"bias must have shape \[J, Dout\] = \[2, 4\]"),
    (lambda: ce.capsule_routing(U(2, 3, 5), U(3, 2, 4, 5), -1), ValueError, "iterations must be >= 1"),
    (lambda: ce.capsule_routing(U(0, 3, 5), U(3, 2, 4, 5), 3), ValueError, "u must not be empty"),
    (lambda: ce.squash(torch.ones(3, dtype=torch.int32)), TypeError, "s must be a floating-point"),
    (lambda: ce.predict(U(2, 3, 5), U(3, 2, 4, 5), backend="fast"), ValueError, "backend must be 'auto' or one of"),
])
def test_bad_inputs_raise_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_rank_errors_for_every_backend_name():
    """Validation runs before dispatch, so every backend name gives the same message."""
    for backend in ce.BACKENDS:
        with pytest.raises(ValueError, match="u_hat must have 4 dimensions"):
            ce.dynamic_routing(U(2, 3, 4), 3, backend=backend)


# ---------------------------------------------------------------- backends
def test_reference_is_always_available_and_auto_falls_back():
    assert "reference" in ce.available_backends("cpu")
    status = ce.backend_status("cpu")
    assert set(status) == set(ce.BACKENDS) and status["reference"] == "available"
    assert dispatch.select("capsule_routing", "auto", torch.device("cpu"), torch.float32).NAME == "reference"


def test_unavailable_backend_named_explicitly_says_why():
    reason = ce.unavailable_reason("cuda", "cpu")
    assert reason  # no GPU build can serve CPU tensors
    with pytest.raises(ce.BackendUnavailableError, match="backend 'cuda' is unavailable on cpu"):
        ce.capsule_routing(U(2, 3, 5), U(3, 2, 4, 5), 3, backend="cuda")


def test_environment_variable_overrides_auto(monkeypatch):
    monkeypatch.setenv("CAPSNET_EXT_BACKEND", "cuda")
    with pytest.raises(ce.BackendUnavailableError):
        ce.capsule_routing(U(2, 3, 5), U(3, 2, 4, 5), 3)
    monkeypatch.setenv("CAPSNET_EXT_BACKEND", "reference")
    assert ce.capsule_routing(U(2, 3, 5), U(3, 2, 4, 5), 3).shape == (2, 2, 4)


# ---------------------------------------------------------------- modules
def test_primary_caps_mnist_geometry():
    layer = PrimaryCaps(256, 32, 8, 9, 2)
    out = layer(torch.randn(2, 256, 20, 20))
    assert out.shape == (2, 1152, 8) and layer.num_capsules(20, 20) == 1152
    assert bool((out.norm(dim=-1) < 1).all())


def test_routing_capsules_shapes_couplings_and_gradients():
    layer = RoutingCapsules(13, 5, 6, 7, iterations=2, bias=True, leaky=True)
    assert layer.weight.shape == (13, 5, 7, 6) and layer.bias.shape == (5, 7)
    u = torch.randn(3, 13, 6)
    v, c = layer(u, return_coupling=True)
    assert v.shape == (3, 5, 7) and c.shape == (3, 13, 5)
    v.sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
    with pytest.raises(ValueError, match="in_caps must be a positive int"):
        RoutingCapsules(0, 5, 6, 7)
    with pytest.raises(ValueError, match="backend must be"):
        RoutingCapsules(3, 5, 6, 7, backend="gpu")


def test_capsnet_mnist_shapes_and_masking():
    torch.manual_seed(0)
    model = CapsNet()
    assert model.num_primary == 1152
    x = torch.rand(2, 1, 28, 28)
    out = model(x, targets=torch.tensor([3, 7]), return_coupling=True)
    assert out.capsules.shape == (2, 10, 16) and out.lengths.shape == (2, 10)
    assert out.reconstructions.shape == (2, 784) and out.couplings.shape == (2, 1152, 10)
    assert bool(((out.reconstructions >= 0) & (out.reconstructions <= 1)).all())
    # Without targets the decoder sees the longest capsule alone.
    pred = model(x)
    mask = torch.nn.functional.one_hot(pred.lengths.argmax(1), 10).float()
    torch.testing.assert_close(pred.reconstructions, model.reconstruct(pred.capsules, mask))
    rebuilt = build_model(model.config)
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt(x).lengths, pred.lengths)


def test_capsnet_configurable_and_baseline():
    model = CapsNet(input_size=24, in_channels=3, num_classes=7, conv_channels=16,
                    primary_channels=4, iterations=1, leaky=True, decoder=False)
    out = model(torch.rand(1, 3, 24, 24))
    assert out.capsules.shape == (1, 7, 16) and out.reconstructions is None
    assert BaselineCNN()(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown model arch"):
        build_model({"arch": "resnet"})


def test_routing_capsules_under_torch_compile():
    torch.manual_seed(0)
    layer = RoutingCapsules(9, 4, 5, 6, iterations=3, bias=True, backend="reference")
    u = torch.randn(2, 9, 5, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    v = compiled(u)
    torch.testing.assert_close(v, layer(u), rtol=1e-5, atol=1e-6)
    g_c, = torch.autograd.grad(v.sum(), u)
    g_e, = torch.autograd.grad(layer(u).sum(), u)
    torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-6)


def test_capsnet_trains_under_bfloat16_autocast():
    torch.manual_seed(0)
    model = CapsNet(conv_channels=16, primary_channels=4)
    x, y = torch.rand(2, 1, 28, 28), torch.tensor([1, 4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, targets=y)
        loss = ce.margin_loss(out.lengths.float(), y) + 0.0005 * ce.reconstruction_loss(
            out.reconstructions.float(), x)
    assert out.capsules.dtype == torch.bfloat16
    loss.backward()
    assert model.digits.weight.grad.dtype == torch.float32
    assert torch.isfinite(model.digits.weight.grad).all() and model.digits.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- atomic writes
def test_atomic_write_replaces_whole_files_and_keeps_the_old_one_on_error(tmp_path):
    from capsnet_ext._atomic import atomic_path, atomic_write

    target = tmp_path / "sub" / "result.json"
    atomic_write(target, '{"a": 1}\n')
    assert target.read_text() == '{"a": 1}\n'
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_path(target) as tmp:
            with open(tmp, "w") as handle:
                handle.write('{"a": ')
            raise RuntimeError("interrupted")
    assert target.read_text() == '{"a": 1}\n'
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]
    atomic_write(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01" and (target.stat().st_mode & 0o777) != 0o600
