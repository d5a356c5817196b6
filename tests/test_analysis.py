"""Capsule diagnostics: routing metrics on couplings with known answers, hand-computed values,
streaming, the squash slope, the gradient-flow recorder and ``capsnet-ext analyze`` end to end."""
import json
import math
import os
import pathlib

import numpy as np
import pytest
import torch

from capsnet_ext import reference
from capsnet_ext.analysis import (
    GradientFlowRecorder,
    RoutingMetricsAccumulator,
    SCALAR_KEYS,
    load_gradient_flow,
    routing_metrics,
    squash_slope,
    squash_slope_at_length,
)
from capsnet_ext.losses import margin_loss
from capsnet_ext.nn import DeepCapsNet


def one_hot(parents, J, dtype=torch.float64):
    return torch.nn.functional.one_hot(parents, J).to(dtype)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# -- known answers -------------------------------------------------------------------------
def test_one_hot_random_parent_has_dynamics_one_and_bonding_one():
    N, I, J = 6000, 16, 8
    C = one_hot(torch.randint(0, J, (N, I), generator=gen(0)), J)
    m = routing_metrics(C)
    assert m["inactive_rate"] == 0.0 and m["rate_active"] == 1.0
    assert m["bonding"] == pytest.approx(1.0, abs=1e-12)
    # Finite-sample parent frequencies deviate from 1/J by ~sqrt(J/N): well within 0.02.
    assert m["dynamics"] == pytest.approx(1.0, abs=0.02)
    assert m["t_score"] == pytest.approx(1.0, abs=1e-12)


def test_same_one_hot_for_every_input_has_dynamics_zero_and_bonding_one():
    N, I, J = 500, 16, 8
    parents = torch.randint(0, J, (I,), generator=gen(1))
    C = one_hot(parents, J).expand(N, I, J)
    m = routing_metrics(C)
    assert m["dynamics"] == pytest.approx(0.0, abs=1e-9)
    assert m["bonding"] == pytest.approx(1.0, abs=1e-12)
    assert m["inactive_rate"] == 0.0


def test_uniform_couplings_make_every_capsule_inactive():
    N, I, J = 64, 12, 10
    m = routing_metrics(torch.full((N, I, J), 1.0 / J), lower_lengths=torch.rand(N, I, generator=gen(2)))
    assert m["inactive_rate"] == 1.0 and m["rate_active"] == 0.0 and m["rate_active_alive"] == 0.0
    assert math.isnan(m["bonding"]) and math.isnan(m["dynamics"])  # no active capsule: undefined
    assert np.isnan(m["per_capsule"]["bonding"]).all()
    assert m["t_score"] == pytest.approx(0.0, abs=1e-9)


def test_known_dead_fraction_and_vibrance():
    N, I, J = 1000, 10, 5
    g = gen(3)
    lengths = 0.2 + 0.6 * torch.rand(N, I, generator=g, dtype=torch.float64)
    lengths[:, :3] = 0.001                          # dead: mean and std below 0.01
    lengths[:, 3] = 0.0                             # mean 0.005 < 0.01 but std ~0.05: alive
    lengths[::100, 3] = 0.5
    lengths[:, 4] = 0.02                            # constant but mean above 0.01: alive
    C = one_hot(torch.randint(0, J, (N, I), generator=g), J)
    C[:, :3] = 1.0 / J                              # the dead capsules route uniformly: inactive
    upper = torch.rand(N, J, generator=g, dtype=torch.float64)
    upper[:, 0] = 0.0                               # one dead upper capsule
    m = routing_metrics(C, lower_lengths=lengths, upper_lengths=upper)
    assert m["dead_rate"] == pytest.approx(0.3)
    assert m["rate_alive"] == pytest.approx(0.7)
    assert m["upper_dead_rate"] == pytest.approx(0.2)
    assert m["rate_active"] == pytest.approx(0.7)
    assert m["rate_active_alive"] == pytest.approx(1.0)
    np.testing.assert_array_equal(m["per_capsule"]["lower_dead"], [True] * 3 + [False] * 7)


def test_leaky_couplings_summing_below_one_are_scored_like_their_normalised_pattern():
    N, I, J = 6000, 8, 4
    C = 0.6 * one_hot(torch.randint(0, J, (N, I), generator=gen(4)), J)  # tau = 0.375 < 0.6
    m = routing_metrics(C)
    assert m["bonding"] == pytest.approx(0.6)
    assert m["dynamics"] == pytest.approx(1.0, abs=0.02)  # relative to the largest coupling
    assert m["t_score"] == pytest.approx(1.0)
    # Real leaky couplings of the reference pass the input checks.
    logits = torch.randn(32, I, J, generator=gen(5), dtype=torch.float64) * 3
    leaky = reference.coupling(logits, leaky=True)
    assert float(leaky.sum(-1).max()) < 1
    assert 0 <= routing_metrics(leaky)["rate_active"] <= 1


def test_hand_computed_tiny_example():
    # N = 3 inputs, I = 2 lower capsules, J = 3 parents: tau = 1.5 / 3 = 0.5.
    C = torch.tensor([
        [[0.8, 0.1, 0.1], [0.6, 0.2, 0.2]],
        [[0.2, 0.7, 0.1], [0.6, 0.3, 0.1]],
        [[0.4, 0.3, 0.3], [0.1, 0.1, 0.8]],
    ], dtype=torch.float64)
    lower = torch.tensor([[0.9, 0.5], [0.7, 0.4], [0.2, 0.6]], dtype=torch.float64)
    upper = torch.tensor([[0.1, 0.5, 0.2], [0.3, 0.5, 0.2], [0.2, 0.5, 0.9]], dtype=torch.float64)
    m = routing_metrics(C, lower, upper)
    # Capsule 0: thresholded rows [.8,0,0], [0,.7,0], [0,0,0] -> inactive on input 2: pr0 = 1/3.
    # Capsule 1: [.6,0,0], [.6,0,0], [0,0,.8] -> always active: pr1 = 0.
    np.testing.assert_allclose(m["per_capsule"]["pr"], [1 / 3, 0.0])
    assert m["inactive_rate"] == pytest.approx(1 / 6)
    # Bonding: b0 = (0.8 + 0.7) / 2 = 0.75; b1 = (0.6 + 0.6 + 0.8) / 3 = 2/3;
    # weights (2/3, 1) / (5/3) = (0.4, 0.6): layer bonding 0.4 * 0.75 + 0.6 * 2/3 = 0.7.
    np.testing.assert_allclose(m["per_capsule"]["bonding"], [0.75, 2 / 3])
    assert m["bonding"] == pytest.approx(0.7)
    # Dynamics: capsule 0 over its 2 active inputs: sd per parent (0.4, 0.35, 0), mean 0.25,
    # over its largest coupling 0.8. Capsule 1 over 3 inputs: parent 0 values (.6,.6,0), mean
    # 0.4, var 0.08; parent 2 values (0,0,.8), var (0.8^2 / 3) (2/3); mean sd over 3 parents,
    # over 0.8. Layer: weighted by (0.4, 0.6), divided by sqrt((1/3)(2/3)).
    d0 = 0.25 / 0.8
    d1 = (math.sqrt(0.08) + 0.0 + math.sqrt(0.64 / 3 * 2 / 3)) / 3 / 0.8
    norm = math.sqrt((1 / 3) * (2 / 3))
    np.testing.assert_allclose(m["per_capsule"]["dynamics"], [d0 / norm, d1 / norm])
    assert m["dynamics"] == pytest.approx((0.4 * d0 + 0.6 * d1) / norm)
    # T-score: 1 - mean normalised entropy of the 6 coupling rows.
    rows = C.reshape(-1, 3).tolist()
    H = [-sum(p * math.log(p) for p in row) / math.log(3) for row in rows]
    assert m["t_score"] == pytest.approx(1 - sum(H) / 6)
    # Pearson r between each (input, capsule)'s largest coupling and its length: the paper's
    # uses the thresholded coupling (capsule 0 is inactive on input 2: 0 there, not 0.4).
    lens = [0.9, 0.5, 0.7, 0.4, 0.2, 0.6]
    assert m["act_coupling_corr"] == pytest.approx(np.corrcoef([0.8, 0.6, 0.7, 0.6, 0.0, 0.8], lens)[0, 1])
    assert m["act_coupling_corr_unthresholded"] == pytest.approx(
        np.corrcoef([0.8, 0.6, 0.7, 0.6, 0.4, 0.8], lens)[0, 1])
    # D-score: largest population std over inputs of an upper length (parent 2: 0.2, 0.2, 0.9).
    assert m["d_score"] == pytest.approx(np.std([0.2, 0.2, 0.9]))
    assert m["dead_rate"] == 0.0 and m["upper_dead_rate"] == 0.0


def _authors_activation_coupling_corr(C: np.ndarray, U_norm: np.ndarray) -> float:
    """The seed paper's definition as its code computes it (EfficientCN misc/metrics.py,
    activation_coupling_corr with normalize_couplings(eps_rate=0.5)), written out here: keep
    a coupling only where it exceeds 1/J + 0.5/J, take the largest per (input, capsule) and
    correlate it with the capsule's length."""
    J = C.shape[-1]
    threshold = 1 / J + 0.5 / J
    kept = np.maximum(C - threshold, 0)
    kept[kept > 0] += threshold
    return float(np.corrcoef(kept.max(axis=-1).ravel(), U_norm.ravel())[0, 1])


def test_activation_coupling_corr_is_the_papers_definition():
    # Couplings with many inactive (input, capsule) pairs, where the two definitions differ.
    N, I, J = 300, 40, 10
    g = gen(11)
    C = torch.softmax(torch.randn(N, I, J, generator=g, dtype=torch.float64)
                      * torch.linspace(0.2, 4, I, dtype=torch.float64)[None, :, None], dim=-1)
    lower = torch.rand(N, I, generator=g, dtype=torch.float64) * C.amax(-1) + 0.05 * torch.rand(N, I, generator=g, dtype=torch.float64)
    m = routing_metrics(C, lower, chunk_size=64)
    expected = _authors_activation_coupling_corr(C.numpy(), lower.numpy())
    assert m["act_coupling_corr"] == pytest.approx(expected, abs=1e-8)
    raw = float(np.corrcoef(C.amax(-1).numpy().ravel(), lower.numpy().ravel())[0, 1])
    assert m["act_coupling_corr_unthresholded"] == pytest.approx(raw, abs=1e-8)
    assert 0 < m["inactive_rate"] < 1
    assert abs(m["act_coupling_corr"] - raw) > 1e-3  # the two really are different numbers


def test_chunked_and_streamed_results_match_unchunked():
    N, I, J = 203, 37, 11
    g = gen(6)
    C = torch.softmax(3 * torch.randn(N, I, J, generator=g, dtype=torch.float64), dim=-1)
    lower = torch.rand(N, I, generator=g, dtype=torch.float64)
    lower[:, :5] *= 1e-3
    upper = torch.rand(N, J, generator=g, dtype=torch.float64)
    full = routing_metrics(C, lower, upper, chunk_size=N)
    chunked = routing_metrics(C, lower, upper, chunk_size=7)
    streamed = routing_metrics((C[i:i + 50], lower[i:i + 50], upper[i:i + 50]) for i in range(0, N, 50))
    as_dicts = routing_metrics([dict(couplings=C[i:i + 64].float(), lower_lengths=lower[i:i + 64].float(),
                                     upper_lengths=upper[i:i + 64].float()) for i in range(0, N, 64)])
    assert full["dead_rate"] == pytest.approx(5 / I)
    for other, tol in ((chunked, 1e-12), (streamed, 1e-12), (as_dicts, 1e-6)):
        for key in SCALAR_KEYS:
            assert other[key] == pytest.approx(full[key], abs=tol, nan_ok=True), key
        for key, value in full["per_capsule"].items():
            np.testing.assert_allclose(other["per_capsule"][key], value, atol=tol, err_msg=key)


def test_squash_slope_matches_autograd():
    g = gen(7)
    directions = torch.nn.functional.normalize(torch.randn(97, 16, generator=g, dtype=torch.float64), dim=-1)
    norms = torch.cat([torch.tensor([1e-3, 1 / math.sqrt(3), 1.0, 5.0], dtype=torch.float64),
                       torch.rand(93, generator=g, dtype=torch.float64) * 4]).requires_grad_(True)
    v_norm = reference.squash(norms[:, None] * directions).norm(dim=-1)
    (grad,) = torch.autograd.grad(v_norm.sum(), norms)
    torch.testing.assert_close(squash_slope(norms.detach()), grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(squash_slope_at_length(v_norm.detach()), grad, rtol=1e-6, atol=1e-9)
    assert float(squash_slope(torch.tensor(1 / math.sqrt(3)))) == pytest.approx(3 * math.sqrt(3) / 8)


# -- errors ------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, kwargs, error, words", [
    (torch.rand(4, 5), {}, ValueError, ["couplings", "[N, I, J]", "(4, 5)"]),
    (torch.rand(0, 5, 3), {}, ValueError, ["empty"]),
    (torch.ones(4, 5, 1), {}, ValueError, ["J >= 2"]),
    (torch.randn(4, 5, 3), {}, ValueError, ["logits"]),
    (torch.full((4, 5, 3), 1 / 3), dict(lower_lengths=torch.rand(4, 6)), ValueError, ["lower_lengths", "(4, 5)"]),
    (torch.full((4, 5, 3), 1 / 3), dict(upper_lengths=torch.rand(3, 3)), ValueError, ["upper_lengths"]),
    (torch.full((4, 5, 3), 1 / 3), dict(chunk_size=0), ValueError, ["chunk_size"]),
    (torch.full((4, 5, 3), float("nan")), {}, ValueError, ["NaN"]),
    (torch.ones(4, 5, 3, dtype=torch.int64), {}, TypeError, ["floating point"]),
    ([], {}, ValueError, ["empty"]),
    (42, {}, TypeError, ["iterable"]),
    ([torch.full((2, 5, 3), 1 / 3), torch.full((2, 4, 3), 1 / 3)], {}, ValueError, ["earlier chunks"]),
    ([(torch.full((2, 5, 3), 1 / 3), torch.rand(2, 5)), torch.full((2, 5, 3), 1 / 3)], {}, ValueError,
     ["every chunk"]),
])
def test_bad_inputs_give_clear_errors(bad, kwargs, error, words):
    with pytest.raises(error) as info:
        routing_metrics(bad, **kwargs)
    for word in words:
        assert word in str(info.value)


def test_accumulator_without_inputs_refuses_to_compute():
    with pytest.raises(ValueError, match="no inputs"):
        RoutingMetricsAccumulator().compute()


# -- gradient flow -----------------------------------------------------------------------
def tiny_deep(**overrides):
    config = dict(input_size=20, conv_channels=8, primary_channels=4, caps=[6, 5, 4], dims=[4, 4, 6],
                  num_classes=4, decoder_hidden=[16], iterations=2)
    config.update(overrides)
    return DeepCapsNet(**config)


def test_gradient_flow_recorder_records_norms_lengths_and_saves(tmp_path):
    torch.manual_seed(0)
    model = tiny_deep()
    recorder = GradientFlowRecorder(every=2)
    images, labels = torch.rand(6, 1, 20, 20), torch.tensor([0, 1, 2, 3, 0, 1])
    for step in range(5):
        model.zero_grad()
        out = model(images, targets=labels)
        margin_loss(out.lengths, labels).backward()
        recorder.on_after_backward(step, model)
    assert recorder.steps == [0, 2, 4]
    arrays = recorder.arrays()
    assert arrays["layer1_lower_grad_norm"].shape == (3, model.num_primary)
    assert arrays["layer2_upper_grad_norm"].shape == (3, 5)
    assert arrays["mean_length"].shape == (3, 4)
    # Norms of the W slices of the last step, computed directly.
    for k, layer in enumerate(model.routing, 1):
        g = layer.weight.grad.double()
        np.testing.assert_allclose(arrays[f"layer{k}_lower_grad_norm"][-1], g.flatten(1).norm(dim=1), rtol=1e-5)
        np.testing.assert_allclose(arrays[f"layer{k}_upper_grad_norm"][-1],
                                   g.transpose(0, 1).flatten(1).norm(dim=1), rtol=1e-5)
        assert (arrays[f"layer{k}_lower_grad_norm"][-1] > 0).all()
    # Hooks are installed on the first call, so step 0 has no lengths; later steps do.
    assert np.isnan(arrays["mean_length"][0]).all()
    with torch.no_grad():
        trace = model.routing_trace(images)
    expected = [float(c.norm(dim=-1).mean()) for c in trace.capsules]
    np.testing.assert_allclose(arrays["mean_length"][-1], expected, rtol=1e-5)
    slopes = [float(squash_slope_at_length(c.norm(dim=-1)).mean()) for c in trace.capsules]
    np.testing.assert_allclose(arrays["squash_slope"][-1], slopes, rtol=1e-4)

    recorder.on_train_end(tmp_path)
    loaded = load_gradient_flow(tmp_path)
    assert set(loaded) == set(arrays)
    np.testing.assert_array_equal(loaded["layer3_lower_grad_norm"], arrays["layer3_lower_grad_norm"])
    summary = json.loads((tmp_path / "gradient_flow.json").read_text())
    assert summary["steps"] == [0, 2, 4] and summary["num_routing_layers"] == 3
    assert sorted(os.listdir(tmp_path)) == ["gradient_flow.json", "gradient_flow.npz"]  # no temp files left


def test_gradient_flow_recorder_errors():
    with pytest.raises(ValueError, match="every"):
        GradientFlowRecorder(every=0)
    with pytest.raises(ValueError, match="no RoutingCapsules"):
        GradientFlowRecorder().on_after_backward(0, torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="nothing recorded"):
        GradientFlowRecorder().arrays()


# -- analyze end to end ----------------------------------------------------------------------
def synthetic_bundle(n_train=48, n_test=40, num_classes=4, size=20, seed=0):
    """Images whose label decides which quadrant is bright: learnable in a few steps."""
    from capsnet_ext.data import DatasetBundle, ImageDataset

    g = gen(seed)

    def make(n):
        labels = torch.arange(n) % num_classes
        images = 0.1 * torch.rand(n, 1, size, size, generator=g)
        half = size // 2
        for q in range(num_classes):
            r, c = divmod(q, 2)
            images[labels == q, :, r * half:(r + 1) * half, c * half:(c + 1) * half] += 0.8
        return ImageDataset(images, labels, name="quadrants")

    return DatasetBundle(train=make(n_train), test=make(n_test), in_channels=1, input_size=size,
                         num_classes=num_classes, multi_label=False, name="quadrants")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny 3-layer DeepCapsNet trained for 6 steps by the package's trainer."""
    from capsnet_ext.training import load_config, train

    out = tmp_path_factory.mktemp("deep-run")
    model = dict(arch="deep-capsnet", input_size=20, num_classes=4, conv_channels=8, primary_channels=4,
                 caps=[6, 5, 4], dims=[4, 4, 6], decoder_hidden=[16])
    cfg = load_config(model=model, epochs=1, max_steps=6, batch_size=8, out=str(out), grad_flow_every=2,
                      log_every=3, tensorboard=False, progress=False, device="cpu", iterations=2, max_shift=0)
    recorder = GradientFlowRecorder(every=2)
    result = train(cfg, callbacks=[recorder], datasets=synthetic_bundle())
    return out, result, recorder


def test_analyze_end_to_end_on_a_trained_deep_model(trained_run, tmp_path):
    from capsnet_ext.analysis.cli import analyze_checkpoint

    out, result, recorder = trained_run
    assert recorder.steps == [0, 2, 4]
    assert (out / "gradient_flow.npz").is_file()
    done = analyze_checkpoint(result["last_checkpoint"], out=tmp_path / "report", device="cpu",
                              batch_size=16, limit=30, dataset=synthetic_bundle())
    res = done["result"]
    assert res["num_inputs"] == 30 and 0.0 <= res["accuracy"] <= 1.0
    assert len(res["layers"]) == 3
    assert [(m["lower_capsules"], m["upper_capsules"]) for m in res["layers"]] == [(16, 6), (6, 5), (5, 4)]
    for m in res["layers"]:
        assert 0 <= m["dead_rate"] <= 1 and 0 <= m["inactive_rate"] <= 1 and 0 <= m["t_score"] <= 1
    # The report and plots exist, are complete PNGs, and the gradient record beside the run was found.
    report = (tmp_path / "report" / "report.md").read_text()
    for k in (1, 2, 3):
        assert f"## Routing layer {k}" in report
    assert "gradient_flow.npz" in report and "grad_norm_heatmap.png" in report
    for name in ("dead_fraction.png", "bonding_dynamics.png", "mean_length.png", "grad_norm_heatmap.png"):
        data = (tmp_path / "report" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[-8:-4] == b"IEND"
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["num_inputs"] == 30 and len(metrics["layers"]) == 3
    assert metrics["layers"][1]["dynamics"] == pytest.approx(res["layers"][1]["dynamics"], nan_ok=True)


SHARED = os.environ.get("CAPSNET_DATA")
needs_mnist = pytest.mark.skipif(
    not SHARED or not (pathlib.Path(SHARED) / "mnist" / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="real MNIST files not found: set $CAPSNET_DATA to a folder holding mnist/")


@needs_mnist
def test_analyze_command_line_on_mnist(tmp_path, capsys):
    """``capsnet-ext analyze`` through the top-level command line, on a model trained for
    2 steps on MNIST (the data set named in the checkpoint is loaded again)."""
    from capsnet_ext.cli import main
    from capsnet_ext.training import load_config, train

    model = dict(arch="deep-capsnet", conv_channels=8, primary_channels=4, caps=[6, 10], dims=[4, 6],
                 decoder_hidden=[16])
    cfg = load_config(preset="mnist", model=model, epochs=1, max_steps=2, batch_size=8, out=str(tmp_path / "run"),
                      dataset_options=dict(train_limit=32, test_limit=32), tensorboard=False, progress=False,
                      device="cpu", iterations=1)
    train(cfg)
    capsys.readouterr()
    assert main(["analyze", str(tmp_path / "run"), "--limit", "20", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "analysed 20 test images" in printed
    report = (tmp_path / "run" / "analysis" / "report.md").read_text()
    assert "No gradient-flow record" in report and "## Routing layer 2" in report
    # The terminal gets a short summary, one line per routing layer; the table is in report.md.
    assert "|---" not in printed and "|---" in report
    assert "routing layer 1 (" in printed and "routing layer 2 (6 -> 10 capsules)" in printed
    assert f"full table and definitions: {tmp_path / 'run' / 'analysis' / 'report.md'}" in printed
    assert len(printed.splitlines()) <= 5


def test_analyze_command_line_reports_a_missing_checkpoint(tmp_path, capsys):
    from capsnet_ext.analysis.cli import main

    assert main([str(tmp_path / "nope.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_depth_study_writes_table_and_figure_and_resumes(tmp_path, monkeypatch):
    from capsnet_ext.analysis import depth_study

    kwargs = dict(depths=[1, 2], iterations=[1], preset=None, grad_flow_every=1, device="cpu",
                  train_overrides=dict(epochs=1, max_steps=2, batch_size=8, max_shift=0, tensorboard=False,
                                       progress=False),
                  model_kwargs=dict(width=5, dim=4, num_classes=4, input_size=20, conv_channels=8,
                                    primary_channels=4, decoder_hidden=[16]),
                  analysis_limit=16, datasets=synthetic_bundle(), command="test")
    done = depth_study.run_depth_study(tmp_path, **kwargs)
    rows = done["rows"]
    assert [(r["depth"], r["iterations"]) for r in rows] == [(1, 1), (2, 1)]
    for r in rows:
        assert r["steps"] == 2 and 0 <= r["test_accuracy"] <= 1
        assert len(r["dead_fraction"]) == r["depth"] + 1 and len(r["dynamics"]) == r["depth"]
        assert len(r["grad_norm_lower"]) == r["depth"] and all(g > 0 for g in r["grad_norm_lower"])
    table = (tmp_path / "depth_study.md").read_text()
    assert table.count("\n| 1 | 1 |") + table.count("\n| 2 | 1 |") == 2
    assert (tmp_path / "depth_study.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "depth2-r1" / "analysis" / "report.md").is_file()
    # A second start reuses the finished runs instead of training again.
    monkeypatch.setattr(depth_study, "run_one", lambda *a, **k: pytest.fail("finished run retrained"))
    again = depth_study.run_depth_study(tmp_path, **kwargs)
    assert [r["test_accuracy"] for r in again["rows"]] == pytest.approx([r["test_accuracy"] for r in rows])


def test_depth_model_layers():
    from capsnet_ext.analysis.depth_study import depth_model

    assert depth_model(1)["caps"] == [10] and depth_model(1)["dims"] == [16]
    cfg = depth_model(4, width=24, dim=6, num_classes=5)
    assert cfg["caps"] == [24, 24, 24, 5] and cfg["dims"] == [6, 6, 6, 16]
    with pytest.raises(ValueError, match="depth"):
        depth_model(0)


def test_analyze_model_handles_the_single_layer_capsnet_and_rejects_other_models():
    from capsnet_ext.analysis.collect import analyze_model
    from capsnet_ext.nn import BaselineCNN, CapsNet

    torch.manual_seed(8)
    bundle = synthetic_bundle(n_test=24)
    model = CapsNet(input_size=20, num_classes=4, conv_channels=8, primary_channels=4, digit_dim=6, decoder=False)
    res = analyze_model(model, bundle.test, batch_size=10)
    assert res["num_inputs"] == 24 and len(res["layers"]) == 1
    assert res["capsule_layers"] == [dict(capsules=16, dim=8), dict(capsules=4, dim=6)]
    # Same numbers as the metrics of the couplings computed directly on the whole set.
    with torch.no_grad():
        images = bundle.test.batch(torch.arange(24))["image"]
        u = model.primary_capsules(images)
        v, c = model.digits(u, return_coupling=True)
    direct = routing_metrics(c, u.norm(dim=-1), v.norm(dim=-1))
    for key in SCALAR_KEYS:
        assert res["layers"][0][key] == pytest.approx(direct[key], abs=1e-6, nan_ok=True), key
    with pytest.raises(TypeError, match="not a capsule model"):
        analyze_model(BaselineCNN(input_size=20, num_classes=4), bundle.test)
    with pytest.raises(ValueError, match="limit"):
        analyze_model(model, bundle.test, limit=0)
