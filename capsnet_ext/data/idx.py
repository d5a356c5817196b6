"""Decoder of the IDX format of MNIST and Fashion-MNIST (gzip-compressed or raw).

IDX: two zero bytes, a type byte (0x08 = unsigned byte, the only type these datasets use), a
byte with the number of dimensions, one big-endian uint32 per dimension, then the data.
"""
from __future__ import annotations

import gzip
import pathlib
import zlib

import numpy as np

from .files import CorruptDataError, PathLike

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
           0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: PathLike) -> np.ndarray:
    """Decode one IDX file (``.gz`` or raw) into a numpy array of its declared shape.

    Raises ``CorruptDataError`` naming the file when it is truncated, not gzip, or its header
    and length disagree.
    """
    path = pathlib.Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                raw = handle.read()
        else:
            raw = path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise CorruptDataError(f"{path}: cannot decompress ({exc}); the file is corrupt or "
                               f"truncated") from exc
    return decode_idx(raw, str(path))


def decode_idx(raw: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode IDX bytes; ``name`` is used in error messages."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise CorruptDataError(f"{name}: not an IDX file (header bytes {raw[:4]!r})")
    dtype = np.dtype(_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CorruptDataError(f"{name}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise CorruptDataError(f"{name}: IDX header declares shape {shape} ({expected} bytes) but "
                               f"the file holds {len(raw)} bytes; it is truncated or corrupt")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=False)
