"""SVHN (cropped digits, format 2): ``train_32x32.mat`` / ``test_32x32.mat`` (+ ``extra_32x32.mat``).

Searched under ``<root>/svhn/``; downloaded from ufldl.stanford.edu/housenumbers/ when missing,
each file checked against its published MD5. The files hold ``X [32, 32, 3, N]`` uint8 and
``y [N, 1]`` with the digit 0 labelled 10; items use label 0 for it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from .base import DIGIT_CLASSES, DatasetBundle, ImageDataset
from .files import CorruptDataError, PathLike, cached_in_memory, locate_file, verify_md5

MIRRORS = ("http://ufldl.stanford.edu/housenumbers/",)
MD5 = {"train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
       "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
       "extra_32x32.mat": "a93ce644f1a588dc4d68dda5feec44a7"}


def read_svhn_mat(path) -> Tuple[np.ndarray, np.ndarray]:
    """One SVHN ``.mat`` file -> ``(images [N, 3, 32, 32] uint8, labels [N] int64 in 0..9)``."""
    from scipy.io import loadmat
    try:
        data = loadmat(path)
        images, labels = np.asarray(data["X"]), np.asarray(data["y"]).reshape(-1)
    except Exception as exc:
        raise CorruptDataError(f"{path}: not a readable SVHN .mat file ({exc})") from exc
    if images.ndim != 4 or images.shape[:3] != (32, 32, 3) or images.shape[3] != labels.size:
        raise CorruptDataError(f"{path}: expected X [32, 32, 3, N] and y [N, 1], got "
                               f"{images.shape} and {labels.shape}")
    labels = labels.astype(np.int64) % 10   # 10 means the digit 0
    return np.ascontiguousarray(images.transpose(3, 2, 0, 1)).astype(np.uint8), labels


def load_svhn_file(filename: str, data_dir: Optional[PathLike] = None, download: bool = True,
                   verify: bool = True, mirrors=None) -> Tuple[np.ndarray, np.ndarray]:
    path = locate_file("svhn", filename, ("svhn",), data_dir, download,
                       MIRRORS if mirrors is None else mirrors, MD5[filename])

    def load():
        if verify:
            verify_md5(path, MD5[filename])
        return read_svhn_mat(path)
    return cached_in_memory([path], ("svhn",), load)


def build_svhn(data_dir=None, download=True, seed=0, *, include_extra: bool = False,
               train_limit: Optional[int] = None, test_limit: Optional[int] = None,
               verify: bool = True, mirrors=None) -> DatasetBundle:
    """SVHN: 73,257 train (+531,131 with ``include_extra``) / 26,032 test images of 3x32x32."""
    del seed
    train = load_svhn_file("train_32x32.mat", data_dir, download, verify, mirrors)
    if include_extra:
        extra = load_svhn_file("extra_32x32.mat", data_dir, download, verify, mirrors)
        train = (np.concatenate([train[0], extra[0]]), np.concatenate([train[1], extra[1]]))
    test = load_svhn_file("test_32x32.mat", data_dir, download, verify, mirrors)
    return DatasetBundle(train=ImageDataset(*train, name="svhn-train", limit=train_limit),
                         test=ImageDataset(*test, name="svhn-test", limit=test_limit),
                         in_channels=3, input_size=32, num_classes=10, multi_label=False, name="svhn",
                         classes=DIGIT_CLASSES)
