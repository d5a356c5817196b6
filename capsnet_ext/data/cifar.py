"""CIFAR-10 from the official python-pickle release (``cifar-10-python.tar.gz``).

Searched under ``<root>/cifar10/`` of every data root, also torchvision's layout (the archive or
``cifar-10-batches-py/`` directly in the root): first an extracted ``cifar-10-batches-py/``
folder (each batch file checked against its published MD5), else the archive (checked against
its MD5 and read in place, without extracting), downloaded from the authors' site when missing.
Batches are unpickled with an unpickler that only admits the numpy and builtin types the
release contains, so a tampered file cannot run code.

Items are the full 32x32 colour images; the official CapsNet recipe trains on random 24x24
crops and tests on the centre crop: see ``random_crop``/``center_crop`` in
``capsnet_ext.data.transforms``.
"""
from __future__ import annotations

import io
import pathlib
import pickle
import tarfile
from typing import Dict, Optional, Tuple

import numpy as np

from .base import DatasetBundle, ImageDataset
from .files import (CorruptDataError, PathLike, cached_in_memory, data_roots, find_file,
                    locate_file, verify_md5)

ARCHIVE = "cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
MIRRORS = ("https://www.cs.toronto.edu/~kriz/",)
FOLDER = "cifar-10-batches-py"
BATCH_MD5 = {"data_batch_1": "c99cafc152244af753f735de768cd75f",
             "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
             "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
             "data_batch_4": "634d18415352ddfa80567beed471001a",
             "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
             "test_batch": "40351d587109b95175f43aff81a1287e"}
SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class _BatchUnpickler(pickle.Unpickler):
    """Admits only what CIFAR batch files hold: builtins containers and numpy arrays."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")


def decode_batch(raw: bytes, name: str) -> Tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> ``(images [N, 3, 32, 32] uint8, labels [N] int64)``."""
    try:
        batch = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as exc:
        raise CorruptDataError(f"{name}: not a readable CIFAR-10 batch ({exc})") from exc
    if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise CorruptDataError(f"{name}: expected data [N, 3072] and labels [N], got "
                               f"{data.shape} and {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def _read_folder(folder: pathlib.Path, verify: bool) -> Dict[str, bytes]:
    raw = {}
    for name in BATCH_MD5:
        path = folder / name
        if verify:
            verify_md5(path, BATCH_MD5[name])
        raw[name] = path.read_bytes()
    return raw


def _read_archive(path: pathlib.Path) -> Dict[str, bytes]:
    raw = {}
    try:
        with tarfile.open(path, "r:gz") as archive:
            for member in archive.getmembers():
                name = pathlib.PurePosixPath(member.name).name
                if name in BATCH_MD5 and member.isfile():
                    raw[name] = archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise CorruptDataError(f"{path}: cannot read the archive ({exc})") from exc
    missing = sorted(set(BATCH_MD5) - set(raw))
    if missing:
        raise CorruptDataError(f"{path}: archive lacks {', '.join(missing)}")
    return raw


def load_cifar10(data_dir: Optional[PathLike] = None, download: bool = True,
                 verify: bool = True, mirrors=None) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images [50000, 3, 32, 32] uint8, labels), "test": (10000 ...)}``."""
    roots = data_roots(data_dir)
    folder_hit, _, _ = find_file(("test_batch",), roots, ("cifar10/" + FOLDER, FOLDER))
    if folder_hit is not None and all((folder_hit.parent / n).is_file() for n in BATCH_MD5):
        sources, reader = [folder_hit.parent / n for n in BATCH_MD5], \
            (lambda: _read_folder(folder_hit.parent, verify))
    else:
        archive = locate_file("cifar10", ARCHIVE, ("cifar10", "."), data_dir, download,
                              MIRRORS if mirrors is None else mirrors, ARCHIVE_MD5,
                              manual_note=f"The extracted '{FOLDER}/' folder of the archive is "
                                          f"accepted too (inside 'cifar10/' or the data folder).")

        def read_archive():
            if verify:
                verify_md5(archive, ARCHIVE_MD5)
            return _read_archive(archive)
        sources, reader = [archive], read_archive

    def load():
        raw = reader()
        out = {}
        for split, names in SPLITS.items():
            parts = [decode_batch(raw[name], name) for name in names]
            out[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        return out
    return cached_in_memory(sources, ("cifar10",), load)


def build_cifar10(data_dir=None, download=True, seed=0, *, train_limit: Optional[int] = None,
                  test_limit: Optional[int] = None, verify: bool = True, mirrors=None) -> DatasetBundle:
    """CIFAR-10: 50,000 / 10,000 colour images of 3x32x32 (crop to 24x24 in the trainer)."""
    del seed
    splits = load_cifar10(data_dir, download, verify, mirrors)
    return DatasetBundle(
        train=ImageDataset(*splits["train"], name="cifar10-train", limit=train_limit),
        test=ImageDataset(*splits["test"], name="cifar10-test", limit=test_limit),
        in_channels=3, input_size=32, num_classes=10, multi_label=False, name="cifar10",
        classes=CLASSES)
