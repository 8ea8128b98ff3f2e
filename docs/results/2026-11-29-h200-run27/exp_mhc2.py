"""Run 26 experiment (run from the repository root; kept as the record): mHC sub-block boundaries at batch-1
decode, timed alternately in one process on one Flash-width slice by swapping DecoderLayer.__call__ and
residual_streams before each variant's trace. "base": expand in XLA, then hc_pre (mixing sums in XLA) as at
1690350; "mid": the layer's middle boundary as one hc_expand_pre (the tree's code), the first through
hc_pre with its mixing-sum kernel; "cross": also the boundary between layers (each layer's FFN expand done
by the next layer's attn_hc.expand_and_pre). ``python exp_mhc2.py profile VARIANT``: a profile."""
import json, sys, time
import jax, jax.numpy as jnp
import dsv4_jax.model as mdl
from dsv4_jax.hyper_connection import expand
from dsv4_jax.random_weights import random_model
from scripts import roofline
from scripts.bench_generate import decode_case, make_config

MID_CALL, RESIDUAL = mdl.DecoderLayer.__call__, mdl.DeepseekV4ForCausalLM.residual_streams


def base_call(self, streams, token_ids, meta, cache, kernels="xla"):  # 1690350's DecoderLayer.__call__
    with jax.named_scope("mhc"):
        attn_in, post, comb = self.attn_hc(streams, kernels)
        attn_in = self.input_layernorm(attn_in)
    with jax.named_scope("attention"):
        attn_out, cache = self.self_attn(attn_in, meta, cache, kernels)
    with jax.named_scope("mhc"):
        streams = expand(streams, attn_out, post, comb)
        ffn_in, post, comb = self.ffn_hc(streams, kernels)
        ffn_in = self.post_attention_layernorm(ffn_in)
    with jax.named_scope("moe"):
        ffn_out = self.mlp(ffn_in, token_ids, kernels)
    with jax.named_scope("mhc"):
        return expand(streams, ffn_out, post, comb), cache


def pending_call(self, streams, pending, token_ids, meta, cache, kernels):
    """A layer whose input streams still owe the previous layer's FFN expand (pending: out, post, comb)."""
    with jax.named_scope("mhc"):
        if pending is None:
            attn_in, post, comb = self.attn_hc(streams, kernels)
        else:
            streams, attn_in, post, comb = self.attn_hc.expand_and_pre(streams, *pending, kernels)
        attn_in = self.input_layernorm(attn_in)
    with jax.named_scope("attention"):
        attn_out, cache = self.self_attn(attn_in, meta, cache, kernels)
    with jax.named_scope("mhc"):
        streams, ffn_in, post, comb = self.ffn_hc.expand_and_pre(streams, attn_out, post, comb, kernels)
        ffn_in = self.post_attention_layernorm(ffn_in)
    with jax.named_scope("moe"):
        ffn_out = self.mlp(ffn_in, token_ids, kernels)
    return streams, (ffn_out, post, comb), cache


def cross_residual(self, token_ids, meta, cache, kernels="xla"):
    cfg = self.config
    x = self.model.embed_tokens(token_ids)
    streams = jnp.broadcast_to(x[:, :, None, :], (*x.shape[:2], cfg.hc_mult, x.shape[-1]))
    pending, new_cache = None, []
    for i, (layer, layer_cache) in enumerate(zip(self.model.layers, cache)):
        with jax.named_scope(f"layer_{i}"):
            streams, pending, layer_cache = pending_call(layer, streams, pending, token_ids, meta, layer_cache,
                                                         kernels)
        new_cache.append(layer_cache)
    with jax.named_scope("mhc"):
        return expand(streams, *pending), tuple(new_cache)


VARIANTS = {"base": (base_call, RESIDUAL), "mid": (MID_CALL, RESIDUAL), "cross": (MID_CALL, cross_residual)}


def use(name):
    mdl.DecoderLayer.__call__, mdl.DeepseekV4ForCausalLM.residual_streams = VARIANTS[name]


def main():
    t0 = time.perf_counter()
    model = random_model(make_config("flash-slice", "SWA,SWA,CSA,HCA,CSA,HCA", None), jnp.bfloat16)
    if sys.argv[1:2] == ["profile"]:
        use(sys.argv[2])
        row = decode_case(model, 1, 4096, 8, "pallas", profile=True)
        print(json.dumps({"variant": sys.argv[2], **row}), flush=True)
        return 0
    ceil = roofline.torch_ceilings()
    print(json.dumps({"ceilings": ceil, "built_s": round(time.perf_counter() - t0, 1)}), flush=True)
    for rnd in range(2):
        for name in VARIANTS:
            use(name)
            row = decode_case(model, 1, 4096, 48, "pallas")
            floor_ms = row["bytes_per_step_gb"] * 1e9 / (ceil["copy_2GB_TBps"] * 1e12) * 1e3
            print(json.dumps({"variant": name, "round": rnd, "decode_ms": round(row["decode_ms_per_step"], 4),
                              "pct_of_roofline": round(100 * floor_ms / row["decode_ms_per_step"], 1),
                              "host_dispatch_ms": round(row["host_dispatch_ms"], 4),
                              "elapsed_s": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
