"""Batched image transforms that run on any device: shifts and crops of ``[B, C, H, W]`` tensors.

All of them work on whole batches with index arithmetic (no Python loop over images), so a
trainer can apply them on the GPU after moving the batch there.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def _check_images(images: torch.Tensor, name: str = "images") -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a [B, C, H, W] tensor, got {shape}")


def _randint(low: int, high: int, size: Tuple[int, ...], generator: Optional[torch.Generator],
             device: torch.device) -> torch.Tensor:
    """Integers in [low, high] drawn on the generator's device, returned on ``device``."""
    draw_device = generator.device if generator is not None else device
    values = torch.randint(low, high + 1, size, generator=generator, device=draw_device)
    return values.to(device)


def shift_images(images: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Shift each image by whole pixels, filling with zeros.

    Args:
        images: ``[B, C, H, W]``.
        dx, dy: ``[B]`` integer shifts; positive ``dx`` moves content right (towards larger
            column index), positive ``dy`` moves it down. Content shifted past an edge is lost.

    Returns:
        ``[B, C, H, W]`` with ``out[b, :, y, x] = images[b, :, y - dy[b], x - dx[b]]`` where that
        source pixel exists and 0 elsewhere.
    """
    _check_images(images)
    batch, _, height, width = images.shape
    dx = torch.as_tensor(dx, device=images.device).to(torch.int64).reshape(-1)
    dy = torch.as_tensor(dy, device=images.device).to(torch.int64).reshape(-1)
    if dx.numel() != batch or dy.numel() != batch:
        raise ValueError(f"dx and dy must have one shift per image ({batch}), got "
                         f"{dx.numel()} and {dy.numel()}")
    # Gather with clamped source indices, then zero the pixels whose source lies outside the
    # image: no padding size to compute, so no host synchronisation.
    rows = torch.arange(height, device=images.device) - dy[:, None]          # [B, H]
    cols = torch.arange(width, device=images.device) - dx[:, None]           # [B, W]
    inside = (((rows >= 0) & (rows < height))[:, :, None]
              & ((cols >= 0) & (cols < width))[:, None, :])                  # [B, H, W]
    batch_index = torch.arange(batch, device=images.device)[:, None, None]
    # Advanced indices separated by a slice put the indexed dims first: [B, H, W, C].
    out = images[batch_index, :, rows.clamp(0, height - 1)[:, :, None],
                 cols.clamp(0, width - 1)[:, None, :]]
    out = torch.where(inside[..., None], out, torch.zeros((), dtype=images.dtype,
                                                          device=images.device))
    out = out.permute(0, 3, 1, 2)
    return out.contiguous()


def random_shift(images: torch.Tensor, max_shift: int,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The paper's augmentation: shift each image by random whole pixels, zero padding.

    Args:
        images: ``[B, C, H, W]`` on any device.
        max_shift: shifts are drawn independently per image and axis, uniformly from the
            integers in ``[-max_shift, max_shift]`` (2 in the paper's MNIST recipe).
        generator: optional ``torch.Generator`` for reproducible shifts; it may live on the CPU
            or on the images' device (shifts are drawn there and moved to the images).

    Returns:
        ``[B, C, H, W]`` of the same dtype and device.
    """
    _check_images(images)
    if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 0:
        raise ValueError(f"max_shift must be a non-negative int, got {max_shift!r}")
    if max_shift == 0 or images.shape[0] == 0:
        return images.clone()
    batch = images.shape[0]
    shifts = _randint(-max_shift, max_shift, (2, batch), generator, images.device)
    return shift_images(images, shifts[0], shifts[1])


def _crop(images: torch.Tensor, size: int, top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    batch = images.shape[0]
    rows = top[:, None] + torch.arange(size, device=images.device)
    cols = left[:, None] + torch.arange(size, device=images.device)
    batch_index = torch.arange(batch, device=images.device)[:, None, None]
    return images[batch_index, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def _check_size(images: torch.Tensor, size: int) -> None:
    _check_images(images)
    height, width = images.shape[-2:]
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= min(height, width):
        raise ValueError(f"size must be an int in [1, {min(height, width)}] for images of "
                         f"{height}x{width}, got {size!r}")


def random_crop(images: torch.Tensor, size: int,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A random ``size x size`` crop of each image (independent position per image).

    ``images [B, C, H, W]`` -> ``[B, C, size, size]``; the official CIFAR-10 recipe trains on
    random 24x24 crops of the 32x32 images (and tests on the centre crop, ``center_crop``).
    """
    _check_size(images, size)
    batch, _, height, width = images.shape
    top = _randint(0, height - size, (batch,), generator, images.device)
    left = _randint(0, width - size, (batch,), generator, images.device)
    return _crop(images, size, top, left)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``size x size`` crop: ``[B, C, H, W]`` -> ``[B, C, size, size]``."""
    _check_size(images, size)
    height, width = images.shape[-2:]
    top, left = (height - size) // 2, (width - size) // 2
    return images[:, :, top:top + size, left:left + size].contiguous()


def random_flip(images: torch.Tensor, generator: Optional[torch.Generator] = None,
                p: float = 0.5) -> torch.Tensor:
    """Mirror each image left-right with probability ``p``: ``[B, C, H, W]`` -> same shape."""
    _check_images(images)
    draw_device = generator.device if generator is not None else images.device
    flip = (torch.rand(images.shape[0], generator=generator, device=draw_device) < p).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def pad_to(images: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad ``[..., H, W]`` images to ``size x size``, centred (extra pixel right/bottom)."""
    height, width = images.shape[-2:]
    if size < height or size < width:
        raise ValueError(f"size {size} is smaller than the images ({height}x{width})")
    top, left = (size - height) // 2, (size - width) // 2
    return F.pad(images, (left, size - width - left, top, size - height - top))
