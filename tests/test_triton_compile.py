"""Every Triton launch of the package compiles for sm_90 with the Triton the GPU machines run.

The interpreter that runs the other Triton tests here checks no compile rule: on 2026-12-04
Triton 3.6.0 refused the float32 ``capsule_routing`` sweeps on an H200 (``tl.dot`` with
K = 8 < 16) while every CPU test passed. This test runs
``python -m benchmarks.kernel_report.compile_check`` (launches recorded through the public API
for every op, dtype, option and the tests' odd shapes, each distinct kernel variant compiled
with Triton's own compiler for sm_90) and fails on a compile error, a register spill (outside float64 and the larger-tile shape), a
dot smaller than the tensor cores' shapes, or a 16-bit or TF32 dot without tensor-core
instructions. It runs in a subprocess because this process runs Triton in its interpreter.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from benchmarks.kernel_report import compile_check  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_installed_triton_is_the_pinned_one():
    """The compile rules differ between releases (3.6.0 refuses what 3.9 accepts): the project's
    environment installs the release the GPU machines and torch 2.11 use."""
    assert triton.__version__ == compile_check.PINNED_TRITON, (
        f"Triton {triton.__version__} is installed; the tests compile with "
        f"{compile_check.PINNED_TRITON} (make venv installs it)")


def test_option_sets_cover_every_option_both_ways():
    for full in (False, True):
        sets = compile_check._option_sets(full)
        for name in compile_check.BOOLEAN_OPTIONS:
            assert {s[name] for s in sets} == {False, True}
    cases = compile_check.cases()
    assert {(c.dtype, c.precision) for c in cases} == set(compile_check.DTYPES)
    assert {c.op for c in cases} == set(compile_check.OPS)
    assert {c.shape_name for c in cases} == {"mnist", *compile_check.ODD_SHAPES}
    assert {c.iterations for c in cases if c.shape_name == "mnist"} == {1, 2, 3, 4}


def test_judge_names_each_problem():
    """The rules themselves, on made-up compile results."""
    class Launch:
        name, constexprs, num_warps = "k", {}, 16  # a ceiling of 128 registers

    def judged(dtype, precision, shape="mnist", **result):
        base = dict(registers=100, stack_bytes=0, local_bytes=0, spill_store_bytes=0, spill_load_bytes=0,
                    dots=[], mma={})
        variant = compile_check.Variant("key", Launch(), dtype, precision, shape, ["case"], dict(base, **result))
        compile_check.judge(variant)
        return variant

    dot = lambda m, n, k, operand: dict(a=[m, k], b=[k, n], operand=operand, result="f32", m=m, n=n, k=k)
    assert judged("float32", "ieee", error="CompilationError: K >= 16").problems[0].startswith("compile error")
    assert "spills" in judged("float32", "ieee", registers=128, stack_bytes=16, spill_store_bytes=16).problems[0]
    spare = judged("float32", "ieee", registers=64, stack_bytes=8, spill_store_bytes=8)  # ptxas's own choice
    assert not spare.problems and "ceiling 128" in spare.notes[0]
    spilled64 = judged("float64", None, registers=128, stack_bytes=16, spill_store_bytes=16)
    assert not spilled64.problems and "spills" in spilled64.notes[0]
    large = judged("bfloat16", None, compile_check.LARGE_TILE_SHAPES[0], registers=128, stack_bytes=8,
                   spill_load_bytes=8)
    assert not large.problems and "spills" in large.notes[0]
    frame = judged("float32", "ieee", stack_bytes=8)  # a stack frame without spills (a call)
    assert not frame.problems and "no spill" in frame.notes[0]
    assert "K=8" in judged("float32", "ieee", dots=[dot(16, 16, 8, "f32")]).problems[0]
    assert "N=4" in judged("bfloat16", None, dots=[dot(16, 4, 16, "bf16")], mma={"HMMA": 1}).problems[0]
    assert "no HMMA/HGMMA" in judged("bfloat16", None, dots=[dot(16, 16, 16, "bf16")]).problems[0]
    assert "no HMMA/HGMMA" in judged("float32", "tf32", dots=[dot(16, 16, 16, "f32")], mma={"DMMA": 2}).problems[0]
    assert not judged("float32", "ieee", dots=[dot(16, 16, 16, "f32")]).problems  # FMA dots are fine
    assert not judged("bfloat16", None, dots=[dot(16, 8, 16, "bf16")], mma={"HMMA.16816.F32.BF16": 2}).problems
    from benchmarks.kernel_report.gpus import resolve

    h100 = resolve("h100")
    too_big = compile_check.Variant("key", Launch(), "float64", None, "mnist", ["case"],
                                    dict(registers=100, stack_bytes=0, local_bytes=0, spill_store_bytes=0,
                                         spill_load_bytes=0, dots=[], mma={}, shared_bytes=294912))
    compile_check.judge(too_big, h100)
    assert "294912 bytes of shared memory" in too_big.problems[0] and "232448" in too_big.problems[0]
    fits = compile_check.Variant("key", Launch(), "float32", "ieee", "mnist", ["case"],
                                 dict(too_big.result, shared_bytes=229376))
    compile_check.judge(fits, h100)
    assert not fits.problems


def test_refused_calls_are_not_compiled():
    """The dispatch's shared-memory limit refuses the float64 launch the H200 refused."""
    from capsnet_ext import triton_ops

    reason = triton_ops.unsupported_reason("capsule_routing", dtype=torch.float64,
                                           sizes=dict(J=17, Dout=24, Din=5))
    assert reason is not None and "shared memory" in reason
    assert triton_ops.unsupported_reason("capsule_routing", dtype=torch.float32,
                                         sizes=dict(J=17, Dout=24, Din=5)) is None
    assert triton_ops.unsupported_reason("capsule_routing", dtype=torch.float64,
                                         sizes=dict(J=10, Dout=16, Din=8)) is None


@pytest.mark.slow
def test_every_launch_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    out = tmp_path / "compile-check.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kernel_report.compile_check", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    report = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, report
    payload = json.loads(out.read_text())
    assert payload["failed"] == 0 and payload["target"] == "sm_90", report
    assert payload["triton"] == compile_check.PINNED_TRITON
    rows = payload["rows"]
    kernels = {r["kernel"] for r in rows}
    # Every kernel of the three ops' modules was compiled (forward and backward).
    from capsnet_ext.triton_ops import _gemm_kernels, predict

    for module in (_gemm_kernels, predict):
        jitted = {name for name, obj in vars(module).items()
                  if hasattr(obj, "run") and hasattr(obj, "fn") and not name.startswith("__")
                  and getattr(obj.fn, "__name__", "").endswith("_kernel")}
        assert jitted <= kernels, sorted(jitted - kernels)
    # The tensor-core dtypes did get tensor-core instructions in every kernel with a dot.
    for row in rows:
        if row["dots"] and (row["dtype"] in ("float16", "bfloat16") or row["precision"] == "tf32"):
            assert any(op.split(".")[0] in ("HMMA", "HGMMA") for op in row["mma"]), row
