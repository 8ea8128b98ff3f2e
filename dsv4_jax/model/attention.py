"""Attention: q-LoRA queries, one shared K=V head, sliding window + compressed entries, per-head sink.

Per query t the key set is the W most recent tokens (ring + chunk) joined with compressed entries:
the indexer's top-k picks on CSA layers, every visible entry on HCA layers. Both sets enter one
softmax together with the sink logit (denominator only). Because V = K carries RoPE on its trailing
channels, the output is rotated back by -t before the grouped low-rank output projection.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from .layers import Linear, RMSNorm, unweighted_rms_norm
from .cache import LayerCache
from .compressor import Compressor, overlaps
from .config import DeepseekV4Config
from .indexer import Indexer
from .metadata import ForwardMetadata
from .rope import apply_rope, rope_kind_of
from .sliding_window import query_block, window_keys


def sink_attention(q: jax.Array, win_keys: jax.Array, win_mask: jax.Array, comp_keys: jax.Array | None,
                   comp_mask: jax.Array | None, sinks: jax.Array, scale: float) -> jax.Array:
    """One softmax over window keys, compressed keys and the sink; values are the keys (K = V).

    q [B, C, H, D]; win_keys [B, C/Bq, Kw, D]; win_mask [B, C, Kw] (Kw = W + Bq, or W when C == 1: see
    ``WindowMeta``);
    comp_keys [B, N, D] (shared by all queries) or [B, C, K, D] (per query); comp_mask [B, C, N|K];
    sinks [H]. Returns [B, C, H, D] in q's dtype.
    """
    B, C, H, D = q.shape
    nb, span = win_keys.shape[1], win_keys.shape[2]
    qb = q.reshape(B, nb, C // nb, H, D)
    lw = jnp.einsum("bnqhd,bnkd->bnqhk", qb, win_keys, preferred_element_type=jnp.float32) * scale
    lw = jnp.where(win_mask.reshape(B, nb, C // nb, 1, span), lw, -jnp.inf).reshape(B, C, H, span)
    parts = [lw]
    if comp_keys is not None:
        spec = "bchd,bnd->bchn" if comp_keys.ndim == 3 else "bchd,bckd->bchk"
        lc = jnp.einsum(spec, q, comp_keys, preferred_element_type=jnp.float32) * scale
        parts.append(jnp.where(comp_mask[:, :, None, :], lc, -jnp.inf))
    sink = jnp.broadcast_to(sinks.astype(jnp.float32)[None, None, :, None], (B, C, H, 1))
    logits = jnp.concatenate(parts + [sink], axis=-1)
    probs = jax.nn.softmax(logits, axis=-1)
    pw = probs[..., :span].reshape(B, nb, C // nb, H, span).astype(q.dtype)
    out = jnp.einsum("bnqhk,bnkd->bnqhd", pw, win_keys, preferred_element_type=jnp.float32).reshape(B, C, H, D)
    if comp_keys is not None:
        pc = probs[..., span:-1].astype(q.dtype)
        spec = "bchn,bnd->bchd" if comp_keys.ndim == 3 else "bchk,bckd->bchd"
        out = out + jnp.einsum(spec, pc, comp_keys, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def gather_entries(compressed: jax.Array, picks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """compressed [B, N, D], picks [B, C, k] (-1 = none) -> (entries [B, C, k, D], valid [B, C, k])."""
    B, C, k = picks.shape
    rows = jnp.take_along_axis(compressed, jnp.maximum(picks, 0).reshape(B, C * k, 1), axis=1)
    return rows.reshape(B, C, k, -1), picks >= 0


def _pallas_attention(q, win_keys, win_mask, entries, entry_ids, sinks, scale):
    """A chunk (a decode step is a chunk of one) through the Pallas kernel (kernels_pallas/sparse_attention.py):
    window rows + entries picked by id per query (-1 = none)."""
    from kernels_pallas.common import interpret_default
    from kernels_pallas.sparse_attention import sparse_attention_prefill

    B, C, H, D = q.shape
    if entries is None:  # sliding-window-only layer: no compressed entries
        entries = jnp.zeros((B, 1, D), q.dtype)
        entry_ids = jnp.full((B, C, 1), -1, jnp.int32)
    return sparse_attention_prefill(q, win_keys, win_mask, entries, entry_ids, sinks, scale,
                                    interpret=interpret_default())


class GroupedLinear(nnx.Module):
    """Block-diagonal projection: group g of heads -> its own r_o outputs; weight [G * r_o, (H/G) * D]."""

    def __init__(self, in_per_group: int, out_features: int, groups: int, *, dtype, rngs: nnx.Rngs):
        self.groups = groups
        self.weight = nnx.Param((0.02 * jax.random.normal(rngs.params(), (out_features, in_per_group))).astype(dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., G, in_per_group] -> [..., G, r_o]."""
        w = self.weight[...].reshape(self.groups, -1, x.shape[-1])
        return jnp.einsum("...gi,goi->...go", x, w.astype(x.dtype))


class Attention(nnx.Module):
    def __init__(self, cfg: DeepseekV4Config, layer: int, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.layer_type = cfg.layer_types[layer]
        self.rope_kind = rope_kind_of(self.layer_type)
        H, D = cfg.num_attention_heads, cfg.head_dim
        self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank, dtype=dtype, rngs=rngs)
        self.q_a_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.q_b_proj = Linear(cfg.q_lora_rank, H * D, dtype=dtype, rngs=rngs)
        self.kv_proj = Linear(cfg.hidden_size, D, dtype=dtype, rngs=rngs)
        self.kv_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.o_a_proj = GroupedLinear(H * D // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, cfg.o_groups,
                                      dtype=dtype, rngs=rngs)
        self.o_b_proj = Linear(cfg.o_groups * cfg.o_lora_rank, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.sinks = nnx.Param(jax.random.normal(rngs.params(), (H,), jnp.float32))
        compressor = None
        m = cfg.compress_rate(self.layer_type)
        if m:
            compressor = Compressor(cfg, m, D, dtype=dtype, rngs=rngs,
                                    indexer=Indexer(cfg, dtype=dtype, rngs=rngs) if overlaps(cfg, m) else None)
        self.compressor = nnx.data(compressor)

    def __call__(self, x: jax.Array, meta: ForwardMetadata, cache: LayerCache,
                 kernels: str = "xla") -> tuple[jax.Array, LayerCache]:
        """x [B, C, d] (normed) -> (out [B, C, d], updated layer cache)."""
        c = self.cfg
        B, C, _ = x.shape
        H, D = c.num_attention_heads, c.head_dim
        cos, sin = meta.rope[self.rope_kind]
        cos_h, sin_h = cos[:, :, None], sin[:, :, None]

        q_latent = self.q_a_norm(self.q_a_proj(x))
        q = unweighted_rms_norm(self.q_b_proj(q_latent).reshape(B, C, H, D), c.rms_norm_eps)
        q = apply_rope(q, cos_h, sin_h)
        kv = apply_rope(self.kv_norm(self.kv_proj(x)), cos, sin)

        win_keys, ring = window_keys(cache.window_kv, kv, meta.window, query_block(c, C))
        cache = dataclasses.replace(cache, window_kv=ring)

        # Compressed rows this layer may attend to, and each query's entry ids into them (-1 = none):
        # the indexer's top-k on CSA layers, every visible entry on HCA layers.
        entries = entry_ids = None
        if self.compressor is not None:
            cm = meta.compression[self.compressor.ratio]
            compressed, state = self.compressor.compress(x, cache.compressor, cache.compressed_kv, cm, kernels)
            cache = dataclasses.replace(cache, compressed_kv=compressed, compressor=state)
            if compressed.shape[1] == 0:
                pass  # capacity below one window: no entry can ever exist
            elif self.compressor.indexer is not None:
                entry_ids, keys, istate = self.compressor.indexer(x, q_latent, cos, sin, cache.indexer,
                                                                  cache.index_keys, cm, kernels)
                cache = dataclasses.replace(cache, index_keys=keys, indexer=istate)
                entries = compressed
            else:
                entries, entry_ids = compressed, cm.visible_ids

        scale = D**-0.5
        if kernels == "pallas":
            o = _pallas_attention(q, win_keys, meta.window.key_mask, entries, entry_ids, self.sinks[...], scale)
        elif entries is None:
            o = sink_attention(q, win_keys, meta.window.key_mask, None, None, self.sinks[...], scale)
        elif self.compressor.indexer is not None:  # CSA: gather each query's picks
            picked, valid = gather_entries(entries, entry_ids)
            o = sink_attention(q, win_keys, meta.window.key_mask, picked, valid, self.sinks[...], scale)
        else:  # HCA: all rows, masked to the visible prefix
            o = sink_attention(q, win_keys, meta.window.key_mask, entries, entry_ids >= 0, self.sinks[...], scale)
        o = apply_rope(o, cos_h, sin_h, inverse=True)
        grouped = self.o_a_proj(o.reshape(B, C, c.o_groups, -1)).reshape(B, C, -1)
        return self.o_b_proj(grouped), cache
