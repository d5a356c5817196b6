"""The committed tuning table of the fused Triton ``capsule_routing`` kernels.

Each entry is one measured winner: the GPU it was measured on (``torch.cuda.get_device_name``),
the direction (``"fwd"``: the forward sweeps; ``"bwd"``: the backward and gradient sweeps), the
dtype and float32 dot precision, the shape ``(B, I, J, Dout, Din)`` and iteration count it was
timed at, the winning :class:`~._gemm_core.Config`, and its median time beside the default's.
``benchmarks/tune.py`` measures the entries on a GPU and folds them into ``tuning_table.json``
beside this file.

How a call picks its configuration (:func:`._gemm_core._config_for`):

1. :func:`forced` (a context manager, used by the tuning sweep) overrides everything;
2. else the table entry of the same GPU name, direction, dtype and precision whose padded
   capsule sizes (``J``, ``Dout``, ``Din`` to powers of two) match, nearest in ``log2 B`` and
   ``log2 I`` (ties: the larger B) and within a factor of 4 of both
   (:data:`MAX_LOG2_DISTANCE`), when its configuration is valid for the shape;
3. else, when no entry matches (another GPU, another dtype, other capsule sizes): the heuristic
   :func:`~._gemm_core.default_config` and its two other split counts, timed once per shape on
   the GPU (``CAPSNET_EXT_TRITON_AUTOTUNE=0``: the default alone).

``CAPSNET_EXT_TUNING_TABLE`` names another table file (``""`` or ``"none"``: no table).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Iterator, List, Optional

import torch

TABLE_PATH = Path(__file__).with_name("tuning_table.json")
TABLE_ENV = "CAPSNET_EXT_TUNING_TABLE"
TABLE_VERSION = 1
DIRECTIONS = ("fwd", "bwd")
# An entry serves shapes whose B and I are each within this many doublings of its own: a tile
# plan tuned for 1024 samples says little about 8.
MAX_LOG2_DISTANCE = 2.0

_FORCED: List[object] = []
_CACHE: dict = {}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def padded_sizes(J: int, D: int, Din: int) -> list:
    """The capsule sizes as the kernels pad them: entries measured at other sizes that pad the
    same way compile to the same kernels."""
    return [_pow2(J), max(16, _pow2(D)), _pow2(Din)]


def table_path() -> Optional[Path]:
    value = os.environ.get(TABLE_ENV)
    if value is None:
        return TABLE_PATH
    if value.strip().lower() in ("", "none"):
        return None
    return Path(value)


def empty_table() -> dict:
    return {"version": TABLE_VERSION, "entries": []}


def read_table(path: Optional[Path] = None) -> dict:
    """The table at ``path`` (default: :func:`table_path`); an absent file is an empty table, a
    malformed one an error naming the file."""
    path = table_path() if path is None else Path(path)
    if path is None or not path.exists():
        return empty_table()
    try:
        table = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"tuning table {path} is not valid JSON: {exc}") from None
    if not isinstance(table, dict) or table.get("version") != TABLE_VERSION:
        raise ValueError(f"tuning table {path}: expected version {TABLE_VERSION}, got "
                         f"{table.get('version') if isinstance(table, dict) else table!r}")
    for n, entry in enumerate(table.get("entries", [])):
        missing = {"gpu", "direction", "dtype", "precision", "shape", "config"} - set(entry)
        if missing:
            raise ValueError(f"tuning table {path}: entry {n} lacks {sorted(missing)}")
    return table


def _entries() -> list:
    path = table_path()
    key = (str(path), path.stat().st_mtime_ns if path is not None and path.exists() else None)
    if _CACHE.get("key") != key:
        _CACHE["key"], _CACHE["entries"] = key, read_table(path)["entries"] if path else []
    return _CACHE["entries"]


def entry_key(entry: dict) -> tuple:
    """Entries with the same key replace each other when a sweep is folded in."""
    return (entry["gpu"], entry["direction"], entry["dtype"], entry["precision"],
            tuple(entry["shape"]), entry.get("iterations"), tuple(entry.get("options", ())))


def nearest(entries, B: int, I: int, matches) -> Optional[dict]:
    """Among the ``entries`` for which ``matches(entry)`` holds, the one nearest in ``log2 B`` and
    ``log2 I`` (ties: the larger B) within :data:`MAX_LOG2_DISTANCE` of both, or ``None``. The
    rule of both tuning tables (this one and :mod:`capsnet_ext.cuda_ops.tuning`)."""
    best, best_distance = None, None
    for entry in entries:
        if not matches(entry):
            continue
        eB, eI = entry["shape"][:2]
        dB, dI = abs(math.log2(eB) - math.log2(B)), abs(math.log2(eI) - math.log2(I))
        if max(dB, dI) > MAX_LOG2_DISTANCE:
            continue
        distance = (dB + dI, -eB)
        if best is None or distance < best_distance:
            best, best_distance = entry, distance
    return best


def lookup(gpu: str, direction: str, dtype: torch.dtype, precision: str, B: int, I: int,
           J: int, D: int, Din: int, valid=None) -> Optional[dict]:
    """The nearest table entry for this call (rule 2 of the module docstring), or ``None``.
    ``valid(config_dict)`` rejects configurations the shape cannot take."""
    key = (gpu, direction, dtype_name(dtype), precision)
    padded = padded_sizes(J, D, Din)

    def matches(entry):
        return ((entry["gpu"], entry["direction"], entry["dtype"], entry["precision"]) == key
                and padded_sizes(*entry["shape"][2:]) == padded
                and (valid is None or valid(entry["config"])))
    return nearest(_entries(), B, I, matches)


def forced_config():
    return _FORCED[-1] if _FORCED else None


@contextlib.contextmanager
def forced(config) -> Iterator[None]:
    """Every ``capsule_routing`` launch inside uses ``config`` (a ``Config``): no table, no
    autotuning. The tuning sweep times candidates through this."""
    _FORCED.append(config)
    try:
        yield
    finally:
        _FORCED.pop()


def merge(table: dict, new_entries: list) -> tuple:
    """``(table, replaced, added)``: ``table`` with ``new_entries`` folded in, an entry of the
    same :func:`entry_key` replaced. Entries are kept sorted so that the file diffs well."""
    by_key = {entry_key(e): e for e in table.get("entries", [])}
    replaced = added = 0
    for entry in new_entries:
        key = entry_key(entry)
        if key in by_key:
            replaced += 1
        else:
            added += 1
        by_key[key] = entry
    entries = sorted(by_key.values(), key=lambda e: (e["gpu"], e["direction"], e["dtype"],
                                                    e["precision"], list(e["shape"])))
    return {"version": TABLE_VERSION, "entries": entries}, replaced, added


def write_table(table: dict, path: Optional[Path] = None) -> Path:
    """Write atomically (:func:`capsnet_ext._atomic.atomic_write`)."""
    from .._atomic import atomic_write

    path = atomic_write(TABLE_PATH if path is None else Path(path),
                        json.dumps(table, indent=1, sort_keys=True) + "\n")
    _CACHE.clear()
    return path
