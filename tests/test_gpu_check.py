"""The GPU check (``benchmarks/gpu_check.sh``) and its fold-back (``benchmarks.fold_gpu_check``).

* The dry run, as CI runs it on a machine without a GPU: every step that can run there, a plan
  that lists each GPU step with its budget (sum under 8 minutes), one archive and one summary.
* The verdict: GPU test failures and sanitizer reports are attributed to the backend they
  belong to; anything unattributable counts against every backend.
* The fold-back, on archives built here as test fixtures (never results): a check in which
  every step passed writes the CUDA backend's verification record and the benchmark JSON; one
  failing step writes no record, names the failure, revokes an earlier record of that GPU
  model, and the backend's unavailability reason says so.
* The central marking of GPU tests in ``tests/conftest.py``.
"""
import json
import os
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from benchmarks import fold_gpu_check, gpu_check, sanitize_driver
from conftest import runs_on_gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_NAME = "NVIDIA H200"
GPU_STEPS = ["env", "install", "extension", "gpu-tests", "memcheck", "racecheck", "initcheck", "synccheck",
             "profile", "ncu", "bench-mnist", "train-step", "bench-compiled-fp32", "bench-compiled-bf16",
             "sweep-I", "sweep-B"]


# ------------------------------------------------------------------------------------ dry run

@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    env = dict(os.environ, OUT=str(out), COMMIT="0123456789abcdef0123456789abcdef01234567",
               PYTHON=sys.executable, TMPDIR=str(tmp_path_factory.mktemp("work")))
    started = time.perf_counter()
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--dry-run", "--skip-install"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return dict(proc=proc, out=out, seconds=time.perf_counter() - started,
                extracted=tmp_path_factory.mktemp("extracted"))


def test_dry_run_passes_and_leaves_one_archive_and_one_summary(dry_run):
    proc, out = dry_run["proc"], dry_run["out"]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    files = sorted(os.listdir(out))
    assert len(files) == 2, files  # at most 8 files come back from a GPU machine
    archive = [f for f in files if f.endswith(".tar.gz")]
    summary = [f for f in files if f.endswith("-summary.md")]
    assert len(archive) == 1 and len(summary) == 1, files
    folder = fold_gpu_check.extract(os.path.join(out, archive[0]), str(dry_run["extracted"]))
    steps = {s["step"]: s for s in gpu_check.read_steps(folder)}
    # What runs here runs for real; the GPU steps are listed with their budgets.
    assert steps["env"]["status"] == "pass"
    assert steps["install"]["status"] == "skipped"
    assert steps["extension"]["status"] == "skipped"  # the check ran and found no GPU
    for cpu_step in ("gpu-tests-collect", "sanitize-driver-cpu", "profile-cpu", "bench-cpu"):
        assert steps[cpu_step]["status"] == "pass", steps[cpu_step]
    for gpu_step in GPU_STEPS[3:]:
        assert steps[gpu_step]["status"] == "dry-run" and steps[gpu_step]["budget"] is not None, gpu_step
    with open(os.path.join(folder, "env.json")) as f:
        env = json.load(f)
    assert env["mode"] == "dry-run" and env["commit"].startswith("0123456789abcdef")
    assert env["source_digest"] == gpu_check.source_digest()
    with open(os.path.join(folder, "sanitize-driver-cpu.json")) as f:
        driver = json.load(f)["backends"][0]
    assert driver["status"] == "pass" and driver["calls"] == driver["cases"] > 50
    assert {"prior", "temperature", "bias", "leaky", "detach_inner", "return_coupling"} <= set(driver["options_in_grid"])
    assert os.listdir(os.path.join(folder, "bench")), "the CPU bench wrote no JSON"
    # The profile step's CPU stand-in: torch.profiler tables of the reference, forward and
    # forward+backward, in the archive and named in the summary.
    with open(os.path.join(folder, "profile-torch.json")) as f:
        profile = json.load(f)
    assert [(r["backend"], r["mode"]) for r in profile["runs"]] == [("reference", "forward"),
                                                                     ("reference", "forward_backward")]
    for run in profile["runs"]:
        assert run["kernels"] and abs(sum(k["share"] for k in run["kernels"]) - 1) < 0.01
        assert all(k["calls"] >= profile["calls"] * 0 and k["total_us"] > 0 for k in run["kernels"])
    assert os.path.exists(os.path.join(folder, "profile-torch.txt"))
    summary = open(os.path.join(folder, "summary.md")).read()
    assert "## Where the time goes" in summary and "- reference float32, forward+backward:" in summary


def test_dry_run_summary_lists_every_gpu_step_with_a_budget_under_8_minutes(dry_run):
    out = dry_run["out"]
    summary = open(os.path.join(out, [f for f in os.listdir(out) if f.endswith("-summary.md")][0])).read()
    assert "dry run" in summary
    plan = summary.split("## What runs on a GPU")[1]
    budgets = {}
    for line in plan.splitlines():
        parts = line.split()
        if parts and parts[0] in GPU_STEPS:
            budgets[parts[0]] = 0 if parts[1] == "left" else int(parts[1])
    assert set(budgets) == set(GPU_STEPS)
    assert 0 < sum(budgets.values()) < 8 * 60
    assert "PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck" in plan
    assert "--tool initcheck" in plan and "--tool racecheck" in plan and "--tool synccheck" in plan
    assert "--tool racecheck" in plan.split("--profile race")[0]
    assert "ncu --csv --page details" in plan and "--section WarpStateStats" in plan and "--launch-count" in plan
    assert "-m pytest -m gpu" in plan and "--no-build-isolation --no-deps" in plan


def test_dry_run_is_fast_enough_for_ci(dry_run):
    # Wall time on a busy shared 2-core machine; CI's is lower. Reported, and bounded loosely.
    print(f"dry run: {dry_run['seconds']:.1f} s")
    assert dry_run["seconds"] < 300


def test_dry_run_archive_is_refused_by_the_fold_back(dry_run, tmp_path):
    out = dry_run["out"]
    archive = os.path.join(out, [f for f in os.listdir(out) if f.endswith(".tar.gz")][0])
    with pytest.raises(fold_gpu_check.FoldError, match="dry run"):
        fold_gpu_check.fold(archive, results_dir=str(tmp_path / "results"), verified_path=str(tmp_path / "v.json"),
                            readme=str(tmp_path / "README.md"), log=lambda s: None)
    assert not (tmp_path / "v.json").exists()


# ------------------------------------------------------------------------- synthetic archives

def _timing(median):
    return dict(median=median, p20=median * 0.97, p80=median * 1.04, min=median * 0.95, mean=median, reps=100)


def _bench_record(op, contender, mode, dtype, median, status="ok", reason=None):
    return dict(op=op, contender=contender, contender_kind="backend", mode=mode, dtype=dtype,
                shape=dict(B=128, I=1152, J=10, Din=8, Dout=16, iterations=3), sweeps=["mnist"],
                options=dict(bias=True, leaky=False, detach_inner=False), status=status, reason=reason,
                time_s=_timing(median) if status == "ok" else None, peak_bytes=12 << 20 if status == "ok" else None,
                saved_bytes=None, saved_bytes_beyond_inputs=None, floor={}, fraction_of_floor=None,
                achieved_flops_per_s=None, achieved_bytes_per_s=None, correctness=None)


SANITIZER_CLEAN = """========= COMPUTE-SANITIZER
### capsnet-sanitize begin backend=cuda
### capsnet-sanitize end backend=cuda status=pass
### capsnet-sanitize begin backend=triton
### capsnet-sanitize end backend=triton status=pass
========= ERROR SUMMARY: 0 errors
"""
MEMCHECK_CUDA_ERROR = """========= COMPUTE-SANITIZER
### capsnet-sanitize begin backend=cuda
========= Invalid __global__ read of size 4 bytes
=========     at capsule_routing_forward_kernel<float>+0x1a0
### capsnet-sanitize end backend=cuda status=pass
### capsnet-sanitize begin backend=triton
### capsnet-sanitize end backend=triton status=pass
========= ERROR SUMMARY: 1 error
"""


def make_archive(tmp_path, *, memcheck_log=SANITIZER_CLEAN, failing_test=None, cuda_bench_status="ok",
                 date="2027-01-01T12:00:00+00:00", digest=None, memcheck_driver_failure=None):
    """A GPU check archive as gpu_check.sh leaves it (a fixture: nothing here ran on a GPU)."""
    stamp = date.replace("-", "").replace(":", "")[:15]
    name = f"gpu-check-{stamp}Z"
    folder = tmp_path / "made" / name
    (folder / "logs").mkdir(parents=True)
    (folder / "bench").mkdir()
    env = dict(mode="gpu", date=date, commit="feedface" * 5, commit_source="COMMIT environment variable",
               dirty=False, source_digest=digest or gpu_check.source_digest(),
               gpu=dict(name=GPU_NAME, capability="9.0", memory_bytes=150_000_000_000, multiprocessors=132, count=1),
               torch="2.11.0+cu130", torch_cuda="13.0", triton="3.6.0", nvidia_smi=f"{GPU_NAME}, 580.159.04",
               nvcc="Build cuda_13.0", compute_sanitizer="2025.3", host=dict(python="3.12.3"))
    (folder / "env.json").write_text(json.dumps(env))
    steps = ["step\tstatus\trc\tseconds\tbudget\tnote"]
    for step in GPU_STEPS:
        status, rc = "pass", 0
        if step == "memcheck" and "ERROR SUMMARY: 0" not in memcheck_log:
            status, rc = "FAIL", 99
        if step == "memcheck" and memcheck_driver_failure:
            status, rc = "FAIL", 1
        if step == "gpu-tests" and failing_test:
            status, rc = "FAIL", 1
        steps.append(f"{step}\t{status}\t{rc}\t12.5\t{0 if step.startswith('sweep') else 30}\t")
    (folder / "steps.tsv").write_text("\n".join(steps) + "\n")
    cases = [("tests.test_cuda", "test_gpu_opcheck"), ("tests.test_cuda", "test_gpu_routing[float32]"),
             ("tests.test_triton", "test_predict_matches_reference[cuda]"), ("tests.test_api", "test_layer[cuda]")]
    xml = ['<?xml version="1.0"?><testsuites><testsuite name="pytest">']
    for classname, test in cases:
        body = '<failure message="boom"/>' if failing_test == test else ""
        xml.append(f'<testcase classname="{classname}" name="{test}">{body}</testcase>')
    xml.append("</testsuite></testsuites>")
    (folder / "gpu-tests.xml").write_text("".join(xml))
    for tool in gpu_check.SANITIZER_TOOLS:
        (folder / "logs" / f"{tool}.log").write_text(memcheck_log if tool == "memcheck" else SANITIZER_CLEAN)
        failing = memcheck_driver_failure if tool == "memcheck" else None
        (folder / f"sanitize-{tool}.json").write_text(json.dumps(dict(profile="full", backends=[
            dict(backend=b, status="fail" if b == failing else "pass", calls=400, cases=400, unsupported={},
                 errors=["capsule_routing float16: RuntimeError: boom"] if b == failing else [], nonfinite=[])
            for b in ("cuda", "triton")])))
    results = []
    for op in ("capsule_routing", "dynamic_routing", "predict"):
        for mode in ("forward", "forward_backward"):
            for contender, median in (("reference", 1e-3), ("triton", 2e-4), ("cuda", 1e-4)):
                status = cuda_bench_status if contender == "cuda" else "ok"
                results.append(_bench_record(op, contender, mode, "float32", median, status,
                                             None if status == "ok" else "max relative error 3e-2"))
    meta = dict(schema=1, date=date, command="capsnet-ext bench --sweeps mnist", argv=[], git_commit=None,
                git_dirty=None, device=dict(type="cuda", name=GPU_NAME, capability="9.0"), torch="2.11.0+cu130",
                triton="3.6.0", cuda="13.0", python="3.12.3", machine="x86_64, 16 logical cores", quick=False)
    bench_name = f"cuda-nvidia-h200-{stamp}.json"
    (folder / "bench" / bench_name).write_text(json.dumps(dict(meta=meta, ceilings=None, left_out={},
                                                               results=results, end_to_end=[])))
    archive = tmp_path / f"{name}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=name)
    return str(archive), bench_name


def _fold(tmp_path, archive, **kwargs):
    paths = dict(results_dir=str(tmp_path / "results"), verified_path=str(tmp_path / "verified.json"),
                 readme=str(tmp_path / "README.md"))
    if not os.path.exists(paths["verified_path"]):
        with open(paths["verified_path"], "w") as f:
            json.dump({"comment": "test", "records": []}, f)
    result = fold_gpu_check.fold(archive, log=lambda s: None, **paths, **kwargs)
    with open(paths["verified_path"]) as f:
        return result, json.load(f), paths


def test_fold_back_of_a_passing_check_writes_the_record_results_and_readme(tmp_path):
    archive, bench_name = make_archive(tmp_path)
    result, verified, paths = _fold(tmp_path, archive)
    assert result["verdict"]["backends"]["cuda"]["verified"], result["verdict"]["backends"]["cuda"]
    assert result["verdict"]["backends"]["triton"]["verified"]
    [record] = verified["records"]
    assert record["device"] == GPU_NAME and record["commit"] == "feedface" * 5
    assert set(record["checks"]) == set(gpu_check.VERIFICATION_STEPS["cuda"])
    with open(os.path.join(paths["results_dir"], bench_name)) as f:
        meta = json.load(f)["meta"]
    assert meta["git_commit"] == "feedface" * 5  # filled in: the GPU machine had no .git
    checks = os.listdir(os.path.join(paths["results_dir"], "gpu-check"))
    assert len(checks) == 1
    readme = open(paths["readme"]).read()
    assert f"### {GPU_NAME}" in readme and "every verification step passed" in readme
    assert "not yet measured" not in readme
    # Folding the same archive again changes nothing.
    again, verified_again, _ = _fold(tmp_path, archive)
    assert verified_again == verified


@pytest.mark.parametrize("failure", ["memcheck", "gpu-test", "bench-wrong", "source"])
def test_fold_back_of_a_failing_check_keeps_cuda_unavailable_and_names_the_failure(tmp_path, failure):
    # An earlier check of this GPU model passed: a later failing one revokes it.
    earlier, _ = make_archive(tmp_path / "earlier", date="2026-12-01T00:00:00+00:00")
    _, verified, _ = _fold(tmp_path, earlier)
    assert len(verified["records"]) == 1
    archive, _ = make_archive(
        tmp_path, **({"memcheck": dict(memcheck_log=MEMCHECK_CUDA_ERROR),
                      "gpu-test": dict(failing_test="test_gpu_opcheck"),
                      "bench-wrong": dict(cuda_bench_status="wrong"),
                      "source": dict(digest="0" * 64)}[failure]))
    result, verified, paths = _fold(tmp_path, archive)
    cuda = result["verdict"]["backends"]["cuda"]
    if failure == "source":
        # Every step passed, but on other sources: no new record, and the earlier one stays.
        assert cuda["verified"] and "differ from this checkout" in result["decision"]
        assert len(verified["records"]) == 1
        return
    assert not cuda["verified"]
    expected = {"memcheck": "memcheck: 1 report(s), first: Invalid __global__ read",
                "gpu-test": "tests.test_cuda::test_gpu_opcheck",
                "bench-wrong": "benchmark"}[failure]
    assert any(expected in f for f in cuda["failures"]), cuda["failures"]
    # The Triton backend is judged on its own tests, sanitizer frames and benchmark records.
    assert result["verdict"]["backends"]["triton"]["verified"]
    assert verified["records"] == []
    assert verified["revoked"][0]["device"] == GPU_NAME
    [failed] = verified["failures"]
    assert failed["device"] == GPU_NAME and any(expected in f for f in failed["failures"])
    readme = open(paths["readme"]).read()
    assert "**not verified**" in readme and expected.split(":")[0] in readme
    # Results are folded all the same: a failed check is a result too.
    assert os.listdir(os.path.join(paths["results_dir"], "gpu-check"))


def test_failed_check_is_named_by_the_cuda_backend_unavailability_reason(tmp_path, monkeypatch):
    from capsnet_ext import cuda_ops

    archive, _ = make_archive(tmp_path, memcheck_log=MEMCHECK_CUDA_ERROR)
    _, verified, paths = _fold(tmp_path, archive)
    monkeypatch.setattr(cuda_ops, "VERIFIED_RECORDS", paths["verified_path"])
    monkeypatch.setattr(cuda_ops, "_availability_cache", {})
    monkeypatch.delenv(cuda_ops.UNVERIFIED_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: GPU_NAME)
    reason = cuda_ops.availability("cuda")
    assert reason is not None and "has not passed on any GPU" in reason
    assert "last GPU check on NVIDIA H200" in reason and "memcheck" in reason
    assert "benchmarks/gpu_check.sh" in reason


def test_fold_back_refuses_archives_that_leave_their_folder(tmp_path):
    evil = tmp_path / "evil.tar.gz"
    payload = tmp_path / "x.txt"
    payload.write_text("x")
    with tarfile.open(evil, "w:gz") as tar:
        tar.add(payload, arcname="../x.txt")
    with pytest.raises(fold_gpu_check.FoldError, match="refusing"):
        fold_gpu_check.extract(str(evil), str(tmp_path / "into"))
    with pytest.raises(fold_gpu_check.FoldError, match="not found"):
        fold_gpu_check.extract(str(tmp_path / "missing.tar.gz"), str(tmp_path / "into"))


# ------------------------------------------------------------------------------- the verdict

def test_sanitizer_reports_are_attributed_by_marker_frame():
    log = "\n".join([
        "========= COMPUTE-SANITIZER",
        "========= Warning: something at start-up",
        f"{sanitize_driver.MARKER} begin backend=cuda",
        "========= Invalid __shared__ write of size 4 bytes",
        "=========     at some_kernel+0x10",
        f"{sanitize_driver.MARKER} end backend=cuda status=pass",
        f"{sanitize_driver.MARKER} begin backend=triton",
        "========= Error: Race reported between Write access at 0x1 and Read access at 0x2",
        "========= Warning: (Warp Level Programming) Potential RAW hazard detected",
        f"{sanitize_driver.MARKER} end backend=triton status=pass",
        "========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)",
        "========= ERROR SUMMARY: 2 errors",
    ])
    found = gpu_check.sanitizer_reports(log)
    assert found["cuda"]["errors"] == ["Invalid __shared__ write of size 4 bytes"]
    assert found["triton"]["errors"][0].startswith("Error: Race reported")
    assert len(found["triton"]["warnings"]) == 1
    assert found["unattributed"] == dict(errors=[], warnings=["Warning: something at start-up"])
    assert gpu_check.MARKER == sanitize_driver.MARKER


def test_unattributed_sanitizer_error_fails_every_backend(tmp_path):
    log = "========= Invalid __global__ read of size 4 bytes\n" + SANITIZER_CLEAN
    archive, _ = make_archive(tmp_path, memcheck_log=log)
    folder = fold_gpu_check.extract(archive, str(tmp_path / "x"))
    verdict = gpu_check.evaluate(folder)
    for backend in ("cuda", "triton"):
        assert not verdict["backends"][backend]["verified"]
        assert any(f.startswith("memcheck:") for f in verdict["backends"][backend]["failures"])


def test_a_failed_driver_run_is_blamed_on_its_backend_only(tmp_path):
    archive, _ = make_archive(tmp_path, memcheck_driver_failure="triton")
    verdict = gpu_check.evaluate(fold_gpu_check.extract(archive, str(tmp_path / "x")))
    assert verdict["backends"]["cuda"]["verified"], verdict["backends"]["cuda"]
    triton = verdict["backends"]["triton"]
    assert not triton["verified"] and any("driver fail" in f and "boom" in f for f in triton["failures"])


def test_sanitize_driver_covers_every_option_on_the_reference():
    summary = sanitize_driver.run_backend("reference", "cpu", "tiny")
    assert summary["status"] == "pass" and summary["calls"] == summary["cases"]
    assert not summary["unsupported"] and not summary["errors"] and not summary["nonfinite"]
    grid = sanitize_driver.option_grid("float32", "full")
    for option in ("bias", "leaky", "detach_inner", "return_coupling", "prior"):
        assert {bool(o.get(option)) for o in grid} == {False, True}, option
    assert {o.get("temperature", 1.0) != 1.0 for o in grid} == {False, True}
    assert {o["iterations"] for o in grid} >= {1, 3}
    for dtype in ("float16", "bfloat16", "float64"):
        light = sanitize_driver.option_grid(dtype, "light")
        for option in ("bias", "leaky", "detach_inner", "return_coupling", "prior"):
            assert {bool(o.get(option)) for o in light} == {False, True}, (dtype, option)


def test_commit_comes_from_env_then_file_then_git(tmp_path, monkeypatch):
    monkeypatch.setenv("COMMIT", "abc")
    assert gpu_check.commit_info(str(tmp_path))["commit"] == "abc"
    monkeypatch.delenv("COMMIT")
    (tmp_path / gpu_check.COMMIT_FILE).write_text("def\ndirty\n")
    info = gpu_check.commit_info(str(tmp_path))
    assert info["commit"] == "def" and info["dirty"] is True and info["commit_source"] == gpu_check.COMMIT_FILE
    (tmp_path / gpu_check.COMMIT_FILE).unlink()
    assert gpu_check.commit_info(str(tmp_path))["commit"] is None  # no .git there either


def test_source_digest_follows_the_sources_only(tmp_path):
    (tmp_path / "capsnet_ext" / "cuda_ops").mkdir(parents=True)
    (tmp_path / "capsnet_ext" / "ops.py").write_text("x = 1\n")
    (tmp_path / "setup.py").write_text("")
    before = gpu_check.source_digest(str(tmp_path))
    (tmp_path / "capsnet_ext" / "cuda_ops" / "verified.json").write_text("{}")
    (tmp_path / "capsnet_ext" / "_C.cpython-312-x86_64-linux-gnu.so").write_text("binary")
    assert gpu_check.source_digest(str(tmp_path)) == before
    (tmp_path / "capsnet_ext" / "ops.py").write_text("x = 2\n")
    assert gpu_check.source_digest(str(tmp_path)) != before


# ---------------------------------------------------------------------- marking of GPU tests

class _Mark:
    def __init__(self, name, *args, **kwargs):
        self.name, self.args, self.kwargs = name, args, kwargs


def test_gpu_tests_are_marked_by_device_parameter_marker_or_skip_reason():
    assert runs_on_gpu({"device": "cuda"}, [])
    assert runs_on_gpu({"dev": torch.device("cuda", 0)}, [])
    assert runs_on_gpu({"device": "cuda:1"}, [])
    assert not runs_on_gpu({"device": "cpu"}, [])
    assert not runs_on_gpu({"backend": "cuda"}, [])  # a backend name, not a device
    assert runs_on_gpu({}, [_Mark("gpu")])
    for gpu in (False, True):
        # skipif(not torch.cuda.is_available(), ...): a GPU test, on either kind of machine.
        assert runs_on_gpu({}, [_Mark("skipif", not gpu, reason="needs a CUDA GPU")], gpu)
        # skipif(torch.cuda.is_available(), ...): a test of the CPU-only path, never a GPU test.
        assert not runs_on_gpu({}, [_Mark("skipif", gpu, reason="only without a GPU")], gpu)
        assert not runs_on_gpu({}, [_Mark("skipif", not gpu, reason="needs MNIST")], gpu)


# --------------------------------------------------------------- the GPU path, with stand-ins

FAKE_PYTHON = """#!/usr/bin/env bash
# Stand-in for python3 on a GPU machine: the summary runs for real; every other call is logged
# with the environment the GPU check gives it, and succeeds.
if [[ "$1 $2 $3" == "-m benchmarks.gpu_check summarize" ]]; then exec {real} "$@"; fi
printf '%s|%s|%s|%s\\n' "${{PYTORCH_NO_CUDA_MEMORY_CACHING:-}}" "${{CAPSNET_EXT_CUDA_UNVERIFIED:-}}" \\
  "${{CAPSNET_EXT_NO_JIT:-}}" "$*" >>{log}
exit 0
"""
FAKE_NCU = """#!/usr/bin/env bash
printf 'NCU %s\\n' "$*" >>{log}
exit 0
"""
FAKE_SANITIZER = """#!/usr/bin/env bash
if [[ "$1" == --help ]]; then echo "--report-api-errors  --target-processes  --error-exitcode"; exit 0; fi
printf 'SANITIZER %s\\n' "$*" >>{log}
while [[ $# -gt 0 && "$1" == --* ]]; do shift 2; done
"$@"
"""


def test_gpu_path_runs_every_step_with_the_right_commands(tmp_path):
    """The non-dry path of gpu_check.sh with stand-ins for python3 and compute-sanitizer: every
    step runs in order, with the flags, environment and output folder it must have."""
    log = tmp_path / "calls.log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_python = bin_dir / "python3"
    fake_python.write_text(FAKE_PYTHON.format(real=sys.executable, log=log))
    (bin_dir / "compute-sanitizer").write_text(FAKE_SANITIZER.format(log=log))
    (bin_dir / "ncu").write_text(FAKE_NCU.format(log=log))
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), COMMIT="abc", PYTHON=str(fake_python), MAX_JOBS="16",
               PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", TMPDIR=str(tmp_path))
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert len(os.listdir(out)) == 2
    calls = log.read_text().splitlines()
    sanitizer = [c for c in calls if c.startswith("SANITIZER")]
    ncu = [c for c in calls if c.startswith("NCU")]
    python = [c.split("|") for c in calls if not c.startswith(("SANITIZER", "NCU"))]

    def find(fragment):
        hits = [c for c in python if fragment in c[3]]
        assert hits, (fragment, [c[3] for c in python])
        return hits

    [install] = find("-m pip install")
    assert install[3] == "-m pip install --no-build-isolation --no-deps --no-index -v -e ."
    assert install[2] == ""  # the just-in-time build is forbidden only after the install
    tests, error_path = find("-m pytest")  # the GPU tests, then crash-trace's reproducer
    assert "-p no:xdist tests/test_cuda.py::test_gpu_errors_name_the_argument" in error_path[3]
    assert "-X faulthandler" in error_path[3]
    assert " -m gpu " in tests[3] and "-n 12" in tests[3] and "--junitxml=" in tests[3] and tests[3].endswith(" tests")
    assert tests[1:3] == ["1", "1"]  # CAPSNET_EXT_CUDA_UNVERIFIED=1, CAPSNET_EXT_NO_JIT=1
    assert [c.split()[2] for c in sanitizer] == ["memcheck", "racecheck", "initcheck", "synccheck"]
    for line in sanitizer:
        assert "--error-exitcode 99" in line and "--report-api-errors no" in line
        assert "--target-processes application-only" in line
    crash_driver, *drivers = find("-m benchmarks.sanitize_driver")
    assert crash_driver[0] == "1" and "--backends cuda --profile full" in crash_driver[3]
    assert [d[0] for d in drivers] == ["1", "", "1", ""]  # caching allocator off for memcheck, initcheck
    assert [d[3].split("--profile ")[1].split()[0] for d in drivers] == ["full", "race", "full", "race"]
    assert all("--backends cuda,triton" in d[3] and "--out " in d[3] for d in drivers)
    [profile] = find("-m benchmarks.gpu_profile torch")
    assert profile[1] == "1"  # the CUDA backend is profiled before it is verified
    assert len(ncu) == 3 and all("--csv --page details" in c and "--launch-count 16" in c for c in ncu)
    assert ["--backend cuda --dtype float32" in ncu[0], "--backend triton --dtype bfloat16" in ncu[1]] == [True, True]
    assert len(find("-m benchmarks.gpu_profile ncu-parse")) == 3
    benches = find("-m capsnet_ext.cli bench")
    assert len(benches) == 6
    for b in benches:
        assert "--out-dir " in b[3] and "--device cuda" in b[3] and b[1] == "1"
    assert "--sweeps mnist --dtypes float32,bfloat16 --contenders reference,triton,cuda" in benches[0][3]
    assert "--e2e-only" in benches[1][3]
    assert "--contenders reference-compiled" in benches[2][3] and "--dtypes float32" in benches[2][3]
    assert "--contenders reference-compiled" in benches[3][3] and "--dtypes bfloat16" in benches[3][3]
    assert "--sweeps I" in benches[4][3] and "--sweeps B" in benches[5][3]
    summary = (out / [f for f in os.listdir(out) if f.endswith("-summary.md")][0]).read_text()
    for step in GPU_STEPS:
        assert f"| {step} | pass |" in summary, step
    # Nothing verified: the stand-ins left no test report or sanitizer record to judge.
    assert "NOT verified" in summary and "gpu-tests: pass, no JUnit report" in summary
    # The first lines say, per backend, verified or not and the first cause.
    head = summary.split("## Steps")[0]
    assert "**cuda**: NOT verified; first cause:" in head and "**triton**: NOT verified; first cause:" in head


NCU_CSV = '''==PROF== Connected to process 123
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","123","python3","localhost","_fwd_sweep_kernel","1","7","(512, 1, 1)","(8, 33, 1)","0","9.0","Occupancy","Achieved Occupancy","%","23.51"
"0","123","python3","localhost","_fwd_sweep_kernel","1","7","(512, 1, 1)","(8, 33, 1)","0","9.0","Occupancy","Theoretical Occupancy","%","25"
"0","123","python3","localhost","_fwd_sweep_kernel","1","7","(512, 1, 1)","(8, 33, 1)","0","9.0","Command line profiler metrics","smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio","ratio","1,234.5"
"0","123","python3","localhost","_fwd_sweep_kernel","1","7","(512, 1, 1)","(8, 33, 1)","0","9.0","Command line profiler metrics","smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio","ratio","3.2"
"1","123","python3","localhost","_fwd_sweep_kernel","1","7","(512, 1, 1)","(8, 33, 1)","0","9.0","Occupancy","Achieved Occupancy","%","99"
"2","123","python3","localhost","routing_grad_kernel(float const*)","1","7","(256, 1, 1)","(1152, 1, 1)","0","9.0","Occupancy","Achieved Occupancy","%","60.0"
'''


def test_ncu_csv_gives_occupancy_and_top_stall_per_kernel(tmp_path):
    from benchmarks import gpu_profile

    parsed = gpu_profile.parse_ncu_csv(NCU_CSV)
    sweep = parsed["_fwd_sweep_kernel"]
    assert sweep["achieved_occupancy_pct"] == 23.51  # the first profiled launch, not the second
    assert sweep["theoretical_occupancy_pct"] == 25.0
    assert sweep["top_stall"] == "long_scoreboard" and sweep["top_stall_cycles"] == 1234.5
    grad = parsed["routing_grad_kernel(float const*)"]
    assert grad["achieved_occupancy_pct"] == 60.0 and grad["top_stall"] is None
    assert gpu_profile.parse_ncu_csv("==PROF== nothing profiled\n") == {}
    # The summary joins the torch.profiler table with ncu's numbers by kernel name.
    table = dict(shape={}, device="cuda:0", calls=2, runs=[dict(
        backend="triton", dtype="bfloat16", mode="forward_backward",
        kernels=[dict(kernel="_fwd_sweep_kernel", calls=6, total_us=300.0, mean_us=50.0, launches_per_call=3, share=0.75),
                 dict(kernel="_grad_sweep_kernel", calls=4, total_us=100.0, mean_us=25.0, launches_per_call=2, share=0.25)])])
    (tmp_path / "profile-torch.json").write_text(json.dumps(table))
    (tmp_path / "profile-ncu-triton-bfloat16.json").write_text(json.dumps(parsed))
    [line] = gpu_profile.summarize(str(tmp_path))
    assert line == ("- triton bfloat16, forward+backward: 200 µs of kernels per call; `_fwd_sweep_kernel` 75% "
                    "(3/call, occupancy 24%, top stall long_scoreboard); `_grad_sweep_kernel` 25% (2/call)")


def test_race_profile_reaches_every_kernel_once():
    grid = sanitize_driver.option_grid("float32", "race")
    assert sanitize_driver.SHAPES["race"] and sanitize_driver.DTYPES["race"] == ("float32",)
    B, I = sanitize_driver.SHAPES["race"][0][:2]
    assert B > 16 and I > 16  # the gradient sweep splits the samples: the split-summing kernel runs
    for option in ("bias", "leaky", "detach_inner", "return_coupling", "prior"):
        assert {bool(o.get(option)) for o in grid} == {False, True}, option
    assert {o["iterations"] for o in grid} >= {1, 3}
    assert len(grid) <= 3
