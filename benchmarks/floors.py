"""The floor of each op: the FLOPs it must do and the fewest bytes it must move, computed from
the shape, set against the device's ceilings measured in the same run.

Notation: batch ``B``, input capsules ``I`` of ``Din`` dimensions, output capsules ``J`` of
``D = Dout`` dimensions, ``R`` routing iterations, ``e`` bytes per element of the op's dtype.
Per sample, ``P = 2·I·J·D·Din`` is the work of one prediction pass (``û = W u``) and
``K = I·J·D`` the size of one pass over ``û``. FLOPs count the multiply-adds of the
contractions (2 per multiply-add); the softmax (``O(B·I·J)`` per iteration, ``1/D`` of a
contraction) and the squash (``O(B·J·D)``) are left out, as roofline counts usually do.

predict (``u [B, I, Din]``, ``W [I, J, D, Din]`` -> ``û [B, I, J, D]``)
    forward  FLOPs ``B·P``;   bytes ``e·(B·I·Din + I·J·D·Din + B·I·J·D)`` (read u, W; write û)
    backward FLOPs ``2·B·P`` (``du = Wᵀ g`` and ``dW = Σ_b g uᵀ``);
             bytes ``e·(B·I·J·D + 2·B·I·Din + 2·I·J·D·Din)`` (read g, u, W; write du, dW)

dynamic_routing (``û`` given) and the routing part of capsule_routing, following the sweep
algorithm of ``fused-routing.md`` (logits recomputed from ``V^r``, nothing of size ``I·J·D``
stored):
    forward  ``R`` weighted sums + ``R-1`` agreements: ``B·2K·(2R-1)``
    backward ``R-1`` reduction sweeps (logits, ``gc``, ``D``: ``6K`` each) and one final
             sweep (``2K`` for ``r = 1``, ``8K`` for every ``r >= 2``: logits, ``c·gs``,
             ``gc``, ``gl·V``): ``B·(2K + 14K·(R-1))``;
             with ``detach_inner`` only the final sweep's last iteration:
             ``B·(2K + 2K·[R >= 2])``.

dynamic_routing bytes
    forward  ``e·(B·I·J·D + B·J·D [+ J·D])`` (read û [and bias]; write v)
    backward ``e·(2·B·I·J·D + B·J·D [+ 2·J·D])`` (read û, dv [, bias]; write dû [, dbias])

capsule_routing (fused: ``û`` recomputed in every sweep, the work that goes with the byte
floor below; storing ``û`` instead saves FLOPs but moves at least its ``e·B·I·J·D`` bytes)
    forward  FLOPs ``B·(R·P + 2K·(2R-1))``
    backward FLOPs ``B·(R·P + 2P + routing backward)``: ``û`` recomputed in the ``R-1``
             reduction sweeps and the final sweep, then ``du`` and ``dW``
             (``detach_inner``: ``B·(P + 2P + routing backward)``)
    forward  bytes ``e·(B·I·Din + I·J·D·Din + B·J·D [+ J·D])`` (read u, W [, bias]; write v)
    backward bytes ``e·(2·B·I·Din + 2·I·J·D·Din + B·J·D [+ 2·J·D])``
             (read u, W, dv [, bias]; write du, dW [, dbias])

The small per-sample state the fused backward keeps (``s^r`` and ``V^r``, ``O(R·B·J·D)``)
is left out of the byte floor. A forward+backward measurement is two passes, so its floor is
the sum of the forward and backward floors. The floor time is
``max(FLOPs / matmul FLOP/s, bytes / copy bandwidth)`` with the ceilings of
:func:`measure_ceilings`, and the fraction of the floor achieved is floor time / measured time.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Dict, Optional

import torch

OPS = ("predict", "dynamic_routing", "capsule_routing")
MODES = ("forward", "forward_backward")


@dataclass(frozen=True)
class Shape:
    """One problem size; ``iterations`` is ignored by ``predict``."""
    B: int
    I: int
    J: int
    Din: int
    Dout: int
    iterations: int

    def as_dict(self) -> Dict[str, int]:
        return asdict(self)

    def label(self) -> str:
        return f"B={self.B} I={self.I} J={self.J} Din={self.Din} Dout={self.Dout} R={self.iterations}"


@dataclass(frozen=True)
class Work:
    """FLOPs and the fewest bytes of one pass (or of a forward+backward pair)."""
    flops: float
    bytes: float

    def __add__(self, other: "Work") -> "Work":
        return Work(self.flops + other.flops, self.bytes + other.bytes)


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _routing_forward_flops(s: Shape) -> float:
    K = s.I * s.J * s.Dout
    return s.B * 2 * K * (2 * s.iterations - 1)


def _routing_backward_flops(s: Shape, detach_inner: bool) -> float:
    K = s.I * s.J * s.Dout
    R = s.iterations
    if detach_inner:
        return s.B * (2 * K + (2 * K if R >= 2 else 0))
    return s.B * (2 * K + 14 * K * (R - 1))


def op_work(op: str, shape: Shape, dtype: torch.dtype, mode: str, *, bias: bool = True,
            detach_inner: bool = False) -> Work:
    """FLOPs and minimal bytes of ``op`` at ``shape`` for ``mode`` (``"forward"`` or
    ``"forward_backward"``); formulas in the module docstring."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    s, e = shape, element_size(dtype)
    B, I, J, Din, D, R = s.B, s.I, s.J, s.Din, s.Dout, s.iterations
    P = 2 * I * J * D * Din
    u_n, W_n, uhat_n, v_n = B * I * Din, I * J * D * Din, B * I * J * D, B * J * D
    b_n = J * D if bias and op != "predict" else 0
    if op == "predict":
        fwd = Work(B * P, e * (u_n + W_n + uhat_n))
        bwd = Work(2 * B * P, e * (uhat_n + 2 * u_n + 2 * W_n))
    elif op == "dynamic_routing":
        fwd = Work(_routing_forward_flops(s), e * (uhat_n + v_n + b_n))
        bwd = Work(_routing_backward_flops(s, detach_inner), e * (2 * uhat_n + v_n + 2 * b_n))
    else:
        fwd = Work(B * R * P + _routing_forward_flops(s), e * (u_n + W_n + v_n + b_n))
        recomputes = 1 if detach_inner else R
        bwd = Work(B * (recomputes * P + 2 * P) + _routing_backward_flops(s, detach_inner),
                   e * (2 * u_n + 2 * W_n + v_n + 2 * b_n))
    return fwd if mode == "forward" else fwd + bwd


@dataclass
class Ceilings:
    """Device ceilings measured in this run: device-to-device copy bandwidth (bytes read +
    written per second) and dense matmul FLOP/s per dtype."""
    copy_bytes_per_s: float
    matmul_flops_per_s: Dict[str, float]
    details: Dict[str, object]

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


def floor_time(work: Work, dtype: torch.dtype, ceilings: Ceilings) -> Dict[str, object]:
    """The least time ``work`` can take under ``ceilings``, and which ceiling binds."""
    peak = ceilings.matmul_flops_per_s.get(dtype_name(dtype))
    compute_s = work.flops / peak if peak else None
    memory_s = work.bytes / ceilings.copy_bytes_per_s if ceilings.copy_bytes_per_s else None
    candidates = [(t, name) for t, name in ((compute_s, "compute"), (memory_s, "memory")) if t is not None]
    time_s, bound = max(candidates) if candidates else (None, None)
    return dict(flops=work.flops, bytes=work.bytes, compute_s=compute_s, memory_s=memory_s,
                time_s=time_s, bound=bound)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@contextlib.contextmanager
def fp32_matmul_precision(mode: str):
    """Float32 matmuls in ``"ieee"`` (true FP32) or ``"tf32"`` inside the block, through the
    precision API PyTorch offers (``fp32_precision`` where it exists: mixing it with the legacy
    ``allow_tf32`` flag is an error in recent releases)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        previous = matmul.fp32_precision
        matmul.fp32_precision = mode
        try:
            yield
        finally:
            matmul.fp32_precision = previous
    else:
        previous = matmul.allow_tf32
        matmul.allow_tf32 = mode == "tf32"
        try:
            yield
        finally:
            matmul.allow_tf32 = previous


def measure_ceilings(device: torch.device, dtypes, timer, *, copy_bytes: Optional[int] = None,
                     matmul_n: Optional[int] = None) -> Ceilings:
    """Measure the copy bandwidth and matmul FLOP/s of ``device`` with ``timer`` (a
    :func:`benchmarks.timing.measure`-like callable ``timer(fn, arg_sets) -> Timing``).

    Sizes default to 1 GiB and 8192³ on a GPU (far past the L2 cache, enough to saturate the
    tensor cores) and 256 MiB and 2048³ on the CPU. On a GPU the float32 ceiling is true FP32
    (TF32 switched off for the measurement, whatever the global setting); the TF32 rate is
    recorded in ``details`` beside it.
    """
    on_gpu = device.type == "cuda"
    if copy_bytes is None:
        copy_bytes = 1 << 30 if on_gpu else 256 << 20
        if on_gpu:
            free, _ = torch.cuda.mem_get_info(device)
            copy_bytes = min(copy_bytes, free // 4)
    if matmul_n is None:
        matmul_n = 8192 if on_gpu else 2048
    numel = copy_bytes // 4
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t_copy = timer(lambda a, b: b.copy_(a), [(src, dst)])
    copy_bw = 2 * numel * 4 / t_copy.median
    del src, dst
    flops: Dict[str, float] = {}
    details: Dict[str, object] = dict(copy_bytes=numel * 4, copy_time_s=t_copy.median, matmul_n=matmul_n)
    for dtype in dtypes:
        a = torch.randn(matmul_n, matmul_n, device=device).to(dtype)
        b = torch.randn(matmul_n, matmul_n, device=device).to(dtype)
        out = torch.empty(matmul_n, matmul_n, device=device, dtype=dtype)
        if on_gpu and dtype == torch.float32:
            with fp32_matmul_precision("ieee"):
                t_mm = timer(lambda x, y, o: torch.mm(x, y, out=o), [(a, b, out)])
        else:
            t_mm = timer(lambda x, y, o: torch.mm(x, y, out=o), [(a, b, out)])
        flops[dtype_name(dtype)] = 2 * matmul_n ** 3 / t_mm.median
        details[f"matmul_time_s_{dtype_name(dtype)}"] = t_mm.median
        if on_gpu and dtype == torch.float32:
            # Kernels may use TF32 tensor cores for float32 inputs; that ceiling is recorded
            # beside the true-FP32 one (the floor uses FP32, so such a kernel can pass 100%).
            try:
                with fp32_matmul_precision("tf32"):
                    t_tf32 = timer(lambda x, y, o: torch.mm(x, y, out=o), [(a, b, out)])
                details["matmul_flops_per_s_tf32"] = 2 * matmul_n ** 3 / t_tf32.median
            except RuntimeError as exc:  # the TF32 switch is optional information
                details["matmul_flops_per_s_tf32"] = None
                details["tf32_error"] = str(exc)[:200]
        del a, b, out
    return Ceilings(copy_bytes_per_s=copy_bw, matmul_flops_per_s=flops, details=details)
