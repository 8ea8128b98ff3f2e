"""Run 25 experiment (run from the repository root; kept as the record): the decode step's dense layers
through kernels_pallas/gemv.py against XLA's GEMVs, timed alternately in one process on one Flash-width
slice by swapping basic.Linear.__call__ before each variant's trace. "gemv_small": only matrices of at most
16M elements (not q_b, o_b, the LM head). ``python exp_gemv.py profile VARIANT``: a profile of one variant."""
import json, math, sys, time
import jax, jax.numpy as jnp
import dsv4_jax.basic as basic
from dsv4_jax.random_weights import random_model
from kernels_pallas import gemv as gv
from kernels_pallas.common import interpret_default
from scripts import roofline
from scripts.bench_generate import decode_case, make_config

BASE = basic.Linear.__call__


def patched(limit):
    def call(self, x, out_dtype=None):
        w = self.weight[...]
        rows = math.prod(x.shape[:-1])
        if w.dtype == x.dtype and gv.supported(rows, *w.shape) and w.size <= limit:
            out = gv.gemv(x.reshape(rows, x.shape[-1]), w, out_dtype=out_dtype or x.dtype,
                          interpret=interpret_default())
            return out.reshape(*x.shape[:-1], w.shape[0])
        return BASE(self, x, out_dtype)
    return call


VARIANTS = {"base": BASE, "gemv_all": patched(math.inf), "gemv_small": patched(16 << 20)}


def main():
    t0 = time.perf_counter()
    model = random_model(make_config("flash-slice", "SWA,SWA,CSA,HCA,CSA,HCA", None), jnp.bfloat16)
    if sys.argv[1:2] == ["profile"]:
        basic.Linear.__call__ = VARIANTS[sys.argv[2]]
        row = decode_case(model, 1, 4096, 8, "pallas", profile=True)
        print(json.dumps({"variant": sys.argv[2], **row}), flush=True)
        return 0
    ceil = roofline.torch_ceilings()
    print(json.dumps({"ceilings": ceil, "built_s": round(time.perf_counter() - t0, 1)}), flush=True)
    for rnd in range(2):
        for name in VARIANTS:
            basic.Linear.__call__ = VARIANTS[name]
            row = decode_case(model, 1, 4096, 48, "pallas")
            floor_ms = row["bytes_per_step_gb"] * 1e9 / (ceil["copy_2GB_TBps"] * 1e12) * 1e3
            print(json.dumps({"variant": name, "round": rnd, "decode_ms": round(row["decode_ms_per_step"], 4),
                              "pct_of_roofline": round(100 * floor_ms / row["decode_ms_per_step"], 1),
                              "host_dispatch_ms": round(row["host_dispatch_ms"], 4),
                              "elapsed_s": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
