"""Datasets of the CapsNet paper's experiments, as in-memory tensors with batched transforms.

::

    from capsnet_ext.data import build_datasets, random_shift
    bundle = build_datasets("mnist")            # DatasetBundle(train, test, in_channels, ...)
    item = bundle.train[0]                       # {"image": [1, 28, 28] float32, "label": int64}
    batch = random_shift(images, 2)              # the paper's augmentation, on any device

Files are searched in ``data_roots(data_dir)``: ``data_dir``, ``$CAPSNET_DATA``, then the user
cache; missing files are downloaded (MD5-verified, written atomically) when online.
"""
from .base import DatasetBundle, ImageDataset
from .files import (DATA_ENV, CorruptDataError, DataNotFoundError, data_roots, md5sum,
                    user_cache_dir)
from .registry import DATASET_NAMES, build_datasets
from .transforms import center_crop, pad_to, random_crop, random_flip, random_shift, shift_images

__all__ = [
    "DATA_ENV",
    "DATASET_NAMES",
    "CorruptDataError",
    "DataNotFoundError",
    "DatasetBundle",
    "ImageDataset",
    "build_datasets",
    "center_crop",
    "data_roots",
    "md5sum",
    "pad_to",
    "random_crop",
    "random_flip",
    "random_shift",
    "shift_images",
    "user_cache_dir",
]
