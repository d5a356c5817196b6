"""Memory of one op: the peak allocated while it runs (GPU) and the bytes autograd keeps for its
backward (every device).

Saved bytes are counted with :func:`torch.autograd.graph.saved_tensors_hooks`: every tensor
autograd packs during the forward is seen once; the bytes of each distinct storage are summed,
so a tensor saved by several nodes (or views of one storage) counts once. Storages that belong
to the inputs are reported apart: they are kept alive by the caller anyway, so
``saved_bytes_beyond_inputs`` is what the op adds to the memory of a training step.
"""
from __future__ import annotations

import gc
from typing import Callable, Dict, Iterable, Optional

import torch


def _storage_key(t: torch.Tensor):
    storage = t.untyped_storage()
    return (t.device.type, t.device.index, storage.data_ptr(), storage.nbytes())


def saved_tensor_bytes(fn: Callable[[], object], inputs: Iterable[torch.Tensor]) -> Dict[str, int]:
    """Run ``fn()`` (a forward with gradients enabled) and count what autograd saves.

    Returns ``{"saved_bytes", "saved_bytes_beyond_inputs", "saved_tensors"}``; the output of
    ``fn`` is dropped before returning.
    """
    input_keys = {_storage_key(t) for t in inputs if isinstance(t, torch.Tensor)}
    seen: Dict[tuple, int] = {}
    count = 0

    def pack(t: torch.Tensor):
        nonlocal count
        count += 1
        try:
            key = _storage_key(t)
            seen[key] = key[3]
        except (RuntimeError, NotImplementedError):
            # Tensors without a plain storage (e.g. some wrapper subclasses): count their
            # own elements.
            seen[("opaque", id(t))] = t.numel() * t.element_size()
        return t

    def unpack(t: torch.Tensor):
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = fn()
    del out
    total = sum(seen.values())
    beyond = sum(nbytes for key, nbytes in seen.items() if key not in input_keys)
    return dict(saved_bytes=int(total), saved_bytes_beyond_inputs=int(beyond), saved_tensors=count)


def peak_allocated_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak bytes allocated on a GPU while ``fn()`` runs, above what was allocated before
    (``None`` on the CPU, where PyTorch does not track it)."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return int(peak)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure (CUDA or CPU)."""
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "out of memory" in text or "can't allocate memory" in text or isinstance(exc, MemoryError))


def release(device: torch.device) -> None:
    """Give cached memory back after a case (and after an out-of-memory error)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
