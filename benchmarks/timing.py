"""Timing: CUDA events on a GPU, a wall clock on the CPU.

Both run a warm-up, estimate the time of one call, then time as many calls as fit in a time
budget (bounded by ``min_reps`` and ``max_reps``), each call separately, and report the median
and spread (20th and 80th percentiles) rather than a mean that one hiccup can move.

The callable is given argument sets in rotation: :func:`rotated_copies` makes enough copies of
the inputs that one pass over them exceeds twice the GPU's L2 cache (the last-level cache on
the CPU), so a small shape is not timed with its inputs already cached. On a GPU, when the
copies would cost too much memory, fewer are made and the L2 cache is flushed (a buffer of
twice its size is zeroed) before every call instead, outside the timed region.
"""
from __future__ import annotations

import glob
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Sequence

import torch


@dataclass
class Timing:
    """Seconds per call over ``reps`` timed calls."""
    median: float
    p20: float
    p80: float
    min: float
    mean: float
    reps: int

    def as_dict(self):
        return asdict(self)


def _summary(samples: List[float]) -> Timing:
    ordered = sorted(samples)
    n = len(ordered)

    def quantile(q: float) -> float:
        # Linear interpolation between the closest ranks.
        pos = q * (n - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return Timing(median=statistics.median(ordered), p20=quantile(0.2), p80=quantile(0.8),
                  min=ordered[0], mean=statistics.fmean(ordered), reps=n)


def _cpu_last_level_cache_bytes() -> int:
    """Size of the CPU's largest cache level (Linux sysfs; 32 MiB when it cannot be read)."""
    best_level, best_size = 0, 32 << 20
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(os.path.join(index, "level")) as f:
                level = int(f.read())
            with open(os.path.join(index, "size")) as f:
                text = f.read().strip().upper()
        except (OSError, ValueError):
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit() and level > best_level:
            best_level, best_size = level, int(digits) * scale
    return best_size


def l2_cache_bytes(device: torch.device) -> int:
    """The cache that rotation must defeat: the GPU's L2, or the CPU's last-level cache."""
    if device.type != "cuda":
        return _cpu_last_level_cache_bytes()
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 50 << 20))


def _free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 30


def rotated_copies(make_args: Callable[[], tuple], bytes_per_set: int, device: torch.device,
                   first: Optional[tuple] = None, max_sets: int = 16,
                   memory_fraction: float = 0.25) -> List[tuple]:
    """``[first or make_args(), make_args(), ...]``: as many argument sets as take one pass
    past twice the cache size (GPU L2, CPU last level), at most ``max_sets`` and at most
    ``memory_fraction`` of the free memory."""
    wanted = 1
    cache = l2_cache_bytes(device)
    if cache and bytes_per_set > 0:
        wanted = max(1, min(max_sets, math.ceil(2 * cache / bytes_per_set)))
        wanted = max(1, min(wanted, int(_free_memory_bytes(device) * memory_fraction // bytes_per_set)))
    sets = [first if first is not None else make_args()]
    return sets + [make_args() for _ in range(wanted - 1)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable, arg_sets: Sequence[tuple], device: torch.device, *,
            warmup_s: float = 0.025, budget_s: float = 0.1, min_reps: int = 5,
            max_reps: int = 1000, bytes_per_set: Optional[int] = None) -> Timing:
    """Time ``fn(*arg_sets[k % len(arg_sets)])`` call by call.

    Args:
        fn: the work; its result is dropped.
        arg_sets: argument tuples used in rotation.
        device: where the work runs (CUDA events there, ``time.perf_counter`` on the CPU).
        warmup_s: seconds of untimed calls first (at least one call).
        budget_s: seconds of timed calls to aim for, within ``[min_reps, max_reps]``.
        bytes_per_set: bytes of one argument set; when the rotation does not reach twice the
            L2 size, the L2 is flushed before each call.
    """
    if not arg_sets:
        raise ValueError("arg_sets must hold at least one argument tuple")
    n_sets = len(arg_sets)
    # Warm-up (also the first-call costs: autotuning, compilation, allocator growth), then an
    # estimate of one call to size the timed loop.
    _sync(device)
    start = time.perf_counter()
    calls = 0
    while True:
        fn(*arg_sets[calls % n_sets])
        calls += 1
        _sync(device)
        if time.perf_counter() - start >= warmup_s or calls >= max_reps:
            break
    probe = max(1, min(5, calls))
    _sync(device)
    start = time.perf_counter()
    for k in range(probe):
        fn(*arg_sets[k % n_sets])
    _sync(device)
    per_call = max((time.perf_counter() - start) / probe, 1e-9)
    reps = int(max(min_reps, min(max_reps, budget_s / per_call)))

    if device.type == "cuda":
        flush = None
        l2 = l2_cache_bytes(device)
        if l2 and (bytes_per_set is None or bytes_per_set * n_sets < 2 * l2):
            flush = torch.empty(2 * l2 // 4, dtype=torch.int32, device=device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for k in range(reps):
            if flush is not None:
                flush.zero_()
            starts[k].record()
            fn(*arg_sets[k % n_sets])
            ends[k].record()
        torch.cuda.synchronize(device)
        samples = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
    else:
        samples = []
        for k in range(reps):
            t0 = time.perf_counter()
            fn(*arg_sets[k % n_sets])
            samples.append(time.perf_counter() - t0)
    return _summary(samples)


def make_timer(device: torch.device, **kwargs) -> Callable[[Callable, Sequence[tuple]], Timing]:
    """``timer(fn, arg_sets)`` bound to a device and budget (used for the ceilings)."""
    def timer(fn, arg_sets):
        return measure(fn, arg_sets, device, **kwargs)
    return timer
