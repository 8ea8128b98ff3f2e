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

from .. import ops
from ..ops.dense import grouped_linear, unweighted_rms_norm
from .layers import Linear, RMSNorm
from .cache import LayerCache
from .compression import overlaps
from .compressor import Compressor
from .config import DeepseekV4Config
from .indexer import Indexer
from .metadata import ForwardMetadata
from .rope import apply_rope, rope_kind_of
from .sliding_window import query_block, window_keys
from .spec import Storage, param


class GroupedLinear(nnx.Module):
    """Block-diagonal projection: group g of heads -> its own r_o outputs; weight [G * r_o, (H/G) * D] (a
    tensor-parallel shard holds G / tp whole groups)."""

    def __init__(self, in_per_group: int, out_per_group: int, groups: int, *, dtype, rngs: nnx.Rngs):
        self.out_per_group = out_per_group
        out_features = groups * out_per_group
        self.weight = param(0.02 * jax.random.normal(rngs.params(), (out_features, in_per_group)), ("o_lora", "o_in"),
                            Storage.FP8, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., G, in_per_group] -> [..., G, r_o]."""
        return grouped_linear(x, self.weight.get_value(), self.out_per_group)


class Attention(nnx.Module):
    def __init__(self, cfg: DeepseekV4Config, layer: int, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.layer_type = cfg.layer_types[layer]
        self.rope_kind = rope_kind_of(self.layer_type)
        H, D = cfg.num_attention_heads, cfg.head_dim
        fp8 = dict(storage=Storage.FP8, dtype=dtype, rngs=rngs)
        self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank, axes=("q_lora", "embed"), **fp8)
        self.q_a_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, "q_lora")
        self.q_b_proj = Linear(cfg.q_lora_rank, H * D, axes=("heads", "q_lora"), **fp8)
        self.kv_proj = Linear(cfg.hidden_size, D, axes=("kv", "embed"), **fp8)
        self.kv_norm = RMSNorm(D, cfg.rms_norm_eps, "kv")
        self.o_a_proj = GroupedLinear(H * D // cfg.o_groups, cfg.o_lora_rank, cfg.o_groups, dtype=dtype, rngs=rngs)
        self.o_b_proj = Linear(cfg.o_groups * cfg.o_lora_rank, cfg.hidden_size, axes=("embed", "o_lora"),
                               row_parallel=True, **fp8)
        self.sinks = param(jax.random.normal(rngs.params(), (H,), jnp.float32), ("heads",), Storage.FP32)
        compressor = None
        m = cfg.compress_rate(self.layer_type)
        if m:
            compressor = Compressor(cfg, m, D, dtype=dtype, rngs=rngs,
                                    indexer=Indexer(cfg, dtype=dtype, rngs=rngs) if overlaps(cfg, m) else None)
        self.compressor = nnx.data(compressor)

    def __call__(self, x: jax.Array, meta: ForwardMetadata, cache: LayerCache) -> tuple[jax.Array, LayerCache]:
        """x [B, C, d] (normed) -> (out [B, C, d], updated layer cache). Under tensor parallelism this device
        computes its shard of the heads (and of the output groups) and the output projection sums the shards."""
        c = self.cfg
        B, C, _ = x.shape
        D = c.head_dim
        cos, sin = meta.rope[self.rope_kind]
        cos_h, sin_h = cos[:, :, None], sin[:, :, None]

        q_latent = self.q_a_norm(self.q_a_proj(x))
        q = unweighted_rms_norm(self.q_b_proj(q_latent).reshape(B, C, -1, D), c.rms_norm_eps)
        q = apply_rope(q, cos_h, sin_h)
        kv = apply_rope(self.kv_norm(self.kv_proj(x)), cos, sin)

        win_keys, ring = window_keys(cache.window_kv, kv, meta.window, query_block(c, C))
        cache = dataclasses.replace(cache, window_kv=ring)

        # Compressed rows this layer may attend to, and each query's entry ids into them (-1 = none):
        # the indexer's top-k on CSA layers, every visible entry on HCA layers.
        entries = entry_ids = None
        if self.compressor is not None:
            cm = meta.compression[self.compressor.ratio]
            compressed, state = self.compressor.compress(x, cache.compressor, cache.compressed_kv, cm)
            cache = dataclasses.replace(cache, compressed_kv=compressed, compressor=state)
            if compressed.shape[1] == 0:
                pass  # capacity below one window: no entry can ever exist
            elif self.compressor.indexer is not None:
                entry_ids, keys, istate = self.compressor.indexer(x, q_latent, cos, sin, cache.indexer,
                                                                  cache.index_keys, cm)
                cache = dataclasses.replace(cache, index_keys=keys, indexer=istate)
                entries = compressed
            else:
                entries, entry_ids = compressed, cm.visible_ids

        o = ops.sparse_attention(q, win_keys, meta.window.key_mask, entries, entry_ids, self.sinks[...], D**-0.5,
                                 shared_entries=self.compressor is not None and self.compressor.indexer is None)
        o = apply_rope(o, cos_h, sin_h, inverse=True)
        groups = self.o_a_proj.weight.get_value().shape[0] // c.o_lora_rank  # this device's output groups
        grouped = self.o_a_proj(o.reshape(B, C, groups, -1)).reshape(B, C, -1)
        return self.o_b_proj(grouped), cache
