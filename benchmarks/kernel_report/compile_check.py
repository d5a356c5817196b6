"""``python -m benchmarks.kernel_report.compile_check``: compile every Triton launch of the
package for a GPU, without a GPU, and fail on what the GPU would refuse or run badly.

The interpreter (the CPU tests' Triton) checks no compile rule, so kernels that pass every CPU
test can still fail to compile on a GPU: on 2026-12-04 Triton 3.6.0 (torch 2.11's pin) refused
the float32 ``capsule_routing`` sweeps (``tl.dot`` with K = 8 < 16) on an H200. This check
records the launches of forward and backward through the public API with the static kernel
report's recorder (:mod:`.triton_launches`: real argument binding and specialisation, no kernel
run) for

* every op of the Triton backend (``capsule_routing``, ``dynamic_routing``, ``predict``);
* the MNIST layer and odd shapes like the tests' (sizes 1, primes, ``Din`` of 1 to 16);
* every dtype the dispatch accepts (float16, bfloat16, float32 with exact ``"ieee"`` dots and
  with TF32 allowed, float64);
* every routing option (bias, leaky, detach_inner, return_coupling, prior, a temperature other
  than 1) at the MNIST shape with 1 to 4 iterations (4 is the first count with every backward
  variant): every option off, every option on (the most registers) and each option alone; the odd shapes with 1 and 4 iterations, every option off and on;

compiles each distinct kernel variant once with the installed Triton for the target (sm_90 by
default, with :func:`.triton_backend.compile_variant`, cached under ``.cache/kernel_report``)
and fails (exit status 1) on

* any compile error;
* any register spill (``ptxas -v`` spill stores or loads) at the register ceiling of the
  kernel's warp count, except in float64 (which exists for reference-grade checks, not speed)
  and at shapes whose register tile is larger than the MNIST layer's (``LARGE_TILE_SHAPES``);
  those spills, and the few bytes ptxas spills with registers to spare, are listed;
* more shared memory than one block may have on the target (227 KiB on sm_90: the H200
  refused a float64 sweep needing 288 KiB on 2026-12-04); calls the dispatch refuses up front
  (``unsupported_reason``) are recorded as refused, not compiled;
* any ``tl.dot`` with K < 16, M < 16 or N < 8 (the tensor cores' smallest K, M and N);
* any dot with float16 or bfloat16 operands, or float32 operands with TF32 allowed, whose
  kernel has no tensor-core instruction (HMMA/HGMMA) in its SASS.

The Triton version matters (3.6.0 refuses what 3.9 accepts): ``PINNED_TRITON`` is the version
the GPU machines and torch 2.11 use, which the project's environment installs; the report says
which version compiled.

    python -m benchmarks.kernel_report.compile_check            # everything, sm_90
    python -m benchmarks.kernel_report.compile_check --quick    # the MNIST shape only
    python -m benchmarks.kernel_report.compile_check --json out.json --jobs 2
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

# The version torch 2.11 pins and the GPU machines run; the project's environment installs it.
PINNED_TRITON = "3.6.0"
MNIST = dict(B=128, I=1152, J=10, Din=8, Dout=16)
# Odd shapes like the tests' (B, I, J, Din, Dout): sizes of 1, primes, Din from 1 to 16.
ODD_SHAPES = {
    "odd-3x7x3x5x3": dict(B=3, I=7, J=3, Din=5, Dout=3),
    "odd-33x9x3x3x4": dict(B=33, I=9, J=3, Din=3, Dout=4),
    "odd-2x1x1x1x1": dict(B=2, I=1, J=1, Din=1, Dout=1),
    "odd-5x13x17x16x7": dict(B=5, I=13, J=17, Din=16, Dout=7),
    # The GPU tests' largest capsules (J=17, Dout=24): float64 is refused there (shared memory).
    "odd-3x3x17x5x24": dict(B=3, I=3, J=17, Din=5, Dout=24),
}
# (dtype, float32 dot precision): what the dispatch accepts, float32 both ways.
DTYPES = (("float16", None), ("bfloat16", None), ("float32", "ieee"), ("float32", "tf32"),
          ("float64", None))
OPS = ("capsule_routing", "dynamic_routing", "predict")
DESIGNS = ("batched", "uhat")
BOOLEAN_OPTIONS = ("bias", "leaky", "detach_inner", "return_coupling", "prior", "temperature")
TEMPERATURE = 0.7
MIN_K, MIN_M, MIN_N = 16, 16, 8
# Shapes whose register tile is larger than the MNIST layer's (J = 17 pads to 32 output
# capsules: every [BLOCK_J, BB, ...] tile doubles): they compile and run, but the GEMM-tile
# design spills there at any warp count (the register file per block is fixed, and the tile
# already has the smallest M and K); their spills are listed, not failed.
LARGE_TILE_SHAPES = ("odd-5x13x17x16x7", "odd-3x3x17x5x24")
MMA_OPCODES = ("HMMA", "HGMMA")


@dataclass
class Case:
    op: str
    shape_name: str
    shape: dict
    dtype: str
    precision: Optional[str]
    iterations: int
    options: Dict[str, bool]
    # capsule_routing's kernel design (``Config.design`` of the Triton backend): both are
    # compiled, whichever the defaults or the tuning table pick.
    design: str = "batched"

    @property
    def label(self) -> str:
        flags = ",".join(k for k, v in self.options.items() if v) or "plain"
        prec = f"/{self.precision}" if self.precision else ""
        design = f" design={self.design}" if self.design != "batched" else ""
        return (f"{self.op} {self.shape_name} {self.dtype}{prec} R={self.iterations} "
                f"{flags}{design}")


@dataclass
class Variant:
    key: str
    launch: object
    dtype: str
    precision: Optional[str]
    shape_name: str = ""
    cases: List[str] = field(default_factory=list)
    result: dict = field(default_factory=dict)
    problems: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


def _option_sets(full: bool) -> List[Dict[str, bool]]:
    """Every option off, every option on (the most registers), and ``full``: each option
    alone."""
    off = dict.fromkeys(BOOLEAN_OPTIONS, False)
    on = dict.fromkeys(BOOLEAN_OPTIONS, True)
    sets = [off, on]
    if full:
        sets += [dict(off, **{name: True}) for name in BOOLEAN_OPTIONS]
    return sets


def cases(quick: bool = False) -> List[Case]:
    """Every call the check records, each in every dtype: the routing ops at the MNIST shape
    with 1-4 iterations and the full option sets; at the odd shapes with 1 and 4 iterations,
    every option off and every option on; ``predict`` at every shape."""
    shapes = {"mnist": MNIST, **({} if quick else ODD_SHAPES)}
    out = []
    for (name, shape), (dtype, precision) in itertools.product(shapes.items(), DTYPES):
        full = name == "mnist"
        for op in OPS:
            if op == "predict":
                out.append(Case(op, name, shape, dtype, precision, 1, {}))
                continue
            # TF32 runs the batched design whatever the configuration says (see Plan).
            designs = (DESIGNS if op == "capsule_routing" and precision != "tf32"
                       else ("batched",))
            for iterations, options, design in itertools.product(
                    (1, 2, 3, 4) if full else (1, 4), _option_sets(full), designs):
                out.append(Case(op, name, shape, dtype, precision, iterations, options, design))
    return out


REFUSED: List[str] = []  # cases the dispatch refuses before any launch (filled by record)


def _design(case: Case):
    """The Triton backend's default configuration of the case's ``design``, forced as the
    tuning sweep forces a candidate; nothing for the default design."""
    if case.design == "batched":
        return contextlib.nullcontext()
    import torch

    from capsnet_ext.triton_ops import _gemm_core, tuning

    s = case.shape
    config = _gemm_core.default_config(s["B"], s["I"], s["J"], s["Dout"], s["Din"],
                                       getattr(torch, case.dtype), case.precision,
                                       design=case.design)
    return tuning.forced(config)


def record(all_cases: Sequence[Case], gpu) -> Dict[str, Variant]:
    """Record every case's launches; distinct kernel variants with the cases that launch them."""
    import torch

    from ..floors import fp32_matmul_precision
    from .triton_launches import record_op

    from capsnet_ext import triton_ops

    variants: Dict[str, Variant] = {}
    REFUSED.clear()
    for case in all_cases:
        sizes = dict(J=case.shape["J"], Dout=case.shape["Dout"], Din=case.shape["Din"])
        reason = triton_ops.unsupported_reason(case.op, dtype=getattr(torch, case.dtype),
                                               sizes=sizes)
        if reason is not None:
            REFUSED.append(f"{case.label}: {reason}")
            continue
        options = dict(case.options)
        bias = options.pop("bias", False)
        if case.op != "predict":
            options["temperature"] = TEMPERATURE if options.pop("temperature") else 1.0
        precision = fp32_matmul_precision(case.precision) if case.precision else contextlib.nullcontext()
        with precision, _design(case):
            recording = record_op("triton", case.op, case.shape, getattr(torch, case.dtype),
                                  case.iterations, bias, gpu, options if case.op != "predict" else None)
        for launch in recording.launches:
            key = launch.variant_key()
            if key not in variants:
                variants[key] = Variant(key, launch, case.dtype, launch.constexprs.get("PRECISION"),
                                        case.shape_name)
            variants[key].cases.append(case.label)
    return variants


_JOBS: List[Variant] = []


def _compile_one(args):
    index, gpu, cache_dir = args
    from .common import kernel_stats
    from .triton_backend import compile_variant, ptxas_spills

    variant = _JOBS[index]
    try:
        compiled = compile_variant(variant.launch, gpu, cache_dir)
        stats = kernel_stats(compiled["cubin"], compiled["function"])
        spills = dict(spill_store_bytes=0, spill_load_bytes=0)
        if stats["stack_bytes"] or stats["local_bytes"]:
            spills = ptxas_spills(compiled["cubin"], gpu)
    except Exception as exc:
        return dict(error=f"{type(exc).__name__}: {str(exc)[:600]}")
    opcodes = stats["static_mix"]["by_opcode"]
    return dict(function=compiled["function"], registers=stats["registers"],
                stack_bytes=stats["stack_bytes"], local_bytes=stats["local_bytes"],
                spill_store_bytes=spills["spill_store_bytes"], spill_load_bytes=spills["spill_load_bytes"],
                dots=compiled.get("dots", []), compile_seconds=compiled.get("compile_seconds"),
                cached=compiled.get("cached", False),
                shared_bytes=compiled.get("shared_bytes_compiler"),
                mma={op: n for op, n in opcodes.items() if op.split(".")[0].endswith("MMA")})


def compile_all(variants: Dict[str, Variant], gpu, cache_dir: str, jobs: int) -> None:
    """Compile every variant (``jobs`` processes, forked so the recorded launches are shared)."""
    global _JOBS
    _JOBS = list(variants.values())
    work = [(i, gpu, cache_dir) for i in range(len(_JOBS))]
    if jobs > 1 and len(work) > 1 and "fork" in multiprocessing.get_all_start_methods():
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            results = pool.map(_compile_one, work, chunksize=1)
    else:
        results = [_compile_one(w) for w in work]
    for variant, result in zip(_JOBS, results):
        variant.result = result


def _shared_limit(gpu) -> Optional[int]:
    """Most shared memory one block may use (the opt-in limit): the SM's less the per-block
    reservation."""
    per_sm = getattr(gpu, "shared_bytes_per_sm", None)
    if per_sm is None:
        return None
    return per_sm - getattr(gpu, "shared_bytes_reserved_per_block", 0)


def judge(variant: Variant, gpu=None) -> None:
    """Fill ``problems`` (what fails the check) and ``notes`` of a compiled variant."""
    result = variant.result
    if "error" in result:
        variant.problems.append(f"compile error: {result['error']}")
        return
    spill = result["spill_store_bytes"] + result["spill_load_bytes"]
    if spill:
        # The register file per block is fixed: num_warps sets the most registers a thread may
        # use. A spill at that ceiling means the tiles do not fit; ptxas also spills a few
        # bytes on its own with registers to spare, which is listed, not failed.
        ceiling = min(255, 65536 // (32 * variant.launch.num_warps))
        at_ceiling = result["registers"] > ceiling - 8
        text = (f"spills: {result['spill_store_bytes']} bytes stored, {result['spill_load_bytes']} "
                f"loaded per thread at {result['registers']} registers (ceiling {ceiling} at "
                f"{variant.launch.num_warps} warps)")
        exempt = (variant.dtype == "float64" or variant.shape_name in LARGE_TILE_SHAPES
                  or not at_ceiling)
        (variant.notes if exempt else variant.problems).append(text)
    elif result["stack_bytes"] or result["local_bytes"]:
        variant.notes.append(f"stack frame {result['stack_bytes']} bytes, no spill")
    shared, limit = result.get("shared_bytes"), _shared_limit(gpu)
    if shared is not None and limit is not None and shared > limit:
        variant.problems.append(f"needs {shared} bytes of shared memory per block; sm_{gpu.arch} "
                                f"allows {limit}")
    for dot in result["dots"]:
        if dot["k"] < MIN_K or dot["m"] < MIN_M or dot["n"] < MIN_N:
            variant.problems.append(f"tl.dot of {dot['a']} x {dot['b']}: M={dot['m']}, N={dot['n']}, "
                                    f"K={dot['k']} (needs M >= {MIN_M}, N >= {MIN_N}, K >= {MIN_K})")
    wants_mma = any(d["operand"] in ("f16", "bf16") for d in result["dots"]) or (
        result["dots"] and variant.precision == "tf32")
    has_mma = any(op.split(".")[0] in MMA_OPCODES for op in result["mma"])
    if wants_mma and not has_mma:
        variant.problems.append("dots with tensor-core operands but no HMMA/HGMMA instruction in the "
                                f"SASS (MMA opcodes: {result['mma'] or 'none'})")


def _flags(launch) -> str:
    return ",".join(k for k, v in launch.constexprs.items() if v is True)


def summary_rows(variants: Dict[str, Variant]) -> List[dict]:
    rows = []
    for v in variants.values():
        r = v.result
        rows.append(dict(
            kernel=v.launch.name, module=v.launch.module, dtype=v.dtype, precision=v.precision,
            flags=_flags(v.launch), num_warps=v.launch.num_warps,
            tiles={k: val for k, val in v.launch.constexprs.items()
                   if k.startswith("BLOCK") or k in ("BB", "IC", "DINP")},
            registers=r.get("registers"), stack_bytes=r.get("stack_bytes"), local_bytes=r.get("local_bytes"),
            spill_store_bytes=r.get("spill_store_bytes"), spill_load_bytes=r.get("spill_load_bytes"),
            shape=v.shape_name,
            dots=[f"{d['m']}x{d['n']}x{d['k']} {d['operand']}" for d in r.get("dots", [])],
            mma=r.get("mma"), error=r.get("error"), problems=v.problems, notes=v.notes,
            cases=len(v.cases), first_case=v.cases[0],
        ))
    return rows


def run(argv: Optional[Sequence[str]] = None, stdout=None) -> dict:
    out = stdout or sys.stdout
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_report.compile_check",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", default="h100", help="target: h100 (sm_90, default) or a100 (sm_80)")
    parser.add_argument("--quick", action="store_true", help="the MNIST shape only")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compiler processes (default: one per CPU)")
    parser.add_argument("--json", default=None, help="write the full result here")
    parser.add_argument("--cache-dir", default=None, help="compiled kernels (default .cache/kernel_report)")
    parser.add_argument("--verbose", action="store_true", help="a line for every variant, not only problems")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter compiles nothing")
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {args.jobs}")
    import torch
    import triton

    from .gpus import resolve
    from .report import DEFAULT_CACHE

    try:
        gpu = resolve(args.gpu)
    except ValueError as exc:
        raise SystemExit(f"--gpu: {exc}")
    start = time.time()
    all_cases = cases(args.quick)
    variants = record(all_cases, gpu)
    recorded_s = time.time() - start
    compile_all(variants, gpu, args.cache_dir or DEFAULT_CACHE, args.jobs)
    for variant in variants.values():
        judge(variant, gpu)
    rows = summary_rows(variants)
    failed = [r for r in rows if r["problems"]]
    payload = dict(
        triton=triton.__version__, pinned_triton=PINNED_TRITON, torch=torch.__version__,
        target=f"sm_{gpu.arch}", gpu=gpu.name, cases=len(all_cases), variants=len(rows),
        failed=len(failed), refused=list(REFUSED), record_seconds=round(recorded_s, 1),
        seconds=round(time.time() - start, 1), quick=args.quick, rows=rows,
    )
    for row in rows:
        if row["problems"] or row["notes"] or args.verbose:
            status = "FAIL" if row["problems"] else "ok  "
            print(f"{status} {row['kernel']}[{row['flags']}] {row['dtype']}"
                  f"{'/' + row['precision'] if row['precision'] else ''} warps={row['num_warps']} "
                  f"tiles={row['tiles']} registers={row['registers']} dots={row['dots']} mma={row['mma']}"
                  f" (first launched by: {row['first_case']})", file=out)
            for text in row["problems"] + row["notes"]:
                print(f"       {text}", file=out)
    by_kernel: Dict[str, int] = {}
    for row in rows:
        by_kernel[row["kernel"]] = by_kernel.get(row["kernel"], 0) + 1
    print(f"{len(rows) - len(failed)}/{len(rows)} kernel variants of {len(all_cases)} recorded calls "
          f"compiled cleanly for sm_{gpu.arch} with Triton {triton.__version__} "
          f"(pinned: {PINNED_TRITON}) in {payload['seconds']:.0f} s; variants per kernel: "
          + ", ".join(f"{k} {n}" for k, n in sorted(by_kernel.items())), file=out)
    if REFUSED:
        print(f"{len(REFUSED)} recorded calls refused by the dispatch before any launch (listed in "
              f"the JSON), e.g. {REFUSED[0]}", file=out)
    if triton.__version__ != PINNED_TRITON:
        print(f"note: Triton {triton.__version__} is not the pinned {PINNED_TRITON}; the GPU machines "
              "compile with the pinned one", file=out)
    if args.json:
        tmp = f"{args.json}.tmp{os.getpid()}"
        with open(tmp, "w") as handle:
            json.dump(payload, handle, indent=1)
        os.replace(tmp, args.json)
    return payload


def main(argv: Optional[Sequence[str]] = None) -> int:
    payload = run(argv)
    return 1 if payload["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
