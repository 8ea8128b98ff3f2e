"""Per-layer decode state as pytrees (donated through ``jax.jit`` by the engine).

Every layer keeps its sliding window as a ring of post-norm, post-RoPE K=V rows indexed by
``position % W``. CSA/HCA layers add their compressed entries (row w = window w) and the
compressor state: the raw kv/gate projections of the last ``span`` tokens (ring by
``position % span``), which covers the open window and, for the overlapping CSA compressor,
the previous window's a-half. CSA layers add the indexer's keys and its compressor state.
Every array field declares its logical axes (model/spec.py ``axes_field``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .config import CSA, SLIDING, DeepseekV4Config
from .metadata import span_of
from .spec import axes_field


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CompressorState:
    kv: jax.Array = axes_field("batch", "span", "kv")  # [B, span, coff * D] fp32 raw projections
    # [B, span, coff * D] fp32 raw gate logits (position bias added when pooling)
    gate: jax.Array = axes_field("batch", "span", "kv")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    window_kv: jax.Array = axes_field("batch", "window", "kv")  # [B, W, D]
    compressed_kv: jax.Array | None = axes_field("batch", "cache_seq", "kv", default=None)  # [B, capacity // m, D]
    compressor: CompressorState | None = None
    index_keys: jax.Array | None = axes_field("batch", "cache_seq", "kv", default=None)  # [B, capacity // 4, D_I]
    indexer: CompressorState | None = None


def _compressor_state(batch: int, span: int, width: int) -> CompressorState:
    return CompressorState(kv=jnp.zeros((batch, span, width), jnp.float32),
                           gate=jnp.zeros((batch, span, width), jnp.float32))


def init_layer_cache(cfg: DeepseekV4Config, layer: int, batch: int, capacity: int, dtype) -> LayerCache:
    layer_type = cfg.layer_types[layer]
    window = jnp.zeros((batch, cfg.sliding_window, cfg.head_dim), dtype)
    if layer_type == SLIDING:
        return LayerCache(window_kv=window)
    m = cfg.compress_rate(layer_type)
    span = span_of(cfg, m)
    coff = 2 if layer_type == CSA else 1
    cache = LayerCache(
        window_kv=window,
        compressed_kv=jnp.zeros((batch, capacity // m, cfg.head_dim), dtype),
        compressor=_compressor_state(batch, span, coff * cfg.head_dim),
    )
    if layer_type == CSA:
        cache = dataclasses.replace(
            cache,
            index_keys=jnp.zeros((batch, capacity // m, cfg.index_head_dim), dtype),
            indexer=_compressor_state(batch, span, 2 * cfg.index_head_dim),
        )
    return cache


def init_cache(cfg: DeepseekV4Config, batch: int, capacity: int, dtype) -> tuple[LayerCache, ...]:
    """Empty caches for ``batch`` sequences of up to ``capacity`` tokens each."""
    return tuple(init_layer_cache(cfg, i, batch, capacity, dtype) for i in range(cfg.num_hidden_layers))
