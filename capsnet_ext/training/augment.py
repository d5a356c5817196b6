"""Batch augmentation with offsets drawn per *global* batch position.

The trainer draws every random offset of a global batch from a generator seeded by
``(seed, step)`` and gives each rank the rows of its own examples. So the augmentation needs
no saved state to resume exactly, and a DDP run sees the same augmented images as a
single-process run with the same global batch.

The batch may live on the CPU or on a GPU (a dataset held on the device): the random numbers
are always drawn on the CPU generator, and only the small tensors derived from them (offsets,
crop corners, the affine sampling grid) are copied to the batch's device, from pinned memory
without waiting for the device. Shifts and crops are gathers and the affine warp samples the
nearest pixel of a grid computed on the CPU, so a given ``(seed, step)`` gives the same
images bit for bit wherever the batch is.
"""
from __future__ import annotations

import numpy as np
import torch

from ..data.base import host_to_device


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator that depends only on ``(seed, step)``."""
    state = np.random.SeedSequence([int(seed), int(step), 0x5EED]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def shift_images(images: torch.Tensor, offsets: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate each image by its own integer offset with zero padding.

    Args:
        images: ``[B, C, H, W]`` (or ``[B, K, C, H, W]``: the same offset for all ``K``).
        offsets: ``[B, 2]`` integer ``(dy, dx)`` with ``|offset| <= max_shift``; positive
            moves content down/right.
        max_shift: the padding, a bound on the offsets known without reading them (no
            host synchronisation on a GPU).
    Returns:
        Shifted images, same shape and dtype.
    """
    if offsets.shape != (images.shape[0], 2):
        raise ValueError(f"offsets must have shape [{images.shape[0]}, 2], got {tuple(offsets.shape)}")
    if images.dim() == 5:
        B, K = images.shape[:2]
        flat = shift_images(images.flatten(0, 1), offsets.repeat_interleave(K, dim=0), max_shift)
        return flat.view_as(images)
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    B, C, H, W = images.shape
    if max_shift == 0:
        return images
    device = images.device
    offsets = offsets.to(device)
    padded = torch.nn.functional.pad(images, (max_shift,) * 4)
    rows = torch.arange(H, device=device).unsqueeze(0) + max_shift - offsets[:, :1]   # [B, H]
    cols = torch.arange(W, device=device).unsqueeze(0) + max_shift - offsets[:, 1:]   # [B, W]
    batch = torch.arange(B, device=device).view(B, 1, 1)
    out = padded[batch, :, rows.unsqueeze(2), cols.unsqueeze(1)]     # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


def crop_images(images: torch.Tensor, tops: torch.Tensor, lefts: torch.Tensor, size: int) -> torch.Tensor:
    """Crop ``size x size`` windows at per-image ``tops``/``lefts`` from ``[B, C, H, W]``
    (or ``[B, K, C, H, W]``)."""
    if images.dim() == 5:
        B, K = images.shape[:2]
        flat = crop_images(images.flatten(0, 1), tops.repeat_interleave(K), lefts.repeat_interleave(K), size)
        return flat.view(B, K, *flat.shape[1:])
    B, C, H, W = images.shape
    if size > H or size > W:
        raise ValueError(f"crop size {size} is larger than the images ({H}x{W})")
    device = images.device
    rows = torch.arange(size, device=device).unsqueeze(0) + tops.to(device).view(B, 1)
    cols = torch.arange(size, device=device).unsqueeze(0) + lefts.to(device).view(B, 1)
    batch = torch.arange(B, device=device).view(B, 1, 1)
    return images[batch, :, rows.unsqueeze(2), cols.unsqueeze(1)].permute(0, 3, 1, 2).contiguous()


def random_affine_matrices(count: int, generator: torch.Generator, degrees: float, shear: float,
                           scale) -> torch.Tensor:
    """``[count, 2, 2]`` maps drawn as torchvision's ``RandomAffine(degrees=(-degrees, degrees),
    shear=(-shear, shear), scale=scale)`` draws them: a rotation angle uniform in
    ``+-degrees``, one x-shear angle uniform in ``+-shear`` degrees (no y-shear) and one
    isotropic scale uniform in ``scale``; ``A = R(angle) @ Shear_x(tan(shear)) @ scale``. The
    ranges are symmetric, so the sign conventions of the angles do not change the distribution.
    """
    from ..data.affnist import affine_matrices

    uniform = lambda low, high: low + (high - low) * torch.rand(count, generator=generator,  # noqa: E731
                                                                dtype=torch.float64)
    angle = uniform(-degrees, degrees)
    shear_factor = torch.tan(torch.deg2rad(uniform(-shear, shear)))
    factor = uniform(float(scale[0]), float(scale[1]))
    return affine_matrices(angle, shear_factor, factor, factor)


def affine_images(images: torch.Tensor, matrices: torch.Tensor, mode: str = "nearest") -> torch.Tensor:
    """Warp ``images [B, C, H, W]`` by ``matrices [B, 2, 2]`` about the image centre
    (``p = A (q - c) + c``), filling with zeros; ``mode`` "nearest" is torchvision's
    ``RandomAffine`` default interpolation."""
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    B, _, H, W = images.shape
    if matrices.shape != (B, 2, 2):
        raise ValueError(f"matrices must have shape [{B}, 2, 2], got {tuple(matrices.shape)}")
    # grid_sample reads, for every output pixel p, the source at A^-1 p in normalised
    # coordinates (centre 0, corners +-1 with align_corners=True); anisotropic frames rescale.
    size = torch.tensor([(W - 1) / 2, (H - 1) / 2], dtype=torch.float64)
    inverse = torch.linalg.inv(matrices.detach().cpu().to(torch.float64))
    theta = torch.zeros(B, 2, 3, dtype=torch.float64)
    theta[:, :, :2] = inverse * (size.view(1, 1, 2) / size.view(1, 2, 1)) if H != W else inverse
    # The grid is computed on the CPU whatever the images' device: a GPU's matrix product may
    # round a coordinate differently in the last bit, and a nearest-pixel lookup at a .5
    # boundary would then take another pixel. Copied without waiting for the device.
    grid = torch.nn.functional.affine_grid(theta.to(torch.float32), [B, 1, H, W], align_corners=True)
    grid = host_to_device(grid, images.device)
    return torch.nn.functional.grid_sample(images.float(), grid, mode=mode, padding_mode="zeros",
                                           align_corners=True).to(images.dtype)


def center_crop_images(images: torch.Tensor, size: int) -> torch.Tensor:
    H, W = images.shape[-2:]
    if size > H or size > W:
        raise ValueError(f"crop size {size} is larger than the images ({H}x{W})")
    top, left = (H - size) // 2, (W - size) // 2
    return images[..., top:top + size, left:left + size].contiguous()


class BatchAugmenter:
    """Training augmentation of a (local slice of a) global batch.

    ``max_shift``: random translations of up to that many pixels, zero padding (the paper's
    MNIST augmentation). ``crop_size``: random ``crop_size`` crops (the CIFAR-10 recipe).
    ``random_affine``: ``{"degrees", "shear", "scale"}`` as torchvision's ``RandomAffine``
    (Mitterreiter et al.: 8, 15, (0.9, 1.1)), applied after crops and shifts.
    Applied to ``"image"`` and, when present, ``"components"`` with the same offsets.
    """

    def __init__(self, seed: int, max_shift: int = 0, crop_size=None, rank: int = 0, world_size: int = 1,
                 random_affine=None):
        self.seed, self.max_shift, self.crop_size = seed, max_shift, crop_size
        self.rank, self.world_size = rank, world_size
        self.random_affine = dict(random_affine) if random_affine else None

    @property
    def active(self) -> bool:
        return self.max_shift > 0 or self.crop_size is not None or self.random_affine is not None

    def __call__(self, batch: dict, step: int) -> dict:
        if not self.active:
            return batch
        local = batch["image"].shape[0]
        global_batch = local * self.world_size
        generator = step_generator(self.seed, step)
        # Rank r holds the global positions r, r + W, r + 2W, ... (DistributedSampler's split).
        rows = torch.arange(self.rank, global_batch, self.world_size)
        batch = dict(batch)
        keys = [k for k in ("image", "components") if k in batch]
        device = batch["image"].device
        # Drawn on the CPU generator in the same order wherever the batch is; only the drawn
        # values travel to the batch's device (no host synchronisation on a GPU).
        if self.crop_size is not None:
            H, W = batch["image"].shape[-2:]
            tops = torch.randint(0, H - self.crop_size + 1, (global_batch,), generator=generator)[rows]
            lefts = torch.randint(0, W - self.crop_size + 1, (global_batch,), generator=generator)[rows]
            tops, lefts = host_to_device(tops, device), host_to_device(lefts, device)
            for key in keys:
                batch[key] = crop_images(batch[key], tops, lefts, self.crop_size)
        if self.max_shift > 0:
            m = self.max_shift
            offsets = torch.randint(-m, m + 1, (global_batch, 2), generator=generator)[rows]
            offsets = host_to_device(offsets, device)
            for key in keys:
                batch[key] = shift_images(batch[key], offsets, m)
        if self.random_affine is not None:
            options = self.random_affine
            matrices = random_affine_matrices(global_batch, generator, options["degrees"],
                                              options["shear"], options["scale"])[rows]
            for key in keys:
                image = batch[key]
                flat = image.flatten(0, 1) if image.dim() == 5 else image
                per_image = matrices.repeat_interleave(image.shape[1], 0) if image.dim() == 5 else matrices
                batch[key] = affine_images(flat, per_image).view_as(image)
        return batch

    def evaluation(self, batch: dict) -> dict:
        """Test-time transform: the centre crop when training crops, otherwise nothing."""
        if self.crop_size is None:
            return batch
        batch = dict(batch)
        for key in ("image", "components"):
            if key in batch and batch[key].shape[-1] != self.crop_size:
                batch[key] = center_crop_images(batch[key], self.crop_size)
        return batch
