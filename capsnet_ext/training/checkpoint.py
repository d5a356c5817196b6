"""Checkpoints: atomic save, load with clear errors, and the RNG states that make
``--resume`` continue bit-identically.

A checkpoint is one ``torch.save`` dict::

    model_config  dict for capsnet_ext.nn.build_model
    model         state_dict (unwrapped from DDP)
    optimizer, scheduler   state_dicts
    rng           this process's RNG states (torch CPU, CUDA, numpy, python)
    rng_per_rank  list of every rank's RNG states under DDP (else [rng])
    step, epoch   optimizer steps done, epoch the next step belongs to
    config        dataclasses.asdict(TrainConfig)
    metrics       latest evaluation metrics; best_error; versions
"""
from __future__ import annotations

import os
import pathlib
import random
from typing import Any, Dict

import numpy as np
import torch

from .._atomic import atomic_path, atomic_write

CHECKPOINT_KEYS = ("model_config", "model", "optimizer", "scheduler", "rng", "step", "epoch",
                   "config", "metrics")
WEIGHTS_KEYS = ("model_config", "model", "config", "step")


def rng_state() -> Dict[str, Any]:
    """Every RNG state this process draws from."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


atomic_write_text = atomic_write  # the name the trainer, eval and logs use


def atomic_torch_save(obj: Any, path: os.PathLike) -> pathlib.Path:
    """``torch.save`` through a temporary file and ``os.replace``: a reader (or a crash)
    never sees half a checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return pathlib.Path(path)


def load_checkpoint(path: os.PathLike, map_location="cpu") -> Dict[str, Any]:
    """Load a checkpoint written by the trainer; raise a clear error for a missing,
    truncated or foreign file."""
    path = pathlib.Path(path)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.pt", path / "last.pt"):
            if candidate.is_file():
                path = candidate
                break
        else:
            raise FileNotFoundError(f"the folder {str(path)!r} holds no checkpoint "
                                    "(no checkpoints/last.pt or last.pt in it)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        # Checkpoints hold numpy/python RNG states and plain dicts, not only tensors.
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise ValueError(f"checkpoint {str(path)!r} could not be read (truncated or not a "
                         f"capsnet_ext checkpoint): {type(exc).__name__}: {exc}") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(ckpt).__name__}, expected a dict")
    # A weights file (``weights_dtype`` set: the final weights ``capsnet-ext gpu-plan`` keeps)
    # has what evaluation needs, not the optimizer or RNG states a resume needs.
    required = WEIGHTS_KEYS if "weights_dtype" in ckpt else CHECKPOINT_KEYS
    missing = [key for key in required if key not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} lacks the keys {missing}; it was not written "
                         "by capsnet_ext.training")
    return ckpt


def model_from_checkpoint(ckpt_or_path, map_location="cpu", **model_overrides):
    """Rebuild the model of a checkpoint (``build_model(model_config)`` + weights), in
    eval mode. ``model_overrides`` change constructor arguments that do not affect the
    weights, e.g. ``backend`` or ``iterations``."""
    from ..nn import build_model

    ckpt = ckpt_or_path if isinstance(ckpt_or_path, dict) else load_checkpoint(ckpt_or_path, map_location)
    model_config = dict(ckpt["model_config"])
    model_config.update(model_overrides)
    model = build_model(model_config)
    if ckpt.get("without"):
        # Weights kept without a part (``capsnet-ext gpu-plan``'s decoder-free bfloat16 file):
        # everything else must be there; the missing part keeps its initialisation.
        missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
        prefix = ckpt["without"] + "."
        wrong = [k for k in missing if not k.startswith(prefix)] + list(unexpected)
        if wrong:
            raise ValueError(f"checkpoint weights do not match the model: {wrong[:5]}")
    else:
        model.load_state_dict(ckpt["model"])
    return model.eval()
