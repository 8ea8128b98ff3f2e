"""Pipeline stages on several GPUs: same tokens as one GPU, and throughput per stage count (a benchmark).

    python -m scripts.bench_pipeline --pp 1 2 4 --experts 64 --batch 8 --context 1024

1. Correctness (fp32 weights, full-precision matmuls): greedy tokens of ``PipelineEngine`` at each pp equal
   the unpipelined ``Engine`` on one GPU, and the prefill logits agree; printed as one JSON row per pp.
2. Throughput (bf16 weights): prefill tokens/s and decode tokens/s per pp with ``microbatches`` GPipe
   microbatches, timed over whole generate calls after a warm-up (host timer around many device steps).
   GPipe leaves a bubble of (pp - 1) / (M + pp - 1) of each stage's time idle; the measured stage
   utilisation is T(pp=1) / (pp * T(pp)), and 1 - utilisation is the measured bubble (plus hand-off cost).

The model is a Flash-width slice (hidden 4096, 64 heads x 512, the released layer schedule) with
``--experts`` routed experts so that pp = 1 fits one GPU next to its host-staged copy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax.runtime.engine import Engine
from dsv4_jax.runtime.engine import PipelineEngine
from dsv4_jax.weights.random_init import random_model
from dsv4_jax.runtime.sampling import SamplingParams
from scripts.bench_generate import make_config

GREEDY = SamplingParams(temperature=0.0)
_START = time.perf_counter()


def progress(phase: str, **fields) -> None:
    """A JSON line per finished phase: a run stopped by its time limit shows how far it got (a 2-GPU run
    on 2026-11-29 printed nothing in 320 s)."""
    print(json.dumps({"progress": phase, "elapsed_s": round(time.perf_counter() - _START, 1), **fields}), flush=True)


def engine_for(model, pp: int, capacity: int, chunk: int, microbatches: int | None):
    if pp == 1:
        return Engine(model, capacity=capacity, prefill_chunk=chunk)
    return PipelineEngine(model, pp=pp, capacity=capacity, prefill_chunk=chunk, microbatches=microbatches)


def prompts(cfg, batch: int, context: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.RandomState(seed)
    # Ragged lengths: the pipeline must handle rows of different lengths like the single-device engine.
    return [list(rng.randint(3, cfg.vocab_size, context - 7 * b)) for b in range(batch)]


def check_tokens(cfg, pps, batch, context, new_tokens, chunk) -> None:
    # fp32 at full matmul precision: on GPUs XLA's default fp32 dot is TF32, whose rounding differs
    # between differently fused programs and, through top-k routing, flips tokens of random weights.
    with jax.default_matmul_precision("highest"):
        _check_tokens(cfg, pps, batch, context, new_tokens, chunk)


def _check_tokens(cfg, pps, batch, context, new_tokens, chunk) -> None:
    model = random_model(cfg, jnp.float32, seed=1)
    progress("check: fp32 model built")
    ps = prompts(cfg, batch, context)
    ref_engine = engine_for(model, 1, context + new_tokens, chunk, None)
    want = [r.tokens for r in ref_engine.generate(ps, new_tokens, GREEDY)]
    progress("check: pp=1 generated")
    want_logits, _, _ = ref_engine.prefill(ps)
    progress("check: pp=1 prefill logits")
    for pp in pps:
        if pp == 1:
            continue
        eng = engine_for(model, pp, context + new_tokens, chunk, None)
        got = [r.tokens for r in eng.generate(ps, new_tokens, GREEDY)]
        progress("check: generated", pp=pp)
        logits, _, _ = eng.prefill(ps)
        err = float(jnp.max(jnp.abs(logits - want_logits)) / jnp.max(jnp.abs(want_logits)))
        print(json.dumps({"check": "tokens_vs_1_gpu", "dtype": "float32", "pp": pp, "batch": batch,
                          "context": context, "new_tokens": new_tokens, "tokens_equal": got == want,
                          "prefill_logits_max_rel_err": err}), flush=True)
        del eng


def throughput(cfg, pps, batch, context, new_tokens, chunk, microbatches) -> None:
    model = random_model(cfg, jnp.bfloat16, seed=2)
    progress("throughput: bf16 model built")
    ps = prompts(cfg, batch, context)
    base = None
    for pp in pps:
        eng = engine_for(model, pp, context + new_tokens, chunk, microbatches)
        eng.generate(ps, new_tokens, GREEDY)  # compile prefill + decode
        progress("throughput: compiled", pp=pp)
        t0 = time.perf_counter()
        _, cache, _ = eng.prefill(ps)
        jax.block_until_ready(cache)
        prefill_s = time.perf_counter() - t0
        del cache
        eng.generate(ps, new_tokens, GREEDY)
        decode_s = eng.stats.decode_seconds
        step_s = decode_s / (new_tokens - 1)  # the first token comes from the prefill's logits
        M = 1 if pp == 1 else eng.layout(batch)[0]
        row = {"bench": "pipeline", "pp": pp, "microbatches": M, "batch": batch, "context": context,
               "experts": cfg.n_routed_experts, "layers": cfg.num_hidden_layers, "device": jax.devices()[0].device_kind,
               "prefill_tokens_per_s": sum(map(len, ps)) / prefill_s, "decode_ms_per_step": step_s * 1e3,
               "decode_tokens_per_s": batch / step_s, "gpipe_bubble_theory": (pp - 1) / (M + pp - 1)}
        if pp == 1:
            base = (prefill_s, step_s)
        elif base is not None:
            row["decode_stage_utilisation"] = base[1] / (pp * step_s)
            row["prefill_stage_utilisation"] = base[0] / (pp * prefill_s)
        print(json.dumps(row), flush=True)
        del eng


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pp", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--model", default="flash-slice", help="flash-slice | demo (a CPU smoke run)")
    p.add_argument("--layers", default="SWA,SWA,CSA,HCA,CSA,HCA")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prefill-chunk", type=int, default=256)
    p.add_argument("--microbatches", type=int, default=None)
    p.add_argument("--skip-check", action="store_true")
    args = p.parse_args(argv)
    if max(args.pp) > len(jax.devices()):
        print(f"error: --pp {max(args.pp)} needs that many devices; {len(jax.devices())} visible", file=sys.stderr)
        return 2
    cfg = make_config(args.model, args.layers, args.experts)
    if not args.skip_check:
        check_tokens(cfg, args.pp, min(args.batch, 4), min(args.context, 512), 16, args.prefill_chunk)
    throughput(cfg, args.pp, args.batch, args.context, args.new_tokens, args.prefill_chunk, args.microbatches)
    return 0


if __name__ == "__main__":
    sys.exit(main())
