"""The tuning sweep of the CUDA routing kernels: one call on a GPU times the kernel instances with
one and with two samples per lane (:mod:`capsnet_ext.cuda_ops.tuning`) side by side, checks that
they agree bit for bit and with the float64 reference, and packs the results into one archive
that ``fold`` merges into the committed table (``capsnet_ext/cuda_ops/tuning_table.json``).

    python -m benchmarks.tune_cuda [--budget-s 90] [--shapes mnist,b512,large]
                                   [--dtypes float32,bfloat16] [--out DIR]
    python -m benchmarks.tune_cuda fold ARCHIVE [--table PATH] [--results DIR]

Needs the CUDA extension built (``pip install -e .`` on the GPU machine, as the GPU check does).
What is timed, per shape and dtype (MNIST first; the budget stops the rest), each instance
twice in alternation (``triton.testing.do_bench`` medians, L2 flushed; the lower median of the
two rounds counts, so a clock ramp does not favour whichever runs second):

* ``fwd``: ``capsule_routing`` without grad (the forward sweeps);
* ``bwd``: the backward op with every gradient (``detach_inner=False``): the reverse sweeps,
  the gradient sweep;
* beside them, in the same run: the eager reference's forward and forward+backward.

The check: forward values and both gradients of the two instances must be bitwise equal (the
kernels run the same operations per sample), and within :data:`TOLERANCE` of the float64
reference. An entry whose check failed is not folded. ``tune.json`` is rewritten after every
shape and the archive repacked, so a run cut off keeps what it measured.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Optional

from .tune import ITERATIONS, SHAPES, ArchiveSweep, _bench, _inputs

DTYPES = ("float32", "bfloat16", "float16")
# Relative max error against the float64 reference that passes the check (exact float32
# arithmetic in the kernels; half-precision inputs and outputs).
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}
LANES = (1, 2)


def _cuda_ops():
    """``torch.ops.capsnet_ext`` with the compiled kernels. Loaded as the GPU tests load it: the
    backend need not be verified on this GPU yet to be timed (each entry is checked here)."""
    import torch

    from capsnet_ext.cuda_ops import _build

    reason = _build.load()
    if reason is not None:
        raise SystemExit(f"tune_cuda: the CUDA ops could not be loaded: {reason}")
    return torch.ops.capsnet_ext


def _runners(ops, shape, dtype_name: str, device):
    """``(forward, backward)`` zero-argument callables of the CUDA ops at ``shape``; each runs
    with the lane_samples that :func:`capsnet_ext.cuda_ops.tuning.forced` sets."""
    import torch

    from capsnet_ext.cuda_ops import tuning
    from capsnet_ext.cuda_ops.routing import capsule_routing_with

    u, W, grad_v = _inputs(shape, dtype_name, device)
    _, _, s_all, V_all = ops.capsule_routing_forward(u, W, None, None, ITERATIONS, False, False, False, 1.0)

    def forward():
        with torch.no_grad():
            return capsule_routing_with(ops, u, W, ITERATIONS)

    def backward():
        lanes = tuning.lane_samples_for("bwd", (u, W))
        return ops.capsule_routing_backward(grad_v, u, W, None, s_all, V_all, ITERATIONS, False, False, False,
                                            1.0, lanes)
    return forward, backward


def check(ops, shape, dtype_name: str, device) -> dict:
    """Values and gradients of both instances: bitwise equal to each other, and their relative
    max error against the float64 reference."""
    import torch

    from capsnet_ext import reference
    from capsnet_ext.cuda_ops import tuning
    from capsnet_ext.cuda_ops.routing import capsule_routing_with

    u, W, grad_v = _inputs(shape, dtype_name, device, seed=1)
    results = {}
    for lanes in LANES:
        with tuning.forced(lanes):
            ul, Wl = u.clone().requires_grad_(True), W.clone().requires_grad_(True)
            v = capsule_routing_with(ops, ul, Wl, ITERATIONS)
            du, dW = torch.autograd.grad(v, [ul, Wl], grad_v)
        results[lanes] = dict(v=v.detach(), du=du, dW=dW)
    bitwise = {name: bool(torch.equal(results[1][name], results[2][name])) for name in ("v", "du", "dW")}
    # The reference in float64 on the same device (the large layer's u_hat is 6 GB there).
    u64 = u.detach().double().requires_grad_(True)
    W64 = W.detach().double().requires_grad_(True)
    v64 = reference.capsule_routing(u64, W64, ITERATIONS)
    du64, dW64 = torch.autograd.grad(v64, [u64, W64], grad_v.double())
    errors = {}
    for name, exact in (("v", v64), ("du", du64), ("dW", dW64)):
        scale = exact.abs().max().item() or 1.0
        errors[name] = (results[1][name].double() - exact).abs().max().item() / scale
    worst = max(errors.values())
    return dict(bitwise_equal=bitwise, errors=errors, worst=worst, tolerance=TOLERANCE[dtype_name],
                passed=bool(all(bitwise.values()) and worst <= TOLERANCE[dtype_name]))


def _reference_us(shape, dtype_name, device, dry_run) -> dict:
    import torch

    from capsnet_ext import reference

    u, W, grad_v = _inputs(shape, dtype_name, device)
    u.requires_grad_(), W.requires_grad_()

    def fwd():
        with torch.no_grad():
            return reference.capsule_routing(u, W, ITERATIONS)

    def fwd_bwd():
        v = reference.capsule_routing(u, W, ITERATIONS)
        return torch.autograd.grad(v, [u, W], grad_v)

    large = shape[0] * shape[1] > 500_000
    return dict(fwd=_bench(fwd, device, dry_run, large), fwd_bwd=_bench(fwd_bwd, device, dry_run, large))


class Sweep(ArchiveSweep):
    prefix = "tune-cuda"

    def __init__(self, args, ops=None, device=None):
        import torch

        from benchmarks.report import run_metadata

        super().__init__(args)
        self.device = torch.device(device or ("cpu" if args.dry_run else "cuda"))
        self.ops = ops if ops is not None else _cuda_ops()
        gpu = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu (dry run)"
        self.data = dict(metadata=run_metadata(self.device, "tune_cuda", sys.argv[1:]), gpu=gpu,
                         budget_s=args.budget_s, iterations=ITERATIONS, lanes=list(LANES), results=[],
                         skipped=[], entries=[])

    def render(self, data: dict) -> str:
        return render_summary(data)

    def time_shape(self, name: str, dtype_name: str, log) -> None:
        from capsnet_ext.cuda_ops import tuning

        shape = SHAPES[name]
        large = shape[0] * shape[1] > 500_000
        forward, backward = _runners(self.ops, shape, dtype_name, self.device)
        times = {"fwd": {}, "bwd": {}}
        for _round in range(2):
            for lanes in LANES:
                with tuning.forced(lanes):
                    for direction, fn in (("fwd", forward), ("bwd", backward)):
                        us = _bench(fn, self.device, self.dry_run, large)
                        times[direction][lanes] = min(us, times[direction].get(lanes, float("inf")))
        result = check(self.ops, shape, dtype_name, self.device)
        reference_us = _reference_us(shape, dtype_name, self.device, self.dry_run)
        row = dict(shape=name, dims=list(shape), dtype=dtype_name,
                   times_us={d: {str(k): v for k, v in t.items()} for d, t in times.items()},
                   check=result, reference_eager_us=reference_us)
        self.data["results"].append(row)
        log(f"{name} {dtype_name}: fwd " + ", ".join(f"{k} lane(s) {v:.1f} us" for k, v in times["fwd"].items())
            + "; bwd " + ", ".join(f"{k} lane(s) {v:.1f} us" for k, v in times["bwd"].items())
            + f"; check {'ok' if result['passed'] else 'FAILED'} (worst {result['worst']:.2e}, bitwise "
            f"{result['bitwise_equal']}); eager fwd {reference_us['fwd']:.1f} us, f+b {reference_us['fwd_bwd']:.1f} us")
        meta = self.data["metadata"]
        for direction in ("fwd", "bwd"):
            winner = min(LANES, key=lambda k: times[direction][k])
            self.data["entries"].append(dict(
                gpu=self.data["gpu"], direction=direction, dtype=dtype_name, precision="ieee",
                shape=list(shape), iterations=ITERATIONS, config=dict(lane_samples=winner),
                median_us=times[direction][winner], default_us=times[direction][1],
                times_us={str(k): v for k, v in times[direction].items()}, check=result,
                reference_eager_us=reference_us, date=meta["date"], commit=meta["git_commit"],
                torch=meta["torch"], archive=self.name))

    def run(self) -> Path:
        log = self.log
        shapes = ["tiny"] if self.dry_run else self.args.shapes.split(",")
        dtypes = self.args.dtypes.split(",")
        for name in shapes:
            if name not in SHAPES:
                raise SystemExit(f"--shapes: unknown shape {name!r}; choose from {sorted(SHAPES)}")
        for dtype_name in dtypes:
            if dtype_name not in DTYPES:
                raise SystemExit(f"--dtypes: unknown {dtype_name!r}; choose from {list(DTYPES)}")
        log(f"{self.data['gpu']}: shapes {shapes}, dtypes {dtypes}, budget {self.args.budget_s} s")
        for name in shapes:
            for dtype_name in dtypes:
                if self.left() < 15:
                    self.data["skipped"].append(dict(shape=name, dtype=dtype_name, reason="budget"))
                    log(f"skip {name} {dtype_name}: budget")
                    continue
                try:
                    self.time_shape(name, dtype_name, log)
                except Exception:  # noqa: BLE001 - recorded; the next setting goes on
                    error = traceback.format_exc(limit=4)
                    log(f"  error: {error}")
                    self.data["skipped"].append(dict(shape=name, dtype=dtype_name, reason=error))
            self.pack()
        archive = self.pack()
        log(f"archive {archive}")
        return archive


def render_summary(data: dict) -> str:
    meta = data["metadata"]
    lines = [f"# CUDA routing tuning sweep: {data['gpu']}", "",
             f"{meta['date']}, commit {meta['git_commit']}, torch {meta['torch']}; {data['iterations']} "
             "iterations, no bias, every gradient; `triton.testing.do_bench` medians (lower of two "
             "alternating rounds), µs.", "",
             "| shape | dtype | fwd, 1 sample/lane | fwd, 2 | bwd, 1 | bwd, 2 | eager fwd | eager f+b | check |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        t = r["times_us"]
        check_text = "ok" if r["check"]["passed"] else "FAILED"
        lines.append(f"| {r['shape']} {tuple(r['dims'])} | {r['dtype']} | {t['fwd']['1']:.1f} | {t['fwd']['2']:.1f} | "
                     f"{t['bwd']['1']:.1f} | {t['bwd']['2']:.1f} | {r['reference_eager_us']['fwd']:.1f} | "
                     f"{r['reference_eager_us']['fwd_bwd']:.1f} | {check_text} (worst {r['check']['worst']:.1e}) |")
    for s in data["skipped"]:
        lines.append(f"\nskipped {s['shape']} {s['dtype']}: {s['reason'].strip().splitlines()[-1]}")
    return "\n".join(lines) + "\n"


def fold(archive: str, table: Optional[str], results: str) -> int:
    """Merge the checked winners of a sweep archive into the CUDA tuning table."""
    from capsnet_ext.cuda_ops import tuning

    from .tune import fold as fold_into

    return fold_into(archive, table, results, tuning_module=tuning)


def main(argv=None, ops=None, device=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "fold":
        parser = argparse.ArgumentParser(prog="python -m benchmarks.tune_cuda fold")
        parser.add_argument("archive")
        parser.add_argument("--table", default=None, help="table file (default: the package's)")
        parser.add_argument("--results", default="benchmarks/results/tuning")
        args = parser.parse_args(argv[1:])
        return fold(args.archive, args.table, args.results)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tune_cuda", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="a tiny shape on the CPU, timed with a clock; needs ops given by the caller "
                             "(the tests pass a CPU stand-in of the CUDA ops)")
    parser.add_argument("--budget-s", type=float, default=90)
    parser.add_argument("--shapes", default="mnist,b512,large")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/tune"))
    args = parser.parse_args(argv)
    if args.dry_run and ops is None:
        print("tune_cuda --dry-run: the CUDA ops are not built on a CPU machine; the dry run is "
              "tests/test_cuda_tuning.py, which passes a CPU stand-in", file=sys.stderr)
        return 2
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("tune_cuda: no CUDA GPU", file=sys.stderr)
            return 2
    archive = Sweep(args, ops=ops, device=device).run()
    print(f"tune_cuda: wrote {archive}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
