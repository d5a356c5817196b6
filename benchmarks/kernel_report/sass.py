"""Reading compiled kernels: resource usage (cuobjdump), SASS (nvdisasm) with source lines,
the instruction mix, loops, and a dynamic instruction estimate from per-line execution counts.

The tools come from the triton wheel (``triton/backends/nvidia/bin``), so no CUDA toolkit is
needed for Triton kernels; the CUDA toolkit's own copies are used when the wheel lacks them.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import statistics
import subprocess
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

# Instruction classes reported in the mix. Every opcode falls in exactly one class, so the
# classes sum to the total; the full per-opcode histogram is kept beside them.
CATEGORIES = {
    "FFMA": ("FFMA", "FFMA2"),
    "FP32 other": ("FADD", "FMUL", "FMNMX", "FSETP", "FSEL", "FSET", "FCHK", "FRND", "FSWZADD"),
    "FP64": ("DFMA", "DADD", "DMUL", "DSETP", "DMNMX"),
    "HMMA": ("HMMA",),
    "HGMMA": ("HGMMA", "WGMMA"),
    "DMMA": ("DMMA",),
    "IMMA": ("IMMA", "IGMMA"),
    "MUFU": ("MUFU",),
    "LDG": ("LDG", "LD"),
    "STG": ("STG", "ST"),
    "LDS": ("LDS", "LDSM"),
    "STS": ("STS",),
    "LDL/STL": ("LDL", "STL"),
    "ATOM/RED": ("ATOM", "ATOMG", "ATOMS", "RED", "REDG"),
    "BAR": ("BAR", "BSYNC", "WARPSYNC", "SYNCS"),
    "SHFL": ("SHFL",),
    "branch": ("BRA", "BRX", "JMP", "JMX", "CALL", "RET", "EXIT", "BSSY", "BREAK", "BPT"),
}
_CATEGORY_OF = {op: cat for cat, ops in CATEGORIES.items() for op in ops}
CATEGORY_ORDER = list(CATEGORIES) + ["other"]


def category(base_opcode: str) -> str:
    return _CATEGORY_OF.get(base_opcode, "other")


def find_tool(name: str) -> Optional[str]:
    """Path of a CUDA binary tool (cuobjdump, nvdisasm, ptxas): the triton wheel's, else the
    CUDA toolkit's."""
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(path):
            return path
    except Exception:  # triton is optional for the CUDA half of the report
        pass
    for candidate in (shutil.which(name), f"/usr/local/cuda/bin/{name}"):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def _run(cmd: List[str]) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{os.path.basename(cmd[0])} failed ({result.returncode}): {result.stderr[-2000:]}")
    return result.stdout


# ---------------------------------------------------------------------------------------------
# Resource usage
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _resource_usage(cubin: str, mtime: float) -> Dict[str, dict]:
    """Per function (mangled name): registers, stack, shared, local bytes per thread
    (``cuobjdump --dump-resource-usage``)."""
    out = _run([find_tool("cuobjdump") or "cuobjdump", "--dump-resource-usage", cubin])
    usage = {}
    for name, fields in re.findall(r"Function ([^\s:]+):\s*\n\s*(REG:.*)", out):
        values = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", fields))
        usage[name] = dict(registers=int(values.get("REG", 0)), stack_bytes=int(values.get("STACK", 0)),
                           shared_bytes=int(values.get("SHARED", 0)), local_bytes=int(values.get("LOCAL", 0)))
    return usage


def resource_usage(cubin: str) -> Dict[str, dict]:
    return _resource_usage(cubin, os.path.getmtime(cubin))


def ptxas_spills(ptxas_verbose: str) -> Dict[str, dict]:
    """Per function: spill stores/loads and stack frame bytes from ``ptxas -v`` output."""
    spills = {}
    current = None
    for line in ptxas_verbose.splitlines():
        match = re.search(r"Compiling entry function '([^']+)'", line) or \
            re.search(r"Function properties for (\S+)", line)
        if match:
            current = match.group(1)
            continue
        match = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if match and current:
            spills[current] = dict(stack_frame_bytes=int(match.group(1)), spill_store_bytes=int(match.group(2)),
                                   spill_load_bytes=int(match.group(3)))
    return spills


# ---------------------------------------------------------------------------------------------
# Disassembly
# ---------------------------------------------------------------------------------------------
@dataclass
class Instruction:
    address: int
    opcode: str  # with modifiers, e.g. LDG.E.128
    predicate: str
    operands: str
    file: Optional[str]  # source file of the outermost frame (the kernel function's)
    line: Optional[int]  # the outermost source line: the statement of the kernel itself
    frames: Tuple[Tuple[str, int], ...] = ()  # (file, line) from the kernel's statement inwards

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def bytes_per_thread(self) -> int:
        """Access width of a memory instruction (32-bit unless a width modifier says)."""
        for mod in self.opcode.split(".")[1:]:
            if mod in ("64", "128", "U8", "S8", "U16", "S16"):
                return {"64": 8, "128": 16, "U8": 1, "S8": 1, "U16": 2, "S16": 2}[mod]
        return 4


@dataclass
class Function:
    name: str
    instructions: List[Instruction] = field(default_factory=list)
    labels: Dict[str, int] = field(default_factory=dict)

    def branch_target(self, ins: Instruction) -> Optional[int]:
        match = re.search(r"`\((\.L_x_\d+)\)", ins.operands)
        return self.labels.get(match.group(1)) if match else None

    def loops(self) -> List[Tuple[int, int]]:
        """``(first, last)`` instruction addresses of every loop: a branch back to an earlier
        address closes one (a branch to itself is the trap after EXIT, not a loop)."""
        loops = set()
        for ins in self.instructions:
            if ins.base in ("BRA", "JMP"):
                target = self.branch_target(ins)
                if target is not None and target < ins.address:
                    loops.add((target, ins.address))
        return sorted(loops)


_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)\s*(.*?)\s*;")
_LINE = re.compile(r'File "([^"]+)", line (\d+)')


def disassemble(cubin: str) -> Dict[str, Function]:
    return _disassemble(cubin, os.path.getmtime(cubin))


@functools.lru_cache(maxsize=16)
def _disassemble(cubin: str, mtime: float) -> Dict[str, Function]:
    """SASS of every function in ``cubin`` with, per instruction, the outermost source line
    (``nvdisasm -gi``: an inlined helper's instructions are attributed to the kernel's
    statement that called it)."""
    out = _run([find_tool("nvdisasm") or "nvdisasm", "-c", "-gi", cubin])
    functions: Dict[str, Function] = {}
    current: Optional[Function] = None
    pending_labels: List[str] = []
    pending_locs: List[list] = []
    loc: Tuple[Optional[str], Optional[int], tuple] = (None, None, ())
    for raw in out.splitlines():
        header = re.match(r"\s*//-+ \.text\.(\S+)\s+-+", raw)
        if header:
            current = functions.setdefault(header.group(1), Function(header.group(1)))
            loc, pending_locs = (None, None, ()), []
            continue
        if current is None:
            continue
        if raw.lstrip().startswith("//##"):
            # "line a inlined at ..., line b": innermost first; nvdisasm also prints the
            # outer frame alone on its own line, so the longest chain is the full one.
            matches = _LINE.findall(raw)
            if matches:
                pending_locs.append(matches)
            continue
        label = re.match(r"^(\.L_x_\d+):", raw)
        if label:
            pending_labels.append(label.group(1))
            continue
        match = _INSTR.match(raw)
        if match:
            if pending_locs:
                frames = max(pending_locs, key=len)
                loc = (frames[-1][0], int(frames[-1][1]), tuple((f, int(n)) for f, n in reversed(frames)))
                pending_locs = []
            address = int(match.group(1), 16)
            for name in pending_labels:
                current.labels[name] = address
            pending_labels = []
            current.instructions.append(Instruction(address, match.group(3), (match.group(2) or "").strip(),
                                                    match.group(4), *loc))
    for fn in functions.values():  # alignment padding after the final trap is not code
        fn.instructions = [i for i in fn.instructions if i.base != "NOP"]
    return functions


def instruction_mix(instructions: List[Instruction], weights: Optional[List[float]] = None) -> dict:
    """``{"total": n, "by_category": {...}, "by_opcode": {...}}``; with ``weights`` (executions
    per instruction) the same counts weighted (dynamic)."""
    by_cat = {c: 0.0 for c in CATEGORY_ORDER}
    by_op: Dict[str, float] = {}
    for k, ins in enumerate(instructions):
        w = 1.0 if weights is None else weights[k]
        by_cat[category(ins.base)] += w
        by_op[ins.base] = by_op.get(ins.base, 0.0) + w
    total = sum(by_cat.values())
    if weights is None:
        by_cat = {k: int(v) for k, v in by_cat.items()}
        by_op = {k: int(v) for k, v in by_op.items()}
        total = int(total)
    return dict(total=total, by_category=by_cat, by_opcode=dict(sorted(by_op.items(), key=lambda kv: -kv[1])))


def dynamic_estimate(fn: Function, line_counts: Optional[Dict[str, float]], source_file: Optional[str],
                     statement_of_line: Optional[Dict[str, Dict[str, int]]] = None) -> dict:
    """Executions of each SASS instruction per warp, estimated from how often each source line
    of the kernel ran per warp (``line_counts``, from running the kernel's source on the CPU,
    keyed by line chain "outer/inner" through inlined helpers, or by the kernel's line;
    ``statement_of_line`` maps a file's physical lines to the line of their statement).

    Model: an instruction outside every SASS loop runs once (or never, if its source line
    never ran); one inside a loop runs as often as that loop's body, estimated as the median
    execution count of the source lines of the instructions directly in the body (a SASS loop
    is a backward branch; loops the compiler unrolled are straight-line code in SASS and their
    lines' counts are not used, so unrolling does not inflate the estimate), or as often as its
    own statement if that ran less often (a branch inside the loop). Returns the weights, the
    loops (address range, static size, estimated executions) and notes.
    """
    loops = fn.loops()
    n = len(fn.instructions)
    innermost: List[Optional[int]] = [None] * n
    for k, ins in enumerate(fn.instructions):
        best = None
        for li, (lo, hi) in enumerate(loops):
            if lo <= ins.address <= hi and (best is None or hi - lo < loops[best][1] - loops[best][0]):
                best = li
        innermost[k] = best

    def count_of(ins: Instruction) -> Optional[float]:
        if line_counts is None or ins.line is None:
            return None
        if source_file and ins.file and os.path.realpath(ins.file) != os.path.realpath(source_file):
            return None
        chain = []
        for file, line in ins.frames:
            table = (statement_of_line or {}).get(os.path.realpath(file), {})
            chain.append(str(table.get(str(line), line)))
        if not chain:
            chain = [str(ins.line)]
        key = "/".join(chain)
        if key in line_counts:
            return float(line_counts[key])
        # No inlining chain in the line table (nvdisasm prints one for some instructions only):
        # the busiest call site of that helper line stands in.
        by_inner = by_innermost.get(chain[-1])
        if by_inner is not None:
            return by_inner
        return float(line_counts[chain[0]]) if chain[0] in line_counts else None

    by_innermost: Dict[str, float] = {}
    for key, value in (line_counts or {}).items():
        inner = key.rsplit("/", 1)[-1]
        by_innermost[inner] = max(by_innermost.get(inner, 0.0), float(value))

    trips: List[Optional[float]] = []
    for li in range(len(loops)):
        counts = [c for k, ins in enumerate(fn.instructions) if innermost[k] == li
                  for c in [count_of(ins)] if c is not None and c > 0]
        trips.append(statistics.median(counts) if counts else None)
    weights: List[float] = []
    for k, ins in enumerate(fn.instructions):
        li = innermost[k]
        c = count_of(ins)
        if li is None:
            weights.append(1.0 if c is None else (1.0 if c > 0 else 0.0))
        elif trips[li] is None:
            weights.append(1.0)
        else:
            # Code under a branch inside the loop runs less often than the loop body (its own
            # statement count); a statement counted more often than the body is unrolled
            # in SASS, each copy running once per pass.
            weights.append(trips[li] if c is None else min(c, trips[li]))
    loop_info = [dict(first=f"{lo:#06x}", last=f"{hi:#06x}",
                      static_instructions=sum(1 for k in range(n) if innermost[k] == li),
                      executions_per_warp=trips[li])
                 for li, (lo, hi) in enumerate(loops)]
    unknown = [i for i, t in enumerate(trips) if t is None]
    notes = []
    if line_counts is None:
        notes.append("no source-line execution counts: every instruction counted once (static count)")
    elif unknown:
        notes.append(f"{len(unknown)} loop(s) without line counts counted as one pass")
    return dict(weights=weights, loops=loop_info, notes=notes)


def line_floor_estimate(fn: Function, line_counts: Optional[Dict[str, float]], source_file: Optional[str]) -> dict:
    """A floor on executed instructions per warp: every execution of a source line (per thread,
    from gcov) costs at least one instruction, split over the line's SASS instructions in
    proportion (so the weighted mix keeps the line's instruction classes and sums to the line
    executions). Used where the loop model does not hold: nvcc versions and partially unrolls
    loops with runtime trip counts, so a SASS loop body need not run once per source
    iteration; per-line counts stay valid whatever the compiler did."""
    if line_counts is None:
        return dict(weights=[1.0] * len(fn.instructions), loops=[],
                    notes=["no source-line execution counts: every instruction counted once (static count)"])
    per_line: Dict[str, int] = {}
    for ins in fn.instructions:
        if ins.line is not None and (not source_file or not ins.file
                                     or os.path.realpath(ins.file) == os.path.realpath(source_file)):
            per_line[str(ins.line)] = per_line.get(str(ins.line), 0) + 1
    weights = []
    for ins in fn.instructions:
        key = str(ins.line) if ins.line is not None else None
        if key in per_line and key in line_counts:
            weights.append(float(line_counts[key]) / per_line[key])
        else:
            weights.append(0.0)
    return dict(weights=weights, loops=[], notes=["floor: one instruction per executed source line"])
