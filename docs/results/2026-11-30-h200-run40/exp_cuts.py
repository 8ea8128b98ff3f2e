"""Planned experiment (run from the repository root; keep it as the record): four untimed cuts of the batch-1
step's small kernels, against the step without them, alternating in one process on one Flash-width slice at
batch 1 x 4K (compiled for an H100 on the CPU host the step launched 266 -> 249 -> 240 -> 225 -> 219 kernels):
  sumsq: hc_pre sums the streams' squares itself when a program holds whole rows (4c25863; off: f8e76fb's
    hc_pre, copied to run_old/, which takes XLA's sum of squares);
  bounds: each sparse-attention program reduces its token's mask and id rows to its walk's bounds (d6fe3e5; off:
    4c25863's module, copied to run_old/, whose wrapper reduces and stacks them in XLA);
  router: the learned router's choice as one kernel (eca254c; off: its XLA reference, moe.route_learned);
  swiglu: the one-token gate_up expert kernel ends in the SwiGLU (c3bcf41; off: eca254c's routed_experts, copied
    to run_old/, which applies it in XLA between the two expert kernels).
Checked without a GPU (each variant's step compiled for an H100 on the CPU host, fusions + custom calls): base 266,
all_four 219, no_sumsq 236, no_bounds 228, no_router 234, no_swiglu 225. MODEL=demo runs it on a CPU as a dry run."""
import importlib.util, json, os, sys, time
import jax
import jax.numpy as jnp
import dsv4_jax.moe as moe
import kernels_pallas.hc_pre as hp
import kernels_pallas.router as router
import kernels_pallas.sparse_attention as sa
from dsv4_jax.random_weights import random_model
from scripts import roofline
from scripts.bench_generate import decode_case, make_config


def load(name, path):  # an old module of the package named (its relative imports resolve to today's)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def xla_route(logits, bias, *, k, route_scale, interpret=False):
    return router.reference(logits, bias, k=k, route_scale=route_scale)


SWITCH = {  # name -> (on, off)
    "sumsq": (hp.hc_pre, load("kernels_pallas._hc_pre_old", "run_old/hc_pre_old.py").hc_pre),
    "bounds": (sa.sparse_attention_prefill,
               load("kernels_pallas._sparse_attention_old", "run_old/sparse_attention_old.py").sparse_attention_prefill),
    "router": (router.route, xla_route),
    "swiglu": (moe.routed_experts, load("dsv4_jax._moe_old", "run_old/moe_old.py").routed_experts),
}
TARGET = {"sumsq": (hp, "hc_pre"), "bounds": (sa, "sparse_attention_prefill"), "router": (router, "route"),
          "swiglu": (moe, "routed_experts")}
ON = {k: True for k in SWITCH}
VARIANTS = {"base": {k: False for k in ON}, "all_four": ON, **{f"no_{k}": {**ON, k: False} for k in ON}}


def use(v):
    jax.clear_caches()
    for name, on in v.items():
        setattr(*TARGET[name], SWITCH[name][0 if on else 1])


def main():
    t0 = time.perf_counter()
    gpu = os.environ.get("MODEL", "flash-slice") == "flash-slice"
    ceil = roofline.torch_ceilings() if gpu else None
    model = random_model(make_config(os.environ.get("MODEL", "flash-slice"), "SWA,SWA,CSA,HCA,CSA,HCA", None),
                         jnp.bfloat16)
    ctx, steps = (4096, 48) if gpu else (64, 2)
    print(json.dumps({"ceilings": ceil, "built_s": round(time.perf_counter() - t0, 1)}), flush=True)
    order = [("base", "warm-up")] + [(n, r) for r in (0, 1) for n in ("base", "all_four")] + \
            [(f"no_{k}", 0) for k in ON]
    for name, rnd in order:
        use(VARIANTS[name])
        row = decode_case(model, 1, ctx, steps, "pallas")
        out = {"variant": name, "round": rnd, "decode_ms": round(row["decode_ms_per_step"], 4)}
        if ceil:
            floor_ms = row["bytes_per_step_gb"] * 1e9 / (ceil["copy_2GB_TBps"] * 1e12) * 1e3
            out.update(roofline_ms=round(floor_ms, 4), pct_of_roofline=round(100 * floor_ms / row["decode_ms_per_step"], 1))
        print(json.dumps({**out, "elapsed_s": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
