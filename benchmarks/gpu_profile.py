"""The ``profile`` step of the GPU check: where the routing time goes, per kernel.

Two parts, both for ``capsule_routing`` at the MNIST shape (B=128, I=1152, J=10, 8 -> 16, 3
iterations, bias), forward and forward+backward, every kernel backend and dtype:

* ``torch``: the ``torch.profiler`` kernel table (kernel name, calls, total and mean µs,
  launches per call) over a few calls after a warm-up (compilation and autotuning done), into
  ``profile-torch.json`` and ``profile-torch.txt``;
* ``ncu-target``: the process Nsight Compute profiles (``ncu`` with a small fixed set of
  sections and a bounded ``--launch-count``, started by ``gpu_check.sh``): one warm-up call,
  then the profiled calls inside an NVTX range; ``ncu-parse`` turns ncu's CSV into
  ``profile-ncu.json``: achieved occupancy and the top stall reason per kernel.

``summarize`` (used by the check's summary) names each backend's three most expensive kernels
with their share of the kernel time, achieved occupancy and top stall reason.

On a machine without a GPU (the check's dry run) ``torch`` profiles the reference on the CPU at
a tiny shape, which exercises the same code.

    python3 -m benchmarks.gpu_profile torch RESULTS_DIR [--device cpu --tiny]
    ncu ... python3 -m benchmarks.gpu_profile ncu-target --backend triton --dtype bfloat16
    python3 -m benchmarks.gpu_profile ncu-parse NCU.csv RESULTS_DIR/profile-ncu.json
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import sys
from typing import Dict, List, Optional, Sequence

MNIST = dict(B=128, I=1152, J=10, Din=8, Dout=16, iterations=3)
TINY = dict(B=4, I=24, J=3, Din=4, Dout=5, iterations=2)
MODES = ("forward", "forward_backward")
NCU_SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats")
# Per-reason stall metrics (cycles a warp spends stalled for that reason per issued instruction).
STALL_METRIC = re.compile(r"^smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$")
NCU_STALL_METRICS = r"regex:^smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio$"
NVTX_RANGE = "capsnet_profile"


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def _inputs(shape: dict, dtype, device, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    B, I, J, Din, Dout = (shape[k] for k in ("B", "I", "J", "Din", "Dout"))

    def rand(*size, scale=1.0):
        return (torch.randn(*size, generator=g) * scale).to(device, dtype).requires_grad_(True)

    return rand(B, I, Din), rand(I, J, Dout, Din, scale=0.05), rand(J, Dout, scale=0.1)


def _call(backend: str, mode: str, u, W, bias, iterations: int):
    import torch

    import capsnet_ext

    if mode == "forward":
        with torch.no_grad():
            return capsnet_ext.capsule_routing(u, W, iterations, bias=bias, backend=backend)
    v = capsnet_ext.capsule_routing(u, W, iterations, bias=bias, backend=backend)
    return torch.autograd.grad(v.float().square().sum(), [u, W, bias])


def kernel_table(events, calls: int, device_type: str) -> List[dict]:
    """Rows of (kernel, calls, total µs, mean µs, launches per call) from profiler key
    averages, most expensive first. On a GPU only device kernels count; on the CPU (the dry
    run's stand-in) the ATen ops do."""
    rows = []
    for e in events:
        if device_type == "cuda":
            total = getattr(e, "self_device_time_total", None)
            if total is None:
                total = getattr(e, "self_cuda_time_total", 0)
            is_kernel = total > 0 and getattr(e, "device_type", None) is not None and \
                str(getattr(e, "device_type")).endswith("CUDA")
        else:
            total = e.self_cpu_time_total
            is_kernel = total > 0 and e.key.startswith("aten::")
        if not is_kernel:
            continue
        rows.append(dict(kernel=e.key, calls=int(e.count), total_us=round(float(total), 2),
                         mean_us=round(float(total) / max(1, e.count), 2),
                         launches_per_call=round(e.count / calls, 2)))
    rows.sort(key=lambda r: -r["total_us"])
    grand = sum(r["total_us"] for r in rows) or 1.0
    for r in rows:
        r["share"] = round(r["total_us"] / grand, 4)
    return rows


def profile_torch(results: str, device: str, tiny: bool, calls: int = 5) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    import capsnet_ext

    dev = torch.device(device)
    shape = TINY if tiny else MNIST
    if dev.type == "cuda":
        backends = [b for b in ("triton", "cuda", "reference") if capsnet_ext.unavailable_reason(b, dev) is None]
        dtypes = ("float32", "bfloat16")
        activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    else:
        backends, dtypes, activities = ["reference"], ("float32",), [ProfilerActivity.CPU]
    out = dict(shape=shape, device=str(dev), calls=calls, runs=[],
               unavailable={b: capsnet_ext.unavailable_reason(b, dev) for b in ("triton", "cuda")
                            if capsnet_ext.unavailable_reason(b, dev) is not None})
    for backend in backends:
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            u, W, bias = _inputs(shape, dtype, dev)
            for mode in MODES:
                run = dict(backend=backend, dtype=dtype_name, mode=mode)
                try:
                    for _ in range(2):  # compile, autotune, warm the caches
                        _call(backend, mode, u, W, bias, shape["iterations"])
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    with profile(activities=activities) as prof:
                        for _ in range(calls):
                            _call(backend, mode, u, W, bias, shape["iterations"])
                        if dev.type == "cuda":
                            torch.cuda.synchronize(dev)
                    run["kernels"] = kernel_table(prof.key_averages(), calls, dev.type)
                except Exception as exc:  # recorded; the other runs go on
                    run["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
                out["runs"].append(run)
    _write(os.path.join(results, "profile-torch.json"), json.dumps(out, indent=1))
    _write(os.path.join(results, "profile-torch.txt"), render_torch(out))
    return out


def render_torch(data: dict) -> str:
    lines = [f"torch.profiler kernel tables: capsule_routing {data['shape']}, {data['device']}, "
             f"{data['calls']} calls each after a warm-up"]
    for backend, reason in (data.get("unavailable") or {}).items():
        lines.append(f"(backend {backend} not profiled: {reason})")
    for run in data["runs"]:
        lines += ["", f"== {run['backend']} {run['dtype']} {run['mode']}"]
        if "error" in run:
            lines.append(f"error: {run['error']}")
            continue
        lines.append(f"{'kernel':70s} {'calls':>6s} {'total us':>10s} {'mean us':>9s} {'per call':>8s} {'share':>6s}")
        for r in run["kernels"]:
            lines.append(f"{r['kernel'][:70]:70s} {r['calls']:6d} {r['total_us']:10.1f} {r['mean_us']:9.2f} "
                         f"{r['launches_per_call']:8.2f} {100 * r['share']:5.1f}%")
    return "\n".join(lines) + "\n"


def ncu_target(backend: str, dtype_name: str, mode: str, calls: int) -> int:
    """The process ncu profiles: a warm-up call outside the NVTX range, then ``calls`` calls
    inside it (ncu's ``--nvtx-include`` keeps just those)."""
    import torch

    dev = torch.device("cuda")
    u, W, bias = _inputs(MNIST, getattr(torch, dtype_name), dev)
    _call(backend, mode, u, W, bias, MNIST["iterations"])
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push(NVTX_RANGE)
    for _ in range(calls):
        _call(backend, mode, u, W, bias, MNIST["iterations"])
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_pop()
    return 0


def parse_ncu_csv(text: str) -> Dict[str, dict]:
    """Per kernel name (first profiled launch of each): the metrics of ncu's
    ``--csv --page details`` output that the summary uses, with the top stall reason."""
    start = text.find('"ID"')
    if start < 0:
        return {}
    kernels: Dict[str, dict] = {}
    first_id: Dict[str, str] = {}
    for row in csv.DictReader(io.StringIO(text[start:])):
        name = row.get("Kernel Name") or ""
        if not name:
            continue
        launch = row.get("ID", "")
        if first_id.setdefault(name, launch) != launch:
            continue
        entry = kernels.setdefault(name, dict(metrics={}, stalls={}))
        metric, value = row.get("Metric Name") or "", (row.get("Metric Value") or "").replace(",", "")
        try:
            number = float(value)
        except ValueError:
            continue
        match = STALL_METRIC.match(metric)
        if match:
            entry["stalls"][match.group(1)] = number
        else:
            entry["metrics"][metric] = number
    for entry in kernels.values():
        m = entry["metrics"]
        entry["achieved_occupancy_pct"] = m.get("Achieved Occupancy")
        entry["theoretical_occupancy_pct"] = m.get("Theoretical Occupancy")
        entry["duration"] = m.get("Duration")
        entry["registers"] = m.get("Registers Per Thread")
        stalls = {k: v for k, v in entry["stalls"].items() if k not in ("selected",)}
        entry["top_stall"] = max(stalls, key=stalls.get) if stalls else None
        entry["top_stall_cycles"] = stalls.get(entry["top_stall"]) if stalls else None
    return kernels


def _short(name: str) -> str:
    return re.sub(r"\(.*", "", name)[:60]


def summarize(results: str) -> List[str]:
    """Summary lines: per backend and dtype, the three most expensive kernels (forward +
    backward) with their share, achieved occupancy and top stall reason where ncu ran."""
    path = os.path.join(results, "profile-torch.json")
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        data = json.load(handle)
    ncu: Dict[str, dict] = {}
    for ncu_path in sorted(os.listdir(results)):
        if ncu_path.startswith("profile-ncu") and ncu_path.endswith(".json"):
            with open(os.path.join(results, ncu_path)) as handle:
                for name, entry in json.load(handle).items():
                    ncu.setdefault(_short(name), entry)
    lines = []
    for run in data["runs"]:
        if run["mode"] != "forward_backward":
            continue
        head = f"- {run['backend']} {run['dtype']}, forward+backward"
        if "error" in run:
            lines.append(f"{head}: error {run['error'][:200]}")
            continue
        total = sum(r["total_us"] for r in run["kernels"]) / max(1, data["calls"])
        parts = []
        for r in run["kernels"][:3]:
            extra = ""
            entry = ncu.get(_short(r["kernel"]))
            if entry:
                occ = entry.get("achieved_occupancy_pct")
                extra = (f", occupancy {occ:.0f}%" if occ is not None else "") + (
                    f", top stall {entry['top_stall']}" if entry.get("top_stall") else "")
            parts.append(f"`{_short(r['kernel'])}` {100 * r['share']:.0f}% "
                         f"({r['launches_per_call']:g}/call{extra})")
        lines.append(f"{head}: {total:.0f} µs of kernels per call; " + "; ".join(parts))
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu_profile", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("torch", help="torch.profiler kernel tables into RESULTS")
    t.add_argument("results")
    t.add_argument("--device", default="cuda")
    t.add_argument("--tiny", action="store_true", help="a tiny shape (the dry run's CPU stand-in)")
    t.add_argument("--calls", type=int, default=5)
    n = sub.add_parser("ncu-target", help="the process ncu profiles")
    n.add_argument("--backend", required=True)
    n.add_argument("--dtype", default="float32")
    n.add_argument("--mode", choices=MODES, default="forward_backward")
    n.add_argument("--calls", type=int, default=1)
    c = sub.add_parser("ncu-parse", help="ncu --csv --page details output -> JSON")
    c.add_argument("csv_path")
    c.add_argument("out")
    args = p.parse_args(argv)
    if args.command == "torch":
        data = profile_torch(args.results, args.device, args.tiny, args.calls)
        print(render_torch(data))
        return 1 if any("error" in r for r in data["runs"]) or not data["runs"] else 0
    if args.command == "ncu-target":
        return ncu_target(args.backend, args.dtype, args.mode, args.calls)
    with open(args.csv_path, errors="replace") as handle:
        parsed = parse_ncu_csv(handle.read())
    _write(args.out, json.dumps(parsed, indent=1))
    print(f"{len(parsed)} kernels parsed from {args.csv_path}")
    return 0 if parsed else 1


if __name__ == "__main__":
    sys.exit(main())
