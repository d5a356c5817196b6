"""The tuning sweep of the fused Triton ``capsule_routing`` kernels: one call on a GPU times
every candidate configuration, checks each winner against the float64 reference, and packs
the results into one archive that ``fold`` merges into the committed tuning table
(``capsnet_ext/triton_ops/tuning_table.json``, read by the dispatch, see
:mod:`capsnet_ext.triton_ops.tuning`).

    python -m benchmarks.tune [--budget-s 420] [--shapes mnist,b512,large]
                              [--dtypes bfloat16,float32,tf32] [--out DIR]
    python -m benchmarks.tune --dry-run          # CPU, Triton's interpreter, a tiny shape
    python -m benchmarks.tune fold ARCHIVE [--table PATH] [--results DIR]

What is timed, per shape and dtype, in priority order (MNIST first; the budget stops the rest):

* ``fwd``: the forward sweeps (no grad) for every (samples per tile ``BB``, warps, most
  input-capsule splits) of :func:`candidates`;
* ``bwd``: the backward with every gradient (``detach_inner=False``, the API's default) for
  every (``grad_BB``, ``grad_warps``, ``bwd_warps``), the forward winner's tiles kept;
* then, around each direction's grid winner (:func:`second_pass`): the other kernel design
  (``Config.design``: ``"batched"`` dots or ``"uhat"`` tiles) and pipelining depths 2 and 3
  (``Config.stages``; the grid runs at 1);
* beside them, in the same run: the default configuration and the eager reference.

Timings are ``triton.testing.do_bench`` medians (L2 flushed between calls). Every candidate
is compiled first by a pool of processes (the Triton cache on disk is shared), so the timing
loop only loads kernels. A candidate that fails to compile or run is recorded with its error.
Each winner's forward values and gradients are compared with the float64 reference; an
unchecked or failed winner is not folded. ``tune.json`` is rewritten after every step and the
archive repacked after every shape, so a run cut off keeps what it measured.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime as _dt
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional

from capsnet_ext._atomic import atomic_path, atomic_write

SHAPES: Dict[str, tuple] = {  # (B, I, J, Dout, Din)
    "mnist": (128, 1152, 10, 16, 8),
    "b512": (512, 1152, 10, 16, 8),
    "large": (1024, 4608, 10, 16, 8),
    "tiny": (16, 5, 3, 4, 3),  # the dry run's
}
ITERATIONS = 3
# dtype settings: (torch dtype name, float32 dot precision)
DTYPES = {"bfloat16": ("bfloat16", "ieee"), "float16": ("float16", "ieee"),
          "float32": ("float32", "ieee"), "tf32": ("float32", "tf32")}
# Relative max error of a winner against the float64 reference that passes the check.
TOLERANCE = {"bfloat16": 5e-2, "float16": 1e-2, "float32": 1e-4, "tf32": 5e-3}

FWD_GRID = dict(BB=(16, 32, 64), warps=(4, 8, 16), max_isplit=(8, 16, 32, 64))
BWD_GRID = dict(grad_BB=(16, 32, 64), grad_warps=(4, 8, 16), bwd_warps=(4, 8, 16))
# Timed around the grid's winner in a second pass (instead of a grid six times as large):
# the other kernel design, and the pipelining depths (the grid itself runs at the default 1).
STAGES = (2, 3)


def second_pass(winner, quick: bool = False, precision: str = "ieee") -> list:
    """The grid's ``winner`` in the other kernel designs (``Config.design``), then at the other
    pipelining depths (:data:`STAGES`); ``quick``: one of each."""
    from capsnet_ext.triton_ops._gemm_core import DESIGNS

    # The u_hat-tile gradient sweep needs at most 8 warps (see _gemm_core.default_config).
    # TF32 runs the batched design whatever the configuration says (see _gemm_core.Plan).
    designs = [winner._replace(design=d, grad_warps=min(winner.grad_warps, 8) if d == "uhat"
                               else winner.grad_warps)
               for d in DESIGNS if d != winner.design and precision != "tf32"]
    stages = [winner._replace(stages=s) for s in STAGES if s != winner.stages]
    return designs[:1] + stages[:1] if quick else designs + stages


def candidates(direction: str, base, quick: bool = False) -> list:
    """Configurations to time: ``base`` (the default, or the forward winner for ``bwd``) with
    every combination of the direction's grid; the default first. ``quick``: two."""
    grid = FWD_GRID if direction == "fwd" else BWD_GRID
    out = [base]
    for values in itertools.product(*grid.values()):
        config = base._replace(**dict(zip(grid, values)))
        if config not in out:
            out.append(config)
    return out[:2] if quick else out


# ------------------------------------------------------------------------------ the worker side
def _setup_precision(precision: str) -> None:
    import torch

    torch.backends.cuda.matmul.fp32_precision = "tf32" if precision == "tf32" else "ieee"


def _inputs(shape, dtype_name: str, device, seed: int = 0):
    import torch

    B, I, J, D, Din = shape
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, dtype_name)
    u = (torch.randn(B, I, Din, generator=g)).to(device, dtype)
    W = (torch.randn(I, J, D, Din, generator=g) * 0.05).to(device, dtype)
    grad_v = (torch.randn(B, J, D, generator=g)).to(device, dtype)
    return u, W, grad_v


def _runner(direction: str, shape, dtype_name: str, precision: str, device):
    """A zero-argument callable running one direction of the kernels at ``shape`` with the
    configuration :func:`capsnet_ext.triton_ops.tuning.forced` sets."""
    import torch

    from capsnet_ext.triton_ops import _gemm_core as core

    _setup_precision(precision)
    u, W, grad_v = _inputs(shape, dtype_name, device)
    if direction == "fwd":
        def run():
            with torch.no_grad():
                return core.routing_forward(u, W, ITERATIONS, None, None, False, 1.0, False)
        return run
    from capsnet_ext.triton_ops import tuning

    default = core.default_config(*shape, dtype=getattr(torch, dtype_name), precision=precision)
    with tuning.forced(default):  # the backward's inputs: no autotuning of the forward here
        v, s_all, V_all, _ = core.routing_forward(u, W, ITERATIONS, None, None, False, 1.0,
                                                  False)

    def run():
        return core.routing_backward(u, W, None, grad_v, s_all, V_all, False, False, 1.0,
                                     True, True, False, False, None)
    return run


def _compile_one(job) -> Optional[str]:
    """Pool worker: run one candidate once so that its kernels are compiled into the shared
    cache; the error text if it fails."""
    direction, shape, dtype_name, precision, config, device = job
    try:
        from capsnet_ext.triton_ops import tuning

        run = _runner(direction, shape, dtype_name, precision, device)
        with tuning.forced(config):
            run()
        return None
    except Exception as exc:  # noqa: BLE001 - recorded per candidate
        return f"{type(exc).__name__}: {str(exc)[:300]}"


def _bench(fn, device, dry_run: bool, large: bool) -> float:
    """Median microseconds of ``fn``."""
    if dry_run:
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=60 if large else 25,
                                         return_mode="median")) * 1e3


def check_against_reference(shape, dtype_name: str, precision: str, fwd_config, bwd_config,
                            device) -> dict:
    """Forward values and the gradients of ``u`` and ``W`` of the Triton kernels under the two
    configurations, against the float64 reference: the worst relative max error."""
    import torch

    import capsnet_ext
    from capsnet_ext.triton_ops import _gemm_core as core
    from capsnet_ext.triton_ops import tuning

    _setup_precision(precision)
    u, W, grad_v = _inputs(shape, dtype_name, device, seed=1)
    with tuning.forced(fwd_config):
        v, s_all, V_all, _ = core.routing_forward(u, W, ITERATIONS, None, None, False, 1.0,
                                                  False)
    with tuning.forced(bwd_config):
        du, dW, _, _ = core.routing_backward(u, W, None, grad_v, s_all, V_all, False, False,
                                             1.0, True, True, False, False, None)
    u64 = u.detach().double().requires_grad_()
    W64 = W.detach().double().requires_grad_()
    v64 = capsnet_ext.capsule_routing(u64, W64, ITERATIONS, backend="reference")
    du64, dW64 = torch.autograd.grad(v64, [u64, W64], grad_v.double())
    errors = {}
    for name, got, exact in (("v", v, v64), ("du", du, du64), ("dW", dW, dW64)):
        scale = exact.abs().max().item() or 1.0
        errors[name] = (got.double() - exact).abs().max().item() / scale
    worst = max(errors.values())
    return dict(errors=errors, worst=worst, tolerance=TOLERANCE[_setting(dtype_name, precision)],
                passed=bool(worst <= TOLERANCE[_setting(dtype_name, precision)]))


def _setting(dtype_name, precision):
    return "tf32" if precision == "tf32" else dtype_name


def _reference_us(shape, dtype_name, precision, device, dry_run) -> dict:
    import torch

    import capsnet_ext

    _setup_precision(precision)
    u, W, grad_v = _inputs(shape, dtype_name, device)
    u.requires_grad_(), W.requires_grad_()

    def fwd():
        with torch.no_grad():
            return capsnet_ext.capsule_routing(u, W, ITERATIONS, backend="reference")

    def fwd_bwd():
        v = capsnet_ext.capsule_routing(u, W, ITERATIONS, backend="reference")
        return torch.autograd.grad(v, [u, W], grad_v)

    large = shape[0] * shape[1] > 500_000
    return dict(fwd=_bench(fwd, device, dry_run, large),
                fwd_bwd=_bench(fwd_bwd, device, dry_run, large))


def _profile_winner(shape, dtype_name, precision, fwd_config, bwd_config, device) -> str:
    """torch.profiler kernel table of forward + backward under the winners."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from capsnet_ext.triton_ops import tuning

    fwd = _runner("fwd", shape, dtype_name, precision, device)
    bwd = _runner("bwd", shape, dtype_name, precision, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    for _ in range(2):
        with tuning.forced(fwd_config):
            fwd()
        with tuning.forced(bwd_config):
            bwd()
    with profile(activities=activities) as prof:
        for _ in range(5):
            with tuning.forced(fwd_config):
                fwd()
            with tuning.forced(bwd_config):
                bwd()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=15)


# ------------------------------------------------------------------------------ the sweep
def _config_dict(config) -> dict:
    return dict(config._asdict())


class ArchiveSweep:
    """What the tuning sweeps (this one and ``benchmarks/tune_cuda.py``) share: a deadline, a
    work folder whose ``tune.json`` is rewritten after every step, one archive and its summary
    in ``args.out`` repacked after every shape (a run cut off keeps what it measured), and a
    log on the console and in ``log.txt``. Subclasses set ``data`` and :meth:`render`."""
    prefix = "tune"

    def __init__(self, args):
        self.args = args
        self.dry_run = args.dry_run
        self.deadline = time.monotonic() + args.budget_s
        self.stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.name = f"{self.prefix}-{'dryrun-' if args.dry_run else ''}{self.stamp}"
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix=f"{self.prefix}.")) / self.name
        self.work.mkdir(parents=True)
        self.data: dict = {}

    def render(self, data: dict) -> str:
        raise NotImplementedError

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, text: str) -> None:
        line = f"[{self.args.budget_s - self.left():6.1f}s] {text}"
        print(line, flush=True)
        with open(self.work / "log.txt", "a") as handle:
            handle.write(line + "\n")

    def save(self) -> None:
        atomic_write(self.work / "tune.json", json.dumps(self.data, indent=1))

    def pack(self) -> Path:
        self.save()
        summary = self.render(self.data)
        atomic_write(self.work / "summary.md", summary)
        archive = self.out / f"{self.name}.tar.gz"
        with atomic_path(archive, suffix=".tar.gz") as tmp:
            with tarfile.open(tmp, "w:gz") as tar:
                tar.add(self.work, arcname=self.name)
        atomic_write(self.out / f"{self.name}-summary.md", summary)
        return archive


class Sweep(ArchiveSweep):
    def __init__(self, args):
        import torch

        super().__init__(args)
        self.device = torch.device("cpu" if args.dry_run else "cuda")
        from benchmarks.report import run_metadata
        from capsnet_ext.triton_ops import _gemm_core as core

        self.data = dict(metadata=run_metadata(self.device, "tune", sys.argv[1:]),
                         gpu=core._gpu_name(self.device), budget_s=args.budget_s,
                         iterations=ITERATIONS, grids=dict(fwd=FWD_GRID, bwd=BWD_GRID),
                         results=[], skipped=[], entries=[])

    def render(self, data: dict) -> str:
        return render_summary(data)

    def precompile(self, jobs: list) -> Dict[tuple, str]:
        """Compile every job's kernels in a process pool; ``{job: error}`` for failures."""
        if self.args.jobs <= 1 or not jobs:
            return {}
        errors = {}
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(self.args.jobs, mp_context=ctx) as pool:
            futures = {pool.submit(_compile_one, job): job for job in jobs}
            timeout = max(5.0, self.left() - 30)
            try:
                for future in concurrent.futures.as_completed(futures, timeout=timeout):
                    error = future.exception() or future.result()
                    if error:
                        errors[futures[future][:5]] = str(error)
            except concurrent.futures.TimeoutError:
                for future in futures:
                    future.cancel()
        return errors

    def time_candidates(self, direction, shape_name, setting, base, log) -> Optional[dict]:
        from capsnet_ext.triton_ops import _gemm_core as core
        from capsnet_ext.triton_ops import tuning

        shape = SHAPES[shape_name]
        dtype_name, precision = DTYPES[setting]
        large = shape[0] * shape[1] > 500_000
        run = _runner(direction, shape, dtype_name, precision, self.device)
        rows = []

        def time_all(configs):
            for config in configs:
                if self.left() < 20:
                    self.data["skipped"].append(dict(shape=shape_name, dtype=setting,
                                                     direction=direction,
                                                     config=_config_dict(config),
                                                     reason="budget"))
                    continue
                row = dict(config=_config_dict(config))
                try:
                    with tuning.forced(config):
                        row["median_us"] = round(_bench(run, self.device, self.dry_run, large),
                                                 2)
                except Exception as exc:  # noqa: BLE001 - recorded per candidate
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                rows.append(row)

        time_all(candidates(direction, base, quick=self.dry_run))
        grid_timed = [r for r in rows if "median_us" in r]
        if grid_timed:
            grid_best = core.Config(**min(grid_timed, key=lambda r: r["median_us"])["config"])
            time_all(second_pass(grid_best, quick=self.dry_run, precision=precision))
        timed = [r for r in rows if "median_us" in r]
        result = dict(shape=shape_name, size=list(shape), dtype=setting, direction=direction,
                      candidates=rows)
        self.data["results"].append(result)
        if not timed:
            log(f"  {direction}: nothing timed")
            return None
        best = min(timed, key=lambda r: r["median_us"])
        result.update(winner=best["config"], winner_us=best["median_us"],
                      default_us=rows[0].get("median_us"))
        log(f"  {direction}: {len(timed)}/{len(rows)} timed, best {best['median_us']:.1f} us "
            f"{best['config']}, default {rows[0].get('median_us')} us")
        return result

    def run(self) -> Path:
        import torch

        from capsnet_ext.triton_ops import _gemm_core as core

        log = self.log
        shapes = ["tiny"] if self.dry_run else self.args.shapes.split(",")
        settings = self.args.dtypes.split(",")
        for name in shapes:
            if name not in SHAPES:
                raise SystemExit(f"--shapes: unknown shape {name!r}; choose from {sorted(SHAPES)}")
        for setting in settings:
            if setting not in DTYPES:
                raise SystemExit(f"--dtypes: unknown {setting!r}; choose from {sorted(DTYPES)}")
        log(f"{self.data['gpu']}: shapes {shapes}, dtypes {settings}, budget {self.args.budget_s} s")
        # Compile every forward candidate of every dtype once (kernels do not depend on B or I
        # beyond divisibility, which the shapes share), then the backward grid around the
        # default's tiles; forward winners that differ compile on first use.
        jobs = []
        for setting in settings:
            dtype_name, precision = DTYPES[setting]
            shape = SHAPES[shapes[0]]
            base = core.default_config(*shape, dtype=getattr(torch, dtype_name),
                                       precision=precision)
            for direction in ("fwd", "bwd"):
                for config in candidates(direction, base, quick=self.dry_run):
                    jobs.append((direction, shape, dtype_name, precision, config, self.device))
        start = time.monotonic()
        errors = self.precompile(jobs)
        log(f"precompiled {len(jobs)} candidates in {time.monotonic() - start:.1f} s "
            f"({len(errors)} failed)")
        self.data["precompile"] = dict(jobs=len(jobs), seconds=round(time.monotonic() - start, 1),
                                       errors=[dict(job=[j[0], j[2], j[3], list(j[4])], error=e)
                                               for j, e in errors.items()])
        for name in shapes:
            shape = SHAPES[name]
            for setting in settings:
                if self.left() < 30:
                    self.data["skipped"].append(dict(shape=name, dtype=setting, reason="budget"))
                    log(f"skip {name} {setting}: budget")
                    continue
                dtype_name, precision = DTYPES[setting]
                base = core.default_config(*shape, dtype=getattr(torch, dtype_name),
                                           precision=precision)
                log(f"{name} {shape} {setting}")
                try:
                    fwd = self.time_candidates("fwd", name, setting, base, log)
                    if fwd is None:
                        continue
                    fwd_winner = core.Config(**fwd["winner"])
                    bwd = self.time_candidates("bwd", name, setting, fwd_winner, log)
                    bwd_winner = core.Config(**bwd["winner"]) if bwd else fwd_winner
                    check = check_against_reference(shape, dtype_name, precision, fwd_winner,
                                                    bwd_winner, self.device)
                    log(f"  check: worst relative error {check['worst']:.2e} "
                        f"(tolerance {check['tolerance']:.0e}) {'ok' if check['passed'] else 'FAILED'}")
                    reference = _reference_us(shape, dtype_name, precision, self.device,
                                              self.dry_run)
                    log(f"  reference eager: fwd {reference['fwd']:.1f} us, "
                        f"fwd+bwd {reference['fwd_bwd']:.1f} us")
                    for result in (fwd, bwd):
                        if result is None:
                            continue
                        self.data["entries"].append(dict(
                            gpu=self.data["gpu"], direction=result["direction"],
                            dtype=dtype_name, precision=precision, shape=list(shape),
                            iterations=ITERATIONS, config=result["winner"],
                            median_us=result["winner_us"], default_us=result["default_us"],
                            reference_eager_us=reference,
                            check=check, date=self.data["metadata"]["date"],
                            commit=self.data["metadata"]["git_commit"],
                            torch=self.data["metadata"]["torch"],
                            triton=self.data["metadata"]["triton"], archive=self.name))
                    if name in (shapes[0],) and self.left() > 30:
                        text = _profile_winner(shape, dtype_name, precision, fwd_winner,
                                               bwd_winner, self.device)
                        (self.work / f"profile-{name}-{setting}.txt").write_text(text)
                except Exception:  # noqa: BLE001 - recorded; the next setting goes on
                    error = traceback.format_exc(limit=4)
                    log(f"  error: {error}")
                    self.data["skipped"].append(dict(shape=name, dtype=setting, reason=error))
                self.save()
            self.pack()
        archive = self.pack()
        log(f"archive {archive}")
        return archive


def render_summary(data: dict) -> str:
    meta = data["metadata"]
    lines = [f"# Triton tuning sweep: {data['gpu']}", "",
             f"{meta['date']}, commit {meta['git_commit']}, torch {meta['torch']}, "
             f"Triton {meta['triton']}, {data['iterations']} routing iterations, "
             f"budget {data['budget_s']} s. " + (
                 "Medians of `triton.testing.do_bench` (L2 flushed), measured side by side in "
                 "this run." if data["gpu"] != "cpu" else
                 "Dry run: Triton's CPU interpreter, one call each; the times say nothing of a "
                 "GPU."), "",
             "| shape (B, I, J, Dout, Din) | dtype | direction | default µs | best µs | speed-up "
             "| best configuration | check |",
             "|---|---|---|---|---|---|---|---|"]
    checks = {(e["shape"][0], e["shape"][1], e["dtype"], e["precision"]): e["check"]
              for e in data["entries"]}
    for r in data["results"]:
        if "winner" not in r:
            lines.append(f"| {tuple(r['size'])} | {r['dtype']} | {r['direction']} | | "
                         f"nothing ran | | | |")
            continue
        dtype_name, precision = DTYPES[r["dtype"]]
        check = checks.get((r["size"][0], r["size"][1], dtype_name, precision))
        verdict = ("" if check is None else
                   f"{'ok' if check['passed'] else 'FAILED'} {check['worst']:.1e}")
        default = r.get("default_us")
        ratio = f"{default / r['winner_us']:.2f}x" if default else ""
        config = ", ".join(f"{k}={v}" for k, v in r["winner"].items())
        lines.append(f"| {tuple(r['size'])} | {r['dtype']} | {r['direction']} | {default} | "
                     f"{r['winner_us']} | {ratio} | {config} | {verdict} |")
    refs = {}
    for e in data["entries"]:
        refs[(tuple(e["shape"]), e["dtype"], e["precision"])] = e["reference_eager_us"]
    if refs:
        lines += ["", "Eager reference in the same run (µs):", "",
                  "| shape | dtype | precision | fwd | fwd+bwd |", "|---|---|---|---|---|"]
        for (shape, dtype_name, precision), ref in refs.items():
            lines.append(f"| {shape} | {dtype_name} | {precision} | {ref['fwd']:.1f} | "
                         f"{ref['fwd_bwd']:.1f} |")
    errors = [r for r in data["results"] for c in r["candidates"] if "error" in c]
    n_err = sum(1 for r in data["results"] for c in r["candidates"] if "error" in c)
    if n_err:
        lines += ["", f"{n_err} candidates failed (errors in tune.json); first: "
                  f"{next(c['error'] for r in errors for c in r['candidates'] if 'error' in c)}"]
    if data["skipped"]:
        lines += ["", f"Skipped: {len(data['skipped'])} (budget or errors, listed in tune.json)."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ fold
def fold(archive: str, table: Optional[str], results: str, tuning_module=None) -> int:
    """Merge the checked winners of a sweep archive into the tuning table; keep the archive and
    its summary under ``results``. ``tuning_module``: the table's module (default the Triton
    one; ``benchmarks.tune_cuda`` passes :mod:`capsnet_ext.cuda_ops.tuning`)."""
    from capsnet_ext.triton_ops import tuning as triton_tuning

    tuning = tuning_module or triton_tuning

    archive_path = Path(archive)
    with tarfile.open(archive_path) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith("/tune.json")), None)
        if member is None:
            print(f"fold: {archive}: no tune.json inside", file=sys.stderr)
            return 2
        data = json.load(tar.extractfile(member))
        summary = next((m for m in tar.getmembers() if m.name.endswith("/summary.md")), None)
        summary_text = tar.extractfile(summary).read().decode() if summary else None
    entries = [e for e in data["entries"] if e.get("check", {}).get("passed")]
    refused = len(data["entries"]) - len(entries)
    table_path = Path(table) if table else tuning.TABLE_PATH
    merged, replaced, added = tuning.merge(tuning.read_table(table_path), entries)
    results_dir = Path(results)
    results_dir.mkdir(parents=True, exist_ok=True)
    kept = results_dir / archive_path.name
    if not (kept.exists() and kept.samefile(archive_path)):
        shutil.copyfile(archive_path, kept)
    if summary_text is not None:
        atomic_write(results_dir / archive_path.name.replace(".tar.gz", "-summary.md"),
                     summary_text)
    tuning.write_table(merged, table_path)  # last: a failed copy leaves the table as it was
    print(f"fold: {added} entries added, {replaced} replaced in {table_path}; {refused} refused "
          f"(winner check failed or missing); archive kept in {results_dir}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "fold":
        parser = argparse.ArgumentParser(prog="python -m benchmarks.tune fold")
        parser.add_argument("archive")
        parser.add_argument("--table", default=None, help="table file (default: the package's)")
        parser.add_argument("--results", default="benchmarks/results/tuning")
        args = parser.parse_args(argv[1:])
        return fold(args.archive, args.table, args.results)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, Triton's interpreter, a tiny shape, two candidates")
    parser.add_argument("--budget-s", type=float, default=420)
    parser.add_argument("--shapes", default="mnist,b512,large")
    parser.add_argument("--dtypes", default="bfloat16,float32,tf32")
    parser.add_argument("--jobs", type=int, default=None,
                        help="processes compiling candidates ahead of the timing (default: "
                             "the CPU count less 2, at most 14; 1 in a dry run)")
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/tune"))
    args = parser.parse_args(argv)
    if args.jobs is None:
        args.jobs = 1 if args.dry_run else max(1, min(14, (os.cpu_count() or 2) - 2))
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("tune --dry-run: set TRITON_INTERPRET=1 before triton is imported",
                  file=sys.stderr)
            return 2
    else:
        import torch

        if not torch.cuda.is_available():
            print("tune: no CUDA GPU; use --dry-run on a CPU machine", file=sys.stderr)
            return 2
    archive = Sweep(args).run()
    print(f"tune: wrote {archive}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
