"""The static kernel report (benchmarks/kernel_report): launch recording, compiled-kernel
facts, the model and the outputs, on tiny shapes so that it takes seconds.

The report itself must run without TRITON_INTERPRET (it compiles kernels for a GPU target),
while this test process runs Triton in its interpreter (tests/conftest.py): the report runs in
a subprocess and its JSON is checked against what the backend launches here.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from benchmarks.kernel_report import gpus, model, sass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(B=3, I=5, J=4, Din=6, Dout=7)


def _nvcc():
    for candidate in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def _report_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _check_mix(mix):
    assert mix["total"] == sum(mix["by_category"].values()) == sum(mix["by_opcode"].values())
    assert set(mix["by_category"]) == set(sass.CATEGORY_ORDER)


# ---------------------------------------------------------------------------------------------
# SASS reading and the model, on a small CUDA kernel compiled here
# ---------------------------------------------------------------------------------------------
KERNEL_SOURCE = r"""
__global__ void axpy_loop(const float* __restrict__ x, float* __restrict__ y, float a, int n, int reps) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float acc = y[i];
  for (int r = 0; r < reps; ++r) acc = a * acc + x[i];
  y[i] = acc;
}
"""


@pytest.fixture(scope="module")
def small_cubin(tmp_path_factory):
    nvcc = _nvcc()
    if nvcc is None or sass.find_tool("nvdisasm") is None:
        pytest.skip("nvcc or nvdisasm not available")
    folder = tmp_path_factory.mktemp("cubin")
    src = folder / "axpy.cu"
    src.write_text(KERNEL_SOURCE)
    cubin = folder / "axpy.cubin"
    proc = subprocess.run([nvcc, "-cubin", "-arch=sm_90", "-O3", "-lineinfo", "-Xptxas", "-v", str(src),
                           "-o", str(cubin)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return str(cubin), proc.stdout + proc.stderr, str(src)


def test_kernel_facts_from_a_compiled_cubin(small_cubin):
    cubin, ptxas_log, src = small_cubin
    usage = sass.resource_usage(cubin)
    (name,) = usage
    assert isinstance(usage[name]["registers"], int) and usage[name]["registers"] > 0
    assert usage[name]["local_bytes"] == 0 and usage[name]["stack_bytes"] == 0
    spills = sass.ptxas_spills(ptxas_log)
    assert spills[name] == dict(stack_frame_bytes=0, spill_store_bytes=0, spill_load_bytes=0)
    fn = sass.disassemble(cubin)[name]
    mix = sass.instruction_mix(fn.instructions)
    _check_mix(mix)
    assert mix["total"] == len(fn.instructions)
    assert mix["by_category"]["FFMA"] >= 1 and mix["by_category"]["LDG"] >= 1 and mix["by_category"]["STG"] == 1
    assert all(ins.file and os.path.basename(ins.file) == "axpy.cu" for ins in fn.instructions if ins.line)
    # The reps loop is a backward branch; its body runs once per source iteration.
    assert len(fn.loops()) >= 1
    loop_line = str(next(k + 1 for k, line in enumerate(KERNEL_SOURCE.splitlines()) if "for (int r" in line))
    counts = {str(k): 1.0 for k in range(1, 9)}
    counts[loop_line] = 50.0
    dyn = sass.dynamic_estimate(fn, counts, src)
    weighted = sass.instruction_mix(fn.instructions, dyn["weights"])
    assert weighted["total"] > mix["total"]  # the loop body counts many times
    floor = sass.line_floor_estimate(fn, counts, src)
    lines_with_code = {str(i.line) for i in fn.instructions if i.line is not None}
    assert sum(floor["weights"]) == pytest.approx(sum(counts[k] for k in lines_with_code if k in counts))


def test_occupancy_and_bounds():
    h100 = gpus.H100_SXM
    occ = model.occupancy(h100, threads_per_block=256, registers=64, shared_bytes=0)
    assert occ["blocks_per_sm"] == 4 and occ["limited_by"] == "registers" and occ["occupancy"] == 0.5
    occ = model.occupancy(h100, threads_per_block=128, registers=32, shared_bytes=100 * 1024)
    assert occ["blocks_per_sm"] == 2 and occ["limited_by"] == "shared memory"
    bound = model.launch_bound(h100, blocks=264, warps_per_block=4, blocks_per_sm=4, warp_instructions_per_warp=1000,
                               fp64_per_warp=0, mufu_per_warp=0, bytes_moved=3.35e6)
    assert bound["bounds_s"]["issue"] == pytest.approx(2 * 4 * 1000 / (4 * h100.clock_hz))
    assert bound["bounds_s"]["memory"] == pytest.approx(1e-6)
    assert bound["bound_s"] == max(bound["bounds_s"].values())
    assert gpus.resolve("sm_80") is gpus.A100_SXM and gpus.resolve("h100") is gpus.H100_SXM
    with pytest.raises(ValueError, match="unknown target GPU"):
        gpus.resolve("sm_75")


# ---------------------------------------------------------------------------------------------
# The Triton backend end to end (predict: three small kernels)
# ---------------------------------------------------------------------------------------------
def _launched_here(op):
    """Kernel names the Triton backend launches for ``op`` (forward then backward) in this
    process's interpreter, at the tiny shape."""
    from triton.runtime.interpreter import InterpretedFunction

    from capsnet_ext import ops

    names = []
    original = InterpretedFunction.run

    def spy(self, *args, **kwargs):
        names.append(self.fn.__name__)
        return original(self, *args, **kwargs)

    g = torch.Generator().manual_seed(0)
    u = torch.randn(TINY["B"], TINY["I"], TINY["Din"], generator=g, requires_grad=True)
    W = torch.randn(TINY["I"], TINY["J"], TINY["Dout"], TINY["Din"], generator=g, requires_grad=True)
    InterpretedFunction.run = spy
    try:
        out = ops.predict(u, W, backend="triton")
        forward = list(names)
        torch.autograd.grad(out, [u, W], torch.randn_like(out))
    finally:
        InterpretedFunction.run = original
    return forward, names[len(forward):]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="compares with the interpreter's launches")
def test_triton_report_matches_the_launches(tmp_path):
    out_dir, cache = tmp_path / "static", tmp_path / "cache"
    shape = ",".join(str(TINY[k]) for k in ("B", "I", "J", "Din", "Dout"))
    cmd = [sys.executable, "-m", "benchmarks.kernel_report", "--op", "predict", "--backend", "triton",
           "--shape", shape, "--label", "test", "--samples", "1", "--out-dir", str(out_dir),
           "--cache-dir", str(cache)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_report_env(), cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (path,) = list(out_dir.glob("*.json"))
    assert path.name == "test-predict-float32-sm90.json"
    payload = json.loads(path.read_text())
    for key in ("command", "date", "git_commit", "versions", "target", "model", "dynamic_counts"):
        assert payload[key], key
    assert payload["target"]["sms"] == 132 and payload["problem"]["shape"] == TINY
    result = payload["backends"]["triton"]
    assert result["status"] == "ok"
    forward, backward = _launched_here("predict")
    assert [l["kernel"] for l in result["launches"] if l["phase"] == "forward"] == forward
    assert [l["kernel"] for l in result["launches"] if l["phase"] == "backward"] == backward
    assert result["totals"]["forward"]["kernel_launches"] == len(forward)
    for launch in result["launches"]:
        assert isinstance(launch["registers"], int) and launch["registers"] > 0
        assert launch["blocks"] == launch["grid"][0] * launch["grid"][1] * launch["grid"][2] > 0
        assert launch["dynamic"]["counted"] and launch["dynamic"]["per_warp_total"] > 0
        assert launch["bytes"] > 0 and launch["bound_s"] > 0
        assert launch["bound_s"] == max(launch["bounds_s"].values())
    for variant in result["variants"]:
        _check_mix(variant["static_mix"])
    assert "Static kernel report: predict float32" in proc.stdout
    # The README section is built from the JSON files.
    from benchmarks.kernel_report.report import readme_section

    section = readme_section(str(out_dir))
    assert "| test |" in section and "test-predict-float32-sm90.json" in section


def test_unknown_dtype_for_cuda_is_reported_not_raised(tmp_path):
    from benchmarks.kernel_report import cuda_backend

    result = cuda_backend.analyse("capsule_routing", TINY, torch.bfloat16, 2, True, gpus.H100_SXM, str(tmp_path))
    assert result["status"].startswith("not recordable: ")


# ---------------------------------------------------------------------------------------------
# The CUDA backend's launch plan, from the emulation driver
# ---------------------------------------------------------------------------------------------
def test_cuda_launch_plan_from_the_emulation(tmp_path):
    from benchmarks.kernel_report import cuda_backend

    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no host C++ compiler")
    exe, _, _ = cuda_backend.build_emulation("record", str(tmp_path / "cache"))
    plans = {}
    for iterations in (1, 3):
        folder = tmp_path / f"r{iterations}"
        folder.mkdir()
        cuda_backend.write_problem(str(folder), "capsule_routing", TINY, "float32", iterations, True, 7)
        log = folder / "launches.log"
        proc = subprocess.run([exe, str(folder)], capture_output=True, text=True,
                              env=dict(os.environ, CAPSNET_REPORT_LOG=str(log)))
        assert proc.returncode == 0, proc.stderr
        plans[iterations] = cuda_backend.parse_log(str(log), exe)
    for events in plans.values():
        launches = [e for e in events if e["type"] == "launch"]
        assert {e["phase"] for e in launches} == {"forward", "backward"}
        for e in launches:
            assert not e["kernel"].startswith("0x") and "<" in e["kernel"]  # resolved, templated names
            assert min(e["grid"]) >= 1 and e["block"][0] % 32 == 0
            assert e["bytes"] is None or e["bytes"] > 0
    # More iterations never mean fewer launches.
    for phase in ("forward", "backward"):
        n = {r: sum(1 for e in plans[r] if e["type"] == "launch" and e["phase"] == phase) for r in plans}
        assert n[3] >= n[1] >= 1
