"""MNIST and Fashion-MNIST from their original IDX gzip files.

Files are looked for in ``data_roots(data_dir)`` under ``mnist/`` (or ``fashion-mnist/``), and
also under torchvision's layout (``MNIST/raw/``, ``FashionMNIST/raw/``). Each ``.gz`` file found
is checked against its published MD5 before it is decoded; an uncompressed IDX file is accepted
too (its header and length are checked instead). Missing files are downloaded from public mirrors
(``IdxSpec.mirrors``, tried in order) into the user cache when ``download=True``; a download is
kept only when its MD5 matches and it decodes, and a failed one leaves nothing behind. Decoded
arrays are kept in memory for the life of the process, keyed by file path, size and
modification time. docs/data.md lists the files and their URLs.
"""
from __future__ import annotations

import os
import pathlib
import threading
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .files import CorruptDataError, PathLike, locate_file, verify_md5
from .idx import decode_idx, read_idx


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


def all_files(spec: IdxSpec) -> Tuple[str, ...]:
    """Every file of ``spec`` (train then test, images then labels)."""
    return tuple(name for split in ("train", "test") for name in spec.files[split])


def manual_fetch_note(spec: IdxSpec, mirrors: Optional[Sequence[str]] = None) -> str:
    """How to fetch every file of ``spec`` by hand into the user cache: names and a shell loop."""
    from .files import user_cache_dir

    mirror = (spec.mirrors if mirrors is None else tuple(mirrors) or ("<mirror>/",))[0]
    names = all_files(spec)
    folder = user_cache_dir() / spec.subdirs[0]
    return (f"{spec.name} consists of {len(names)} files: {', '.join(names)}. To fetch them all "
            f"by hand into the user cache (searched without any option): mkdir -p '{folder}' && "
            f"for f in {' '.join(names)}; do curl -fL -o '{folder}'/$f "
            f"{mirror.rstrip('/')}/$f; done")


def check_idx_download(path: PathLike, filename: str) -> None:
    """Raise ``CorruptDataError`` unless ``path`` (a download of ``filename``) decodes as IDX.

    Checks what the MD5 checks too (run even when mirrors are overridden): the gzip stream is
    complete and the IDX header agrees with the data length.
    """
    import gzip
    import zlib
    try:
        if filename.endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                raw = handle.read()
        else:
            raw = pathlib.Path(path).read_bytes()
    except (EOFError, OSError, zlib.error) as exc:
        raise CorruptDataError(f"{filename}: cannot decompress ({exc})") from exc
    decode_idx(raw, filename)


def locate_idx_file(spec: IdxSpec, filename: str, data_dir: Optional[PathLike] = None,
                    download_missing: bool = True,
                    mirrors: Optional[Sequence[str]] = None) -> pathlib.Path:
    """Path of ``filename`` of ``spec``: found in the data roots, or downloaded to the user cache.

    The ``.gz`` file is preferred; the uncompressed file (name without ``.gz``) is accepted
    when only that exists. A download is kept only when its MD5 matches and it decodes as IDX.
    Raises ``DataNotFoundError`` listing every folder searched, the download URLs (and every
    mirror tried, with its error) and how to fetch the files by hand, when the file is nowhere
    and cannot be downloaded.
    """
    raw_name = filename[:-3] if filename.endswith(".gz") else filename
    mirrors = spec.mirrors if mirrors is None else tuple(mirrors)
    return locate_file(spec.name, filename, spec.subdirs, data_dir, download_missing,
                       mirrors, spec.md5.get(filename), alternatives=(raw_name,),
                       manual_note=manual_fetch_note(spec, mirrors),
                       validate=check_idx_download)


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
