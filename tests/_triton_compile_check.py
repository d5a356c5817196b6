"""Compile every Triton kernel of capsnet_ext for a CUDA target without a GPU.

Triton's interpreter (used by the unit tests on machines without a GPU) runs kernels as NumPy
code and does not exercise the GPU compiler. This script compiles the kernels with Triton's
real compiler down to a cubin (ptxas ships with Triton), for the block sizes the launchers
choose at real shapes, and prints registers and local memory (spills) per kernel.

    python tests/_triton_compile_check.py            # sm_90, float32 and float64, all variants
    python tests/_triton_compile_check.py --all-dtypes --arch 80
    python tests/_triton_compile_check.py --shape mnist --match "_input_grad_kernel"

Exit status 1 if a kernel fails to compile. Must run without TRITON_INTERPRET=1.
"""
import argparse
import importlib
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    parser.add_argument("--all-dtypes", action="store_true", help="also float16 and bfloat16")
    parser.add_argument("--shape", choices=("mnist", "large"), help="only the block sizes of this shape")
    parser.add_argument("--match", help="only variants whose printed name matches this regular expression")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter does not compile kernels", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    core = importlib.import_module("capsnet_ext.triton_ops._routing_core")
    predict_module = importlib.import_module("capsnet_ext.triton_ops.predict")
    target = GPUTarget("cuda", args.arch, 32)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

    def usage(kernel) -> str:
        if not os.path.exists(cuobjdump):
            return ""
        with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
            handle.write(kernel.asm["cubin"])
            handle.flush()
            out = subprocess.run([cuobjdump, "--dump-resource-usage", handle.name],
                                 capture_output=True, text=True).stdout
        match = re.search(r"REG:(\d+).*?LOCAL:(\d+)", out)
        return f"registers {match.group(1)}, local (spill) bytes {match.group(2)}" if match else ""

    def compile_kernel(fn, pointers, constants, num_warps):
        signature = {name: ("constexpr" if name in constants else pointers.get(name, "i32"))
                     for name in fn.arg_names}
        return triton.compile(ASTSource(fn, signature, constants), target=target,
                              options=dict(num_warps=num_warps))

    dtypes = ["fp32", "fp64"] + (["fp16", "bf16"] if args.all_dtypes else [])
    # (name, B, I, J, Din, Dout): the MNIST layer and a large one.
    shapes = [("mnist", 128, 1152, 10, 8, 16), ("large", 128, 4608, 100, 8, 16)]
    shapes = [shape for shape in shapes if args.shape in (None, shape[0])]
    jobs = []
    for (label, B, I, J, Din, D), dt in itertools.product(shapes, dtypes):
        acc = tl.float64 if dt == "fp64" else tl.float32
        acc_s = "fp64" if dt == "fp64" else "fp32"
        low, wide = "*" + dt, "*" + acc_s
        for fused in (False, True):
            plan = core._Plan(B, I, J, D, Din, fused, torch.device("cpu"))
            sweep_blocks = dict(BLOCK_B=plan.SWEEP_BLOCK_B, BLOCK_I=plan.SWEEP_BLOCK_I,
                                BLOCK_J=plan.BLOCK_J, BLOCK_D=plan.BLOCK_D)
            grad_blocks = dict(BLOCK_I=plan.GRAD_BLOCK_I, BLOCK_J=plan.BLOCK_J, BLOCK_D=plan.BLOCK_D,
                               BLOCK_K=plan.BLOCK_K)
            # The prior and temperature options are compiled all off and all on (with the prior
            # gradient): the variant with every option holds the most registers.
            for backward, leaky, store_c, logit_options in itertools.product((False, True), repeat=4):
                if backward and store_c:
                    continue
                jobs.append((label, dt, core._sweep_kernel,
                             dict(src_ptr=low, w_ptr=low, V_ptr=wide, gs_ptr=wide, partial_ptr=wide, c_ptr=low,
                                  prior_ptr=low, inv_t_ptr=wide),
                             dict(FUSED=fused, BACKWARD=backward, LEAKY=leaky, STORE_C=store_c,
                                  HAS_PRIOR=logit_options, HAS_TEMPERATURE=logit_options, ACC=acc,
                                  **sweep_blocks), plan.sweep_warps))
            for leaky, detach, need_src, need_w, logit_options in itertools.product((False, True), repeat=5):
                if not fused and need_w:
                    continue
                jobs.append((label, dt, core._input_grad_kernel,
                             dict(src_ptr=low, w_ptr=low, V_all_ptr=wide, gs_all_ptr=wide, g_src_ptr=low, g_w_ptr=low,
                                  prior_ptr=low, inv_t_ptr=wide, g_prior_ptr=wide),
                             dict(FUSED=fused, LEAKY=leaky, DETACH=detach, NEED_DSRC=need_src, NEED_DW=need_w,
                                  HAS_PRIOR=logit_options, HAS_TEMPERATURE=logit_options,
                                  NEED_DPRIOR=logit_options, ACC=acc, **grad_blocks), plan.grad_warps))
            small = dict(ACC=acc, BLOCK_J=plan.BLOCK_J, BLOCK_D=plan.BLOCK_D)
            for flag, last in itertools.product((False, True), repeat=2):
                jobs.append((label, dt, core._finalize_fwd_kernel,
                             dict(partial_ptr=wide, bias_ptr=low, s_ptr=wide, V_ptr=wide, V_next_ptr=wide, v_ptr=low),
                             dict(HAS_BIAS=flag, LAST=last, **small), 4))
                jobs.append((label, dt, core._finalize_bwd_kernel,
                             dict(partial_ptr=wide, G_ptr=wide, gv_last_ptr=low, s_ptr=wide, gs_ptr=wide),
                             dict(HAS_PARTIAL=flag, LAST=last, **small), 4))
        block_b, block_n, block_k = predict_module._blocks(B, J * D, Din)
        pb = dict(ACC=acc, BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_K=block_k)
        jobs += [
            (label, dt, predict_module._predict_fwd_kernel, dict(u_ptr=low, w_ptr=low, out_ptr=low), pb, 4),
            (label, dt, predict_module._predict_du_kernel, dict(g_ptr=low, w_ptr=low, du_ptr=low), pb, 4),
            (label, dt, predict_module._predict_dw_kernel, dict(g_ptr=low, u_ptr=low, dw_ptr=low), pb, 4),
        ]

    def describe(label, dt, fn, constants, num_warps):
        flags = ",".join(k for k, v in constants.items() if v is True)
        blocks = "x".join(str(v) for k, v in constants.items() if k.startswith("BLOCK_"))
        return f"{label:5s} {dt} {fn.__name__}[{flags}] blocks={blocks} warps={num_warps}"

    if args.match:
        jobs = [job for job in jobs if re.search(args.match, describe(*job[:3], *job[4:]))]
    failures = 0
    start = time.time()
    for label, dt, fn, pointers, constants, num_warps in jobs:
        name = describe(label, dt, fn, constants, num_warps)
        try:
            kernel = compile_kernel(fn, pointers, constants, num_warps)
        except Exception as exc:  # report every failure, then fail
            failures += 1
            print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:400]}")
            continue
        print(f"ok   {name} {usage(kernel)}")
    print(f"{len(jobs) - failures}/{len(jobs)} kernel variants compiled for sm_{args.arch} "
          f"(triton {triton.__version__}) in {time.time() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
