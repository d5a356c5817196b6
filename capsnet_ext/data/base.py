"""Dataset containers shared by every loader: ``ImageDataset`` and ``DatasetBundle``."""
from __future__ import annotations

import copy
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
        image = self.images[index]
        if self._resident and image.dtype == torch.uint8:
            return {"image": uint8_to_float(image), "label": self.labels[index]}
        return {"image": to_float_image(image), "label": self.labels[index]}

    def batch(self, indices: Union[Sequence[int], torch.Tensor],
              device: Union[str, torch.device, None] = None) -> Dict[str, torch.Tensor]:
        """``{"image": [B, C, H, W] float32, "label": [B] int64}`` for ``indices``, on ``device``.

        A dataset whose tensors live on a device (:meth:`to_device`) takes the batch there by
        ``index_select`` (``indices`` may be a tensor on that device: nothing is read back to
        the host) and gives the same values as the host copy, bit for bit.
        """
        if self.images.device.type == "cpu" and not self._resident:
            indices = torch.as_tensor(indices, dtype=torch.int64)
            images = self.images[indices].to(device)
            return {"image": to_float_image(images), "label": self.labels[indices].to(device)}
        indices = torch.as_tensor(indices, dtype=torch.int64)
        if indices.device != self.images.device:
            indices = host_to_device(indices, self.images.device)
        images = self.images.index_select(0, indices)
        if images.dtype == torch.uint8:
            images = uint8_to_float(images)
        batch = {"image": images, "label": self.labels.index_select(0, indices)}
        return batch if device is None else {k: v.to(device) for k, v in batch.items()}

    # Set on the copies that ``to_device`` makes (also for the CPU, so that the CPU runs the
    # device path's code and the tests can compare it with the host path).
    _resident = False

    @property
    def device(self) -> torch.device:
        """Where the images are stored."""
        return self.images.device

    def device_nbytes(self) -> int:
        """Bytes a :meth:`to_device` copy holds (uint8 images stay uint8, others float32)."""
        per_image = 1 if self.images.dtype == torch.uint8 else 4
        return self.images.numel() * per_image + self.labels.numel() * 8

    def to_device(self, device: Union[str, torch.device]) -> "ImageDataset":
        """A copy of this dataset whose tensors live on ``device``, for training that keeps its
        data on the GPU: :meth:`batch` then indexes there, with no per-step host work or
        host-to-device copy. uint8 images stay uint8 (MNIST's 60,000 images: 47 MB) and become
        float32 per batch through a 256-entry table computed on the CPU; other images are
        converted to float32 once, on the CPU. Either way every batch equals the host copy's
        bit for bit (a float division on the GPU may differ in the last bit). Other
        attributes (``name``, a subclass's extras) are shared with this dataset."""
        moved = copy.copy(self)
        images = self.images if self.images.dtype == torch.uint8 else to_float_image(self.images)
        moved.images = images.to(device)
        moved.labels = self.labels.to(device)
        moved._resident = True
        return moved

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


_UINT8_TABLES: Dict[torch.device, torch.Tensor] = {}


def uint8_to_float(images: torch.Tensor) -> torch.Tensor:
    """``to_float_image`` for uint8 images on any device, bit for bit the CPU's values: a
    lookup in the 256 values ``to_float_image`` gives on the CPU (CUDA divides by a scalar as a
    multiplication by its reciprocal, which can differ from the CPU's division in the last
    bit)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"uint8_to_float needs uint8 images, got {images.dtype}")
    table = _UINT8_TABLES.get(images.device)
    if table is None:
        table = to_float_image(torch.arange(256, dtype=torch.uint8)).to(images.device)
        _UINT8_TABLES[images.device] = table
    return table.index_select(0, images.reshape(-1).to(torch.int64)).view(images.shape)


def host_to_device(tensor: torch.Tensor, device: Union[str, torch.device]) -> torch.Tensor:
    """Copy a small host tensor (indices, augmentation offsets) to ``device`` without making
    the host wait for the device: from pinned memory with ``non_blocking`` on CUDA, where a
    copy from pageable memory may wait for the device's queue to drain. Anywhere else, or for
    a tensor already on the device, plain ``.to``."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.contiguous().pin_memory().to(device, non_blocking=True)


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
