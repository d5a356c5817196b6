"""Shapes, sweeps and the measurement of one (op, shape, dtype) case for every contender.

For each case: inputs are drawn once (float64, then cast), the float64 reference gives the
oracle, the eager reference in the case's dtype gives the error baseline of the correctness
gate, and then each contender is checked and, if it agrees, timed in each mode
(``forward`` under ``torch.no_grad``; ``forward_backward``: a forward with gradients and
``torch.autograd.grad`` of a fixed random output gradient). Memory is the peak allocated
during one call (GPU) and the bytes autograd saves in a forward with gradients.

A contender that runs out of memory, does not support the case, or raises is recorded with
that status and the sweep goes on.
"""
from __future__ import annotations

import dataclasses
import functools
import traceback
from dataclasses import dataclass, replace
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

import capsnet_ext
from capsnet_ext import reference

from . import correctness, memory, timing
from .contenders import Contender
from .floors import MODES, OPS, Ceilings, Shape, dtype_name, floor_time, op_work

MNIST = Shape(B=128, I=1152, J=10, Din=8, Dout=16, iterations=3)

FULL_SWEEPS: Dict[str, List[Shape]] = {
    "mnist": [MNIST],
    "I": [replace(MNIST, I=i) for i in (1152, 2304, 4608, 9216, 18432, 36864)],
    "J": [replace(MNIST, J=j) for j in (10, 32, 100)],
    "B": [replace(MNIST, B=b) for b in (32, 64, 128, 256, 512)],
    "iterations": [replace(MNIST, iterations=r) for r in (1, 3, 5)],
}

# --quick: the MNIST layer at a quarter of the batch and a short sweep over I, sized so the
# whole run (eager contenders, float32) stays well under two minutes on a 2-core CPU.
QUICK_BASE = replace(MNIST, B=16)
QUICK_SWEEPS: Dict[str, List[Shape]] = {
    "mnist": [QUICK_BASE],
    "I": [replace(QUICK_BASE, I=i) for i in (288, 576, 1152)],
}


@dataclass(frozen=True)
class Options:
    """Routing options benchmarked (the CapsNet layer's defaults: a routing bias, no leaky
    routing, gradients through every iteration)."""
    bias: bool = True
    leaky: bool = False
    detach_inner: bool = False


@dataclass
class Case:
    op: str
    shape: Shape
    dtype: torch.dtype
    sweeps: List[str]


def build_cases(ops: Sequence[str], sweeps: Dict[str, List[Shape]], dtypes: Sequence[torch.dtype]) -> List[Case]:
    """One case per distinct (op, shape, dtype), tagged with every sweep it belongs to.
    ``predict`` has no iterations: its shapes are deduplicated with ``iterations=1`` and the
    iterations sweep is left out for it."""
    cases: Dict[tuple, Case] = {}
    for op in ops:
        for dtype in dtypes:
            for sweep, shapes in sweeps.items():
                if op == "predict" and sweep == "iterations":
                    continue
                for shape in shapes:
                    if op == "predict":
                        shape = replace(shape, iterations=1)
                    key = (op, shape, dtype)
                    if key not in cases:
                        cases[key] = Case(op, shape, dtype, [])
                    if sweep not in cases[key].sweeps:
                        cases[key].sweeps.append(sweep)
    return list(cases.values())


# --------------------------------------------------------------------------- inputs and calls

def input_names(op: str, options: Options) -> List[str]:
    names = {"predict": ["u", "W"], "dynamic_routing": ["u_hat"], "capsule_routing": ["u", "W"]}[op]
    if op != "predict" and options.bias:
        names.append("bias")
    return names


def make_master_inputs(op: str, shape: Shape, options: Options, device: torch.device,
                       seed: int = 0) -> Dict[str, torch.Tensor]:
    """Float64 inputs like those of a CapsNet layer: squashed ``u``, ``W`` scaled so that
    ``|s|`` is of order one at any ``I`` and ``J`` (neither saturated nor vanishing squash),
    a small bias; ``u_hat = predict(u, W)`` for ``dynamic_routing``. Plus ``grad_out``, the
    fixed output gradient of the backward."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    s = shape

    def randn(*size):
        return torch.randn(*size, generator=g, dtype=torch.float64).to(device)

    u = reference.squash(randn(s.B, s.I, s.Din))
    W = randn(s.I, s.J, s.Dout, s.Din) * (0.5 * s.J / s.I ** 0.5)
    tensors: Dict[str, torch.Tensor] = {}
    if op == "dynamic_routing":
        tensors["u_hat"] = reference.predict(u, W)
        del u, W
    else:
        tensors["u"], tensors["W"] = u, W
    if op != "predict" and options.bias:
        tensors["bias"] = 0.1 * randn(s.J, s.Dout)
    out_shape = (s.B, s.I, s.J, s.Dout) if op == "predict" else (s.B, s.J, s.Dout)
    tensors["grad_out"] = randn(*out_shape)
    return tensors


def invoke(fn: Callable, op: str, shape: Shape, options: Options, tensors: Sequence[torch.Tensor]):
    """Call ``fn`` (reference signature of ``op``) on ``tensors`` in :func:`input_names` order."""
    kwargs = dict(leaky=options.leaky, detach_inner=options.detach_inner)
    if op == "predict":
        u, W = tensors
        return fn(u, W)
    if op == "dynamic_routing":
        u_hat, *rest = tensors
        return fn(u_hat, shape.iterations, bias=rest[0] if rest else None, **kwargs)
    u, W, *rest = tensors
    return fn(u, W, shape.iterations, bias=rest[0] if rest else None, **kwargs)


def _fresh(master: Dict[str, torch.Tensor], names: Sequence[str], dtype: torch.dtype,
           requires_grad: bool) -> List[torch.Tensor]:
    return [master[n].to(dtype).detach().clone().requires_grad_(requires_grad) for n in names]


def _forward_and_grads(fn, case: Case, options: Options, tensors: List[torch.Tensor],
                       grad_out: Optional[torch.Tensor], names: Sequence[str]) -> Dict[str, torch.Tensor]:
    out = invoke(fn, case.op, case.shape, options, tensors)
    results = {"out": out.detach()}
    if grad_out is not None:
        grads = torch.autograd.grad(out, tensors, grad_out.to(out.dtype))
        results.update({f"grad_{n}": g.detach() for n, g in zip(names, grads)})
    return results


# --------------------------------------------------------------------------- one case

def _record(case: Case, contender: Contender, mode: str, options: Options, **fields) -> dict:
    rec = dict(op=case.op, contender=contender.name, contender_kind=contender.kind, mode=mode,
               dtype=dtype_name(case.dtype), shape=case.shape.as_dict(), sweeps=list(case.sweeps),
               options=dataclasses.asdict(options), status="ok", reason=None, time_s=None,
               peak_bytes=None, saved_bytes=None, saved_bytes_beyond_inputs=None, floor=None,
               fraction_of_floor=None, achieved_flops_per_s=None, achieved_bytes_per_s=None,
               correctness=None)
    rec.update(fields)
    return rec


def _classify(exc: BaseException) -> tuple:
    if memory.is_out_of_memory(exc):
        return "oom", f"out of memory: {str(exc).splitlines()[0][:300]}"
    if isinstance(exc, capsnet_ext.BackendUnavailableError):
        return "unavailable", str(exc)
    if isinstance(exc, NotImplementedError):
        return "unsupported", str(exc) or "NotImplementedError"
    last = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return "error", last[:500]


def run_case(case: Case, contenders: Sequence[Contender], device: torch.device,
             modes: Sequence[str], ceilings: Optional[Ceilings], options: Options = Options(),
             timing_kwargs: Optional[dict] = None, seed: int = 0,
             log: Callable[[str], None] = lambda s: None) -> List[dict]:
    """Check and time every contender on one case; one record per (contender, mode)."""
    timing_kwargs = dict(timing_kwargs or {})
    names = input_names(case.op, options)
    want_grads = "forward_backward" in modes
    records: List[dict] = []

    def all_failed(status: str, reason: str) -> List[dict]:
        return [_record(case, c, m, options, status=status, reason=reason) for c in contenders for m in modes]

    if device.type == "cpu":
        # On the host an allocation that does not fit may end in the kernel's OOM killer rather
        # than an exception, so cases far too large are recorded without being attempted.
        needed = host_memory_estimate(case)
        available = timing._free_memory_bytes(device)
        if needed > available:
            return all_failed("oom", f"not attempted: the float64 oracle needs about {needed / 2**30:.1f} GiB, "
                                     f"{available / 2**30:.1f} GiB of host memory is free")

    # Inputs, oracle (float64; on the CPU if the device cannot hold it) and the error baseline.
    try:
        master = make_master_inputs(case.op, case.shape, options, device, seed)
    except Exception as exc:  # noqa: BLE001 - recorded, the sweep goes on
        status, reason = _classify(exc)
        memory.release(device)
        return all_failed(status, f"making the inputs: {reason}")
    grad_out = master["grad_out"]
    ref_fn = getattr(reference, case.op)
    try:
        oracle = _oracle(ref_fn, case, options, master, names, grad_out if want_grads else None, device)
        baseline_results = _forward_and_grads(ref_fn, case, options, _fresh(master, names, case.dtype, want_grads),
                                              grad_out if want_grads else None, names)
        baseline = {k: correctness.relative_error(v, oracle[k]) for k, v in baseline_results.items()}
        del baseline_results
    except Exception as exc:  # noqa: BLE001
        status, reason = _classify(exc)
        memory.release(device)
        return all_failed(status, f"computing the reference: {reason}")

    work = {m: op_work(case.op, case.shape, case.dtype, m, bias=options.bias,
                       detach_inner=options.detach_inner) for m in modes}
    floors = {m: (floor_time(work[m], case.dtype, ceilings) if ceilings else
                  dict(flops=work[m].flops, bytes=work[m].bytes)) for m in modes}

    for contender in contenders:
        fn = contender.ops.get(case.op)
        if fn is None:
            records += [_record(case, contender, m, options, status="unsupported",
                                reason=f"{contender.name} does not implement {case.op}", floor=floors[m])
                        for m in modes]
            continue
        try:
            records += _run_contender(case, contender, fn, device, modes, options, master, names,
                                      grad_out, oracle, baseline, floors, timing_kwargs)
        except Exception as exc:  # noqa: BLE001 - recorded, the sweep goes on
            status, reason = _classify(exc)
            done = {r["mode"] for r in records if r["contender"] == contender.name}
            records += [_record(case, contender, m, options, status=status, reason=reason, floor=floors[m])
                        for m in modes if m not in done]
        finally:
            memory.release(device)
        for r in records:
            if r["contender"] == contender.name and not r.get("_logged"):
                r["_logged"] = True
                log(_one_line(r))
    for r in records:
        r.pop("_logged", None)
    del master, oracle
    memory.release(device)
    return records


ORACLE_ON_DEVICE_LIMIT = 1 << 30  # bytes


def host_memory_estimate(case: Case) -> int:
    """Rough peak bytes of the float64 oracle's forward+backward: about four tensors of the
    size of ``u_hat`` (the reference keeps ~1.3 of them for backward and makes gradients of
    the same size)."""
    s = case.shape
    return 4 * s.B * s.I * s.J * s.Dout * 8


def _oracle(ref_fn, case, options, master, names, grad_out, device) -> Dict[str, torch.Tensor]:
    try:
        tensors = [master[n].to(case.dtype).double().requires_grad_(grad_out is not None) for n in names]
        results = _forward_and_grads(ref_fn, case, options, tensors, grad_out, names)
        del tensors
        if device.type != "cpu" and sum(t.numel() * 8 for t in results.values()) > ORACLE_ON_DEVICE_LIMIT:
            # Large oracles wait on the host so that the contenders get the device memory.
            results = {k: v.cpu() for k, v in results.items()}
        return results
    except Exception as exc:  # noqa: BLE001
        if device.type == "cpu" or not memory.is_out_of_memory(exc):
            raise
    memory.release(device)
    # Cast on the host: the device just ran out of memory.
    tensors = [master[n].cpu().to(case.dtype).double().requires_grad_(grad_out is not None) for n in names]
    return _forward_and_grads(ref_fn, case, options, tensors,
                              None if grad_out is None else grad_out.cpu(), names)


def _run_contender(case, contender, fn, device, modes, options, master, names, grad_out, oracle,
                   baseline, floors, timing_kwargs) -> List[dict]:
    want_grads = "forward_backward" in modes
    # The gate: forward (and gradients) on fresh inputs, compared with the oracle.
    results = _forward_and_grads(fn, case, options, _fresh(master, names, case.dtype, want_grads),
                                 grad_out if want_grads else None, names)
    fwd_gate = correctness.check({"out": results["out"]}, oracle, baseline, case.dtype)
    full_gate = correctness.check(results, oracle, baseline, case.dtype)
    del results

    saved = {}
    if want_grads and fwd_gate.passed:
        inputs = _fresh(master, names, case.dtype, True)
        saved = memory.saved_tensor_bytes(lambda: invoke(fn, case.op, case.shape, options, inputs), inputs)
        saved.pop("saved_tensors", None)
        del inputs

    records = []
    for mode in modes:
        gate = fwd_gate if mode == "forward" else full_gate
        common = dict(floor=floors[mode], correctness=gate.as_dict(), **saved)
        if not gate.passed:
            records.append(_record(case, contender, mode, options, status="wrong",
                                   reason=gate.describe(), **common))
            continue
        dtype = case.dtype
        go = grad_out.to(dtype)
        if mode == "forward":
            def make_args():
                return tuple(_fresh(master, names, dtype, False))

            def run(*tensors):
                with torch.no_grad():
                    return invoke(fn, case.op, case.shape, options, tensors)
        else:
            def make_args():
                return tuple(_fresh(master, names, dtype, True)) + (go,)

            def run(*tensors):
                out = invoke(fn, case.op, case.shape, options, tensors[:-1])
                return torch.autograd.grad(out, tensors[:-1], tensors[-1])

        one = make_args()
        bytes_per_set = sum(t.numel() * t.element_size() for t in one)
        arg_sets = timing.rotated_copies(make_args, bytes_per_set, device, first=one)
        t = timing.measure(run, arg_sets, device, bytes_per_set=bytes_per_set, **timing_kwargs)
        del arg_sets
        # Peak after timing: warm (no compilation or autotuning buffers in it).
        peak = memory.peak_allocated_bytes(functools.partial(run, *one), device)
        del one
        floor = floors[mode]
        fields = dict(time_s=t.as_dict(), peak_bytes=peak,
                      achieved_flops_per_s=floor["flops"] / t.median,
                      achieved_bytes_per_s=floor["bytes"] / t.median)
        if floor.get("time_s"):
            fields["fraction_of_floor"] = floor["time_s"] / t.median
        records.append(_record(case, contender, mode, options, **common, **fields))
    return records


def _one_line(r: dict) -> str:
    """Progress while the suite runs: what was measured, or why it could not be. The numbers
    are printed once, in the table at the end."""
    s = r["shape"]
    head = (f"{r['op']:<16} {r['contender']:<20} {r['mode']:<16} {r['dtype']:<9} "
            f"B={s['B']} I={s['I']} J={s['J']} R={s['iterations']}")
    if r["status"] != "ok":
        return f"{head}  {r['status'].upper()}: {r['reason']}"
    return f"{head}  measured"


def run_suite(cases: Iterable[Case], contenders: Sequence[Contender], device: torch.device,
              modes: Sequence[str] = MODES, ceilings: Optional[Ceilings] = None,
              options: Options = Options(), timing_kwargs: Optional[dict] = None,
              extra_contenders: Sequence[Contender] = (), seed: int = 0,
              log: Callable[[str], None] = lambda s: None) -> List[dict]:
    """Every case for every contender (``contenders`` then ``extra_contenders``)."""
    for m in modes:
        if m not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {m!r}")
    everyone = list(contenders) + list(extra_contenders)
    records: List[dict] = []
    for case in cases:
        if case.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {case.op!r}")
        records += run_case(case, everyone, device, modes, ceilings, options, timing_kwargs, seed, log)
    return records
