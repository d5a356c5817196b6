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
    """Class indices ``[B]`` or multi-hot ``[B, J]`` targets as a float ``[B, J]`` tensor.

    Args:
        targets (Tensor): integer class indices ``[B]`` in ``[0, num_classes)``, or multi-hot
            ``[B, num_classes]``.
        num_classes (int): ``J``.
        dtype (torch.dtype): dtype of the result.

    Returns:
        Tensor: ``[B, num_classes]`` of ``dtype`` (0/1 for class indices).

    Raises:
        TypeError: 1-D ``targets`` are not integers.
        ValueError: indices out of range (on the CPU; on a GPU a device-side assertion fails
            at the next synchronisation instead), or a wrong shape.
    """
    if targets.dim() == 1:
        if targets.dtype.is_floating_point:
            raise TypeError(f"class-index targets must be integers, got dtype {targets.dtype}")
        if targets.device.type == "cpu":
            if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
                raise ValueError(f"targets must be class indices in [0, {num_classes}), "
                                 f"got values in [{int(targets.min())}, {int(targets.max())}]")
        elif targets.numel():
            # On a GPU the check stays on the device (a host read would synchronise every
            # training step; this runs twice per step): a bad index fails the next sync.
            torch._assert_async(((targets >= 0) & (targets < num_classes)).all(),
                                f"targets must be class indices in [0, {num_classes})")
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
    """Margin loss of the CapsNet paper (Sabour, Frosst & Hinton 2017).

    ``L = sum_k T_k max(0, m_pos - |v_k|)^2 + lam (1 - T_k) max(0, |v_k| - m_neg)^2`` per
    sample, with ``T_k = 1`` for the classes present. The loss is summed over classes per
    sample, as in the paper (not averaged), then reduced over the batch.

    Args:
        lengths (Tensor): capsule lengths ``[B, J]`` (e.g. ``CapsNetOutput.lengths``),
            floating point.
        targets (Tensor): integer class indices ``[B]`` or multi-hot ``[B, J]`` (several
            digits present, as in MultiMNIST).
        m_pos (float, optional): the length a present class's capsule should exceed.
            Default: ``0.9``.
        m_neg (float, optional): the length an absent class's capsule should stay below.
            Default: ``0.1``.
        lam (float, optional): down-weighting of the absent classes' term. Default: ``0.5``.
        reduction (str, optional): ``"mean"`` over the batch, ``"sum"`` or ``"none"``.
            Default: ``"mean"``.

    Returns:
        Tensor: a scalar, or the per-sample losses ``[B]`` with ``reduction="none"``.

    Raises:
        TypeError: ``lengths`` is not a floating-point tensor, ``targets`` is not a tensor, or
            1-D ``targets`` are not integers.
        ValueError: ``lengths`` is not ``[B, J]`` or is empty, the batch sizes differ, a class
            index is out of range, multi-hot ``targets`` are not ``[B, J]``, or an unknown
            ``reduction``.

    Example::

        >>> import torch, capsnet_ext
        >>> lengths = torch.rand(4, 10)
        >>> capsnet_ext.margin_loss(lengths, torch.tensor([0, 3, 9, 3])).shape
        torch.Size([])
        >>> capsnet_ext.margin_loss(lengths, torch.tensor([0, 3, 9, 3]), reduction="none").shape
        torch.Size([4])
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

    The CapsNet objective adds ``0.0005`` times this to the margin loss.

    Args:
        reconstructions (Tensor): decoder output, e.g. ``CapsNetOutput.reconstructions``
            ``[B, 784]``, floating point.
        images (Tensor): the images, any shape with the same number of elements per sample
            (e.g. ``[B, 1, 28, 28]``), floating point.
        reduction (str, optional): ``"mean"`` over the batch, ``"sum"`` or ``"none"``.
            Default: ``"mean"``.

    Returns:
        Tensor: a scalar, or the per-sample sums ``[B]`` with ``reduction="none"``.

    Raises:
        TypeError: an argument is not a floating-point tensor.
        ValueError: an empty tensor, different batch sizes or numbers of pixels, or an
            unknown ``reduction``.

    Example::

        >>> import torch, capsnet_ext
        >>> images = torch.rand(4, 1, 28, 28)
        >>> capsnet_ext.reconstruction_loss(torch.rand(4, 784), images).shape
        torch.Size([])
    """
    check_float_tensor("reconstructions", reconstructions)
    check_float_tensor("images", images)
    _check_reduction(reduction)
    if reconstructions.shape[0] != images.shape[0] or reconstructions.numel() != images.numel():
        raise ValueError(f"reconstructions {tuple(reconstructions.shape)} and images "
                         f"{tuple(images.shape)} must hold the same number of pixels per sample")
    diff = reconstructions.reshape(reconstructions.shape[0], -1) - images.reshape(images.shape[0], -1)
    return _reduce((diff * diff).sum(dim=1), reduction)
