"""Record every launch the Triton backend makes for one op call, forward and backward,
without a GPU and without running any kernel.

How: the op runs through the public API (``capsnet_ext.ops``) on CPU tensors that *claim* to
be on ``cuda:0`` (a TorchFunctionMode answers ``tensor.device`` / ``is_cuda`` with the CUDA
device and turns ``device="cuda"`` arguments into ``"cpu"``), with ``torch.cuda``'s device
queries answering for the target GPU (so launchers that size their grids from the SM count
plan for that GPU). ``triton.JITFunction.run`` (and ``Autotuner.run``) are replaced by a
recorder: it binds the arguments with Triton's own binder for the target's backend, which
gives exactly the signature, specialisation (divisibility, constant 1s), constexprs and
options that a real launch compiles, resolves the grid, and returns without launching. A
TorchDispatchMode logs every PyTorch op in between; ops that allocate, view or only change
metadata start no GPU kernel, every other one (fills, sums, copies) is counted as one.

Nothing here names a kernel of the package: whatever the backend launches is recorded. A
launcher that reads back a kernel's result on the host (``.item()``, data-dependent sizes)
sees garbage, since no kernel runs; the recorded plan is then not trustworthy, and a
launcher that fails under the simulation is reported as not recordable with its error.
"""
from __future__ import annotations

import contextlib
import os
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .gpus import GPUSpec

# PyTorch ops that start no GPU kernel: allocation, views and metadata.
KERNEL_FREE_OPS = {
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "view", "_unsafe_view",
    "as_strided", "alias", "detach", "select", "slice", "t", "transpose", "permute", "unsqueeze",
    "squeeze", "expand", "reshape", "_reshape_alias", "split", "split_with_sizes", "unbind",
    "narrow", "view_as", "lift_fresh", "set_", "resize_", "_local_scalar_dense", "is_same_size",
    "contiguous", "unflatten", "flatten", "diagonal", "movedim", "chunk", "sym_size", "sym_stride",
    "sym_numel", "sym_storage_offset", "_to_copy_noop", "real", "_conj", "_neg_view",
}


def _op_name(func) -> str:
    return func._schema.name.split("::")[-1] if hasattr(func, "_schema") else str(func)


def starts_kernel(func, args) -> bool:
    name = _op_name(func)
    if name in KERNEL_FREE_OPS:
        return False
    return not getattr(func, "is_view", False)


@dataclass
class ArgSpec:
    """One argument of a recorded launch, as the interpreter worker rebuilds it."""
    name: str
    kind: str  # "tensor" | "constexpr" | "scalar" | "none"
    value: Any = None  # scalar / constexpr value (constexpr dtypes as their name)
    dtype: Optional[str] = None
    shape: Optional[List[int]] = None
    stride: Optional[List[int]] = None
    storage_offset: int = 0
    storage_id: Optional[int] = None
    storage_bytes: int = 0

    @property
    def view_bytes(self) -> int:
        if self.kind != "tensor" or not self.shape or 0 in self.shape:
            return 0
        span = 1 + sum((s - 1) * abs(st) for s, st in zip(self.shape, self.stride))
        return span * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()


@dataclass
class Launch:
    kernel: Any  # the JITFunction
    module: str
    name: str
    phase: str
    grid: List[int]
    num_warps: int
    num_stages: int
    options: Dict[str, Any]
    signature: Dict[str, str]
    constexprs: Dict[str, Any]
    attrs: Dict[Any, Any]
    args: List[ArgSpec]
    autotune_configs: int = 1
    compile_inputs: Any = None  # (signature, constexprs by path, attrs, options object)

    @property
    def programs(self) -> int:
        g = list(self.grid) + [1] * (3 - len(self.grid))
        return g[0] * g[1] * g[2]

    def variant_key(self) -> str:
        cex = ",".join(f"{k}={v}" for k, v in self.constexprs.items())
        sig = ",".join(f"{v}" for v in self.signature.values())
        attrs = ",".join(f"{k}:{v}" for k, v in sorted(self.attrs.items(), key=str) if v)
        return f"{self.module}.{self.name}|{sig}|{cex}|{attrs}|w{self.num_warps}s{self.num_stages}"

    def profile_key(self) -> str:
        scalars = ",".join(f"{a.name}={a.value}" for a in self.args if a.kind == "scalar")
        return f"{self.variant_key()}|{self.grid}|{scalars}"


@dataclass
class Recording:
    events: List[dict] = field(default_factory=list)  # launches and torch ops, in order
    launches: List[Launch] = field(default_factory=list)


def _dtype_name(dt) -> str:
    return str(dt).replace("torch.", "").replace("triton.language.", "")


def _constexpr_value(value):
    """JSON form of a constexpr: plain values as they are, a Triton dtype as
    ``{"triton_dtype": name}``, anything else as its repr."""
    import triton.language as tl

    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    if isinstance(value, tl.dtype):
        return {"triton_dtype": value.name}
    return repr(value)


def _gpu_properties(gpu: GPUSpec):
    return types.SimpleNamespace(
        name=f"NVIDIA {gpu.name} (simulated)", major=gpu.arch // 10, minor=gpu.arch % 10,
        multi_processor_count=gpu.sms, total_memory=80 * 1024 ** 3,
        max_threads_per_multi_processor=gpu.max_warps_per_sm * 32,
        regs_per_multiprocessor=gpu.registers_per_sm, warp_size=32,
        shared_memory_per_block_optin=gpu.shared_bytes_per_sm - gpu.shared_bytes_reserved_per_block,
        shared_memory_per_multiprocessor=gpu.shared_bytes_per_sm, L2_cache_size=gpu.l2_bytes,
        is_integrated=False, is_multi_gpu_board=False,
    )


_DEVICE_DESCRIPTOR = torch._C.TensorBase.__dict__["device"]
_IS_CUDA_DESCRIPTOR = torch._C.TensorBase.__dict__["is_cuda"]


class _DeviceMasquerade(TorchFunctionMode):
    """CPU tensors that report ``cuda:0``; ``device="cuda"`` arguments become ``"cpu"``."""

    CUDA = torch.device("cuda", 0)

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        owner = getattr(func, "__self__", None)
        if owner is _DEVICE_DESCRIPTOR:
            return self.CUDA
        if owner is _IS_CUDA_DESCRIPTOR:
            return True
        if func is torch.Tensor.get_device:
            return 0
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = "cpu"
        if func in (torch.Tensor.cuda,):
            return args[0]
        if func is torch.Tensor.to:
            args = tuple("cpu" if isinstance(a, (str, torch.device)) and torch.device(a).type == "cuda" else a
                         for a in args)
        return func(*args, **kwargs)


class _OpLog(TorchDispatchMode):
    def __init__(self, recording: Recording, phase_ref: list):
        super().__init__()
        self.recording = recording
        self.phase_ref = phase_ref

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        if starts_kernel(func, args):
            self.recording.events.append(dict(type="torch", op=_op_name(func), overload=str(func),
                                              phase=self.phase_ref[0]))
        return func(*args, **(kwargs or {}))


def _clear_caches(package_prefixes) -> None:
    """Device-keyed caches (functools.lru_cache) of the backend modules would keep an earlier
    target's answers (e.g. an SM count): clear them."""
    for name, module in list(sys.modules.items()):
        if module is None or not any(name.startswith(p) for p in package_prefixes):
            continue
        for obj in list(vars(module).values()):
            if callable(obj) and hasattr(obj, "cache_clear") and hasattr(obj, "cache_info"):
                obj.cache_clear()


@contextlib.contextmanager
def simulated_gpu(gpu: GPUSpec, recording: Recording, phase_ref: list, package_prefixes=("capsnet_ext",)):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime import autotuner as autotuner_mod
    from triton.runtime.jit import JITFunction, create_function_from_signature

    target = GPUTarget("cuda", gpu.arch, 32)
    backend = make_backend(target)
    props = _gpu_properties(gpu)
    binders: Dict[int, Any] = {}
    storage_ids: Dict[int, int] = {}

    def describe(name, value, sigtype):
        if sigtype == "constexpr":
            return ArgSpec(name, "constexpr", value=_constexpr_value(value))
        if isinstance(value, torch.Tensor):
            key = value.untyped_storage().data_ptr()
            sid = storage_ids.setdefault(key, len(storage_ids))
            return ArgSpec(name, "tensor", dtype=_dtype_name(value.dtype), shape=list(value.shape),
                           stride=list(value.stride()), storage_offset=value.storage_offset(), storage_id=sid,
                           storage_bytes=value.untyped_storage().nbytes())
        if value is None:
            return ArgSpec(name, "none")
        return ArgSpec(name, "scalar", value=value)

    def record(fn, args, grid, kwargs, autotune_configs=1):
        binder = binders.get(id(fn))
        if binder is None:
            binder = binders[id(fn)] = create_function_from_signature(fn.signature, fn.params, backend)
        kwargs = dict(kwargs)
        bound, specialization, opts = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, opts)
        g = grid(bound) if callable(grid) else grid
        g = [int(x) for x in (tuple(g) + (1, 1, 1))[:3]]
        names = [p.name for p in fn.params]
        cex_by_name = {names[path[0]]: value for path, value in constexprs.items() if len(path) == 1}
        launch = Launch(
            kernel=fn, module=fn.fn.__module__, name=fn.fn.__name__, phase=phase_ref[0], grid=g,
            num_warps=options.num_warps, num_stages=options.num_stages,
            options={k: v for k, v in options.__dict__.items() if isinstance(v, (int, float, bool, str))},
            signature=signature,
            constexprs={k: _constexpr_value(v) for k, v in cex_by_name.items()},
            attrs={names[path[0]]: v for path, v in attrs.items() if len(path) == 1},
            args=[describe(n, bound[n], signature[n]) for n in names],
            autotune_configs=autotune_configs,
            compile_inputs=(signature, constexprs, attrs, options),
        )
        recording.launches.append(launch)
        recording.events.append(dict(type="launch", index=len(recording.launches) - 1, phase=phase_ref[0]))

    def jit_run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return None
        record(self, args, grid, kwargs)
        return None

    def autotuner_run(self, *args, **kwargs):
        # Autotuning benchmarks on a GPU; the first configuration (after pruning) stands in.
        config = self.configs[0]
        kwargs = dict(kwargs, **config.all_kwargs())
        grid = kwargs.pop("grid")
        kwargs.pop("warmup", None)
        fn = self.fn
        while not isinstance(fn, JITFunction):  # heuristics wrappers
            fn = fn.fn
        record(fn, args, grid, kwargs, autotune_configs=len(self.configs))
        return None

    original_backward_apply = torch.autograd.function.BackwardCFunction.apply

    def backward_apply(self, *args):
        # The autograd engine does not carry Python torch-function modes into backward
        # functions: enter the masquerade again there.
        with _DeviceMasquerade():
            return original_backward_apply(self, *args)

    patches = [
        (JITFunction, "run", jit_run),
        (torch.autograd.function.BackwardCFunction, "apply", backward_apply),
        (autotuner_mod.Autotuner, "run", autotuner_run),
        (torch.cuda, "is_available", lambda: True),
        (torch.cuda, "device_count", lambda: 1),
        (torch.cuda, "current_device", lambda: 0),
        (torch.cuda, "get_device_properties", lambda *a, **k: props),
        (torch.cuda, "get_device_capability", lambda *a, **k: (props.major, props.minor)),
        (torch.cuda, "get_device_name", lambda *a, **k: props.name),
        # Device guards around launches: nothing to switch on the simulated single GPU.
        (torch.cuda, "device", lambda *a, **k: contextlib.nullcontext()),
    ]
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
    # Backends that time candidate configurations on the GPU take their default instead
    # (nothing can be timed here; the default is what the report describes).
    saved_env = os.environ.get("CAPSNET_EXT_TRITON_AUTOTUNE")
    os.environ["CAPSNET_EXT_TRITON_AUTOTUNE"] = "0"
    _clear_caches(package_prefixes)
    try:
        for obj, attr, value in patches:
            setattr(obj, attr, value)
        with _DeviceMasquerade(), _OpLog(recording, phase_ref):
            yield
    finally:
        for obj, attr, value in saved:
            setattr(obj, attr, value)
        if saved_env is None:
            os.environ.pop("CAPSNET_EXT_TRITON_AUTOTUNE", None)
        else:
            os.environ["CAPSNET_EXT_TRITON_AUTOTUNE"] = saved_env
        _clear_caches(package_prefixes)


def op_inputs(op: str, shape: dict, dtype: torch.dtype, bias: bool, seed: int = 0, prior: bool = False):
    """Inputs of one call on ``cuda`` (under the simulation), all differentiable inputs
    requiring grad, plus the gradient of the output. ``prior``: learned prior logits ``[I, J]``
    too (routing ops only)."""
    B, I, J, Din, Dout = shape["B"], shape["I"], shape["J"], shape["Din"], shape["Dout"]
    g = torch.Generator().manual_seed(seed)

    def rand(*size, grad=True):
        t = torch.randn(*size, generator=g, dtype=torch.float32).to(dtype).to("cuda")
        return t.requires_grad_(grad)

    if op == "predict":
        return dict(u=rand(B, I, Din), W=rand(I, J, Dout, Din)), rand(B, I, J, Dout, grad=False)
    b = rand(J, Dout) if bias else None
    p = rand(I, J) if prior else None
    if op == "dynamic_routing":
        return dict(u_hat=rand(B, I, J, Dout), bias=b, prior=p), rand(B, J, Dout, grad=False)
    if op == "capsule_routing":
        return dict(u=rand(B, I, Din), W=rand(I, J, Dout, Din), bias=b, prior=p), rand(B, J, Dout, grad=False)
    raise ValueError(f"unknown op {op!r}; expected predict, dynamic_routing or capsule_routing")


ROUTING_OPTIONS = ("leaky", "detach_inner", "return_coupling", "prior", "temperature")


def record_op(backend: str, op: str, shape: dict, dtype: torch.dtype, iterations: int, bias: bool,
              gpu: GPUSpec, options: Optional[dict] = None) -> Recording:
    """Run ``op`` forward and backward through ``capsnet_ext.ops`` with ``backend`` under the
    simulated ``gpu`` and return every launch and counted PyTorch op, in order. ``options``
    (routing ops): any of ``leaky``, ``detach_inner``, ``return_coupling`` (booleans),
    ``prior`` (a boolean: learned prior logits as an input) and ``temperature`` (a float)."""
    from capsnet_ext import ops

    options = dict(options or {})
    unknown = sorted(set(options) - set(ROUTING_OPTIONS))
    if unknown:
        raise ValueError(f"unknown routing options {unknown}; expected some of {ROUTING_OPTIONS}")
    recording = Recording()
    phase = ["setup"]
    with simulated_gpu(gpu, recording, phase):
        inputs, grad_out = op_inputs(op, shape, dtype, bias, prior=bool(options.pop("prior", False)))
        phase[0] = "forward"
        fn = getattr(ops, op)
        if op == "predict":
            out = fn(inputs["u"], inputs["W"], backend=backend)
        else:
            first = inputs["u"] if op == "capsule_routing" else inputs["u_hat"]
            rest = [inputs["W"]] if op == "capsule_routing" else []
            out = fn(first, *rest, iterations, bias=inputs.get("bias"), prior=inputs.get("prior"),
                     backend=backend, **options)
            if options.get("return_coupling"):
                out = out[0]
        phase[0] = "backward"
        leaves = [t for t in inputs.values() if t is not None and t.requires_grad]
        torch.autograd.grad(out, leaves, grad_out)
    recording.events = [e for e in recording.events if e["phase"] != "setup"]
    return recording
