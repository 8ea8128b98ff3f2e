"""Run 49: each compressor configuration of the sweep against the reference at the bench shapes (max rel err)."""
import functools, json, sys
import jax, jax.numpy as jnp
from kernels_pallas import compressor as cp

configs = json.loads(sys.argv[1])
for case in cp.bench_cases():
    if not case["name"].startswith("prefill"):
        continue
    inputs = case["args"](jax.random.PRNGKey(41))
    ref = jax.jit(functools.partial(case["reference"], **case["kwargs"]))(*inputs)
    for c in configs:
        try:
            out = jax.jit(functools.partial(case["pallas"], **case["kwargs"], **c, poison_outputs=True))(*inputs)
            err = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
        except Exception as e:
            err = f"{type(e).__name__}: {str(e)[:100]}"
        print(json.dumps({"case": case["name"], "config": c, "max_rel_err": err}), flush=True)
