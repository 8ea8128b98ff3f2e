"""Per-layer decode state as pytrees (donated through ``jax.jit`` by the engine), assembled from the pieces
of the concepts that own them.

Every layer keeps its sliding window ring (sliding_window.py). CSA/HCA layers add their compressed entries
(row w = window w) and the compressor state (compression.py); CSA layers add the indexer's keys and its
compressor state. Every array field declares its logical axes (model/spec.py ``axes_field``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .compression import CompressorState, init_compressor_state, overlaps
from .config import DeepseekV4Config
from .sliding_window import init_ring
from .spec import axes_field


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    window_kv: jax.Array = axes_field("batch", "window", "kv")  # [B, W, D]
    compressed_kv: jax.Array | None = axes_field("batch", "cache_seq", "kv", default=None)  # [B, capacity // m, D]
    compressor: CompressorState | None = None
    index_keys: jax.Array | None = axes_field("batch", "cache_seq", "kv", default=None)  # [B, capacity // 4, D_I]
    indexer: CompressorState | None = None


def init_layer_cache(cfg: DeepseekV4Config, layer: int, batch: int, capacity: int, dtype) -> LayerCache:
    window = init_ring(cfg, batch, dtype)
    m = cfg.layer_compress_rate(layer)
    if m == 0:
        return LayerCache(window_kv=window)
    cache = LayerCache(
        window_kv=window,
        compressed_kv=jnp.zeros((batch, capacity // m, cfg.head_dim), dtype),
        compressor=init_compressor_state(cfg, m, cfg.head_dim, batch),
    )
    if overlaps(cfg, m):  # CSA: the indexer's keys and its own overlapping compressor
        cache = dataclasses.replace(
            cache,
            index_keys=jnp.zeros((batch, capacity // m, cfg.index_head_dim), dtype),
            indexer=init_compressor_state(cfg, m, cfg.index_head_dim, batch),
        )
    return cache


def init_cache(cfg: DeepseekV4Config, batch: int, capacity: int, dtype) -> tuple[LayerCache, ...]:
    """Empty caches for ``batch`` sequences of up to ``capacity`` tokens each."""
    return tuple(init_layer_cache(cfg, i, batch, capacity, dtype) for i in range(cfg.num_hidden_layers))
