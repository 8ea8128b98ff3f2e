"""Launch each named bench case's Pallas kernel exactly once (for ncu: one profiled launch per kernel).

    python ncu_probe.py MODULE:CASE[:JSON_CONFIG] ...
"""
import importlib, json, sys
import jax

for spec in sys.argv[1:]:
    mod, case, *cfg = spec.split(":", 2)
    config = json.loads(cfg[0]) if cfg else {}
    [c] = [c for c in importlib.import_module(f"kernels_pallas.{mod}").bench_cases() if c["name"] == case]
    args = jax.block_until_ready(c["args"](jax.random.PRNGKey(0)))
    f = jax.jit(lambda *a: c["pallas"](*a, **{**c.get("kwargs", {}), **config}))
    jax.block_until_ready(f(*args))
    print("ran", spec, flush=True)
