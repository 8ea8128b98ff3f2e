"""Run 29 experiment (run from the repository root at ba82c75; kept as the record): the compressor's one-token
kernel that writes the state ring and the compressed caches in place (a24d54c..5011168) against the kernel
before it (1690350's dsv4_jax/compressor.py and kernels_pallas/compressor.py, copied to run_old/), each compiled
with and without programmatic dependent launch (xla_gpu_enable_pdl), timed alternately in one process on one
Flash-width slice at batch 1 x 4K, 2 rounds."""
import importlib.util, json, sys, time
import jax.numpy as jnp
import dsv4_jax.compressor as comp
from dsv4_jax.random_weights import random_model
from scripts import roofline
from scripts.bench_generate import decode_case, make_config


def load(name, path):  # an old module (its relative imports resolve to today's package)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


load("kernels_pallas._compressor_old", "run_old/compressor_kernel_old.py")
old = load("dsv4_jax._compressor_old", "run_old/compressor_model_old.py")
VARIANTS = {"old_compressor": old.Compressor.compress, "new_compressor": comp.Compressor.compress}
OPTIONS = {"default": {}, "pdl": {"xla_gpu_enable_pdl": True}}


def main():
    t0 = time.perf_counter()
    ceil = roofline.torch_ceilings()
    model = random_model(make_config("flash-slice", "SWA,SWA,CSA,HCA,CSA,HCA", None), jnp.bfloat16)
    print(json.dumps({"ceilings": ceil, "built_s": round(time.perf_counter() - t0, 1)}), flush=True)
    for rnd in range(2):
        for name, fn in VARIANTS.items():
            comp.Compressor.compress = fn
            for opt_name, opts in OPTIONS.items():
                try:
                    row = decode_case(model, 1, 4096, 48, "pallas", xla_options=opts)
                except Exception as e:  # an option this XLA rejects is a result, not the end of the run
                    print(json.dumps({"variant": name, "xla": opt_name, "error": str(e)[:300]}), flush=True)
                    continue
                floor_ms = row["bytes_per_step_gb"] * 1e9 / (ceil["copy_2GB_TBps"] * 1e12) * 1e3
                print(json.dumps({"variant": name, "xla": opt_name, "round": rnd,
                                  "decode_ms": round(row["decode_ms_per_step"], 4),
                                  "pct_of_roofline": round(100 * floor_ms / row["decode_ms_per_step"], 1),
                                  "host_dispatch_ms": round(row["host_dispatch_ms"], 4),
                                  "elapsed_s": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
