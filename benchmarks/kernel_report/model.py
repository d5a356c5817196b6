"""Occupancy, waves and a lower-bound time for one kernel launch on a target GPU.

The model (also printed with every report):

* occupancy: blocks per SM = the smallest of the register, shared-memory, warp and block
  limits (registers are allocated per warp in units of ``register_alloc_unit``; every block
  also reserves ``shared_bytes_reserved_per_block``), as the CUDA occupancy calculator does;
* waves: blocks / (blocks per SM x SMs);
* issue bound: each SM scheduler issues at most one warp instruction per cycle, and the
  busiest SM runs ``ceil(blocks / SMs)`` blocks, so
  ``t >= ceil(blocks / SMs) x warp instructions per block / (schedulers x clock)``;
* warp-serial bound: a warp issues at most one instruction per cycle and an SM runs its
  blocks in at least ``ceil(waves)`` rounds, so ``t >= ceil(waves) x instructions per warp
  / clock``;
* pipe bounds: FP32, FP64 and MUFU (special function) instructions go through pipes of
  ``fp32_warp_instr_per_clk_per_sm`` (4 on H100, 2 on A100), ``fp64_warp_instr_per_clk_per_sm``
  and ``mufu_warp_instr_per_clk_per_sm`` warp instructions per cycle per SM;
* memory bound: bytes of the buffers the kernel reads and writes, each counted once, over
  DRAM bandwidth;
* the launch bound is the largest of these. Instruction latencies, dependency stalls, memory
  latency, bank conflicts, cache misses beyond compulsory traffic, launch overhead (a few
  microseconds per launch, on the CPU side) and clock throttling are not modelled: each only
  makes the real kernel slower, except that data still in L2 from an earlier launch can beat
  the memory bound.
"""
from __future__ import annotations

import math
from typing import Optional

from .gpus import GPUSpec

MODEL_TEXT = __doc__.split("The model (also printed with every report):", 1)[1].strip()


def occupancy(gpu: GPUSpec, threads_per_block: int, registers: int, shared_bytes: int) -> dict:
    warps = max(1, math.ceil(threads_per_block / 32))
    regs_per_warp = math.ceil(max(registers, 1) * 32 / gpu.register_alloc_unit) * gpu.register_alloc_unit
    limits = {
        "registers": (gpu.registers_per_sm // regs_per_warp) // warps,
        "warps": gpu.max_warps_per_sm // warps,
        "blocks": gpu.max_blocks_per_sm,
    }
    if shared_bytes > 0:
        limits["shared memory"] = gpu.shared_bytes_per_sm // (shared_bytes + gpu.shared_bytes_reserved_per_block)
    blocks = min(limits.values())
    limiter = min(limits, key=lambda k: limits[k])
    return dict(blocks_per_sm=blocks, warps_per_sm=blocks * warps,
                occupancy=blocks * warps / gpu.max_warps_per_sm, limited_by=limiter, limits=limits)


def launch_bound(gpu: GPUSpec, blocks: int, warps_per_block: int, blocks_per_sm: int,
                 warp_instructions_per_warp: float, fp64_per_warp: float, mufu_per_warp: float,
                 bytes_moved: Optional[float], fp32_per_warp: float = 0.0) -> dict:
    """Lower bounds (seconds) for one launch; see the module docstring."""
    per_sm_blocks = math.ceil(blocks / gpu.sms)
    rounds = math.ceil(blocks / max(1, blocks_per_sm * gpu.sms)) if blocks_per_sm > 0 else float("inf")
    clk = gpu.clock_hz
    bounds = {
        "issue": per_sm_blocks * warps_per_block * warp_instructions_per_warp / (gpu.schedulers_per_sm * clk),
        "warp_serial": rounds * warp_instructions_per_warp / clk,
        "fp32_pipe": per_sm_blocks * warps_per_block * fp32_per_warp / (gpu.fp32_warp_instr_per_clk_per_sm * clk),
        "fp64_pipe": per_sm_blocks * warps_per_block * fp64_per_warp / (gpu.fp64_warp_instr_per_clk_per_sm * clk),
        "mufu_pipe": per_sm_blocks * warps_per_block * mufu_per_warp / (gpu.mufu_warp_instr_per_clk_per_sm * clk),
    }
    if bytes_moved is not None:
        bounds["memory"] = bytes_moved / gpu.dram_bytes_per_s
    binding = max(bounds, key=lambda k: bounds[k])
    return dict(bound_s=bounds[binding], bound_by=binding, bounds_s=bounds,
                waves=blocks / max(1, blocks_per_sm * gpu.sms) if blocks_per_sm > 0 else float("inf"))
