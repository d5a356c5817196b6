"""DeepCapsNet: stacked routing layers, their couplings, config round trip and initialisation."""
import math

import pytest
import torch

from capsnet_ext import ops
from capsnet_ext.nn import CapsNetOutput, DeepCapsNet, RoutingCapsules, build_model
from capsnet_ext.nn.deep import auto_init_std

SMALL = dict(input_size=20, conv_channels=8, primary_channels=4, decoder_hidden=[16])


def test_forward_shapes_and_couplings_per_layer():
    torch.manual_seed(0)
    model = DeepCapsNet(num_classes=5, caps=[7, 6, 5], dims=[4, 3, 8], iterations=[1, 2, 3], **SMALL)
    assert [layer.iterations for layer in model.routing] == [1, 2, 3]
    x = torch.rand(3, 1, 20, 20)
    out = model(x, targets=torch.tensor([0, 4, 2]), return_coupling=True)
    assert isinstance(out, CapsNetOutput)
    assert out.lengths.shape == (3, 5) and out.capsules.shape == (3, 5, 8)
    assert out.reconstructions.shape == (3, 400)
    assert [tuple(c.shape) for c in out.couplings] == [(3, 16, 7), (3, 7, 6), (3, 6, 5)]
    for c in out.couplings:  # softmax over the parents
        torch.testing.assert_close(c.sum(-1), torch.ones(c.shape[:2]))
    plain = model(x)
    assert plain.couplings is None
    torch.testing.assert_close(plain.capsules, out.capsules)


def test_routing_trace_matches_forward_and_the_layers_applied_by_hand():
    torch.manual_seed(1)
    model = DeepCapsNet(num_classes=4, caps=[6, 4], dims=[5, 6], **SMALL).double()
    x = torch.rand(2, 1, 20, 20, dtype=torch.float64)
    trace = model.routing_trace(x)
    assert len(trace.capsules) == 3 and len(trace.couplings) == 2
    u = model.primary_capsules(x)
    torch.testing.assert_close(trace.capsules[0], u)
    for k, layer in enumerate(model.routing):
        v, c = ops.capsule_routing(u, layer.weight, layer.iterations, bias=layer.bias, return_coupling=True,
                                   backend="reference")
        torch.testing.assert_close(trace.capsules[k + 1], v)
        torch.testing.assert_close(trace.couplings[k], c)
        u = v
    torch.testing.assert_close(model(x).capsules, trace.capsules[-1])


def test_config_round_trip_through_build_model():
    torch.manual_seed(2)
    model = DeepCapsNet(num_classes=3, caps=[5, 3], dims=[4, 6], init_std=[0.3, 0.2], leaky=True, **SMALL)
    assert model.config["arch"] == "deep-capsnet"
    rebuilt = build_model(model.config)
    assert isinstance(rebuilt, DeepCapsNet)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(2, 1, 20, 20)
    torch.testing.assert_close(rebuilt(x).lengths, model(x).lengths)
    assert [layer.init_std for layer in rebuilt.routing] == [0.3, 0.2]
    assert all(layer.leaky for layer in rebuilt.routing)


def test_default_stack_is_the_documented_one():
    model = DeepCapsNet(conv_channels=8, decoder=False)
    assert [(l.out_caps, l.out_dim) for l in model.routing] == [(32, 8), (32, 8), (32, 8), (10, 16)]
    assert model.routing[0].in_caps == 32 * 6 * 6


def test_gradient_reaches_every_routing_layer():
    torch.manual_seed(3)
    model = DeepCapsNet(num_classes=4, caps=[6, 6, 6, 4], dims=[4, 4, 4, 6], **SMALL)
    out = model(torch.rand(4, 1, 20, 20), targets=torch.tensor([0, 1, 2, 3]))
    (out.lengths.sum() + out.reconstructions.sum()).backward()
    for layer in model.routing:
        assert layer.weight.grad is not None and float(layer.weight.grad.abs().max()) > 0


def test_auto_init_std_gives_unit_preactivation_for_half_length_inputs():
    """The derivation behind ``init_std="auto"``: with uniform couplings (one iteration) and
    inputs of length 0.5, ``E|s_j|^2`` is 1."""
    torch.manual_seed(4)
    I, J, Din, Dout = 64, 16, 8, 8
    squared = []
    for _ in range(8):
        layer = RoutingCapsules(I, J, Din, Dout, iterations=1, init_std=auto_init_std(I, J, Dout)).double()
        u = 0.5 * torch.nn.functional.normalize(torch.randn(128, I, Din, dtype=torch.float64), dim=-1)
        with torch.no_grad():
            s = ops.predict(u, layer.weight).sum(dim=1) / J  # uniform couplings: s_j = (1/J) sum_i u_hat_ij
        squared.append(float(s.pow(2).sum(-1).mean()))
    assert sum(squared) / len(squared) == pytest.approx(1.0, rel=0.1)


def test_auto_init_keeps_deep_stacks_input_dependent():
    """With init_std=0.1 (the single-layer CapsNet value) and no routing bias, lengths shrink
    quadratically and beyond two layers the output no longer depends on the input; the
    fan-in rule keeps every layer's lengths varying across inputs."""
    torch.manual_seed(5)
    x = torch.rand(16, 1, 20, 20)
    spread = {}
    for init in ("auto", 0.1):
        model = DeepCapsNet(num_classes=10, caps=[16, 16, 16, 16, 16, 10], init_std=init, routing_bias=False, **SMALL)
        with torch.no_grad():
            caps = model.routing_trace(x).capsules
        spread[init] = [float(c.norm(dim=-1).std(dim=0).mean()) for c in caps[1:]]
        lengths = [float(c.norm(dim=-1).mean()) for c in caps[1:]]
        if init == "auto":
            assert all(0.05 < m < 0.95 for m in lengths), lengths
    assert min(spread["auto"]) > 0.01, spread
    assert max(spread[0.1][2:]) < 1e-3, spread


@pytest.mark.parametrize("kwargs, words", [
    (dict(caps=[8, 5], num_classes=10), ["caps[-1]", "num_classes=10"]),
    (dict(caps=[8, 10], dims=[4]), ["dims", "2"]),
    (dict(caps=[8, 10], iterations=[1, 2, 3]), ["iterations", "2"]),
    (dict(caps=[8, 10], init_std="fan-in"), ["init_std"]),
    (dict(caps=[]), ["at least one"]),
    (dict(input_size=12), ["too small"]),
])
def test_bad_arguments_give_clear_errors(kwargs, words):
    with pytest.raises(ValueError) as info:
        DeepCapsNet(**{**dict(conv_channels=8, decoder=False), **kwargs})
    for word in words:
        assert word in str(info.value)


def test_truncation_correction_of_auto_init():
    std = auto_init_std(100, 10, 4)
    layer = RoutingCapsules(100, 10, 4, 4, init_std=std)
    assert float(layer.weight.detach().std()) == pytest.approx(10 / (0.5 * math.sqrt(100 * 4)), rel=0.05)


def test_stacked_layers_on_the_triton_backend_match_the_reference(device):
    """Every routing layer of the stack runs on the Triton kernels (the CPU interpreter without
    a GPU) with the same outputs, couplings and weight gradients as the reference."""
    from capsnet_ext import unavailable_reason

    reason = unavailable_reason("triton", device)
    if reason is not None:
        pytest.skip(f"Triton backend unavailable on {device}: {reason}")
    torch.manual_seed(6)
    config = dict(num_classes=4, caps=[6, 5, 4], dims=[4, 4, 6], iterations=[1, 3, 2], leaky=True,
                  decoder=False, **{k: v for k, v in SMALL.items() if k != "decoder_hidden"})
    ref = DeepCapsNet(backend="reference", **config).to(device)
    tri = DeepCapsNet(backend="triton", **config).to(device)
    tri.load_state_dict(ref.state_dict())
    x = torch.rand(3, 1, 20, 20, device=device)
    out_ref, out_tri = ref(x, return_coupling=True), tri(x, return_coupling=True)
    torch.testing.assert_close(out_tri.capsules, out_ref.capsules, rtol=1e-4, atol=1e-5)
    for c_tri, c_ref in zip(out_tri.couplings, out_ref.couplings):
        torch.testing.assert_close(c_tri, c_ref, rtol=1e-4, atol=1e-5)
    weights = torch.rand(3, 4, device=device)
    (out_ref.lengths * weights).sum().backward()
    (out_tri.lengths * weights).sum().backward()
    for l_tri, l_ref in zip(tri.routing, ref.routing):
        torch.testing.assert_close(l_tri.weight.grad, l_ref.weight.grad, rtol=1e-3, atol=1e-6)
