"""Spec-sheet figures of the GPUs the static kernel report targets.

Every figure is a named constant with its source. Clocks are the boost clocks implied by the
published FP32 peak (peak = SMs x FP32 lanes per SM x 2 flops x clock: 1.98 GHz for H100 SXM,
1.41 GHz for A100 SXM, the published boost clocks); sustained clocks under load can be lower,
which only makes real kernels slower than the bounds computed from them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GPUSpec:
    name: str
    arch: int  # compute capability as an integer: 90 for sm_90
    sms: int
    clock_hz: float
    dram_bytes_per_s: float
    schedulers_per_sm: int  # warp schedulers: each issues at most one warp instruction per cycle
    fp32_warp_instr_per_clk_per_sm: float  # FP32 lanes / 32
    fp64_warp_instr_per_clk_per_sm: float  # FP64 lanes / 32
    mufu_warp_instr_per_clk_per_sm: float  # special-function lanes / 32
    registers_per_sm: int
    max_registers_per_thread: int
    register_alloc_unit: int  # registers are allocated per warp in units of this many
    max_warps_per_sm: int
    max_blocks_per_sm: int
    shared_bytes_per_sm: int  # usable by blocks (the carve-out maximum)
    shared_bytes_reserved_per_block: int
    l2_bytes: int
    source: str

    def as_dict(self) -> dict:
        return asdict(self)


# NVIDIA H100 Tensor Core GPU datasheet (H100 SXM: 132 SMs, FP32 67 TFLOPS, FP64 34 TFLOPS
# vector, HBM3 3.35 TB/s) and the NVIDIA H100 Tensor Core GPU Architecture whitepaper
# (128 FP32 and 64 FP64 lanes, 4 warp schedulers and 16 SFUs per SM, 64K 32-bit registers, 2048 threads, 32 blocks and
# 228 KB shared memory per SM, 50 MB L2), CUDA C++ Programming Guide table "Technical
# Specifications per Compute Capability" (255 registers per thread, 1 KB shared memory
# reserved per block on 8.x/9.0).
H100_SXM = GPUSpec(
    name="H100 SXM5 80GB", arch=90, sms=132, clock_hz=67e12 / (132 * 128 * 2),
    dram_bytes_per_s=3.35e12, schedulers_per_sm=4, fp32_warp_instr_per_clk_per_sm=128 / 32,
    fp64_warp_instr_per_clk_per_sm=64 / 32, mufu_warp_instr_per_clk_per_sm=16 / 32,
    registers_per_sm=65536, max_registers_per_thread=255, register_alloc_unit=256,
    max_warps_per_sm=64, max_blocks_per_sm=32, shared_bytes_per_sm=228 * 1024,
    shared_bytes_reserved_per_block=1024, l2_bytes=50 * 1024 ** 2,
    source="NVIDIA H100 datasheet (SXM5) and H100 architecture whitepaper; CUDA C++ "
           "Programming Guide, compute capability 9.0 limits",
)

# NVIDIA A100 Tensor Core GPU datasheet (A100 SXM4 80GB: 108 SMs, FP32 19.5 TFLOPS, FP64 9.7
# TFLOPS, HBM2e 2,039 GB/s) and the NVIDIA A100 Tensor Core GPU Architecture whitepaper
# (64 FP32 and 32 FP64 lanes, 4 warp schedulers and 16 SFUs per SM, 64K registers, 2048 threads, 32 blocks and 164 KB
# shared memory per SM, 40 MB L2).
A100_SXM = GPUSpec(
    name="A100 SXM4 80GB", arch=80, sms=108, clock_hz=19.5e12 / (108 * 64 * 2),
    dram_bytes_per_s=2.039e12, schedulers_per_sm=4, fp32_warp_instr_per_clk_per_sm=64 / 32,
    fp64_warp_instr_per_clk_per_sm=32 / 32, mufu_warp_instr_per_clk_per_sm=16 / 32,
    registers_per_sm=65536, max_registers_per_thread=255, register_alloc_unit=256,
    max_warps_per_sm=64, max_blocks_per_sm=32, shared_bytes_per_sm=164 * 1024,
    shared_bytes_reserved_per_block=1024, l2_bytes=40 * 1024 ** 2,
    source="NVIDIA A100 datasheet (SXM4 80GB) and A100 architecture whitepaper; CUDA C++ "
           "Programming Guide, compute capability 8.0 limits",
)

GPUS = {"h100": H100_SXM, "a100": A100_SXM}
BY_ARCH = {spec.arch: spec for spec in GPUS.values()}


def resolve(name_or_arch: str) -> GPUSpec:
    """``"h100"``, ``"a100"``, ``"sm_90"``, ``"sm_80"``, ``"90"`` or ``"80"``."""
    key = str(name_or_arch).lower().replace("sm_", "").replace("sm", "")
    if key in GPUS:
        return GPUS[key]
    if key.isdigit() and int(key) in BY_ARCH:
        return BY_ARCH[int(key)]
    raise ValueError(f"unknown target GPU {name_or_arch!r}; expected one of "
                     f"{sorted(GPUS)} or {['sm_%d' % a for a in sorted(BY_ARCH)]}")
