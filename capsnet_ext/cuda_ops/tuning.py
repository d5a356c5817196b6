"""Which instance of the CUDA routing kernels a call runs: the samples each lane carries.

The CUDA routing kernels (``csrc/routing_impl.cuh``) come in two instances for the common
capsule sizes: one sample per lane, or two (``RoutingPlan::lane_samples``), where every lane
reads each staged ``W`` element once for both of its samples and works on two independent
softmaxes at once, at the price of about twice the registers (sm_90, the MNIST instances:
173-230 per thread against 88-128, so half the resident warps). Each sample's arithmetic is the same sequence of
operations either way, so **the choice changes the speed only: values and gradients are
bitwise equal** (``tests/test_cuda.py::test_two_samples_per_lane_are_bitwise_equal``).

Two samples per lane exist for float16, bfloat16 and float32 inputs whose sizes have a
specialised instance with ``Dout <= 16`` (``J <= 32``, ``Dout`` in {8, 16}, ``Din`` in
{4, 8, 16} for ``capsule_routing``); any other call runs one sample per lane whatever it asks.

How a call chooses (:func:`lane_samples_for`, per direction: ``"fwd"`` for the forward sweeps,
``"bwd"`` for the reverse and gradient sweeps):

1. :func:`forced` (a context manager, used by ``benchmarks/tune_cuda.py``) overrides everything;
2. else the entry of ``tuning_table.json`` beside this file (``CAPSNET_EXT_CUDA_TUNING_TABLE``
   names another; ``""`` or ``"none"``: no table) with the same GPU name, direction and dtype
   and the same ``J``, ``Dout`` and ``Din`` (``0``: a given ``u_hat``), nearest in ``log2 B``
   and ``log2 I`` and within a factor of 4 of both;
3. else ``0``: the kernels' default, one sample per lane (the design measured on an H200 on
   2026-12-04); the backward, when neither 1 nor 2 says otherwise, runs the forward's choice.

The table's format, reading and merging are those of the Triton table
(:mod:`capsnet_ext.triton_ops.tuning`); an entry's ``config`` is ``{"lane_samples": 1 or 2}``.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import torch

from ..triton_ops import tuning as _table_format

TABLE_PATH = Path(__file__).with_name("tuning_table.json")
TABLE_ENV = "CAPSNET_EXT_CUDA_TUNING_TABLE"
DIRECTIONS = ("fwd", "bwd")
LANE_SAMPLES = (1, 2)

_FORCED: List[int] = []
_CACHE: dict = {}
_GPU_NAMES: dict = {}


def table_path() -> Optional[Path]:
    value = os.environ.get(TABLE_ENV)
    if value is None:
        return TABLE_PATH
    if value.strip().lower() in ("", "none"):
        return None
    return Path(value)


def read_table(path: Optional[Path] = None) -> dict:
    """The table at ``path`` (default: :func:`table_path`); an absent file is an empty table."""
    path = table_path() if path is None else Path(path)
    if path is None:
        return _table_format.empty_table()
    table = _table_format.read_table(path)
    for n, entry in enumerate(table["entries"]):
        lanes = entry["config"].get("lane_samples") if isinstance(entry["config"], dict) else None
        if lanes not in LANE_SAMPLES:
            raise ValueError(f"CUDA tuning table {path}: entry {n} has config {entry['config']!r}; expected "
                             f"{{'lane_samples': 1 or 2}}")
    return table


def merge(table: dict, new_entries: list) -> tuple:
    """``(table, replaced, added)``, as :func:`capsnet_ext.triton_ops.tuning.merge`."""
    return _table_format.merge(table, new_entries)


def write_table(table: dict, path: Optional[Path] = None) -> Path:
    """Write atomically (default: the package's table)."""
    written = _table_format.write_table(table, TABLE_PATH if path is None else Path(path))
    _CACHE.clear()
    return written


def _entries() -> list:
    path = table_path()
    key = (str(path), path.stat().st_mtime_ns if path is not None and path.exists() else None)
    if _CACHE.get("key") != key:
        _CACHE["key"], _CACHE["entries"] = key, read_table(path)["entries"]
    return _CACHE["entries"]


def _gpu_name(index: int) -> str:
    index = torch.cuda.current_device() if index < 0 else index
    if index not in _GPU_NAMES:
        _GPU_NAMES[index] = torch.cuda.get_device_name(index)
    return _GPU_NAMES[index]


def lookup(gpu: str, direction: str, dtype, B: int, I: int, J: int, D: int,
           Din: int) -> Optional[dict]:
    """The nearest table entry for this call (rule 2 of the module docstring), or ``None``.
    ``dtype``: a torch dtype or its name; ``Din = 0`` stands for a given ``u_hat``
    (``dynamic_routing``)."""
    key = (gpu, direction, dtype if isinstance(dtype, str) else _table_format.dtype_name(dtype))

    def matches(entry):  # kernel instances are per exact size: no padding classes here
        return (entry["gpu"], entry["direction"], entry["dtype"]) == key and tuple(entry["shape"][2:]) == (J, D, Din)
    return _table_format.nearest(_entries(), B, I, matches)


def forced_lane_samples() -> Optional[int]:
    return _FORCED[-1] if _FORCED else None


@contextlib.contextmanager
def forced(lane_samples: int) -> Iterator[None]:
    """Every CUDA routing call inside (forward and backward) asks for ``lane_samples`` (1 or 2)
    samples per lane: no table. The tuning sweep times the instances through this."""
    if lane_samples not in LANE_SAMPLES:
        raise ValueError(f"forced: lane_samples must be one of {LANE_SAMPLES}, got {lane_samples!r}")
    _FORCED.append(int(lane_samples))
    try:
        yield
    finally:
        _FORCED.pop()


def lane_samples_for(direction: str, sources: Sequence[torch.Tensor], default: int = 0) -> int:
    """The ``lane_samples`` argument of a CUDA routing op call over ``sources`` (``(u_hat,)`` or
    ``(u, W)``): the forced value, else the table's, else ``default`` (0: the kernels' default;
    the registered backward passes the forward's value, so a forward run under :func:`forced`
    has its backward run the same instance). Inputs the op will refuse get ``default`` here and
    their error from the op. Traceable by ``torch.compile(fullgraph=True)``: the table is read
    through :func:`table_lane_samples`, a constant of the compiled graph."""
    forced_value = forced_lane_samples()
    if forced_value is not None:
        return forced_value
    key = _table_key(direction, sources)
    if key is None:
        return default
    found = table_lane_samples(*key)
    return found if found else default


def _table_key(direction: str, sources: Sequence[torch.Tensor]) -> Optional[tuple]:
    """The table query of a call as plain Python values, or ``None`` when no entry can apply
    (not a CUDA tensor, shapes the op will refuse, or sizes that are symbolic under
    ``torch.compile`` with dynamic shapes)."""
    ref = sources[0]
    if not isinstance(ref, torch.Tensor) or ref.device.type != "cuda":
        return None
    if len(sources) == 1:
        if ref.dim() != 4:
            return None
        B, I, J, D = ref.shape
        Din = 0
    else:
        W = sources[1]
        if ref.dim() != 3 or not isinstance(W, torch.Tensor) or W.dim() != 4:
            return None
        B, I, Din = ref.shape
        J, D = W.shape[1], W.shape[2]
    dims = (B, I, J, D, Din)
    if not all(type(n) is int for n in dims) or min(B, I, J, D) < 1:
        return None
    index = ref.device.index if ref.device.index is not None else -1
    return (index, direction, _table_format.dtype_name(ref.dtype), *dims)


@torch.compiler.assume_constant_result
def table_lane_samples(device_index: int, direction: str, dtype_name: str, B: int, I: int, J: int,
                       D: int, Din: int) -> int:
    """The table's ``lane_samples`` for a call (0 when no entry matches). ``torch.compile``
    runs it once while tracing and keeps the result as a constant."""
    if not _entries():
        return 0
    entry = lookup(_gpu_name(device_index), direction, dtype_name, B, I, J, D, Din)
    return int(entry["config"]["lane_samples"]) if entry is not None else 0
