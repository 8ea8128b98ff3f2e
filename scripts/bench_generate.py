"""Benchmark prefill and decode throughput of the engine's jitted steps (a benchmark, not a test).

    python scripts/bench_generate.py --model demo --batch 1 --context 256
    python scripts/bench_generate.py --model flash-slice --layers SWA,CSA,HCA --batch 1 8 --context 4096

Weights are random (bf16 by default), generated on the device in one jitted call per tensor.
Prefill: the whole context in chunks, timed after a warm-up pass (compilation excluded).
Decode: after the prefill, ``--decode-steps`` jitted decode steps (sampling included) issued back to back
and timed until the last result is ready; tokens/s = batch / step time. Prints one JSON object per case.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv4_jax.cache import init_cache
from dsv4_jax.config import CSA, HASH_MOE, HCA, MOE, SLIDING, DeepseekV4Config
from dsv4_jax.demo import demo_config
from dsv4_jax.engine import _chunk_step, _decode_step
from dsv4_jax.random_weights import random_model

LAYER_NAMES = {"SWA": SLIDING, "CSA": CSA, "HCA": HCA}


def make_config(name: str, layers: str, experts: int | None) -> DeepseekV4Config:
    if name == "demo":
        cfg = demo_config()
    elif name == "flash-slice":
        types = tuple(LAYER_NAMES[t] for t in layers.split(","))
        cfg = DeepseekV4Config.flash(num_hidden_layers=len(types), layer_types=types,
                                     mlp_layer_types=tuple(HASH_MOE if i == 0 else MOE for i in range(len(types))))
    else:
        raise SystemExit(f"unknown --model {name!r}; expected demo or flash-slice")
    if experts:
        cfg = dataclasses.replace(cfg, n_routed_experts=experts)
    return cfg


def bench(model, batch: int, context: int, chunk: int, decode_steps: int, kernels: str = "xla") -> dict:
    cfg, dtype = model.config, model.dtype
    graphdef, state = nnx.split(model)
    capacity = context + decode_steps + 1
    rng = np.random.RandomState(0)
    prompt = rng.randint(0, cfg.vocab_size, (batch, context)).astype(np.int32)

    def prefill():
        cache = init_cache(cfg, batch, capacity, dtype)
        for pos in range(0, context, chunk):
            n = min(chunk, context - pos)
            ids = np.zeros((batch, chunk), np.int32)
            ids[:, :n] = prompt[:, pos:pos + n]
            logits, cache = _chunk_step(graphdef, state, cache, jnp.asarray(ids), jnp.full((batch,), pos, jnp.int32),
                                        jnp.full((batch,), n, jnp.int32), capacity=capacity, last_only=True,
                                        kernels=kernels)
        return jax.block_until_ready((logits, cache))

    prefill()  # compile
    t0 = time.perf_counter()
    _, cache = prefill()
    prefill_s = time.perf_counter() - t0

    params = (jnp.float32(0.0), jnp.int32(0), jnp.float32(1.0))
    key = jax.random.PRNGKey(0)
    tokens = jnp.zeros((batch, 1), jnp.int32)
    active = jnp.ones((batch,), bool)

    def decode(cache, n, start):
        nonlocal tokens
        for i in range(n):
            nxt, cache = _decode_step(graphdef, state, cache, tokens, jnp.full((batch,), start + i, jnp.int32),
                                      active, key, *params, capacity=capacity, kernels=kernels)
            tokens = nxt[:, None]
        return jax.block_until_ready(cache)

    cache = decode(cache, 1, context)  # compile
    t0 = time.perf_counter()
    decode(cache, decode_steps, context + 1)
    step_s = (time.perf_counter() - t0) / decode_steps
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    return {
        "device": dev.device_kind, "layers": ",".join(cfg.layer_types), "experts": cfg.n_routed_experts,
        "hidden": cfg.hidden_size, "dtype": str(jnp.dtype(dtype)), "kernels": kernels, "batch": batch, "context": context,
        "prefill_chunk": chunk, "prefill_tokens_per_s": batch * context / prefill_s,
        "decode_ms_per_step": step_s * 1e3, "decode_tokens_per_s": batch / step_s,
        "peak_memory_gb": stats.get("peak_bytes_in_use", 0) / 1e9,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", help="demo | flash-slice")
    p.add_argument("--layers", default="SWA,CSA,HCA", help="flash-slice layer schedule, e.g. SWA,SWA,CSA,HCA")
    p.add_argument("--experts", type=int, default=None, help="override the routed expert count")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--context", type=int, nargs="+", default=[256])
    p.add_argument("--prefill-chunk", type=int, default=256)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--kernels", nargs="+", default=["xla"], choices=("xla", "pallas"))
    args = p.parse_args(argv)
    cfg = make_config(args.model, args.layers, args.experts)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    model = random_model(cfg, dtype)
    for b in args.batch:
        for ctx in args.context:
            for kernels in args.kernels:
                try:
                    row = bench(model, b, ctx, min(args.prefill_chunk, ctx), args.decode_steps, kernels)
                except Exception as e:  # out of memory at large shapes: record it and go on
                    row = {"batch": b, "context": ctx, "kernels": kernels,
                           "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
