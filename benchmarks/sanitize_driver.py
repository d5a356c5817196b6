"""Small calls that reach every kernel and every option of the kernel backends, for
``compute-sanitizer`` (memcheck, racecheck, initcheck, synccheck) in ``benchmarks/gpu_check.sh``.

Only the public API is used: ``capsnet_ext.predict``, ``dynamic_routing`` and
``capsule_routing`` with ``backend=<name>``, forward and backward (gradients with respect to
every input that takes one: ``u``, ``W``, ``u_hat``, ``bias``, ``prior``). Per backend and
dtype it runs odd shapes (including ``J > 32``, ``B`` not a multiple of 8, and enough input
capsules for reductions across several blocks or programs), 1 and 3 iterations, every
combination of ``bias``, ``leaky``, ``detach_inner`` and ``return_coupling``, and ``prior`` and
``temperature`` alone and together. An option combination a backend refuses
(``NotImplementedError``, i.e. its ``unsupported_reason``) is recorded as unsupported with the
reason, so the report says what was not exercised.

Each backend's calls are framed by marker lines (``MARKER begin/end backend=<name>``) printed
after a device synchronisation, so a sanitizer report can be attributed to the backend whose
kernels produced it.

    python3 -m benchmarks.sanitize_driver --backends cuda,triton --profile full --out run.json
    python3 -m benchmarks.sanitize_driver --backends reference --device cpu   # checks this driver
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
import traceback
from typing import Dict, List, Optional, Sequence, Tuple

MARKER = "### capsnet-sanitize"

# B, I, J, Din, Dout
SHAPES = {
    "full": [
        (3, 37, 5, 7, 3),      # odd everything
        (2, 61, 33, 5, 9),     # J > 32: more outputs than lanes in a warp
        (9, 1025, 3, 17, 2),   # B not a multiple of 8; many input capsules: cross-block sums
    ],
    "light": [
        (3, 37, 5, 7, 3),
        (9, 1025, 3, 17, 2),
    ],
    "tiny": [
        (3, 13, 5, 7, 3),
    ],
    # racecheck and synccheck instrument every shared-memory access and barrier: one shape that
    # still reaches every kernel (B > 16 so the gradient sweep splits the samples and the
    # split-summing kernel runs; several input-capsule splits).
    "race": [
        (33, 37, 5, 7, 3),
    ],
}
# The CUDA backend's specialised kernel instances (Din 8, Dout 16: the MNIST layer's), once with
# one and once with two samples per lane (capsnet_ext.cuda_ops.tuning.forced), B odd so that a
# tile's last pass is half empty: the shapes above all take the generic instance.
SPECIALISED_SHAPE = (19, 37, 10, 8, 16)
SPECIALISED_OPTIONS = [
    dict(iterations=3, bias=True, leaky=True, detach_inner=False, return_coupling=True, prior=True,
         temperature=0.5),
    dict(iterations=2, bias=False, leaky=False, detach_inner=True, return_coupling=False),
]
DTYPES = {
    "full": ("float32", "float64", "float16", "bfloat16"),
    "light": ("float32", "bfloat16"),
    "tiny": ("float32",),
    "race": ("float32",),
}


def option_grid(dtype: str, profile: str) -> List[Dict[str, object]]:
    """Routing options to run. float32 gets the full product of the boolean options for 1 and
    3 iterations; other dtypes (and the light profile) a covering set in which every option is
    on and off at least once. Both add ``prior``, ``temperature`` and both together."""
    if profile == "race":
        # Every kernel once: the uniform first iteration and stored couplings; every option on
        # (prior and temperature included) through the full backward; the detached backward.
        return [
            dict(iterations=1, bias=False, leaky=False, detach_inner=False, return_coupling=True),
            dict(iterations=3, bias=True, leaky=True, detach_inner=False, return_coupling=True,
                 prior=True, temperature=0.5),
            dict(iterations=2, bias=True, leaky=False, detach_inner=True, return_coupling=False,
                 prior=True, temperature=2.0),
        ]
    combos = []
    full = dtype == "float32" and profile not in ("light", "race")
    if full:
        for iterations, bias, leaky, detach, ret in itertools.product((1, 3), *([(False, True)] * 4)):
            combos.append(dict(iterations=iterations, bias=bias, leaky=leaky, detach_inner=detach,
                               return_coupling=ret))
    else:
        combos += [
            dict(iterations=1, bias=False, leaky=False, detach_inner=False, return_coupling=False),
            dict(iterations=3, bias=True, leaky=False, detach_inner=False, return_coupling=True),
            dict(iterations=3, bias=False, leaky=True, detach_inner=True, return_coupling=False),
            dict(iterations=2, bias=True, leaky=True, detach_inner=False, return_coupling=True),
            dict(iterations=3, bias=True, leaky=False, detach_inner=True, return_coupling=True),
        ]
    for prior, temperature in ((True, 1.0), (False, 0.5), (True, 2.0)):
        for iterations in (1, 3):
            combos.append(dict(iterations=iterations, bias=True, leaky=iterations == 3,
                               detach_inner=iterations == 3 and prior, return_coupling=True,
                               prior=prior, temperature=temperature))
    return combos


def _describe(opts: Dict[str, object]) -> str:
    return ",".join(f"{k}={v}" for k, v in opts.items())


def run_backend(backend: str, device: str, profile: str, log=print) -> Dict[str, object]:
    """Every case for one backend; returns counts, unsupported reasons and errors."""
    import torch

    import capsnet_ext

    summary: Dict[str, object] = dict(backend=backend, device=device, profile=profile, calls=0,
                                      unsupported={}, errors=[], nonfinite=[], status="pass")
    reason = capsnet_ext.unavailable_reason(backend, device)
    if reason is not None:
        summary.update(status="unavailable", reason=reason)
        return summary
    dev = torch.device(device)
    dtypes = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
              "bfloat16": torch.bfloat16}
    gen = torch.Generator().manual_seed(1234)

    def randn(*size, scale=1.0, dtype):
        return (torch.randn(*size, generator=gen, dtype=torch.float64) * scale).to(dev, dtype)

    def leaf(t):
        return t.detach().requires_grad_(True)

    def call(op: str, dtype_name: str, shape: Tuple[int, ...], opts: Dict[str, object]) -> None:
        if "lane_samples" in opts:
            from capsnet_ext.cuda_ops import tuning

            rest = {k: v for k, v in opts.items() if k != "lane_samples"}
            with tuning.forced(opts["lane_samples"]):
                return call(op, dtype_name, shape, rest)
        dtype = dtypes[dtype_name]
        B, I, J, Din, Dout = shape
        u = leaf(randn(B, I, Din, dtype=dtype))
        W = leaf(randn(I, J, Dout, Din, scale=0.5 / max(1.0, I ** 0.25), dtype=dtype))
        if op == "predict":
            inputs = [u, W]
            out = capsnet_ext.predict(u, W, backend=backend)
        else:
            kwargs = dict(leaky=opts["leaky"], detach_inner=opts["detach_inner"],
                          return_coupling=opts["return_coupling"], backend=backend)
            extra = []
            if opts["bias"]:
                kwargs["bias"] = leaf(randn(J, Dout, scale=0.1, dtype=dtype))
                extra.append(kwargs["bias"])
            if opts.get("prior"):
                kwargs["prior"] = leaf(randn(I, J, scale=0.3, dtype=dtype))
                extra.append(kwargs["prior"])
            if opts.get("temperature", 1.0) != 1.0:
                kwargs["temperature"] = opts["temperature"]
            if op == "dynamic_routing":
                with torch.no_grad():  # the backend's own predict: no cuBLAS kernel in the frame
                    u_hat = capsnet_ext.predict(u, W, backend=backend)
                inputs = [leaf(u_hat)] + extra
                out = capsnet_ext.dynamic_routing(inputs[0], opts["iterations"], **kwargs)
            else:
                inputs = [u, W] + extra
                out = capsnet_ext.capsule_routing(u, W, opts["iterations"], **kwargs)
        outs = list(out) if isinstance(out, tuple) else [out]
        v = outs[0]
        grads = torch.autograd.grad(v, inputs, torch.randn(v.shape, generator=gen).to(dev, v.dtype),
                                    allow_unused=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        for name, t in [("out", o) for o in outs] + [("grad", g) for g in grads if g is not None]:
            if not bool(torch.isfinite(t).all()):
                summary["nonfinite"].append(f"{op} {dtype_name} {shape} {_describe(opts)}: {name}")
                break

    cases = []
    for dtype_name in DTYPES[profile]:
        for shape in SHAPES[profile]:
            cases.append(("predict", dtype_name, shape, {}))
            for op in ("dynamic_routing", "capsule_routing"):
                for opts in option_grid(dtype_name, profile):
                    cases.append((op, dtype_name, shape, opts))
        if backend == "cuda" and dtype_name in ("float32", "bfloat16"):
            for op in ("dynamic_routing", "capsule_routing"):
                for opts in SPECIALISED_OPTIONS[:1 if profile in ("race", "tiny") else None]:
                    for lanes in (1, 2):
                        cases.append((op, dtype_name, SPECIALISED_SHAPE, dict(opts, lane_samples=lanes)))
    for op, dtype_name, shape, opts in cases:
        try:
            call(op, dtype_name, shape, opts)
            summary["calls"] += 1
        except NotImplementedError as exc:
            key = " ".join(str(exc).split())[:300]
            summary["unsupported"].setdefault(key, 0)
            summary["unsupported"][key] += 1
        except Exception as exc:  # noqa: BLE001 - recorded; the other cases still run
            summary["errors"].append(f"{op} {dtype_name} {shape} {_describe(opts)}: "
                                     + traceback.format_exception_only(type(exc), exc)[-1].strip()[:500])
            if len(summary["errors"]) >= 20:
                summary["errors"].append("stopped after 20 errors")
                break
    if summary["errors"] or summary["nonfinite"]:
        summary["status"] = "fail"
    summary["cases"] = len(cases)
    options_run = {k for _, _, _, o in cases for k, v in o.items()
                   if v is True or (k == "temperature" and v != 1.0)}
    summary["options_in_grid"] = sorted(options_run)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.sanitize_driver", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="cuda,triton", help="comma list of backend names")
    p.add_argument("--device", default="cuda")
    p.add_argument("--profile", choices=sorted(SHAPES), default="full",
                   help="full: 4 dtypes, 3 shapes, every option combination in float32; race: "
                        "float32, one shape, three option sets reaching every kernel (racecheck, "
                        "synccheck); light: "
                        "float32 and bfloat16, 2 shapes, a covering set of options (racecheck, "
                        "synccheck); tiny: for checking this driver on the CPU")
    p.add_argument("--out", default=None, help="JSON file for the per-backend summary")
    args = p.parse_args(argv)

    import torch

    results = []
    status = 0
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        started = time.perf_counter()
        print(f"{MARKER} begin backend={backend}", flush=True)
        try:
            summary = run_backend(backend, args.device, args.profile)
        except Exception as exc:  # noqa: BLE001 - e.g. the package does not import
            summary = dict(backend=backend, status="fail", errors=[traceback.format_exc()[-2000:]])
        if args.device.startswith("cuda") and torch.cuda.is_available():
            try:
                torch.cuda.synchronize()
            except Exception as exc:  # noqa: BLE001 - a sticky device error is itself a finding
                summary.setdefault("errors", []).append(f"synchronize after the calls: {exc}")
                summary["status"] = "fail"
            time.sleep(0.5)  # let the sanitizer print its reports of these kernels first
        summary["seconds"] = round(time.perf_counter() - started, 2)
        print(f"{MARKER} end backend={backend} status={summary['status']}", flush=True)
        print(json.dumps({k: summary.get(k) for k in ("backend", "status", "calls", "cases", "seconds")}),
              flush=True)
        for line in summary.get("errors", []) + summary.get("nonfinite", []):
            print(f"  {backend}: {line}", flush=True)
        for reason, count in (summary.get("unsupported") or {}).items():
            print(f"  {backend}: {count} case(s) unsupported: {reason}", flush=True)
        if summary["status"] != "pass":  # unavailable too: nothing of it was checked
            status = 1
        results.append(summary)
        if args.out:
            tmp = args.out + ".tmp"
            with open(tmp, "w") as f:
                json.dump(dict(profile=args.profile, device=args.device, backends=results), f, indent=1)
            os.replace(tmp, args.out)
    return status


if __name__ == "__main__":
    sys.exit(main())
