"""Compile the engine's chunk step for an H100 on a host without a GPU: XLA's whole GPU pipeline (fusion, the
Pallas Triton kernels, scheduling; no autotuning, which needs the device) on abstract weights, so no memory for
them either. Needs JAX's CUDA plugin (``pip install -e '.[aot]'``). A measurement, not a test: the compile time,
the optimized HLO's size and the kernels it launches per step, one JSON object per line.

    python -m scripts.compile_for_h100 --model flash-slice --layers SWA,CSA,HCA --experts 64 --batch 4 \
        --tokens 2300 1 --kernels xla pallas --hlo-dir /tmp/hlo

Steps with a Mosaic GPU kernel (the bf16 prefill's grouped matmul) need an attached GPU to lower: such a step
prints an error line. The compile time is the GPU machine's minus autotuning. On a 2-core CPU host it showed
the XLA path's decode step compiling for 162 s (31 s after the fix) while its Sinkhorn sat inside the mHC
expand's fusion (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

# The compile-only device needs no backend of its own; on a host without a GPU the CUDA plugin's initialisation
# fails unless JAX is kept to the CPU, and JAX then drops the plugin.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dsv4_jax.model.cache import init_cache  # noqa: E402
from dsv4_jax.weights.params import abstract_model  # noqa: E402
from dsv4_jax.runtime.engine import DeviceSteps, split_weights  # noqa: E402
from kernels_pallas.testing import abstract_h100, h100_compile_only_sharding  # noqa: E402
from scripts.bench_generate import make_config  # noqa: E402


def compiled_step_hlo(cfg, dtype, B: int, T: int, capacity: int, kernels: str, h100) -> tuple[str, float]:
    """The chunk step (T new tokens per row, last-token logits) compiled for the compile-only device ``h100``
    (``h100_compile_only_sharding()``) -> (optimized HLO text, compile seconds)."""
    on_h100 = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=h100)
    graphdef, state_def, weights = split_weights(abstract_model(cfg, dtype))
    cache = jax.tree.map(on_h100, jax.eval_shape(lambda: init_cache(cfg, B, capacity, dtype)))
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=h100)
    with abstract_h100():  # the model's Pallas kernels lower for Triton, not in interpret as on the host's CPU
        lowered = DeviceSteps(graphdef, state_def, capacity).chunk.lower(
            [on_h100(w) for w in weights], cache, ints(B, T), ints(B), ints(B), last_only=True, kernels=kernels)
    t0 = time.perf_counter()
    compiled = lowered.compile()
    return compiled.as_text(), time.perf_counter() - t0


def entry_kernels(hlo: str) -> int:
    """The kernels a compiled step launches (before autotuning): fusions and custom calls of its entry
    computation, the count docs/performance.md gives per batch-1 decode step."""
    return len(re.findall(r"= .*(?:fusion|custom-call)\(", hlo[hlo.index("\nENTRY"):]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="flash-slice", help="flash-slice | demo")
    p.add_argument("--layers", default="SWA,CSA,HCA", help="flash-slice layer types, comma-separated")
    p.add_argument("--experts", type=int, default=None, help="routed experts (default: the model's)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, nargs="+", default=[1], help="new tokens per row per step (1: decode)")
    p.add_argument("--capacity", type=int, default=None, help="cache capacity (default: max tokens + 100)")
    p.add_argument("--kernels", nargs="+", default=["xla", "pallas"], choices=("xla", "pallas"))
    p.add_argument("--hlo-dir", default=None, help="write each step's optimized HLO there")
    args = p.parse_args(argv)
    h100 = h100_compile_only_sharding()
    if h100 is None:
        print("error: no CUDA plugin for JAX; install it with pip install -e '.[aot]'", file=sys.stderr)
        return 2
    cfg = make_config(args.model, args.layers, args.experts)
    capacity = args.capacity or max(args.tokens) + 100
    for kernels in args.kernels:
        for T in args.tokens:
            name = f"{args.model}_{kernels}_b{args.batch}_t{T}"
            try:
                hlo, seconds = compiled_step_hlo(cfg, jnp.dtype(args.dtype), args.batch, T, capacity, kernels, h100)
            except RuntimeError as e:
                if "Unknown backend" not in str(e):
                    raise
                print(json.dumps({"step": name, "dtype": args.dtype, "error": "a Mosaic GPU kernel (the bf16 prefill's "
                                  "grouped matmul) lowers only with a GPU attached"}), flush=True)
                continue
            if args.hlo_dir:
                os.makedirs(args.hlo_dir, exist_ok=True)
                with open(os.path.join(args.hlo_dir, name + ".hlo"), "w") as f:
                    f.write(hlo)
            print(json.dumps({"step": name, "dtype": args.dtype, "compile_s": round(seconds, 1),
                              "hlo_lines": hlo.count("\n"), "fusions": hlo.count(" fusion("),
                              "entry_kernels": entry_kernels(hlo)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
