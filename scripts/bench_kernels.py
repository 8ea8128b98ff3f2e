"""Benchmark the Pallas kernels against their plain-JAX references (a benchmark, not a test).

    python -m scripts.bench_kernels
        [--only sparse_attention indexer topk compressor hc_pre grouped_matmul grouped_gemv expert_rows fp8_linear
                fp8_gemm]
        [--cases decode_B128] [--configs '[{}, {"block_h": 64, "num_warps": 8}]'] [--reps 50]

Each kernel's cases (scripts/kernel_cases.py ``bench_cases``) give inputs, the minimal HBM bytes and the FLOPs. Both
implementations are timed the same way: the median of ``--reps`` runs of one jitted loop of ``--inner``
dependent calls, after a warm-up (device time: the host dispatches once per loop; see ``time_fn``), or with
``--busy`` the kernels' own execution time from a profiler trace of those loops (``busy_time_fn``). The roofline uses
the copy bandwidth and the bf16 (or, for a case whose ``matmul`` is "fp8", the FP8) matmul rate measured in the
same run (scripts/roofline.py); the reference and a case's ``baselines`` (other implementations, e.g. bf16
weights for the FP8 linear) are reported as bytes/s and % of the copy rate on their own bytes, and a baseline
with ``flops`` (a bf16 matmul) as TFLOP/s and % of its own roofline too. Prints one
JSON object per case and kernel configuration: ``--configs`` (a JSON list of the kernel's ``TuningConfig``
fields, unset fields at the case's choice, ``{}`` = the kernel's own per-shape choice) sweeps block
sizes and warps in one run; ``--cases`` keeps the cases whose name contains one of the given strings.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from jax import lax

MODULES = ("sparse_attention", "indexer", "topk", "compressor", "hc_pre", "grouped_matmul", "grouped_gemv",
           "expert_rows", "fp8_linear", "fp8_gemm")
MATMUL_CEILINGS = {"bf16": "bf16_matmul_8192_TFLOPs", "fp8": "fp8_matmul_8192_TFLOPs"}


def dependent_loop(fn, args, kwargs, inner: int):
    """A jitted function of ``args`` running ``inner`` dependent calls of ``fn``, compiled and run once.

    Each call's first output element, times 0.0, is added into one element of the smallest floating input
    of the next call: the calls cannot be merged, reordered or dropped by XLA, the extra work is one
    element (plus one copy of that input into the loop per run), and the host dispatches once per loop.
    """
    floats = [i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating)]
    dep = min(floats, key=lambda i: args[i].size)

    def chain(*a):
        def body(_, x):
            out = fn(*a[:dep], x, *a[dep + 1:], **kwargs)
            first = jax.tree.leaves(out)[0].reshape(-1)[0].astype(jnp.float32) * 0.0
            return x.at[(0,) * x.ndim].add(first.astype(x.dtype))
        return lax.fori_loop(0, inner, body, a[dep])

    f = jax.jit(chain)
    jax.block_until_ready(f(*args))
    return f


def time_fn(fn, args, kwargs, reps: int, inner: int) -> float:
    """Median seconds per call over ``reps`` runs of ``dependent_loop``: device time, not dispatch (a host
    timer around single calls of a ~50 us kernel measures the dispatch), but including the gaps between
    kernels (launch latency, the loop's per-iteration overhead)."""
    f = dependent_loop(fn, args, kwargs, inner)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def busy_time_fn(fn, args, kwargs, reps: int, inner: int) -> float:
    """Seconds of GPU kernel execution per call, from a profiler trace of ``reps`` runs of ``dependent_loop``:
    the sum of every kernel's duration (the call's kernels plus the one-element dependency update), without
    the gaps between kernels, which dominate the loop time of kernels under ~20 us. Run with command buffers
    off (``XLA_FLAGS=--xla_gpu_enable_command_buffer=``): kernels replayed from a CUDA graph carry no HLO
    name in the trace."""
    import tempfile

    from scripts.profile_breakdown import device_op_times

    f = dependent_loop(fn, args, kwargs, inner)
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for _ in range(reps):
            jax.block_until_ready(f(*args))
        jax.profiler.stop_trace()
        per_op, launches = device_op_times(d)
    if not launches:
        raise RuntimeError("the trace holds no kernel with an HLO name (command buffers on?)")
    return sum(per_op.values()) / 1e9 / (reps * inner)


def rates(prefix: str, nbytes: int, seconds: float, bw: float, flops: float = 0, mm: float = 0) -> dict:
    """``{prefix}TBps`` and ``{prefix}pct_of_copy``: ``nbytes`` in ``seconds`` against the copy rate ``bw`` (B/s);
    with ``flops`` also ``{prefix}TFLOPs`` and ``{prefix}pct_of_roofline``: the larger of the copy time and the
    matmul time at ``mm`` FLOP/s, over ``seconds``."""
    out = {f"{prefix}TBps": nbytes / seconds / 1e12, f"{prefix}pct_of_copy": 100 * nbytes / bw / seconds}
    if flops:
        out.update({f"{prefix}TFLOPs": flops / seconds / 1e12,
                    f"{prefix}pct_of_roofline": 100 * max(nbytes / bw, flops / mm) / seconds})
    return out


def tuning_kwargs(kernel: str, case: dict, config: dict) -> dict:
    """One ``--configs`` entry -> the Pallas function's keywords: ``tuning=`` the case's ``tuning`` (else the
    module's ``TuningConfig()``) with the entry's fields replaced; ``{}``: none, the kernel's own choice."""
    if not config:
        return {}
    base = case.get("tuning") or importlib.import_module(f"kernels_pallas.{kernel}").TuningConfig()
    return {"tuning": dataclasses.replace(base, **config)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", default=list(MODULES))
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--inner", type=int, default=10)
    p.add_argument("--cases", nargs="*", default=None, help="substrings of the case names to run")
    p.add_argument("--configs", type=json.loads, default=[{}], help="JSON list of TuningConfig field sets")
    p.add_argument("--busy", action="store_true",
                   help="time kernel execution from a profiler trace instead of the loop (busy_time_fn)")
    args = p.parse_args(argv)
    sys.path.insert(0, ".")
    from scripts.kernel_cases import bench_cases
    from scripts.roofline import torch_ceilings

    ceil = torch_ceilings()
    timer = busy_time_fn if args.busy else time_fn
    bw, mm_bf16 = ceil["copy_2GB_TBps"] * 1e12, ceil[MATMUL_CEILINGS["bf16"]] * 1e12
    print(json.dumps({"roofline": ceil}), flush=True)
    for name in args.only:
        for case in bench_cases(name):
            if args.cases and not any(c in case["name"] for c in args.cases):
                continue
            inputs = case["args"](jax.random.PRNGKey(0))
            mm = ceil[MATMUL_CEILINGS[case.get("matmul", "bf16")]] * 1e12
            base = {"kernel": name, "case": case["name"], "shapes": case["shapes"], "device": ceil["device"],
                    "timing": "kernel_busy" if args.busy else "loop"}
            try:
                t_ref = timer(case["reference"], inputs, case.get("kwargs", {}), args.reps, args.inner)
                base.update({"reference_us": t_ref * 1e6, **rates("reference_", case["bytes"], t_ref, bw)})
            except Exception as e:  # the reference may not fit (e.g. materialised per-head scores)
                t_ref = None
                base["reference_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            for b in case.get("baselines", []):
                try:
                    t_b = timer(b["fn"], b["args"](jax.random.PRNGKey(0)), b.get("kwargs", {}), args.reps, args.inner)
                except Exception as e:  # e.g. a weight-only kernel's configuration at prefill rows
                    base[f"{b['name']}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                    continue
                base.update({f"{b['name']}_us": t_b * 1e6,
                             **rates(f"{b['name']}_", b["bytes"], t_b, bw, b.get("flops", 0), mm_bf16)})
            for config in args.configs:
                row = {**base, "config": config}
                try:
                    kwargs = {**case.get("kwargs", {}), **tuning_kwargs(name, case, config)}
                    t = timer(case["pallas"], inputs, kwargs, args.reps, args.inner)
                except Exception as e:  # a configuration may not compile (shared memory, registers)
                    row["pallas_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                    print(json.dumps(row), flush=True)
                    continue
                floor_bw = case["bytes"] / bw
                floor_mm = case.get("flops", 0) / mm
                row.update({
                    "pallas_us": t * 1e6,
                    **rates("achieved_", case["bytes"], t, bw),
                    "achieved_TFLOPs": case.get("flops", 0) / t / 1e12,
                    "roofline_bound": "memory" if floor_bw >= floor_mm else "matmul",
                    "pct_of_roofline": 100 * max(floor_bw, floor_mm) / t,
                    "speedup_vs_reference": (t_ref / t) if t_ref else None,
                })
                print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
