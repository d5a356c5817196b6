"""Run metadata, the JSON file, the stdout table and the plots."""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
from typing import Dict, List, Optional, Sequence

import torch

from capsnet_ext._atomic import atomic_path, atomic_write

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Committed results (what benchmarks/README.md is generated from); a run writes here only when
# asked to with --out-dir benchmarks/results.
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")
# Where `capsnet-ext bench` writes by default: a git-ignored folder under the current folder.
DEFAULT_OUT_DIR = os.path.join("runs", "bench")
SCHEMA_VERSION = 1


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> Dict[str, object]:
    """What the numbers were measured on."""
    info: Dict[str, object] = dict(type=device.type)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_bytes=int(props.total_memory),
                    multiprocessors=int(props.multi_processor_count),
                    l2_cache_bytes=int(getattr(props, "L2_cache_size", 0)) or None)
    else:
        info.update(name=_cpu_model(), logical_cores=os.cpu_count(),
                    torch_threads=torch.get_num_threads())
    return info


def run_metadata(device: torch.device, command: str, argv: Sequence[str]) -> Dict[str, object]:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - Triton is optional
        triton_version = None
    commit = os.environ.get("COMMIT", "").strip()
    if commit:
        # The GPU check passes the commit it checks: its tree may be a copy inside another
        # checkout, whose HEAD git would report instead.
        status = "dirty" if os.environ.get("COMMIT_DIRTY") == "1" else ""
    else:
        commit = _git("rev-parse", "HEAD")
        status = _git("status", "--porcelain", "--untracked-files=no")
    return dict(
        schema=SCHEMA_VERSION,
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        command=command,
        argv=list(argv),
        git_commit=commit,
        git_dirty=None if status is None else bool(status),
        device=device_info(device),
        torch=torch.__version__,
        triton=triton_version,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        python=platform.python_version(),
        platform=platform.platform(),
        machine=f"{platform.machine()}, {_cpu_model()}, {os.cpu_count()} logical cores",
        triton_interpret=os.environ.get("TRITON_INTERPRET"),
    )


def jsonable(value):
    """``value`` with non-finite floats as the strings ``"inf"``, ``"-inf"``, ``"nan"`` (strict
    JSON has no such numbers; a wrong contender's error can be infinite)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def write_json_atomic(path: str, payload: dict) -> None:
    """Write ``payload`` to ``path`` (strict JSON) through a temporary file and ``os.replace``."""
    atomic_write(path, json.dumps(jsonable(payload), indent=1, allow_nan=False) + "\n")


def result_basename(meta: Dict[str, object], quick: bool) -> str:
    """``<device>-<YYYYmmddTHHMMSS>[-quick]``, e.g. ``cuda-nvidia-h100-80gb-hbm3-20261122T...``."""
    dev = meta["device"]
    name = f"{dev['type']}-{dev['name']}".lower()
    slug = "".join(ch if ch.isalnum() else "-" for ch in name)
    while "--" in slug:
        slug = slug.replace("--", "-")
    stamp = str(meta["date"]).replace("-", "").replace(":", "")[:15]
    return f"{slug.strip('-')[:60]}-{stamp}" + ("-quick" if quick else "")


# --------------------------------------------------------------------------- table

def _fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "-"


def _fmt_time(t: Optional[dict]) -> str:
    if not t:
        return "-"
    med = t["median"]
    if med >= 1:
        return f"{med:.3f} s"
    if med >= 1e-3:
        return f"{med * 1e3:.3f} ms"
    return f"{med * 1e6:.1f} us"


def _spread(t: Optional[dict]) -> str:
    if not t or not t["median"]:
        return "-"
    return f"±{50 * (t['p80'] - t['p20']) / t['median']:.0f}%"


def op_table_rows(records: Sequence[dict]) -> List[List[str]]:
    """Rows ``[op, dtype, shape, mode, contender, time, spread, % floor, peak, saved, status]``."""
    rows = []
    for r in records:
        s = r["shape"]
        shape = f"B={s['B']} I={s['I']} J={s['J']} Din={s['Din']} Dout={s['Dout']}" + (
            "" if r["op"] == "predict" else f" R={s['iterations']}")
        frac = r.get("fraction_of_floor")
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {(r['reason'] or '')[:80].strip()}"
        rows.append([r["op"], r["dtype"], shape, r["mode"], r["contender"], _fmt_time(r["time_s"]),
                     _spread(r["time_s"]), "-" if frac is None else f"{100 * frac:.1f}%",
                     _fmt_bytes(r["peak_bytes"]), _fmt_bytes(r["saved_bytes_beyond_inputs"]), status])
    return rows


OP_HEADER = ["op", "dtype", "shape", "mode", "contender", "median", "spread", "of floor",
             "peak mem", "saved", "status"]
E2E_HEADER = ["backend", "mode", "precision", "batch", "steps/s", "images/s", "peak mem", "status"]


def e2e_table_rows(records: Sequence[dict]) -> List[List[str]]:
    rows = []
    for r in records:
        ok = r["status"] == "ok"
        rows.append([r["backend"], "compiled" if r["compiled"] else "eager", r["precision"], str(r["batch"]),
                     f"{r['steps_per_s']:.2f}" if ok else "-", f"{r['images_per_s']:.1f}" if ok else "-",
                     _fmt_bytes(r.get("peak_bytes")),
                     "ok" if ok else f"{r['status']}: {(r['reason'] or '')[:100].strip()}"])
    return rows


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in rows]
    return "\n".join(out)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    out += ["| " + " | ".join(str(x).replace("|", "\\|") for x in row) + " |" for row in rows]
    return "\n".join(out)


# --------------------------------------------------------------------------- plots

def plot_sweeps(payload: dict, out_dir: str, basename: str) -> List[str]:
    """PNG plots of time and memory against ``I`` per contender (log-log), one figure per
    (op, mode, dtype) with data from the ``I`` sweep. Memory is the GPU peak where measured,
    otherwise the bytes saved for backward (forward+backward only). Returns the files."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    device = payload["meta"]["device"]
    records = [r for r in payload["results"] if "I" in r["sweeps"] and r["status"] == "ok"]
    groups: Dict[tuple, List[dict]] = {}
    for r in records:
        groups.setdefault((r["op"], r["mode"], r["dtype"]), []).append(r)
    files = []
    os.makedirs(out_dir, exist_ok=True)
    for (op, mode, dtype), recs in sorted(groups.items()):
        by_contender: Dict[str, List[dict]] = {}
        for r in recs:
            by_contender.setdefault(r["contender"], []).append(r)
        use_peak = any(r["peak_bytes"] is not None for r in recs)
        mem_key = "peak_bytes" if use_peak else "saved_bytes_beyond_inputs"
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
        for name, rs in sorted(by_contender.items()):
            rs = sorted(rs, key=lambda r: r["shape"]["I"])
            xs = [r["shape"]["I"] for r in rs]
            ax_t.errorbar(xs, [r["time_s"]["median"] * 1e3 for r in rs],
                          yerr=[[max(0.0, (r["time_s"]["median"] - r["time_s"]["p20"]) * 1e3) for r in rs],
                                [max(0.0, (r["time_s"]["p80"] - r["time_s"]["median"]) * 1e3) for r in rs]],
                          marker="o", capsize=3, label=name)
            mem = [(x, r[mem_key]) for x, r in zip(xs, rs) if r[mem_key]]
            if mem:
                ax_m.plot([m[0] for m in mem], [m[1] / 2 ** 20 for m in mem], marker="o", label=name)
        # The floor, for scale.
        floor_pts = sorted({(r["shape"]["I"], r["floor"].get("time_s")) for r in recs if r["floor"].get("time_s")})
        if floor_pts:
            ax_t.plot([p[0] for p in floor_pts], [p[1] * 1e3 for p in floor_pts], "k--", label="floor")
        s = recs[0]["shape"]
        fixed = f"B={s['B']} J={s['J']} Din={s['Din']} Dout={s['Dout']}" + (
            "" if op == "predict" else f" R={s['iterations']}")
        for ax in (ax_t, ax_m):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("input capsules I")
            ax.grid(True, which="both", alpha=0.3)
        ax_t.set_ylabel("median time (ms)")
        ax_t.set_title(f"{op} {mode} {dtype}: time")
        ax_m.set_ylabel(("peak allocated" if use_peak else "saved for backward") + " (MiB)")
        ax_m.set_title(f"{op} {mode} {dtype}: memory")
        if ax_m.has_data():
            ax_m.legend(fontsize=8)
        ax_t.legend(fontsize=8)
        fig.suptitle(f"{device['name']} ({device['type']}), {fixed}", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{basename}-{op}-{mode}-{dtype}.png")
        try:
            with atomic_path(path, suffix=".png") as tmp:
                fig.savefig(tmp, dpi=90, format="png")
        finally:
            plt.close(fig)
        files.append(path)
    return files
