"""MNIST and Fashion-MNIST from their original IDX gzip files.

Files are looked for in ``data_roots(data_dir)`` under ``mnist/`` (or ``fashion-mnist/``), and
also under torchvision's layout (``MNIST/raw/``, ``FashionMNIST/raw/``). Each ``.gz`` file found
is checked against its published MD5 before it is decoded; an uncompressed IDX file is accepted
too (its header and length are checked instead). Missing files are downloaded from public mirrors
into the user cache when ``download=True``. Decoded arrays are kept in memory for the life of
the process, keyed by file path, size and modification time.
"""
from __future__ import annotations

import os
import pathlib
import threading
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .files import CorruptDataError, PathLike, locate_file, verify_md5
from .idx import read_idx


@dataclass(frozen=True)
class IdxSpec:
    """One IDX dataset: its folder names, files with MD5s, and download mirrors."""

    name: str
    subdirs: Tuple[str, ...]
    files: Dict[str, Tuple[str, str]]   # split -> (images file, labels file)
    md5: Dict[str, str]
    mirrors: Tuple[str, ...]
    num_examples: Dict[str, int]


MNIST = IdxSpec(
    name="mnist",
    subdirs=("mnist", "MNIST/raw"),
    files={"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
           "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")},
    md5={"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
         "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
         "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
         "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"},
    mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",
             "https://storage.googleapis.com/cvdf-datasets/mnist/",
             "http://yann.lecun.com/exdb/mnist/"),
    num_examples={"train": 60000, "test": 10000},
)

FASHION_MNIST = IdxSpec(
    name="fashion-mnist",
    subdirs=("fashion-mnist", "FashionMNIST/raw"),
    files=MNIST.files,
    md5={"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
         "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
         "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
         "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"},
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    num_examples={"train": 60000, "test": 10000},
)

SPECS = {"mnist": MNIST, "fashion-mnist": FASHION_MNIST}

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")

_cache: Dict[Tuple[str, int, int], np.ndarray] = {}
_cache_lock = threading.Lock()


def locate_idx_file(spec: IdxSpec, filename: str, data_dir: Optional[PathLike] = None,
                    download_missing: bool = True,
                    mirrors: Optional[Sequence[str]] = None) -> pathlib.Path:
    """Path of ``filename`` of ``spec``: found in the data roots, or downloaded to the user cache.

    The ``.gz`` file is preferred; the uncompressed file (name without ``.gz``) is accepted
    when only that exists. Raises ``DataNotFoundError`` listing every folder searched (and
    every mirror tried) when the file is nowhere and cannot be downloaded.
    """
    raw_name = filename[:-3] if filename.endswith(".gz") else filename
    return locate_file(spec.name, filename, spec.subdirs, data_dir, download_missing,
                       spec.mirrors if mirrors is None else mirrors, spec.md5.get(filename),
                       alternatives=(raw_name,))


def load_idx_file(path: PathLike, md5: Optional[str] = None) -> np.ndarray:
    """Verify (for ``.gz`` files with a known MD5) and decode one IDX file, cached in memory."""
    path = pathlib.Path(path).resolve()
    stat = os.stat(path)
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _cache_lock:
        cached = _cache.get(key)
    if cached is not None:
        return cached
    if path.suffix == ".gz":
        verify_md5(path, md5)
    array = read_idx(path)
    array.setflags(write=False)
    with _cache_lock:
        _cache[key] = array
    return array


def load_idx_dataset(name: str, split: str, data_dir: Optional[PathLike] = None,
                     download: bool = True, mirrors: Optional[Sequence[str]] = None,
                     verify: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """``(images [N, 28, 28] uint8, labels [N] uint8)`` of MNIST or Fashion-MNIST.

    Args:
        name: ``"mnist"`` or ``"fashion-mnist"``.
        split: ``"train"`` (60,000 examples) or ``"test"`` (10,000).
        data_dir: searched first (see ``data_roots``).
        download: fetch missing files from the mirrors into the user cache.
        mirrors: override the download mirrors (base URLs; ``file://`` works too).
        verify: check the MD5 of ``.gz`` files against the published checksums.

    Raises:
        DataNotFoundError: a file is missing and could not be downloaded.
        CorruptDataError: a file fails its checksum or cannot be decoded; it is not modified.
    """
    if name not in SPECS:
        raise ValueError(f"name must be one of {sorted(SPECS)}, got {name!r}")
    spec = SPECS[name]
    if split not in spec.files:
        raise ValueError(f"split must be one of {sorted(spec.files)}, got {split!r}")
    arrays = []
    for filename in spec.files[split]:
        path = locate_idx_file(spec, filename, data_dir, download, mirrors)
        arrays.append(load_idx_file(path, spec.md5.get(path.name) if verify else None))
    images, labels = arrays
    expected = spec.num_examples[split]
    if images.shape != (expected, 28, 28) or labels.shape != (expected,):
        raise CorruptDataError(f"{name} {split}: expected images ({expected}, 28, 28) and labels "
                         f"({expected},), got {images.shape} and {labels.shape}")
    if labels.max() > 9:
        raise CorruptDataError(f"{name} {split}: labels must be 0..9, found {int(labels.max())}")
    return images, labels


def clear_cache() -> None:
    """Forget every decoded array (the next load decodes the files again)."""
    with _cache_lock:
        _cache.clear()
