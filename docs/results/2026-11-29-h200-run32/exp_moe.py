"""Run 32 experiment (run from the repository root; kept as the record): the one-token MoE path with the
token's row shared by its k experts and the clamped SwiGLU applied as the down product loads its input
(expert_rows, uncommitted at a5afcf6) against a5afcf6's (broadcast rows, XLA activation; its moe.py copied to
run_old/), and the mHC pre-step on XLA's path instead of the Pallas kernel (is the kernel still worth it?),
timed alternately in one process on one Flash-width slice at batch 1 x 4K, 3 rounds."""
import importlib.util, json, sys, time
import jax.numpy as jnp
import dsv4_jax.hyper_connection as hc
import dsv4_jax.moe as moe
from dsv4_jax.random_weights import random_model
from scripts import roofline
from scripts.bench_generate import decode_case, make_config


def load(name, path):  # an old module of the dsv4_jax package (its relative imports resolve to today's)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


old_routed = load("dsv4_jax._moe_old", "run_old/moe_old.py").routed_experts
new_routed, pallas_hc = moe.routed_experts, hc.HyperConnection.__call__


def xla_hc(self, streams, norm, kernels="xla"):
    return pallas_hc(self, streams, norm, "xla")


VARIANTS = {"moe_old": (old_routed, pallas_hc), "moe_new": (new_routed, pallas_hc), "mhc_xla": (new_routed, xla_hc)}


def main():
    t0 = time.perf_counter()
    ceil = roofline.torch_ceilings()
    model = random_model(make_config("flash-slice", "SWA,SWA,CSA,HCA,CSA,HCA", None), jnp.bfloat16)
    print(json.dumps({"ceilings": ceil, "built_s": round(time.perf_counter() - t0, 1)}), flush=True)
    for rnd in range(3):
        for name, (routed, hc_call) in VARIANTS.items():
            moe.routed_experts, hc.HyperConnection.__call__ = routed, hc_call
            row = decode_case(model, 1, 4096, 48, "pallas")
            floor_ms = row["bytes_per_step_gb"] * 1e9 / (ceil["copy_2GB_TBps"] * 1e12) * 1e3
            print(json.dumps({"variant": name, "round": rnd, "decode_ms": round(row["decode_ms_per_step"], 4),
                              "roofline_ms": round(floor_ms, 4),
                              "pct_of_roofline": round(100 * floor_ms / row["decode_ms_per_step"], 1),
                              "host_dispatch_ms": round(row["host_dispatch_ms"], 4),
                              "elapsed_s": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
