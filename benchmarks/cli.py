"""``capsnet-ext bench``: every routing backend against the eager and compiled reference.

For each op (``predict``, ``dynamic_routing``, ``capsule_routing``), shape, dtype and contender
it checks the output against the reference, then times forward and forward+backward, records
memory and the fraction of the floor (FLOPs and fewest bytes against ceilings measured in the
same run), and finally measures end-to-end CapsNet training throughput. Results: a table on
stdout, JSON in ``--out-dir`` (default ``runs/bench/`` under the current folder, git-ignored)
and PNG plots in its ``plots/``. Results meant to be committed are written to
``benchmarks/results/`` explicitly (``--out-dir benchmarks/results``), from which
``python -m benchmarks.make_readme`` generates ``benchmarks/README.md``.

Examples::

    capsnet-ext bench --quick                       # a short run, fine on a laptop CPU
    capsnet-ext bench                               # the full suite on the default device
    capsnet-ext bench --ops capsule_routing --sweeps mnist,I --dtypes float32
    capsnet-ext bench --shape 32,1152,10,8,16,3 --contenders reference,triton --skip-e2e
    capsnet-ext bench --out-dir benchmarks/results  # results to commit
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import replace
from typing import Dict, List, Optional, Sequence

import torch

from . import contenders as contenders_mod
from . import end_to_end, report, suite, timing
from .contenders import Contender
from .floors import MODES, OPS, Shape, dtype_name, measure_ceilings

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
QUICK_TIMING = dict(warmup_s=0.0, budget_s=0.15, min_reps=3, max_reps=50)
FULL_TIMING_GPU = dict(warmup_s=0.025, budget_s=0.1, min_reps=10, max_reps=1000)
FULL_TIMING_CPU = dict(warmup_s=0.05, budget_s=0.5, min_reps=5, max_reps=200)


def _csv(value: str) -> List[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_shape(text: str) -> Shape:
    """``"B,I,J,Din,Dout,R"`` -> :class:`Shape`."""
    parts = _csv(text)
    if len(parts) != 6 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(
            f"--shape takes six positive integers B,I,J,Din,Dout,iterations, got {text!r}")
    return Shape(*map(int, parts))


def _choices(kind: str, values: Sequence[str], allowed: Sequence[str]) -> List[str]:
    bad = [v for v in values if v not in allowed]
    if bad:
        raise SystemExit(f"capsnet-ext bench: unknown {kind} {bad}; choose from {list(allowed)}")
    return list(values)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="capsnet-ext bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="short run: float32, a small sweep over I at B=16, short timing, a tiny "
                        "end-to-end run; the compiled reference only if named in --contenders")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if present)")
    p.add_argument("--ops", type=_csv, default=list(OPS), help=f"comma list from {list(OPS)}")
    p.add_argument("--contenders", type=_csv, default=None,
                   help="comma list from reference, reference-compiled and the backend names "
                        "(default: all that run here)")
    p.add_argument("--modes", type=_csv, default=list(MODES), help=f"comma list from {list(MODES)}")
    p.add_argument("--dtypes", type=_csv, default=None, help="comma list, default float32,bfloat16 "
                   "(float32 with --quick)")
    p.add_argument("--sweeps", type=_csv, default=None,
                   help=f"comma list from {list(suite.FULL_SWEEPS)} (default: all)")
    p.add_argument("--shape", type=parse_shape, action="append", default=None,
                   help="B,I,J,Din,Dout,iterations; repeat for several; replaces the sweeps")
    p.add_argument("--no-bias", action="store_true", help="routing without the bias")
    p.add_argument("--leaky", action="store_true", help="leaky routing")
    p.add_argument("--detach-inner", action="store_true", help="gradients through the last iteration only")
    p.add_argument("--include-interpreter", action="store_true",
                   help="also bench the Triton backend on the CPU (Triton's interpreter; slow)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode of the compiled reference")
    p.add_argument("--warmup-ms", type=float, default=None, help="warm-up per measurement")
    p.add_argument("--budget-ms", type=float, default=None, help="timed calls per measurement, in ms")
    p.add_argument("--min-reps", type=int, default=None, help="fewest timed calls per measurement")
    p.add_argument("--skip-e2e", action="store_true", help="no end-to-end training throughput")
    p.add_argument("--e2e-only", action="store_true", help="only the end-to-end training throughput")
    p.add_argument("--e2e-batch", type=int, default=None, help="images per step (default 128; 8 with --quick)")
    p.add_argument("--e2e-steps", type=int, default=None, help="timed steps (default 20; 2 with --quick)")
    p.add_argument("--e2e-precisions", type=_csv, default=None,
                   help=f"comma list from {list(end_to_end.PRECISIONS)} (default: both; float32 with --quick)")
    p.add_argument("--e2e-modes", type=_csv, default=None,
                   help="comma list from eager,compiled (default: both; eager with --quick)")
    p.add_argument("--out-dir", default=report.DEFAULT_OUT_DIR,
                   help=f"where the JSON and plots go (default: {report.DEFAULT_OUT_DIR}; results to "
                        "commit: benchmarks/results)")
    p.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for PyTorch (torch.set_num_threads); on a busy CPU, 1 avoids "
                        "OpenMP spin-waiting that can slow small compiled kernels by 1000x")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--static", action="store_true",
                   help="instead of timing, the static kernel report (no GPU needed): every other "
                        "option is then one of python -m benchmarks.kernel_report (see its --help)")
    return p


def _label_custom_shapes(shapes: List[Shape]) -> Dict[str, List[Shape]]:
    """Shapes given with --shape: a sweep over I when they differ only in I (so it is plotted),
    otherwise a plain list."""
    others = {replace(s, I=0) for s in shapes}
    if len(shapes) > 1 and len(others) == 1:
        return {"I": shapes}
    return {"custom": shapes}


def run(argv: Optional[Sequence[str]] = None, *, extra_contenders: Sequence[Contender] = (),
        stdout=None) -> dict:
    """Run the suite for command-line ``argv`` and return the payload written as JSON (its
    ``"json_path"`` key says where). ``extra_contenders`` join the discovered ones (the tests
    use this to check the correctness gate with a deliberately wrong contender)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    out = stdout or sys.stdout

    def log(line: str) -> None:
        print(line, file=out, flush=True)

    device = torch.device(args.device) if args.device else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("capsnet-ext bench: --device cuda requested but no CUDA device is available")
    ops = _choices("op", args.ops, OPS)
    modes = _choices("mode", args.modes, MODES)
    dtype_names = args.dtypes or (["float32"] if args.quick else ["float32", "bfloat16"])
    dtypes = [DTYPES[d] for d in _choices("dtype", dtype_names, list(DTYPES))]
    if args.shape:
        sweeps = _label_custom_shapes(args.shape)
    else:
        table = suite.QUICK_SWEEPS if args.quick else suite.FULL_SWEEPS
        names = _choices("sweep", args.sweeps or list(table), list(table))
        sweeps = {n: table[n] for n in names}
    names = args.contenders
    if names is None and args.quick:
        # The compiled reference compiles once per shape (tens of seconds each on a CPU).
        names = [n for n in [contenders_mod.REFERENCE] + list(torch_backends(device))]
    chosen, left_out = contenders_mod.discover(device, names, include_interpreter=args.include_interpreter,
                                               compile_mode=args.compile_mode)
    options = suite.Options(bias=not args.no_bias, leaky=args.leaky, detach_inner=args.detach_inner)

    timing_kwargs = dict(QUICK_TIMING if args.quick else
                         FULL_TIMING_GPU if device.type == "cuda" else FULL_TIMING_CPU)
    if args.warmup_ms is not None:
        timing_kwargs["warmup_s"] = args.warmup_ms / 1e3
    if args.budget_ms is not None:
        timing_kwargs["budget_s"] = args.budget_ms / 1e3
    if args.min_reps is not None:
        timing_kwargs["min_reps"] = args.min_reps

    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"capsnet-ext bench: --threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    command = "capsnet-ext bench " + shlex.join(argv)
    meta = report.run_metadata(device, command.strip(), argv)
    meta["quick"] = bool(args.quick)
    status = contenders_mod.backend_status(device)
    log(f"capsnet-ext bench on {meta['device']['name']} ({device}); torch {meta['torch']}, "
        f"triton {meta['triton']}, CUDA {meta['cuda']}")
    log("contenders: " + ", ".join(c.name for c in list(chosen) + list(extra_contenders)))
    for name, why in left_out.items():
        log(f"  left out {name}: {why}")

    started = time.perf_counter()
    ceilings = None
    results: List[dict] = []
    if not args.e2e_only:
        sizes = dict(copy_bytes=64 << 20, matmul_n=1024) if args.quick and device.type == "cpu" else {}
        ceilings = measure_ceilings(device, dtypes, timing.make_timer(device, **timing_kwargs), **sizes)
        log("ceilings: copy {:.1f} GB/s; matmul {}".format(
            ceilings.copy_bytes_per_s / 1e9,
            ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in ceilings.matmul_flops_per_s.items())))
        cases = suite.build_cases(ops, sweeps, dtypes)
        results = suite.run_suite(cases, chosen, device, modes, ceilings, options, timing_kwargs,
                                  extra_contenders=extra_contenders, seed=args.seed, log=log)

    e2e: List[dict] = []
    if not args.skip_e2e:
        e2e_backends = ["reference"] + [c.name for c in chosen if c.kind == "backend"]
        e2e_modes = _choices("e2e mode", args.e2e_modes or (["eager"] if args.quick else ["eager", "compiled"]),
                             ["eager", "compiled"])
        precisions = _choices("precision", args.e2e_precisions or (
            ["float32"] if args.quick else list(end_to_end.PRECISIONS)), end_to_end.PRECISIONS)
        e2e = end_to_end.run_end_to_end(
            e2e_backends, device, compiled_options=[m == "compiled" for m in e2e_modes],
            precisions=precisions, batch=args.e2e_batch or (8 if args.quick else 128),
            steps=args.e2e_steps or (2 if args.quick else 20), warmup_steps=1 if args.quick else 3, log=log)

    payload = dict(meta=meta, backend_status=status, contenders=[
        dict(name=c.name, kind=c.kind, note=c.note) for c in list(chosen) + list(extra_contenders)],
        left_out=left_out, options=dict(bias=options.bias, leaky=options.leaky,
                                        detach_inner=options.detach_inner),
        config=dict(ops=ops, modes=modes, dtypes=[dtype_name(d) for d in dtypes],
                    sweeps={k: [s.as_dict() for s in v] for k, v in sweeps.items()}, timing=timing_kwargs),
        ceilings=None if ceilings is None else ceilings.as_dict(),
        results=results, end_to_end=e2e,
        wall_s=None)
    payload["wall_s"] = time.perf_counter() - started

    basename = report.result_basename(meta, args.quick)
    json_path = os.path.join(args.out_dir, basename + ".json")
    report.write_json_atomic(json_path, payload)
    plots: List[str] = []
    if not args.no_plots and results:
        plots = report.plot_sweeps(payload, os.path.join(args.out_dir, "plots"), basename)

    if results:
        log("\n" + report.text_table(report.OP_HEADER, report.op_table_rows(results)))
    if e2e:
        log("\n" + report.text_table(report.E2E_HEADER, report.e2e_table_rows(e2e)))
    log(f"\nwrote {json_path}" + (f" and {len(plots)} plots in {os.path.join(args.out_dir, 'plots')}" if plots else ""))
    wrong = [r for r in results if r["status"] == "wrong"]
    if wrong:
        log(f"WARNING: {len(wrong)} measurement(s) disagree with the reference and were not timed")
    payload["json_path"] = json_path
    payload["plot_paths"] = plots
    return payload


def torch_backends(device: torch.device) -> List[str]:
    """Kernel backends available on ``device`` (the reference left out)."""
    return [b for b, state in contenders_mod.backend_status(device).items()
            if state == "available" and b != "reference"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point; exit status 3 when a contender disagreed with the reference.
    ``--static`` hands the other options to the static kernel report."""
    from capsnet_ext._cli import run_command

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--static" in argv:
        from .kernel_report.__main__ import main as static_main

        return static_main([a for a in argv if a != "--static"])

    def body(args):
        payload = run(args)
        return 3 if any(r["status"] == "wrong" for r in payload["results"]) else 0

    return run_command("capsnet-ext bench", body, argv)


if __name__ == "__main__":
    sys.exit(main())
