"""End-to-end: training steps per second of the full CapsNet (with decoder) per routing
backend, eager and ``torch.compile``-d, in float32 and under bfloat16 autocast.

One step is what training does: forward with the labels (the decoder is masked by them),
margin loss + 0.0005 x reconstruction loss (:mod:`capsnet_ext.losses`), backward, Adam.
The batches are MNIST-sized (``[B, 1, 28, 28]`` images in ``[0, 1]``, random labels) and
already on the device: data loading is not what is measured. A few batches are used in
rotation.
"""
from __future__ import annotations

import time
from typing import Dict, List, Sequence

import torch

from capsnet_ext.losses import margin_loss, reconstruction_loss
from capsnet_ext.nn import CapsNet

from . import memory
from .suite import _classify

PRECISIONS = ("float32", "bf16-autocast")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_throughput(backend: str, compiled: bool, precision: str, device: torch.device, *,
                     batch: int = 128, steps: int = 20, warmup_steps: int = 3,
                     seed: int = 0) -> Dict[str, object]:
    """Measure ``steps`` training steps after ``warmup_steps`` (which include compilation).

    Returns a record with ``steps_per_s``, ``images_per_s``, the mean loss of the timed steps
    (a sanity check that training ran) and the peak GPU memory of the run.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    torch.manual_seed(seed)
    model = CapsNet(backend=backend).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    forward = torch.compile(model) if compiled else model
    gen = torch.Generator(device="cpu").manual_seed(seed)
    batches = [(torch.rand(batch, 1, 28, 28, generator=gen).to(device),
                torch.randint(0, 10, (batch,), generator=gen).to(device)) for _ in range(4)]
    autocast = precision == "bf16-autocast"

    def step(images, labels):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
            out = forward(images, targets=labels)
        loss = (margin_loss(out.lengths.float(), labels)
                + 0.0005 * reconstruction_loss(out.reconstructions.float(), images))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    for k in range(warmup_steps):
        step(*batches[k % len(batches)])
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses = []
    start = time.perf_counter()
    for k in range(steps):
        losses.append(step(*batches[k % len(batches)]))
    _sync(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    mean_loss = float(torch.stack(losses).float().mean())
    return dict(backend=backend, compiled=compiled, precision=precision, batch=batch, steps=steps,
                warmup_steps=warmup_steps, status="ok", reason=None, seconds=elapsed,
                steps_per_s=steps / elapsed, images_per_s=steps * batch / elapsed,
                mean_loss=mean_loss, peak_bytes=peak)


def run_end_to_end(backends: Sequence[str], device: torch.device, *, compiled_options=(False, True),
                   precisions: Sequence[str] = PRECISIONS, batch: int = 128, steps: int = 20,
                   warmup_steps: int = 3, log=lambda s: None) -> List[Dict[str, object]]:
    """Every (backend, eager/compiled, precision); failures are recorded, not raised."""
    records = []
    for backend in backends:
        for compiled in compiled_options:
            for precision in precisions:
                try:
                    rec = train_throughput(backend, compiled, precision, device, batch=batch,
                                           steps=steps, warmup_steps=warmup_steps)
                except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                    status, reason = _classify(exc)
                    rec = dict(backend=backend, compiled=compiled, precision=precision, batch=batch,
                               steps=steps, warmup_steps=warmup_steps, status=status, reason=reason,
                               seconds=None, steps_per_s=None, images_per_s=None, mean_loss=None,
                               peak_bytes=None)
                finally:
                    memory.release(device)
                records.append(rec)
                log(_one_line(rec))
    return records


def _one_line(r: Dict[str, object]) -> str:
    head = (f"capsnet-train    {r['backend']:<10} {'compiled' if r['compiled'] else 'eager':<9} "
            f"{r['precision']:<14} batch={r['batch']}")
    if r["status"] != "ok":
        return f"{head}  {str(r['status']).upper()}: {r['reason']}"
    return f"{head}  measured (numbers in the table at the end)"
