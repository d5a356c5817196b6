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
* **One run per folder.** A new run refuses a run folder that is not empty unless asked to
  ``overwrite`` it (then what an earlier run wrote is removed first, so no two runs' logs,
  checkpoints or TensorBoard events ever mix); ``resume`` continues the run already there.
* **Evaluation schedule.** Every ``eval_every`` steps, by default :func:`auto_eval_every`
  (once per epoch, but never more test images scored than training images seen in between),
  and always after the last step.
* **Throughput** (``images_per_sec`` in ``train_log.csv``, ``metrics.json`` and the console)
  is training images per second of time spent in training steps: moving the batch to the
  device, augmentation, forward, backward and the optimizer step. Evaluation, checkpoints,
  logging and reading the (in-memory) batch are not counted. On a GPU, where the host only
  queues the work, it is the wall time of the stretches of training steps between the
  synchronisations that logging needs (see the loop).
* **Data on the device** (``device_data``). Data sets that fit are held on the training
  device and batches are taken there by index, in the order above; augmentation offsets are
  drawn on the CPU and copied over without waiting. The loss sums stay on the device and are
  read only when a log line, an evaluation or the end needs them, so a GPU is never made to
  wait for the host between steps.
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

from ..data.base import host_to_device
from ..nn import MODEL_REGISTRY, build_model
from .augment import BatchAugmenter
from .checkpoint import atomic_torch_save, atomic_write_text, load_checkpoint, rng_state, set_rng_state
from .config import RESUME_CHANGEABLE, TrainConfig
from .distributed import DistInfo, barrier, broadcast_flag, cleanup, resolve_device, setup_distributed
from .evaluation import correct_mask, evaluate, evaluation_batches, forward_and_loss, scores_of, unwrap
from .logging_utils import Console, CSVLog, TensorBoardLog, format_duration

TRAIN_FIELDS = ["step", "epoch", "lr", "loss", "margin", "recon", "ce", "accuracy",
                "images_per_sec", "elapsed_s"]
EVAL_FIELDS = ["step", "epoch", "test_loss", "test_error", "test_accuracy", "best_error", "n"]
# The per-step sums the trainer keeps on the device: loss, the loss terms, correct predictions.
_SUMS = ("loss", "margin", "recon", "ce", "correct")


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


def routing_backend_name(model: nn.Module, device: torch.device, dtype=torch.float32,
                         strict: bool = False) -> Optional[str]:
    """The backend module ``auto`` (or the configured name) resolves to for the model's
    routing layer, e.g. ``"reference"`` or ``"triton"``; ``None`` for models without routing.
    A backend that cannot run here is ``"unavailable (why)"``, or with ``strict`` the
    dispatch's error (:class:`~capsnet_ext.dispatch.BackendUnavailableError`)."""
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
        if strict:
            raise
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


# What a run writes into its folder (and what ``overwrite`` removes; other files are left).
RUN_ENTRIES = ("config.json", "metrics.json", "train_log.csv", "eval_log.csv", "checkpoints",
               "tensorboard", "figures", "eval", "analysis", "gradient_flow.npz")


class RunFolderExistsError(FileExistsError):
    """A new run was pointed at a folder that already holds files."""


def check_run_folder(out_dir: pathlib.Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start a new run in a non-empty folder unless ``overwrite``."""
    out_dir = pathlib.Path(out_dir)
    if resume or overwrite or not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise RunFolderExistsError(f"run folder {str(out_dir)!r} exists and is not a folder")
    entries = sorted(p.name for p in out_dir.iterdir())
    if entries:
        shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
        raise RunFolderExistsError(
            f"run folder {str(out_dir)!r} is not empty ({shown}); pass --resume to continue the "
            f"run in it, --overwrite to replace it, or another --out (train(..., resume=... or "
            f"overwrite=True) from Python)")


def clear_run_folder(out_dir: pathlib.Path) -> List[str]:
    """Remove what an earlier run wrote into ``out_dir`` (``RUN_ENTRIES``); returns the names."""
    import shutil

    removed = []
    for name in RUN_ENTRIES:
        path = pathlib.Path(out_dir) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def auto_eval_every(steps_per_epoch: int, eval_items: int, batch_size: int) -> int:
    """The default evaluation interval in steps: once per epoch, except that evaluations are
    spaced at least ``ceil(eval_items / batch_size)`` steps apart, so a run never scores more
    test images than it trains on in between (a short run on a small training subset would
    otherwise spend most of its time evaluating the full test set)."""
    return max(1, steps_per_epoch, -(-eval_items // batch_size))


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

    With ``device_dataset`` (the same data held on the training device, see
    :func:`device_datasets`) the epoch's indices are computed as above, copied to the device
    once per epoch, and each batch is an ``index_select`` there: the same batches, with no
    per-step host work.
    """

    def __init__(self, dataset, local_batch: int, info: DistInfo, seed: int, num_workers: int,
                 device_dataset=None):
        self.dataset, self.local_batch, self.info = dataset, local_batch, info
        self.device_dataset = device_dataset
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
        if self.device_dataset is not None:
            yield from self._device_epoch(epoch, start)
            return
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

    def _device_epoch(self, epoch: int, start: int) -> Iterable[dict]:
        size = self.local_batch
        # The steps still to run of this epoch, in one copy to the device.
        indices = self.epoch_indices(epoch)[start * size:self.steps_per_epoch * size]
        indices = host_to_device(indices.contiguous(), self.device_dataset.device)
        for k in range(self.steps_per_epoch - start):
            yield self.device_dataset.batch(indices[k * size:(k + 1) * size])


# ``device_data="auto"`` on a GPU: a data set is held there when its copy fits in this fraction
# of the free device memory (after the model is built), the training set first. MNIST's 60,000
# images are 47 MB as uint8; the rest stays for activations, whose size the trainer cannot know.
DEVICE_DATA_FRACTION = 0.25


def device_datasets(mode: str, device: torch.device, train_set, test_set, num_workers: int = 0,
                    free_bytes: Optional[int] = None):
    """``(train, test)`` copies held on ``device`` (``None`` for a set that stays on the host).

    ``mode``: ``"off"``; ``"on"`` (every set that can be moved, i.e. has ``to_device``;
    a training set that cannot is an error); ``"auto"``: on the CPU every set that can be
    moved, on another device each one whose copy (``device_nbytes()``) fits in
    ``DEVICE_DATA_FRACTION`` of ``free_bytes`` (default: the device's free memory now),
    the training set first; nothing with ``num_workers > 0`` (loader workers were asked for).
    """
    def movable(dataset) -> bool:
        return all(callable(getattr(dataset, name, None)) for name in ("to_device", "device_nbytes"))

    if mode == "off":
        return None, None
    if mode == "on":
        if not movable(train_set):
            raise ValueError(f"device_data='on': the training set ({type(train_set).__name__}) cannot be "
                             f"held on the device (it has no to_device); use device_data 'auto' or 'off'")
        return train_set.to_device(device), (test_set.to_device(device) if movable(test_set) else None)
    if mode != "auto":
        raise ValueError(f"device_data must be 'auto', 'on' or 'off', got {mode!r}")
    if num_workers > 0:
        return None, None
    device = torch.device(device)
    if device.type == "cpu":
        budget = math.inf
    else:
        if free_bytes is None:
            free_bytes = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
        budget = DEVICE_DATA_FRACTION * free_bytes
    moved = []
    for dataset in (train_set, test_set):
        if movable(dataset) and dataset.device_nbytes() <= budget:
            budget -= dataset.device_nbytes()
            moved.append(dataset.to_device(device))
        else:
            moved.append(None)
    return tuple(moved)


def _synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu":
        backend = getattr(torch, device.type, None)
        if callable(getattr(backend, "synchronize", None)):
            backend.synchronize()


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
          datasets=None, overwrite: bool = False, console: Optional[Console] = None) -> Dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.dataset`` and return the final metrics.

    Args:
        cfg: the run's :class:`TrainConfig`.
        callbacks: objects with any of ``on_train_start(model)`` (before the first step),
            ``on_after_backward(step, model)`` (after backward,
            before the optimizer step; every ``cfg.grad_flow_every`` steps), ``on_eval(step,
            metrics)``, ``on_train_end(out_dir)``.
        resume: a checkpoint file or run folder (``<out>/checkpoints/last.pt``) to continue
            from; its config replaces ``cfg`` except the fields in
            :data:`~capsnet_ext.training.config.RESUME_CHANGEABLE` (``out``, ``max_steps``,
            ``epochs``, ``device``, the logging, evaluation and checkpoint intervals,
            ``num_workers``, ``data_dir``, ``tensorboard``, ``backend``, ``device_data``).
        datasets: a ready :class:`capsnet_ext.data.DatasetBundle` (else ``build_datasets``).
        overwrite: start a new run in ``cfg.out`` even if it is not empty, removing what an
            earlier run wrote there (without it a non-empty folder raises
            :class:`RunFolderExistsError`).
        console: where the start-up line, evaluation lines, progress and summary go
            (default: stdout, with a progress bar when ``cfg.progress`` and stdout is a
            terminal; ``Console(enabled=False)`` for silence).

    A resumed run that has already reached its last step does nothing: it says so and returns
    the metrics the run folder holds, leaving every file as it is (``finished`` is True).

    Returns a dict with ``out``, ``best_checkpoint``, ``last_checkpoint``, ``step``,
    ``epoch``, ``test_error``/``test_accuracy`` (final evaluation), ``best_error``,
    ``seconds_per_epoch``, ``images_per_sec``, ``backend``, ``interrupted`` and ``metrics``.
    """
    from .._cli import parse_device

    callbacks = list(callbacks or [])
    parse_device(cfg.device, option="device")  # a missing GPU is a one-line error, not a crash
    # Resuming continues the run in its own folder; resuming into another folder starts a new
    # run folder there, which must be empty like any other. Checked before any process group
    # exists, so no rank can have written anything yet.
    in_place = resume is not None and _run_folder_of(resume).resolve() == pathlib.Path(cfg.out).resolve()
    check_run_folder(pathlib.Path(cfg.out), resume=in_place, overwrite=overwrite)
    ckpt = None
    if resume is not None:
        ckpt = load_checkpoint(resume)
        keep = {k: getattr(cfg, k) for k in RESUME_CHANGEABLE}
        saved = dict(ckpt["config"])
        saved.update(keep)
        if "download" in (cfg.dataset_options or {}):  # how files are found, not which data
            saved["dataset_options"] = dict(saved.get("dataset_options") or {},
                                            download=cfg.dataset_options["download"])
        cfg = TrainConfig(**saved)

    device_type = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" \
        else torch.device(cfg.device).type
    info = setup_distributed(torch.device(device_type))
    if console is None:
        console = Console(enabled=info.is_main, bar=cfg.progress)
    elif not info.is_main:
        console = Console(enabled=False)
    out_dir = pathlib.Path(cfg.out)
    folder_existed = out_dir.exists()
    try:
        return _train(cfg, callbacks, ckpt, datasets, info, overwrite and not in_place, console,
                      resume)
    except BaseException:
        if not in_place and info.is_main:
            _remove_failed_start(out_dir, folder_existed)
        raise
    finally:
        console.close_bar()
        cleanup(info)


def _remove_failed_start(out_dir: pathlib.Path, folder_existed: bool) -> None:
    """A new run that failed before writing its first checkpoint leaves nothing behind (its
    logs, config and TensorBoard folder; the folder itself if the run made it), so that the
    same command can simply be run again."""
    if (out_dir / "checkpoints" / "last.pt").exists() or not out_dir.is_dir():
        return
    clear_run_folder(out_dir)
    if not folder_existed:
        try:
            out_dir.rmdir()  # only if empty: files someone else put there stay
        except OSError:
            pass


def _run_folder_of(path) -> pathlib.Path:
    """The run folder of a checkpoint file (``<run>/checkpoints/last.pt``) or folder."""
    path = pathlib.Path(path)
    if path.is_dir():
        return path
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def _parameter_count(model: nn.Module) -> str:
    count = sum(p.numel() for p in model.parameters())
    return f"{count / 1e6:.2f}M" if count >= 1e5 else f"{count / 1e3:.1f}k"


def _train(cfg: TrainConfig, callbacks, ckpt, datasets, info: DistInfo, overwrite: bool,
           console: Console, resume: Optional[str]) -> Dict[str, Any]:
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

    start_step, best_error, best_step, last_metrics = 0, float("inf"), None, {}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_step = int(ckpt["step"])
        best_error = float(ckpt.get("best_error", float("inf")))
        best_step = ckpt.get("best_step")
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

    train_on_device, test_on_device = device_datasets(cfg.device_data, device, bundle.train, bundle.test,
                                                      cfg.num_workers)
    test_data = test_on_device if test_on_device is not None else bundle.test
    batches = _StepBatches(bundle.train, local_batch, info, cfg.seed, cfg.num_workers,
                           device_dataset=train_on_device)
    steps_per_epoch = batches.steps_per_epoch
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    augment = BatchAugmenter(cfg.seed, cfg.max_shift, cfg.crop_size, info.rank, info.world_size,
                             random_affine=cfg.random_affine)
    # strict: a backend that cannot run here is refused before the run folder is made, so a
    # retry is not blocked by a half-made run.
    backend_name = routing_backend_name(model, device, strict=True)
    env = environment_info(device)
    eval_items = min(cfg.eval_limit or len(bundle.test), len(bundle.test))
    eval_interval = cfg.eval_every or auto_eval_every(steps_per_epoch, eval_items, cfg.batch_size)

    main = info.is_main
    if ckpt is not None and start_step >= total_steps:
        return _finished_run(out_dir, ckpt, start_step, total_steps, steps_per_epoch, console, resume)
    if main and overwrite:
        removed = clear_run_folder(out_dir)
        if removed:
            console.line(f"replacing the earlier run in {out_dir} (removed {', '.join(removed)})")
    arch = model_config.get("arch", type(model).__name__)
    console.line(f"{getattr(bundle, 'name', None) or cfg.dataset} ({len(bundle.train)} training / "
                 f"{eval_items} test images), {arch} with "
                 f"{_parameter_count(model)} parameters, device {device}, routing backend "
                 f"{backend_name or 'none'}, {cfg.precision}")
    what = (f"steps {start_step + 1}-{total_steps} (resumed from {resume})" if ckpt is not None
            else f"{total_steps} steps")
    console.line(f"{what} of {cfg.batch_size} images ({steps_per_epoch} steps per epoch); "
                 f"evaluation every {eval_interval} steps and at the end; run folder {out_dir}")
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
                "metrics": metrics, "best_error": best_error, "best_step": best_step, "environment": env,
                "train_seconds_total": elapsed_before + train_seconds,
                "world_size": info.world_size,
                "callback_state": {f"{k}:{type(cb).__name__}": cb.state_dict()
                                   for k, cb in enumerate(callbacks) if callable(getattr(cb, "state_dict", None))},
            }
            path = atomic_torch_save(payload, ckpt_dir / name)
        barrier(info)
        return path

    def run_eval(step: int) -> Dict:
        nonlocal best_error, best_step
        batches_total, items = evaluation_batches(bundle.test, batch_size=cfg.eval_batch_size,
                                                  limit=cfg.eval_limit, rank=info.rank,
                                                  world_size=info.world_size)
        metrics = evaluate(model, test_data, num_classes=bundle.num_classes, multi_label=multi_label,
                           device=device, batch_size=cfg.eval_batch_size, limit=cfg.eval_limit,
                           precision=cfg.precision, recon_weight=cfg.recon_weight,
                           recon_target=cfg.recon_target, margin=cfg.margin,
                           transform=augment.evaluation, rank=info.rank, world_size=info.world_size,
                           progress=console.eval_progress(batches_total, items))
        improved = metrics["error"] < best_error
        if improved:
            best_step = step
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

    console.start_bar(total_steps, start_step, f"train {cfg.dataset}")

    step = start_step
    interrupted = None
    train_seconds = eval_seconds = 0.0
    # Training seconds of the sessions before a resume: train_log.csv's elapsed_s continues.
    elapsed_before = float(ckpt.get("train_seconds_total", 0.0)) if ckpt is not None else 0.0
    eta = _ETA(start_step, total_steps, eval_interval, eval_items, cfg.batch_size)
    run_start = time.perf_counter()
    # The log window (train_log.csv rows) and the span between evaluations (console lines);
    # "seconds" is time in training steps, the throughput's denominator in both. The sums of
    # loss, margin, recon, ce and correct predictions stay on the device (float64, added in
    # the order Python floats were, so the logged numbers are the same): they are read only
    # at log and evaluation steps, never making a GPU wait for the host between steps.
    window = {"n": 0, "steps": 0, "seconds": 0.0}
    window_sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=device)
    span = {"steps": 0, "images": 0, "seconds": 0.0}
    span_loss = torch.zeros((), dtype=torch.float64, device=device)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    # On the CPU a step's time is its wall time. A GPU runs the queued work after the host has
    # moved on, so there the time of a stretch of steps is measured from the end of the last
    # synchronisation to the synchronisation of a step that needs a number (log, evaluation,
    # checkpoint, the start-up estimate's first steps, the last step); the steps in between
    # count zero and the stretch is added to the step that ends it. Evaluation and
    # checkpoints come after that synchronisation and are not counted.
    queued = device.type != "cpu"
    stretch_start = time.perf_counter()
    needs_number = True
    console_postfix: Dict[str, str] = {}
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
                    values = [loss.detach()] + [parts.get(key, zero) for key in _SUMS[1:-1]] + [correct.sum()]
                    sums = torch.stack([value.to(torch.float64) for value in values])
                    window_sums += sums
                    span_loss += sums[0]
                window["n"] += int(correct.numel())
                window["steps"] += 1
                logs = step % cfg.log_every == 0 or step == total_steps
                evaluates = step % eval_interval == 0 or step == total_steps
                needs_number = (logs or evaluates or step % cfg.checkpoint_every == 0
                                or (main and eta.pending))
                if not queued:
                    step_seconds = time.perf_counter() - t0
                elif needs_number:
                    _synchronize(device)
                    step_seconds = time.perf_counter() - stretch_start
                else:
                    step_seconds = 0.0  # counted with the stretch at the next synchronisation
                train_seconds += step_seconds
                window["seconds"] += step_seconds
                span["steps"] += 1
                span["images"] += cfg.batch_size
                span["seconds"] += step_seconds
                if main and eta.pending:
                    message = eta.after_step(step, step_seconds)
                    if message:
                        console.line(message)

                if logs:
                    totals = dict(zip(_SUMS, window_sums.tolist()))
                    row = {"step": step, "epoch": step / steps_per_epoch,
                           "lr": scheduler.get_last_lr()[0],
                           "loss": totals["loss"] / window["steps"],
                           "accuracy": totals["correct"] / max(window["n"], 1),
                           "images_per_sec": window["n"] * info.world_size / max(window["seconds"], 1e-9),
                           "elapsed_s": elapsed_before + train_seconds}
                    for key in ("margin", "recon", "ce"):
                        if totals[key]:
                            row[key] = totals[key] / window["steps"]
                    if main:
                        train_log.write(row)
                        tb.scalars("train", {k: v for k, v in row.items() if k not in ("step",)}, step)
                        console_postfix = {"loss": f"{row['loss']:.4f}",
                                           "img/s": f"{row['images_per_sec']:.0f}"}
                    window = {"n": 0, "steps": 0, "seconds": 0.0}
                    window_sums.zero_()
                if main:
                    console.advance(step, total_steps, **console_postfix)

                if evaluates:
                    eval_start = time.perf_counter()
                    last_metrics = run_eval(step)
                    eval_seconds += time.perf_counter() - eval_start
                    console.line(
                        f"step {step}/{total_steps} (epoch {step / steps_per_epoch:.1f}): train loss "
                        f"{span_loss.item() / max(span['steps'], 1):.4f}, test error "
                        f"{100 * last_metrics['error']:.2f}% (best {100 * best_error:.2f}%), "
                        f"{span['images'] / max(span['seconds'], 1e-9):.0f} training images/s")
                    span = {"steps": 0, "images": 0, "seconds": 0.0}
                    span_loss.zero_()
                if step % cfg.checkpoint_every == 0 and step != total_steps:
                    save("last.pt", step, last_metrics)
                if queued and needs_number:
                    stretch_start = time.perf_counter()
                if broadcast_flag(stop.requested, info, device):
                    interrupted = stop.signal_name or "signal"
                    break
                if step >= total_steps:
                    break
        if queued:
            # Steps since the last synchronisation (a stop between log steps).
            _synchronize(device)
            if not needs_number:
                train_seconds += time.perf_counter() - stretch_start
        save("last.pt", step, last_metrics)

    console.close_bar()
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
        "total_steps": total_steps, "eval_every": eval_interval,
        "test_error": last_metrics.get("error"), "test_accuracy": last_metrics.get("accuracy"),
        "best_error": best_error if math.isfinite(best_error) else None, "best_step": best_step,
        "seconds_per_epoch": train_seconds / epochs_done if epochs_done > 0 else None,
        "train_seconds": train_seconds, "eval_seconds": eval_seconds,
        "wall_seconds": time.perf_counter() - run_start,
        # Same definition as train_log.csv's column: images / time in training steps.
        "images_per_sec": (step - start_step) * cfg.batch_size / train_seconds if train_seconds else None,
        "backend": backend_name, "world_size": info.world_size,
        "interrupted": interrupted,
        "metrics": {k: v for k, v in last_metrics.items() if k not in ("scores", "labels")},
        "environment": env, "dataset": cfg.dataset,
    }
    if main:
        atomic_write_text(out_dir / "metrics.json", json.dumps(result, indent=2) + "\n")
        _call(callbacks, "on_train_end", out_dir)
        if console.summary:
            _summary(console, result, cfg)
    return result


class _ETA:
    """The start-up estimate of a run's duration: once a few steps are timed (the first, with
    its one-time compilation and warm-up, not counted), one line with the pace and the time
    the remaining steps and evaluations will take. Printed whatever the output is (a terminal
    or a file)."""

    STEPS = 5           # steps timed after the first ...
    MIN_SECONDS = 2.0   # ... or fewer when they already took this long
    # An evaluation image costs about a third of a training image (forward only, no
    # reconstruction gradient): the estimate of the evaluations until one has been timed.
    EVAL_COST = 1 / 3

    def __init__(self, start_step, total_steps, eval_interval, eval_items, batch_size):
        self.start_step, self.total_steps = start_step, total_steps
        self.eval_interval, self.eval_items, self.batch_size = eval_interval, eval_items, batch_size
        self.timed, self.seconds = 0, 0.0
        self.pending = total_steps - start_step > 2

    def after_step(self, step: int, seconds: float) -> Optional[str]:
        if step == self.start_step + 1:
            return None  # compilation, allocator and cache warm-up
        self.timed += 1
        self.seconds += seconds
        if self.timed < self.STEPS and self.seconds < self.MIN_SECONDS:
            return None
        self.pending = False
        pace = self.seconds / self.timed
        remaining = self.total_steps - step
        # every eval_interval-th step, and the last step when it is not one of them
        evaluations = (self.total_steps // self.eval_interval - step // self.eval_interval
                       + (1 if self.total_steps % self.eval_interval else 0))
        eval_seconds = evaluations * self.eval_items * pace / self.batch_size * self.EVAL_COST
        return (f"pace: {pace:.3g} s per step ({self.batch_size / pace:.0f} images/s) over "
                f"{self.timed} steps; the remaining {remaining} steps take about "
                f"{format_duration(remaining * pace)}, and {evaluations} evaluation"
                f"{'s' if evaluations != 1 else ''} of {self.eval_items} images about "
                f"{format_duration(eval_seconds)} more (estimated)")


def _summary(console: Console, result: Dict[str, Any], cfg: TrainConfig) -> None:
    """The closing lines: how it went and where everything is."""
    out = result["out"]
    if result["interrupted"]:
        console.line(f"stopped by {result['interrupted']} at step {result['step']}; continue with: "
                     f"capsnet-ext train --resume {out}")
    error = result["test_error"]
    best = result["best_error"]
    line = (f"done: step {result['step']}/{result['total_steps']} in "
            f"{format_duration(result['wall_seconds'])} ({format_duration(result['train_seconds'])} "
            f"training, {format_duration(result['eval_seconds'])} evaluating)")
    if error is not None:
        line += f"; test error {100 * error:.2f}%"
    if best is not None:
        line += f" (best {100 * best:.2f}% at step {result['best_step']})"
    if result["images_per_sec"]:
        line += f"; {result['images_per_sec']:.0f} training images/s"
    console.line(line)
    # Only what is there: a run stopped early may not have written every log yet.
    out_path = pathlib.Path(out)
    checkpoints = ", ".join(pathlib.Path(p).name for p in (result["best_checkpoint"],
                                                             result["last_checkpoint"])
                            if p and pathlib.Path(p).is_file())
    if checkpoints:
        console.line(f"checkpoints: {checkpoints} in {out_path / 'checkpoints'}")
    logs = [name for name in ("metrics.json", "config.json", "train_log.csv", "eval_log.csv")
            if (out_path / name).is_file()]
    if cfg.tensorboard and (out_path / "tensorboard").is_dir():
        logs.append("tensorboard/")
    if logs:
        console.line(f"logs: {', '.join(logs)} in {out}")
    if checkpoints:
        console.line(f"figures: capsnet-ext eval {out} --figures (writes them to {out_path / 'eval'})")


def _finished_run(out_dir: pathlib.Path, ckpt: Dict[str, Any], step: int, total_steps: int,
                  steps_per_epoch: int, console: Console, resume) -> Dict[str, Any]:
    """A resumed run already at (or past) its last step: say so and change nothing."""
    console.line(f"the run in {out_dir} is finished (step {step} of {total_steps}); nothing to do. "
                 f"To train longer, resume with a larger --max-steps or --epochs.")
    saved = {}
    metrics_file = out_dir / "metrics.json"
    if metrics_file.is_file():
        try:
            saved = json.loads(metrics_file.read_text())
        except (OSError, ValueError):
            saved = {}
    ckpt_dir = out_dir / "checkpoints"
    metrics = ckpt.get("metrics") or {}
    result = {
        "out": str(out_dir), "last_checkpoint": str(ckpt_dir / "last.pt"),
        "best_checkpoint": str(ckpt_dir / "best.pt") if (ckpt_dir / "best.pt").is_file() else None,
        "step": step, "epoch": step / steps_per_epoch, "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps, "test_error": metrics.get("error"),
        "test_accuracy": metrics.get("accuracy"),
        "best_error": ckpt.get("best_error") if math.isfinite(ckpt.get("best_error", math.inf)) else None,
        "best_step": ckpt.get("best_step"), "interrupted": None, "train_seconds": 0.0,
        "images_per_sec": saved.get("images_per_sec"), "seconds_per_epoch": saved.get("seconds_per_epoch"),
        "backend": saved.get("backend"), "metrics": {k: v for k, v in metrics.items()
                                                     if k not in ("scores", "labels")},
    }
    result["finished"] = True
    return result
