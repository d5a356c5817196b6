"""Losses of the CapsNet paper."""
from __future__ import annotations

import torch

from ._validation import check_float_tensor

_REDUCTIONS = ("mean", "sum", "none")


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def one_hot_targets(targets: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """Class indices ``[B]`` or multi-hot ``[B, J]`` targets as a float ``[B, J]`` tensor."""
    if targets.dim() == 1:
        if targets.dtype.is_floating_point:
            raise TypeError(f"class-index targets must be integers, got dtype {targets.dtype}")
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
            raise ValueError(f"targets must be class indices in [0, {num_classes}), "
                             f"got values in [{int(targets.min())}, {int(targets.max())}]")
        return torch.nn.functional.one_hot(targets.long(), num_classes).to(dtype)
    if targets.dim() == 2:
        if targets.shape[1] != num_classes:
            raise ValueError(f"multi-hot targets must have shape [B, {num_classes}], "
                             f"got {tuple(targets.shape)}")
        return targets.to(dtype)
    raise ValueError(f"targets must be class indices [B] or multi-hot [B, J], got shape {tuple(targets.shape)}")


def margin_loss(
    lengths: torch.Tensor,
    targets: torch.Tensor,
    m_pos: float = 0.9,
    m_neg: float = 0.1,
    lam: float = 0.5,
    reduction: str = "mean",
) -> torch.Tensor:
    """``L = sum_k T_k max(0, m_pos - |v_k|)^2 + lam (1 - T_k) max(0, |v_k| - m_neg)^2``.

    Args:
        lengths: capsule lengths ``[B, J]``.
        targets: class indices ``[B]`` or multi-hot ``[B, J]`` (several digits present, as in
            MultiMNIST).
        reduction: ``"mean"`` over the batch (default), ``"sum"`` or ``"none"`` (``[B]``).
    The loss is summed over classes per sample, as in the paper (not averaged).
    """
    check_float_tensor("lengths", lengths, 2, "[B, J]")
    _check_reduction(reduction)
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.shape[0] != lengths.shape[0]:
        raise ValueError(f"targets has batch size {targets.shape[0]} but lengths has {lengths.shape[0]}")
    t = one_hot_targets(targets, lengths.shape[1], lengths.dtype)
    pos = t * torch.clamp(m_pos - lengths, min=0) ** 2
    neg = lam * (1 - t) * torch.clamp(lengths - m_neg, min=0) ** 2
    return _reduce((pos + neg).sum(dim=1), reduction)


def reconstruction_loss(reconstructions: torch.Tensor, images: torch.Tensor,
                        reduction: str = "mean") -> torch.Tensor:
    """Sum of squared pixel errors per image, then reduced over the batch.

    ``reconstructions`` and ``images`` may have any shapes with the same number of elements
    per sample (e.g. ``[B, 784]`` against ``[B, 1, 28, 28]``). The CapsNet objective adds
    ``0.0005`` times this to the margin loss.
    """
    check_float_tensor("reconstructions", reconstructions)
    check_float_tensor("images", images)
    _check_reduction(reduction)
    if reconstructions.shape[0] != images.shape[0] or reconstructions.numel() != images.numel():
        raise ValueError(f"reconstructions {tuple(reconstructions.shape)} and images "
                         f"{tuple(images.shape)} must hold the same number of pixels per sample")
    diff = reconstructions.reshape(reconstructions.shape[0], -1) - images.reshape(images.shape[0], -1)
    return _reduce((diff * diff).sum(dim=1), reduction)
