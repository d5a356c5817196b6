"""Worker run in its own process with ``TRITON_INTERPRET=1``: executes a few programs of each
recorded Triton launch in Triton's CPU interpreter, counting how often each source line of
the kernel function runs per program and which argument buffers it loads from or stores to.

    TRITON_INTERPRET=1 python -m benchmarks.kernel_report.triton_profile jobs.json out.json

A job is one launch as recorded by :mod:`.triton_launches` (kernel module and name, grid,
arguments with shapes, strides and storage identities, constexprs) plus the program ids to
run. Buffers are rebuilt on the CPU with the recorded layout (views of one storage share it)
and filled with random numbers. The interpreter runs a program as block-level NumPy code,
one statement at a time, so a statement's count per program is what every warp of that
program executes on a GPU (Triton code has no per-thread control flow).
"""
from __future__ import annotations

import json
import os
import sys
import time


# ---------------------------------------------------------------------------------------------
# Statement counting: every @triton.jit function the interpreter rewrites gets a call before
# each statement that counts it under the chain of statement lines of the active jit frames
# ("270/177": line 177 of a helper called from the kernel's line 270), the way nvdisasm -gi
# attributes each instruction. This costs a dictionary update per statement, where a Python
# trace function would cost a callback per interpreter call (ten times slower).
# ---------------------------------------------------------------------------------------------
COUNTER = {"counts": None, "stack": []}
STATEMENT_OF_LINE: dict = {}  # file -> {physical line: line of the statement it belongs to}


def _kr_enter():
    COUNTER["stack"].append("0")


def _kr_exit():
    COUNTER["stack"].pop()


def _kr_hit(line):
    stack = COUNTER["stack"]
    stack[-1] = line
    counts = COUNTER["counts"]
    if counts is not None:
        key = "/".join(stack)
        counts[key] = counts.get(key, 0) + 1


def _instrument(tree, filename):
    import ast

    lines = STATEMENT_OF_LINE.setdefault(filename, {})

    def hit(line):
        return ast.Expr(ast.Call(func=ast.Name(id="_kr_hit", ctx=ast.Load()),
                                 args=[ast.Constant(str(line))], keywords=[]))

    def walk(stmts):
        out = []
        for stmt in stmts:
            header_end = stmt.end_lineno
            for field in ("body", "orelse", "finalbody", "handlers"):
                inner = getattr(stmt, field, None)
                if isinstance(inner, list) and inner and isinstance(inner[0], ast.AST):
                    header_end = min(header_end, inner[0].lineno - 1)
                    if field == "handlers":
                        for handler in inner:
                            handler.body = walk(handler.body)
                    else:
                        setattr(stmt, field, walk(inner))
            for line in range(stmt.lineno, max(stmt.lineno, header_end) + 1):
                lines.setdefault(line, stmt.lineno)
            out.extend([hit(stmt.lineno), stmt])
        return out

    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            body = walk(node.body)
            enter = ast.Expr(ast.Call(func=ast.Name(id="_kr_enter", ctx=ast.Load()), args=[], keywords=[]))
            leave = ast.Expr(ast.Call(func=ast.Name(id="_kr_exit", ctx=ast.Load()), args=[], keywords=[]))
            node.body = [enter, ast.Try(body=body, handlers=[], orelse=[], finalbody=[leave])]
    ast.fix_missing_locations(tree)
    return tree


def _install_counting():
    from triton.runtime import interpreter

    original = interpreter.FunctionRewriter._transform_ast

    def transform(self, src):
        tree = original(self, src)
        self.fn.__globals__.update(_kr_hit=_kr_hit, _kr_enter=_kr_enter, _kr_exit=_kr_exit)
        return _instrument(tree, os.path.realpath(self.filename))

    interpreter.FunctionRewriter._transform_ast = transform


def run_job(job: dict) -> dict:
    import importlib

    import torch
    import triton.language as tl
    from triton.runtime import interpreter

    module = importlib.import_module(job["module"])
    kernel = getattr(module, job["name"])
    raw_fn = kernel.fn
    source_file = os.path.realpath(raw_fn.__code__.co_filename)
    gen = torch.Generator().manual_seed(0)

    storages = {}
    args = []
    for spec in job["args"]:
        if spec["kind"] == "tensor":
            dtype = getattr(torch, spec["dtype"])
            sid = spec["storage_id"]
            if sid not in storages:
                itemsize = torch.empty((), dtype=dtype).element_size()
                n = max(1, spec["storage_bytes"] // itemsize)
                base = torch.randn(n, generator=gen, dtype=torch.float64)
                storages[sid] = (base.to(dtype) if dtype.is_floating_point else base.abs().to(dtype))
            base = storages[sid]
            if base.dtype != dtype:
                base = base.view(dtype)
            args.append(base.as_strided(spec["shape"], spec["stride"], spec["storage_offset"]))
        elif spec["kind"] == "constexpr":
            value = spec["value"]
            if isinstance(value, dict) and "triton_dtype" in value:
                value = tl.dtype(value["triton_dtype"])
            args.append(value)
        elif spec["kind"] == "none":
            args.append(None)
        else:
            args.append(spec["value"])
    # Byte ranges of the tensor arguments' views: a load or store is attributed to every
    # argument whose view it falls in.
    ranges = []
    for index, (spec, t) in enumerate(zip(job["args"], args)):
        if spec["kind"] == "tensor" and t.numel() > 0:
            span = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))
            start = t.data_ptr()
            ranges.append((start, start + span * t.element_size(), index))
    accessed = {}

    def mark(ptrs, mask, how):
        data = ptrs.data[mask.data] if mask is not None else ptrs.data
        if data.size == 0:
            return
        lo, hi = int(data.min()), int(data.max())
        for start, end, index in ranges:
            if lo < end and hi >= start:
                accessed.setdefault(index, set()).add(how)

    builder = interpreter.interpreter_builder
    original_load, original_store = builder.create_masked_load, builder.create_masked_store

    # The builder's signatures differ between Triton releases (3.6 passes the cache modifier
    # and eviction policy apart, 3.9 one cache policy): only the leading arguments are read.
    def load(ptrs, mask, *rest):
        mark(ptrs, mask, "r")
        return original_load(ptrs, mask, *rest)

    def store(ptrs, value, mask, *rest):
        mark(ptrs, mask, "w")
        return original_store(ptrs, value, mask, *rest)

    samples = {tuple(p) for p in job["samples"]}
    counts_by_program = {}
    current = COUNTER

    rewritten = kernel.rewrite()

    def sampled(**kwargs):
        idx = tuple(builder.grid_idx)
        if idx not in samples:
            return None
        current["counts"] = counts_by_program.setdefault(idx, {})
        try:
            return rewritten(**kwargs)
        finally:
            current["counts"] = None

    import inspect
    import types

    # The interpreter looks up triton.language in the function's globals: the wrapper takes
    # the kernel's.
    sampled = types.FunctionType(sampled.__code__, rewritten.__globals__, rewritten.__name__,
                                 None, sampled.__closure__)
    sampled.__signature__ = inspect.signature(rewritten)
    sampled.__annotations__ = dict(getattr(rewritten, "__annotations__", {}))
    name = raw_fn.__name__

    cache = type(kernel).rewritten_fn
    previous = cache.get(raw_fn)
    cache[raw_fn] = sampled
    builder.create_masked_load, builder.create_masked_store = load, store
    start = time.time()
    try:
        kernel[tuple(job["grid"])](*args, num_warps=job["num_warps"])
    finally:
        builder.create_masked_load, builder.create_masked_store = original_load, original_store
        if previous is None:
            cache.pop(raw_fn, None)
        else:
            cache[raw_fn] = previous
    programs = list(counts_by_program.values())
    mean = {}
    for c in programs:
        for chain, n in c.items():
            mean[chain] = mean.get(chain, 0.0) + n / max(1, len(programs))
    return dict(source_file=source_file, programs_run=len(programs), line_counts=mean,
                statement_of_line=STATEMENT_OF_LINE,
                accessed={str(k): "".join(sorted(v)) for k, v in accessed.items()},
                seconds=time.time() - start)


def main(argv) -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1: this worker runs kernels in Triton's interpreter", file=sys.stderr)
        return 2
    jobs = json.load(open(argv[0]))
    _install_counting()
    results = {}
    for key, job in jobs.items():
        try:
            results[key] = run_job(job)
        except Exception as exc:  # one kernel that cannot be profiled must not lose the rest
            results[key] = dict(error=f"{type(exc).__name__}: {str(exc)[:500]}")
    with open(argv[1], "w") as handle:
        json.dump(results, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
