"""Run 30 experiment (run from the repository root; kept as the record): the metadata step ending in an
optimization barrier (dsv4_jax/metadata.py, uncommitted at ba82c75) against the one before it (ba82c75's,
copied to run_old/), timed alternately in one process on one Flash-width slice: batch-1 decode at 4K and
128K context (2 rounds), batch 32 x 4K, and a 4K prefill."""
import importlib.util, json, sys, time
import jax.numpy as jnp
import dsv4_jax.model as mdl
from dsv4_jax.random_weights import random_model
from scripts import roofline
from scripts.bench_generate import decode_case, make_config, prefill_case


def load(name, path):  # an old module of the dsv4_jax package (its relative imports resolve to today's)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


VARIANTS = {"no_barrier": load("dsv4_jax._metadata_old", "run_old/metadata_old.py").build_metadata,
            "barrier": mdl.build_metadata}


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

    cases = [(1, 4096, 48), (1, 131072, 48)]
    for rnd in range(2):
        for name, fn in VARIANTS.items():
            mdl.build_metadata = fn
            for b, ctx, steps in cases:
                report(name, rnd, decode_case(model, b, ctx, steps, "pallas"))
    for name, fn in VARIANTS.items():
        mdl.build_metadata = fn
        report(name, 0, decode_case(model, 32, 4096, 16, "pallas"))
        report(name, 0, prefill_case(model, 4096, 4096, "pallas"))


if __name__ == "__main__":
    sys.exit(main())
