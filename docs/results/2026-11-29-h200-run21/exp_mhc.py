"""Run 21 experiment (run from the repository root at e938f7c; kept as the record): mHC formulations timed
side by side in one process on one Flash-width slice, by swapping dsv4_jax.hyper_connection's functions before each variant's trace.
Variants: base = 2fb4b2a (einsum expand, fp32 dot mixing logits); new = e938f7c; and alternatives.
Also writes the optimized HLO of the decode step of base and new (gzip) to $OUT."""
import gzip, json, os, sys, time
import jax, jax.numpy as jnp
from jax import lax
import dsv4_jax.hyper_connection as hc
import dsv4_jax.model as mdl
import kernels_pallas.hc_pre as hp
from dsv4_jax.basic import FP32, linear, unweighted_rms_norm
from dsv4_jax.engine import DeviceSteps, split_weights
from dsv4_jax.random_weights import random_model
from dsv4_jax.sampling import SamplingParams, sampling_args
from scripts.bench_generate import decode_case, make_config, synthetic_cache

f32 = jnp.float32
new_mix, new_expand = hc.mix_logits, hc.expand


def expand_einsum(streams, block_out, post, comb):
    mixed = jnp.einsum("...ij,...id->...jd", comb, streams.astype(f32), precision=FP32)
    return (post[..., None] * block_out.astype(f32)[..., None, :] + mixed).astype(streams.dtype)


def mix_dot(streams, fn, eps):
    flat = streams.reshape(*streams.shape[:-2], -1).astype(f32)
    return linear(unweighted_rms_norm(flat, eps), fn.astype(f32), precision=FP32)


def mix_scaled_after(streams, fn, eps):  # two reductions of the raw streams, the RMS factor applied after
    x = streams.reshape(*streams.shape[:-2], -1).astype(f32)
    raw = jnp.sum(x[..., None, :] * fn.astype(f32), axis=-1)
    return raw * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def mix_25(streams, fn, eps):  # one reduction: fn's rows and x itself (its sum of squares) as a 25th row
    x = streams.reshape(*streams.shape[:-2], -1).astype(f32)
    rows = jnp.concatenate([jnp.broadcast_to(fn.astype(f32), (*x.shape[:-1], *fn.shape)), x[..., None, :]], -2)
    s = jnp.sum(x[..., None, :] * rows, axis=-1)
    return s[..., :-1] * lax.rsqrt(s[..., -1:] / x.shape[-1] + eps)


VARIANTS = {"base": (expand_einsum, mix_dot), "new": (new_expand, new_mix), "expand_only": (new_expand, mix_dot),
            "scaled_after": (new_expand, mix_scaled_after), "mix25": (new_expand, mix_25)}


def use(name):
    expand, mix = VARIANTS[name]
    hc.expand = mdl.expand = expand
    hc.mix_logits = hp.mix_logits = mix
    hp.hc_pre.clear_cache()


def dump_hlo(model, name, out):
    cfg = model.config
    graphdef, state_def, weights = split_weights(model)
    step = DeviceSteps(graphdef, state_def, 4096 + 200).decode
    cache = jax.eval_shape(lambda: synthetic_cache(cfg, 1, 4096 + 200, jnp.bfloat16, jax.random.PRNGKey(1)))
    greedy = SamplingParams()
    args = (weights, cache, jnp.zeros((1,), jnp.int32), jnp.full((1,), 4096, jnp.int32), jnp.ones((1,), bool),
            jax.random.PRNGKey(0), *sampling_args(greedy))
    text = step.lower(*args, kernels="pallas", filters=greedy.filters).compile().as_text()
    with gzip.open(os.path.join(out, f"hlo_{name}.txt.gz"), "wt") as f:
        f.write(text)


def main():
    out = os.environ["OUT"]
    t0 = time.perf_counter()
    model = random_model(make_config("flash-slice", "SWA,SWA,CSA,HCA,CSA,HCA", None), jnp.bfloat16)
    print(json.dumps({"built_s": round(time.perf_counter() - t0, 1)}), flush=True)
    for name in ("base", "new"):
        use(name)
        dump_hlo(model, name, out)
    order = sys.argv[1].split(",")
    for rnd in range(int(sys.argv[2])):
        for name in order:
            use(name)
            row = decode_case(model, 1, 4096, 48, "pallas")
            print(json.dumps({"variant": name, "round": rnd, "decode_ms": round(row["decode_ms_per_step"], 4),
                              "host_dispatch_ms": round(row["host_dispatch_ms"], 4),
                              "elapsed_s": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
