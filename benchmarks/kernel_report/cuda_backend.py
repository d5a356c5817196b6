"""Static report of the CUDA backend (``csrc/``).

Launch plan: the real host launchers run in the CPU emulation build of ``csrc/`` (the kernel
sources compiled by g++ with ``-DCAPSNET_HOST_EMULATION``, ``csrc/emulation/driver.cpp`` as
the program, the problem given as ``meta.txt`` with the target's SM count), with
``cuda_recorder.h`` force-included: it logs every launch (kernel, grid, block, dynamic shared
memory, pointer arguments, host call stack) and memset instead of running them. Kernel names
come from the executable's symbol table; a launch made under a host function whose name says
``forward`` or ``backward`` is put in that phase.

Kernels: every ``csrc/*.cu`` compiled by nvcc to a cubin for the target (``-cubin -Xptxas -v``),
read like the Triton kernels. Line counts: a ``--coverage`` build of the same emulation runs
the first and last block of each launch and dumps gcov counts per launch; counts per thread
weight the SASS instructions (see :func:`.sass.dynamic_estimate`).

Nothing names a kernel of the package: the plan is whatever the launchers launch. The
driver's file protocol (``meta.txt`` keys, input file names) is the one tests/test_cuda.py
uses; if it changes, the backend is reported as not recordable with the driver's error.
"""
from __future__ import annotations

import bisect
import glob
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

from .common import kernel_stats, launch_metrics
from .gpus import GPUSpec
from .sass import find_tool, ptxas_spills

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")
RECORDER_FILES = [os.path.join(HERE, "cuda_recorder.h"), os.path.join(HERE, "cuda_recorder.cpp")]
# The flags torch's extension build passes to nvcc (as .ci/compile_cuda.sh does).
NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]


def _hash_files(paths: List[str], *extra) -> str:
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(path.encode())
        with open(path, "rb") as handle:
            h.update(handle.read())
    for e in extra:
        h.update(str(e).encode())
    return h.hexdigest()[:20]


def _csrc_files() -> List[str]:
    return sorted(p for p in glob.glob(os.path.join(CSRC, "**", "*"), recursive=True) if os.path.isfile(p))


def _kernel_sources() -> List[str]:
    return sorted(glob.glob(os.path.join(CSRC, "*.cu")))


def _tool_version(cmd: List[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    except Exception:
        return "unknown"


# ---------------------------------------------------------------------------------------------
# Emulation builds
# ---------------------------------------------------------------------------------------------
def build_emulation(kind: str, cache_dir: str) -> Tuple[str, str, List[str]]:
    """``(executable, object folder, skipped sources)`` of the recorder build (``"record"``) or
    the line-profile build (``"profile"``); cached by the hash of csrc/ and the recorder."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no host C++ compiler ({cxx})")
    flags = ["-std=c++20", "-pthread", "-no-pie", "-DCAPSNET_HOST_EMULATION", f"-I{CSRC}", f"-I{HERE}",
             "-include", os.path.join(HERE, "cuda_recorder.h"), "-w"]
    if kind == "profile":
        flags += ["-O0", "-DCAPSNET_REPORT_PROFILE", "--coverage", "-fprofile-update=single"]
    else:
        flags += ["-O0"]
    key = _hash_files(_csrc_files() + RECORDER_FILES, kind, flags, _tool_version([cxx, "--version"]))
    folder = os.path.join(cache_dir, "cuda-emulation", f"{kind}-{key}")
    exe = os.path.join(folder, "driver")
    skipped_path = os.path.join(folder, "skipped.json")
    if os.path.exists(exe) and os.path.exists(skipped_path):
        return exe, folder, json.load(open(skipped_path))
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    sources = _kernel_sources() + [os.path.join(CSRC, "emulation", "driver.cpp"),
                                   os.path.join(HERE, "cuda_recorder.cpp")]

    def compile_one(src):
        obj = os.path.join(folder, os.path.basename(src) + ".o")
        lang = ["-x", "c++"] if src.endswith(".cu") else []
        proc = subprocess.run([cxx, *flags, *lang, "-c", src, "-o", obj], capture_output=True, text=True)
        return src, obj, proc

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(compile_one, sources))
    objects, skipped = [], []
    for src, obj, proc in results:
        if proc.returncode == 0:
            objects.append(obj)
        elif src.endswith(".cu"):  # e.g. device queries that need the real CUDA runtime
            skipped.append(os.path.relpath(src, ROOT))
        else:
            raise RuntimeError(f"building {os.path.relpath(src, ROOT)} for the emulation failed: "
                               f"{proc.stderr[-1500:]}")
    link = [cxx, *[f for f in flags if f not in ("-include", os.path.join(HERE, "cuda_recorder.h"))],
            *objects, "-o", exe]
    proc = subprocess.run(link, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"linking the emulation driver failed: {proc.stderr[-1500:]}")
    json.dump(skipped, open(skipped_path, "w"))
    return exe, folder, skipped


def _symbols(exe: str) -> Tuple[List[int], List[str]]:
    out = subprocess.run(["nm", "-C", "--defined-only", exe], capture_output=True, text=True).stdout
    table = []
    for line in out.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[1] in "TtWw":
            table.append((int(parts[0], 16), parts[2]))
    table.sort()
    return [a for a, _ in table], [n for _, n in table]


def _function_name(demangled: str) -> str:
    """``ns::kernel<args>`` from a demangled symbol: no return type, no parameter list."""
    name = demangled.strip()
    if name.endswith(")"):
        depth = 0
        for k in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[k], 0)
            if depth == 0:
                name = name[:k]
                break
    if name.startswith("void "):
        name = name[5:]
    return re.sub(r"\s+", " ", name).strip()


def _short_name(name: str) -> str:
    """``routing_sweep_kernel<float, true, false>`` from the full name."""
    base = name
    depth = 0
    for k, ch in enumerate(name):
        depth += {"<": 1, ">": -1}.get(ch, 0)
        if ch == ":" and depth == 0 and k + 1 < len(name) and name[k + 1] == ":":
            base = name[k + 2:]
    return base.split("::")[-1] if "<" not in base else base


def write_problem(folder: str, op: str, shape: dict, dtype_name: str, iterations: int, bias: bool, sm_count: int) -> None:
    """The driver's problem folder: meta.txt and sparse (all-zero) input files large enough for
    every input the driver may read."""
    B, I, J, Din, Dout = shape["B"], shape["I"], shape["J"], shape["Din"], shape["Dout"]
    item = 8 if dtype_name == "float64" else 4
    fused = op != "dynamic_routing"
    meta = dict(op="predict" if op == "predict" else "routing", B=B, I=I, J=J, D=Dout, K=Din, R=iterations,
                fused=int(fused), leaky=0, detach_inner=0, bias=int(bias), return_coupling=0, prior=0,
                temperature=1.0,
                sm_count=sm_count, dtype=dtype_name)
    with open(os.path.join(folder, "meta.txt"), "w") as handle:
        handle.write("\n".join(f"{k} {v}" for k, v in meta.items()) + "\n")
    sizes = dict(u=B * I * Din, W=I * J * Dout * Din, u_hat=B * I * J * Dout, bias=J * Dout, prior=I * J, grad_v=B * J * Dout,
                 grad_u_hat=B * I * J * Dout)
    for name, n in sizes.items():
        with open(os.path.join(folder, f"{name}.bin"), "wb") as handle:
            handle.truncate(n * item)


def _hex(text: str) -> int:
    return 0 if text == "(nil)" else int(text, 16)


def parse_log(path: str, exe: str) -> List[dict]:
    """Launch and memset records with kernel names, phases and buffer extents."""
    addrs, names = _symbols(exe)

    def symbol_at(address: int) -> Optional[str]:
        k = bisect.bisect_right(addrs, address) - 1
        return names[k] if k >= 0 else None

    def phase_of(stack: List[int]) -> str:
        for a in stack:
            name = symbol_at(a - 1) or ""
            fn = _function_name(name).lower()
            if "backward" in fn:
                return "backward"
            if "forward" in fn:
                return "forward"
        return "unknown"

    allocs: List[Tuple[int, int]] = []
    events: List[dict] = []
    current = None
    for line in open(path):
        parts = line.split()
        if not parts:
            continue
        tag = parts[0]
        if tag == "alloc":
            allocs.append((_hex(parts[1]), int(parts[2])))
        elif tag == "launch":
            stack_at = parts.index("stack")
            kernel_addr = _hex(parts[1])
            full = _function_name(symbol_at(kernel_addr) or parts[1])
            current = dict(type="launch", kernel_full=full, kernel=_short_name(full),
                           grid=[int(x) for x in parts[2:5]], block=[int(x) for x in parts[5:8]],
                           dynamic_shared_bytes=int(parts[8]), phase=phase_of([_hex(a) for a in parts[stack_at + 1:]]),
                           pointers=[], allocs_snapshot=len(allocs))
            events.append(current)
        elif tag == "ptr" and current is not None:
            current["pointers"].append(_hex(parts[1]))
        elif tag == "end" and current is not None:
            current["threads_profiled"] = int(parts[1])
        elif tag == "profile" and current is not None:
            current["profile_dir"] = parts[1]
        elif tag == "memset":
            stack_at = parts.index("stack")
            events.append(dict(type="memset", bytes=int(parts[2]),
                               phase=phase_of([_hex(a) for a in parts[stack_at + 1:]])))
    for event in events:
        if event["type"] != "launch":
            continue
        spans: Dict[int, Tuple[int, int]] = {}
        live = allocs[:event.pop("allocs_snapshot")]
        for ptr in event.pop("pointers"):
            if ptr == 0:
                continue
            for base, size in reversed(live):
                if base <= ptr < base + size:
                    lo, hi = spans.get(base, (ptr, base + size))
                    spans[base] = (min(lo, ptr), hi)
                    break
        event["bytes"] = sum(hi - lo for lo, hi in spans.values()) if spans else None
    return events


def gcov_line_counts(profile_dir: str, object_dir: str) -> Dict[str, Dict[str, float]]:
    """``{source file: {line: count}}`` of one launch's gcov data."""
    for gcno in glob.glob(os.path.join(object_dir, "*.gcno")):
        shutil.copy(gcno, profile_dir)
    counts: Dict[str, Dict[str, float]] = {}
    for gcda in glob.glob(os.path.join(profile_dir, "*.gcda")):
        subprocess.run(["gcov", "-j", "-o", profile_dir, gcda], capture_output=True, text=True, cwd=profile_dir)
    for path in glob.glob(os.path.join(profile_dir, "*.gcov.json.gz")):
        data = json.load(gzip.open(path))
        for entry in data.get("files", []):
            file = os.path.realpath(os.path.join(data.get("current_working_directory", ""), entry["file"]))
            table = counts.setdefault(file, {})
            for line in entry.get("lines", []):
                key = str(line["line_number"])
                table[key] = table.get(key, 0) + line["count"]
    return counts


# ---------------------------------------------------------------------------------------------
# nvcc cubins
# ---------------------------------------------------------------------------------------------
def compile_cubins(gpu: GPUSpec, cache_dir: str) -> Dict[str, dict]:
    """Every csrc/*.cu compiled for ``gpu``: ``{source: {cubin, ptxas, error}}``."""
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not os.path.exists(nvcc) and shutil.which(nvcc) is None:
        raise RuntimeError("nvcc not found")
    flags = ["-std=c++17", "-O3", "-lineinfo", f"-I{CSRC}", *NVCC_DEFINES, "-cubin", f"-arch=sm_{gpu.arch}",
             "-Xptxas", "-v"]
    key = _hash_files(_csrc_files(), flags, _tool_version([nvcc, "--version"]))
    folder = os.path.join(cache_dir, "cuda-cubin", f"sm{gpu.arch}-{key}")
    os.makedirs(folder, exist_ok=True)

    def compile_one(src):
        cubin = os.path.join(folder, os.path.basename(src) + ".cubin")
        log = cubin + ".ptxas.txt"
        if os.path.exists(cubin) and os.path.exists(log):
            return src, dict(cubin=cubin, ptxas=open(log).read(), cached=True)
        start = time.time()
        proc = subprocess.run([nvcc, *flags, src, "-o", cubin + ".tmp"], capture_output=True, text=True)
        if proc.returncode != 0:
            return src, dict(error=proc.stderr[-1500:])
        os.replace(cubin + ".tmp", cubin)
        with open(log, "w") as handle:
            handle.write(proc.stdout + proc.stderr)
        return src, dict(cubin=cubin, ptxas=proc.stdout + proc.stderr, cached=False,
                         seconds=round(time.time() - start, 1))

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(compile_one, _kernel_sources()))


def _demangle(names: List[str]) -> Dict[str, str]:
    tool = shutil.which("c++filt") or find_tool("cu++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def _profile_run(pexe: str, pobj: str, op: str, shape: dict, dtype_name: str, iterations: int, bias: bool,
                 gpu: GPUSpec) -> dict:
    """Run the --coverage build: per launch, the kernel name, gcov line counts of its first
    and last block and the threads that ran."""
    with tempfile.TemporaryDirectory() as tmp:
        write_problem(tmp, op, shape, dtype_name, iterations, bias, gpu.sms)
        log = os.path.join(tmp, "profile.log")
        for stale in glob.glob(os.path.join(pobj, "*.gcda")):
            os.remove(stale)
        proc = subprocess.run([pexe, tmp], capture_output=True, text=True,
                              env=dict(os.environ, CAPSNET_REPORT_LOG=log, CAPSNET_REPORT_GCDA_SRC=pobj,
                                       CAPSNET_REPORT_GCDA_OUT=os.path.join(tmp, "gcda")))
        if proc.returncode != 0:
            raise RuntimeError(f"profile run failed ({proc.returncode}): {proc.stderr[-400:]}")
        launches = [e for e in parse_log(log, pexe) if e["type"] == "launch"]
        counts, threads = [], []
        for e in launches:
            if e.get("profile_dir") and e.get("threads_profiled"):
                counts.append(gcov_line_counts(e["profile_dir"], pobj))
                threads.append(e["threads_profiled"])
            else:
                counts.append(None)
                threads.append(0)
    return dict(kernels=[e["kernel_full"] for e in launches], counts=counts, threads=threads)


# ---------------------------------------------------------------------------------------------
# The analysis
# ---------------------------------------------------------------------------------------------
def analyse(op: str, shape: dict, dtype, iterations: int, bias: bool, gpu: GPUSpec, cache_dir: str,
            profile: bool = True) -> dict:
    """Everything the report needs about the CUDA backend, or ``status`` saying why not."""
    import torch

    dtype_name = str(dtype).replace("torch.", "")
    if dtype not in (torch.float32, torch.float64):
        return dict(status=f"not recordable: the CPU emulation of csrc/ runs float32 and float64 only "
                           f"(asked for {dtype_name})")
    if not os.path.isdir(CSRC) or not os.path.exists(os.path.join(CSRC, "emulation", "driver.cpp")):
        return dict(status="not recordable: csrc/emulation/driver.cpp is missing")
    notes = []
    try:
        exe, _, skipped = build_emulation("record", cache_dir)
    except Exception as exc:
        return dict(status=f"not recordable: {str(exc)[:600]}")
    if skipped:
        notes.append(f"not built for the emulation (no launches recorded from them): {', '.join(skipped)}")
    with tempfile.TemporaryDirectory() as tmp:
        write_problem(tmp, op, shape, dtype_name, iterations, bias, gpu.sms)
        log = os.path.join(tmp, "launches.log")
        proc = subprocess.run([exe, tmp], capture_output=True, text=True,
                              env=dict(os.environ, CAPSNET_REPORT_LOG=log))
        if proc.returncode != 0:
            return dict(status=f"not recordable: the emulation driver failed ({proc.returncode}): "
                               f"{proc.stderr[-600:]}")
        events = parse_log(log, exe)
    launches = [e for e in events if e["type"] == "launch"]
    if not launches:
        return dict(status="not recordable: the emulation driver launched no kernel")

    # Line counts: the --coverage build runs the first and last block of every launch.
    counts_per_launch: List[Optional[Dict[str, Dict[str, float]]]] = [None] * len(launches)
    threads_profiled = [0] * len(launches)
    profile_seconds = 0.0
    if profile:
        start = time.time()
        try:
            pexe, pobj, _ = build_emulation("profile", cache_dir)
            key = hashlib.sha256(json.dumps([os.path.basename(pobj), op, shape, dtype_name, iterations, bias,
                                             gpu.sms]).encode()).hexdigest()[:20]
            cached = os.path.join(cache_dir, "cuda-profiles", key + ".json")
            if os.path.exists(cached):
                saved = json.load(open(cached))
            else:
                saved = _profile_run(pexe, pobj, op, shape, dtype_name, iterations, bias, gpu)
                os.makedirs(os.path.dirname(cached), exist_ok=True)
                tmp_path = f"{cached}.tmp{os.getpid()}"
                json.dump(saved, open(tmp_path, "w"))
                os.replace(tmp_path, cached)
            if saved["kernels"] != [e["kernel_full"] for e in launches]:
                raise RuntimeError("the profile build launched a different sequence")
            counts_per_launch = saved["counts"]
            threads_profiled = saved["threads"]
        except Exception as exc:
            notes.append(f"no line counts ({type(exc).__name__}: {str(exc)[:300]}); static counts used")
        profile_seconds = time.time() - start

    try:
        cubins = compile_cubins(gpu, cache_dir)
    except Exception as exc:
        return dict(status=f"not recordable: {exc}")
    # Map each kernel (full name) to its cubin function.
    functions: Dict[str, Tuple[str, str, dict]] = {}
    for src, info in cubins.items():
        if "error" in info:
            notes.append(f"nvcc failed on {os.path.relpath(src, ROOT)}: {info['error'][:300]}")
            continue
        from .sass import resource_usage

        mangled = list(resource_usage(info["cubin"]))
        spills = ptxas_spills(info["ptxas"])
        for m, d in _demangle(mangled).items():
            functions[_function_name(d)] = (info["cubin"], m, spills, src)

    variants: Dict[str, dict] = {}
    launches_out = []
    for k, e in enumerate(launches):
        full = e["kernel_full"]
        if full not in variants:
            entry = dict(id=f"C{len(variants) + 1}", label=e["kernel"], kernel=e["kernel"], full_name=full)
            if full in functions:
                cubin, mangled, spills, src = functions[full]
                try:
                    entry.update(kernel_stats(cubin, mangled, spills))
                    entry["source"] = os.path.relpath(src, ROOT)
                except Exception as exc:
                    entry["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            else:
                entry["error"] = "no function of that name in the nvcc cubins"
            variants[full] = entry
        variant = variants[full]
        threads = e["block"][0] * e["block"][1] * e["block"][2]
        blocks = e["grid"][0] * e["grid"][1] * e["grid"][2]
        counts = None
        source_file = None
        if counts_per_launch[k] is not None and "source" in variant:
            source_file = os.path.realpath(os.path.join(ROOT, variant["source"]))
            per_file = counts_per_launch[k].get(source_file)
            if per_file:
                counts = {line: c / threads_profiled[k] for line, c in per_file.items()}
        row = dict(phase=e["phase"], kernel=e["kernel"], variant=variant["id"], label=variant["label"],
                   grid=e["grid"], blocks=blocks, threads_per_block=threads, num_warps=threads // 32,
                   num_stages=None, dynamic_shared_bytes=e["dynamic_shared_bytes"],
                   profiled_blocks=(threads_profiled[k] // threads) if threads else 0)
        row.update(launch_metrics(variant, gpu, blocks, threads, counts, source_file, e["bytes"],
                                  dynamic_shared_bytes=e["dynamic_shared_bytes"], method="line_floor"))
        launches_out.append(row)
    memsets = [dict(phase=e["phase"], op="cudaMemsetAsync", bytes=e["bytes"]) for e in events if e["type"] == "memset"]
    return dict(status="ok", launches=launches_out, variants=list(variants.values()), memsets=memsets,
                notes=notes + ["PyTorch ops of the C++ binding (allocations, fills) are not counted: the "
                               "extension cannot run without a GPU; cudaMemsetAsync calls of the launchers are"],
                profile=dict(method="gcov line counts of the first and last block of every launch in the CPU "
                                    "emulation (per-thread averages); dynamic count = one instruction per executed "
                                    "source line (a floor: nvcc versions and unrolls loops, so SASS loop bodies do "
                                    "not map to source iterations)", seconds=round(profile_seconds, 1)))
