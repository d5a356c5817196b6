"""What both backends share: a compiled kernel's statistics and one launch's metrics."""
from __future__ import annotations

from typing import Dict, Optional

from . import model, sass
from .gpus import GPUSpec


def kernel_stats(cubin: str, function: str, spills: Optional[dict] = None) -> dict:
    """Registers, stack and local (spill) bytes per thread, static shared memory, the static
    SASS instruction mix and the loops of ``function`` in ``cubin``. The parsed SASS is kept
    under ``"_sass"`` (not serialised) for the dynamic estimate."""
    usage = sass.resource_usage(cubin)
    functions = sass.disassemble(cubin)
    if function not in functions or function not in usage:
        raise RuntimeError(f"function {function} not found in {cubin} (has {sorted(functions)[:5]})")
    fn = functions[function]
    stats = dict(function=function, **usage[function])
    if spills and function in spills:
        stats.update(spills[function])
    stats["static_mix"] = sass.instruction_mix(fn.instructions)
    stats["static_loops"] = len(fn.loops())
    stats["_sass"] = fn
    return stats


def launch_metrics(variant: dict, gpu: GPUSpec, blocks: int, threads_per_block: int,
                   line_counts: Optional[Dict[str, float]], source_file: Optional[str],
                   bytes_moved: Optional[float], dynamic_shared_bytes: int = 0,
                   statement_of_line: Optional[dict] = None, method: str = "loops") -> dict:
    """Occupancy, waves, the dynamic instruction estimate and the lower-bound time of one
    launch of a compiled ``variant`` (see :mod:`.model`)."""
    if "_sass" not in variant:
        return dict(bound_s=None, note=variant.get("error", "kernel not compiled"))
    fn = variant["_sass"]
    shared = variant.get("shared_bytes", 0) + dynamic_shared_bytes
    occ = model.occupancy(gpu, threads_per_block, variant["registers"], shared)
    if method == "line_floor":
        dyn = sass.line_floor_estimate(fn, line_counts, source_file)
    else:
        dyn = sass.dynamic_estimate(fn, line_counts, source_file, statement_of_line)
    mix = sass.instruction_mix(fn.instructions, dyn["weights"])
    per_warp = mix["total"]
    cats = mix["by_category"]
    warps = max(1, threads_per_block // 32)
    bound = model.launch_bound(gpu, blocks, warps, occ["blocks_per_sm"], per_warp, cats.get("FP64", 0.0),
                               cats.get("MUFU", 0.0), bytes_moved,
                               fp32_per_warp=cats.get("FFMA", 0.0) + cats.get("FP32 other", 0.0))
    return dict(
        shared_bytes=shared, registers=variant["registers"], local_bytes=variant["local_bytes"],
        stack_bytes=variant["stack_bytes"], occupancy=occ, waves=bound["waves"],
        dynamic=dict(per_warp_total=per_warp, per_warp_by_category={k: round(v, 1) for k, v in cats.items()},
                     launch_warp_instructions=per_warp * warps * blocks, loops=dyn["loops"], notes=dyn["notes"],
                     counted=line_counts is not None, method=method if line_counts is not None else "static"),
        bytes=bytes_moved, bound_s=bound["bound_s"], bound_by=bound["bound_by"], bounds_s=bound["bounds_s"],
    )
