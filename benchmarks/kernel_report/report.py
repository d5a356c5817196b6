"""Assemble, print and write the static kernel report."""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

from capsnet_ext._atomic import atomic_write

from . import model
from .gpus import GPUSpec

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STATIC_DIR = os.path.join(ROOT, "benchmarks", "results", "static")
DEFAULT_CACHE = os.path.join(ROOT, ".cache", "kernel_report")
MNIST_SHAPE = dict(B=128, I=1152, J=10, Din=8, Dout=16)

DYNAMIC_TEXT = (
    "Dynamic instruction counts are not knowable from the binary alone: loop trip counts depend "
    "on the launch arguments. They are estimated by running the kernel sources on the CPU for "
    "the first and last block of every launch, with the recorded arguments: Triton kernels in "
    "Triton's interpreter with a counter before every statement (a block-level program, so a "
    "statement's count is what each warp executes), every SASS instruction then weighted by the "
    "executions of the SASS loop it sits in (the median count of its body's source statements, "
    "matched through nvdisasm's inlining chains); csrc kernels in the CPU emulation built with "
    "gcov, as a floor of one instruction per executed source line per thread (nvcc versions and "
    "partially unrolls loops, so its SASS loops cannot be matched to source iterations). The "
    "mean of the sampled blocks stands for every block. Not modelled: data-dependent branches "
    "(the inputs are random), divergence within a warp, and predicated-off instructions (counted "
    "as issued, which they are).")


def _git(*args) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT)
        return out.stdout.strip() if out.returncode == 0 else None
    except Exception:
        return None


def versions() -> dict:
    import torch

    out = dict(python=platform.python_version(), torch=torch.__version__)
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception as exc:
        out["triton"] = f"unavailable ({type(exc).__name__})"
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    try:
        out["nvcc"] = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    except Exception:
        out["nvcc"] = "unavailable"
    try:
        out["cxx"] = subprocess.run([os.environ.get("CXX", "g++"), "--version"], capture_output=True,
                                    text=True).stdout.splitlines()[0]
    except Exception:
        out["cxx"] = "unavailable"
    return out


def _strip(obj):
    """JSON-safe copy: parsed SASS objects dropped, tuples as lists, inf as None."""
    if isinstance(obj, dict):
        return {str(k): _strip(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_strip(v) for v in obj]
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    return obj


def totals(result: dict) -> Dict[str, dict]:
    """Per phase: kernel launches, other GPU operations (PyTorch kernels, memsets) and the sum
    of the launch bounds (kernels on one stream run one after another)."""
    out = {}
    for phase in ("forward", "backward"):
        launches = [l for l in result.get("launches", []) if l["phase"] == phase]
        torch_ops = [e for e in result.get("events", []) if e.get("type") == "torch" and e["phase"] == phase]
        memsets = [m for m in result.get("memsets", []) if m["phase"] == phase]
        bounds = [l.get("bound_s") for l in launches]
        out[phase] = dict(kernel_launches=len(launches), torch_kernels=len(torch_ops), memsets=len(memsets),
                          gpu_operations=len(launches) + len(torch_ops) + len(memsets),
                          torch_ops=[e["op"] for e in torch_ops],
                          bound_s=sum(b for b in bounds if b is not None) if bounds and None not in bounds else None)
    f, b = out["forward"]["bound_s"], out["backward"]["bound_s"]
    out["forward+backward"] = dict(
        gpu_operations=out["forward"]["gpu_operations"] + out["backward"]["gpu_operations"],
        kernel_launches=out["forward"]["kernel_launches"] + out["backward"]["kernel_launches"],
        bound_s=(f + b) if f is not None and b is not None else None)
    return out


def build(args, results: Dict[str, dict], gpu: GPUSpec, seconds: float, argv: Sequence[str]) -> dict:
    for result in results.values():
        if result.get("status") == "ok":
            result["totals"] = totals(result)
    commit = _git("rev-parse", "HEAD")
    # Result files and the generated README do not make the code dirty.
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results",
                 ":!benchmarks/README.md")
    return _strip(dict(
        tool="benchmarks.kernel_report",
        command="python -m benchmarks.kernel_report " + shlex.join(argv),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        git_commit=commit, git_dirty=bool(dirty), label=args.label or f"git-{(commit or 'unknown')[:7]}",
        versions=versions(), target=gpu.as_dict(),
        problem=dict(op=args.op, dtype=args.dtype, shape=args.shape_dict, iterations=args.iterations,
                     bias=not args.no_bias),
        model=model.MODEL_TEXT, dynamic_counts=DYNAMIC_TEXT, seconds=round(seconds, 1),
        backends=results,
    ))


def json_name(payload: dict) -> str:
    label = re.sub(r"[^A-Za-z0-9_.-]+", "-", payload["label"])
    p = payload["problem"]
    return f"{label}-{p['op']}-{p['dtype']}-sm{payload['target']['arch']}.json"


def write(payload: dict, out_dir: str = STATIC_DIR) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, json_name(payload))
    atomic_write(path, json.dumps(payload, indent=1, sort_keys=False) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------
def _us(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:.2f}"


def _num(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"
    return f"{x:,}"


def _table(header: List[str], rows: List[List[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))]
                     + [fmt.format(*[str(c) for c in row]) for row in rows])


MIX_COLUMNS = ["FFMA", "FP32 other", "FP64", "HMMA", "HGMMA", "DMMA", "LDG", "STG", "LDS", "STS", "LDL/STL",
               "BAR", "SHFL", "MUFU", "other"]


def launch_rows(result: dict) -> List[List[str]]:
    rows = []
    for l in result["launches"]:
        occ = l.get("occupancy") or {}
        rows.append([
            l["phase"][:3], l["variant"], l["label"], "x".join(str(g) for g in l["grid"]),
            f"{l['num_warps']}/{l['num_stages'] if l.get('num_stages') is not None else '-'}",
            _num(l.get("registers")), f"{_num(l.get('local_bytes'))}/{_num(l.get('stack_bytes'))}",
            _num(l.get("shared_bytes")),
            f"{occ.get('blocks_per_sm', '-')} ({occ.get('occupancy', 0) * 100:.0f}%)" if occ else "-",
            f"{l['waves']:.2f}" if l.get("waves") is not None else "-",
            _num((l.get("dynamic") or {}).get("per_warp_total")),
            _num(l.get("bytes")), _us(l.get("bound_s")), l.get("bound_by", "-"),
        ])
    return rows


LAUNCH_HEADER = ["ph", "id", "kernel", "grid", "warps/stages", "regs", "local/stack B", "smem B",
                 "blocks/SM (occ)", "waves", "instr/warp", "bytes", "bound us", "bound by"]


def variant_rows(result: dict) -> List[List[str]]:
    rows = []
    for v in result["variants"]:
        mix = (v.get("static_mix") or {}).get("by_category", {})
        hmma = mix.get("HMMA", 0) + mix.get("HGMMA", 0) + mix.get("DMMA", 0)
        rows.append([v["id"], v["label"], _num(v.get("registers")), _num((v.get("static_mix") or {}).get("total")),
                     *[_num(mix.get(c)) for c in ("FFMA", "FP32 other", "FP64")], _num(hmma),
                     *[_num(mix.get(c)) for c in ("LDG", "STG", "LDS", "STS", "LDL/STL", "BAR", "SHFL", "MUFU")],
                     v.get("error", "")[:60]])
    return rows


VARIANT_HEADER = ["id", "kernel", "regs", "SASS", "FFMA", "FP32 oth", "FP64", "HMMA/HGMMA/DMMA", "LDG", "STG",
                  "LDS", "STS", "LDL/STL", "BAR", "SHFL", "MUFU", "note"]


def totals_rows(payload: dict) -> List[List[str]]:
    rows = []
    for backend, result in payload["backends"].items():
        if result.get("status") != "ok":
            rows.append([backend, result.get("status", "?"), "", "", "", ""])
            continue
        t = result["totals"]
        for phase in ("forward", "backward", "forward+backward"):
            p = t[phase]
            extra = p.get("torch_kernels", "") if phase != "forward+backward" else ""
            memsets = p.get("memsets", "") if phase != "forward+backward" else ""
            rows.append([backend, phase, str(p["kernel_launches"]), f"{extra}/{memsets}" if phase != "forward+backward" else "",
                         str(p["gpu_operations"]), _us(p["bound_s"])])
    return rows


TOTALS_HEADER = ["backend", "phase", "kernel launches", "torch kernels/memsets", "GPU operations",
                 "lower bound us (sum of launches)"]


def render(payload: dict, markdown: bool = False) -> str:
    p = payload["problem"]
    s = p["shape"]
    head = (f"Static kernel report: {p['op']} {p['dtype']} B={s['B']} I={s['I']} J={s['J']} Din={s['Din']} "
            f"Dout={s['Dout']} iterations={p['iterations']} bias={p['bias']} on {payload['target']['name']} "
            f"(sm_{payload['target']['arch']}, simulated: nothing ran on a GPU); label {payload['label']}, "
            f"commit {str(payload['git_commit'])[:7]}{' (dirty)' if payload['git_dirty'] else ''}, "
            f"{payload['date']}, {payload['seconds']} s")
    parts = [head, "", _table(TOTALS_HEADER, totals_rows(payload), markdown)]
    for backend, result in payload["backends"].items():
        if result.get("status") != "ok":
            continue
        parts += ["", f"{backend}: launches in order", "", _table(LAUNCH_HEADER, launch_rows(result), markdown)]
        parts += ["", f"{backend}: kernel variants, static SASS instruction mix", "",
                  _table(VARIANT_HEADER, variant_rows(result), markdown)]
        if result.get("totals"):
            ops = result["totals"]["forward"]["torch_ops"] + result["totals"]["backward"]["torch_ops"]
            if ops:
                parts += ["", f"{backend}: PyTorch ops that start a GPU kernel (not modelled): {', '.join(ops)}"]
        for note in result.get("notes", []):
            parts.append(f"{backend}: note: {note}")
    return "\n".join(parts)


MODEL_FOOTER = """Model of the lower bound (per launch, then summed over the launches of a phase):

{model}

{dynamic}"""


def print_report(payload: dict, out=None) -> None:
    out = out or sys.stdout
    print(render(payload), file=out)
    print("", file=out)
    print(MODEL_FOOTER.format(model=payload["model"], dynamic=payload["dynamic_counts"]), file=out)


def load_static(out_dir: str = STATIC_DIR) -> List[dict]:
    runs = []
    if not os.path.isdir(out_dir):
        return runs
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".json"):
            with open(os.path.join(out_dir, name)) as handle:
                try:
                    payload = json.load(handle)
                except json.JSONDecodeError:
                    continue
            if payload.get("tool") == "benchmarks.kernel_report":
                payload["_file"] = name
                runs.append(payload)
    return runs


MEASURED_DIR = os.path.join(ROOT, "benchmarks", "results")


def measured_times(results_dir: str = MEASURED_DIR) -> Dict[tuple, dict]:
    """The newest GPU measurement of each (architecture, op, backend, dtype, shape, iterations,
    bias, mode)
    among the committed benchmark results (``capsnet-ext bench`` JSONs run on CUDA devices):
    the median in seconds, the GPU, the date and the commit."""
    found: Dict[tuple, dict] = {}
    if not os.path.isdir(results_dir):
        return found
    for name in sorted(os.listdir(results_dir)):
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(results_dir, name)) as handle:
                payload = json.load(handle)
        except (OSError, json.JSONDecodeError):
            continue
        meta = payload.get("meta") or {}
        device = meta.get("device") or {}
        if device.get("type") != "cuda":
            continue
        for r in payload.get("results", []):
            options = r.get("options") or {}
            if (r.get("status") != "ok" or r.get("contender_kind") == "compiled"
                    or options.get("detach_inner") or options.get("leaky")):
                continue
            shape = r["shape"]
            arch = str(device.get("capability", "")).replace(".", "")
            key = (arch, r["op"], r["contender"], r["dtype"],
                   tuple(shape[k] for k in ("B", "I", "J", "Din", "Dout")), shape.get("iterations"),
                   bool((r.get("options") or {}).get("bias")), r["mode"])
            entry = dict(median_s=r["time_s"]["median"], gpu=device.get("name"),
                         date=meta.get("date", ""), commit=str(meta.get("git_commit"))[:7],
                         file=name)
            if key not in found or entry["date"] > found[key]["date"]:
                found[key] = entry
    return found


_RATIOS: List[float] = []  # measured / bound of the rows rendered by the last readme_section


def _measured_columns(problem: dict, arch, backend: str, totals_: dict, measured: Dict[tuple, dict]):
    s = problem["shape"]
    base = (str(arch), problem["op"], backend, problem["dtype"], tuple(s[k] for k in ("B", "I", "J", "Din", "Dout")),
            problem["iterations"], bool(problem["bias"]))
    fwd, both = measured.get(base + ("forward",)), measured.get(base + ("forward_backward",))
    cells = []
    for got, bound in ((fwd, totals_["forward"]["bound_s"]), (both, totals_["forward+backward"]["bound_s"])):
        if got is None:
            cells.append("not measured")
            continue
        ratio = ""
        if bound:
            _RATIOS.append(got["median_s"] / bound)
            ratio = f", {got['median_s'] / bound:.1f}x the bound"
        cells.append(f"{_us(got['median_s'])} ({got['gpu']}, {got['commit']}{ratio})")
    return cells


def readme_section(out_dir: str = STATIC_DIR, results_dir: str = MEASURED_DIR) -> str:
    """The generated README's section: every static report JSON, grouped by problem and target
    so that designs (labels) sit side by side."""
    runs = load_static(out_dir)
    lines = ["## Static kernel report (no GPU needed)", "",
             "`python -m benchmarks.kernel_report` (or `capsnet-ext bench --static`) records every launch "
             "of an op's forward and backward, compiles each kernel for a named GPU without one, and "
             "reports registers, spills, shared memory, the SASS instruction mix, occupancy, waves and a "
             "lower-bound time. `--help` lists the options (op, backend, dtype, shape, `--gpu h100|a100`, "
             "`--label`). These are compiler facts and a model, not measurements: the times are lower "
             "bounds, not predictions. Beside each bound stands the newest GPU measurement of the same "
             "problem among the committed benchmark results (median, GPU, commit), on the newest "
             "design's row of each backend (measured on a GPU of the target's architecture), and the ratio of the two: the model's error where the "
             "commits hold the same kernels; the range of these ratios closes the section. A model "
             "this far off cannot rank designs: only a GPU measurement can (the tuning sweep, "
             "`python -m benchmarks.tune`).", ""]
    measured = measured_times(results_dir)
    _RATIOS.clear()
    if not runs:
        return "\n".join(lines + ["No static report is committed under `benchmarks/results/static/`.", ""])
    groups: Dict[tuple, List[dict]] = {}
    for run in runs:
        p = run["problem"]
        key = (p["op"], p["dtype"], json.dumps(p["shape"], sort_keys=True), p["iterations"], p["bias"],
               run["target"]["arch"])
        groups.setdefault(key, []).append(run)
    for key, group in sorted(groups.items()):
        group.sort(key=lambda r: r["date"])
        p = group[0]["problem"]
        s = p["shape"]
        lines += [f"### {p['op']}, {p['dtype']}, B={s['B']} I={s['I']} J={s['J']} Din={s['Din']} Dout={s['Dout']}, "
                  f"{p['iterations']} iterations, bias={p['bias']}, {group[0]['target']['name']}", ""]
        header = ["design (label)", "commit", "backend", "fwd GPU ops", "fwd bound us", "bwd GPU ops",
                  "bwd bound us", "fwd+bwd bound us", "fwd measured", "fwd+bwd measured"]
        rows = []
        newest = {}  # backend -> the newest run that reports it: the one measurements stand beside
        for run in group:
            for backend, result in run["backends"].items():
                if result.get("status") == "ok":
                    newest[backend] = run["_file"]
        for run in group:
            for backend, result in run["backends"].items():
                if result.get("status") != "ok":
                    rows.append([run["label"], str(run["git_commit"])[:7], backend, result.get("status", "?"),
                                 "", "", "", "", "", ""])
                    continue
                t = result["totals"]
                rows.append([run["label"], str(run["git_commit"])[:7], backend, str(t["forward"]["gpu_operations"]),
                             _us(t["forward"]["bound_s"]), str(t["backward"]["gpu_operations"]),
                             _us(t["backward"]["bound_s"]), _us(t["forward+backward"]["bound_s"])]
                            + (_measured_columns(p, run["target"]["arch"], backend, t, measured)
                               if newest.get(backend) == run["_file"] else ["", ""]))
        lines += [_table(header, rows, True), ""]
        for run in group:
            lines += [f"<details><summary>{run['label']}: launches and kernels ({run['_file']}, "
                      f"{run['date']})</summary>", "", "```", render(run), "```", "", "</details>", ""]
    if _RATIOS:
        lines += [f"The model's error over the {len(_RATIOS)} measured cells above: the measured "
                  f"times are {min(_RATIOS):.1f}x to {max(_RATIOS):.1f}x the lower bounds.", ""]
    lines += ["Model of the lower bound:", "", model.MODEL_TEXT, "", DYNAMIC_TEXT, ""]
    return "\n".join(lines)

