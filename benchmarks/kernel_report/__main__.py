"""``python -m benchmarks.kernel_report``: the static kernel report (no GPU needed).

For one op, dtype and shape (default: capsule_routing, float32, the MNIST layer B=128,
I=1152, J=10, Din=8, Dout=16, 3 iterations, with bias), for each kernel backend:

1. record every launch of the forward and of the backward (kernel, grid, warps, stages,
   constexprs, argument dtypes; PyTorch ops that start GPU kernels counted beside them);
2. compile every distinct kernel for the target GPU (sm_90 H100 SXM by default, ``--gpu a100``
   for sm_80) and read registers, spills (local and stack bytes), shared memory and the SASS
   instruction mix;
3. per launch: occupancy, waves, dynamic instruction estimate and a lower-bound time (the model
   is printed with the report).

Writes ``benchmarks/results/static/<label>-<op>-<dtype>-sm<arch>.json`` (label defaults to
``git-<commit>``) and prints the tables. Compiled kernels, emulation builds and interpreter
profiles are cached under ``.cache/kernel_report`` (git-ignored); a warm run takes seconds.

    python -m benchmarks.kernel_report
    python -m benchmarks.kernel_report --op dynamic_routing --backend triton --gpu a100
    python -m benchmarks.kernel_report --shape 128,1152,10,8,16 --dtype float64 --label new-design
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated explicitly

OPS = ("capsule_routing", "dynamic_routing", "predict")
BACKENDS = ("triton", "cuda")
DTYPES = ("float32", "float64", "float16", "bfloat16")


def build_parser() -> argparse.ArgumentParser:
    from .report import DEFAULT_CACHE, STATIC_DIR

    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", default="capsule_routing", choices=OPS)
    p.add_argument("--backend", default="triton,cuda",
                   help="comma-separated kernel backends (default: triton,cuda)")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--shape", default="128,1152,10,8,16", help="B,I,J,Din,Dout (default: the MNIST layer)")
    p.add_argument("--iterations", type=int, default=3, help="routing iterations (default 3)")
    p.add_argument("--no-bias", action="store_true", help="routing without the bias term")
    p.add_argument("--gpu", default="h100", help="target: h100 (sm_90, default) or a100 (sm_80)")
    p.add_argument("--label", default=None,
                   help="names the design in the JSON file name and the README (default git-<commit>)")
    p.add_argument("--samples", type=int, default=2,
                   help="blocks per Triton launch run in the interpreter for line counts (default 2: "
                        "first and last)")
    p.add_argument("--no-profile", action="store_true",
                   help="skip the line counts (static instruction counts stand in for dynamic ones)")
    p.add_argument("--out-dir", default=STATIC_DIR, help="where the JSON goes")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE, help="compiled kernels and profiles")
    return p


def parse_shape(text: str) -> dict:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 5 or min(values) < 1:
        raise SystemExit(f"--shape: expected five positive integers B,I,J,Din,Dout, got {text!r}")
    return dict(zip(("B", "I", "J", "Din", "Dout"), values))


def run(argv: Optional[Sequence[str]] = None, stdout=None) -> dict:
    """Build, print and (unless ``--no-write``) write the report; returns the payload, with
    ``"json_path"`` when written."""
    import torch

    from . import cuda_backend, report, triton_backend
    from .gpus import resolve

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.shape_dict = parse_shape(args.shape)
    if args.iterations < 1:
        raise SystemExit(f"--iterations must be >= 1, got {args.iterations}")
    if args.samples < 1:
        raise SystemExit(f"--samples must be >= 1, got {args.samples}")
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    bad = [b for b in backends if b not in BACKENDS]
    if bad or not backends:
        raise SystemExit(f"--backend: unknown {bad}; choose from {list(BACKENDS)}")
    try:
        gpu = resolve(args.gpu)
    except ValueError as exc:
        raise SystemExit(f"--gpu: {exc}")
    dtype = getattr(torch, args.dtype)
    start = time.time()
    results = {}
    for backend in backends:
        t0 = time.time()
        if backend == "triton":
            results[backend] = triton_backend.analyse(args.op, args.shape_dict, dtype, args.iterations,
                                                      not args.no_bias, gpu, args.cache_dir, samples=args.samples,
                                                      profile=not args.no_profile)
        else:
            results[backend] = cuda_backend.analyse(args.op, args.shape_dict, dtype, args.iterations,
                                                    not args.no_bias, gpu, args.cache_dir,
                                                    profile=not args.no_profile)
        results[backend]["seconds"] = round(time.time() - t0, 1)
    payload = report.build(args, results, gpu, time.time() - start, argv)
    report.print_report(payload, stdout)
    if not args.no_write:
        payload["json_path"] = report.write(payload, args.out_dir)
        print(f"\nwrote {os.path.relpath(payload['json_path'])}", file=stdout or sys.stdout)
    return payload


def main(argv: Optional[Sequence[str]] = None) -> int:
    payload = run(argv)
    return 0 if any(r.get("status") == "ok" for r in payload["backends"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
