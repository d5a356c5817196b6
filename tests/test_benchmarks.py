"""The benchmark suite: a ``--quick`` run at a tiny size on the CPU, its JSON, the correctness
gate (wrong contenders are flagged and not timed, out-of-memory is recorded and the run goes
on), the floor arithmetic for hand-computed shapes and the README generator. No test asserts
a timing."""
import io
import json
import math
import os

import pytest
import torch

import capsnet_ext
from capsnet_ext import reference

from benchmarks import cli, correctness, make_readme
from benchmarks.contenders import Contender, discover
from benchmarks.floors import Ceilings, Shape, floor_time, op_work
from benchmarks.suite import build_cases

TINY_SHAPES = ["2,12,3,4,5,2", "2,24,3,4,5,2"]


def _wrong_capsule_routing(u, W, iterations, **kwargs):
    # Off by 5 %: the forward gate must catch it.
    return 1.05 * reference.capsule_routing(u, W, iterations, **kwargs)


def _wrong_gradient_routing(u_hat, iterations, **kwargs):
    # The right value with twice the gradient: only the gradient gate can catch it.
    v = reference.dynamic_routing(u_hat, iterations, **kwargs)
    return v + (v - v.detach())


def _oom_capsule_routing(u, W, iterations, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 TiB (simulated)")


def _unsupported_routing(u_hat, iterations, **kwargs):
    raise NotImplementedError("this contender has no dynamic_routing kernel")


EXTRA = [
    Contender("deliberately-wrong", "custom", {"capsule_routing": _wrong_capsule_routing,
                                                "dynamic_routing": _wrong_gradient_routing}),
    Contender("always-oom", "custom", {"capsule_routing": _oom_capsule_routing,
                                       "dynamic_routing": _unsupported_routing}),
]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench")
    argv = ["--quick", "--device", "cpu", "--contenders", "reference", "--threads", "1",
            "--out-dir", str(out_dir), "--e2e-batch", "2", "--e2e-steps", "1"]
    for s in TINY_SHAPES:
        argv += ["--shape", s]
    threads = torch.get_num_threads()
    log = io.StringIO()
    try:
        payload = cli.run(argv, extra_contenders=EXTRA, stdout=log)
    finally:
        torch.set_num_threads(threads)
    with open(payload["json_path"]) as f:
        # Strict JSON: no NaN or Infinity literals.
        on_disk = json.load(f, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    return payload, on_disk, log.getvalue(), out_dir


def _find(records, **match):
    found = [r for r in records if all((r["shape"]["I"] if k == "I" else r[k]) == v for k, v in match.items())]
    assert found, f"no record matches {match}"
    return found


def test_json_has_run_metadata(quick_run):
    _, data, _, out_dir = quick_run
    meta = data["meta"]
    assert meta["device"]["type"] == "cpu" and meta["device"]["name"]
    assert meta["torch"] == torch.__version__
    for key in ("triton", "cuda", "date", "git_commit", "command", "machine", "python"):
        assert key in meta, key
    assert meta["command"].startswith("capsnet-ext bench --quick --device cpu")
    assert meta["quick"] is True
    assert set(data["backend_status"]) == set(capsnet_ext.BACKENDS)
    assert data["ceilings"]["copy_bytes_per_s"] > 0
    assert data["ceilings"]["matmul_flops_per_s"]["float32"] > 0
    assert os.path.dirname(quick_run[0]["json_path"]) == str(out_dir)


def test_every_case_is_recorded(quick_run):
    _, data, log, _ = quick_run
    results = data["results"]
    # 3 ops x 2 shapes x 2 modes for the reference, plus the two injected contenders.
    ref = [r for r in results if r["contender"] == "reference"]
    assert len(ref) == 3 * 2 * 2
    for r in ref:
        assert r["status"] == "ok", r
        for key in ("median", "p20", "p80", "min", "mean", "reps"):
            assert key in r["time_s"]
        assert r["time_s"]["reps"] >= 3
        assert r["floor"]["flops"] > 0 and r["floor"]["bytes"] > 0 and r["floor"]["bound"] in ("compute", "memory")
        assert r["fraction_of_floor"] is not None and r["fraction_of_floor"] > 0
        assert r["peak_bytes"] is None  # not tracked on the CPU
        assert r["correctness"]["errors"]["out"] <= r["correctness"]["limits"]["out"]
        assert set(r["sweeps"]) == {"I"}  # shapes differing only in I form an I sweep
    # predict saves only its inputs; the reference routing keeps u_hat-sized tensors.
    for r in _find(ref, op="predict"):
        assert r["saved_bytes_beyond_inputs"] == 0
    for r in _find(ref, op="capsule_routing", I=24):
        uhat_bytes = 2 * 24 * 3 * 5 * 4
        assert r["saved_bytes_beyond_inputs"] >= uhat_bytes
    assert "reference" in log and "wrote" in log


def test_wrong_forward_is_flagged_and_not_timed(quick_run):
    _, data, _, _ = quick_run
    for r in _find(data["results"], contender="deliberately-wrong", op="capsule_routing"):
        assert r["status"] == "wrong"
        assert r["time_s"] is None and r["fraction_of_floor"] is None
        assert "out: relative error" in r["reason"]
        assert r["correctness"]["errors"]["out"] == pytest.approx(0.05, rel=1e-3)


def test_wrong_gradient_is_flagged_only_in_backward(quick_run):
    _, data, _, _ = quick_run
    records = _find(data["results"], contender="deliberately-wrong", op="dynamic_routing")
    by_mode = {}
    for r in records:
        by_mode.setdefault(r["mode"], []).append(r)
    assert all(r["status"] == "ok" and r["time_s"] is not None for r in by_mode["forward"])
    for r in by_mode["forward_backward"]:
        assert r["status"] == "wrong" and r["time_s"] is None
        assert "grad_u_hat" in r["reason"] and "grad_bias" in r["reason"]


def test_unsupported_and_oom_are_recorded_and_the_run_goes_on(quick_run):
    _, data, _, _ = quick_run
    for r in _find(data["results"], contender="deliberately-wrong", op="predict"):
        assert r["status"] == "unsupported"
    oom = _find(data["results"], contender="always-oom", op="capsule_routing")
    assert oom and all(r["status"] == "oom" and "out of memory" in r["reason"] for r in oom)
    raised = _find(data["results"], contender="always-oom", op="dynamic_routing")
    assert all(r["status"] == "unsupported" and "no dynamic_routing kernel" in r["reason"] for r in raised)
    # The reference after the failing contender's cases still ran (the sweep went on).
    assert all(r["status"] == "ok" for r in _find(data["results"], contender="reference", op="capsule_routing"))


def test_end_to_end_record(quick_run):
    _, data, _, _ = quick_run
    (rec,) = data["end_to_end"]
    assert rec["backend"] == "reference" and rec["compiled"] is False and rec["precision"] == "float32"
    assert rec["status"] == "ok", rec
    assert rec["batch"] == 2 and rec["steps"] == 1
    assert rec["images_per_s"] == pytest.approx(rec["steps_per_s"] * 2)
    assert math.isfinite(rec["mean_loss"]) and rec["mean_loss"] > 0


def test_plots_are_png(quick_run):
    payload, _, _, _ = quick_run
    # One figure per (op, mode) of the I sweep.
    assert len(payload["plot_paths"]) == 3 * 2
    for path in payload["plot_paths"]:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_readme_is_generated_from_the_json(quick_run, tmp_path):
    _, _, _, out_dir = quick_run
    readme = tmp_path / "README.md"
    assert make_readme.main(["--results-dir", str(out_dir), "--output", str(readme)]) == 0
    text = readme.read_text()
    assert "GPU results: **not yet measured**" in text
    assert "## Latest CPU results" in text and "deliberately-wrong" in text
    assert "| capsule_routing |" in text
    assert make_readme.main(["--results-dir", str(out_dir), "--output", str(readme), "--check"]) == 0
    readme.write_text(text + "typed by hand\n")
    assert make_readme.main(["--results-dir", str(out_dir), "--output", str(readme), "--check"]) == 1


def _fake_gpu_run(date, command, I, median, commit="abc123"):
    shape = dict(B=128, I=I, J=10, Din=8, Dout=16, iterations=3)
    rec = dict(op="capsule_routing", contender="reference", contender_kind="eager", mode="forward",
               dtype="float32", shape=shape, sweeps=["I"], options={}, status="ok", reason=None,
               time_s=dict(median=median, p20=median, p80=median, min=median, mean=median, reps=10),
               peak_bytes=1 << 20, saved_bytes=0, saved_bytes_beyond_inputs=0,
               floor=dict(flops=1.0, bytes=1.0, time_s=median / 2), fraction_of_floor=0.5)
    meta = dict(date=date, command=command, git_commit=commit, git_dirty=False, quick=False,
                device=dict(type="cuda", name="Fake GPU", capability="9.0"), machine="m",
                torch="2", triton="3", cuda="12", python="3.11")
    return dict(meta=meta, results=[rec], end_to_end=[], left_out={},
                ceilings=dict(copy_bytes_per_s=1e12, matmul_flops_per_s={"float32": 1e13}, details={}))


def test_readme_merges_the_parts_of_a_split_gpu_run(tmp_path):
    runs = [_fake_gpu_run("2026-01-01T00:00:00+00:00", "capsnet-ext bench --sweeps I-part-1", 1152, 0.001),
            _fake_gpu_run("2026-01-01T01:00:00+00:00", "capsnet-ext bench --sweeps I-part-2", 2304, 0.002),
            _fake_gpu_run("2025-01-01T00:00:00+00:00", "capsnet-ext bench --old", 4608, 0.004, commit="old")]
    for k, run in enumerate(runs):
        (tmp_path / f"run{k}.json").write_text(json.dumps(run))
    text = make_readme.render(make_readme.load_results(str(tmp_path)))
    assert "not yet measured" not in text and "### Fake GPU" in text
    assert "I-part-1" in text and "I-part-2" in text and "--old" not in text
    assert "| capsule_routing | forward | float32 | 1152 | 1.000 ms (50.0%) |" in text
    assert "| capsule_routing | forward | float32 | 2304 | 2.000 ms (50.0%) |" in text
    assert "4608" not in text


# --------------------------------------------------------------------------- floors

HAND = Shape(B=2, I=3, J=4, Din=5, Dout=6, iterations=3)
# P = 2*I*J*Dout*Din = 720 per sample, K = I*J*Dout = 72; float32: 4 bytes.
HAND_EXPECTED = {
    # op: (forward flops, forward bytes, backward flops, backward bytes)
    # predict: fwd B*P; bytes 4*(u 30 + W 360 + u_hat 144); bwd 2*B*P; 4*(g 144 + 2*30 + 2*360)
    "predict": (1440, 2136, 2880, 3696),
    # routing: fwd B*2K*(2R-1) = 2*144*5; bytes 4*(u_hat 144 + v 48 + bias 24)
    #          bwd B*(2K + 14K(R-1)) = 2*(144 + 2016); bytes 4*(2*144 + 48 + 2*24)
    "dynamic_routing": (1440, 864, 4320, 1536),
    # fused: fwd B*(R*P + 2K*(2R-1)) = 2*(2160 + 720); bytes 4*(30 + 360 + 48 + 24)
    #        bwd B*(R*P + 2P) + routing bwd = 2*3600 + 4320; bytes 4*(60 + 720 + 48 + 48)
    "capsule_routing": (5760, 1848, 11520, 3504),
}


@pytest.mark.parametrize("op", sorted(HAND_EXPECTED))
def test_floor_arithmetic_hand_computed(op):
    f_flops, f_bytes, b_flops, b_bytes = HAND_EXPECTED[op]
    shape = HAND if op != "predict" else Shape(2, 3, 4, 5, 6, 1)
    fwd = op_work(op, shape, torch.float32, "forward")
    both = op_work(op, shape, torch.float32, "forward_backward")
    assert (fwd.flops, fwd.bytes) == (f_flops, f_bytes)
    assert (both.flops, both.bytes) == (f_flops + b_flops, f_bytes + b_bytes)
    half = op_work(op, shape, torch.bfloat16, "forward_backward")
    assert (half.flops, half.bytes) == (both.flops, both.bytes / 2)


def test_floor_options_and_mnist_shape():
    # detach_inner: the backward is the final sweep's last iteration only.
    assert op_work("dynamic_routing", HAND, torch.float32, "forward_backward", detach_inner=True).flops == 1440 + 2 * (144 + 144)
    assert op_work("capsule_routing", HAND, torch.float32, "forward_backward", detach_inner=True).flops == 5760 + 2 * 2160 + 576
    # Without the bias: 24 floats fewer read forward, 48 fewer moved backward.
    assert op_work("capsule_routing", HAND, torch.float32, "forward_backward", bias=False).bytes == 1848 + 3504 - 4 * (24 + 48)
    # The MNIST layer: about 1.4 GFLOP forward, as in the fused-routing design note.
    mnist = Shape(128, 1152, 10, 8, 16, 3)
    assert op_work("capsule_routing", mnist, torch.float32, "forward").flops == 128 * (3 * 2949120 + 2 * 184320 * 5)


def test_floor_time_takes_the_binding_ceiling():
    ceilings = Ceilings(copy_bytes_per_s=1000.0, matmul_flops_per_s={"float32": 100.0}, details={})
    work = op_work("predict", Shape(2, 3, 4, 5, 6, 1), torch.float32, "forward")  # 1440 FLOP, 2136 B
    floor = floor_time(work, torch.float32, ceilings)
    assert floor["compute_s"] == pytest.approx(14.4) and floor["memory_s"] == pytest.approx(2.136)
    assert floor["time_s"] == pytest.approx(14.4) and floor["bound"] == "compute"
    memory_bound = floor_time(work, torch.float32, Ceilings(10.0, {"float32": 1e6}, {}))
    assert memory_bound["bound"] == "memory" and memory_bound["time_s"] == pytest.approx(213.6)


# --------------------------------------------------------------------------- small pieces

def test_relative_error_flags_nan_and_shape():
    ref = torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64)
    assert correctness.relative_error(ref.float(), ref) == 0.0
    assert correctness.relative_error(torch.tensor([1.0, -2.0, 4.2]), ref) == pytest.approx(0.05)
    assert correctness.relative_error(torch.tensor([1.0, float("nan"), 4.0]), ref) == float("inf")
    assert correctness.relative_error(ref[:2], ref) == float("inf")
    gate = correctness.check({"out": torch.tensor([1.0, -2.0, 4.2])}, {"out": ref}, {"out": 0.01}, torch.float32)
    assert not gate.passed and "out" in gate.describe()


def test_build_cases_deduplicates_and_tags_sweeps():
    base = Shape(4, 8, 3, 2, 2, 3)
    sweeps = {"mnist": [base], "I": [base, Shape(4, 16, 3, 2, 2, 3)], "iterations": [Shape(4, 8, 3, 2, 2, 1), base]}
    cases = build_cases(["predict", "capsule_routing"], sweeps, [torch.float32])
    routing = [c for c in cases if c.op == "capsule_routing"]
    assert len(routing) == 3
    assert next(c for c in routing if c.shape == base).sweeps == ["mnist", "I", "iterations"]
    predict = [c for c in cases if c.op == "predict"]
    assert len(predict) == 2 and all(c.shape.iterations == 1 and "iterations" not in c.sweeps for c in predict)


def test_triton_interpreter_is_not_benched_by_default():
    cpu = torch.device("cpu")
    contenders, left_out = discover(cpu, None)
    names = [c.name for c in contenders]
    assert names[:2] == ["reference", "reference-compiled"]
    assert "triton" not in names and "cuda" not in names
    assert "triton" in left_out and "cuda" in left_out
    if capsnet_ext.unavailable_reason("triton", cpu) is None:
        assert "interpreter" in left_out["triton"]
        with_interp, _ = discover(cpu, ["triton"], include_interpreter=True)
        assert [c.name for c in with_interp] == ["triton"]


def test_cuda_two_lane_contender(monkeypatch):
    """``cuda-lanes2``: left out with the CUDA backend's reason where that is unavailable; its
    ops are the CUDA backend's public ops run under ``cuda_ops.tuning.forced(2)``."""
    from benchmarks import contenders as contenders_mod
    from capsnet_ext.cuda_ops import tuning

    cpu = torch.device("cpu")
    chosen, left_out = discover(cpu, ["cuda-lanes2"])
    assert chosen == [] and left_out["cuda-lanes2"].startswith("unavailable: ")
    seen = []
    monkeypatch.setattr(contenders_mod, "_public_op",
                        lambda op, backend: lambda *a, **k: seen.append((op, backend, tuning.forced_lane_samples())))
    contender = contenders_mod.cuda_lanes2()
    assert contender.name == "cuda-lanes2" and set(contender.ops) == set(contenders_mod.OPS) - {"predict"}
    contender.ops["capsule_routing"](None, None, 3)
    assert seen == [("capsule_routing", "cuda", 2)] and tuning.forced_lane_samples() is None


def test_bad_arguments_are_rejected():
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--shape", "1,2,3"])
    with pytest.raises(SystemExit, match="unknown op"):
        cli.run(["--ops", "convolution", "--device", "cpu", "--skip-e2e"], stdout=io.StringIO())
    with pytest.raises(ValueError, match="unknown contender"):
        discover(torch.device("cpu"), ["no-such-backend"])
