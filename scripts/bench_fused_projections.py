"""Same-input projections of a decode step: one XLA matmul each, or one on their weights concatenated
(a benchmark, not a test; it decides whether the model should hold fused projection weights).

    python -m scripts.bench_fused_projections [--tokens 1 32] [--reps 20] [--inner 10] [--busy]

At batch 1 a Flash-width step runs 35 attention-side GEMVs of 0.5-8 MB (q_a, kv, the compressor's and the
indexer's projections, all of the same normed input) at ~2 us each, 194 us against ~135 us of bytes, and
the shared expert's gate and up as two 16.8 MB GEMVs at ~66% of copy rate (GPU run 22, docs/performance.md).
Each case times its projections as separate matmuls and as one matmul on the concatenated weights (split
afterwards), with ``scripts.bench_kernels``' timers: the loop (``time_fn``: gaps between kernels included)
or, with ``--busy``, kernel execution from a profiler trace (run with command buffers off).
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax.basic import linear
from dsv4_jax.config import DeepseekV4Config


def cases(cfg: DeepseekV4Config) -> dict[str, list[int]]:
    """Output widths of the projections that read one input, per layer type (Flash sizes by default)."""
    q_a, kv, ic = cfg.q_lora_rank, cfg.head_dim, cfg.index_head_dim
    return {
        "swa_attention_input": [q_a, kv],
        "hca_attention_input": [q_a, kv, kv, kv],  # + the compressor's kv and gate (one entry of head_dim)
        "csa_attention_input": [q_a, kv, 2 * kv, 2 * kv, 2 * ic, 2 * ic, cfg.index_n_heads],  # overlap: 2x
        "shared_expert_gate_up": [cfg.moe_intermediate_size] * 2,
    }


def first_elements(ys) -> jax.Array:
    """Keeps every output whole (the barrier stops XLA from computing only the elements read), then
    returns one number that depends on each of them."""
    return sum(y[0, 0].astype(jnp.float32) for y in jax.lax.optimization_barrier(ys))


def separate(x, *ws):
    return first_elements([linear(x, w) for w in ws])


def fused(x, w_cat, *, widths):
    return first_elements(jnp.split(linear(x, w_cat), np.cumsum(widths)[:-1], axis=-1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 32])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--inner", type=int, default=10)
    p.add_argument("--busy", action="store_true", help="kernel execution time from a profiler trace")
    p.add_argument("--no-ceilings", action="store_true", help="skip measuring the card's copy rate (CPU)")
    args = p.parse_args(argv)
    from scripts.bench_kernels import busy_time_fn, time_fn
    from scripts.roofline import torch_ceilings

    cfg = DeepseekV4Config.flash()
    ceil = None if args.no_ceilings else torch_ceilings()
    timer = busy_time_fn if args.busy else time_fn
    print(json.dumps({"ceilings": ceil, "timing": "kernel_busy" if args.busy else "loop"}), flush=True)
    key = jax.random.PRNGKey(0)
    for name, widths in cases(cfg).items():
        ws = [(0.02 * jax.random.normal(jax.random.fold_in(key, i), (n, cfg.hidden_size))).astype(jnp.bfloat16)
              for i, n in enumerate(widths)]
        w_cat = jnp.concatenate(ws)
        for T in args.tokens:
            x = jax.random.normal(jax.random.fold_in(key, 99), (T, cfg.hidden_size), jnp.bfloat16)
            t_sep = timer(separate, [x, *ws], {}, args.reps, args.inner)
            t_fused = timer(fused, [x, w_cat], {"widths": widths}, args.reps, args.inner)
            row = {"case": name, "tokens": T, "widths": widths, "weight_mb": w_cat.nbytes / 1e6,
                   "separate_us": t_sep * 1e6, "fused_us": t_fused * 1e6, "speedup": t_sep / t_fused}
            if ceil:
                floor = w_cat.nbytes / (ceil["copy_2GB_TBps"] * 1e12)
                row.update(separate_pct_of_copy=100 * floor / t_sep, fused_pct_of_copy=100 * floor / t_fused)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
