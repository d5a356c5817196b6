"""smallNORB: 5 toy categories photographed by a stereo camera pair, 24,300 pairs per split.

Reads the original files (``smallnorb-5x46789x9x18x6x2x96x96-training-{dat,cat}.mat.gz`` and
``smallnorb-5x01235x9x18x6x2x96x96-testing-{dat,cat}.mat.gz``, gzip-compressed or not) from
``<root>/smallnorb/``, downloading them from cs.nyu.edu when missing (no checksums are published
for them, so the header and length of every file are checked instead).

Format: little-endian int32 magic (0x1E3D4C55 = uint8 matrix, 0x1E3D4C54 = int32 matrix), the
number of dimensions, ``max(3, ndim)`` int32 sizes, then the data. ``dat`` is [24300, 2, 96, 96]
uint8 and ``cat`` is [24300] int32 in 0..4.

The paper's recipe: images scaled to 48x48 (``size``), random 32x32 crops in training and the
centre 32x32 crop at test (``random_crop``/``center_crop``). Both cameras are kept as two
channels unless ``stereo=False``.
"""
from __future__ import annotations

import gzip
import pathlib
import zlib
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .base import DatasetBundle, ImageDataset
from .files import CorruptDataError, PathLike, cached_in_memory, locate_file

MIRRORS = ("https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/",)
FILES = {"train": ("smallnorb-5x46789x9x18x6x2x96x96-training-dat.mat.gz",
                   "smallnorb-5x46789x9x18x6x2x96x96-training-cat.mat.gz"),
         "test": ("smallnorb-5x01235x9x18x6x2x96x96-testing-dat.mat.gz",
                  "smallnorb-5x01235x9x18x6x2x96x96-testing-cat.mat.gz")}
CLASSES = ("animal", "human", "airplane", "truck", "car")
_MAGIC = {0x1E3D4C55: np.dtype("u1"), 0x1E3D4C54: np.dtype("<i4"), 0x1E3D4C56: np.dtype("<i2"),
          0x1E3D4C51: np.dtype("<f4"), 0x1E3D4C53: np.dtype("<f8")}


def decode_norb(raw: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode one NORB binary matrix (already decompressed) into a numpy array."""
    if len(raw) < 8:
        raise CorruptDataError(f"{name}: truncated NORB header")
    magic, ndim = (int(v) for v in np.frombuffer(raw, dtype="<i4", count=2))
    if magic not in _MAGIC or not 1 <= ndim <= 8:
        raise CorruptDataError(f"{name}: not a NORB binary matrix (magic {magic:#x}, ndim {ndim})")
    stored = max(3, ndim)
    header = 8 + 4 * stored
    if len(raw) < header:
        raise CorruptDataError(f"{name}: truncated NORB header")
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype="<i4", count=ndim, offset=8))
    dtype = _MAGIC[magic]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise CorruptDataError(f"{name}: header declares shape {shape} ({expected} bytes) but the "
                               f"file holds {len(raw)} bytes; it is truncated or corrupt")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_norb(path: PathLike) -> np.ndarray:
    path = pathlib.Path(path)
    try:
        raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise CorruptDataError(f"{path}: cannot decompress ({exc}); corrupt or truncated") from exc
    return decode_norb(raw, str(path))


def load_smallnorb_split(split: str, data_dir: Optional[PathLike] = None, download: bool = True,
                         size: int = 48, stereo: bool = True,
                         mirrors=None) -> Tuple[np.ndarray, np.ndarray]:
    """``(images [24300, 2 or 1, size, size] uint8, labels [24300] int64)`` of one split."""
    paths = [locate_file("smallnorb", name, ("smallnorb",), data_dir, download,
                         MIRRORS if mirrors is None else mirrors, None, alternatives=(name[:-3],))
             for name in FILES[split]]

    def load():
        images, labels = read_norb(paths[0]), read_norb(paths[1])
        if images.ndim != 4 or images.shape[1:] != (2, 96, 96) or labels.shape != (images.shape[0],):
            raise CorruptDataError(f"{paths[0].parent}: expected dat [N, 2, 96, 96] and cat [N], "
                                   f"got {images.shape} and {labels.shape}")
        if not stereo:
            images = images[:, :1]
        if size != 96:
            resized = []
            for start in range(0, images.shape[0], 2048):   # bounded float memory
                part = torch.from_numpy(images[start:start + 2048].astype(np.float32))
                part = F.interpolate(part, size=(size, size), mode="area")
                resized.append(part.round_().clamp_(0, 255).to(torch.uint8).numpy())
            images = np.concatenate(resized)
        return np.ascontiguousarray(images), labels.astype(np.int64)
    return cached_in_memory(paths, ("smallnorb", size, stereo), load)


def build_smallnorb(data_dir=None, download=True, seed=0, *, size: int = 48, stereo: bool = True,
                    train_limit: Optional[int] = None, test_limit: Optional[int] = None,
                    mirrors=None) -> DatasetBundle:
    """smallNORB: 24,300 / 24,300 stereo pairs as ``[2, size, size]`` images (``size`` 48), 5 classes."""
    del seed
    if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 96:
        raise ValueError(f"size must be an int in [8, 96], got {size!r}")
    splits = {split: load_smallnorb_split(split, data_dir, download, size, stereo, mirrors)
              for split in ("train", "test")}
    return DatasetBundle(
        train=ImageDataset(*splits["train"], name="smallnorb-train", limit=train_limit),
        test=ImageDataset(*splits["test"], name="smallnorb-test", limit=test_limit),
        in_channels=2 if stereo else 1, input_size=size, num_classes=5, multi_label=False,
        name="smallnorb", classes=CLASSES)
