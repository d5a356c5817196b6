"""scikit-learn's bundled 8x8 digits, resized to 28x28: a dataset that needs no download.

1,797 images of 16 grey levels, resized bilinearly to MNIST's 28x28 and scaled to [0, 1], then
split into train and test by a permutation drawn from ``seed`` (``test_fraction`` of them, 20%
by default, go to the test set). Useful as the offline fallback of demos and tests; its
numbers are not comparable with MNIST's.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .base import DIGIT_CLASSES, DatasetBundle, ImageDataset


def build_digits(data_dir=None, download=True, seed=0, *, size: int = 28,
                 test_fraction: float = 0.2, train_limit: Optional[int] = None,
                 test_limit: Optional[int] = None) -> DatasetBundle:
    """Digits train/test sets of ``[1, size, size]`` float images (``data_dir``/``download`` unused)."""
    del data_dir, download   # bundled with scikit-learn
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("the 'digits' dataset needs scikit-learn: pip install scikit-learn") from exc
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]    # [N, 1, 8, 8]
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.clamp_(0.0, 1.0)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(labels)))
    num_test = int(round(len(labels) * test_fraction))
    test_index, train_index = order[:num_test], order[num_test:]
    return DatasetBundle(
        train=ImageDataset(images[train_index], labels[train_index], "digits-train", train_limit),
        test=ImageDataset(images[test_index], labels[test_index], "digits-test", test_limit),
        in_channels=1, input_size=size, num_classes=10, multi_label=False, name="digits",
        classes=DIGIT_CLASSES)
