"""Benchmark prefill and decode of the engine's jitted steps, against the roofline (a benchmark, not a test).

    python -m scripts.bench_generate --model demo --batch 1 --context 256
    python -m scripts.bench_generate --model flash-slice --batch 1 8 32 128 --context 4096 32768 131072 \
        --prefill 4096 32768 --kernels xla pallas --profile 1,4096 32,32768

Weights are random (bf16 by default), generated on the device in one jitted call per tensor.
Prefill (batch 1, ``--prefill`` lengths): the whole prompt in chunks of ``--prefill-chunk`` tokens (default:
the engine's), timed after a warm-up pass (compilation excluded); against the bf16 matmul rate
(scripts/roofline.py prefill_flops).
Decode (``--batch`` x ``--context``): caches filled with random entries as if ``context`` tokens had been
processed (a decode step's cost depends on the cache's size, not its values, and a real prefill of
128 x 128K tokens would take hours), then ``--decode-steps`` jitted decode steps (sampling included)
issued back to back and timed until the last result is ready; median of 3 such groups. Each row has the
bytes the step must read (scripts/roofline.py decode_step_bytes) over the copy bandwidth measured in
the same run, and the host time one step's call takes to return (``host_dispatch_ms``: a step is
dispatch-bound when that exceeds its device time). ``--engine-cases B,PROMPT``: ``Engine.generate`` end
to end (a real prefill, then 64 greedy tokens read back step by step, as a user runs it).
``--xla-options`` (a JSON list of XLA option sets, each decode case compiled once per set) with ``--rounds``
compares compiler settings in one process, alternating (separate processes on one machine differed by up to
7%: docs/performance.md); ``--hlo-dir`` keeps each decode case's optimized HLO. ``--profile B,CTX``: a
device-time breakdown of that decode case by layer type and part, with the kernel launches per step
(scripts/profile_breakdown.py; run with ``XLA_FLAGS=--xla_gpu_enable_command_buffer=`` so the trace names HLO
instructions). Prints one JSON object per case.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import statistics
import sys
import time
import weakref

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax.model.cache import init_cache
from dsv4_jax.model.config import CSA, HASH_MOE, HCA, MOE, SLIDING, DeepseekV4Config
from dsv4_jax.runtime.demo import demo_config
from dsv4_jax.runtime.engine import DeviceSteps, default_prefill_chunk, split_weights
from dsv4_jax.runtime.mesh import ShardedStep, make_mesh, place_weights, weight_specs
from dsv4_jax.weights.random_init import random_model, released_model
from dsv4_jax.runtime.sampling import SamplingParams, sampling_args
from scripts import roofline

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


def mesh_weights(model) -> tuple:
    """``place_weights`` of ``model`` on a 1-device mesh, sharing its buffers (the same layout on the same device):
    the mesh path holds no second copy of the weights, which the full slice (~81 GB in bf16) could not hold
    twice on one card. A copy would be a transfer, which the guard turns into an error."""
    with jax.transfer_guard("disallow_explicit"):
        return place_weights(model, make_mesh())


def device_steps(model, capacity: int, path: str):
    """(DeviceSteps, weights, new_cache(batch)) of the engine's ``path``: "plain" (one device, today's step) or
    "mesh" (the sharded step on a 1-device mesh, runtime/mesh.py), so the two are timed side by side."""
    if path == "plain":
        graphdef, state_def, weights = split_weights(model)
        return (DeviceSteps(graphdef, state_def, capacity), weights,
                lambda batch: init_cache(model.config, batch, capacity, model.dtype))
    graphdef, state_def, weights = mesh_weights(model)
    sharded = ShardedStep(model.config, graphdef, state_def, weight_specs(weights), make_mesh(), capacity,
                          model.dtype)
    return DeviceSteps(graphdef, state_def, capacity, sharded=sharded), weights, sharded.new_cache


def prefill_case(model, context: int, chunk: int, kernels: str, path: str = "plain") -> dict:
    cfg = model.config
    steps, weights, new_cache = device_steps(model, context, path)
    chunk_step = steps.chunk
    prompt = np.random.RandomState(0).randint(0, cfg.vocab_size, (1, context)).astype(np.int32)

    def prefill():
        cache = new_cache(1)
        for pos in range(0, context, chunk):
            n = min(chunk, context - pos)
            ids = np.zeros((1, chunk), np.int32)
            ids[:, :n] = prompt[:, pos:pos + n]
            logits, cache = chunk_step(weights, cache, jnp.asarray(ids), jnp.full((1,), pos, jnp.int32),
                                       jnp.full((1,), n, jnp.int32), last_only=True, kernels=kernels)
        return jax.block_until_ready((logits, cache))

    prefill()  # compile
    t0 = time.perf_counter()
    prefill()
    seconds = time.perf_counter() - t0
    return {"phase": "prefill", "batch": 1, "context": context, "prefill_chunk": chunk,
            "prefill_tokens_per_s": context / seconds, "prefill_s": seconds,
            "matmul_tflop": roofline.prefill_flops(model, context) / 1e12}


def engine_case(model, batch: int, prompt: int, new_tokens: int, kernels: str) -> dict:
    """``Engine.generate`` as a user calls it (host loop, streaming read-back of every step's tokens, one step
    of lookahead): ``batch`` random prompts of ``prompt`` tokens, ``new_tokens`` greedy tokens, no EOS; timed
    on a second call (the first compiles). Its decode ms per token against ``decode_case``'s back-to-back
    jitted steps at the same shapes is what the host loop costs; of that host time, the row gives the
    part spent issuing steps and the part blocked on reading tokens back (``GenerationStats``)."""
    from dsv4_jax.runtime.engine import Engine

    engine = Engine(model, capacity=prompt + new_tokens, kernels=kernels)
    prompts = np.random.RandomState(2).randint(0, model.config.vocab_size, (batch, prompt)).tolist()
    for _ in range(2):
        engine.generate(prompts, max_new_tokens=new_tokens, eos_token_ids=[])
    st = engine.stats
    steps = st.generated_tokens / batch - 1  # the first token comes from the prefill's logits
    return {"phase": "engine", "batch": batch, "context": prompt, "new_tokens": new_tokens,
            "prefill_s": st.prefill_seconds, "decode_s": st.decode_seconds,
            "decode_ms_per_step": st.decode_seconds / max(steps, 1) * 1e3,
            "dispatch_ms_per_step": st.decode_dispatch_seconds / max(steps, 1) * 1e3,
            "readback_wait_ms_per_step": st.decode_wait_seconds / max(steps, 1) * 1e3,
            "decode_tokens_per_s": st.decode_tokens_per_s}


def random_fill(cache, key):
    """Every array of a cache pytree random (a decode step's cost depends on the caches' size, not values)."""
    leaves, tree = jax.tree.flatten(cache)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype)
                                     for k, x in zip(keys, leaves)])


# Each model's compiled decode steps, by (path, batch, capacity, kernels, XLA options); dropped with the model.
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decode_case(model, batch: int, context: int, steps: int, kernels: str, profile: bool = False,
                xla_options: dict | None = None, hlo_path: str | None = None, path: str = "plain") -> dict:
    """xla_options: XLA debug options for this case's compile (``Compiled`` options, e.g.
    ``{"xla_gpu_enable_pdl": True}``), so variants are compared in one process. hlo_path: where to write the
    step's optimized HLO. path: "plain" or "mesh" (``device_steps``)."""
    cfg = model.config
    capacity = context + 5 * steps + 8  # warm-up, 3 timed groups, a profiled group
    device, weights, new_cache = device_steps(model, capacity, path)
    jitted = device.decode
    cache = jax.jit(random_fill, donate_argnums=0)(new_cache(batch), jax.random.PRNGKey(1))
    greedy = SamplingParams()  # the engine's default: its step skips the top-k / top-p sort
    params = sampling_args(greedy)
    key = jax.random.PRNGKey(0)
    active = jnp.ones((batch,), bool)
    pos = jnp.full((batch,), context, jnp.int32)
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, cfg.vocab_size, (batch,)), jnp.int32)
    programs = _COMPILED.setdefault(model, {})
    program = (path, batch, capacity, kernels, json.dumps(xla_options or {}, sort_keys=True))
    if program not in programs:  # a later round reuses it: the slice's step compiles for tens of seconds
        programs[program] = jitted.lower(weights, cache, tokens, pos, active, key, *params, kernels=kernels,
                                         filters=greedy.filters).compile(xla_options or {})
        if hlo_path:
            with open(hlo_path, "w") as f:
                f.write(programs[program].as_text())
    compiled = programs[program]

    dispatch = []

    def run(n):
        nonlocal cache, tokens, pos, key
        for _ in range(n):
            t0 = time.perf_counter()
            tokens, pos, key, cache = compiled(weights, cache, tokens, pos, active, key, *params)
            dispatch.append(time.perf_counter() - t0)
        jax.block_until_ready(cache)

    # Warm-up: a whole group. After one step, the first case of a process still ran slower than a later run
    # of the same variant (H200, docs/performance.md).
    run(steps)
    dispatch.clear()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        run(steps)
        times.append((time.perf_counter() - t0) / steps)
    step_s = statistics.median(times)
    experts = roofline.picked_experts(model, cache, tokens, pos, capacity)  # what the rows route to now, not an estimate
    need = roofline.decode_step_bytes(model, batch, context, experts)
    dev = jax.devices()[0]
    row = {"phase": "decode", "batch": batch, "context": context, "decode_ms_per_step": step_s * 1e3,
           "decode_tokens_per_s": batch / step_s, "host_dispatch_ms": statistics.median(dispatch) * 1e3,
           "bytes_per_step_gb": need["total"] / 1e9, "distinct_experts_per_layer": experts,
           "bytes_split_gb": {k: round(v / 1e9, 4) for k, v in need.items() if k != "total"},
           "peak_memory_gb": (dev.memory_stats() or {}).get("peak_bytes_in_use", 0) / 1e9}
    if profile:
        from scripts.profile_breakdown import breakdown

        row["profile"] = breakdown(lambda: run(steps), compiled.as_text(), cfg.layer_types, steps)
    return row


def batch_context(text: str) -> tuple:
    """argparse type of a case "B,CTX" or "B,CTX,KERNELS" -> (B, CTX, kernels or None)."""
    parts = text.split(",")
    if (len(parts) not in (2, 3) or not all(v.isdigit() and int(v) > 0 for v in parts[:2])
            or parts[2:] not in ([], ["xla"], ["pallas"])):
        raise argparse.ArgumentTypeError(f"{text!r}: expected B,CTX (positive integers), optionally ,xla or ,pallas")
    return int(parts[0]), int(parts[1]), (parts[2] if len(parts) == 3 else None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", help="demo | flash-slice")
    p.add_argument("--layers", default="SWA,SWA,CSA,HCA,CSA,HCA", help="flash-slice layer schedule")
    p.add_argument("--experts", type=int, default=None, help="override the routed expert count")
    p.add_argument("--batch", type=int, nargs="*", default=[1])
    p.add_argument("--context", type=int, nargs="*", default=[256])
    p.add_argument("--decode-cases", nargs="*", default=None, type=batch_context,
                   help="decode cases B,CTX or B,CTX,KERNELS (instead of every --batch x --context x --kernels)")
    p.add_argument("--prefill", type=int, nargs="*", default=[], help="batch-1 prefill lengths to time")
    p.add_argument("--engine-cases", nargs="*", default=[], type=batch_context,
                   help="Engine.generate cases B,PROMPT[,KERNELS] (64 new tokens each; host loop with lookahead "
                        "included)")
    p.add_argument("--prefill-chunk", type=int, nargs="+", default=None,
                   help="prefill chunk sizes to time (default: the engine's, engine.default_prefill_chunk)")
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--precision", nargs="+", default=["bf16"], choices=("bf16", "released"),
                   help="weights in --dtype, and/or FP8 / FP4 as released (random_init.released_model), each case "
                   "run on each")
    p.add_argument("--kernels", nargs="+", default=["xla"], choices=("xla", "pallas"))
    p.add_argument("--paths", nargs="+", default=["plain"], choices=("plain", "mesh"),
                   help="plain: the one-device step; mesh: the sharded step on a 1-device mesh (side by side)")
    p.add_argument("--profile", nargs="*", default=[], type=batch_context, help="decode cases B,CTX to profile")
    p.add_argument("--no-ceilings", action="store_true", help="skip measuring the card's ceilings (CPU)")
    p.add_argument("--xla-options", type=json.loads, default=[{}],
                   help='JSON list of XLA option sets to compile each decode case with, compared in one process, '
                        'e.g. \'[{}, {"xla_gpu_enable_pdl": true}]\'')
    p.add_argument("--rounds", type=int, default=1, help="repeat the decode cases, alternating the option sets")
    p.add_argument("--hlo-dir", default=None, help="write each decode case's optimized HLO into this folder")
    args = p.parse_args(argv)
    if not (isinstance(args.xla_options, list) and args.xla_options
            and all(isinstance(o, dict) for o in args.xla_options)):
        p.error(f"--xla-options {args.xla_options!r}: expected a JSON list of objects")
    if args.rounds < 1:
        p.error(f"--rounds {args.rounds}: expected at least 1")
    t_start = time.perf_counter()
    cfg = make_config(args.model, args.layers, args.experts)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    ceil = None if args.no_ceilings else roofline.torch_ceilings()
    models = {p: random_model(cfg, dtype) if p == "bf16" else released_model(cfg, dtype) for p in args.precision}
    if "mesh" in args.paths:  # up front, not as an out-of-memory error in every case
        for precision, model in models.items():
            try:
                mesh_weights(model)
            except jax.errors.JaxRuntimeError as e:
                raise SystemExit(f"--paths mesh: placing the {precision} weights on a 1-device mesh would copy them "
                                 f"({str(e).splitlines()[0][:200]}); expected it to share their buffers") from None
    base = {"device": jax.devices()[0].device_kind, "model": args.model, "layers": ",".join(cfg.layer_types),
            "experts": cfg.n_routed_experts, "hidden": cfg.hidden_size, "dtype": args.dtype}
    print(json.dumps({"ceilings": ceil, **base}), flush=True)
    profiled = {(b, ctx) for b, ctx, _ in args.profile}
    if args.decode_cases is None:
        decode_cases = [(b, ctx, k) for k in args.kernels for b in args.batch for ctx in args.context]
    else:
        decode_cases = [(b, ctx, k) for b, ctx, only in args.decode_cases for k in ([only] if only else args.kernels)]

    def emit(fn, *a, variant=None, **kw):
        try:
            row = fn(*a, **kw)
        except Exception as e:  # out of memory at large shapes: record it and go on
            row = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        row = {**base, "kernels": kw.get("kernels", a[-1] if a else None), **(variant or {}), **row,
               "elapsed_s": round(time.perf_counter() - t_start, 1)}
        if ceil and "bytes_per_step_gb" in row:
            floor_ms = row["bytes_per_step_gb"] * 1e9 / (ceil["copy_2GB_TBps"] * 1e12) * 1e3
            row.update(roofline_ms=floor_ms, pct_of_roofline=100 * floor_ms / row["decode_ms_per_step"])
        if ceil and "prefill_tokens_per_s" in row:
            achieved = row["matmul_tflop"] / row["prefill_s"]
            row.update(achieved_TFLOPs=achieved, pct_of_matmul=100 * achieved / ceil["bf16_matmul_8192_TFLOPs"])
        print(json.dumps(row), flush=True)

    for kernels in args.kernels:
        for ctx in args.prefill:
            for chunk in args.prefill_chunk or [default_prefill_chunk()]:
                for (precision, model), path in itertools.product(models.items(), args.paths):
                    emit(prefill_case, model, ctx, min(chunk, ctx), kernels=kernels, path=path,
                         variant={"path": path, "precision": precision})
    for b, prompt, only in args.engine_cases:
        for kernels in [only] if only else args.kernels:
            for precision, model in models.items():
                emit(engine_case, model, b, prompt, 64, kernels=kernels, variant={"precision": precision})
    compared = args.rounds > 1 or args.xla_options != [{}]
    if args.hlo_dir:
        os.makedirs(args.hlo_dir, exist_ok=True)
    for rnd in range(args.rounds):
        for b, ctx, kernels in decode_cases:
            for i, opts in enumerate(args.xla_options):
                hlo = (os.path.join(args.hlo_dir, f"decode_B{b}_C{ctx}_{kernels}_options{i}.txt")
                       if args.hlo_dir and rnd == 0 else None)
                for (precision, model), path in itertools.product(models.items(), args.paths):
                    emit(decode_case, model, b, ctx, args.decode_steps, kernels=kernels,
                         profile=(b, ctx) in profiled and rnd == 0, xla_options=opts, hlo_path=hlo, path=path,
                         variant={"path": path, "precision": precision,
                                  **({"round": rnd, "xla_options": opts} if compared else {})})
    return 0


if __name__ == "__main__":
    sys.exit(main())
