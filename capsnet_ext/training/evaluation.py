"""Losses, predictions and test metrics shared by the trainer and ``capsnet-ext eval``.

A model returning :class:`capsnet_ext.nn.CapsNetOutput` is a capsule model: margin loss on the
capsule lengths plus ``recon_weight`` x reconstruction loss. A model returning a plain tensor
is a classifier: cross-entropy (binary cross-entropy on multi-hot targets, MultiMNIST).
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..losses import margin_loss, reconstruction_loss
from ..nn import CapsNetOutput


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def is_capsule_output(out) -> bool:
    return isinstance(out, CapsNetOutput) or (isinstance(out, tuple) and hasattr(out, "lengths"))


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def scores_of(out) -> torch.Tensor:
    """Class scores ``[B, J]``: capsule lengths or classifier logits, in float32."""
    return (out.lengths if is_capsule_output(out) else out).float()


def predict_labels(scores: torch.Tensor, multi_label: bool, k: int = 2) -> torch.Tensor:
    """Arg-max class ``[B]``, or the ``k`` best classes ``[B, k]`` (sorted) when multi-label."""
    if multi_label:
        return scores.topk(k, dim=1).indices.sort(dim=1).values
    return scores.argmax(dim=1)


def correct_mask(scores: torch.Tensor, batch: dict, multi_label: bool) -> torch.Tensor:
    """Per-example correctness. MultiMNIST counts an example right only when both of its
    labels are the two longest capsules (the paper's measure)."""
    if multi_label:
        truth = batch["labels"].to(scores.device).sort(dim=1).values
        return (predict_labels(scores, True, truth.shape[1]) == truth).all(dim=1)
    return scores.argmax(dim=1) == batch["label"].to(scores.device)


def forward_and_loss(model: nn.Module, batch: dict, *, recon_weight: float, recon_target: str,
                     margin: Dict[str, float], multi_label: bool, device: torch.device,
                     precision: str = "fp32", train_masking: bool = True):
    """Run the model on a batch and compute the training objective.

    Returns ``(loss, parts, out)`` where ``parts`` holds detached float ``margin``/``recon``
    (capsule models) or ``ce`` (classifiers) terms, and ``out`` is the model output.
    ``train_masking``: mask the decoder by the true labels (training and test loss, as in
    the paper); predictions never depend on it.
    """
    images = batch["image"].to(device, non_blocking=True)
    targets = (batch["label"] if "label" in batch else batch["labels"]).to(device, non_blocking=True)
    with autocast(device, precision):
        try:
            out = model(images, targets=targets if train_masking else None)
        except TypeError:
            out = model(images)
    parts: Dict[str, torch.Tensor] = {}
    if is_capsule_output(out):
        lengths = out.lengths.float()
        loss = margin_loss(lengths, targets, **margin)
        parts["margin"] = loss.detach()
        if recon_weight > 0 and out.reconstructions is not None:
            if recon_target == "components" and "components" in batch and hasattr(unwrap(model), "reconstruct"):
                components = batch["components"].to(device, non_blocking=True)
                capsules = out.capsules
                recon = 0.0
                for k in range(components.shape[1]):
                    mask = torch.nn.functional.one_hot(batch["labels"][:, k].to(device), lengths.shape[1])
                    with autocast(device, precision):
                        rec_k = unwrap(model).reconstruct(capsules, mask.to(capsules.dtype))
                    recon = recon + reconstruction_loss(rec_k.float(), components[:, k])
            else:
                recon = reconstruction_loss(out.reconstructions.float(), images)
            loss = loss + recon_weight * recon
            parts["recon"] = recon.detach()
    else:
        logits = out.float()
        if multi_label or targets.dim() == 2:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets.float())
        else:
            loss = torch.nn.functional.cross_entropy(logits, targets)
        parts["ce"] = loss.detach()
    return loss, parts, out


def _shard_indices(n: int, rank: int, world_size: int) -> List[int]:
    return list(range(rank, n, world_size))


@torch.no_grad()
def evaluate(model: nn.Module, dataset, *, num_classes: int, multi_label: bool = False,
             device: torch.device = torch.device("cpu"), batch_size: int = 256,
             limit: Optional[int] = None, precision: str = "fp32", recon_weight: float = 0.0005,
             recon_target: str = "input", margin: Optional[Dict[str, float]] = None,
             transform=None, num_workers: int = 0, rank: int = 0, world_size: int = 1,
             return_scores: bool = False, progress=None) -> Dict:
    """Test metrics of ``model`` on ``dataset`` (items are dicts, see capsnet_ext.data).

    Under DDP each rank scores every ``world_size``-th example and the sums are all-reduced,
    so every rank returns the metrics of the whole (limited) test set.

    Returns a dict: ``n``, ``loss``, ``accuracy``, ``error`` (fractions), ``per_class_accuracy``
    (list), ``confusion`` (``[true][predicted]`` counts; for multi-label, each label of an
    example counted against the prediction set), and ``scores``/``labels`` tensors when
    ``return_scores`` (for ensembles). ``progress``, when given, is called with the number of
    batches done after each batch (see :func:`evaluation_batches` for the total).
    """
    margin = margin or dict(m_pos=0.9, m_neg=0.1, lam=0.5)
    was_training = model.training
    model.eval()
    n_total = len(dataset) if limit is None else min(limit, len(dataset))
    shard = _shard_indices(n_total, rank, world_size)
    fast = getattr(dataset, "batch", None)
    if callable(fast) and num_workers == 0:
        # Whole batches by index (no per-item Python work; on the device for a dataset held
        # there): the same values as collating the items one by one.
        index = torch.as_tensor(shard, dtype=torch.int64)
        loader = (fast(index[start:start + batch_size]) for start in range(0, len(shard), batch_size))
    else:
        # A DataLoader draws its workers' base seed from the global RNG on every iteration,
        # even unshuffled; an own generator keeps evaluation from shifting the training RNG
        # stream (an exact resume depends on that stream: dropout, shifts).
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, shard), batch_size=batch_size,
                                             shuffle=False, num_workers=num_workers,
                                             generator=torch.Generator())
    # Sums stay on the device until the end: no host synchronisation per batch (float64, added
    # in the same order as Python floats would be, so the numbers do not depend on it).
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64,
                            device="cpu" if multi_label else device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    all_scores, all_labels = [], []
    for batch_index, batch in enumerate(loader):
        if transform is not None:
            batch = transform(batch)
        loss, _, out = forward_and_loss(model, batch, recon_weight=recon_weight,
                                        recon_target=recon_target, margin=margin,
                                        multi_label=multi_label, device=device, precision=precision)
        scores = scores_of(out)
        n = scores.shape[0]
        correct = correct_mask(scores, batch, multi_label)
        loss_sum += loss.detach().to(loss_sum.device, torch.float64) * n
        correct_sum += correct.sum().to(correct_sum.device, torch.float64)
        count += n
        if multi_label:
            truth = batch["labels"].cpu()
            predicted = predict_labels(scores, True, truth.shape[1]).cpu()
            for k in range(truth.shape[1]):
                # A true label counts as found when it is in the predicted set.
                hit = (predicted == truth[:, k:k + 1]).any(dim=1)
                guess = torch.where(hit, truth[:, k], predicted[:, k])
                confusion.index_put_((truth[:, k], guess), torch.ones(n, dtype=torch.float64), accumulate=True)
        else:
            predicted = scores.argmax(dim=1).to(confusion.device)
            confusion.index_put_((batch["label"].long().to(confusion.device), predicted),
                                 torch.ones(n, dtype=torch.float64, device=confusion.device), accumulate=True)
        if return_scores:
            all_scores.append(scores.cpu())
            all_labels.append((batch["labels"] if multi_label else batch["label"]).cpu())
        if progress is not None:
            progress(batch_index + 1)
    sums = torch.stack([loss_sum.cpu(), correct_sum.cpu(), torch.tensor(float(count), dtype=torch.float64)])
    confusion = confusion.cpu()
    if world_size > 1 and dist.is_initialized():
        backend_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
        packed = torch.cat([sums, confusion.flatten()]).to(backend_device)
        dist.all_reduce(packed)
        packed = packed.cpu()
        sums, confusion = packed[:3], packed[3:].view(num_classes, num_classes)
    if was_training:
        model.train()
    count = max(float(sums[2]), 1.0)
    per_class = (confusion.diagonal() / confusion.sum(dim=1).clamp_min(1)).tolist()
    accuracy = float(sums[1]) / count
    metrics = {"n": int(sums[2]), "loss": float(sums[0]) / count, "accuracy": accuracy,
               "error": 1.0 - accuracy, "per_class_accuracy": per_class,
               "confusion": confusion.long().tolist()}
    if return_scores:
        metrics["scores"] = torch.cat(all_scores) if all_scores else torch.empty(0, num_classes)
        metrics["labels"] = torch.cat(all_labels) if all_labels else torch.empty(0, dtype=torch.long)
    return metrics


def evaluation_batches(dataset, *, batch_size: int, limit: Optional[int] = None, rank: int = 0,
                       world_size: int = 1) -> tuple:
    """``(batches, examples)`` that :func:`evaluate` will run on this rank, for progress bars."""
    n_total = len(dataset) if limit is None else min(limit, len(dataset))
    n_rank = len(_shard_indices(n_total, rank, world_size))
    return -(-n_rank // batch_size), n_total


def ensemble_metrics(score_list: Sequence[torch.Tensor], labels: torch.Tensor, multi_label: bool) -> Dict:
    """Accuracy of the average of several models' class scores (the CIFAR-10 recipe's
    ensemble): every tensor is ``[N, J]`` over the same examples in the same order."""
    if not score_list:
        raise ValueError("ensemble_metrics needs at least one score tensor")
    shapes = {tuple(s.shape) for s in score_list}
    if len(shapes) != 1:
        raise ValueError(f"all score tensors must have the same shape, got {sorted(shapes)}")
    mean_scores = torch.stack(list(score_list)).mean(dim=0)
    batch = {"labels": labels} if multi_label else {"label": labels}
    correct = correct_mask(mean_scores, batch, multi_label)
    accuracy = float(correct.double().mean()) if correct.numel() else 0.0
    return {"n": int(correct.numel()), "accuracy": accuracy, "error": 1.0 - accuracy,
            "members": len(score_list)}
