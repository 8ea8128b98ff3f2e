"""Benchmark speculative decoding's device steps against a one-token decode step (a benchmark, not a test).

    python -m scripts.bench_speculative --model flash-slice --batch 1 8 32 --context 4096 --verify 2 3 4 \
        --precision bf16 released
    python -m scripts.bench_speculative --model demo --batch 1 2 --context 64 --verify 2 3 --steps 2   # a CPU run

Random weights with the MTP block (bf16, or ``released``: FP8 linears and FP4 experts as QuantArrays), caches
filled with random entries as if ``--context`` tokens had been processed (as scripts/bench_generate.py does).
Measured rows, per batch B, each step the engine's own code jitted and timed as the median of 3 groups of
``--steps`` back-to-back calls after a warm-up group:

    decode      engine.DeviceSteps.decode: one token a row (greedy sampling included)
    verify T    speculative.verify: the main model's chunk of T = N + 1 tokens, acceptance, roll back
    extend T    the MTP block over T committed positions and its head at the last (a round's step 1)
    draft       one of the block's one-token draft steps: the block, its head, sampling (a round's step 2)
    head T      the main model's head alone on T positions per row (hc_head, norm, LM head)
    round N     speculative.SpeculativeSteps.round end to end, N = T - 1 drafts (for the ``--rounds`` sizes)

Each measured row also gives the routing's diversity: the distinct experts each learned-MoE layer picks for the
B x T random tokens of the step against the most there could be (random weights can collapse rows onto the same
experts, which would make verifying look free; look at it before reading the times).

Computed rows (``"computed": true``), for N = T - 1 and each ``--accept`` length a (tokens a round yields, the
main model's own included): speed-up = a x decode / (verify T + extend T + (N - 1) x draft), for the measured
slice and for whole Flash (``--scale-layers``: each main-model time's layers, its time less its head's, scaled by
--scale-layers / the slice's layers; the MTP block's steps are not scaled), and the same with the measured round
where timed; with the share of whole Flash's round spent drafting, and of a draft step spent in the head (head 1 / draft: the
LM head's read, which the MTP block shares with the main model).
Prints one JSON object per row.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv4_jax import ops
from dsv4_jax.model.cache import init_cache
from dsv4_jax.model.metadata import build_metadata
from dsv4_jax.model.mtp import mtp_config, mtp_layer_config
from dsv4_jax.model.transformer import METADATA_SCOPE, at_positions
from dsv4_jax.runtime import speculative as spec
from dsv4_jax.runtime.engine import DeviceSteps, split_weights
from dsv4_jax.runtime.sampling import SamplingParams, sample, sampling_args
from dsv4_jax.train.trainer import forward_with_routing, learned_moe_layers
from dsv4_jax.weights.random_init import random_model, released_model
from scripts.bench_generate import make_config, random_fill

GREEDY = SamplingParams()


def timed(fn, args: tuple, steps: int, carry=None) -> float:
    """Median seconds of one call over 3 groups of ``steps`` back-to-back calls after a warm-up group.
    ``carry(args, out)``: the next call's args from this call's outputs (donated caches, advanced state)."""
    def group():
        nonlocal args
        out = None
        for _ in range(steps):
            out = fn(*args)
            if carry is not None:
                args = carry(args, out)
        jax.block_until_ready(out)

    group()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        group()
        times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times)


class Bench:
    """The jitted steps of one model and capacity, and random inputs for them."""

    def __init__(self, model, capacity: int, kernels: str):
        self.model, self.cfg, self.capacity, self.kernels = model, model.config, capacity, kernels
        graphdef, state_def, self.weights = split_weights(model)
        self.decode = DeviceSteps(graphdef, state_def, capacity).decode
        self.graphdef, self.state_def = graphdef, state_def
        self.settings = sampling_args(GREEDY)

    def model_of(self, weights):
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.state_def, weights))

    def jit(self, fn, **kw):
        """``fn`` jitted and traced under ``--kernels`` (the engine's steps take it as a static argument; a piece
        traced outside ``ops.use`` would run plain XLA)."""
        def traced(*args):
            with ops.use(self.kernels):
                return fn(*args)

        return jax.jit(traced, **kw)

    def cache(self, batch: int):
        """Random caches of the model's layers and then the MTP block's."""
        return jax.jit(random_fill, donate_argnums=0)(init_cache(mtp_config(self.cfg), batch, self.capacity,
                                                                 self.model.dtype), jax.random.PRNGKey(1))

    def tokens(self, shape, seed: int = 2):
        return jnp.asarray(np.random.RandomState(seed).randint(0, self.cfg.vocab_size, shape), jnp.int32)

    def state(self, batch: int, context: int, T: int) -> spec.DraftState:
        streams = jax.random.normal(jax.random.PRNGKey(3), (batch, T, self.cfg.hc_mult, self.cfg.hidden_size))
        return spec.DraftState(pos=jnp.full((batch,), context, jnp.int32), streams=streams.astype(self.model.dtype),
                               next_ids=self.tokens((batch, T)), count=jnp.full((batch,), T, jnp.int32))

    def time_decode(self, batch: int, context: int, steps: int) -> float:
        args = (self.weights, self.cache(batch)[:-1], self.tokens((batch,)), jnp.full((batch,), context, jnp.int32),
                jnp.ones((batch,), bool), jax.random.PRNGKey(0), *self.settings)
        fn = lambda *a: self.decode(*a, kernels=self.kernels, filters=False)  # noqa: E731
        return timed(fn, args, steps, lambda a, out: (a[0], out[3], out[0], out[1], a[4], out[2], *a[6:]))

    def time_verify(self, batch: int, context: int, T: int, steps: int) -> float:
        """speculative.verify of T tokens at ``context``, the round's metadata built inside as the round does."""
        V = self.cfg.vocab_size

        @functools.partial(self.jit, donate_argnums=1)
        def step(weights, cache, state, drafts, key):
            model, active = self.model_of(weights), jnp.ones((batch,), bool)
            meta = spec.round_metadata(self.cfg, state, active, self.capacity)
            _, _, _, cache = spec.verify(model, cache, state, active, drafts, jnp.zeros((batch, T - 1, V)), meta,
                                         key, self.settings, False)
            return cache

        args = (self.weights, self.cache(batch)[:-1], self.state(batch, context, T), self.tokens((batch, T - 1), 4),
                jax.random.PRNGKey(0))
        return timed(step, args, steps, lambda a, out: (a[0], out, *a[2:]))

    def time_extend(self, batch: int, context: int, T: int, steps: int) -> float:
        @functools.partial(self.jit, donate_argnums=1)
        def step(weights, mtp_cache, state):
            model, on = self.model_of(weights), jnp.ones((batch,), jnp.int32)
            with jax.named_scope(METADATA_SCOPE):
                meta = build_metadata(mtp_layer_config(self.cfg), state.pos - state.count, state.count * on, T,
                                      self.capacity)
            x, mtp_cache = model.mtp_streams(state.streams, state.next_ids, meta, mtp_cache)
            return model.mtp_head(at_positions(x, state.count - 1)), mtp_cache

        args = (self.weights, self.cache(batch)[-1], self.state(batch, context, T))
        return timed(step, args, steps, lambda a, out: (a[0], out[1], a[2]))

    def time_draft(self, batch: int, context: int, steps: int) -> float:
        @functools.partial(self.jit, donate_argnums=1)
        def step(weights, mtp_cache, g, token, pos, key):
            model, on = self.model_of(weights), jnp.ones((batch,), jnp.int32)
            with jax.named_scope(METADATA_SCOPE):
                meta = build_metadata(mtp_layer_config(self.cfg), pos, on, 1, self.capacity)
            x, mtp_cache = model.mtp_streams(g[:, None], token[:, None], meta, mtp_cache)
            return sample(model.mtp_head(x[:, 0]), key, *self.settings, filters=False), mtp_cache

        g = self.state(batch, context, 1).streams[:, 0]
        args = (self.weights, self.cache(batch)[-1], g, self.tokens((batch,)), jnp.full((batch,), context, jnp.int32),
                jax.random.PRNGKey(0))
        return timed(step, args, steps, lambda a, out: (a[0], out[1], a[2], out[0], *a[4:]))

    def time_head(self, batch: int, T: int, steps: int) -> float:
        step = self.jit(lambda weights, streams: self.model_of(weights).logits(streams))
        return timed(step, (self.weights, self.state(batch, 0, T).streams), steps)

    def time_round(self, batch: int, context: int, T: int, steps: int) -> float:
        rnd = spec.SpeculativeSteps(self.graphdef, self.state_def, self.capacity, T - 1).round
        fn = lambda *a: rnd(*a, kernels=self.kernels, filters=False)  # noqa: E731
        args = (self.weights, self.cache(batch), self.state(batch, context, T), jnp.ones((batch,), bool),
                jax.random.PRNGKey(0), *self.settings)
        # Each round moves the positions on by what it accepted: the context grows by at most T a round.
        return timed(fn, args, steps, lambda a, out: (a[0], out[4], out[2], a[3], out[3], *a[5:]))

    def routing(self, batch: int, sizes: list[int]) -> dict:
        """{T: distinct experts per learned-MoE layer for B x T random tokens, and the most there could be} for
        each T of ``sizes``, from one forward of max(sizes) tokens a row: the model is causal, so the first T
        tokens' picks are those of a forward of those T alone."""
        _, picks = forward_with_routing(self.model, self.tokens((batch, max(sizes)), 5))
        k, E = self.cfg.num_experts_per_tok, self.cfg.n_routed_experts

        def stats(T):
            distinct = [len(np.unique(np.asarray(picks[layer][:, :T]))) for layer in learned_moe_layers(self.cfg)]
            return {"distinct_experts": round(float(np.mean(distinct)), 1), "most_experts": min(E, batch * T * k)}

        return {T: stats(T) for T in sizes}


def speedups(times: dict, T: int, accept: float, layers: int, scale_layers: int) -> dict:
    """Computed speed-ups at ``accept`` tokens a round for N = T - 1 drafts (module docstring)."""
    N = T - 1

    def flash(t, head):  # a main-model step of whole Flash: its layers scaled, its head as measured
        return head + (t - head) * scale_layers / layers

    pieces = times[f"verify_{T}"] + times[f"extend_{T}"] + (N - 1) * times["draft"]
    flash_pieces = flash(times[f"verify_{T}"], times[f"head_{T}"]) + times[f"extend_{T}"] + (N - 1) * times["draft"]
    flash_decode = flash(times["decode"], times["head_1"])
    measured_round = {}
    if f"round_{T}" in times:  # timed for the --rounds sizes
        measured_round["speedup_slice_round"] = accept * times["decode"] / times[f"round_{T}"]
    return {"draft_tokens": N, "accept_length": accept,
            "speedup_slice": accept * times["decode"] / pieces, **measured_round,
            "speedup_flash": accept * flash_decode / flash_pieces,
            "flash_draft_share": N * times["draft"] / flash_pieces,
            "draft_head_share": times["head_1"] / times["draft"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", help="demo | flash-slice")
    p.add_argument("--layers", default="SWA,SWA,CSA,HCA,CSA,HCA", help="flash-slice layer schedule")
    p.add_argument("--experts", type=int, default=None, help="override the routed expert count")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--context", type=int, default=4096, help="tokens already in the caches")
    p.add_argument("--verify", type=int, nargs="+", default=[2, 3, 4], help="tokens per verify step (N + 1)")
    p.add_argument("--accept", type=float, nargs="+", default=[2.0, 2.5], help="tokens per round, for the speed-ups")
    p.add_argument("--precision", nargs="+", default=["bf16"], choices=("bf16", "released"))
    p.add_argument("--scale-layers", type=int, default=43, help="layers of the whole model the slice stands for")
    p.add_argument("--steps", type=int, default=16, help="calls per timed group")
    p.add_argument("--kernels", default="xla", choices=("xla", "pallas"))
    p.add_argument("--rounds", type=int, nargs="*", default=None,
                   help="the --verify sizes T whose whole jitted round is timed too (default: all; each is a compile)")
    args = p.parse_args(argv)
    if min(args.verify) < 2 or any(a < 1 for a in args.accept):
        p.error("--verify counts must be >= 2 (a token and a draft) and --accept lengths >= 1")
    rounds = args.verify if args.rounds is None else args.rounds
    if set(rounds) - set(args.verify):
        p.error(f"--rounds {sorted(set(rounds) - set(args.verify))} not among --verify {args.verify}")
    cfg = make_config(args.model, args.layers, args.experts)
    for precision in args.precision:
        model = (random_model(cfg, jnp.bfloat16, mtp=True) if precision == "bf16" else
                 released_model(cfg, jnp.bfloat16, mtp=True))
        bench = Bench(model, args.context + (3 * args.steps + args.steps) * max(args.verify) + 8, args.kernels)
        base = {"device": jax.devices()[0].device_kind, "model": args.model, "precision": precision,
                "layers": cfg.num_hidden_layers, "experts": cfg.n_routed_experts, "context": args.context}
        for batch in args.batch:
            routing = bench.routing(batch, [1, *args.verify])
            row = lambda kind, T, s: {**base, "batch": batch, "step": kind, "tokens": T, "ms": s * 1e3,  # noqa: E731
                                      **routing[T]}
            times = {"decode": bench.time_decode(batch, args.context, args.steps),
                     "draft": bench.time_draft(batch, args.context, args.steps),
                     "head_1": bench.time_head(batch, 1, args.steps)}
            print(json.dumps(row("decode", 1, times["decode"])), flush=True)
            print(json.dumps(row("draft", 1, times["draft"])), flush=True)
            print(json.dumps(row("head", 1, times["head_1"])), flush=True)
            for T in args.verify:
                for kind, fn in (("verify", bench.time_verify), ("extend", bench.time_extend),
                                 ("round", bench.time_round)):
                    if kind == "round" and T not in rounds:
                        continue
                    times[f"{kind}_{T}"] = fn(batch, args.context, T, args.steps)
                    print(json.dumps(row(kind, T, times[f"{kind}_{T}"])), flush=True)
                times[f"head_{T}"] = bench.time_head(batch, T, args.steps)
                print(json.dumps(row("head", T, times[f"head_{T}"])), flush=True)
                for accept in args.accept:
                    if accept <= T:
                        print(json.dumps({**base, "batch": batch, "computed": True,
                                          **speedups(times, T, accept, cfg.num_hidden_layers, args.scale_layers)}),
                              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
