"""Compile the engine's chunk step for an H100 on a host without a GPU: XLA's whole GPU pipeline (fusion, the
Pallas Triton kernels, scheduling; no autotuning, which needs the device) on abstract weights, so no memory for
them either. Needs JAX's CUDA plugin (``pip install -e '.[aot]'``). A measurement, not a test: the compile time,
the optimized HLO's size and the kernels it launches per step, one JSON object per line.

    python -m scripts.compile_for_h100 --model flash-slice --layers SWA,CSA,HCA --experts 64 --batch 4 \
        --tokens 2300 1 --kernels xla pallas --hlo-dir /tmp/hlo

Steps with a Mosaic GPU kernel (the bf16 prefill's grouped matmul) need an attached GPU to compile: such a
step prints an error line; ``--kernels pallas-xla-experts`` keeps every other Pallas kernel and gives the routed
experts the XLA path. The compile time is the GPU machine's minus autotuning. On a 2-core CPU host it showed
the XLA path's decode step compiling for 162 s (31 s after the fix) while its Sinkhorn sat inside the mHC
expand's fusion (docs/performance.md).

With ``--mesh``, the sharded engine's steps (``runtime.mesh.ShardedStep``: one ``shard_map`` over a
("pp", "dp", "tp") mesh) compile for 8 compile-only H100s of one host, once per layout, e.g. ``--mesh tp=8
dp=8,ep``; there ``--tokens 1`` is the decode step (the sampler included), and each line adds the layout, the
collectives of the optimized HLO and its Triton kernels:

    python -m scripts.compile_for_h100 --layers SWA,CSA,HCA,SWA,CSA,HCA,CSA,HCA --batch 8 --tokens 1 16 \
        --kernels pallas --mesh tp=8 dp=8,ep
"""

from __future__ import annotations

import argparse
import collections
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
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from dsv4_jax import ops  # noqa: E402
from dsv4_jax.model.cache import init_cache  # noqa: E402
from dsv4_jax.model.transformer import InputError  # noqa: E402
from dsv4_jax.runtime.engine import DeviceSteps, split_weights  # noqa: E402
from dsv4_jax.runtime.mesh import ModelMesh, ShardedStep, make_mesh, place_weights, weight_specs  # noqa: E402
from dsv4_jax.runtime.pipeline import PipelinePlan, stage_starts  # noqa: E402
from dsv4_jax.weights.params import abstract_model, param_table  # noqa: E402
from dsv4_jax.weights.sharding import target_placements  # noqa: E402
from kernels_pallas.testing import abstract_h100, h100_compile_only_devices, h100_compile_only_sharding  # noqa: E402
from scripts.bench_generate import make_config  # noqa: E402

# --kernels: an implementation for every op, or the Pallas kernels but XLA's routed experts (whose bf16 prefill
# kernel, the Mosaic GPU grouped matmul, compiles only with a GPU attached).
KERNELS = {"xla": "xla", "pallas": "pallas",
           "pallas-xla-experts": ops.Kernels("pallas", overrides=(("routed_experts", "xla"),))}
H100S = 8  # the compile-only devices of a --mesh step: one 8-GPU host


def compiled_step_hlo(cfg, dtype, B: int, T: int, capacity: int, kernels: str | ops.Kernels,
                      h100) -> tuple[str, float]:
    """The chunk step (T new tokens per row, last-token logits) compiled for the compile-only device ``h100``
    (``h100_compile_only_sharding()``) -> (optimized HLO text, compile seconds)."""
    on_h100 = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=h100)
    graphdef, state_def, weights = split_weights(abstract_model(cfg, dtype))
    cache = jax.tree.map(on_h100, jax.eval_shape(lambda: init_cache(cfg, B, capacity, dtype)))
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=h100)
    try:
        with abstract_h100():  # the model's Pallas kernels lower for Triton, not in interpret as on the host's CPU
            lowered = DeviceSteps(graphdef, state_def, capacity).chunk.lower(
                [on_h100(w) for w in weights], cache, ints(B, T), ints(B), ints(B), last_only=True, kernels=kernels)
    except RuntimeError as e:  # outside a mesh a Mosaic GPU kernel's lowering asks for the attached GPU
        if "Unknown backend" not in str(e):
            raise
        raise NeedsGPU(NEEDS_GPU) from None
    return compile_lowered(lowered)


class NeedsGPU(Exception):
    """A step holds a kernel that cannot compile on compile-only devices."""


NEEDS_GPU = "a Mosaic GPU kernel (the bf16 prefill's grouped matmul) compiles only with a GPU attached"


def compile_lowered(lowered) -> tuple[str, float]:
    """A lowered step compiled -> (optimized HLO text, compile seconds). Raises NeedsGPU for a Mosaic GPU kernel:
    on a mesh of compile-only devices it lowers, and XLA's compile then crashes the process."""
    if "custom_call @mosaic_gpu" in lowered.as_text():
        raise NeedsGPU(NEEDS_GPU)
    t0 = time.perf_counter()
    compiled = lowered.compile()
    return compiled.as_text(), time.perf_counter() - t0


def parse_layout(text: str) -> dict:
    """A ``--mesh`` layout, e.g. "tp=8", "dp=8,ep" or "pp=4,tp=2,ep" -> ``make_mesh``'s keywords (tp, dp, pp,
    ep); raises InputError naming a bad part."""
    layout = dict(tp=1, dp=1, pp=1, ep=False)
    for part in text.split(","):
        name, _, value = part.partition("=")
        if part == "ep":
            layout["ep"] = True
        elif name in ("tp", "dp", "pp") and value.isdigit() and int(value) > 0:
            layout[name] = int(value)
        else:
            raise InputError(f"--mesh part {part!r} of {text!r}: expected tp=N, dp=N, pp=N or ep, comma-separated")
    return layout


def h100_model_mesh(cfg, layout: dict) -> ModelMesh:
    """``make_mesh(**layout)`` over 8 compile-only H100s (``h100_compile_only_devices``; needs the CUDA plugin),
    checked against ``cfg``."""
    return make_mesh(**layout, devices=h100_compile_only_devices(H100S), cfg=cfg)


def abstract_placed_weights(cfg, dtype, mesh: ModelMesh) -> tuple:
    """``place_weights`` of the abstract model: (graph definition, state tree structure, weights as
    ShapeDtypeStructs in their placed shapes with the NamedShardings ``mesh``'s rules give them)."""
    model = abstract_model(cfg, dtype)
    table = param_table(model)
    for name, (shape, sharding) in target_placements(table, mesh.mesh, mesh.rules).items():
        table[name].set_value(jax.ShapeDtypeStruct(shape, table[name].get_value().dtype, sharding=sharding))
    return place_weights(model, mesh)  # keeps every leaf already placed: all of them


def compiled_sharded_hlo(cfg, dtype, mesh: ModelMesh, B: int, T: int, capacity: int,
                         kernels: str | ops.Kernels) -> tuple[str, float]:
    """The sharded engine's step on ``mesh`` (``h100_model_mesh``) compiled for its compile-only H100s: the decode
    step (T = 1, sampler included) or a prefill chunk of T tokens per row (last-token logits), B rows (padded to
    a multiple of dp, as the engine does) -> (optimized HLO text, compile seconds). Inputs replicated over the
    mesh, as ``Engine`` gives them."""
    plan = None
    if mesh.pp == 1:
        graphdef, state_def, weights = abstract_placed_weights(cfg, dtype, mesh)
    else:  # the layers as pipeline stages, stacked from the abstract model
        plan = PipelinePlan(abstract_model(cfg, dtype), stage_starts(cfg.num_hidden_layers, mesh.pp), mesh,
                            capacity)
        graphdef, state_def, weights = plan.graphdef, plan.state_def, plan.place_weights(abstract=True)
    sharded = ShardedStep(cfg, graphdef, state_def, weight_specs(weights), mesh, capacity, dtype, plan=plan)
    steps = DeviceSteps(graphdef, state_def, capacity, sharded=sharded)
    rows = sharded.rows(B)
    if plan is None:
        cache = jax.tree.map(lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                             jax.eval_shape(lambda: init_cache(cfg, rows, capacity, dtype)),
                             sharded.cache_shardings(rows))
    else:
        cache = plan.cache_shapes(rows)
    everywhere = NamedSharding(mesh.mesh, P())
    arg = lambda dt, *shape: jax.ShapeDtypeStruct(shape, dt, sharding=everywhere)
    # The mesh's abstract devices are H100s: the Pallas kernels lower for Triton (ops.choice.interpret)
    with jax.sharding.use_abstract_mesh(mesh.mesh.abstract_mesh):
        if T == 1:  # tokens, pos, active, key, temperature, top_k, top_p
            lowered = steps.decode.lower(weights, cache, arg(jnp.int32, B), arg(jnp.int32, B), arg(jnp.bool_, B),
                                         arg(jnp.uint32, 2), arg(jnp.float32), arg(jnp.int32), arg(jnp.float32),
                                         kernels=kernels)
        else:
            lowered = steps.chunk.lower(weights, cache, arg(jnp.int32, B, T), arg(jnp.int32, B), arg(jnp.int32, B),
                                        last_only=True, kernels=kernels)
    return compile_lowered(lowered)


def collectives(hlo: str) -> dict[str, int]:
    """Collective op -> how many of it the optimized HLO holds (an asynchronous one counted once, by its start)."""
    names = re.findall(r" (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(", hlo)
    return dict(sorted(collections.Counter(names).items()))


def triton_kernels(hlo: str) -> set[str]:
    """The model's Pallas kernels that the optimized HLO calls as Triton custom calls, without their size
    suffixes (``dsv4_sparse_attn``)."""
    calls = "\n".join(line for line in hlo.splitlines() if 'custom_call_target="__gpu$xla.gpu.triton"' in line)
    return set(re.findall(r'op_name="[^"]*/(dsv4_[a-z_]+?)_[a-z]?\d', calls))


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
    p.add_argument("--kernels", nargs="+", default=["xla", "pallas"], choices=tuple(KERNELS))
    p.add_argument("--mesh", nargs="+", default=None,
                   help=f"sharded layouts on {H100S} H100s, e.g. tp=8 dp=8,ep (default: the one-device step)")
    p.add_argument("--hlo-dir", default=None, help="write each step's optimized HLO there")
    args = p.parse_args(argv)
    try:
        layouts = [None] if args.mesh is None else [(text, parse_layout(text)) for text in args.mesh]
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    h100 = h100_compile_only_sharding()
    if h100 is None:
        print("error: no CUDA plugin for JAX; install it with pip install -e '.[aot]'", file=sys.stderr)
        return 2
    cfg = make_config(args.model, args.layers, args.experts)
    dtype = jnp.dtype(args.dtype)
    capacity = args.capacity or max(args.tokens) + 100
    for layout in layouts:
        try:
            mesh = None if layout is None else h100_model_mesh(cfg, layout[1])
        except InputError as e:
            print(f"error: --mesh {layout[0]}: {e}", file=sys.stderr)
            return 2
        for kernels in args.kernels:
            for T in args.tokens:
                name = f"{args.model}_{kernels}_b{args.batch}_t{T}"
                if mesh is not None:
                    name += "_" + layout[0].replace("=", "").replace(",", "_")
                row = {"step": name, **({} if mesh is None else {"mesh": layout[0]}), "dtype": args.dtype}
                try:
                    hlo, seconds = (compiled_step_hlo(cfg, dtype, args.batch, T, capacity, KERNELS[kernels], h100)
                                    if mesh is None else
                                    compiled_sharded_hlo(cfg, dtype, mesh, args.batch, T, capacity, KERNELS[kernels]))
                except NeedsGPU as e:
                    print(json.dumps({**row, "error": str(e)}), flush=True)
                    continue
                if args.hlo_dir:
                    os.makedirs(args.hlo_dir, exist_ok=True)
                    with open(os.path.join(args.hlo_dir, name + ".hlo"), "w") as f:
                        f.write(hlo)
                row.update(compile_s=round(seconds, 1), hlo_lines=hlo.count("\n"), fusions=hlo.count(" fusion("),
                           entry_kernels=entry_kernels(hlo))
                if mesh is not None:
                    row.update(collectives=collectives(hlo), triton_kernels=sorted(triton_kernels(hlo)))
                print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
