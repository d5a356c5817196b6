"""The Triton routing core: launchers, launch plans, tuning, the autograd.Function and the
registered operators for ``torch.compile`` of the fused ``capsule_routing`` (tensor-core GEMM
tiles) and of ``dynamic_routing`` over given prediction vectors (``W = None`` throughout). The
kernels and the math are in :mod:`._gemm_kernels`; the autograd plumbing shared with the CUDA
backend in :mod:`capsnet_ext._routing_autograd`.

Two designs of the fused kernels, chosen by :attr:`Config.design` (the tuning table, or the
default ``"batched"``, the one measured on a GPU so far): ``"batched"`` contracts with dots
batched over the output capsules and never forms ``u_hat``; ``"uhat"`` forms one input
capsule's ``u_hat`` tile per step with a 2-D dot and runs the routing math on it, the same
kernels ``dynamic_routing`` runs with ``u_hat`` loaded. Both keep the launch plan below (the
``"uhat"`` gradient sweep is one launch for ``du`` and ``dW`` together).

Launches (every kernel counted; PyTorch allocates the workspaces with ``torch.empty`` and runs
no kernel of its own):

* forward, ``R`` iterations: ``R`` sweeps and one finishing kernel, ``R + 1``. Sweep ``r`` first
  finishes iteration ``r - 1`` for its samples (sums the previous sweep's partials in a fixed
  order, adds the bias, squashes, forms ``V^r``), so the reduction over the input capsules needs
  no launch of its own;
* backward: ``R - 1`` reduction sweeps (the gradient reaching ``V^r``, iterations in reverse),
  one kernel for the first iteration's ``gs``, one gradient sweep (``du``, ``dW``, ``d prior``,
  ``d bias`` for all iterations at once), and one kernel summing ``dW``/``d prior``/``d bias``
  over sample splits when the gradient sweep splits the samples to fill the GPU: ``R + 1`` or
  ``R + 2``. ``detach_inner``: 2 or 3.

No atomics: every sum crossing programs goes through a workspace summed in a fixed order, so
results are bitwise identical from run to run.

Precision: float16/bfloat16 operands go to the tensor cores with float32 accumulation; float32
follows PyTorch's switch for float32 matmuls (:func:`fp32_dot_precision`): ``"ieee"`` unless
TF32 is allowed (``torch.backends.cuda.matmul.fp32_precision = "tf32"`` or the legacy
``allow_tf32 = True`` / ``torch.set_float32_matmul_precision("high")``), then
:data:`TF32_INPUT_PRECISION` (``"tf32"``; ``"tf32x3"`` trades speed for about float32 accuracy).
float64 runs in float64. Other float32 math is the GPU's: ``exp`` and ``sqrt`` compile to
approximate instructions (``ex2.approx``, ``sqrt.approx``), divisions to ``div.full``, and
multiply-adds are fused (``enable_fp_fusion=True``, passed explicitly): not IEEE-exact,
within a few float32 ulps.

Memory kept for backward: ``u``, ``W``, the prior (when given) and ``s^r``, ``V^r`` for every
iteration (``2 * R * B * J * Dout`` elements in the accumulation dtype).
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import _routing_autograd as RA
from . import _gemm_kernels as K
from . import tuning

# Tests set this to (n_isplit, n_bsplit) to force the cross-program sums on small shapes.
FORCE_SPLITS: Optional[tuple] = None
# The input precision float32 dots use when PyTorch allows TF32 for float32 matmuls.
TF32_INPUT_PRECISION = "tf32"
# Largest padded [J, Dout, K] tile (K: the weighted-sum dot's, Din padded and input capsules
# tiled to at least 16) the kernels accept, by accumulator size in bytes. The sweeps stage
# tiles of this size through shared memory: compiled for sm_90 with Triton 3.6, the largest
# sweep takes 3.5-4 bytes of shared memory per element-byte (the float64 forward sweep at
# J=17, Dout=24: 294,912 bytes, refused by the H200's 232,448 on 2026-12-04; float32 at the
# same sizes: 229,376). Checked for every recorded launch by the compile check's shared-memory
# rule.
MAX_TILE_ELEMENTS = {4: 1 << 14, 8: 1 << 12}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
       torch.float64: tl.float64}


def fp32_dot_precision() -> str:
    """``input_precision`` of float32 ``tl.dot``: ``"ieee"`` unless PyTorch allows TF32 for
    float32 matmuls on CUDA, then :data:`TF32_INPUT_PRECISION`."""
    matmul = torch.backends.cuda.matmul
    setting = getattr(matmul, "fp32_precision", "none")
    if setting == "tf32":
        return TF32_INPUT_PRECISION
    if setting == "ieee":
        return "ieee"
    try:
        return TF32_INPUT_PRECISION if matmul.allow_tf32 else "ieee"
    except RuntimeError:  # legacy and new TF32 APIs mixed: PyTorch refuses to say; be exact
        return "ieee"


def dot_precision(dtype: torch.dtype) -> str:
    return fp32_dot_precision() if dtype == torch.float32 else "ieee"


def _is_tf32(dtype: torch.dtype) -> bool:
    """Whether float32 dots of ``dtype`` inputs run in TF32 (PyTorch's switch, now)."""
    return dtype == torch.float32 and dot_precision(dtype) != "ieee"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _tiny(dtype: torch.dtype) -> float:
    return torch.finfo(acc_dtype(dtype)).tiny


def device_guard(tensor: torch.Tensor):
    """Launch on the tensors' GPU, not the current one."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return 2 * torch.cuda.get_device_properties(index).multi_processor_count
    return 1  # the interpreter runs programs one after another


def _tile_elements(J: int, D: int, Din: int) -> int:
    """Elements of one input-capsule chunk's padded ``[J, Dout, K]`` tile of W."""
    DINP = triton.next_power_of_2(Din)
    K = DINP * max(1, MIN_DOT_K // DINP)
    return triton.next_power_of_2(J) * max(16, triton.next_power_of_2(D)) * K


def capsule_size_limit_reason(J: int, D: int, Din: int,
                              dtype: torch.dtype = torch.float32) -> Optional[str]:
    """Why one input capsule's ``[J, Dout, Din]`` slice of W (padded to powers of two, ``Dout``
    to at least 16, ``Din`` times the input capsules tiled with it to at least 16) is too large
    for the kernels' shared memory in ``dtype``, or ``None``."""
    elements = _tile_elements(J, D, Din)
    acc_bytes = torch.finfo(acc_dtype(dtype)).bits // 8
    limit = MAX_TILE_ELEMENTS[acc_bytes]
    if elements <= limit:
        return None
    return (f"the Triton routing kernels stage one input capsule's [J, Dout, Din] slice of W "
            f"through shared memory, padded to {elements} elements; the limit in "
            f"{str(dtype).replace('torch.', '')} is {limit} (got J={J}, Dout={D}, Din={Din})")


# The two designs of the fused kernels (:class:`Config`).
DESIGNS = ("batched", "uhat")
# Routing over given prediction vectors: the widest padded ``[J, Dout]`` slice of one input
# capsule accepted, and the most elements of a ``[J, BB, Dout]`` tile (samples are taken
# fewer, down to one, for wide capsules).
MAX_GIVEN_CAPSULE_ELEMENTS = 1 << 16
GIVEN_TILE_ELEMENTS = 1 << 13


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


def given_size_limit_reason(J: int, D: int) -> Optional[str]:
    """Why one input capsule's ``[J, Dout]`` slice of ``u_hat`` is too large for the routing
    kernels over given prediction vectors (they hold it in registers, padded to powers of two),
    or ``None``."""
    per_capsule = triton.next_power_of_2(J) * triton.next_power_of_2(D)
    if per_capsule <= MAX_GIVEN_CAPSULE_ELEMENTS:
        return None
    return (f"the Triton routing kernels hold one input capsule's [J, Dout] slice in registers, "
            f"padded to {per_capsule} elements; the limit is {MAX_GIVEN_CAPSULE_ELEMENTS} "
            f"(got J={J}, Dout={D})")


# Smallest K of a ``tl.dot`` for every dtype: Triton 3.6 (the release torch 2.11 pins) refuses
# K < 16 ("Input shapes should have M >= 1, N >= 1 and K >= 16") even for float32 and float64,
# which later releases and the interpreter accept.
MIN_DOT_K = 16
# Smallest N the kernels give a dot: the N of one tensor-core instruction (smaller N is padded
# by Triton, wasting the instruction's other columns).
MIN_DOT_N = 8


class Config(NamedTuple):
    """Tunable: samples per sweep tile, warps of the forward sweeps, warps of the backward
    (reduction) sweeps, samples per gradient-sweep tile, warps of the gradient sweeps, and the
    most splits of the input capsules per sweep (more programs, against more partial sums for
    the next sweep to add up). Tiles hold at least 16 samples: the sample axis is the M (and,
    in the ``dW`` dot, the K) of the tensor-core dots. ``stages``: the software-pipelining
    depth (Triton's ``num_stages``) of the loops of the direction's sweeps (forward sweeps for
    a forward configuration; reduction and gradient sweeps for a backward one). 1, the
    default, issues each loop step's loads when the step starts; 2 or 3 fetch the next steps'
    tiles while the current one computes, at the cost of shared memory. Measured on the H200
    of 2026-12-04: the sweeps wait on their loads (Nsight Compute's top stall of the forward
    sweep is ``long_scoreboard`` at 25% occupancy), which deeper pipelining addresses; the
    tuning sweep times 2 and 3 around each winner. ``design``: ``"batched"`` (the kernels
    of the first half of :mod:`._gemm_kernels`: every contraction a dot batched over the output
    capsules, ``u_hat`` never formed) or ``"uhat"`` (the u_hat-tile kernels of its second
    half, which ``dynamic_routing`` always uses: ``u_hat`` of one input capsule formed by one
    2-D dot per step and never stored; see there). The tuning sweep times the other design
    at each winner."""
    BB: int
    warps: int
    bwd_warps: int
    grad_BB: int
    grad_warps: int
    max_isplit: int = 16
    stages: int = 1
    design: str = "batched"


class Plan:
    """Tile sizes and grids of one call, from the shape and a :class:`Config`. ``given``: the
    routing over given prediction vectors (``dynamic_routing``), whose tiles are one input
    capsule's ``[J, Dout]`` slice for ``BB`` samples, with no dot and so no 16-sample minimum;
    ``Din`` is then unused."""

    def __init__(self, B, I, J, D, Din, device, config: Config, dtype=torch.float32,
                 given: bool = False):
        if config.design not in DESIGNS:
            raise ValueError(f"design must be one of {DESIGNS}, got {config.design!r}")
        # The u_hat-tile kernels: always for given prediction vectors, by choice otherwise,
        # except for TF32 float32, which runs the batched design whatever the configuration
        # says: compiled for sm_90 with Triton 3.6, the u_hat-tile gradient sweep's TF32 dots
        # (float32 W_i, dW_i and gradient tiles in the MMA layouts) spill 40-568 bytes per
        # thread at 8 warps (255 registers), and still 32-100 with du and dW in separate
        # launches; the other dtypes do not spill.
        self.uhat = given or (config.design == "uhat" and not _is_tf32(dtype))
        reason = (given_size_limit_reason(J, D) if given
                  else capsule_size_limit_reason(J, D, Din, dtype))
        if reason is not None:
            raise NotImplementedError(reason + "; use backend='reference'")
        if not given and min(config.BB, config.grad_BB) < MIN_DOT_K:
            raise ValueError(f"tiles must hold at least {MIN_DOT_K} samples (the M and K of the "
                             f"dots), got BB={config.BB}, grad_BB={config.grad_BB}")
        self.config = config
        self.BLOCK_J = triton.next_power_of_2(J)
        target = _target_programs(device)
        if given:
            self.BLOCK_D = triton.next_power_of_2(D)
            self.DINP = self.GRAD_DINP = 1
            self.IC = 1
            # As many samples as keep a tile within GIVEN_TILE_ELEMENTS (at least one).
            cap = max(1, _pow2_floor(GIVEN_TILE_ELEMENTS // (self.BLOCK_J * self.BLOCK_D)))
            self.BB = min(config.BB, cap, triton.next_power_of_2(B))
            self.grad_BB = min(config.grad_BB, cap, triton.next_power_of_2(B))
        elif self.uhat:
            # u_hat = u_i [BB x KP] @ W_i^T [KP x BLOCK_J*BLOCK_D]: K and N at least 16.
            self.BLOCK_D = max(triton.next_power_of_2(D), triton.cdiv(MIN_DOT_K, self.BLOCK_J))
            self.DINP = self.GRAD_DINP = max(MIN_DOT_K, triton.next_power_of_2(Din))
            self.IC = 1
            self.BB, self.grad_BB = config.BB, config.grad_BB
        else:
            self.BLOCK_D = max(16, triton.next_power_of_2(D))  # K of the logits dot
            self.DINP = triton.next_power_of_2(Din)
            # N = IC * DINP is the K of the weighted-sum dot: input capsules are tiled into it
            # until it reaches MIN_DOT_K (a padded Din alone is below 16 whenever Din <= 8).
            self.IC = max(1, MIN_DOT_K // self.DINP)
            # The gradient sweep holds one input capsule: its dots have N = Din padded to at
            # least 8, the N of the tensor cores' m16n8k16 (and TF32 m16n8k8) instructions.
            self.GRAD_DINP = max(MIN_DOT_N, self.DINP)
            self.BB, self.grad_BB = config.BB, config.grad_BB
        self.n_btiles = triton.cdiv(B, self.BB)
        n_chunks = triton.cdiv(I, self.IC)
        n_isplit = (FORCE_SPLITS[0] if FORCE_SPLITS
                    else min(config.max_isplit, triton.cdiv(target, self.n_btiles)))
        n_isplit = max(1, min(n_isplit, n_chunks))
        self.i_per_split = triton.cdiv(n_chunks, n_isplit) * self.IC
        self.n_isplit = triton.cdiv(I, self.i_per_split)
        self.n_grad_chunks = I  # one input capsule per gradient-sweep program
        max_bsplit = triton.cdiv(B, self.grad_BB)
        n_bsplit = FORCE_SPLITS[1] if FORCE_SPLITS else triton.cdiv(target, self.n_grad_chunks)
        n_bsplit = max(1, min(n_bsplit, max_bsplit))
        self.b_per_split = triton.cdiv(triton.cdiv(B, n_bsplit), self.grad_BB) * self.grad_BB
        self.n_bsplit = triton.cdiv(B, self.b_per_split)


def default_config(B, I, J, D, Din, dtype: torch.dtype = torch.float32,
                   precision: Optional[str] = None, design: str = "batched") -> Config:
    """16 samples per tile (the smallest dot M and K) and as many warps as keep every kernel
    free of register spills, compiled for sm_90 with Triton 3.6 (checked for every launch by
    ``python -m benchmarks.kernel_report.compile_check``, a CI test):

    * float16, bfloat16 and TF32 float32: 16 warps everywhere (at most 128 registers per
      thread, the limit at 16 warps; the dots are tensor-core instructions);
    * exact float32 (``"ieee"``, FMA dots): 8 warps, the sweeps need 130-220 registers (at
      16 warps, 128 registers at most, they spill);
    * float64: 8 warps (16 warps spill 16-200 bytes per thread).

    At most 16 splits of the input capsules: every program of the next sweep re-sums all of
    its samples' partials. ``precision`` is the float32 dot precision (default: PyTorch's
    current TF32 switch, :func:`dot_precision`). ``design``: :attr:`Config.design`."""
    precision = precision or dot_precision(dtype)
    if design == "uhat":
        # The u_hat-tile gradient sweep holds u_hat, the gradient tile, V, gs, W_i and the dW_i
        # accumulator at once: at 16 warps (128 registers at most) it spilled 28-452 bytes
        # per thread at the MNIST shape in float16/bfloat16/TF32 (compile check, sm_90,
        # Triton 3.6); at 8 warps (up to 255 registers) it does not. The sweeps keep the batched design's warps.
        base = default_config(B, I, J, D, Din, dtype, precision)
        return base._replace(grad_warps=min(base.grad_warps, 8), design="uhat")
    if dtype == torch.float64 or (dtype == torch.float32 and precision == "ieee"):
        return Config(16, 8, 8, 16, 8, 16)
    if dtype == torch.float32 and _tile_elements(J, D, Din) > 8192:
        # TF32 with tiles above the MNIST layer's (J=17, Dout=24): at 16 warps the backward
        # sweep's layout conversions need 262,144 bytes of shared memory (over sm_90's
        # 232,448); at 8 warps it fits.
        return Config(16, 16, 8, 16, 16, 16)
    return Config(16, 16, 16, 16, 16, 16)


def default_given_config(B, I, J, D, dtype: torch.dtype = torch.float32) -> Config:
    """Routing over given prediction vectors: 16 samples per tile (fewer for wide capsules,
    see :class:`Plan`) and about 8 tile elements per thread (4 to 16 warps); no dots, so the
    register budget alone sets the warps."""
    jd = triton.next_power_of_2(J) * triton.next_power_of_2(D)
    tile = min(16, _pow2_floor(GIVEN_TILE_ELEMENTS // jd)) * jd
    warps = min(16, max(4, triton.next_power_of_2(tile) // 256))
    return Config(16, warps, warps, 16, warps, 16)


def candidate_configs(B, I, J, D, Din, dtype: torch.dtype = torch.float32,
                      precision: Optional[str] = None, given: bool = False):
    """The default and two other split counts of the input capsules (the tile sizes and warps
    are fixed by the register budget). ``given``: routing over given prediction vectors
    (:func:`default_given_config`; ``Din`` and ``precision`` unused)."""
    base = (default_given_config(B, I, J, D, dtype) if given
            else default_config(B, I, J, D, Din, dtype, precision))
    return [base, base._replace(max_isplit=8), base._replace(max_isplit=32)]


# --------------------------------------------------------------------------------------------
# Autotuning: a few configurations per shape, timed once on the GPU, the choice cached.
# --------------------------------------------------------------------------------------------
_TUNED: Dict[tuple, Config] = {}
# ``CAPSNET_EXT_TRITON_AUTOTUNE=0`` takes the heuristic default instead of timing candidates
# (for reproducible launch plans, e.g. the static kernel report).
AUTOTUNE_ENV = "CAPSNET_EXT_TRITON_AUTOTUNE"


def _time_cuda(fn, reps: int = 3) -> float:
    fn()  # compile and warm up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def tuned_config(key: tuple, candidates, run, timer=None) -> Config:
    """The fastest of ``candidates`` for ``key`` (shape, dtype, options, device), measured once
    by ``timer(lambda: run(config))`` and cached. Without a timer (the CPU interpreter, where
    timing means nothing) the first candidate, the heuristic default, is taken."""
    config = _TUNED.get(key)
    if config is None:
        if timer is None or len(candidates) == 1:
            config = candidates[0]
        else:
            config = min(candidates, key=lambda c: timer(lambda: run(c)))
        _TUNED[key] = config
    return config


def _shape(u, W):
    """``(B, I, J, D, Din)`` of ``u [B, I, Din]`` and ``W [I, J, D, Din]``, or of a given
    ``u_hat [B, I, J, D]`` when ``W`` is ``None`` (``Din`` then 0)."""
    if W is None:
        B, I, J, D = u.shape
        return B, I, J, D, 0
    B, I, Din = u.shape
    _, J, D, _ = W.shape
    return B, I, J, D, Din


def config_is_valid(config: Config, B, I, J, D, Din) -> bool:
    """Whether ``config`` can run this shape (the tiles hold at least the smallest dot)."""
    return min(config.BB, config.grad_BB) >= MIN_DOT_K and min(
        config.warps, config.bwd_warps, config.grad_warps) >= 1 and config.max_isplit >= 1 \
        and config.stages >= 1 and config.design in DESIGNS


def _gpu_name(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_name(index)


def table_config(direction: str, dtype: torch.dtype, device: torch.device, B, I, J, D, Din,
                 precision: Optional[str] = None) -> Optional[Config]:
    """The committed tuning table's configuration for this call (:mod:`.tuning`), or ``None``
    when no entry matches."""
    precision = precision or dot_precision(dtype)
    entry = tuning.lookup(_gpu_name(device), direction, dtype, precision, B, I, J, D, Din,
                          valid=lambda c: config_is_valid(Config(**c), B, I, J, D, Din))
    return None if entry is None else Config(**entry["config"])


def _config_for(u, W, iterations, options, run):
    """Forced (the tuning sweep), else the tuning table, else the default and its split counts
    timed once per shape (see :mod:`.tuning`). ``W`` is ``None`` for given prediction vectors
    ``u`` (table directions ``given-fwd``/``given-bwd``)."""
    forced = tuning.forced_config()
    if forced is not None:
        return forced
    B, I, J, D, Din = _shape(u, W)
    key = (B, I, J, D, Din, iterations, u.dtype, u.device, dot_precision(u.dtype), options)
    config = _TUNED.get(key)
    if config is not None:
        return config
    if u.device.type == "cuda":
        direction = options[0] if W is not None else "given-" + options[0]
        config = table_config(direction, u.dtype, u.device, B, I, J, D, Din)
        if config is not None:
            _TUNED[key] = config
            return config
    autotune = os.environ.get(AUTOTUNE_ENV, "1") not in ("0", "")
    timer = _time_cuda if u.device.type == "cuda" and autotune else None
    return tuned_config(key, candidate_configs(B, I, J, D, Din, u.dtype, given=W is None), run,
                        timer)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def dot_meta(dtype) -> dict:
    """The dot constexprs of every Triton kernel with a ``tl.dot`` (the routing sweeps and
    ``predict``): accumulation dtype ``ACC``, operand dtype ``DT``, the dtype ``DOT_DT`` the
    dot is given (see :func:`._gemm_kernels._op`) and the float32 ``PRECISION``."""
    dot_dt = _TL[dtype]
    if dtype == torch.bfloat16 and _interpreting():
        dot_dt = tl.float32  # the interpreter's bfloat16 dot is wrong; see _gemm_kernels._op
    return dict(ACC=_TL[acc_dtype(dtype)], DT=_TL[dtype], DOT_DT=dot_dt,
                PRECISION=dot_precision(dtype))


def _common_meta(dtype, plan: Plan, leaky: bool, temperature: float):
    return dict(LEAKY=leaky, INV_T=1.0 / temperature, **dot_meta(dtype), TINY=_tiny(dtype),
                BLOCK_J=plan.BLOCK_J, BLOCK_D=plan.BLOCK_D, enable_fp_fusion=True)


def _uhat_source(u, W):
    """Leading arguments of the u_hat-tile kernels, ``(src, w, s_b, s_i, s_j, s_d)``: the given
    ``u_hat`` and its strides when ``W`` is ``None``, else ``u`` and ``W`` (both contiguous;
    the strides are unused)."""
    if W is None:
        return (u, u, *u.stride())
    return (u, W, 0, 0, 0, 0)


def _forward(u, W, iterations, bias, prior, leaky, temperature, return_coupling, config):
    given = W is None
    B, I, J, D, Din = _shape(u, W)
    plan = Plan(B, I, J, D, Din, u.device, config, u.dtype, given=given)
    acc = acc_dtype(u.dtype)
    R = iterations
    s_all = torch.empty(R, B, J, D, device=u.device, dtype=acc)
    V_all = torch.empty(R, B, J, D, device=u.device, dtype=acc)
    parts = torch.empty(2, plan.n_isplit, B, J, D, device=u.device, dtype=acc)
    v = torch.empty(B, J, D, device=u.device, dtype=u.dtype)
    c = torch.empty(B, I, J, device=u.device, dtype=u.dtype) if return_coupling else parts
    meta = _common_meta(u.dtype, plan, leaky, temperature)
    if plan.uhat:
        sweep = K._fwd_uhat_sweep_kernel
        source = _uhat_source(u, W)
        tiles = dict(BB=plan.BB, KP=plan.DINP, FUSED=not given)
    else:
        sweep = K._fwd_sweep_kernel
        source = (u, W)
        tiles = dict(BB=plan.BB, DINP=plan.DINP, IC=plan.IC)
    bias_arg = bias if bias is not None else parts
    prior_arg = prior if prior is not None else parts
    with device_guard(u):
        for r in range(R):
            sweep[(plan.n_btiles, plan.n_isplit)](
                *source, prior_arg, bias_arg, parts[(r + 1) % 2], parts[r % 2], s_all, V_all, c,
                r, B, I, J, D, Din, plan.i_per_split, plan.n_isplit,
                FIRST=r == 0, HAS_PRIOR=prior is not None, HAS_BIAS=bias is not None,
                STORE_C=return_coupling and r == R - 1 and (r > 0 or prior is not None),
                num_warps=config.warps, num_stages=config.stages, **tiles, **meta)
        uniform_c = return_coupling and R == 1 and prior is None
        K._fwd_final_kernel[(plan.n_btiles,)](
            parts[(R - 1) % 2], plan.n_isplit, bias_arg, s_all, v, c, R - 1, B, I, J, D,
            HAS_BIAS=bias is not None, UNIFORM_C=uniform_c, LEAKY=leaky, ACC=meta["ACC"],
            TINY=meta["TINY"], BB=plan.BB, BLOCK_J=plan.BLOCK_J, BLOCK_D=plan.BLOCK_D,
            BLOCK_I=16, num_warps=config.warps, enable_fp_fusion=True)
    return v, s_all, V_all, (c if return_coupling else None)


def _backward(u, W, prior, grad_v, s_all, V_all, leaky, detach_inner, temperature, config,
              need_u, need_w, need_bias, need_prior, bias_dtype):
    """``(du, dW, d_bias, d_prior)``. For given prediction vectors (``W`` is ``None``) ``du``
    is the gradient wrt ``u_hat`` and ``dW`` is ``None``."""
    given = W is None
    need_w = need_w and not given
    B, I, J, D, Din = _shape(u, W)
    R = s_all.shape[0]
    plan = Plan(B, I, J, D, Din, u.device, config, u.dtype, given=given)
    acc = s_all.dtype
    meta = _common_meta(u.dtype, plan, leaky, temperature)
    if plan.uhat:
        sweep = K._bwd_uhat_sweep_kernel
        source = _uhat_source(u, W)
        tiles = dict(KP=plan.DINP, FUSED=not given)
    else:
        sweep = K._bwd_sweep_kernel
        source = (u, W)
        tiles = dict(DINP=plan.DINP, IC=plan.IC)
    has_prior = prior is not None
    grad_v = grad_v.contiguous()
    gs_all = torch.empty(R, B, J, D, device=u.device, dtype=acc)
    parts = torch.empty(2, plan.n_isplit, B, J, D, device=u.device, dtype=acc)
    G = torch.empty(2, B, J, D, device=u.device, dtype=acc)
    prior_arg = prior if has_prior else parts
    small = dict(ACC=meta["ACC"], TINY=meta["TINY"], BLOCK_J=plan.BLOCK_J, BLOCK_D=plan.BLOCK_D,
                 enable_fp_fusion=True)
    du = torch.empty(u.shape, device=u.device, dtype=u.dtype) if need_u else None
    n_w = I * J * D * Din if need_w else 0
    n_prior = I * J if need_prior else 0
    n_bias = J * D if need_bias else 0
    if plan.n_bsplit > 1:
        split_parts = torch.empty(plan.n_bsplit, n_w + n_prior + n_bias, device=u.device,
                                  dtype=acc)
    dW = torch.empty(I, J, D, Din, device=u.device, dtype=W.dtype) if need_w else None
    d_prior = torch.empty(I, J, device=u.device, dtype=prior.dtype) if need_prior else None
    d_bias = torch.empty(J, D, device=u.device, dtype=bias_dtype) if need_bias else None
    with device_guard(u):
        last_partial = None
        if not detach_inner:
            for r in range(R - 1, 0, -1):
                sweep[(plan.n_btiles, plan.n_isplit)](
                    *source, prior_arg, parts[(r + 1) % 2], parts[r % 2],
                    G[(r + 1) % 2], G[r % 2], grad_v, s_all[r], V_all[r], gs_all[r],
                    B, I, J, D, Din, plan.i_per_split, plan.n_isplit,
                    HAS_PART=r < R - 1, HAS_G_IN=r < R - 2, HAS_GV=r == R - 1,
                    HAS_PRIOR=has_prior, BB=plan.BB, num_warps=config.bwd_warps,
                    num_stages=config.stages, **tiles, **meta)
                last_partial = r
        # gs of the first iteration (or of the last alone under detach_inner).
        first = R - 1 if (detach_inner or R == 1) else 0
        has_part = last_partial is not None
        K._bwd_first_kernel[(plan.n_btiles,)](
            parts[1] if has_part else parts, plan.n_isplit, G[1] if has_part else parts,
            grad_v, s_all[first], gs_all[first], B, J, D,
            HAS_PART=has_part, HAS_G_IN=has_part and R > 2, HAS_GV=not has_part,
            BB=plan.BB, num_warps=config.bwd_warps, **small)
        if need_u or need_w or need_prior or need_bias:
            if plan.n_bsplit > 1:
                base = split_parts
                targets = (base, base[:, n_w:], base[:, n_w + n_prior:])
                stride = split_parts.shape[1]
            else:
                targets = (dW, d_prior, d_bias)
                stride = 0
            targets = [t if t is not None else gs_all for t in targets]
            grid = (plan.n_grad_chunks, plan.n_bsplit)
            grad_meta = dict(DETACH=detach_inner, HAS_PRIOR=has_prior, BB=plan.grad_BB,
                             num_warps=config.grad_warps, num_stages=config.stages,
                             **{k: v for k, v in meta.items() if k != "TINY"})  # no squash here
            if plan.uhat:
                # One launch: du (or the gradient wrt u_hat), dW, d prior and d bias.
                K._grad_uhat_sweep_kernel[grid](
                    *source, prior_arg, V_all, gs_all, du if du is not None else gs_all,
                    *targets, stride, B, I, J, D, Din, R, plan.b_per_split, FUSED=not given,
                    NEED_DSRC=need_u, NEED_DW=need_w, NEED_DPRIOR=need_prior,
                    NEED_DBIAS=need_bias, KP=plan.GRAD_DINP, **grad_meta)
            else:
                # Two launches: du (with d prior and d bias), then dW; one kernel doing both
                # needs more than 128 registers per thread.
                grad_args = (u, W, prior_arg, V_all, gs_all, du if du is not None else gs_all,
                             *targets, stride, B, I, J, D, Din, R, plan.b_per_split)
                grad_meta["DINP"] = plan.GRAD_DINP
                if need_u or need_prior or need_bias:
                    K._grad_sweep_kernel[grid](
                        *grad_args, NEED_DU=need_u, NEED_DW=False, NEED_DPRIOR=need_prior,
                        NEED_DBIAS=need_bias, **grad_meta)
                if need_w:
                    K._grad_sweep_kernel[grid](
                        *grad_args, NEED_DU=False, NEED_DW=True, NEED_DPRIOR=False,
                        NEED_DBIAS=False, **grad_meta)
            total = n_w + n_prior + n_bias
            if plan.n_bsplit > 1 and total > 0:
                block = 1024
                K._sum_splits_kernel[(triton.cdiv(total, block),)](
                    split_parts, plan.n_bsplit, total,
                    dW if dW is not None else split_parts, n_w,
                    d_prior if d_prior is not None else split_parts, n_prior,
                    d_bias if d_bias is not None else split_parts, n_bias,
                    ACC=meta["ACC"], BLOCK=block, num_warps=4, enable_fp_fusion=True)
    return du, dW, d_bias, d_prior


def routing_forward(u, W, iterations, bias, prior, leaky, temperature, return_coupling):
    """``(v, s_all, V_all, c or None)``; ``u``, ``W``, ``bias``, ``prior`` contiguous. ``W``
    ``None``: ``u`` is a given ``u_hat [B, I, J, D]``, read through its strides."""
    options = (bias is not None, prior is not None, leaky, float(temperature), return_coupling)

    def run(config):
        return _forward(u, W, iterations, bias, prior, leaky, temperature, return_coupling,
                        config)

    return run(_config_for(u, W, iterations, ("fwd",) + options, run))


def routing_backward(u, W, prior, grad_v, s_all, V_all, leaky, detach_inner, temperature,
                     need_u, need_w, need_bias, need_prior, bias_dtype):
    """``(du, dW, d_bias, d_prior)``, ``None`` where not needed. ``W`` ``None``: ``du`` is the
    gradient wrt the given ``u_hat`` (and ``dW`` ``None``)."""
    options = (prior is not None, leaky, detach_inner, float(temperature), need_u, need_w,
               need_bias, need_prior)

    def run(config):
        return _backward(u, W, prior, grad_v, s_all, V_all, leaky, detach_inner, temperature,
                         config, need_u, need_w, need_bias, need_prior, bias_dtype)

    return run(_config_for(u, W, s_all.shape[0], ("bwd",) + options, run))


# --------------------------------------------------------------------------------------------
# Autograd (the plumbing shared with the CUDA backend: :mod:`capsnet_ext._routing_autograd`)
# --------------------------------------------------------------------------------------------
def _split_sources(sources):
    """``(u, W)`` of the fused op's sources, ``(u_hat, None)`` of given prediction vectors:
    the launchers take ``W = None`` for ``dynamic_routing``."""
    return (sources[0], sources[1]) if len(sources) == 2 else (sources[0], None)


def _kernel_forward(sources, bias, prior, options: RA.RoutingOptions, return_coupling):
    """``(v, c or None, s_all, V_all)`` from the launchers: ``sources`` is ``(u, W)`` or
    ``(u_hat,)``."""
    o = options
    v, s_all, V_all, c = routing_forward(*_split_sources(sources), o.iterations, bias, prior,
                                         o.leaky, o.temperature, return_coupling)
    return v, c, s_all, V_all


def _kernel_backward(grad_v, sources, prior, s_all, V_all, options: RA.RoutingOptions,
                     need: RA.NeededGrads):
    """The backward of :mod:`capsnet_ext._routing_autograd` over the launchers."""
    o = options
    need_w = len(sources) == 2 and need.sources[1]
    du, dW, d_bias, d_prior = routing_backward(
        *_split_sources(sources), prior, grad_v, s_all, V_all, o.leaky, o.detach_inner,
        o.temperature, need.sources[0], need_w, need.bias, need.prior, s_all.dtype)
    return (du, dW)[:len(sources)], d_bias, d_prior


class RoutingFunction(torch.autograd.Function):
    """Eager autograd over the launchers (the least per-call overhead) for both ops: inputs
    ``*sources, bias, prior, iterations, leaky, detach_inner, return_coupling, temperature``
    with ``sources`` ``(u, W)`` or ``(u_hat,)``."""

    @staticmethod
    def forward(ctx, *inputs):
        n_sources = len(inputs) - 2 - RA.N_OPTIONS
        sources, bias, prior, options = RA.split_inputs(inputs, n_sources)
        return_coupling = bool(inputs[-2])
        v, c, s_all, V_all = _kernel_forward(sources, bias, prior, options, return_coupling)
        RA.save(ctx, sources, bias, prior, s_all, V_all, options)
        if return_coupling:
            ctx.mark_non_differentiable(c)
            return v, c
        return v

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_v, grad_c=None):
        return RA.run_backward(ctx, grad_v, _kernel_backward)


# --------------------------------------------------------------------------------------------
# Registered operators for torch.compile (opaque to Dynamo, with fake implementations). The
# forward ops return ``(v, c, s_all, V_all)``, ``c`` empty unless ``return_coupling``.
# --------------------------------------------------------------------------------------------
def _empty(ref: torch.Tensor) -> torch.Tensor:
    return ref.new_empty(0)


def _fake_forward(ref, B, I, J, D, iterations, return_coupling):
    acc = acc_dtype(ref.dtype)
    c = ref.new_empty(B, I, J) if return_coupling else ref.new_empty(0)
    return (ref.new_empty(B, J, D), c, ref.new_empty(iterations, B, J, D, dtype=acc),
            ref.new_empty(iterations, B, J, D, dtype=acc))


def _op_forward(sources, bias, prior, iterations, leaky, detach_inner, return_coupling,
                temperature):
    options = RA.RoutingOptions(iterations, leaky, detach_inner, temperature)
    v, c, s_all, V_all = _kernel_forward(sources, bias, prior, options, return_coupling)
    return v, (c if c is not None else _empty(sources[0])), s_all, V_all


@torch.library.custom_op("capsnet_ext_triton::gemm_routing_forward", mutates_args=())
def routing_forward_op(u: torch.Tensor, W: torch.Tensor, bias: Optional[torch.Tensor],
                       prior: Optional[torch.Tensor], iterations: int, leaky: bool,
                       detach_inner: bool, return_coupling: bool, temperature: float
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``capsule_routing``: ``(v, c, s_all, V_all)``. ``detach_inner`` only matters to the
    registered backward."""
    return _op_forward((u, W), bias, prior, iterations, leaky, detach_inner, return_coupling,
                       temperature)


@routing_forward_op.register_fake
def _(u, W, bias, prior, iterations, leaky, detach_inner, return_coupling, temperature):
    B, I, J, D, _ = _shape(u, W)
    return _fake_forward(u, B, I, J, D, iterations, return_coupling)


@torch.library.custom_op("capsnet_ext_triton::routing_forward", mutates_args=())
def given_routing_forward_op(u_hat: torch.Tensor, bias: Optional[torch.Tensor],
                             prior: Optional[torch.Tensor], iterations: int, leaky: bool,
                             detach_inner: bool, return_coupling: bool, temperature: float
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dynamic_routing``: ``(v, c, s_all, V_all)``."""
    return _op_forward((u_hat,), bias, prior, iterations, leaky, detach_inner, return_coupling,
                       temperature)


@given_routing_forward_op.register_fake
def _(u_hat, bias, prior, iterations, leaky, detach_inner, return_coupling, temperature):
    B, I, J, D = u_hat.shape
    return _fake_forward(u_hat, B, I, J, D, iterations, return_coupling)


@torch.library.custom_op("capsnet_ext_triton::gemm_routing_backward", mutates_args=())
def routing_backward_op(grad_v: torch.Tensor, u: torch.Tensor, W: torch.Tensor,
                        prior: Optional[torch.Tensor], s_all: torch.Tensor, V_all: torch.Tensor,
                        leaky: bool, detach_inner: bool, temperature: float, need_u: bool,
                        need_w: bool, need_bias: bool, need_prior: bool
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(du, dW, d_bias, d_prior)``; gradients not asked for are empty. ``d_bias`` is in the
    accumulation dtype (the caller casts it to the bias dtype)."""
    (du, dW), d_bias, d_prior = _kernel_backward(
        grad_v, (u, W), prior, s_all, V_all,
        RA.RoutingOptions(s_all.shape[0], leaky, detach_inner, temperature),
        RA.NeededGrads((need_u, need_w), need_bias, need_prior))
    return tuple(t if t is not None else _empty(u) for t in (du, dW, d_bias, d_prior))


@routing_backward_op.register_fake
def _(grad_v, u, W, prior, s_all, V_all, leaky, detach_inner, temperature, need_u, need_w,
      need_bias, need_prior):
    J, D = W.shape[1], W.shape[2]
    return (u.new_empty(u.shape) if need_u else u.new_empty(0),
            W.new_empty(W.shape) if need_w else u.new_empty(0),
            s_all.new_empty(J, D) if need_bias else u.new_empty(0),
            prior.new_empty(prior.shape) if need_prior else u.new_empty(0))


@torch.library.custom_op("capsnet_ext_triton::routing_backward", mutates_args=())
def given_routing_backward_op(grad_v: torch.Tensor, u_hat: torch.Tensor,
                              prior: Optional[torch.Tensor], s_all: torch.Tensor,
                              V_all: torch.Tensor, leaky: bool, detach_inner: bool,
                              temperature: float, need_src: bool, need_bias: bool,
                              need_prior: bool
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(g_u_hat, d_bias, d_prior)``; gradients not asked for are empty."""
    (g_u_hat,), d_bias, d_prior = _kernel_backward(
        grad_v, (u_hat,), prior, s_all, V_all,
        RA.RoutingOptions(s_all.shape[0], leaky, detach_inner, temperature),
        RA.NeededGrads((need_src,), need_bias, need_prior))
    return tuple(t if t is not None else _empty(u_hat) for t in (g_u_hat, d_bias, d_prior))


@given_routing_backward_op.register_fake
def _(grad_v, u_hat, prior, s_all, V_all, leaky, detach_inner, temperature, need_src, need_bias,
      need_prior):
    J, D = u_hat.shape[2], u_hat.shape[3]
    return (u_hat.new_empty(u_hat.shape) if need_src else u_hat.new_empty(0),
            s_all.new_empty(J, D) if need_bias else u_hat.new_empty(0),
            prior.new_empty(prior.shape) if need_prior else u_hat.new_empty(0))


def _op_backward(grad_v, sources, prior, s_all, V_all, options: RA.RoutingOptions,
                 need: RA.NeededGrads):
    """The backward of the registered forward ops: the registered backward ops, so that
    compiled graphs keep them opaque too."""
    o = options
    if len(sources) == 2:
        du, dW, d_bias, d_prior = routing_backward_op(
            grad_v, *sources, prior, s_all, V_all, o.leaky, o.detach_inner, o.temperature,
            *need.sources, need.bias, need.prior)
        return (du, dW), d_bias, d_prior
    g_u_hat, d_bias, d_prior = given_routing_backward_op(
        grad_v, sources[0], prior, s_all, V_all, o.leaky, o.detach_inner, o.temperature,
        need.sources[0], need.bias, need.prior)
    return (g_u_hat,), d_bias, d_prior


for _forward_op in (routing_forward_op, given_routing_forward_op):
    _forward_op.register_autograd(RA.make_backward_formula(_op_backward),
                                  setup_context=RA.setup_context)
del _forward_op


def _run(sources, iterations, bias, leaky, detach_inner, return_coupling, prior, temperature):
    """Contiguous bias and prior, then the autograd.Function (eager) or the registered
    operator (compiled)."""
    bias = bias.contiguous() if bias is not None else None
    prior = prior.contiguous() if prior is not None else None
    temperature = float(temperature)
    if torch.compiler.is_compiling():
        op = routing_forward_op if len(sources) == 2 else given_routing_forward_op
        v, c, _, _ = op(*sources, bias, prior, iterations, leaky, detach_inner, return_coupling,
                        temperature)
        return (v, c) if return_coupling else v
    return RoutingFunction.apply(*sources, bias, prior, iterations, leaky, detach_inner,
                                 return_coupling, temperature)


def run_capsule_routing(u, W, iterations, bias, leaky, detach_inner, return_coupling,
                        prior=None, temperature=1.0):
    """Entry of :func:`capsnet_ext.triton_ops.capsule_routing`: contiguous ``u`` and ``W``
    (re-read in every pass)."""
    return _run((u.contiguous(), W.contiguous()), iterations, bias, leaky, detach_inner,
                return_coupling, prior, temperature)


def run_routing(u_hat, iterations, bias, leaky, detach_inner, return_coupling, prior=None,
                temperature=1.0):
    """Entry of :func:`capsnet_ext.triton_ops.dynamic_routing`: ``u_hat`` read through its
    strides (no copy; saved as the caller's tensor)."""
    return _run((u_hat,), iterations, bias, leaky, detach_inner, return_coupling, prior,
                temperature)
