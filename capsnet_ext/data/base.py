"""Dataset containers shared by every loader: ``ImageDataset`` and ``DatasetBundle``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset


class ImageDataset(Dataset):
    """Images with one integer label each, held in memory as tensors.

    Args:
        images: ``[N, C, H, W]`` uint8 (0..255) or float (already in [0, 1]); numpy or torch.
        labels: ``[N]`` integer class labels.
        name: shown in ``repr`` and errors.
        limit: keep only the first ``limit`` examples (quick runs); None keeps all.

    Items are ``{"image": float32 [C, H, W] in [0, 1], "label": int64 scalar}``.
    ``images``/``labels`` expose the stored tensors and ``batch(indices)`` returns a whole batch
    at once (no per-item Python work), e.g. for a trainer that moves full batches to the GPU.
    """

    def __init__(self, images, labels, name: str = "dataset", limit: Optional[int] = None):
        images, labels = _as_tensor(images), _as_tensor(labels)
        if images.dim() != 4:
            raise ValueError(f"{name}: images must be [N, C, H, W], got {tuple(images.shape)}")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"{name}: labels must be [N] with N = {images.shape[0]}, "
                             f"got {tuple(labels.shape)}")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise ValueError(f"{name}: images must be uint8 or floating point, got {images.dtype}")
        limit = _check_limit(limit, "limit")
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        self.images = images
        self.labels = labels.to(torch.int64)
        self.name = name

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return {"image": to_float_image(self.images[index]), "label": self.labels[index]}

    def batch(self, indices: Union[Sequence[int], torch.Tensor],
              device: Union[str, torch.device, None] = None) -> Dict[str, torch.Tensor]:
        """``{"image": [B, C, H, W] float32, "label": [B] int64}`` for ``indices``, on ``device``."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        images = self.images[indices].to(device)
        return {"image": to_float_image(images), "label": self.labels[indices].to(device)}

    @property
    def shape(self):
        """``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, n={len(self)}, image={self.shape})"


def _as_tensor(array) -> torch.Tensor:
    """numpy -> torch; read-only arrays (the in-memory file cache) are copied, never aliased."""
    if isinstance(array, torch.Tensor):
        return array
    array = np.asarray(array)
    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array, order="C")
    return torch.from_numpy(array)


def to_float_image(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 0..1; float images pass through as float32."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    return images.to(torch.float32)


def _check_limit(limit, argument: str) -> Optional[int]:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise ValueError(f"{argument} must be a positive int or None, got {limit!r}")
    return int(limit)


DIGIT_CLASSES = tuple(str(digit) for digit in range(10))


@dataclass
class DatasetBundle:
    """Everything a trainer needs about one task.

    ``train``/``test``: datasets whose items are dicts (see ``build_datasets``); ``in_channels``
    and ``input_size`` describe one image (``[in_channels, input_size, input_size]``);
    ``num_classes``; ``multi_label`` is True for MultiMNIST (multi-hot labels, two
    reconstruction targets); ``name`` is the dataset name given to ``build_datasets``;
    ``classes`` the class names (for figures and reports), where known.
    """

    train: Dataset
    test: Dataset
    in_channels: int
    input_size: int
    num_classes: int
    multi_label: bool
    name: str
    classes: Optional[Tuple[str, ...]] = None   # class names, index = label, where known
