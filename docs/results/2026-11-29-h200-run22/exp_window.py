"""Run 22 experiment (run from the repository root at cc60080; kept as the record): the one-token decode
window read from the written ring (730f8c1) against the gathered and concatenated window before it
(d945b10's dsv4_jax/attention.py and metadata.py, copied to run_old/), timed alternately in one process on
one Flash-width slice by swapping Attention.__call__ and build_metadata before each variant's trace. Then,
at the new code: batch-32 decode and Engine.generate at batch 1."""
import importlib.util, json, sys, time
import jax, jax.numpy as jnp
import dsv4_jax.attention as attn
import dsv4_jax.model as mdl
from dsv4_jax.random_weights import random_model
from scripts import roofline
from scripts.bench_generate import decode_case, engine_case, make_config


def load(name, path):  # an old module of the dsv4_jax package (its relative imports resolve to today's)
    spec = importlib.util.spec_from_file_location(f"dsv4_jax.{name}", path)
    mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


old_attn, old_meta = load("_attention_old", "run_old/attention_old.py"), load("_metadata_old", "run_old/metadata_old.py")
VARIANTS = {"old_window": (old_attn.Attention.__call__, old_meta.build_metadata),
            "new_window": (attn.Attention.__call__, mdl.build_metadata)}


def use(name):
    attn.Attention.__call__, mdl.build_metadata = VARIANTS[name]


def main():
    t0 = time.perf_counter()
    ceil = roofline.torch_ceilings()
    model = random_model(make_config("flash-slice", "SWA,SWA,CSA,HCA,CSA,HCA", None), jnp.bfloat16)
    print(json.dumps({"ceilings": ceil, "built_s": round(time.perf_counter() - t0, 1)}), flush=True)
    for rnd in range(2):
        for name in ("old_window", "new_window"):
            use(name)
            row = decode_case(model, 1, 4096, 48, "pallas")
            print(json.dumps({"variant": name, "round": rnd, "decode_ms": round(row["decode_ms_per_step"], 4),
                              "host_dispatch_ms": round(row["host_dispatch_ms"], 4),
                              "elapsed_s": round(time.perf_counter() - t0, 1)}), flush=True)
    use("new_window")
    for row in (decode_case(model, 1, 4096, 48, "pallas"), decode_case(model, 32, 4096, 16, "pallas"),
                engine_case(model, 1, 4096, 64, "pallas")):
        if "bytes_per_step_gb" in row:
            floor_ms = row["bytes_per_step_gb"] * 1e9 / (ceil["copy_2GB_TBps"] * 1e12) * 1e3
            row.update(roofline_ms=floor_ms, pct_of_roofline=100 * floor_ms / row["decode_ms_per_step"])
        print(json.dumps({**row, "elapsed_s": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
