"""The training loop: ``train(cfg) -> dict``.

Design points:

* **Exact resume.** The data order of epoch ``e`` is ``DistributedSampler(seed=cfg.seed)``'s
  permutation for ``e`` and the augmentation of step ``t`` is drawn from a generator seeded by
  ``(seed, t)``, so the position in the data is a function of the step alone. Checkpoints hold
  model, optimizer, scheduler, every RNG state and the step, and a resumed run skips to that
  step's batch: its parameters equal an uninterrupted run's bit for bit (CPU; on GPUs as far
  as the kernels are deterministic, see ``deterministic``).
* **DDP.** Global batch ``batch_size`` split across ranks as ``DistributedSampler`` splits
  it (rank ``r`` takes positions ``r, r + W, ...``), augmentation offsets drawn for the
  global batch, gradients averaged by DDP: the same update as one process with the whole
  batch, up to summation order. Rank 0 logs and writes checkpoints.
* **Interrupts.** SIGINT (Ctrl-C) and SIGTERM set a flag; the loop finishes its step, writes
  ``last.pt`` and returns (a second Ctrl-C aborts at once).
"""
from __future__ import annotations

import datetime
import inspect
import json
import math
import pathlib
import platform
import signal
import sys
import threading
import time
from typing import Any, Dict, Iterable, List, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..nn import MODEL_REGISTRY, build_model
from .augment import BatchAugmenter
from .checkpoint import atomic_torch_save, atomic_write_text, load_checkpoint, rng_state, set_rng_state
from .config import TrainConfig
from .distributed import DistInfo, barrier, broadcast_flag, cleanup, resolve_device, setup_distributed
from .evaluation import correct_mask, evaluate, forward_and_loss, scores_of, unwrap
from .logging_utils import CSVLog, TensorBoardLog

TRAIN_FIELDS = ["step", "epoch", "lr", "loss", "margin", "recon", "ce", "accuracy",
                "images_per_sec", "elapsed_s"]
EVAL_FIELDS = ["step", "epoch", "test_loss", "test_error", "test_accuracy", "best_error", "n"]


def environment_info(device: torch.device) -> Dict[str, Any]:
    """Versions, device and date, stored beside every run's metrics."""
    import numpy

    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "cuda": torch.version.cuda,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    return info


def routing_backend_name(model: nn.Module, device: torch.device, dtype=torch.float32) -> Optional[str]:
    """The backend module ``auto`` (or the configured name) resolves to for the model's
    routing layer, e.g. ``"reference"`` or ``"triton"``; ``None`` for models without routing."""
    from .. import dispatch

    backend = getattr(unwrap(model), "config", {}).get("backend")
    if backend is None:
        return None
    layer = next((m for m in unwrap(model).modules() if hasattr(m, "leaky") and hasattr(m, "weight")), None)
    options = dict(leaky=getattr(layer, "leaky", False), detach_inner=getattr(layer, "detach_inner", False),
                   prior=getattr(layer, "prior", None) is not None,
                   temperature=float(getattr(layer, "temperature", 1.0)))
    try:
        module = dispatch.select("capsule_routing", backend, device, dtype, **options)
    except Exception as exc:
        return f"unavailable ({exc})"
    return getattr(module, "NAME", module.__name__)


def _fill_model_config(model_config: Dict[str, Any], bundle, crop_size: Optional[int]) -> Dict[str, Any]:
    """Give the model the dataset's image size, channels and classes (only the arguments its
    builder accepts)."""
    model_config = dict(model_config)
    builder = MODEL_REGISTRY.get(model_config["arch"])
    try:
        accepted = set(inspect.signature(builder).parameters) if builder is not None else set()
    except (TypeError, ValueError):
        accepted = set()
    data_shape = {"input_size": crop_size or bundle.input_size, "in_channels": bundle.in_channels,
                  "num_classes": bundle.num_classes}
    for key, value in data_shape.items():
        if key in accepted or any(p.kind == p.VAR_KEYWORD for p in
                                  (inspect.signature(builder).parameters.values() if builder else [])):
            model_config[key] = value
    return model_config


def _lr_lambda(cfg: TrainConfig, steps_per_epoch: Optional[int] = None):
    floor = cfg.lr_min / cfg.lr

    def factor(step: int) -> float:
        if cfg.lr_decay_per_epoch:
            return max(cfg.lr_decay ** (step // steps_per_epoch), floor)
        exponent = step / cfg.lr_decay_steps
        if cfg.lr_staircase:
            exponent = math.floor(exponent)
        return max(cfg.lr_decay ** exponent, floor)

    return factor


class _StepBatches:
    """The batches of one epoch from a given position, for this rank.

    Indices follow ``DistributedSampler(shuffle=True, drop_last=True)`` exactly (a permutation
    seeded by ``seed + epoch``, cut to a multiple of the world size, every ``world_size``-th
    index for this rank), so every world size sees the same global batches. The permutation
    stays a tensor: MultiMNIST's 60M training examples would be gigabytes as a Python list.
    The incomplete last batch is dropped so every step has the full global batch.
    """

    def __init__(self, dataset, local_batch: int, info: DistInfo, seed: int, num_workers: int):
        self.dataset, self.local_batch, self.info = dataset, local_batch, info
        self.num_workers = num_workers
        self.seed = seed
        self.per_rank = len(dataset) // info.world_size
        self.steps_per_epoch = self.per_rank // local_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"the training set ({len(dataset)} examples) is smaller than one "
                             f"global batch ({local_batch * info.world_size}); lower batch_size")

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """This rank's indices for ``epoch``, in order."""
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        permutation = torch.randperm(len(self.dataset), generator=generator)
        world = self.info.world_size
        return permutation[:self.per_rank * world][self.info.rank::world]

    def epoch(self, epoch: int, start: int = 0) -> Iterable[dict]:
        indices = self.epoch_indices(epoch)
        batches = (indices[k * self.local_batch:(k + 1) * self.local_batch].tolist()
                   for k in range(start, self.steps_per_epoch))
        if self.num_workers > 0:
            yield from DataLoader(self.dataset, batch_sampler=list(batches), num_workers=self.num_workers,
                                  persistent_workers=False, pin_memory=torch.cuda.is_available())
            return
        fast = getattr(self.dataset, "batch", None)
        for batch_indices in batches:
            if callable(fast):
                yield fast(batch_indices)
            else:
                yield torch.utils.data.default_collate([self.dataset[i] for i in batch_indices])


class _StopFlag:
    """SIGINT/SIGTERM handler: first signal asks the loop to save and stop; a second SIGINT
    raises KeyboardInterrupt at once."""

    def __init__(self):
        self.requested = False
        self.signal_name = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _call(callbacks, name: str, *args) -> None:
    for callback in callbacks:
        method = getattr(callback, name, None)
        if callable(method):
            method(*args)


def train(cfg: TrainConfig, callbacks: Optional[List[Any]] = None, *, resume: Optional[str] = None,
          datasets=None) -> Dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.dataset`` and return the final metrics.

    Args:
        cfg: the run's :class:`TrainConfig`.
        callbacks: objects with any of ``on_train_start(model)`` (before the first step),
            ``on_after_backward(step, model)`` (after backward,
            before the optimizer step; every ``cfg.grad_flow_every`` steps), ``on_eval(step,
            metrics)``, ``on_train_end(out_dir)``.
        resume: a checkpoint file or run folder (``<out>/checkpoints/last.pt``) to continue
            from; its config replaces ``cfg`` except ``out``, ``max_steps``, ``epochs``,
            ``device``, ``progress`` and the logging intervals.
        datasets: a ready :class:`capsnet_ext.data.DatasetBundle` (else ``build_datasets``).

    Returns a dict with ``out``, ``best_checkpoint``, ``last_checkpoint``, ``step``,
    ``epoch``, ``test_error``/``test_accuracy`` (final evaluation), ``best_error``,
    ``seconds_per_epoch``, ``images_per_sec``, ``backend``, ``interrupted`` and ``metrics``.
    """
    callbacks = list(callbacks or [])
    ckpt = None
    if resume is not None:
        ckpt = load_checkpoint(resume)
        keep = {k: getattr(cfg, k) for k in ("out", "max_steps", "epochs", "device", "progress",
                                             "log_every", "eval_every", "checkpoint_every",
                                             "num_workers", "data_dir", "tensorboard")}
        saved = dict(ckpt["config"])
        saved.update(keep)
        cfg = TrainConfig(**saved)

    device_type = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" \
        else torch.device(cfg.device).type
    info = setup_distributed(torch.device(device_type))
    try:
        return _train(cfg, callbacks, ckpt, datasets, info)
    finally:
        cleanup(info)


def _train(cfg: TrainConfig, callbacks, ckpt, datasets, info: DistInfo) -> Dict[str, Any]:
    device = resolve_device(cfg.device, info.local_rank)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if cfg.batch_size % info.world_size:
        raise ValueError(f"batch_size {cfg.batch_size} (the global batch) must be divisible by the "
                         f"number of processes {info.world_size}")
    local_batch = cfg.batch_size // info.world_size
    out_dir = pathlib.Path(cfg.out)
    ckpt_dir = out_dir / "checkpoints"

    if datasets is None:
        from ..data import build_datasets

        datasets = build_datasets(cfg.dataset, cfg.data_dir, seed=cfg.seed, **cfg.dataset_options)
    bundle = datasets
    multi_label = bool(bundle.multi_label)

    torch.manual_seed(cfg.seed)
    import numpy as np
    import random

    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)
    model_config = ckpt["model_config"] if ckpt is not None else _fill_model_config(
        cfg.model_config(), bundle, cfg.crop_size)
    if ckpt is not None:
        model_config = dict(model_config)
        for key, value in cfg.model_config().items():
            if key in ("backend",):  # a different kernel backend may resume the same weights
                model_config[key] = value
    model = build_model(model_config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(cfg, max(len(bundle.train) // info.world_size // local_batch, 1)))
    if cfg.record_gradient_flow:
        from ..analysis.gradient_flow import GradientFlowRecorder

        if not any(isinstance(cb, GradientFlowRecorder) for cb in callbacks):
            callbacks = list(callbacks) + [GradientFlowRecorder(every=max(cfg.grad_flow_every, 1))]

    start_step, best_error, last_metrics = 0, float("inf"), {}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_step = int(ckpt["step"])
        best_error = float(ckpt.get("best_error", float("inf")))
        last_metrics = ckpt.get("metrics") or {}
        per_rank = ckpt.get("rng_per_rank") or [ckpt["rng"]]
        set_rng_state(per_rank[info.rank] if len(per_rank) == info.world_size else ckpt["rng"])
        # Callbacks that keep a record (gradient flow) continue it from the checkpoint.
        saved_states = ckpt.get("callback_state") or {}
        for k, callback in enumerate(callbacks):
            key = f"{k}:{type(callback).__name__}"
            if key in saved_states and callable(getattr(callback, "load_state_dict", None)):
                callback.load_state_dict(saved_states[key], before_step=start_step)

    _call(callbacks, "on_train_start", model)
    train_model = model
    if info.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    batches = _StepBatches(bundle.train, local_batch, info, cfg.seed, cfg.num_workers)
    steps_per_epoch = batches.steps_per_epoch
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    augment = BatchAugmenter(cfg.seed, cfg.max_shift, cfg.crop_size, info.rank, info.world_size,
                             random_affine=cfg.random_affine)
    backend_name = routing_backend_name(model, device)
    env = environment_info(device)

    main = info.is_main
    train_log = CSVLog(out_dir / "train_log.csv", TRAIN_FIELDS) if main else None
    eval_log = CSVLog(out_dir / "eval_log.csv", EVAL_FIELDS) if main else None
    tb = TensorBoardLog(out_dir / "tensorboard" if (main and cfg.tensorboard) else None)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        train_log.truncate_after(start_step)
        eval_log.truncate_after(start_step)
        atomic_write_text(out_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")

    def save(name: str, step: int, metrics: Dict) -> Optional[pathlib.Path]:
        state = rng_state()
        if info.enabled:
            per_rank = [None] * info.world_size
            torch.distributed.all_gather_object(per_rank, state)
        else:
            per_rank = [state]
        path = None
        if main:
            payload = {
                "model_config": model.config if hasattr(model, "config") else model_config,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": state, "rng_per_rank": per_rank,
                "step": step, "epoch": step // steps_per_epoch, "config": cfg.to_dict(),
                "metrics": metrics, "best_error": best_error, "environment": env,
                "world_size": info.world_size,
                "callback_state": {f"{k}:{type(cb).__name__}": cb.state_dict()
                                   for k, cb in enumerate(callbacks) if callable(getattr(cb, "state_dict", None))},
            }
            path = atomic_torch_save(payload, ckpt_dir / name)
        barrier(info)
        return path

    def run_eval(step: int) -> Dict:
        nonlocal best_error
        metrics = evaluate(model, bundle.test, num_classes=bundle.num_classes, multi_label=multi_label,
                           device=device, batch_size=cfg.eval_batch_size, limit=cfg.eval_limit,
                           precision=cfg.precision, recon_weight=cfg.recon_weight,
                           recon_target=cfg.recon_target, margin=cfg.margin,
                           transform=augment.evaluation, rank=info.rank, world_size=info.world_size)
        improved = metrics["error"] < best_error
        best_error = min(best_error, metrics["error"])
        metrics["best_error"] = best_error
        metrics["step"] = step
        if main:
            row = {"step": step, "epoch": step / steps_per_epoch, "test_loss": metrics["loss"],
                   "test_error": metrics["error"], "test_accuracy": metrics["accuracy"],
                   "best_error": best_error, "n": metrics["n"]}
            eval_log.write(row)
            tb.scalars("test", {"loss": metrics["loss"], "error": metrics["error"],
                                "accuracy": metrics["accuracy"]}, step)
        if improved:
            save("best.pt", step, metrics)
        _call(callbacks, "on_eval", step, metrics)
        return metrics

    progress = None
    if main and cfg.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=total_steps, initial=start_step, desc=f"train {cfg.dataset}",
                        dynamic_ncols=True, file=sys.stderr)

    step = start_step
    interrupted = None
    train_seconds = 0.0
    window = {"loss": 0.0, "margin": 0.0, "recon": 0.0, "ce": 0.0, "correct": 0.0, "n": 0, "steps": 0}
    window_start = time.perf_counter()
    train_model.train()
    with _StopFlag() as stop:
        while step < total_steps and interrupted is None:
            epoch, position = divmod(step, steps_per_epoch)
            for batch in batches.epoch(epoch, position):
                t0 = time.perf_counter()
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                batch = augment(batch, step)
                loss, parts, out = forward_and_loss(
                    train_model, batch, recon_weight=cfg.recon_weight, recon_target=cfg.recon_target,
                    margin=cfg.margin, multi_label=multi_label, device=device, precision=cfg.precision)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if callbacks and (cfg.grad_flow_every <= 1 or step % cfg.grad_flow_every == 0):
                    _call(callbacks, "on_after_backward", step, model)
                optimizer.step()
                scheduler.step()
                step += 1
                with torch.no_grad():
                    correct = correct_mask(scores_of(out).detach(), batch, multi_label)
                window["loss"] += float(loss.detach())
                for key in ("margin", "recon", "ce"):
                    if key in parts:
                        window[key] += float(parts[key])
                window["correct"] += float(correct.sum())
                window["n"] += int(correct.numel())
                window["steps"] += 1
                train_seconds += time.perf_counter() - t0

                if step % cfg.log_every == 0 or step == total_steps:
                    elapsed = time.perf_counter() - window_start
                    row = {"step": step, "epoch": step / steps_per_epoch,
                           "lr": scheduler.get_last_lr()[0],
                           "loss": window["loss"] / window["steps"],
                           "accuracy": window["correct"] / max(window["n"], 1),
                           "images_per_sec": window["n"] * info.world_size / max(elapsed, 1e-9),
                           "elapsed_s": train_seconds}
                    for key in ("margin", "recon", "ce"):
                        if window[key]:
                            row[key] = window[key] / window["steps"]
                    if main:
                        train_log.write(row)
                        tb.scalars("train", {k: v for k, v in row.items() if k not in ("step",)}, step)
                        if progress is not None:
                            progress.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.4f}",
                                                 img_s=f"{row['images_per_sec']:.0f}")
                    window = dict.fromkeys(window, 0.0)
                    window["n"] = window["steps"] = 0
                    window_start = time.perf_counter()
                if progress is not None:
                    progress.update(1)

                end_of_epoch = step % steps_per_epoch == 0
                if (cfg.eval_every is not None and step % cfg.eval_every == 0) or \
                        (cfg.eval_every is None and end_of_epoch) or step == total_steps:
                    last_metrics = run_eval(step)
                    if progress is not None:
                        progress.set_postfix(test_err=f"{100 * last_metrics['error']:.2f}%")
                if step % cfg.checkpoint_every == 0 and step != total_steps:
                    save("last.pt", step, last_metrics)
                if broadcast_flag(stop.requested, info, device):
                    interrupted = stop.signal_name or "signal"
                    break
                if step >= total_steps:
                    break
        save("last.pt", step, last_metrics)

    if progress is not None:
        progress.close()
    if main:
        train_log.close()
        eval_log.close()
        tb.close()
    epochs_done = (step - start_step) / steps_per_epoch
    result = {
        "out": str(out_dir),
        "last_checkpoint": str(ckpt_dir / "last.pt"),
        "best_checkpoint": str(ckpt_dir / "best.pt") if (ckpt_dir / "best.pt").is_file() else None,
        "step": step, "epoch": step / steps_per_epoch, "steps_per_epoch": steps_per_epoch,
        "test_error": last_metrics.get("error"), "test_accuracy": last_metrics.get("accuracy"),
        "best_error": best_error if math.isfinite(best_error) else None,
        "seconds_per_epoch": train_seconds / epochs_done if epochs_done > 0 else None,
        "train_seconds": train_seconds,
        "images_per_sec": (step - start_step) * cfg.batch_size / train_seconds if train_seconds else None,
        "backend": backend_name, "world_size": info.world_size,
        "interrupted": interrupted,
        "metrics": {k: v for k, v in last_metrics.items() if k not in ("scores", "labels")},
        "environment": env, "dataset": cfg.dataset,
    }
    if main:
        atomic_write_text(out_dir / "metrics.json", json.dumps(result, indent=2) + "\n")
        _call(callbacks, "on_train_end", out_dir)
    return result
