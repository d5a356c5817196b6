"""Compile every Triton kernel of capsnet_ext for a CUDA target without a GPU.

Triton's interpreter (used by the unit tests on machines without a GPU) runs kernels as NumPy
code and does not exercise the GPU compiler. This script compiles the kernels with Triton's
real compiler down to a cubin (ptxas ships with Triton), for the block sizes and
configurations the launchers choose at real shapes, and prints registers per thread and spills
per kernel: both the LOCAL and the STACK bytes that ``cuobjdump --dump-resource-usage``
reports (ptxas spills to either).

    python tests/_triton_compile_check.py            # sm_90, float32 and float64, all variants
    python tests/_triton_compile_check.py --all-dtypes --arch 80
    python tests/_triton_compile_check.py --all-dtypes --budget   # also enforce the budget

With ``--budget``, every kernel of the fused ``capsule_routing`` (the GEMM-tile design) in
float32, bfloat16 and float16 at the MNIST shape must use at most 128 registers per thread
and spill nothing; the exit status is 1 otherwise. Exit status 1 also if a kernel fails to
compile. Must run without TRITON_INTERPRET=1.
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

REGISTER_BUDGET = 128


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    parser.add_argument("--all-dtypes", action="store_true", help="also float16 and bfloat16")
    parser.add_argument("--budget", action="store_true",
                        help=f"fail if a GEMM routing kernel at the MNIST shape (not float64) "
                             f"uses more than {REGISTER_BUDGET} registers or spills")
    parser.add_argument("--shape", choices=("mnist", "large"), default=None,
                        help="compile for one shape only (default both)")
    parser.add_argument("--only", choices=("gemm", "uhat"), default=None,
                        help="compile only the GEMM routing kernels or only the u_hat/predict ones")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter does not compile kernels", file=sys.stderr)
        return 2
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    core = importlib.import_module("capsnet_ext.triton_ops._routing_core")
    gemm = importlib.import_module("capsnet_ext.triton_ops._gemm_core")
    gk = importlib.import_module("capsnet_ext.triton_ops._gemm_kernels")
    predict_module = importlib.import_module("capsnet_ext.triton_ops.predict")
    target = GPUTarget("cuda", args.arch, 32)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

    def usage(kernel):
        """(registers, stack bytes, local bytes) of a compiled kernel, or None."""
        if not os.path.exists(cuobjdump):
            return None
        with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
            handle.write(kernel.asm["cubin"])
            handle.flush()
            out = subprocess.run([cuobjdump, "--dump-resource-usage", handle.name],
                                 capture_output=True, text=True).stdout
        match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
        return tuple(int(g) for g in match.groups()) if match else None

    def compile_kernel(fn, pointers, constants, num_warps, num_stages):
        signature = {name: ("constexpr" if name in constants else pointers.get(name, "i32"))
                     for name in fn.arg_names}
        return triton.compile(ASTSource(fn, signature, constants), target=target,
                              options=dict(num_warps=num_warps, num_stages=num_stages,
                                           enable_fp_fusion=True))

    torch_dtype = {"fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16,
                   "bf16": torch.bfloat16}
    tl_dtype = {"fp32": tl.float32, "fp64": tl.float64, "fp16": tl.float16, "bf16": tl.bfloat16}
    dtypes = ["fp32", "fp64"] + (["fp16", "bf16"] if args.all_dtypes else [])
    # (name, B, I, J, Din, Dout): the MNIST layer and a large one.
    shapes = [("mnist", 128, 1152, 10, 8, 16), ("large", 128, 4608, 100, 8, 16)]
    jobs = []  # (label, dtype, fn, pointers, constants, warps, stages, budgeted)
    shapes = [s for s in shapes if args.shape in (None, s[0])]
    for (label, B, I, J, Din, D), dt in itertools.product(shapes, dtypes):
        acc = tl.float64 if dt == "fp64" else tl.float32
        acc_s = "fp64" if dt == "fp64" else "fp32"
        low, wide = "*" + dt, "*" + acc_s
        tiny = torch.finfo(torch.float64 if dt == "fp64" else torch.float32).tiny
        budgeted = args.budget and label == "mnist" and dt != "fp64"
        # ---- the fused capsule_routing: GEMM tiles
        if args.only != "uhat" and gemm.capsule_size_limit_reason(J, D, Din) is None:
            precision = "tf32" if dt == "fp32" else "ieee"  # the slower-compiling fp32 variant
            # The candidates differ only in grid splits, not in the compiled kernels.
            for config in gemm.candidate_configs(B, I, J, D, Din)[:1]:
                plan = gemm.Plan(B, I, J, D, Din, torch_dtype[dt], torch.device("cpu"), config)
                meta = dict(ACC=acc, DT=tl_dtype[dt], DOT_DT=tl_dtype[dt], PRECISION=precision,
                            BLOCK_J=plan.BLOCK_J, BLOCK_D=plan.BLOCK_D)
                sweep = dict(BB=config.BB, DINP=plan.DINP, IC=plan.IC, TINY=tiny, **meta)
                # The variants with every option on are the largest; the others for coverage.
                for first, prior, leaky, store_c in [(False, True, True, True), (False, False, False, False),
                                                     (True, True, True, True), (True, False, False, False)]:
                    jobs.append((label, dt, gk._fwd_sweep_kernel,
                                 dict(u_ptr=low, w_ptr=low, prior_ptr=low, bias_ptr=low,
                                      part_in_ptr=wide, part_out_ptr=wide, s_all_ptr=wide,
                                      V_all_ptr=wide, c_ptr=low),
                                 dict(FIRST=first, HAS_PRIOR=prior, HAS_BIAS=True, LEAKY=leaky,
                                      STORE_C=store_c, INV_T=0.5 if prior else 1.0, **sweep),
                                 config.warps, 1, budgeted))
                for prior, leaky, has_g in [(True, True, True), (False, False, False)]:
                    jobs.append((label, dt, gk._bwd_sweep_kernel,
                                 dict(u_ptr=low, w_ptr=low, prior_ptr=low, part_in_ptr=wide,
                                      part_out_ptr=wide, G_in_ptr=wide, G_out_ptr=wide,
                                      grad_v_ptr=low, s_ptr=wide, V_ptr=wide, gs_ptr=wide),
                                 dict(HAS_PART=has_g, HAS_G_IN=has_g, HAS_GV=not has_g,
                                      HAS_PRIOR=prior, LEAKY=leaky, INV_T=0.5 if prior else 1.0,
                                      **sweep), config.warps, 1, budgeted))
                grad = dict(BB=config.grad_BB, DINP=plan.DINP, **meta)
                for detach, prior, leaky, part in itertools.product((False, True), (False, True),
                                                                    (True,), (False, True)):
                    for need_w in (False, True):  # the two launches: du (+ prior, bias), dW
                        jobs.append((label, dt, gk._grad_sweep_kernel,
                                     dict(u_ptr=low, w_ptr=low, prior_ptr=low, V_all_ptr=wide,
                                          gs_all_ptr=wide, du_ptr=low,
                                          dw_ptr=wide if part else low,
                                          dprior_ptr=wide if part else low,
                                          dbias_ptr=wide if part else low),
                                     dict(DETACH=detach, HAS_PRIOR=prior, LEAKY=leaky,
                                          INV_T=0.5 if prior else 1.0, NEED_DU=not need_w,
                                          NEED_DW=need_w, NEED_DPRIOR=prior and not need_w,
                                          NEED_DBIAS=not need_w, **grad),
                                     config.grad_warps, 1, budgeted))
                small = dict(ACC=acc, TINY=tiny, BB=config.BB, BLOCK_J=plan.BLOCK_J,
                             BLOCK_D=plan.BLOCK_D)
                for has_part in (False, True):
                    jobs.append((label, dt, gk._bwd_first_kernel,
                                 dict(part_ptr=wide, G_in_ptr=wide, grad_v_ptr=low, s_ptr=wide,
                                      gs_ptr=wide),
                                 dict(HAS_PART=has_part, HAS_G_IN=has_part, HAS_GV=not has_part,
                                      **small), config.warps, 3, budgeted))
                for uniform in (False, True):
                    jobs.append((label, dt, gk._fwd_final_kernel,
                                 dict(part_ptr=wide, bias_ptr=low, s_all_ptr=wide, v_ptr=low,
                                      c_ptr=low),
                                 dict(HAS_BIAS=True, UNIFORM_C=uniform, LEAKY=False, BLOCK_I=16,
                                      **small), config.warps, 3, budgeted))
            jobs.append((label, dt, gk._sum_splits_kernel,
                         dict(part_ptr=wide, dw_ptr=low, dprior_ptr=low, dbias_ptr=low),
                         dict(ACC=acc, BLOCK=1024), 4, 3, budgeted))
        if args.only == "gemm":
            continue
        # ---- dynamic_routing over a given u_hat, and predict
        plan = core._Plan(B, I, J, D, torch.device("cpu"))
        sweep_blocks = dict(BLOCK_B=plan.SWEEP_BLOCK_B, BLOCK_I=plan.SWEEP_BLOCK_I,
                            BLOCK_J=plan.BLOCK_J, BLOCK_D=plan.BLOCK_D)
        # The prior and temperature options are compiled all off and all on (with the prior
        # gradient): the variant with every option holds the most registers.
        for backward, leaky, store_c, logit_options in itertools.product((False, True), repeat=4):
            if backward and store_c:
                continue
            jobs.append((label, dt, core._sweep_kernel,
                         dict(src_ptr=low, V_ptr=wide, gs_ptr=wide, partial_ptr=wide, c_ptr=low,
                              prior_ptr=low, inv_t_ptr=wide),
                         dict(BACKWARD=backward, LEAKY=leaky, STORE_C=store_c,
                              HAS_PRIOR=logit_options, HAS_TEMPERATURE=logit_options, ACC=acc,
                              **sweep_blocks), plan.sweep_warps, 3, False))
        for leaky, detach, logit_options in itertools.product((False, True), repeat=3):
            jobs.append((label, dt, core._input_grad_kernel,
                         dict(src_ptr=low, V_all_ptr=wide, gs_all_ptr=wide, g_src_ptr=low,
                              prior_ptr=low, inv_t_ptr=wide, g_prior_ptr=wide),
                         dict(LEAKY=leaky, DETACH=detach, HAS_PRIOR=logit_options,
                              HAS_TEMPERATURE=logit_options, NEED_DPRIOR=logit_options,
                              NEED_DSRC=True, ACC=acc, BLOCK_I=plan.GRAD_BLOCK_I,
                              BLOCK_J=plan.BLOCK_J, BLOCK_D=plan.BLOCK_D), plan.grad_warps, 3,
                         False))
        small = dict(ACC=acc, TINY=tiny, BLOCK_J=plan.BLOCK_J, BLOCK_D=plan.BLOCK_D)
        for flag, last in itertools.product((False, True), repeat=2):
            jobs.append((label, dt, core._finalize_fwd_kernel,
                         dict(partial_ptr=wide, bias_ptr=low, s_ptr=wide, V_ptr=wide,
                              V_next_ptr=wide, v_ptr=low),
                         dict(HAS_BIAS=flag, LAST=last, FIRST=False, **small), 4, 3, False))
            jobs.append((label, dt, core._finalize_bwd_kernel,
                         dict(partial_ptr=wide, G_ptr=wide, gv_last_ptr=low, s_ptr=wide, gs_ptr=wide),
                         dict(HAS_PARTIAL=flag, HAS_G=flag, LAST=last, **small), 4, 3, False))
        block_b, block_n, block_k = predict_module._blocks(B, J * D, Din)
        pb = dict(ACC=acc, BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_K=block_k)
        jobs += [
            (label, dt, predict_module._predict_fwd_kernel, dict(u_ptr=low, w_ptr=low, out_ptr=low), pb, 4, 3, False),
            (label, dt, predict_module._predict_du_kernel, dict(g_ptr=low, w_ptr=low, du_ptr=low), pb, 4, 3, False),
            (label, dt, predict_module._predict_dw_kernel, dict(g_ptr=low, u_ptr=low, dw_ptr=low), pb, 4, 3, False),
        ]

    failures = over_budget = 0
    start = time.time()
    for label, dt, fn, pointers, constants, num_warps, num_stages, budgeted in jobs:
        flags = ",".join(k for k, v in constants.items() if v is True)
        blocks = "x".join(str(v) for k, v in constants.items()
                          if k.startswith("BLOCK_") or k in ("BB", "IC", "DINP"))
        name = f"{label:5s} {dt} {fn.__name__}[{flags}] blocks={blocks} warps={num_warps}"
        try:
            kernel = compile_kernel(fn, pointers, constants, num_warps, num_stages)
        except Exception as exc:  # report every failure, then fail
            failures += 1
            print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:400]}")
            continue
        counts = usage(kernel)
        text = "" if counts is None else (f"registers {counts[0]}, spill bytes: stack {counts[1]}, "
                                          f"local {counts[2]}")
        status = "ok  "
        if budgeted and counts is not None and (counts[0] > REGISTER_BUDGET or counts[1] or counts[2]):
            over_budget += 1
            status = "OVER"
        print(f"{status} {name} {text}", flush=True)
    print(f"{len(jobs) - failures}/{len(jobs)} kernel variants compiled for sm_{args.arch} "
          f"(triton {triton.__version__}) in {time.time() - start:.0f} s"
          + (f"; {over_budget} over the budget of {REGISTER_BUDGET} registers, no spills"
             if args.budget else ""))
    return 1 if failures or over_budget else 0


if __name__ == "__main__":
    sys.exit(main())
