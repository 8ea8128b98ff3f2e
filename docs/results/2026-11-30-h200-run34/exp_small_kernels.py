"""Planned experiment (run from the repository root; keep it as the record): three cuts of the batch-1 step's
small kernels (b3a10f5), against the step without them, alternating in one process on one
Flash-width slice at batch 1 x 4K:
  rank_topk: the router's top-k by rank (moe.top_k_ids) instead of lax.top_k (off: RANK_TOP_K_MAX_TOKENS = 0);
  rms_in_kernel: hc_pre applies the mixing logits' RMS factor (off: kernels_pallas.hc_pre.MIX_AS_SUM_MAX_TOKENS
    = 0, so XLA applies it, as before);
  shared_x: expert_rows reads the token's one row for its 6 experts (off: e7d1376's routed_experts, copied to
    run_old/, which broadcasts it to 6 rows first).
MODEL=demo runs it on a CPU as a dry run."""
import importlib.util, json, os, sys, time
import jax
import jax.numpy as jnp
import dsv4_jax.moe as moe
import kernels_pallas.hc_pre as hp
from dsv4_jax.random_weights import random_model
from scripts import roofline
from scripts.bench_generate import decode_case, make_config


def load(name, path):  # an old module of the dsv4_jax package (its relative imports resolve to today's)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


old_routed, new_routed = load("dsv4_jax._moe_old", "run_old/moe_old.py").routed_experts, moe.routed_experts
ON = {"rank_topk": True, "rms_in_kernel": True, "shared_x": True}
VARIANTS = {"base": {k: False for k in ON}, "all_three": ON, "no_rank_topk": {**ON, "rank_topk": False},
            "no_rms_in_kernel": {**ON, "rms_in_kernel": False}, "no_shared_x": {**ON, "shared_x": False}}


def use(v):
    jax.clear_caches()  # hc_pre is jitted: its trace would keep the switch's earlier value
    moe.RANK_TOP_K_MAX_TOKENS = 16 if v["rank_topk"] else 0
    hp.MIX_AS_SUM_MAX_TOKENS = 16 if v["rms_in_kernel"] else 0
    moe.routed_experts = new_routed if v["shared_x"] else old_routed


def main():
    t0 = time.perf_counter()
    gpu = os.environ.get("MODEL", "flash-slice") == "flash-slice"
    ceil = roofline.torch_ceilings() if gpu else None
    model = random_model(make_config(os.environ.get("MODEL", "flash-slice"), "SWA,SWA,CSA,HCA,CSA,HCA", None),
                         jnp.bfloat16)
    ctx, steps = (4096, 48) if gpu else (64, 2)
    print(json.dumps({"ceilings": ceil, "built_s": round(time.perf_counter() - t0, 1)}), flush=True)
    order = [("base", "warm-up")] + [(n, r) for r in (0, 1) for n in ("base", "all_three")] + \
            [(n, 0) for n in ("no_rank_topk", "no_rms_in_kernel", "no_shared_x")]
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
