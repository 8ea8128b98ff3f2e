"""Component-level parity with transformers' DeepseekV4 modules (fp32, eager), on the same weights and inputs.

Each test runs one of our pure functions / NNX modules next to the reference module it mirrors. Module
inputs and outputs of the reference come from forward hooks on a parity case's reference model while it
runs stateless (``use_cache=False``, so every compressor/indexer call has ``past_key_values=None``); our
side loads the same weights through ``from_pretrained`` and runs one stateless chunk (start 0, capacity S,
fresh cache). Tolerance: max |ours - ref| <= 1e-5 * max |ref| unless the comparison is exact.
"""

from __future__ import annotations

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers.models.deepseek_v4.modeling_deepseek_v4 as hf
from transformers.activations import ACT2FN

import dsv4_jax
from conftest import tiny
from dsv4_jax.model import metadata
from dsv4_jax import ops
from dsv4_jax.model import moe
from dsv4_jax.model.cache import init_layer_cache
from dsv4_jax.model.config import CSA, HCA, SLIDING, DeepseekV4Config, YarnScaling
from dsv4_jax.model.hyper_connection import expand, hyper_head
from dsv4_jax.ops.hyper_connection import collapse, hc_weights
from kernels_pallas.hc_pre import MIX_AS_SUM_MAX_TOKENS
from dsv4_jax.ops.indexer import index_scores
from dsv4_jax.model.rope import apply_rope, default_inv_freq, inv_freq_for, rope_angles
from reference import hf_config

TOL = 1e-5


# ----- helpers ---------------------------------------------------------------------------------------------

def to_np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def assert_close(ours, ref, what: str = "", tol: float = TOL):
    """max |ours - ref| <= tol * max |ref| over the whole tensor (shapes must agree, ours must be finite)."""
    ours, ref = np.asarray(to_np(ours), np.float64), np.asarray(to_np(ref), np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != reference {ref.shape}"
    assert np.isfinite(ours).all(), f"{what}: non-finite values"
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err <= tol, f"{what}: max|ours - ref| / max|ref| = {err:.2e} > {tol:.0e}"


def assert_same_sets(ours, ref, what: str = ""):
    """Integer picks [..., k] equal as per-row sets (sorted), -1 entries included."""
    ours, ref = to_np(ours), to_np(ref)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != reference {ref.shape}"
    bad = [tuple(map(int, row)) for row in np.argwhere((np.sort(ours, -1) != np.sort(ref, -1)).any(-1))]
    assert not bad, (f"{what}: {len(bad)} rows pick different sets, first at {bad[0]}: "
                     f"ours {np.sort(ours[bad[0]])} vs reference {np.sort(ref[bad[0]])}")


def topk_gap(values, k: int) -> float:
    """Smallest gap between the k-th and (k+1)-th largest value over all rows of [..., N] (N > k)."""
    top = -np.sort(-np.asarray(values, np.float64), axis=-1)
    return float((top[..., k - 1] - top[..., k]).min())


def dense_weights(weights, idx, n: int) -> np.ndarray:
    """Routing (weights, expert ids) [T, k] -> [T, n] (order-independent comparison of the picked weights)."""
    out = np.zeros((idx.shape[0], n))
    np.put_along_axis(out, to_np(idx).astype(np.int64), to_np(weights), axis=-1)
    return out


def walk(root, path: str):
    """Attribute path ``model.layers.2.mlp`` on either model (torch ModuleList and nnx.List index by int)."""
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


# The reference modules whose calls are recorded (each runs once per forward).
RECORDED = (hf.DeepseekV4DecoderLayer, hf.DeepseekV4Attention, hf.DeepseekV4HCACompressor,
            hf.DeepseekV4CSACompressor, hf.DeepseekV4Indexer, hf.DeepseekV4IndexerScorer)


@dataclasses.dataclass
class Call:
    args: tuple
    kwargs: dict
    output: object


@torch.no_grad()
def record_calls(model, ids) -> dict[str, Call]:
    """Run the reference stateless on ids and keep every RECORDED module's (args, kwargs, output) by name."""
    calls: dict[str, Call] = {}

    def hook(name):
        def record(module, args, kwargs, output):
            assert name not in calls, f"{name} ran twice"
            calls[name] = Call(args, kwargs, output)
        return record

    handles = [m.register_forward_hook(hook(n), with_kwargs=True)
               for n, m in model.named_modules() if isinstance(m, RECORDED)]
    try:
        model(input_ids=torch.as_tensor(ids, dtype=torch.long), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return calls


class Components:
    """A parity case: both models on the same weights, the reference's recorded calls, stateless metadata."""

    def __init__(self, case):
        self.cfg, self.ids, self.ref = case.cfg, case.ids, case.ref
        self.ours = dsv4_jax.from_pretrained(case.path, dtype="float32")
        self.calls = record_calls(case.ref, case.ids)
        self.B, self.S = case.ids.shape
        self.C = metadata.padded_chunk_len(self.cfg, self.S)
        self.meta = self.metadata(capacity=self.S)

    def metadata(self, capacity: int):
        """One stateless chunk: start 0, S real tokens padded to C, caches sized to ``capacity`` tokens."""
        return metadata.build_metadata(self.cfg, jnp.zeros((self.B,), jnp.int32),
                                       jnp.full((self.B,), self.S, jnp.int32), self.C, capacity)

    def pair(self, path: str):
        return walk(self.ours, path), walk(self.ref, path)

    def pad(self, x) -> jnp.ndarray:
        """[B, S, ...] (torch or numpy) -> [B, C, ...] zero padded along the sequence."""
        x = to_np(x)
        return jnp.asarray(np.pad(x, [(0, 0), (0, self.C - x.shape[1])] + [(0, 0)] * (x.ndim - 2)))

    def fresh_cache(self, layer: int, capacity: int | None = None):
        return init_layer_cache(self.cfg, layer, self.B, capacity or self.S, jnp.float32)


@pytest.fixture(scope="session")
def components(reference_case):
    """components(name) -> Components for a PARITY_CASES entry, cached for the session."""
    cache = {}

    def get(name: str) -> Components:
        if name not in cache:
            cache[name] = Components(reference_case(name))
        return cache[name]

    return get


def random_streams(rng, cfg, batch=2, seq=5) -> np.ndarray:
    """[B, S, n, d] residual streams that differ from each other, with per-stream scales 0.1 .. 5."""
    shape = (batch, seq, cfg.hc_mult, cfg.hidden_size)
    return (rng.randn(*shape) * rng.uniform(0.1, 5.0, shape[:3] + (1,))).astype(np.float32)


# ----- 1. RoPE ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("head_dim,rope_dim", [(32, 16), (16, 16), (64, 8)])
def test_rope_matches_reference(head_dim, rope_dim):
    """Interleaved RoPE on the trailing slice (and its inverse) vs apply_rotary_pos_emb, at random positions."""
    cfg = tiny(head_dim=head_dim, qk_rope_head_dim=rope_dim, index_head_dim=max(16, rope_dim))
    rng = np.random.RandomState(head_dim + rope_dim)
    B, S, H = 2, 11, 3
    x = rng.randn(B, S, H, head_dim).astype(np.float32)
    positions = rng.randint(0, 50_000, (B, S))
    rotary = hf.DeepseekV4RotaryEmbedding(hf_config(cfg))
    x_ref = torch.tensor(x).transpose(1, 2)  # reference layout [B, H, S, D]
    for kind in ("main", "compress"):
        ref_cos, ref_sin = rotary(x_ref, torch.tensor(positions), layer_type=kind)
        cos, sin = rope_angles(jnp.asarray(positions), inv_freq_for(cfg, kind))
        assert_close(cos, ref_cos, f"{kind} cos")
        assert_close(sin, ref_sin, f"{kind} sin")
        cos_h, sin_h = cos[:, :, None], sin[:, :, None]
        for inverse in (False, True):
            ref = hf.apply_rotary_pos_emb(x_ref, ref_cos, -ref_sin if inverse else ref_sin).transpose(1, 2)
            ours = apply_rope(jnp.asarray(x), cos_h, sin_h, inverse=inverse)
            assert_close(ours, ref, f"{kind} rope (inverse={inverse})")
            np.testing.assert_array_equal(np.asarray(ours)[..., :-rope_dim], x[..., :-rope_dim])  # nope untouched
        # Without a head axis (the K=V path and compressed entries): cos/sin [B, S, R/2] against x [B, S, D].
        ref_kv = hf.apply_rotary_pos_emb(torch.tensor(x[:, None, :, 0]), ref_cos, ref_sin)[:, 0]
        assert_close(apply_rope(jnp.asarray(x[:, :, 0]), cos, sin), ref_kv, f"{kind} rope without heads")
        round_trip = apply_rope(apply_rope(jnp.asarray(x), cos_h, sin_h), cos_h, sin_h, inverse=True)
        assert_close(round_trip, x, f"{kind} inverse(rope(x))")


# ----- 2. inverse frequencies ------------------------------------------------------------------------------

# name -> (config, whether YaRN changes the compress frequencies)
INV_FREQ_CASES = {
    "tiny_yarn": (tiny(), True),  # lo = 0, hi = 1: every pair but the first divided by the factor
    "flash": (DeepseekV4Config.flash(), True),  # R 64, theta 160000, factor 16: lo 15, hi 25 (a real ramp)
    "custom_betas": (tiny(qk_rope_head_dim=32, index_head_dim=32, rope_theta=50_000.0, compress_rope_theta=1e6,
                          compress_yarn=YarnScaling(8.0, 4096, beta_fast=16.0, beta_slow=2.0)), True),
    "zero_width_ramp": (tiny(compress_yarn=YarnScaling(4.0, 4)), True),  # lo = hi = 0: the +0.001 guard
    "inverted_betas": (tiny(compress_yarn=YarnScaling(4.0, 4096, beta_fast=1.0, beta_slow=32.0)), True),
    "factor_one": (tiny(compress_yarn=YarnScaling(1.0, 16)), False),
    "no_yarn": (tiny(compress_yarn=None), False),
}


@pytest.mark.parametrize("name", sorted(INV_FREQ_CASES))
def test_inv_freq_matches_reference(name):
    cfg, bends = INV_FREQ_CASES[name]
    rotary = hf.DeepseekV4RotaryEmbedding(hf_config(cfg))
    for kind in ("main", "compress"):
        ours, ref = inv_freq_for(cfg, kind), to_np(getattr(rotary, f"{kind}_inv_freq"))
        assert ours.dtype == np.float32 and ours.shape == (cfg.qk_rope_head_dim // 2,)
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=0, err_msg=f"{name} {kind}")
    np.testing.assert_allclose(inv_freq_for(cfg, "main"), default_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta))
    unbent = default_inv_freq(cfg.qk_rope_head_dim, cfg.compress_rope_theta)
    assert np.allclose(inv_freq_for(cfg, "compress"), unbent, rtol=1e-6, atol=0) != bends


# ----- 3. mHC ----------------------------------------------------------------------------------------------

# Token counts (batch 2 x seq) on either side of MIX_AS_SUM_MAX_TOKENS: the mixing logits as a sum and as a matmul.
MIX_SEQS = (5, MIX_AS_SUM_MAX_TOKENS // 2 + 3)


@pytest.mark.parametrize("path,comb_scale,seq", [("model.layers.2.attn_hc", None, MIX_SEQS[0]),
                                                 ("model.layers.3.ffn_hc", None, MIX_SEQS[1]),
                                                 ("model.layers.2.attn_hc", 10.0, MIX_SEQS[0]),
                                                 ("model.layers.2.attn_hc", 10.0, MIX_SEQS[1])])
def test_hyper_connection_matches_reference(components, path, comb_scale, seq):
    """hc_weights + collapse vs DeepseekV4HyperConnection (post, comb, collapsed); expand vs the decoder
    layer's mixing formula post * out + comb^T X. With a large comb scale the comb logits are peaked and
    Sinkhorn is still far from converged after 20 iterations, so the iteration schedule is checked too."""
    comp = components("mixed")
    cfg, (ours, ref) = comp.cfg, comp.pair(path)
    scale = ours.scale[...]
    if comb_scale is not None:
        ref = copy.deepcopy(ref)
        with torch.no_grad():
            ref.scale[2] = comb_scale
        scale = jnp.asarray(to_np(ref.scale))
    rng = np.random.RandomState(1)
    streams = random_streams(rng, cfg, seq=seq)
    with torch.no_grad():
        ref_post, ref_comb, ref_collapsed = ref(torch.tensor(streams))
    pre, post, comb = hc_weights(jnp.asarray(streams), ours.fn[...], ours.base[...], scale, n=cfg.hc_mult,
                                 rms_eps=cfg.rms_norm_eps, hc_eps=cfg.hc_eps, sinkhorn_iters=cfg.hc_sinkhorn_iters)
    assert_close(post, ref_post, "post")
    assert_close(comb, ref_comb, "comb")
    assert_close(collapse(jnp.asarray(streams), pre), ref_collapsed, "collapsed")

    # The mixing formula of DeepseekV4DecoderLayer.forward, on the reference's own post/comb.
    comb_np = to_np(ref_comb)
    assert np.abs(comb_np - comb_np.swapaxes(-1, -2)).max() > 1e-3, "comb is symmetric: transposition untested"
    block_out = rng.randn(*streams.shape[:2], cfg.hidden_size).astype(np.float32)
    ref_mixed = ref_post.unsqueeze(-1) * torch.tensor(block_out).unsqueeze(-2) + torch.matmul(
        ref_comb.transpose(-1, -2), torch.tensor(streams))
    assert_close(expand(jnp.asarray(streams), jnp.asarray(block_out), to_np(ref_post), comb_np), ref_mixed, "expand")


def test_fp32_products_ask_for_full_precision():
    """The fp32 products the reference computes in fp32 (router logits, mHC mixing logits, the mHC stream
    mix) ask XLA for full precision: a GPU's default rounds fp32 inputs to TF32 (10-bit mantissa), PyTorch's
    does not. A CPU computes fp32 either way, so the traced products are checked, traced at JAX's default
    precision: under the suite's "highest" (conftest) every product would ask for it. The forms written as
    fp32 multiply-adds (the mHC mix, decode-sized mixing logits) must contain no dot at all."""
    n, d, E = 4, 16, 8
    fn = jnp.ones(((2 + n) * n, n * d))

    def mhc_weights(T):
        return jax.make_jaxpr(lambda s: hc_weights(s, fn, jnp.zeros((2 + n) * n), jnp.ones(3), n=n, rms_eps=1e-6,
                                                   hc_eps=1e-6, sinkhorn_iters=2))(jnp.ones((T, n, d)))

    T_sum, T_dot = MIX_AS_SUM_MAX_TOKENS, MIX_AS_SUM_MAX_TOKENS + 1
    with jax.default_matmul_precision("default"):
        matmuls = {"router": jax.make_jaxpr(moe.router_scores)(jnp.ones((3, d), jnp.bfloat16),
                                                               jnp.ones((E, d), jnp.bfloat16)),
                   "mHC weights (prefill)": mhc_weights(T_dot)}
        sums = {"mHC weights (decode)": mhc_weights(T_sum),
                "mHC expand": jax.make_jaxpr(expand)(jnp.ones((T_dot, n, d)), jnp.ones((T_dot, d)),
                                                     jnp.ones((T_dot, n)), jnp.ones((T_dot, n, n)))}

    def dots(jaxpr):
        return [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]

    for what, jaxpr in matmuls.items():
        assert dots(jaxpr), what
        for e in dots(jaxpr):
            assert e.params["precision"] == (jax.lax.Precision.HIGHEST,) * 2, (what, e.params["precision"])
    for what, jaxpr in sums.items():
        assert not dots(jaxpr), what


@pytest.mark.parametrize("seq", MIX_SEQS)
def test_hyper_head_matches_reference(components, seq):
    comp = components("mixed")
    cfg, (ours, ref) = comp.cfg, comp.pair("model.hc_head")
    streams = random_streams(np.random.RandomState(2), cfg, seq=seq)
    with torch.no_grad():
        ref_out = ref(torch.tensor(streams))
    ours_out = hyper_head(jnp.asarray(streams), ours.hc_fn[...], ours.hc_base[...], ours.hc_scale[...],
                          rms_eps=cfg.rms_norm_eps, hc_eps=cfg.hc_eps)
    assert_close(ours_out, ref_out, "hyper head")


# ----- 4. compressors --------------------------------------------------------------------------------------

# (case, layer): CSA and HCA layers with S not a multiple of m (trailing incomplete windows), batch 2 and 1.
COMPRESSOR_LAYERS = [("mixed", 2), ("mixed", 3), ("flash_like", 2), ("flash_like", 3)]


@pytest.mark.parametrize("name,layer", COMPRESSOR_LAYERS)
def test_compressor_entries_match_reference(components, name, layer):
    """Compressed cache rows after one stateless chunk vs the reference compressor's compressed_kv (and, on
    CSA layers, the indexer's compressed keys vs the keys the reference scorer receives). Row w is entry w:
    entry 0 covers the w = 0 overlap masking, the RoPE position of entry w is w * m."""
    comp = components(name)
    cfg, path = comp.cfg, f"model.layers.{layer}.self_attn.compressor"
    ours, ref = comp.pair(path)
    m = ours.ratio
    assert cfg.layer_types[layer] == (CSA if ours.overlap else HCA) and comp.S % m != 0
    call = comp.calls[path]
    assert call.args[3] is None  # past_key_values: the stateless path
    x = comp.pad(call.args[0])
    cm = comp.meta.compression[m]
    n_entries = comp.S // m

    # RoPE positions of the entries: w * m with the compress rope.
    ref_cos, ref_sin = ref.rotary_emb(call.args[0], torch.arange(n_entries)[None] * m, layer_type="compress")
    assert_close(cm.entry_cos[:, :n_entries], ref_cos.expand(comp.B, -1, -1), "entry cos")
    assert_close(cm.entry_sin[:, :n_entries], ref_sin.expand(comp.B, -1, -1), "entry sin")

    cache = comp.fresh_cache(layer)
    rows = np.asarray(ours.compress(x, cache.compressor, cache.compressed_kv, cm)[0])
    ref_rows = call.output[0][:, 0]  # [B, N, D]
    assert rows.shape == ref_rows.shape == (comp.B, n_entries, cfg.head_dim)
    for w in range(n_entries):  # per entry, so a wrong overlap or position shows which row
        assert_close(rows[:, w], ref_rows[:, w], f"layer {layer} entry {w}")

    # A larger cache: the trailing incomplete window writes nothing.
    capacity = comp.S + m
    big = comp.fresh_cache(layer, capacity)
    big_rows = np.asarray(ours.compress(x, big.compressor, big.compressed_kv,
                                        comp.metadata(capacity).compression[m])[0])
    np.testing.assert_array_equal(big_rows[:, :n_entries], rows)
    assert big_rows.shape[1] > n_entries and not big_rows[:, n_entries:].any()

    if ours.indexer is not None:
        keys = np.asarray(ours.indexer.compress(x, cache.indexer, cache.index_keys, cm)[0])
        ref_keys = comp.calls[path + ".indexer.scorer"].args[1]  # [B, N, D_I]
        for w in range(n_entries):
            assert_close(keys[:, w], ref_keys[:, w], f"layer {layer} indexer key {w}")


# ----- 5. indexer ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,above_topk", [("mixed", True), ("flash_like", False)])
def test_indexer_matches_reference(components, name, above_topk):
    """Index scores vs DeepseekV4IndexerScorer and top-k sets vs DeepseekV4Indexer.forward (layer 2, CSA).
    "mixed" has more compressed entries than index_topk (selection at work, -1 for early queries);
    "flash_like" fewer (k = entry count, -1 wherever fewer are visible)."""
    comp = components(name)
    cfg, layer = comp.cfg, 2
    path = f"model.layers.{layer}.self_attn.compressor.indexer"
    indexer, _ = comp.pair(path)
    call, scorer_call = comp.calls[path], comp.calls[path + ".scorer"]
    m, H, D = cfg.csa_compress_rate, cfg.index_n_heads, cfg.index_head_dim
    assert (comp.S // m > cfg.index_topk) == above_topk
    x, q_latent = comp.pad(call.args[0]), comp.pad(call.args[1])
    cos, sin = comp.meta.rope["compress"]
    cache = comp.fresh_cache(layer)
    picks, keys, _ = indexer(x, q_latent, cos, sin, cache.indexer, cache.index_keys,
                             comp.meta.compression[m])

    # Scores from our query path, our keys and our head weights.
    q = apply_rope(indexer.q_b_proj(q_latent).reshape(comp.B, comp.C, H, D), cos[:, :, None], sin[:, :, None])
    assert_close(q[:, :comp.S], scorer_call.args[0], "indexer queries")
    head_weights = indexer.scorer.weights_proj(x, jnp.float32) * (D**-0.5 * H**-0.5)
    scores = np.asarray(index_scores(q, keys, head_weights))[:, :comp.S]
    ref_scores = to_np(scorer_call.output)
    assert_close(scores, ref_scores, "index scores")

    ref_picks = to_np(call.output)
    k = min(cfg.index_topk, comp.S // m)
    assert ref_picks.shape == (comp.B, comp.S, k) and (ref_picks == -1).any()
    visible = (np.arange(comp.S) + 1) // m
    crowded = visible > k  # queries whose selection drops some visible entries
    assert crowded.any() == above_topk
    if above_topk:  # no tie at the selection boundary, by more than our score error
        gap = topk_gap(np.where(np.arange(scores.shape[-1]) < visible[:, None], ref_scores, -np.inf)[:, crowded], k)
        assert gap > 100 * np.abs(scores - ref_scores).max(), f"top-k boundary gap {gap:.2e} too small"
    assert_same_sets(np.asarray(picks)[:, :comp.S], ref_picks, "indexer top-k")


# ----- 6. router -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layer", [0, 3])  # hash router, learned router
def test_router_matches_reference(components, layer):
    comp = components("mixed")
    cfg, (ours, ref) = comp.cfg, comp.pair(f"model.layers.{layer}.mlp.gate")
    rng = np.random.RandomState(layer)
    T, k, E = 40, cfg.num_experts_per_tok, cfg.n_routed_experts
    x = (2 * rng.randn(T, cfg.hidden_size)).astype(np.float32)
    ids = rng.randint(0, cfg.vocab_size, T)
    with torch.no_grad():
        ref_logits, ref_w, ref_idx = ref(torch.tensor(x), torch.tensor(ids)) if ours.is_hash else ref(torch.tensor(x))
    scores = moe.router_scores(jnp.asarray(x), ours.weight[...])
    assert_close(scores, ACT2FN["sqrtsoftplus"](ref_logits), "sqrt-softplus scores")
    if ours.is_hash:
        w, idx = moe.route_hash(scores, ours.tid2eid[...], jnp.asarray(ids), cfg.routed_scaling_factor)
    else:
        assert topk_gap(to_np(ref.e_score_correction_bias) + np.asarray(scores), k) > 1e-4  # no near-ties
        w, idx = moe.route_learned(scores, ours.e_score_correction_bias[...], k, cfg.routed_scaling_factor)
    assert_same_sets(idx, ref_idx, "expert ids")
    assert_close(dense_weights(w, idx, E), dense_weights(ref_w, ref_idx, E), "routing weights")


def test_sqrt_softplus_routing_is_underflow_safe():
    """router_scores on logits in [-200, 200] vs torch's sqrtsoftplus: finite, non-negative, non-decreasing,
    elementwise close wherever softplus is a normal float; then learned routing on extreme rows (incl. all
    scores 0) vs a DeepseekV4TopKRouter with an identity gate: no NaN from the renormalisation."""
    E = 8
    logits = np.concatenate([np.linspace(-200, 200, 4000), [-104, -88, -87, -20, 1e-3, 20, 20.5, -0.0]])
    logits = logits.astype(np.float32).reshape(-1, E)
    eye = np.eye(E, dtype=np.float32)  # gate weight = identity: the router logits are exactly `logits`
    ours = np.asarray(moe.router_scores(jnp.asarray(logits), jnp.asarray(eye)))
    ref = to_np(ACT2FN["sqrtsoftplus"](torch.tensor(logits)))
    assert np.isfinite(ours).all() and (ours >= 0).all()
    assert (np.diff(ours.reshape(-1)[:4000]) >= 0).all()
    assert_close(ours, ref, "sqrt-softplus")
    normal = ref**2 >= np.finfo(np.float32).tiny  # below that, XLA flushes the subnormal softplus to 0
    np.testing.assert_allclose(ours[normal], ref[normal], rtol=1e-6)
    assert (ours[~normal] < 1e-18).all()

    cfg = tiny(hidden_size=E, n_routed_experts=E)
    router = hf.DeepseekV4TopKRouter(hf_config(cfg))
    bias = np.random.RandomState(0).randn(E).astype(np.float32) * 0.1
    with torch.no_grad():
        router.weight.copy_(torch.tensor(eye))
        router.e_score_correction_bias.copy_(torch.tensor(bias))
        rows = np.stack([np.full(E, -200.0), np.full(E, 200.0), np.linspace(-200, 200, E),
                         np.r_[np.full(E - 2, -200.0), 3.0, -1.0]]).astype(np.float32)
        _, ref_w, ref_idx = router(torch.tensor(rows))
    w, idx = moe.route_learned(moe.router_scores(jnp.asarray(rows), jnp.asarray(eye)), jnp.asarray(bias),
                               cfg.num_experts_per_tok, cfg.routed_scaling_factor)
    assert np.isfinite(np.asarray(w)).all()
    assert_same_sets(idx, ref_idx, "expert ids")
    assert_close(dense_weights(w, idx, E), dense_weights(ref_w, ref_idx, E), "routing weights")


@pytest.mark.parametrize("T", [1, 3, moe.RANK_TOP_K_MAX_TOKENS, moe.RANK_TOP_K_MAX_TOKENS + 1])
def test_top_k_ids_is_lax_top_k(T):
    """The rank-based pick (up to RANK_TOP_K_MAX_TOKENS tokens) returns lax.top_k's ids in its order, ties
    included (scores drawn from 7 values over 256 experts, so most rows tie at the k-th place), and plain
    random rows; NaN rows still give valid ids."""
    E, k = 256, 6
    tied = jax.random.randint(jax.random.PRNGKey(T), (T, E), 0, 7).astype(jnp.float32)
    plain = jax.random.normal(jax.random.PRNGKey(100 + T), (T, E))
    for x in (tied, plain):
        np.testing.assert_array_equal(np.asarray(moe.top_k_ids(x, k)), np.asarray(jax.lax.top_k(x, k)[1]))
    ids = np.asarray(moe.top_k_ids(plain.at[0, ::3].set(jnp.nan), k))
    assert ((0 <= ids) & (ids < E)).all()


# ----- 7. experts ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layer", [0, 3])  # hash MoE, learned MoE
def test_moe_block_matches_reference(components, layer):
    """routed_experts + shared expert vs DeepseekV4SparseMoeBlock, with inputs large enough that the SwiGLU
    clamp (gate <= 10, |up| <= 10) is active in both the routed and the shared experts."""
    comp = components("mixed")
    cfg, (ours, ref) = comp.cfg, comp.pair(f"model.layers.{layer}.mlp")
    rng = np.random.RandomState(10 + layer)
    B, S, d, F = 2, 9, cfg.hidden_size, cfg.moe_intermediate_size
    x = (rng.randn(B, S, d) * rng.choice([1.0, 30.0], (B, S, 1))).astype(np.float32)
    ids = rng.randint(0, cfg.vocab_size, (B, S))
    flat, flat_t = x.reshape(-1, d), torch.tensor(x.reshape(-1, d))
    with torch.no_grad():
        ref_out = ref(torch.tensor(x), input_ids=torch.tensor(ids))
        _, ref_w, ref_idx = ref.gate(flat_t, torch.tensor(ids)) if ref.is_hash else ref.gate(flat_t)
        ref_routed = ref.experts(flat_t, ref_idx, ref_w)
        ref_shared = ref.shared_experts(flat_t)
        gate_up = torch.einsum("td,efd->tef", flat_t, ref.experts.gate_up_proj)
        shared_gate = ref.shared_experts.gate_proj(flat_t)
    limit = cfg.swiglu_limit
    assert (gate_up[..., :F] > limit).any() and (gate_up[..., F:].abs() > limit).any() and (shared_gate > limit).any()

    # Experts on the reference's own routing (isolates them from the selection), then the whole block.
    routed = ops.routed_experts(jnp.asarray(flat), jnp.asarray(to_np(ref_idx), jnp.int32), jnp.asarray(to_np(ref_w)),
                                ours.experts.gate_up_proj[...], ours.experts.down_proj[...], limit)
    assert_close(routed, ref_routed, "routed experts")
    shared = ours.shared_experts(jnp.asarray(flat))
    assert_close(shared, ref_shared, "shared expert")
    assert_close(routed + shared, ref_out.reshape(-1, d), "routed + shared")
    assert_close(ours(jnp.asarray(x), jnp.asarray(ids)), ref_out, "MoE block")


# ----- 8. decoder layers -----------------------------------------------------------------------------------

# "mixed": SWA + hash MoE, CSA + hash MoE, HCA + learned MoE; "wide": CSA + learned MoE, head_dim 64, 6 heads.
@pytest.mark.parametrize("name,layer", [("mixed", 0), ("mixed", 2), ("mixed", 3), ("wide", 1)])
def test_decoder_layer_matches_reference(components, name, layer):
    """Attention and the whole decoder layer vs the reference's, on the layer input the reference saw in its
    full stateless forward; stateless metadata and a fresh cache on our side. The caches our attention
    returns hold the reference's compressed entries (and indexer keys) after the chunk."""
    comp = components(name)
    cfg, S = comp.cfg, comp.S
    ours, _ = comp.pair(f"model.layers.{layer}")
    layer_call, attn_call = comp.calls[f"model.layers.{layer}"], comp.calls[f"model.layers.{layer}.self_attn"]

    attn_out, cache = ours.self_attn(comp.pad(attn_call.args[0]), comp.meta, comp.fresh_cache(layer))
    assert_close(attn_out[:, :S], attn_call.output[0], f"layer {layer} attention")
    if cfg.layer_types[layer] != SLIDING:
        compressor = f"model.layers.{layer}.self_attn.compressor"
        assert_close(cache.compressed_kv, comp.calls[compressor].output[0][:, 0], "compressed cache rows")
        if cfg.layer_types[layer] == CSA:
            assert_close(cache.index_keys, comp.calls[compressor + ".indexer.scorer"].args[1], "indexer key rows")

    streams, _ = ours(comp.pad(layer_call.args[0]), comp.pad(comp.ids), comp.meta, comp.fresh_cache(layer))
    assert_close(streams[:, :S], layer_call.output, f"layer {layer} output streams")
