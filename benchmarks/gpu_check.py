"""Helpers of ``benchmarks/gpu_check.sh``: the environment record, the CUDA extension check,
and the verdict and one-page summary of a results folder.

The verdict (:func:`evaluate`) is computed from the raw files a run leaves (``steps.tsv``, the
pytest JUnit report, the sanitizer logs and the benchmark JSON), never from the summary, and
the fold-back (:mod:`benchmarks.fold_gpu_check`) recomputes it the same way. Everything here
but the ``env``, ``extension`` and ``crash-probe`` subcommands uses the standard library only, so the summary
is written even when torch or the package fail to import.

    python3 -m benchmarks.gpu_check env RESULTS_DIR [--mode gpu|dry-run]
    python3 -m benchmarks.gpu_check extension RESULTS_DIR
    python3 -m benchmarks.gpu_check crash-probe [RESULTS_DIR]
    python3 -m benchmarks.gpu_check summarize RESULTS_DIR [--out SUMMARY.md]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import glob
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMIT_FILE = ".gpu-check-commit"
SANITIZER_TOOLS = ("memcheck", "racecheck", "initcheck", "synccheck")
KERNEL_BACKENDS = ("cuda", "triton")
MARKER = "### capsnet-sanitize"  # kept equal to benchmarks.sanitize_driver.MARKER (tested)
# Steps whose failure keeps a backend unverified. The timing steps are not among them, but a
# contender that the benchmark's correctness gate finds wrong is (see evaluate).
VERIFICATION_STEPS = {
    "cuda": ("install", "extension", "gpu-tests") + SANITIZER_TOOLS,
    "triton": ("gpu-tests",) + SANITIZER_TOOLS,
}
# Test files whose GPU tests belong to one backend; GPU tests elsewhere count for both.
TEST_GROUPS = {"test_cuda": "cuda", "test_triton": "triton"}


# --------------------------------------------------------------------------- environment

def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _cmd(*args: str, timeout: float = 20) -> Optional[str]:
    if shutil.which(args[0]) is None:
        return None
    try:
        out = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"failed: {exc}"
    text = (out.stdout or out.stderr).strip()
    return text if out.returncode == 0 else f"exit {out.returncode}: {text[:500]}"


SOURCE_ROOTS = ("capsnet_ext", "csrc", "setup.py", "pyproject.toml")
SOURCE_EXCLUDE = re.compile(r"(__pycache__|\.pyc$|\.so$|\.egg-info|(^|/)verified\.json$)")


def source_digest(root: str = REPO_ROOT) -> str:
    """SHA-256 over the package sources (``capsnet_ext/``, ``csrc/``, ``setup.py``,
    ``pyproject.toml``; no build outputs, no ``verified.json``), path and content, so the code
    that ran on a GPU can be matched with a checkout without ``.git``."""
    digest = hashlib.sha256()
    files: List[str] = []
    for top in SOURCE_ROOTS:
        path = os.path.join(root, top)
        if os.path.isfile(path):
            files.append(top)
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not SOURCE_EXCLUDE.search(d))
            for name in filenames:
                rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
                if not SOURCE_EXCLUDE.search(rel):
                    files.append(rel)
    for rel in sorted(files):
        digest.update(rel.encode() + b"\0")
        with open(os.path.join(root, rel), "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest()


def commit_info(root: str = REPO_ROOT) -> Dict[str, object]:
    """The commit of the working tree: ``$COMMIT``, else the file ``.gpu-check-commit`` (first
    line the commit, optional second line ``dirty``; written by ``gpu_check.sh --stamp``), else
    ``git`` when ``.git`` is there, else unknown."""
    env = os.environ.get("COMMIT", "").strip()
    if env:
        return dict(commit=env, commit_source="COMMIT environment variable",
                    dirty=os.environ.get("COMMIT_DIRTY") == "1")
    path = os.path.join(root, COMMIT_FILE)
    if os.path.exists(path):
        with open(path) as f:
            lines = [line.strip() for line in f if line.strip()]
        if lines:
            return dict(commit=lines[0], commit_source=COMMIT_FILE, dirty="dirty" in lines[1:])
    head = _cmd("git", "-C", root, "rev-parse", "HEAD")
    if head and not head.startswith(("exit", "failed")):
        status = _cmd("git", "-C", root, "status", "--porcelain", "--untracked-files=no") or ""
        return dict(commit=head, commit_source="git", dirty=bool(status.strip()))
    return dict(commit=None, commit_source="none: pass COMMIT=<hash> or write .gpu-check-commit", dirty=None)


def environment(mode: str) -> Dict[str, object]:
    """Everything the results depend on; never raises (failures are recorded as text)."""
    env: Dict[str, object] = dict(mode=mode, date=_now(), **commit_info())
    env["source_digest"] = source_digest()
    env["host"] = dict(platform=platform.platform(), machine=platform.machine(),
                       cpu_count=os.cpu_count(), python=platform.python_version(),
                       python_executable=sys.executable, python_on_path=shutil.which("python"),
                       python3_on_path=shutil.which("python3"))
    env["nvidia_smi"] = _cmd("nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                             "--format=csv,noheader")
    nvcc = _cmd("nvcc", "--version")
    env["nvcc"] = nvcc.splitlines()[-1] if nvcc else None
    sanitizer = _cmd("compute-sanitizer", "--version")
    env["compute_sanitizer"] = sanitizer.splitlines()[-1] if sanitizer else None
    env["ninja"] = _cmd("ninja", "--version")
    for module in ("pytest", "xdist", "triton", "numpy"):
        try:
            mod = __import__(module)
            env[module] = getattr(mod, "__version__", "present")
        except Exception as exc:  # noqa: BLE001 - recorded
            env[module] = f"not importable: {type(exc).__name__}: {exc}"
    try:
        import torch
        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        env["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            env["gpu"] = dict(name=props.name, capability=f"{props.major}.{props.minor}",
                              memory_bytes=int(props.total_memory),
                              multiprocessors=int(props.multi_processor_count),
                              count=torch.cuda.device_count())
    except Exception as exc:  # noqa: BLE001 - recorded
        env["torch"] = f"not importable: {type(exc).__name__}: {exc}"
    return env


# --------------------------------------------------------------------------- extension check

NOT_APPLICABLE = 3  # exit status of the extension check without a GPU (dry run)


def check_extension() -> int:
    """Exit 0 when the CUDA extension built by ``pip install`` is loaded, its ops are
    registered for CUDA, and one small call of the public API with ``backend="cuda"`` runs
    and agrees with the reference; 1 (with the reason) otherwise; 3 without a GPU."""
    import importlib.util

    import torch

    spec = importlib.util.find_spec("capsnet_ext._C")
    print(f"built extension capsnet_ext._C: {spec.origin if spec else 'NOT FOUND'}")
    if not torch.cuda.is_available():
        print("no CUDA GPU here: the extension cannot be loaded (this check needs the GPU machine)")
        return NOT_APPLICABLE
    import capsnet_ext

    failures = []
    if spec is None or not spec.origin or not os.path.exists(spec.origin):
        failures.append("pip install did not build capsnet_ext._C (see install.log for setup.py's "
                        "reason: it skips the extension without a CUDA torch or nvcc)")
    reason = capsnet_ext.unavailable_reason("cuda", "cuda")
    print(f"unavailable_reason('cuda', 'cuda') = {reason!r}")
    if reason is not None:
        failures.append(f"the CUDA backend is unavailable: {reason}")
    try:
        from capsnet_ext.cuda_ops import _build
        print(f"ops loaded via: {_build.how_loaded()}")
    except Exception as exc:  # noqa: BLE001 - internal helper; the checks below decide
        print(f"(how the ops were loaded is not known: {exc})")
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("capsnet_ext::")]
    missing = [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")]
    print(f"registered ops: {len(names)}: {', '.join(sorted(names))}")
    if not names:
        failures.append("no capsnet_ext:: op is registered with the dispatcher")
    elif missing:
        # Ops without tensors of their own (none today) would have no CUDA kernel; any other
        # is a registration that did not happen.
        failures.append(f"ops registered without a CUDA kernel: {missing}")
    if reason is None:
        try:
            from capsnet_ext import reference
            g = torch.Generator().manual_seed(0)
            u = torch.randn(3, 7, 4, generator=g, dtype=torch.float64)
            W = torch.randn(7, 5, 6, 4, generator=g, dtype=torch.float64) * 0.5
            bias = torch.randn(5, 6, generator=g, dtype=torch.float64) * 0.1
            ref = reference.capsule_routing(u, W, 3, bias=bias)
            out = capsnet_ext.capsule_routing(u.cuda(), W.cuda(), 3, bias=bias.cuda(), backend="cuda")
            err = float((out.cpu() - ref).abs().max())
            print(f"capsule_routing(backend='cuda') float64 at [3, 7, 4] -> max abs error {err:.2e}")
            if not err < 1e-9:
                failures.append(f"a small capsule_routing call disagrees with the reference: {err:.2e}")
        except Exception as exc:  # noqa: BLE001
            failures.append(f"a small capsule_routing(backend='cuda') call failed: {type(exc).__name__}: {exc}")
    for line in failures:
        print(f"FAIL: {line}")
    if not failures:
        print("the CUDA extension is built, loaded, registered and runs")
    return 1 if failures else 0


# --------------------------------------------------------------------------- crash probes

# Small reproducers of the host crash of 2026-12-04 (a refused capsule_routing_forward on the
# CUDA backend killed its process with SIGSEGV instead of raising RuntimeError), each in its own
# process, all at once. Which of them crash tells the hypotheses apart:
#   torch-error             torch's own CUDA error: baseline, torch's exceptions after the
#                           extension is loaded
#   ext-error-cpu-tensors   the extension's CUDA kernel called (redispatch) with CPU tensors: its
#                           first check throws, through its frames only, with no device touched
#   ext-error-redispatch    CUDA tensors, wrong bias shape, straight to the CUDA kernel
#   ext-error-autograd      the same through the Python autograd registration (the GPU test's path)
#   ext-good-then-error     a successful call first, then the refused one
#   ext-error-cpp-stacktraces / ext-error-no-cpp-stacktraces
#                           the refused call with TORCH_SHOW_CPP_STACKTRACES=1 / =0 (torch's own
#                           unwinder captures the C++ stack of every c10::Error when it is 1)
# A crash in ext-error-cpu-tensors points at exception propagation through the library's own
# frames (its toolchain: see the compiler and runtime lines printed first); torch-error too
# points at the environment; only the CUDA-tensor probes crashing points at device state
# during the throw.
_PROBE_PRELUDE = r"""
import os, sys
import torch
from capsnet_ext.cuda_ops import _build
reason = _build.load()
if reason is not None:
    print("PROBE-RESULT unavailable:", reason, flush=True)
    sys.exit(3)
ops = torch.ops.capsnet_ext
CUDA = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
g = torch.Generator().manual_seed(0)
u, W, bias = torch.randn(2, 5, 3, generator=g), torch.randn(5, 3, 4, 3, generator=g), torch.randn(3, 4, generator=g)
uc, Wc, bc = u.cuda(), W.cuda(), bias.cuda()
torch.cuda.synchronize()
def attempt(fn):
    print("PROBE-CALL", flush=True)
    try:
        fn()
        torch.cuda.synchronize()
        print("PROBE-RESULT returned", flush=True)
    except Exception as exc:
        print(f"PROBE-RESULT raised {type(exc).__name__}: {str(exc).splitlines()[0]}", flush=True)
"""
CRASH_PROBES = {
    # name: (environment, code, what the result line must say)
    "torch-error": ({}, "attempt(lambda: torch.mm(torch.ones(2, 3, device='cuda'), torch.ones(2, 3, device='cuda')))",
                    "raised RuntimeError"),
    "ext-error-cpu-tensors": ({}, "attempt(lambda: ops.capsule_routing_forward.default.redispatch("
                                  "CUDA, u, W, None, None, 3, False, False, False, 1.0))", "must be a CUDA tensor"),
    "ext-error-redispatch": ({}, "attempt(lambda: ops.capsule_routing_forward.default.redispatch("
                                 "CUDA, uc, Wc, bc[:, :2], None, 3, False, False, False, 1.0))", "bias must have shape"),
    "ext-error-autograd": ({}, "attempt(lambda: ops.capsule_routing_forward(uc, Wc, bc[:, :2], None, 3, False, False, "
                               "False, 1.0))", "bias must have shape"),
    "ext-good-then-error": ({}, "ops.capsule_routing_forward(uc, Wc, bc, None, 3, False, False, False, 1.0)\n"
                                "attempt(lambda: ops.capsule_routing_forward(uc, Wc, bc[:, :2], None, 3, False, False, "
                                "False, 1.0))", "bias must have shape"),
    "ext-error-cpp-stacktraces": ({"TORCH_SHOW_CPP_STACKTRACES": "1"},
                                  "attempt(lambda: ops.capsule_routing_forward(uc, Wc, bc[:, :2], None, 3, False, "
                                  "False, False, 1.0))", "bias must have shape"),
    "ext-error-no-cpp-stacktraces": ({"TORCH_SHOW_CPP_STACKTRACES": "0"},
                                     "attempt(lambda: ops.capsule_routing_forward(uc, Wc, bc[:, :2], None, 3, False, "
                                     "False, False, 1.0))", "bias must have shape"),
}


def _toolchain_lines() -> List[str]:
    """The compiler that built capsnet_ext._C and the runtime it loads against (for the
    toolchain hypothesis of the host crash)."""
    import importlib.util

    lines = []
    spec = importlib.util.find_spec("capsnet_ext._C")
    lib = spec.origin if spec and spec.origin and os.path.exists(spec.origin) else None
    lines.append(f"library: {lib}")
    try:
        from torch.utils import cpp_extension
        cxx = cpp_extension.get_cxx_compiler()
        lines.append(f"torch's C++ compiler: {cxx}: {(_cmd(cxx, '--version') or '?').splitlines()[0]}")
    except Exception as exc:  # noqa: BLE001 - a diagnostic
        lines.append(f"torch's C++ compiler: unknown ({exc})")
    for var in ("TORCH_SHOW_CPP_STACKTRACES", "LD_LIBRARY_PATH", "LD_PRELOAD", "CXX", "CC"):
        lines.append(f"{var}={os.environ.get(var, '')}")
    if lib:
        comment = _cmd("readelf", "-p", ".comment", lib) or ""
        lines.append("compilers recorded in the library: " + "; ".join(
            sorted({m.strip() for m in re.findall(r"\]\s+(.*)", comment)})))
        dynamic = _cmd("readelf", "-d", lib) or ""
        lines.append("NEEDED: " + ", ".join(re.findall(r"Shared library: \[(.*?)\]", dynamic)))
        lines.append("RUNPATH/RPATH: " + ", ".join(re.findall(r"R(?:UN)?PATH\).*?\[(.*?)\]", dynamic)))
        # Functions (not the usual DW.ref.__gxx_personality_v0 data reference) of the unwinder or
        # the C++ runtime defined in the library itself.
        symbols = [line.split() for line in (_cmd("nm", "--defined-only", lib) or "").splitlines()]
        own = sorted({f[2] for f in symbols if len(f) == 3 and f[1] in "Tt" and re.fullmatch(
            r"_Unwind_\w+|__gxx_personality_v0|__cxa_throw|__cxa_begin_catch", f[2])})
        lines.append("C++ runtime or unwinder defined inside the library (a private static copy): "
                     + (", ".join(own) if own else "none"))
        lines.append("ldd: " + " ".join((_cmd("ldd", lib) or "?").split()))
    return lines


def crash_probe(results: Optional[str] = None, timeout: float = 120) -> int:
    """Runs CRASH_PROBES, all at once, each in its own interpreter (with whatever LD_PRELOAD
    the caller set: the GPU check preloads benchmarks/segv_trace.c); prints one line per probe
    and the output of each probe that did not end as expected. Exit 1 when any did not."""
    for line in _toolchain_lines():
        print(f"toolchain: {line}", flush=True)
    procs = {}
    for name, (env_extra, code, _) in CRASH_PROBES.items():
        # No faulthandler: the preloaded tracer then handles the fault itself and prints the
        # faulting pc and address (behind faulthandler it sees only faulthandler's raise()).
        env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
        env.update(CAPSNET_EXT_CUDA_UNVERIFIED="1", **env_extra)
        procs[name] = subprocess.Popen([sys.executable, "-c", _PROBE_PRELUDE + code], cwd=REPO_ROOT, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    failed = 0
    for name, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        expected = CRASH_PROBES[name][2]
        results_lines = [line for line in out.splitlines() if line.startswith("PROBE-RESULT")]
        if proc.returncode is not None and proc.returncode < 0:
            verdict = f"CRASHED with signal {-proc.returncode}" + (
                " during the call" if "PROBE-CALL" in out else " before the call")
        elif results_lines and expected in results_lines[-1] and proc.returncode == 0:
            verdict = "ok: " + results_lines[-1][len("PROBE-RESULT "):]
        else:
            verdict = f"UNEXPECTED (exit {proc.returncode}): " + (results_lines[-1] if results_lines else "no result")
        print(f"probe {name}: {verdict}", flush=True)
        if not verdict.startswith("ok"):
            failed = 1
            print(f"---- output of probe {name} (last 150 lines) ----")
            print("\n".join(out.splitlines()[-150:]))
            print(f"---- end of probe {name} ----", flush=True)
        if results:
            with open(os.path.join(results, f"crash-probe-{name}.log"), "w") as f:
                f.write(out)
    return failed


# --------------------------------------------------------------------------- verdict

def read_steps(results: str) -> List[Dict[str, object]]:
    """``steps.tsv``: step, status, exit code, seconds, budget, note (one line per step)."""
    steps = []
    path = os.path.join(results, "steps.tsv")
    if not os.path.exists(path):
        return steps
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 5 or parts[0] == "step":
                continue
            name, status, rc, seconds, budget = parts[:5]
            steps.append(dict(step=name, status=status, rc=int(rc) if rc.lstrip("-").isdigit() else None,
                              seconds=float(seconds) if seconds else None,
                              budget=int(budget) if budget.isdigit() else None,
                              note=parts[5] if len(parts) > 5 else ""))
    return steps


def junit_groups(path: str) -> Dict[str, Dict[str, object]]:
    """Per group (``cuda``, ``triton``, ``shared``): tests, failed, errors, skipped, and the
    ids of the failed and skipped tests."""
    groups = {g: dict(tests=0, failed=0, errors=0, skipped=0, failed_ids=[], skipped_ids=[])
              for g in ("cuda", "triton", "shared")}
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        module = (case.get("classname") or "").split(".")
        group = "shared"
        for part in module:
            for prefix, owner in TEST_GROUPS.items():
                if part.startswith(prefix):  # test_cuda.py, test_cuda_ops.py, ...
                    group = owner
        g = groups[group]
        g["tests"] += 1
        test_id = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None:
            g["failed"] += 1
            g["failed_ids"].append(test_id)
        elif case.find("error") is not None:
            g["errors"] += 1
            g["failed_ids"].append(test_id)
        elif case.find("skipped") is not None:
            g["skipped"] += 1
            reason = case.find("skipped").get("message") or ""
            g["skipped_ids"].append(f"{test_id}: {reason[:200]}")
    return groups


_REPORT_HEAD = re.compile(r"^========= (?! )(?P<text>\S.*)$")
_NOT_A_REPORT = re.compile(r"COMPUTE-SANITIZER|ERROR SUMMARY|RACECHECK SUMMARY|LEAK SUMMARY|"
                           r"Target application returned|This tool is deprecated|No errors|"
                           r"^Note:|^Internal Sanitizer Note")


def sanitizer_reports(log_text: str) -> Dict[str, Dict[str, List[str]]]:
    """Report heads of a compute-sanitizer log, by the backend whose marker frame they fall in
    (``"unattributed"`` outside every frame): ``{backend: {"errors": [...], "warnings": [...]}}``."""
    found: Dict[str, Dict[str, List[str]]] = {}
    current = "unattributed"
    for line in log_text.splitlines():
        if line.startswith(MARKER):
            m = re.search(r"(begin|end) backend=(\S+)", line)
            if m:
                current = m.group(2) if m.group(1) == "begin" else "unattributed"
            continue
        m = _REPORT_HEAD.match(line)
        if not m or _NOT_A_REPORT.search(m.group("text")):
            continue
        kind = "warnings" if m.group("text").lower().startswith("warning") else "errors"
        found.setdefault(current, dict(errors=[], warnings=[]))[kind].append(m.group("text")[:300])
    return found


def _bench_payloads(results: str) -> List[dict]:
    payloads = []
    for path in sorted(glob.glob(os.path.join(results, "bench", "*.json"))):
        try:
            with open(path) as f:
                payload = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(payload, dict) and "results" in payload and "meta" in payload:
            payload["_file"] = os.path.relpath(path, results)
            payloads.append(payload)
    return payloads


def evaluate(results: str) -> Dict[str, object]:
    """The verdict of a results folder: per kernel backend, whether every verification step
    passed on this GPU, and if not, each failure by name."""
    env = {}
    env_path = os.path.join(results, "env.json")
    if os.path.exists(env_path):
        with open(env_path) as f:
            env = json.load(f)
    steps = read_steps(results)
    by_name = {s["step"]: s for s in steps}
    dry_run = env.get("mode") == "dry-run"
    failures: Dict[str, List[str]] = {b: [] for b in KERNEL_BACKENDS}
    notes: Dict[str, List[str]] = {b: [] for b in KERNEL_BACKENDS}

    def step_ok(backend: str, name: str) -> Optional[dict]:
        s = by_name.get(name)
        if s is None:
            failures[backend].append(f"{name}: did not run")
            return None
        return s

    for backend in KERNEL_BACKENDS:
        for name in ("install", "extension"):
            if name in VERIFICATION_STEPS[backend]:
                s = step_ok(backend, name)
                if s and s["status"] != "pass":
                    failures[backend].append(f"{name}: {s['status']} {s['note']}".strip())

    # GPU tests: attributed per test file.
    tests = by_name.get("gpu-tests")
    junit = os.path.join(results, "gpu-tests.xml")
    groups = junit_groups(junit) if os.path.exists(junit) else None
    for backend in KERNEL_BACKENDS:
        if tests is None:
            failures[backend].append("gpu-tests: did not run")
            continue
        if tests["status"] == "TIMEOUT":
            failures[backend].append(f"gpu-tests: timed out after {tests['seconds']} s (incomplete)")
            continue
        if groups is None:
            failures[backend].append(f"gpu-tests: {tests['status']}, no JUnit report")
            continue
        own, shared = groups[backend], groups["shared"]
        if own["tests"] == 0:
            failures[backend].append(f"gpu-tests: no GPU test of the {backend} backend ran")
        bad = own["failed_ids"] + shared["failed_ids"]
        if bad:
            failures[backend].append(f"gpu-tests: {len(bad)} failed: " + "; ".join(bad[:5])
                                     + (" ..." if len(bad) > 5 else ""))
        if own["skipped"]:
            failures[backend].append(f"gpu-tests: {own['skipped']} skipped: " + "; ".join(own["skipped_ids"][:3]))
        if own["tests"] and not bad and not own["skipped"]:
            notes[backend].append(f"gpu-tests: {own['tests']} own + {shared['tests']} shared GPU tests passed")

    # Sanitizers: the tool's exit status, its reports by marker frame, and the driver's JSON.
    for tool in SANITIZER_TOOLS:
        s = by_name.get(tool)
        log_path = os.path.join(results, "logs", f"{tool}.log")
        driver_path = os.path.join(results, f"sanitize-{tool}.json")
        reports = {}
        if os.path.exists(log_path):
            with open(log_path, errors="replace") as f:
                reports = sanitizer_reports(f.read())
        driver = {}
        if os.path.exists(driver_path):
            with open(driver_path) as f:
                driver = {b["backend"]: b for b in json.load(f).get("backends", [])}
        for backend in KERNEL_BACKENDS:
            if s is None:
                failures[backend].append(f"{tool}: did not run")
                continue
            if s["status"] == "TIMEOUT":
                failures[backend].append(f"{tool}: timed out after {s['seconds']} s")
                continue
            mine = reports.get(backend, {}).get("errors", []) + reports.get("unattributed", {}).get("errors", [])
            if mine:
                failures[backend].append(f"{tool}: {len(mine)} report(s), first: {mine[0]}")
            d = driver.get(backend)
            if d is None:
                failures[backend].append(f"{tool}: the driver left no record for {backend} ({s['status']})")
            elif d.get("status") != "pass":
                why = d.get("reason") or "; ".join((d.get("errors") or [])[:2] + (d.get("nonfinite") or [])[:2])
                failures[backend].append(f"{tool}: driver {d.get('status')}: {why}"[:400])
            elif not d.get("calls"):
                failures[backend].append(f"{tool}: no call ran")
            elif s["status"] != "pass":
                # The tool or the driver failed: blame this backend unless a report or another
                # backend's failed driver run explains it.
                explained = any(r.get("errors") for r in reports.values()) or any(
                    o.get("status") != "pass" for b, o in driver.items() if b != backend)
                if not explained:
                    failures[backend].append(f"{tool}: {s['status']} (exit {s['rc']}) without a report; "
                                             f"see logs/{tool}.log")
            warnings = reports.get(backend, {}).get("warnings", [])
            if warnings:
                notes[backend].append(f"{tool}: {len(warnings)} warning(s), first: {warnings[0]}")
            if d and d.get("unsupported") and tool == "memcheck":
                n = sum(d["unsupported"].values())
                notes[backend].append(f"sanitizers: {n} case(s) unsupported by the backend, not exercised: "
                                      + "; ".join(list(d["unsupported"])[:2])[:200])

    # The benchmark's correctness gate.
    payloads = _bench_payloads(results)
    for backend in KERNEL_BACKENDS:
        for payload in payloads:
            bad = [r for r in payload["results"] if r.get("contender") == backend
                   and r.get("status") in ("wrong", "error")]
            if bad:
                r = bad[0]
                failures[backend].append(
                    f"benchmark ({payload['_file']}): {len(bad)} {r['status']}, first: {r['op']} {r['dtype']} "
                    f"{r['mode']} {r['shape']}: {(r.get('reason') or '')[:200]}")

    backends = {}
    for backend in KERNEL_BACKENDS:
        passed = not dry_run and not failures[backend]
        backends[backend] = dict(verified=passed, failures=failures[backend], notes=notes[backend])
    return dict(dry_run=dry_run, env=env, steps=steps, backends=backends,
                bench_files=[p["_file"] for p in payloads], junit=groups)


# --------------------------------------------------------------------------- summary

def _fmt_us(t: Optional[dict]) -> str:
    if not t or t.get("median") is None:
        return "-"
    med = t["median"]
    spread = ""
    if t.get("p20") is not None and t.get("p80") is not None and med:
        spread = f" ±{100 * (t['p80'] - t['p20']) / 2 / med:.0f}%"
    return (f"{med * 1e6:.0f} µs" if med < 1e-2 else f"{med * 1e3:.1f} ms") + spread


def _base_records(payloads: Sequence[dict]) -> List[dict]:
    """The records at the MNIST shape, or (a dry run's tiny shape) those of explicit shapes."""
    records = [r for p in payloads for r in p["results"]]
    mnist = [r for r in records if "mnist" in r.get("sweeps", [])]
    return mnist or [r for r in records if "custom" in r.get("sweeps", [])]


def _mnist_table(payloads: Sequence[dict]) -> List[str]:
    rows: Dict[tuple, Dict[str, str]] = {}
    contenders: List[str] = []
    for r in _base_records(payloads):
        if r["contender"] not in contenders:
            contenders.append(r["contender"])
        cell = _fmt_us(r.get("time_s")) if r["status"] == "ok" else r["status"]
        if r["status"] == "ok" and r.get("peak_bytes"):
            cell += f", {r['peak_bytes'] / 2 ** 20:.0f} MiB"
        rows.setdefault((r["op"], r["dtype"], r["mode"]), {})[r["contender"]] = cell
    if not rows:
        return ["(no timing)"]
    lines = ["| op | dtype | mode | " + " | ".join(contenders) + " |",
             "|" + " --- |" * (3 + len(contenders))]
    for (op, dtype, mode), cells in sorted(rows.items()):
        lines.append(f"| {op} | {dtype} | {mode} | " + " | ".join(cells.get(c, "-") for c in contenders) + " |")
    return lines


def _e2e_lines(payloads: Sequence[dict]) -> List[str]:
    lines = []
    for payload in payloads:
        for r in payload.get("end_to_end") or []:
            how = "compiled" if r["compiled"] else "eager"
            if r["status"] == "ok":
                peak = f", peak {r['peak_bytes'] / 2 ** 20:.0f} MiB" if r.get("peak_bytes") else ""
                lines.append(f"- {r['backend']} {how} {r['precision']} batch {r['batch']}: "
                             f"{1e3 / r['steps_per_s']:.1f} ms/step ({r['images_per_s']:.0f} images/s{peak})")
            else:
                lines.append(f"- {r['backend']} {how} {r['precision']}: {r['status']}: {(r['reason'] or '')[:120]}")
    return lines


def render_summary(verdict: Dict[str, object], results: str) -> str:
    env = verdict["env"]
    gpu = env.get("gpu") or {}
    title = "GPU check (dry run: nothing ran on a GPU)" if verdict["dry_run"] else "GPU check"
    lines = [f"# {title}", ""]
    # First, per backend: verified or not, and the first cause.
    for backend, v in verdict["backends"].items():
        if verdict["dry_run"]:
            lines.append(f"**{backend}**: not checked (dry run)  ")
        elif v["verified"]:
            lines.append(f"**{backend}**: verified (every verification step passed)  ")
        else:
            first = " ".join(str(v["failures"][0]).split())[:300] if v["failures"] else "no cause recorded"
            lines.append(f"**{backend}**: NOT verified; first cause: {first}  ")
    lines.append("")
    lines.append(f"- device: {gpu.get('name', 'no GPU')}"
                 + (f" (sm_{gpu['capability'].replace('.', '')}, {gpu['multiprocessors']} SMs)" if gpu else "")
                 + f"; driver/nvidia-smi: {env.get('nvidia_smi') or '-'}")
    lines.append(f"- torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), Triton {env.get('triton')}, "
                 f"Python {env.get('host', {}).get('python')}, {env.get('nvcc') or 'no nvcc'}, "
                 f"{env.get('compute_sanitizer') or 'no compute-sanitizer'}")
    lines.append(f"- commit {env.get('commit') or 'UNKNOWN'} ({env.get('commit_source')})"
                 + (" with uncommitted changes" if env.get("dirty") else "")
                 + f"; sources sha256 {str(env.get('source_digest'))[:16]}")
    lines.append(f"- date {env.get('date')}; results folder {os.path.basename(os.path.normpath(results))}")
    lines += ["", "## Steps", "", "| step | status | time | budget | note |", "| --- | --- | --- | --- | --- |"]
    total = 0.0
    budget_total = 0
    for s in verdict["steps"]:
        total += s["seconds"] or 0
        budget_total += s["budget"] or 0
        budget = "-" if s["budget"] is None else "time left" if s["budget"] == 0 else f"{s['budget']} s"
        lines.append(f"| {s['step']} | {s['status']} | {s['seconds'] if s['seconds'] is not None else '-'} s | "
                     f"{budget} | {s['note'][:140]} |")
    lines.append(f"| total | | {total:.0f} s | {budget_total} s | |")
    lines += ["", "## Verification", ""]
    for backend, v in verdict["backends"].items():
        if verdict["dry_run"]:
            state = "not checked (dry run)"
        else:
            state = "PASSED every verification step" if v["verified"] else "NOT verified"
        lines.append(f"- **{backend}**: {state}")
        if verdict["dry_run"]:
            continue
        for f in v["failures"][:8]:
            lines.append(f"  - {f}")
        for n in v["notes"][:4]:
            lines.append(f"  - note: {n}")
    payloads = _bench_payloads(results)
    base = _base_records(payloads)
    routing = [r for r in base if r["op"] != "predict"] or base
    shape = routing[0]["shape"] if routing else dict(B=128, I=1152, J=10, Din=8, Dout=16, iterations=3)
    lines += ["", "## Timings at " + ("the MNIST shape" if not base or "mnist" in base[0]["sweeps"] else "a tiny shape")
              + " ({}, bias)".format(", ".join(f"{k}={v}" for k, v in shape.items())), "",
              "Median with the 20th-80th percentile half-spread (CUDA events on a GPU), and the peak "
              "memory of one call.", ""]
    lines += _mnist_table(payloads)
    from . import gpu_profile

    profile_lines = gpu_profile.summarize(results)
    if profile_lines:
        lines += ["", "## Where the time goes (profile, ncu)", "",
                  "Per backend and dtype, capsule_routing forward+backward at the "
                  + ("MNIST shape" if not verdict["dry_run"] else "tiny CPU shape (the dry run's stand-in)")
                  + ": kernel time per call and the three most expensive kernels with their share, "
                  "launches per call and, where Nsight Compute ran, achieved occupancy and the top "
                  "stall reason. Full tables: `profile-torch.txt`, `ncu-*.csv`.", ""] + profile_lines
    e2e = _e2e_lines(payloads)
    if e2e:
        lines += ["", "## CapsNet training step", ""] + e2e
    plan = os.path.join(results, "plan.txt")
    if verdict["dry_run"] and os.path.exists(plan):
        with open(plan) as f:
            lines += ["", "## What runs on a GPU", "", "```", f.read().rstrip(), "```"]
    return "\n".join(lines) + "\n"


def summarize(results: str, out: Optional[str] = None) -> Dict[str, object]:
    verdict = evaluate(results)
    text = render_summary(verdict, results)
    for path in [os.path.join(results, "summary.md")] + ([out] if out else []):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    tmp = os.path.join(results, "verdict.json.tmp")
    with open(tmp, "w") as f:
        json.dump({k: v for k, v in verdict.items() if k != "env"}, f, indent=1)
    os.replace(tmp, os.path.join(results, "verdict.json"))
    return verdict


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("env", help="write RESULTS/env.json")
    e.add_argument("results")
    e.add_argument("--mode", choices=("gpu", "dry-run"), default="gpu")
    x = sub.add_parser("extension", help="check that the CUDA extension is built, loaded and registered")
    x.add_argument("results", nargs="?")
    s = sub.add_parser("summarize", help="write RESULTS/summary.md and RESULTS/verdict.json")
    s.add_argument("results")
    s.add_argument("--out", default=None, help="also write the summary here")
    c = sub.add_parser("crash-probe", help="run the host-crash reproducers, each in its own process")
    c.add_argument("results", nargs="?", help="also write each probe's output here")
    d = sub.add_parser("digest", help="print the source digest of this checkout")
    d.add_argument("root", nargs="?", default=REPO_ROOT)
    args = p.parse_args(argv)
    if args.command == "env":
        env = environment(args.mode)
        path = os.path.join(args.results, "env.json")
        with open(path + ".tmp", "w") as f:
            json.dump(env, f, indent=1)
        os.replace(path + ".tmp", path)
        print(json.dumps(env, indent=1))
        if not env.get("commit"):
            print("WARNING: the commit is unknown; pass COMMIT=<hash> (see the README)")
        return 0
    if args.command == "extension":
        return check_extension()
    if args.command == "crash-probe":
        return crash_probe(args.results)
    if args.command == "digest":
        print(source_digest(args.root))
        return 0
    verdict = summarize(args.results, args.out)
    for backend, v in verdict["backends"].items():
        print(f"{backend}: " + ("dry run" if verdict["dry_run"] else "verified" if v["verified"]
                               else "NOT verified: " + "; ".join(v["failures"][:3])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
