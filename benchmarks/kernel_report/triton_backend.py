"""Static report of the Triton backend: record the launches (:mod:`.triton_launches`),
compile every distinct kernel variant ahead of time for the target GPU with Triton's own
compiler, read registers, spills, shared memory and SASS, and count per-line executions of a
few programs of every launch in the interpreter (:mod:`.triton_profile`, a subprocess)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

from .gpus import GPUSpec
from .triton_launches import Launch, record_op


def _file_hash(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()[:16]


_PROFILER_HASH = _file_hash(os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_profile.py"))


def _sample_programs(grid: List[int], samples: int) -> List[List[int]]:
    """The first and last program (and evenly spaced ones between when ``samples > 2``):
    edge programs are where partial tiles and shorter ranges show up."""
    total = grid[0] * grid[1] * grid[2]
    picks = sorted({round(k * (total - 1) / max(1, samples - 1)) for k in range(samples)}) if samples > 1 else [0]
    out = []
    for linear in picks:
        x = linear % grid[0]
        y = (linear // grid[0]) % grid[1]
        z = linear // (grid[0] * grid[1])
        out.append([x, y, z])
    return out


def _hash(*parts) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:24]


# Bumped when the cached metadata gains a field.
_META_VERSION = 3
_DOT = re.compile(r"tt\.dot [^\n]*?: tensor<([0-9x]+)x(\w+)(?:,[^>]*)?> \* tensor<([0-9x]+)x\w+(?:,[^>]*)?> -> "
                  r"tensor<([0-9x]+)x(\w+)")


def dot_shapes(ir: str) -> List[dict]:
    """Every ``tt.dot`` of a kernel's Triton IR: operand shapes ``a`` and ``b``, the operand
    and result element types, and ``m``, ``n``, ``k`` (the last two axes; a leading axis is the
    batch)."""
    out = []
    for a, a_type, b, c, c_type in _DOT.findall(ir):
        a_shape = [int(x) for x in a.split("x")]
        b_shape = [int(x) for x in b.split("x")]
        out.append(dict(a=a_shape, b=b_shape, operand=a_type, result=c_type,
                        m=a_shape[-2], k=a_shape[-1], n=b_shape[-1]))
    return out


def compile_variant(launch: Launch, gpu: GPUSpec, cache_dir: str) -> dict:
    """Compile one kernel variant for ``gpu`` (cached by Triton's source hash of the kernel and
    everything the variant is specialised on); returns paths and compiler metadata."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    key = _hash(launch.kernel.cache_key, launch.variant_key(), gpu.arch, triton.__version__,
                os.environ.get("TRITON_DEFAULT_FP_FUSION"), _META_VERSION)
    folder = os.path.join(cache_dir, "triton", f"sm{gpu.arch}")
    os.makedirs(folder, exist_ok=True)
    cubin = os.path.join(folder, f"{launch.name}-{key}.cubin")
    meta_path = cubin[:-len(".cubin")] + ".json"
    if os.path.exists(cubin) and os.path.exists(meta_path):
        return dict(json.load(open(meta_path)), cubin=cubin, cached=True)
    signature, constexprs, attrs, options = launch.compile_inputs
    start = time.time()
    kernel = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs),
                            target=GPUTarget("cuda", gpu.arch, 32), options=options.__dict__)
    meta = dict(function=kernel.metadata.name, shared_bytes_compiler=int(kernel.metadata.shared),
                num_warps=int(kernel.metadata.num_warps), compile_seconds=round(time.time() - start, 2),
                target=f"sm_{gpu.arch}", triton=triton.__version__,
                dots=dot_shapes(kernel.asm.get("ttir", "")))
    _write_bytes(cubin[:-len(".cubin")] + ".ptx", kernel.asm["ptx"].encode())
    _write_bytes(cubin, kernel.asm["cubin"])
    _write_bytes(meta_path, json.dumps(meta).encode())
    return dict(meta, cubin=cubin, cached=False)


def ptxas_spills(cubin: str, gpu: GPUSpec) -> dict:
    """``ptxas -v``'s stack frame and spill store/load bytes of a compiled variant, from its
    saved PTX, assembled again as Triton assembles it (Triton's own ptxas, ``-lineinfo``,
    ``--gpu-name`` of the target). The stack frame that ``cuobjdump`` reports also holds
    non-spill uses (calls to integer-division routines, say); the spill bytes do not."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    from .sass import ptxas_spills as parse

    ptx = cubin[:-len(".cubin")] + ".ptx"
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([get_ptxas(gpu.arch).path, "-lineinfo", "-v",
                               f"--gpu-name={sm_arch_from_capability(gpu.arch)}", ptx,
                               "-o", os.path.join(tmp, "out.cubin")], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed on {ptx}: {proc.stderr[-500:]}")
    found = parse(proc.stdout + proc.stderr)
    if len(found) != 1:
        raise RuntimeError(f"ptxas -v reported {len(found)} functions for {ptx}")
    return next(iter(found.values()))


def _write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def profile_launches(launches: Dict[str, Launch], samples: int, cache_dir: str) -> Dict[str, dict]:
    """Per profile key: line counts per program and the arguments accessed (interpreter)."""
    results, jobs = {}, {}
    folder = os.path.join(cache_dir, "triton-profiles")
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for key, launch in launches.items():
        path = os.path.join(folder, _hash(launch.kernel.cache_key, key, samples, _PROFILER_HASH) + ".json")
        paths[key] = path
        if os.path.exists(path):
            results[key] = dict(json.load(open(path)), cached=True)
            continue
        jobs[key] = dict(module=launch.module, name=launch.name, grid=launch.grid, num_warps=launch.num_warps,
                         args=[dataclasses.asdict(a) for a in launch.args],
                         samples=_sample_programs(launch.grid, samples))
    if jobs:
        with tempfile.TemporaryDirectory() as tmp:
            jobs_path, out_path = os.path.join(tmp, "jobs.json"), os.path.join(tmp, "out.json")
            json.dump(jobs, open(jobs_path, "w"))
            env = dict(os.environ, TRITON_INTERPRET="1")
            root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
            proc = subprocess.run([sys.executable, "-m", "benchmarks.kernel_report.triton_profile", jobs_path, out_path],
                                  capture_output=True, text=True, env=env, cwd=root)
            if proc.returncode != 0 or not os.path.exists(out_path):
                err = f"interpreter worker failed ({proc.returncode}): {proc.stderr[-1500:]}"
                for key in jobs:
                    results[key] = dict(error=err)
                return results
            out = json.load(open(out_path))
        for key, value in out.items():
            results[key] = value
            if "error" not in value:
                _write_bytes(paths[key], json.dumps(value).encode())
    return results


def accessed_bytes(launch: Launch, accessed: Dict[str, str]) -> int:
    """Bytes of the argument views the kernel loaded from or stored to, overlapping views of
    one buffer counted once."""
    intervals: Dict[int, List[tuple]] = {}
    for index_s in accessed:
        spec = launch.args[int(index_s)]
        if spec.kind != "tensor" or spec.view_bytes == 0:
            continue
        itemsize = spec.view_bytes // (1 + sum((s - 1) * abs(st) for s, st in zip(spec.shape, spec.stride)))
        start = spec.storage_offset * itemsize
        intervals.setdefault(spec.storage_id, []).append((start, start + spec.view_bytes))
    total = 0
    for spans in intervals.values():
        spans.sort()
        cur_lo, cur_hi = spans[0]
        for lo, hi in spans[1:]:
            if lo > cur_hi:
                total += cur_hi - cur_lo
                cur_lo, cur_hi = lo, hi
            else:
                cur_hi = max(cur_hi, hi)
        total += cur_hi - cur_lo
    return total


def variant_label(launch: Launch) -> str:
    flags = [k for k, v in launch.constexprs.items() if v is True]
    return f"{launch.name}[{','.join(flags)}]" if flags else launch.name


def analyse(op: str, shape: dict, dtype, iterations: int, bias: bool, gpu: GPUSpec, cache_dir: str,
            samples: int = 2, profile: bool = True) -> dict:
    """Everything the report needs about the Triton backend, or ``status`` saying why not."""
    from .common import kernel_stats, launch_metrics

    try:
        import triton  # noqa: F401
    except Exception as exc:
        return dict(status=f"not recordable: triton is not importable ({exc})")
    try:
        recording = record_op("triton", op, shape, dtype, iterations, bias, gpu)
    except Exception as exc:
        return dict(status=f"not recordable: the op failed under the simulated {gpu.name} "
                           f"({type(exc).__name__}: {str(exc)[:400]})")
    if not recording.launches:
        return dict(status="not recordable: the op launched no Triton kernel")

    variants: Dict[str, dict] = {}
    variant_of: List[str] = []
    notes = []
    for launch in recording.launches:
        vkey = launch.variant_key()
        if vkey not in variants:
            vid = f"T{len(variants) + 1}"
            entry = dict(id=vid, label=variant_label(launch), kernel=launch.name, module=launch.module,
                         num_warps=launch.num_warps, num_stages=launch.num_stages, constexprs=launch.constexprs,
                         signature=launch.signature)
            try:
                compiled = compile_variant(launch, gpu, cache_dir)
                entry.update(kernel_stats(compiled["cubin"], compiled["function"]))
                entry["compile"] = {k: compiled[k] for k in ("compile_seconds", "cached", "target")}
                entry["shared_bytes"] = max(entry.get("shared_bytes", 0), compiled["shared_bytes_compiler"])
            except Exception as exc:
                entry["error"] = f"compile failed: {type(exc).__name__}: {str(exc)[:400]}"
            variants[vkey] = entry
        variant_of.append(vkey)
        if launch.autotune_configs > 1:
            notes.append(f"{launch.name} is autotuned over {launch.autotune_configs} configurations; "
                         "the first stands in (autotuning needs a GPU)")

    by_profile = {}
    for launch in recording.launches:
        by_profile.setdefault(launch.profile_key(), launch)
    start = time.time()
    profiles = profile_launches(by_profile, samples, cache_dir) if profile else {}
    profile_seconds = time.time() - start

    launches_out = []
    for launch, vkey in zip(recording.launches, variant_of):
        variant = variants[vkey]
        prof = profiles.get(launch.profile_key(), {})
        if prof.get("error"):
            notes.append(f"{launch.name}: interpreter profile failed: {prof['error'][:300]}")
        line_counts = prof.get("line_counts") if "error" not in prof else None
        bytes_moved = accessed_bytes(launch, prof["accessed"]) if prof.get("accessed") is not None else None
        row = dict(phase=launch.phase, kernel=launch.name, variant=variant["id"], label=variant["label"],
                   grid=launch.grid, blocks=launch.programs, threads_per_block=32 * launch.num_warps,
                   num_warps=launch.num_warps, num_stages=launch.num_stages,
                   arg_dtypes={a.name: a.dtype for a in launch.args if a.kind == "tensor"},
                   scalars={a.name: a.value for a in launch.args if a.kind == "scalar"},
                   profiled_programs=prof.get("programs_run"))
        row.update(launch_metrics(variant, gpu, launch.programs, 32 * launch.num_warps, line_counts,
                                  prof.get("source_file"), bytes_moved,
                                  statement_of_line=prof.get("statement_of_line")))
        launches_out.append(row)
    return dict(status="ok", launches=launches_out, variants=list(variants.values()),
                events=recording.events, notes=sorted(set(notes)),
                profile=dict(method="Triton interpreter, per-line counts of sampled programs",
                             samples_per_launch=samples, seconds=round(profile_seconds, 1)))
