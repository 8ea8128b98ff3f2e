"""Time this tree's engine steps against another source tree's, in one process, on the same weights (a
benchmark, not a test).

    git archive 575fada | (mkdir -p /tmp/old && tar -x -C /tmp/old)
    python -m scripts.bench_ab --old /tmp/old --decode-cases 1,4096 32,4096 --prefill 32768 --rounds 3

The other tree's ``dsv4_jax`` and ``kernels_pallas`` are copied under the names ``dsv4_jax_old`` and
``kernels_pallas_old`` and imported beside this tree's, so both run in one process on one set of arrays: the
Flash-width slice's 77 GB of bf16 weights are drawn once (``random_model``) and handed to the other tree's
model by parameter name. Separate processes on one machine differed by up to 7% (docs/performance.md), so the
cases alternate, old then new, for ``--rounds`` rounds. Decode: ``--decode-steps`` jitted steps issued back to
back, median of 3 groups; prefill: a batch-1 prompt in the engine's chunks, after a warm-up pass. The old tree
is driven through its ``DeviceSteps`` with ``kernels=`` per call (trees before the ops layer) or at
construction (this tree's form). ``--precision released``: the weights drawn as released (FP8 linears, FP4
experts; ``released_model``) and both trees' models hold the same codes and scales, each in its own
``QuantArray`` class. Prints one JSON object per case and round.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax.weights.quant_array import QuantArray
from scripts import roofline
from scripts.bench_generate import batch_context, make_config, random_fill

PACKAGES = ("dsv4_jax", "kernels_pallas")


def import_old_tree(root: Path) -> dict:
    """Copy ``root``'s packages into a temporary folder as ``<name>_old``, rewriting their absolute imports of
    each other, and import them. Returns {package name: old module}."""
    dest = Path(tempfile.mkdtemp(prefix="bench_ab_"))
    pattern = re.compile(r"\b(" + "|".join(PACKAGES) + r")\b(?=[.\s])")
    for pkg in PACKAGES:
        shutil.copytree(root / pkg, dest / f"{pkg}_old", ignore=shutil.ignore_patterns("__pycache__"))
        for f in (dest / f"{pkg}_old").rglob("*.py"):
            f.write_text(pattern.sub(lambda m: m.group(1) + "_old", f.read_text()))
    sys.path.insert(0, str(dest))
    return {pkg: importlib.import_module(f"{pkg}_old") for pkg in PACKAGES}


def module(tree: str, *candidates: str):
    """The first of ``candidates`` (module paths under the package) that ``tree``'s dsv4_jax has: the module
    layout changed with the redesign (``engine`` -> ``runtime.engine``)."""
    for name in candidates:
        try:
            return importlib.import_module(f"{tree}.{name}")
        except ModuleNotFoundError:
            continue
    raise ModuleNotFoundError(f"{tree} has none of {candidates}")


class Version:
    """One tree's model on the shared weights and its jitted steps."""

    def __init__(self, tree: str, cfg_fields: dict, dtype, weights_by_name: dict, released: bool = False):
        self.tree = tree
        config = module(tree, "model.config", "config")
        ckpt = module(tree, "weights.params", "weights.checkpoint", "checkpoint")
        self.engine = module(tree, "runtime.engine", "engine")
        self.cache_mod = module(tree, "model.cache", "cache")
        self.cfg = config.DeepseekV4Config(**cfg_fields)
        if released and "released" not in inspect.signature(ckpt.abstract_model).parameters:
            raise SystemExit(f"{tree}: no released precision (abstract_model has no released=)")
        self.model = ckpt.abstract_model(self.cfg, dtype, **({"released": True} if released else {}))
        table = ckpt.param_table(self.model)
        if set(table) != set(weights_by_name):
            missing = sorted(set(weights_by_name) ^ set(table))[:5]
            raise SystemExit(f"{tree}: parameter names differ from this tree's, e.g. {missing}")
        own = module(tree, "weights.quant_array").QuantArray if released else QuantArray
        for name, var in table.items():
            var.set_value(as_tree_value(weights_by_name[name], own))
        self.graphdef, self.state_def, self.weights = self.engine.split_weights(self.model)
        self.per_call_kernels = "kernels" in inspect.signature(self.engine.DeviceSteps.__init__).parameters

    def steps(self, capacity: int, kernels: str):
        """(chunk(weights, cache, ids, start, n_new), decode(weights, cache, tokens, pos, active, key, t, k, p))
        with the implementation choice and greedy sampling bound."""
        if not self.per_call_kernels:
            s = self.engine.DeviceSteps(self.graphdef, self.state_def, capacity)
            return (lambda *a: s.chunk(*a, last_only=True, kernels=kernels),
                    lambda *a: s.decode(*a, kernels=kernels, filters=False))
        s = self.engine.DeviceSteps(self.graphdef, self.state_def, capacity, kernels=kernels)
        return lambda *a: s.chunk(*a, last_only=True), lambda *a: s.decode(*a, filters=False)

    def init_cache(self, batch: int, capacity: int, dtype):
        return self.cache_mod.init_cache(self.cfg, batch, capacity, dtype)


def as_tree_value(value, quant_array_class):
    """A weight as a tree's model holds it: arrays as they are; this tree's QuantArray rebuilt as the tree's own
    class (its ops recognise a quantised weight by its class), sharing the codes and scales."""
    if not isinstance(value, QuantArray) or quant_array_class is QuantArray:
        return value
    return quant_array_class(value.values, value.scales, value.block)


def decode_round(v: Version, batch: int, context: int, steps: int, kernels: str, dtype) -> float:
    """Seconds per decode step: median of 3 groups of ``steps`` back-to-back steps, after a warm-up group."""
    capacity = context + 4 * steps + 8
    _, decode = v.steps(capacity, kernels)
    cache = jax.jit(lambda key: random_fill(v.init_cache(batch, capacity, dtype), key))(jax.random.PRNGKey(1))
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, v.cfg.vocab_size, (batch,)), jnp.int32)
    pos, active, key = jnp.full((batch,), context, jnp.int32), jnp.ones((batch,), bool), jax.random.PRNGKey(0)
    greedy = (jnp.float32(0.0), jnp.int32(0), jnp.float32(1.0))

    def run(n):
        nonlocal cache, tokens, pos, key
        for _ in range(n):
            tokens, pos, key, cache = decode(v.weights, cache, tokens, pos, active, key, *greedy)
        jax.block_until_ready(cache)

    run(steps)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        run(steps)
        times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times)


def prefill_round(v: Version, context: int, chunk: int, kernels: str, dtype) -> float:
    """Seconds for a batch-1 prompt of ``context`` tokens in chunks of ``chunk``, after a warm-up pass."""
    step, _ = v.steps(context, kernels)
    prompt = np.random.RandomState(0).randint(0, v.cfg.vocab_size, (1, context)).astype(np.int32)

    def prefill():
        cache = v.init_cache(1, context, dtype)
        for pos in range(0, context, chunk):
            n = min(chunk, context - pos)
            ids = np.zeros((1, chunk), np.int32)
            ids[:, :n] = prompt[:, pos:pos + n]
            logits, cache = step(v.weights, cache, jnp.asarray(ids), jnp.full((1,), pos, jnp.int32),
                                 jnp.full((1,), n, jnp.int32))
        return jax.block_until_ready((logits, cache))

    prefill()
    t0 = time.perf_counter()
    prefill()
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", type=Path, required=True, help="root of the other source tree (git archive of a commit)")
    p.add_argument("--model", default="flash-slice", help="demo | flash-slice")
    p.add_argument("--layers", default="SWA,SWA,CSA,HCA,CSA,HCA", help="flash-slice layer schedule")
    p.add_argument("--decode-cases", nargs="*", default=[], type=batch_context, help="decode cases B,CTX")
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--prefill", type=int, nargs="*", default=[], help="batch-1 prompt lengths")
    p.add_argument("--prefill-chunk", type=int, default=16384)
    p.add_argument("--kernels", default="pallas", choices=("xla", "pallas"))
    p.add_argument("--precision", default="bf16", choices=("bf16", "released"),
                   help="bf16 weights, or FP8 linears and FP4 experts kept as released (both trees on the same codes)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-ceilings", action="store_true", help="skip measuring the card's ceilings (CPU)")
    args = p.parse_args(argv)
    for pkg in PACKAGES:
        if not (args.old / pkg / "__init__.py").is_file():
            p.error(f"--old {args.old}: expected a source tree with {pkg}/__init__.py")
    from dsv4_jax.weights.random_init import random_model, released_model

    cfg = make_config(args.model, args.layers, None)
    dtype = jnp.dtype(jnp.bfloat16)
    ceil = None if args.no_ceilings else roofline.torch_ceilings()
    print(json.dumps({"ceilings": ceil, "device": jax.devices()[0].device_kind}), flush=True)
    released = args.precision == "released"
    model = released_model(cfg, dtype) if released else random_model(cfg, dtype)
    new_ckpt = module("dsv4_jax", "weights.params", "weights.checkpoint")
    weights = {name: var.get_value() for name, var in new_ckpt.param_table(model).items()}
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    import_old_tree(args.old)
    versions = {name: Version(tree, fields, dtype, weights, released)
                for name, tree in (("old", "dsv4_jax_old"), ("new", "dsv4_jax"))}
    for rnd in range(args.rounds):
        for b, ctx, _ in args.decode_cases:
            for name, v in versions.items():
                s = decode_round(v, b, ctx, args.decode_steps, args.kernels, dtype)
                row = {"round": rnd, "tree": name, "precision": args.precision, "phase": "decode", "batch": b,
                       "context": ctx, "ms_per_step": s * 1e3}
                if ceil:
                    floor = roofline.decode_step_bytes(model, b, ctx)["total"] / (ceil["copy_2GB_TBps"] * 1e12)
                    row["pct_of_roofline"] = 100 * floor / s
                print(json.dumps(row), flush=True)
        for ctx in args.prefill:
            for name, v in versions.items():
                s = prefill_round(v, ctx, min(args.prefill_chunk, ctx), args.kernels, dtype)
                print(json.dumps({"round": rnd, "tree": name, "precision": args.precision, "phase": "prefill",
                                  "context": ctx, "tokens_per_s": ctx / s}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
