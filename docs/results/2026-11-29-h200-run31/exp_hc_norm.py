"""Run 31 experiment (run from the repository root; kept as the record): the mHC pre-step kernel applying the
sub-block's RMSNorm itself (uncommitted at eaa9521) against the kernel followed by XLA's norm, timed
alternately in one process on one Flash-width slice by setting hyper_connection.NORM_IN_KERNEL_MAX_TOKENS
before each variant's trace: batch-1 decode at 4K (3 rounds), batch 8 and 32 x 4K, a 4K prefill."""
import json, sys, time
import jax.numpy as jnp
import dsv4_jax.hyper_connection as hc
from dsv4_jax.random_weights import random_model
from scripts import roofline
from scripts.bench_generate import decode_case, make_config, prefill_case

VARIANTS = {"xla_norm": 0, "norm_in_kernel": 1 << 30}


def main():
    t0 = time.perf_counter()
    ceil = roofline.torch_ceilings()
    model = random_model(make_config("flash-slice", "SWA,SWA,CSA,HCA,CSA,HCA", None), jnp.bfloat16)
    print(json.dumps({"ceilings": ceil, "built_s": round(time.perf_counter() - t0, 1)}), flush=True)

    def report(name, rnd, row):
        if "bytes_per_step_gb" in row:
            floor_ms = row["bytes_per_step_gb"] * 1e9 / (ceil["copy_2GB_TBps"] * 1e12) * 1e3
            row.update(roofline_ms=round(floor_ms, 4), pct_of_roofline=round(100 * floor_ms / row["decode_ms_per_step"], 1))
        print(json.dumps({"variant": name, "round": rnd, **row, "elapsed_s": round(time.perf_counter() - t0, 1)}),
              flush=True)

    for rnd in range(3):
        for name, limit in VARIANTS.items():
            hc.NORM_IN_KERNEL_MAX_TOKENS = limit
            report(name, rnd, decode_case(model, 1, 4096, 48, "pallas"))
    for name, limit in VARIANTS.items():
        hc.NORM_IN_KERNEL_MAX_TOKENS = limit
        report(name, 0, decode_case(model, 8, 4096, 32, "pallas"))
        report(name, 0, decode_case(model, 32, 4096, 16, "pallas"))
        report(name, 0, prefill_case(model, 4096, 4096, "pallas"))


if __name__ == "__main__":
    sys.exit(main())
